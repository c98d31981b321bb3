"""The training loop end to end on the tiny model (CPU, seconds per run)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from prefnb import losses, models, plugins, schedule, train as train_mod
from prefnb.cli import main as cli_main
from prefnb.config import resolve_params
from prefnb.logprobs import collate, encode
from prefnb.session import Session

TINY = dict(model="tiny", max_train_examples=24, max_eval_examples=8, max_test_examples=8, batch_size=4, max_steps=6, log_every=2,
            learning_rate=3e-3, max_length=160, max_new_tokens=8, eval_batch_size=16)


def make_params(tmp_path: Path, name: str, **overrides):
    values = {**TINY, "output_dir": str(tmp_path / name), "cache_dir": str(tmp_path / "cache"), **overrides}
    return resolve_params([("test", values)])


def history(run_dir: Path, key: str = "loss") -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if key in r]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    """An SFT run on paraphrase that later tests start DPO from."""
    tmp = tmp_path_factory.mktemp("sft")
    params = make_params(tmp, "sft", max_steps=16, log_every=4)
    metrics = train_mod.train(params, progress=False)
    return params, metrics


def test_sft_writes_the_run_directory_and_loss_falls(sft_run):
    params, metrics = sft_run
    out = Path(params.output_dir)
    for name in ("params.yaml", "history.jsonl", "metrics.json", "manifest.json", "checkpoint"):
        assert (out / name).exists(), name
    assert not (out / "COMPLETE").exists()  # the caller writes the marker, last
    losses_logged = history(out)
    assert losses_logged[-1] < losses_logged[0]
    assert 0.0 <= metrics["eval/accuracy"] <= 1.0 and "eval/f1" in metrics
    assert 0.0 <= metrics["test/accuracy"] <= 1.0 and "test/f1" in metrics  # the report split, scored once
    assert metrics["train/tokens_per_second"] > 0 and metrics["train/process_peak_rss_bytes"] > 0
    # 16 steps: step 1 is timed from the call, steady throughput from step 3 (the warm-up) on.
    assert 0 < metrics["train/first_step_seconds"] < metrics["run/seconds"]
    assert metrics["train/steady_steps_per_second"] > 0 and metrics["train/steady_tokens_per_second"] > 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["files_sha256"]["quora-pairs.tsv"].startswith("66279661d492")
    assert manifest["packages"]["torch"] and manifest["seed"] == params.seed


def test_staged_dpo_from_sft_raises_reward_accuracy_and_shares_the_reference_cache(sft_run, tmp_path):
    sft_params, _ = sft_run
    dpo = make_params(tmp_path, "dpo", objective="dpo", init_from=sft_params.output_dir, max_steps=20, log_every=5,
                      beta=0.5)
    metrics = train_mod.train(dpo, progress=False)
    acc = history(Path(dpo.output_dir), "rewards/accuracies")
    assert acc[-1] > acc[0]
    assert history(Path(dpo.output_dir), "loss")[0] == pytest.approx(0.693, abs=0.05)  # starts at ln 2
    cached = sorted((tmp_path / "cache").glob("*reference_logps/*.pt"))
    assert len(cached) == 4  # the training batches, selection and report pairs, report pairs under the base
    # A β sweep reuses the same reference log-probs: no new cache entries.
    train_mod.train(make_params(tmp_path, "dpo_beta", objective="dpo", init_from=sft_params.output_dir, beta=0.05,
                                max_steps=20, log_every=5), progress=False)
    assert sorted((tmp_path / "cache").glob("*reference_logps/*.pt")) == cached

    # Against the SFT model (the run's reference) and against the base model the chain started from.
    from prefnb import data as data_lib, evaluate
    from prefnb.logprobs import score_pairs
    from prefnb.precompute import ADD_EOS, Encoders

    policy, tokenizer = models.load_checkpoint(dpo.output_dir)
    encoders = Encoders(tokenizer, dpo.max_length, ADD_EOS[dpo.task])
    chosen, rejected = encoders.pairs(data_lib.load_task(dpo).test_pairs)

    def scores(model):
        return score_pairs(model, chosen, rejected, pad_id=tokenizer.pad_token_id, batch_size=16, device="cpu")

    mine, sft_model, base = scores(policy), scores(models.load_checkpoint(sft_params.output_dir)[0]), \
        scores(models.build_tiny(dpo.seed)[0])
    assert metrics["test/implicit_reward_accuracy"] == evaluate.implicit_reward_accuracy(*mine, *sft_model)
    assert metrics["test/implicit_reward_accuracy_total"] == evaluate.implicit_reward_accuracy(*mine, *base)
    assert models.chain_base(dpo.output_dir) == ("tiny", dpo.seed)
    assert "test/implicit_reward_accuracy_total" not in sft_run[1]  # no chain: its reference is the base


def test_the_report_split_is_scored_once_on_the_selected_checkpoint(tmp_path, monkeypatch):
    """Selection picks the step-2 checkpoint of 6 (the first evaluation wins every tie-break
    here); the test split must be scored once, after training, on those step-2 weights."""
    real = train_mod.run_evaluation
    calls = []

    def spy(model, tokenizer, split, *args, **kwargs):
        weights = torch.cat([p.detach().flatten() for p in model.parameters()]).clone()
        calls.append((split.name, weights))
        return real(model, tokenizer, split, *args, **kwargs)

    monkeypatch.setattr(train_mod, "run_evaluation", spy)
    monkeypatch.setattr(train_mod, "is_better", lambda metric, new, old: old is None)
    metrics = train_mod.train(make_params(tmp_path, "sel", eval_every=2, max_steps=6), progress=False)
    assert [name for name, _ in calls] == ["eval", "eval", "eval", "test"]  # steps 2, 4, 6 (final); then test
    assert metrics["best_step"] == 2
    selected = calls[0][1]
    assert torch.equal(calls[-1][1], selected) and not torch.equal(calls[-2][1], selected)
    assert {"test/accuracy", "test/f1", "test/implicit_reward_accuracy", "eval/accuracy"} <= metrics.keys()
    history_rows = [json.loads(line) for line in (tmp_path / "sel" / "history.jsonl").read_text().splitlines()]
    assert not any(k.startswith("test/") for row in history_rows for k in row)  # selection only in the history


def test_costs_of_training_alone(tmp_path, monkeypatch):
    """train/seconds leaves evaluation and checkpoint writes out (reported beside it); the CPU
    peak of a second run in one process cannot be its own, so it is null, not a wrong number."""
    import time

    real = train_mod.run_evaluation

    def slow(*args, **kwargs):
        time.sleep(0.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_mod, "run_evaluation", slow)
    m = train_mod.train(make_params(tmp_path, "cost", eval_every=1, max_steps=4, save_every=2), progress=False,
                        session=Session(runs_started=1))  # as if a run came before in this process
    assert m["eval/seconds"] >= 0.5 * 5 and m["checkpoint/seconds"] > 0  # 3 in-loop evals, final, test
    assert m["train/seconds"] + m["eval/seconds"] + m["checkpoint/seconds"] <= m["run/seconds"]
    assert m["train/tokens_per_second"] == pytest.approx(m["train/tokens"] / m["train/seconds"])
    assert m["train/peak_memory_bytes"] is None and m["train/process_peak_rss_bytes"] > 0


def test_lora_changes_only_adapter_weights():
    model, tokenizer = models.build_tiny(0)
    policy = models.add_lora(model, r=4, alpha=8, dropout=0.0, targets="auto")
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    params = resolve_params([("test", {"objective": "sft"})])
    batch = collate([encode(tokenizer, "Question: same?", " yes", max_length=64, add_eos=False)] * 2,
                    tokenizer.pad_token_id)
    for _ in range(3):
        loss, _ = plugins.sft_step(policy, batch, params)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)
    assert any("lora_B" in n for n in changed)


def test_lora_run_saves_only_the_adapter(tmp_path):
    params = make_params(tmp_path, "lora", lora_r=4, max_steps=2)
    train_mod.train(params, progress=False)
    from safetensors.torch import load_file

    ckpt = Path(params.output_dir) / "checkpoint"
    assert json.loads((ckpt / models.CHECKPOINT_RECORD).read_text())["kind"] == "lora"
    tensors = load_file(ckpt / "adapter_model.safetensors")
    assert tensors and all("lora_" in k for k in tensors)
    merged, _ = models.load_checkpoint(params.output_dir)  # rebuilds base + adapter for init_from
    assert not models.is_peft(merged)


def test_same_params_give_identical_metrics(tmp_path):
    a = train_mod.train(make_params(tmp_path, "a"), progress=False)
    b = train_mod.train(make_params(tmp_path, "b"), progress=False)
    assert history(tmp_path / "a") == history(tmp_path / "b")

    def scores(m):  # every selection and report metric; not the seconds they took
        return {k: v for k, v in m.items() if k.startswith(("eval/", "test/")) and not k.endswith("/seconds")}

    assert scores(a) == scores(b) and "test/accuracy" in scores(a)


def test_resume_after_a_crash_is_exact(tmp_path, monkeypatch):
    straight = make_params(tmp_path, "straight", objective="dpo", max_steps=6, save_every=3, log_every=1)
    train_mod.train(straight, progress=False)

    crashed = make_params(tmp_path, "crashed", objective="dpo", max_steps=6, save_every=3, log_every=1)
    real_step, calls = plugins.preference_step, {"n": 0}

    def crash_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(plugins, "preference_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(crashed, progress=False)
    assert (tmp_path / "crashed" / "state" / "state.pt").is_file()
    monkeypatch.setattr(plugins, "preference_step", real_step)
    train_mod.train(crashed, progress=False)
    assert history(tmp_path / "crashed") == history(tmp_path / "straight")
    assert history(tmp_path / "crashed", "rewards/margins") == history(tmp_path / "straight", "rewards/margins")


def test_nan_loss_stops_the_run_naming_the_step(tmp_path, monkeypatch):
    real = losses.token_loss

    def nan_from_third_call(kind, logps, _calls={"n": 0}):
        _calls["n"] += 1
        out = real(kind, logps)
        return out * float("nan") if _calls["n"] >= 3 else out

    monkeypatch.setattr(losses, "token_loss", nan_from_third_call)
    with pytest.raises(train_mod.TrainingError, match="step 3"):
        train_mod.train(make_params(tmp_path, "nan", log_every=5), progress=False)
    assert not (tmp_path / "nan" / "metrics.json").exists()


@pytest.mark.parametrize("objective", sorted(losses.REFERENCE_FREE))
def test_reference_free_objectives_train(tmp_path, objective):
    metrics = train_mod.train(make_params(tmp_path, objective, objective=objective, max_steps=2), progress=False)
    assert metrics["train/loss"] is not None and metrics["train/loss"] == metrics["train/loss"]  # finite, not NaN


def test_reference_kind_changes_the_implicit_reward(tmp_path):
    """The first step's implicit rewards β·log(π/π_ref), before any update: 0 with the policy as
    reference (π = π_ref), β·log π(y|x) with none, β·log(π(y|x)/π(y)) with the prior — three
    different numbers, so `reference: prior` is not silently the policy (or none)."""
    first = {}
    for reference in ("policy", "none", "prior"):
        params = make_params(tmp_path, reference, objective="dpo", reference=reference, max_steps=1, log_every=1)
        metrics = train_mod.train(params, progress=False)
        out = Path(params.output_dir)
        first[reference] = (history(out, "rewards/chosen")[0], history(out, "rewards/rejected")[0])
        assert any(0.0 <= v <= 1.0 for k, v in metrics.items() if k.endswith("/implicit_reward_accuracy"))
    assert first["policy"] == pytest.approx((0.0, 0.0), abs=1e-6)
    for kind in ("none", "prior"):
        assert min(abs(v) for v in first[kind]) > 1e-3, first
    assert first["prior"] != pytest.approx(first["none"], abs=1e-3), first


def test_reference_with_another_tokenizer_is_refused(tmp_path):
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

    other = ByT5Tokenizer(extra_ids=0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(other), n_layer=1, n_head=2, n_embd=16)).save_pretrained(tmp_path / "m")
    other.save_pretrained(tmp_path / "m")
    params = make_params(tmp_path, "mismatch", objective="dpo", reference=str(tmp_path / "m"), max_steps=1)
    with pytest.raises(models.ModelLoadError, match="different tokenizer"):
        train_mod.train(params, progress=False)


def test_sonnets_sft_then_dpo_with_sampled_rejections(tmp_path):
    sft = make_params(tmp_path, "s_sft", task="sonnets", max_steps=4, max_train_examples=8, max_eval_examples=3)
    metrics = train_mod.train(sft, progress=False)
    assert 0.0 <= metrics["eval/chrf"] <= 100.0 and "eval/chrf_full" in metrics
    assert 0.0 <= metrics["test/chrf"] <= 100.0 and "test/chrf_full" in metrics
    dpo = make_params(tmp_path, "s_dpo", task="sonnets", objective="ipo", init_from=sft.output_dir, max_steps=2,
                      max_train_examples=8, max_eval_examples=3)
    train_mod.train(dpo, progress=False)
    assert list((tmp_path / "cache" / "sampled_rejections").glob("*.pt"))


def test_sampled_rejections_are_shared_across_training_seeds(tmp_path, caplog):
    """Rejections are data (drawn with data_seed): a second training seed from the same SFT model
    reuses the first one's samples instead of generating its own."""
    sft = make_params(tmp_path, "s_sft", task="sonnets", max_steps=2, max_train_examples=4, max_eval_examples=2,
                      max_test_examples=2)
    train_mod.train(sft, progress=False)
    for seed in (0, 1):
        dpo = make_params(tmp_path, f"s_dpo{seed}", task="sonnets", objective="dpo", init_from=sft.output_dir, max_steps=1, seed=seed,
                          max_train_examples=4, max_eval_examples=2, max_test_examples=2)
        with caplog.at_level(logging.INFO, logger="prefnb"):
            caplog.clear()
            train_mod.train(dpo, progress=False)
    assert len(list((tmp_path / "cache" / "sampled_rejections").glob("*.pt"))) == 1
    assert "sampled rejected continuations (4): cache hit" in caplog.text


def test_cli_train_marks_finished_and_typos_fail_in_one_line(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(["train", "--no-progress", *sum((["--set", f"{k}={v}"] for k, v in TINY.items()), []),
                     "--set", "max_steps=1", "--set", f"output_dir={out}", "--set", f"cache_dir={tmp_path}/c"]) == 0
    assert (out / "COMPLETE").is_file() and (out / "metrics.json").is_file()

    capsys.readouterr()  # drop the first run's output
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: paraphrase\nbetaa: 0.1\n")
    assert cli_main(["train", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "betaa" in err[0] and str(bad) in err[0] and "beta" in err[0]


def test_cli_sweep_trains_every_combination_in_one_process_as_runs_alone(tmp_path, monkeypatch, capsys):
    for folder in ("params", "notebooks"):  # a project (prefnb.project): its outputs/ hold the sweep's runs
        (tmp_path / folder).mkdir()
    monkeypatch.chdir(tmp_path)  # sweep runs write outputs/<experiment>/<run id>
    base = [*sum((["--set", f"{k}={v}"] for k, v in TINY.items()), []), "--set", "max_steps=2",
            "--set", "objective=dpo", "--set", f"cache_dir={tmp_path}/c"]
    assert cli_main(["train", "--no-progress", *base, "--sweep", "beta=[0.1, 0.5]", "--sweep", "seed=[1, 2]"]) == 0
    runs = sorted(p for p in (tmp_path / "outputs").glob("*/*") if (p / "COMPLETE").is_file())
    assert len(runs) == 4
    alone = make_params(tmp_path, "alone", objective="dpo", max_steps=2, beta=0.5, seed=2)
    train_mod.train(alone, progress=False)
    in_sweep = next(run for run in runs if run.name == alone.run_id())
    assert history(in_sweep) == history(Path(alone.output_dir))  # nothing leaks from one run to the next

    for sweep, named in (("beta=0.1", "non-empty list"), ("precision=[fp32, bf16]", "precision"),
                         ("betaa=[0.1]", "betaa")):
        capsys.readouterr()
        assert cli_main(["train", *base, "--sweep", sweep]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and named in err[0], err
    assert cli_main(["train", *base, "--set", "output_dir=one", "--sweep", "beta=[0.1, 0.5]"]) == 2
    assert "output_dir" in capsys.readouterr().err
    assert not (tmp_path / "one").exists()  # refused before any work


def test_hub_model_offline_fails_clearly(tmp_path):
    """`model: openai-community/gpt2` offline: one line, exit 2, no traceback.

    A subprocess, because huggingface_hub reads HF_HUB_OFFLINE when it is imported.
    """
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "prefnb", "train", "--set", "model=openai-community/gpt2",
                           "--set", f"output_dir={tmp_path / 'run'}"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 2
    assert "could not load model 'openai-community/gpt2'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_local_model_directory_is_identified_by_its_weights_not_its_name(tmp_path):
    """Reference caches are keyed by the starting weights: overwriting a model directory in
    place must not reuse log-probs computed from the old weights."""
    from prefnb.models import build_tiny, weights_identity

    build_tiny(0)[0].save_pretrained(tmp_path / "seed0")
    build_tiny(0)[0].save_pretrained(tmp_path / "overwritten")
    before = weights_identity(str(tmp_path / "overwritten"), seed=0)
    assert before == weights_identity(str(tmp_path / "seed0"), seed=0)  # same weights, other name
    build_tiny(1)[0].save_pretrained(tmp_path / "overwritten")
    assert weights_identity(str(tmp_path / "overwritten"), seed=0) != before


@pytest.mark.parametrize("kind, theirs", [("linear", "linear"), ("cosine", "cosine"),
                                          ("constant", "constant_with_warmup")])
def test_lr_schedules_match_transformers(kind, theirs):
    from transformers import get_scheduler

    def rates(make):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
        scheduler, out = make(optimizer), []
        for _ in range(25):
            out.append(scheduler.get_last_lr()[0])
            optimizer.step()
            scheduler.step()
        return out

    ours = rates(lambda o: schedule.lr_scheduler(o, kind, warmup_steps=5, total_steps=20))
    reference = rates(lambda o: get_scheduler(theirs, o, num_warmup_steps=5, num_training_steps=20))
    assert ours == pytest.approx(reference, abs=1e-12) and ours[0] == 0.0 and max(ours) == 0.5


def test_bf16_trains_like_fp32_within_bf16_resolution(tmp_path):
    """The same DPO run under bf16 autocast and in fp32, at the smoke profile's DPO step size:
    every logged loss within 2⁻⁷ (bf16's resolution) of fp32's. Subprocesses, as accelerate
    fixes precision per process."""
    import subprocess
    import sys

    settings = [*sum((["--set", f"{k}={v}"] for k, v in TINY.items()), []), "--set", "objective=dpo",
                "--set", "max_steps=12", "--set", "learning_rate=3e-4", "--set", f"cache_dir={tmp_path}/c{{}}"]
    procs = {precision: subprocess.Popen([sys.executable, "-m", "prefnb", "train", "--no-progress",
                                          *[s.format(precision) for s in settings], "--set", f"precision={precision}",
                                          "--set", f"output_dir={tmp_path / precision}"],
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for precision in ("fp32", "bf16")}
    for precision, proc in procs.items():
        assert proc.wait(timeout=300) == 0, proc.stderr.read()[-2000:]
    fp32, bf16 = history(tmp_path / "fp32"), history(tmp_path / "bf16")
    # Each run was its process's first: its CPU peak (process RSS) is its own.
    assert json.loads((tmp_path / "fp32" / "metrics.json").read_text())["train/peak_memory_bytes"] > 0
    assert len(fp32) == len(bf16) == 6 and bf16 != fp32  # bf16 autocast was in effect
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=2**-7, atol=0.0)


def test_a_second_precision_in_one_process_is_a_clear_error(tmp_path, monkeypatch):
    """accelerate fixes mixed precision per process: switching says so instead of a traceback."""
    from accelerate.state import AcceleratorState

    monkeypatch.setattr(AcceleratorState, "_shared_state", {})  # a fresh process's state, restored after
    train_mod.train(make_params(tmp_path, "fp32", max_steps=1), progress=False)
    with pytest.raises(train_mod.TrainingError, match="precision 'bf16'.*restart the kernel"):
        train_mod.train(make_params(tmp_path, "bf16", max_steps=1, precision="bf16"), progress=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with a GPU")
@pytest.mark.parametrize("objective", ["dpo", "sft"])
def test_a_training_step_never_waits_for_the_gpu(objective):
    """collate → to_device → loss → backward → clip → AdamW, under CUDA's sync debug mode:
    any operation that makes the host wait for the GPU raises."""
    from prefnb.logprobs import collate_pairs, to_device

    model, tokenizer = models.build_tiny(0)
    model.cuda().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    params = resolve_params([("test", {"objective": objective})])
    prompts = ["Question 1: is this the same as that?\nAnswer:", "Q: short?"]  # shared-prompt rows (dpo)
    chosen = [encode(tokenizer, p, " yes", max_length=64, add_eos=False) for p in prompts]
    rejected = [encode(tokenizer, p, " no", max_length=64, add_eos=False) for p in prompts]

    def step():
        if objective == "dpo":
            batch = collate_pairs(chosen, rejected, tokenizer.pad_token_id, hidden_size=64)
            batch["reference_logps"] = torch.zeros(2, len(chosen))
            batch = to_device(batch, "cuda")
            loss, _ = plugins.preference_step(model, batch, params, *batch["reference_logps"])
        else:
            loss, _ = plugins.sft_step(model, collate(chosen + rejected, tokenizer.pad_token_id, "cuda"), params)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # first use: allocations and lazy initialisation may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _train_in_subprocess(tmp_path: Path, name: str, *settings: str) -> Path:
    """`prefnb train` in a fresh process (accelerate fixes precision per process); its run directory."""
    import subprocess
    import sys

    args = [*sum((["--set", f"{k}={v}"] for k, v in TINY.items()), []), *sum((["--set", s] for s in settings), []),
            "--set", f"cache_dir={tmp_path}/cache-{name}", "--set", f"output_dir={tmp_path / name}"]
    proc = subprocess.run([sys.executable, "-m", "prefnb", "train", "--no-progress", *args], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return tmp_path / name


def test_bf16_dpo_on_sonnets_starts_at_ln2_with_zero_margin(tmp_path):
    """Under bf16 autocast the reference is scored exactly as the policy is (same autocast,
    same batches and row layout), so at step 0, policy = reference: loss ln 2, margin 0."""
    import math

    run = _train_in_subprocess(tmp_path, "bf16", "task=sonnets", "objective=dpo", "precision=bf16", "max_steps=1",
                               "log_every=1", "max_train_examples=8", "max_length=640", "max_new_tokens=48",
                               "max_eval_examples=2", "max_test_examples=2", "beta=1.0")
    first = json.loads((run / "history.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-4)


def test_kto_estimates_its_reference_point_on_mismatched_pairs(tmp_path, monkeypatch):
    """Each step's z₀ comes from the batch's prompts paired with the previous pair's responses
    (x_i, y_{i−1}), their reference log-probs precomputed with the batch's own."""
    from prefnb.precompute import Encoders, batch_encodings, mismatched

    _, tokenizer = models.build_tiny(0)
    rows = [{"prompt": f"p{i}:", "chosen": f" c{i}", "rejected": f" r{i}"} for i in range(8)]
    encoders = Encoders(tokenizer, 64, add_eos=False)
    chosen, rejected = batch_encodings(encoders, rows, [3, 5, 7], kl=True)
    assert mismatched([3, 5, 7]) == [7, 3, 5]
    assert chosen == [encoders.one("p3:", " c7"), encoders.one("p5:", " c3"), encoders.one("p7:", " c5")]
    assert rejected == [encoders.one("p3:", " r7"), encoders.one("p5:", " r3"), encoders.one("p7:", " r5")]

    seen = []
    real = losses.kto_reference_point
    monkeypatch.setattr(losses, "kto_reference_point", lambda p, r: seen.append((p.detach(), r)) or real(p, r))
    train_mod.train(make_params(tmp_path, "kto", objective="kto", max_steps=3, log_every=1), progress=False)
    assert len(seen) == 3 and all(p.shape == r.shape == (2 * TINY["batch_size"],) for p, r in seen)
    torch.testing.assert_close(seen[0][0], seen[0][1], atol=1e-5, rtol=0)  # step 0: policy = reference
    assert history(tmp_path / "kto")[0] == pytest.approx(0.5, abs=1e-5)  # z₀ = 0, every log-ratio 0: ½(½ + ½)


@pytest.mark.parametrize("r", [4, 16, 64])
def test_lora_alpha_follows_the_rank_by_default(r):
    """lora_alpha: null = 2r, so every rank trains at the same adapter scale α/r = 2; a set α stays."""
    params = resolve_params([("test", {"lora_r": r})])
    assert params.lora_alpha == 2 * r
    policy = models.add_lora(models.build_tiny(0)[0], r=r, alpha=params.lora_alpha, dropout=0.0, targets="auto")
    scales = {m.scaling["default"] for m in policy.modules() if hasattr(m, "scaling") and isinstance(m.scaling, dict)}
    assert scales == {2.0}
    assert resolve_params([("test", {"lora_r": r, "lora_alpha": 8})]).lora_alpha == 8.0


def test_sonnet_report_adds_the_benchmarks_seeded_sampled_decoding(monkeypatch):
    """eval_sampled: the report split is also decoded as the benchmark does (temperature 1.2,
    top-p 0.9), seeded, its chrF beside greedy's; the selection split stays greedy."""
    from prefnb import evaluate
    from prefnb.precompute import ADD_EOS, Encoders

    model, tokenizer = models.build_tiny(0)
    rows = [{"prompt": "Shall I compare thee\nto a summer's day?\nThou art\n", "reference": "more lovely\n",
             "full_reference": "Shall I compare thee\nto a summer's day?\nThou art\nmore lovely\n"}] * 2
    params = resolve_params([("test", {**TINY, "task": "sonnets", "eval_sampled": True, "max_new_tokens": 12})])
    encoders = Encoders(tokenizer, params.max_length, ADD_EOS["sonnets"])
    calls = []
    real = evaluate.generate_with_ends
    monkeypatch.setattr(evaluate, "generate_with_ends", lambda *a, **k: calls.append(k) or real(*a, **k))

    def score(name):
        return train_mod.run_evaluation(model, tokenizer, train_mod.HeldOut(name, rows, [], (None, None)), params,
                                        encoders, "cpu")

    report = score("test")
    assert {"test/chrf", "test/chrf_full", "test/chrf_sampled", "test/chrf_full_sampled"} == set(report)
    assert [(c["greedy"], c["temperature"], c["top_p"]) for c in calls[-2:]] == [(True, 1.0, 0.9), (False, 1.2, 0.9)]
    assert score("test") == report  # seeded
    assert set(score("eval")) == {"eval/chrf", "eval/chrf_full"}


def test_sft_on_preference_jsonl_is_scored_on_the_chosen_responses(tmp_path):
    """SFT on a user's prompt/chosen/rejected file trains on the chosen responses, so its held-out
    NLL (eval/loss, its key metric) is theirs (the old code raised KeyError 'completion' after training)."""
    data = tmp_path / "pref.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Say {i}:", "chosen": f" number {i}", "rejected": f" no {i}"}) + "\n"
                            for i in range(20)))
    metrics = train_mod.train(make_params(tmp_path, "sft_pref", task="jsonl", data_path=str(data), max_steps=2),
                              progress=False)
    assert metrics["eval/loss"] > 0 and metrics["final/eval/loss"] == metrics["eval/loss"]
    assert 0.0 <= metrics["eval/implicit_reward_accuracy"] <= 1.0
