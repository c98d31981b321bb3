"""Bad input beyond a bad key, tried as a new user would: one table, one CLI call per case.

Every case must end in one line ``prefnb <command>: error: …`` that names what is wrong, exit
status 2, no traceback, and nothing left that looks finished (no COMPLETE, no run directory).
The checks run before anything is allocated (prefnb/preflight.py): the cases take a second.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import pytest

from prefnb import cli

ROOT = Path(__file__).resolve().parent.parent


def _file(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def _other_tokenizer_model(tmp: Path) -> str:
    """A local model directory whose tokenizer is not the tiny model's (word-level, 3 tokens)."""
    from tokenizers import Tokenizer, models
    from transformers import GPT2Config, PreTrainedTokenizerFast

    folder = tmp / "other-model"
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "yes": 1, "no": 2}, unk_token="[UNK]"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[UNK]").save_pretrained(folder)
    GPT2Config(n_layer=1, n_head=1, n_embd=8, vocab_size=3, bos_token_id=0, eos_token_id=0).save_pretrained(folder)
    return str(folder)


def _no_bf16_gpu(monkeypatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Fake V100")


SONNET_RUN = ["--set", "task=sonnets", "--set", "max_train_examples=8", "--set", "batch_size=4",
              "--set", "max_steps=1", "--no-progress"]

# (case id, argv builder (tmp, monkeypatch) -> argv, message regex)
CASES = [
    ("duplicate key", lambda t, m: ["train", _file(t, "p.yaml", "beta: 0.1\nobjective: dpo\nbeta: 1\n")],
     r"p\.yaml: key 'beta' is given twice \(lines 1 and 3\)"),
    ("yes/no read as a boolean", lambda t, m: ["train", _file(t, "p.yaml", "task: no\n")],
     r"key 'task' must be one of .* got False \(YAML reads an unquoted yes/no/on/off/true/false as a boolean"),
    ("1e3 read as a string", lambda t, m: ["train", _file(t, "p.yaml", "max_steps: 1e3\n")],
     r"key 'max_steps' must be an integer >= 1, got '1e3' \(YAML reads 1e3 as a string; write the integer 1000\)"),
    ("inf for an integer", lambda t, m: ["train", "--set", "max_steps=inf"],
     r"key 'max_steps' must be an integer >= 1, got 'inf'"),
    ("not valid YAML", lambda t, m: ["train", _file(t, "p.yaml", "beta: [0.1\n")], r"p\.yaml: not valid YAML"),
    ("params file missing", lambda t, m: ["train", str(t / "nope.yaml")], r"nope\.yaml: params file not found"),
    ("max_length beyond the model's positions", lambda t, m: ["train", *SONNET_RUN, "--set", "max_length=4096"],
     r"max_length 4096 exceeds the 1024 positions of model 'tiny'; set max_length <= 1024"),
    ("batch larger than the training split", lambda t, m: [
        "train", "--set", "task=jsonl", "--set", "data_path=" + _file(t, "d.jsonl", "".join(
            json.dumps({"prompt": f"q{i}", "completion": " a"}) + "\n" for i in range(5))), "--set", "batch_size=8"],
     r"batch_size 8 x grad_accum_steps 1 = 8 examples per step, but the jsonl training split has \d"),
    ("reference with another tokenizer", lambda t, m: [
        "train", *SONNET_RUN, "--set", "objective=dpo", "--set", f"reference={_other_tokenizer_model(t)}"],
     r"reference '.*other-model' uses a different tokenizer than the policy"),
    ("init_from that is no run", lambda t, m: ["train", *SONNET_RUN, "--set", f"init_from={t}"],
     r"init_from '.*': no checkpoint there"),
    ("bf16 on a GPU without bf16", lambda t, m: _no_bf16_gpu(m) or ["train", *SONNET_RUN, "--set", "precision=bf16"],
     r"precision 'bf16': Fake V100 has no bfloat16 support"),
    ("output_dir under a file", lambda t, m: [
        "train", *SONNET_RUN, "--set", f"output_dir={_file(t, 'taken', 'x')}/run"], r"output_dir '.*taken/run': .*taken is a file"),
    ("cache_dir not writable", lambda t, m: ["train", *SONNET_RUN, "--set", "cache_dir=/proc/prefnb-cache"],
     r"cache_dir '/proc/prefnb-cache': cannot write in /proc"),
    ("data folder missing", lambda t, m: ["data", "--data-dir", str(t / "no-data")], r"data directory not found"),
    ("study: unknown run id", lambda t, m: ["study", "--run", "paraphrase-sft-0000000000"],
     r"run 'paraphrase-sft-0000000000' is not a run of this study"),
    ("study: unknown experiment", lambda t, m: ["study", "--only", "09_nothing"], r"--only 09_nothing: no such experiment"),
    ("study: unknown profile", lambda t, m: ["study", "--profile", "gpt3", "--list"], r"profile 'gpt3' not found"),
    ("study: outputs is a file", lambda t, m: ["study", "--only", "01_sft", "--outputs", _file(t, "out", "x")],
     r"--outputs '.*out': .*out is a file, not a folder"),
    ("paper before any study", lambda t, m: ["paper", "--outputs", str(t / "outputs")],
     r"no outputs folder at .*outputs: run `prefnb study` first"),
    ("paper with no finished run", lambda t, m: (t / "outputs" / "01_sft" / "x").mkdir(parents=True) or [
        "paper", "--outputs", str(t / "outputs")], r"no finished runs under .*outputs: run `prefnb study` first"),
    ("verify before any study", lambda t, m: ["verify", "--outputs", str(t / "outputs")],
     r"no outputs folder at .*outputs"),
    ("paper folder not writable", lambda t, m: (_fake_finished_run(t), [
        "paper", "--outputs", str(t / "outputs"), "--paper", "/proc/paper"])[1],
     r"--paper '/proc/paper/_generated': cannot write in /proc"),
]


def _fake_finished_run(tmp: Path) -> None:
    run = tmp / "outputs" / "01_sft" / "r"
    run.mkdir(parents=True)
    (run / "params.yaml").write_text("task: paraphrase\n")
    (run / "COMPLETE").write_text("")


@pytest.mark.parametrize("argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing_finished(argv, message, tmp_path, monkeypatch, capsys):
    project = tmp_path / "project"  # a copy of the project: the commands find it from the working directory
    for name in ("params", "notebooks"):
        shutil.copytree(ROOT / name, project / name)
    monkeypatch.chdir(project)
    monkeypatch.setattr(logging.root, "handlers", [])  # cli.main's basicConfig: log to this test's stderr
    args = argv(tmp_path, monkeypatch)
    if args[0] == "train" and not any(a.startswith("output_dir=") for a in args):
        args += ["--set", f"output_dir={tmp_path / 'run'}"]
    rc = cli.main(args)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"prefnb {args[0]}: error:")]
    assert rc == 2 and len(lines) == 1, err
    assert re.search(message, lines[0]), lines[0]
    assert "Traceback" not in err
    finished = [p for p in tmp_path.rglob("COMPLETE") if "outputs/01_sft/r" not in p.as_posix()]
    assert not finished and not (tmp_path / "run").exists() and not (project / "outputs").exists()
