"""The study: grid expansion (pure) and the papermill runner (with a tiny fake notebook)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import nbformat
import pytest
import yaml

from prefnb import cli
from prefnb.config import OBJECTIVES, SFT_LOSSES, ParamsError
from prefnb.grid import expand
from prefnb.rundir import MARKER
from prefnb.execute import FAILED, lock_path, state, try_lock
from prefnb.study import run_all

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------
# the project's own grids
# ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smoke():
    return expand(ROOT, "smoke")


@pytest.fixture(scope="module")
def gpt2():
    return expand(ROOT, "gpt2")


def _ordered(study):
    seen = set()
    for run in study.runs:
        assert all(d in seen for d in run.dep_ids), f"{run.key} runs before a dependency"
        seen.add(run.run_id)


def test_smoke_covers_every_kind(smoke):
    runs = smoke.runs
    assert 30 <= len(runs) <= 55
    assert {r.experiment for r in runs} == {"00_baselines", "01_sft", "02_dpo", "03_staged", "04_reference_strength",
                                           "05_lora_vs_fft", "06_dpo_variants", "07_sft_objectives"}
    assert {r.params.objective for r in runs} == set(OBJECTIVES)
    assert {r.params.sft_loss for r in runs if r.params.objective == "sft"} == set(SFT_LOSSES)
    prefs = [r for r in runs if r.params.is_preference]
    references = {r.params.reference for r in prefs}
    assert {"policy", "none", "prior"} <= references
    assert any(ref.startswith("outputs/") and "reference" in r.deps for r in prefs for ref in [r.params.reference])
    # scenarios: after SFT, no SFT, from the instruction-tuned stand-in
    assert any(r.params.init_from and "01_sft/" in r.params.init_from for r in prefs)
    assert any(r.params.init_from is None and r.params.model == "tiny" for r in prefs)
    assert {r.labels.get("scenario") for r in runs if r.experiment == "06_dpo_variants"} == {
        "after_sft", "no_sft", "instruct"}
    assert {r.params.lora_r > 0 for r in runs} == {True, False}  # FFT and LoRA
    assert len({r.params.learning_rate for r in runs if r.experiment == "07_sft_objectives"
                and r.params.objective == "sft"}) >= 2  # the SFT learning-rate axis
    assert all(r.params.model == "tiny" for r in runs)
    assert {r.params.beta for r in runs if r.group == "04_reference_strength/sweep"} == {0.1, 1.0}  # reduced
    _ordered(smoke)


def test_gpt2_is_the_full_grid(gpt2):
    runs = gpt2.runs
    per = Counter(r.experiment for r in runs)
    assert per["00_baselines"] == 2 * 2  # task x {base, instruct}: evaluation only, no seed
    assert per["01_sft"] == 2 * 2 * 3 and per["02_dpo"] == 12 and per["03_staged"] == 12
    assert per["04_reference_strength"] == 2 * 10 * 4 * 3 + 2
    assert per["05_lora_vs_fft"] == 2 * 4 * 3 * 3
    assert per["06_dpo_variants"] == 2 * 7 * 3 * 4 * 3
    assert per["07_sft_objectives"] == 2 * (2 * 5 * 3 * 3)
    for group in {r.group for r in runs}:
        seeds = {r.params.seed for r in runs if r.group == group}
        assert len(seeds) >= 3 or group in ("04_reference_strength/strong_reference", "00_baselines/zero_shot")
    assert {r.params.beta for r in runs if r.group == "04_reference_strength/sweep"} == {
        0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 2.0, 10.0, 100.0}  # up to where Liu et al. 2025 found the best
    assert {r.params.lora_r for r in runs if r.experiment == "05_lora_vs_fft"} == {0, 4, 16, 64}
    assert {r.params.model for r in runs} >= {"openai-community/gpt2", "openai-community/gpt2-medium",
                                              "vicgalle/gpt2-alpaca"}
    _ordered(gpt2)


def test_train_size_is_not_confounded_with_epochs(gpt2, smoke, tmp_path):
    """06 scales the step budget with the training fraction (fixed epochs) by default; the
    fixed-steps design is one key away; a tiny fraction still trains at least one step."""
    variants = [r for r in gpt2.runs if r.group == "06_dpo_variants/variants"]
    base = {"paraphrase": 1500, "sonnets": 200}  # the gpt2 profile's max_steps per task
    for run in variants:
        p = run.params
        assert p.max_steps == round(base[p.task] * p.train_size), (p.task, p.train_size, p.max_steps)
        assert p.warmup_steps == round(50 * p.train_size) and run.labels["train_size_design"] == "fixed_epochs"
    scenarios = {r.params.train_size: r.params.max_steps for r in smoke.runs
                 if r.group == "06_dpo_variants/scenarios"}
    assert scenarios == {0.005: 16, 0.01: 32}  # the smoke group's largest fraction keeps the profile's 32 steps

    experiment = {"v": {"notebook": "fake.ipynb", "groups": {"g": {
        "train_size_design": "fixed_epochs", "base": {"objective": "dpo", "max_steps": 100, "eval_every": 10},
        "grid": {"train_size": [0.001, 0.5, 1.0]}}}}}
    study = expand(_project(tmp_path / "a", experiment), "p")
    assert [(r.params.max_steps, r.params.eval_every) for r in study.runs] == [(1, 1), (50, 5), (100, 10)]
    fixed = {"study": {"experiments": {"v": {"g": {"train_size_design": "fixed_steps"}}}}, "model": "tiny"}
    study = expand(_project(tmp_path / "b", experiment, fixed), "p")
    assert [r.params.max_steps for r in study.runs] == [100, 100, 100]
    assert {r.labels["train_size_design"] for r in study.runs} == {"fixed_steps"}
    experiment["v"]["groups"]["g"]["train_size_design"] = "fixed_epoch"
    with pytest.raises(ParamsError, match="train_size_design' must be one of fixed_steps, fixed_epochs"):
        expand(_project(tmp_path / "c", experiment), "p")


def test_smollm2_is_the_gpt2_grid_on_the_embedded_model(gpt2):
    """Same experiments, groups and coordinates; the instruction-tuned start is the same weights in chat format."""
    smollm2 = expand(ROOT, "smollm2")
    def coordinates(study):
        return Counter((r.group, tuple(sorted((k, str(v)) for k, v in r.labels.items()))) for r in study.runs)
    assert coordinates(smollm2) == coordinates(gpt2)
    assert {r.params.model for r in smollm2.runs} == {"smollm2-135m-instruct"}
    instruct = [r for r in smollm2.runs if r.labels.get("scenario") == "instruct" or
                r.labels.get("starting_model") == "instruct"]
    assert instruct and all(r.params.prompt_format == "chat" for r in instruct)
    assert {r.params.prompt_format for r in smollm2.runs if r not in instruct} == {"plain"}
    _ordered(smollm2)


def test_laptop_is_baselines_and_sonnets_lora_at_three_seeds():
    """The 2-hour CPU grid (params/profiles/laptop.yaml says why): 00_baselines in full, then
    01-03 on sonnets with LoRA at seeds 0-2, every run on the embedded SmolLM2 with both splits capped."""
    laptop = expand(ROOT, "laptop")
    per = Counter(r.experiment for r in laptop.runs)
    assert per == {"00_baselines": 4, "01_sft": 3, "02_dpo": 3, "03_staged": 3}
    trained = [r for r in laptop.runs if r.experiment != "00_baselines"]
    assert {(r.params.task, r.params.lora_r > 0) for r in trained} == {("sonnets", True)}
    for experiment in ("01_sft", "02_dpo", "03_staged"):
        assert {r.params.seed for r in trained if r.experiment == experiment} == {0, 1, 2}
    assert {r.params.model for r in laptop.runs} == {"smollm2-135m-instruct"}
    assert all(r.params.max_eval_examples and r.params.max_test_examples for r in laptop.runs)
    assert all(r.notebook.is_file() for r in laptop.runs)
    _ordered(laptop)


def test_gpt2_list_is_offline_and_light():
    """`--list` expands ~1000 runs without importing torch or touching the network."""
    code = ("import sys; from prefnb import cli; rc = cli.main(['study', '--profile', 'gpt2', '--list']); "
            "assert 'torch' not in sys.modules, 'expansion imported torch'; sys.exit(rc)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()  # the header goes to stderr: `--list | cut -f1` gives run ids only
    assert len(lines) == len(expand(ROOT, "gpt2").runs) and out.stderr.startswith("# run_id")
    run_id, experiment, status, params = next(line for line in lines if "\t01_sft\t" in line).split("\t")
    assert experiment == "01_sft" and status == "pending" and "seed=0" in params


def test_ids_are_stable_and_from_params(smoke):
    again = expand(ROOT, "smoke")
    assert [r.run_id for r in again.runs] == [r.run_id for r in smoke.runs]
    assert len({r.run_id for r in smoke.runs}) == len(smoke.runs)
    for run in smoke.runs:
        assert run.run_id == run.params.run_id()
        assert smoke.run_dir(run) == ROOT / "outputs" / run.experiment / run.run_id
        for key, dep in run.deps.items():
            assert getattr(run.params, key) == f"outputs/{smoke.by_id[dep].experiment}/{dep}"


def test_reuse_of_sft_runs(smoke):
    """Staged, β-sweep and variant runs start from the same 01_sft runs (not copies)."""
    sft_ids = {r.run_id for r in smoke.runs if r.experiment == "01_sft"}
    users = Counter(d for r in smoke.runs for d in r.dep_ids if d in sft_ids)
    assert max(users.values()) >= 10


# ---------------------------------------------------------------------------------------
# a small project of our own: format, errors, dedup
# ---------------------------------------------------------------------------------------
FAKE_NOTEBOOK_CODE = textwrap.dedent("""\
    import json, os, pathlib, time
    out = pathlib.Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kernel.pid").write_text(str(os.getpid()))
    with open("calls.log", "a") as fh:  # the working directory is the project root
        fh.write(f"{experiment}/{out.name}\\n")
    time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
    if str(seed) == os.environ.get("FAKE_FAIL_SEED") and experiment == "a":
        raise ValueError(f"boom: seed {seed} fails")
    (out / "metrics.json").write_text(json.dumps({"eval/accuracy": 0.5 + seed / 100}))
""")


def _write_notebook(path: Path) -> None:
    params = nbformat.v4.new_code_cell('experiment = "a"\noutput_dir = None\nseed = 0')
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[params, nbformat.v4.new_code_cell(FAKE_NOTEBOOK_CODE)], metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    path.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, path)


def _project(tmp_path: Path, experiments: dict, profile: dict | None = None) -> Path:
    (tmp_path / "params" / "profiles").mkdir(parents=True)
    (tmp_path / "params" / "profiles" / "p.yaml").write_text(yaml.safe_dump(profile or {"model": "tiny"}))
    for name, spec in experiments.items():
        (tmp_path / "params" / f"{name}.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    _write_notebook(tmp_path / "notebooks" / "fake.ipynb")
    return tmp_path


TWO_STAGE = {
    "a": {"notebook": "fake.ipynb", "groups": {"sft": {"base": {"objective": "sft"}, "grid": {"seed": [0, 1]}}}},
    "b": {"notebook": "fake.ipynb", "groups": {"dpo": {
        "base": {"objective": "dpo", "init_from": {"group": "a/sft", "match": ["seed"]}},
        "grid": {"seed": [0, 1]}}}},
}


def test_expansion_format(tmp_path):
    project = _project(tmp_path, {
        "x": {"notebook": "fake.ipynb", "groups": {
            "sft": {"base": {"objective": "sft", "use": "fast"},
                    "grid": {"task": ["paraphrase", "sonnets"],
                             "lr": {"big": {"learning_rate_scale": 2}, "small": {"learning_rate_scale": 0.5}}}},
            "same": {"base": {"objective": "sft", "use": "fast", "task": "sonnets", "learning_rate_scale": 0.5}},
            "dpo": {"base": {"objective": "dpo", "init_from": {"group": "sft", "each": ["task"]}},
                    "grid": {"reward": {"dpo": {}, "stronger": {"reference": {
                        "group": "sft", "match": ["task"], "where": {"lr": "big"}}}}}},
        }}}, profile={"model": "tiny", "learning_rate": 1.0e-3,
                      "study": {"presets": {"fast": {"max_steps": 7}}, "tasks": {"sonnets": {"max_new_tokens": 9}}}})
    study = expand(project, "p")
    sft = [r for r in study.runs if r.group == "x/sft"]
    assert [(r.params.task, r.labels["lr"], r.params.learning_rate) for r in sft] == [
        ("paraphrase", "big", 2e-3), ("paraphrase", "small", 5e-4), ("sonnets", "big", 2e-3), ("sonnets", "small", 5e-4)]
    assert all(r.params.max_steps == 7 for r in sft)
    assert [r.params.max_new_tokens for r in sft] == [128, 128, 9, 9]
    # `same` produces a run identical to one of `sft`: deduplicated, both groups recorded
    assert len([r for r in study.runs if r.experiment == "x" and r.params.objective == "sft"]) == 4
    assert any(r.also_groups == ["x/same"] for r in sft)
    dpo = [r for r in study.runs if r.group == "x/dpo"]
    assert len(dpo) == 4 * 2  # each of the 4 SFT runs x 2 rewards
    for r in dpo:
        start = study.by_id[r.deps["init_from"]]
        assert start.params.task == r.params.task and r.labels["init_from.lr"] == start.labels["lr"]
        if r.labels["reward"] == "stronger":
            ref = study.by_id[r.deps["reference"]]
            assert ref.labels["lr"] == "big" and ref.params.task == r.params.task


@pytest.mark.parametrize("mutate, message", [
    (lambda e, p: e["a"]["groups"]["sft"]["base"].update(learnin_rate=0.1),
     "params/a.yaml: groups.sft.base: unknown key 'learnin_rate' (did you mean 'learning_rate'?)"),
    (lambda e, p: e["a"]["groups"]["sft"]["grid"].update(sed=[1]), "params/a.yaml: groups.sft.grid.sed: unknown key 'sed'"),
    (lambda e, p: p.update(bogus=1), "params/profiles/p.yaml: unknown key 'bogus'"),
    (lambda e, p: e["a"]["groups"]["sft"]["base"].update(beta=-1), "key 'beta' must be"),
    (lambda e, p: e["b"]["groups"]["dpo"]["base"].update(init_from={"group": "a/nope", "match": ["seed"]}),
     "params/b.yaml: groups.dpo.base.init_from: depends on group 'a/nope', which is not in the study"),
    (lambda e, p: e["b"]["groups"]["dpo"]["grid"].update(seed=[0, 5]),
     "params/b.yaml: groups.dpo.base: key 'init_from': no run of group a/sft with seed=5"),
    (lambda e, p: e["b"]["groups"]["dpo"]["base"]["init_from"].update(match=[]),
     "key 'init_from': 2 runs of group a/sft"),
    (lambda e, p: e["a"]["groups"]["sft"]["base"].update(use="missing"), "names preset 'missing'"),
    (lambda e, p: p.update(study={"experiments": {"zz": {}}}), "study.experiments names experiment 'zz'"),
    (lambda e, p: p.update(study={"experiments": {"a": {"sft": {"grid": {"seed": None}}, "nope": {}}}}),
     "experiment a has no group 'nope'"),
    (lambda e, p: e["a"].pop("notebook"), "params/a.yaml: missing key 'notebook'"),
])
def test_errors_name_the_file_and_key(tmp_path, mutate, message):
    import copy

    experiments, profile = copy.deepcopy(TWO_STAGE), {"model": "tiny"}
    mutate(experiments, profile)
    project = _project(tmp_path, experiments, profile)
    with pytest.raises(ParamsError) as err:
        expand(project, "p")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_only_and_run_select_with_dependencies(tmp_path, capsys):
    project = _project(tmp_path, TWO_STAGE)
    assert cli.main(["study", "--project", str(project), "--profile", "p", "--only", "b", "--list"]) == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert [experiment for _, experiment, _, _ in lines] == ["a", "a", "b", "b"]
    study = expand(project, "p")
    target = next(r for r in study.runs if r.experiment == "b")
    assert [r.run_id for r in study.closure([target])] == [target.deps["init_from"], target.run_id]


# ---------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------
def _study_cli(project: Path, *extra: str) -> int:
    return cli.main(["study", "--project", str(project), "--profile", "p", "--no-report", *extra])


def _calls(project: Path) -> list[str]:
    path = project / "calls.log"
    return path.read_text().splitlines() if path.exists() else []


def test_runner_end_to_end_with_papermill(tmp_path, capsys, monkeypatch):
    project = _project(tmp_path, TWO_STAGE)
    study = expand(project, "p")
    a0, a1, b0, b1 = study.runs

    # a failing run: FAILED + executed notebook kept; its dependent skipped; the rest goes on
    # (two notebooks at a time: papermill runs in worker threads)
    monkeypatch.setenv("FAKE_FAIL_SEED", "1")
    assert _study_cli(project, "--jobs", "2") == 1
    out = capsys.readouterr().out
    assert "FAILED: ValueError: boom: seed 1 fails" in out
    assert "skipped (dependency failed" in out
    assert "Traceback" not in out
    a1_dir = study.run_dir(a1)
    assert (a1_dir / FAILED).read_text().startswith("ValueError: boom: seed 1 fails")
    assert "boom" in (a1_dir / "notebook.ipynb").read_text()
    assert not (a1_dir / MARKER).exists() and not study.run_dir(b1).exists()
    for run in (a0, b0):
        assert (study.run_dir(run) / MARKER).is_file()
        record = json.loads((study.run_dir(run) / "study.json").read_text())
        assert record["group"] == run.group and record["seconds"] > 0
    assert json.loads((study.run_dir(b0) / "study.json").read_text())["depends_on"] == {
        "init_from": f"a/{a0.run_id}"}
    assert state(study, a1) == "failed" and state(study, a0) == "finished" and state(study, b1) == "pending"

    # rerun: only the failed run and its dependent run
    monkeypatch.delenv("FAKE_FAIL_SEED")
    before = len(_calls(project))
    assert _study_cli(project) == 0
    assert len(_calls(project)) == before + 2
    assert not (a1_dir / FAILED).exists() and (a1_dir / MARKER).is_file()
    capsys.readouterr()

    # everything finished: nothing trains, and it says so
    assert _study_cli(project) == 0
    assert "already finished: nothing to train" in capsys.readouterr().out
    assert len(_calls(project)) == before + 2

    # an unfinished run directory (a crash) is cleared and rerun; finished ones are kept
    (study.run_dir(b1) / MARKER).unlink()
    (study.run_dir(b1) / "junk.txt").write_text("left by a crash")
    assert _study_cli(project, "--run", b1.run_id) == 0
    assert len(_calls(project)) == before + 3 and _calls(project)[-1] == f"b/{b1.run_id}"
    assert not (study.run_dir(b1) / "junk.txt").exists()
    assert (study.run_dir(b1) / MARKER).is_file()


def _fake_execute(fail: set[str], log: list[str]):
    def execute(run, study, run_dir):
        log.append(run.run_id)
        if run.run_id in fail:
            raise RuntimeError(f"run {run.run_id} broke\nsecond line")
        (run_dir / "notebook.ipynb").write_text("{}")
        (run_dir / "metrics.json").write_text('{"eval/accuracy": 1.0}')
    return execute


def test_fail_fast_stops_at_once(tmp_path):
    project = _project(tmp_path, TWO_STAGE)
    study = expand(project, "p")
    log: list[str] = []
    outcomes = run_all(study, study.runs, fail_fast=True, execute=_fake_execute({study.runs[0].run_id}, log),
                       out=open(os.devnull, "w"))
    assert log == [study.runs[0].run_id]
    assert [o.status for o in outcomes] == ["failed", "not run", "skipped", "not run"]
    assert (study.run_dir(study.runs[0]) / FAILED).read_text().startswith(f"RuntimeError: run {study.runs[0].run_id} broke\n")


def test_parallel_jobs_respect_dependencies(tmp_path):
    project = _project(tmp_path, {**TWO_STAGE, "c": {"notebook": "fake.ipynb", "groups": {"g": {
        "base": {"objective": "dpo", "init_from": {"group": "b/dpo", "each": ["seed"]}}}}}})
    study = expand(project, "p")
    events: list[tuple[str, str]] = []
    lock = threading.Lock()

    def execute(run, study, run_dir):
        with lock:
            events.append(("start", run.run_id))
            for dep in run.dep_ids:
                assert ("end", dep) in events, f"{run.key} started before {dep} finished"
        time.sleep(0.05)
        (run_dir / "notebook.ipynb").write_text("{}")
        (run_dir / "metrics.json").write_text("{}")
        with lock:
            events.append(("end", run.run_id))

    outcomes = run_all(study, study.runs, execute=execute, jobs=3, poll=0.02, out=open(os.devnull, "w"))
    assert [o.status for o in outcomes] == ["done"] * 6
    assert sorted(rid for kind, rid in events if kind == "start") == sorted(r.run_id for r in study.runs)


def test_metrics_must_exist_and_parse(tmp_path):
    project = _project(tmp_path, TWO_STAGE)
    study = expand(project, "p")

    def no_metrics(run, study, run_dir):
        (run_dir / "notebook.ipynb").write_text("{}")
        (run_dir / "metrics.json").write_text("{not json")

    [outcome] = run_all(study, study.runs[:1], execute=no_metrics, out=open(os.devnull, "w"))
    assert outcome.status == "failed" and not (study.run_dir(study.runs[0]) / MARKER).exists()


def test_a_run_locked_elsewhere_is_waited_for(tmp_path):
    project = _project(tmp_path, TWO_STAGE)
    study = expand(project, "p")
    a0 = study.runs[0]
    log: list[str] = []
    held = threading.Event()
    release = threading.Event()

    def other_process():  # holds a0's lock, finishes it, releases
        with try_lock(lock_path(study, a0)) as mine:
            assert mine
            held.set()
            release.wait(5)
            study.run_dir(a0).mkdir(parents=True)
            (study.run_dir(a0) / "metrics.json").write_text("{}")
            (study.run_dir(a0) / MARKER).write_text("{}")

    thread = threading.Thread(target=other_process)
    thread.start()
    held.wait(5)
    assert state(study, a0) == "running"
    threading.Timer(0.5, release.set).start()
    outcomes = run_all(study, study.runs, execute=_fake_execute(set(), log), poll=0.1, out=open(os.devnull, "w"))
    thread.join()
    assert a0.run_id not in log  # never run twice
    assert {o.run.run_id: o.status for o in outcomes}[a0.run_id] == "reused"
    assert all(o.status in ("done", "reused") for o in outcomes)


def test_sigkill_mid_run_then_rerun_finishes(tmp_path):
    project = _project(tmp_path, {"a": TWO_STAGE["a"]})
    study = expand(project, "p")
    first, second = study.runs
    cmd = [sys.executable, "-m", "prefnb", "study", "--project", str(project), "--profile", "p", "--no-report"]
    proc = subprocess.Popen(cmd, env={**os.environ, "FAKE_SLEEP": "60"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    pid_file = study.run_dir(first) / "kernel.pid"
    deadline = time.time() + 40
    while not pid_file.exists() and time.time() < deadline:
        time.sleep(0.2)
    assert pid_file.exists(), "the fake notebook never started"
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert not (study.run_dir(first) / MARKER).exists()
    assert state(study, first) == "unfinished"
    kernel = int(pid_file.read_text())
    deadline = time.time() + 15  # the orphaned kernel exits by itself (ipykernel's parent poller)
    while _alive(kernel) and time.time() < deadline:
        time.sleep(0.2)
    assert not _alive(kernel), "the notebook kernel outlived its killed runner"

    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 runs: 0 finished earlier, 2 to run" in out.stdout
    assert all((study.run_dir(r) / MARKER).is_file() for r in (first, second))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False
