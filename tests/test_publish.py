"""`prefnb publish` and `prefnb verify FOLDER` on a tiny real study, and the README's findings section.

The study: 01_sft, 02_dpo and 03_staged on paraphrase with the tiny model, full fine-tuning,
two seeds, a few steps (6 runs, trained in this process by the study runner instead of
papermill: the notebooks add nothing that publish reads). The code version the runs and
publish see is pinned (``prefnb.manifest.code_version``), so the test does not depend on
whether the checkout running it is clean.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from prefnb import cli, manifest
from prefnb.publish import BEGIN, END, MANIFEST, README_PROFILE, RESULTS, readme_section

ROOT = Path(__file__).resolve().parent.parent
CLEAN = "0.1.0+abc1234"
EXPERIMENTS = ("01_sft", "02_dpo", "03_staged")
PROFILE = {
    "model": "tiny", "max_length": 256, "batch_size": 4, "eval_batch_size": 32, "max_steps": 2,
    "learning_rate": 1.0e-3, "warmup_steps": 0, "max_train_examples": 16, "max_eval_examples": 16,
    "max_test_examples": 16, "log_every": 1, "eval_every": 0,
    "study": {"presets": {"preference": {"learning_rate": 3.0e-4},
                          "lora": {"lora_r": 4}, "lora_preference": {"lora_r": 4}},
              "grid": {"seed": [0, 1]},
              "experiments": {e: {g: {"grid": {"task": ["paraphrase"], "finetuning": ["fft"]}}}
                              for e, g in (("01_sft", "sft"), ("02_dpo", "dpo"), ("03_staged", "staged"))}},
}


def _section(readme: Path) -> str:
    from prefnb.publish import _split_readme

    return _split_readme(readme.read_text(), readme)[1]


def test_readme_findings_are_generated_from_results_laptop():
    """The README's findings section is exactly what results/laptop/ generates (or, while no laptop
    study is published, the generated "not yet published" text, with no number in it)."""
    from prefnb.publish import verify_published

    section = _section(ROOT / "README.md")
    assert section == "\n" + readme_section(ROOT / RESULTS)
    folder = ROOT / RESULTS / README_PROFILE
    if not (folder / MANIFEST).is_file():
        assert "No real-model study has been published yet" in section
        prose = section.replace(f"--profile {README_PROFILE}", "").replace("smollm2", "").replace("gpt2", "")
        assert not any(ch.isdigit() for ch in prose), prose
    else:  # the committed folder is whole: every file as its manifest lists it (no outputs needed)
        problem, _ = verify_published(folder, outputs=ROOT / "no-outputs-here", readme=ROOT / "README.md")
        assert problem is None, problem


def test_readme_without_markers_is_refused(tmp_path):
    from prefnb.cli import UserError
    from prefnb.publish import write_readme

    readme = tmp_path / "README.md"
    for text in ("# x\n", f"# x\n{END}\n{BEGIN}\n", f"# x\n{BEGIN}\n{BEGIN}\n{END}\n"):
        readme.write_text(text)
        with pytest.raises(UserError, match="expected one '<!-- findings:begin -->' line followed by one"):
            write_readme(readme, tmp_path / RESULTS)
        assert readme.read_text() == text


def _train_in_process(run, study, run_dir):
    """The study runner's execute step without papermill: train the run into its directory."""
    from prefnb.train import train

    train(dataclasses.replace(run.params, output_dir=str(run_dir)), progress=False)
    (run_dir / "notebook.ipynb").write_text("{}")


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """A project with the tiny profile, its study run to the end, and a README with the markers."""
    from prefnb.grid import expand
    from prefnb.study import run_all

    project = tmp_path_factory.mktemp("publish") / "project"
    (project / "params" / "profiles").mkdir(parents=True)
    (project / "params" / "profiles" / "tiny.yaml").write_text(yaml.safe_dump(PROFILE, sort_keys=False))
    for name in EXPERIMENTS:
        shutil.copy(ROOT / "params" / f"{name}.yaml", project / "params")
    shutil.copytree(ROOT / "notebooks", project / "notebooks", ignore=shutil.ignore_patterns("outputs", ".*"))
    (project / "paper").mkdir()
    for name in ("index.qmd", "_quarto.yml", "references.bib"):
        shutil.copy(ROOT / "paper" / name, project / "paper" / name)
    (project / "README.md").write_text(f"# x\n\nintro\n\n{BEGIN}\nold\n{END}\n\nrest\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(project)
        mp.setattr(manifest, "code_version", lambda: CLEAN)
        study = expand(project, "tiny")
        outcomes = run_all(study, study.runs, execute=_train_in_process, out=open(os.devnull, "w"))
    assert [o.status for o in outcomes] == ["done"] * 6
    return project, study


@pytest.fixture
def in_project(tiny_study, monkeypatch):
    project, study = tiny_study
    monkeypatch.chdir(project)
    monkeypatch.setattr(manifest, "code_version", lambda: CLEAN)
    return project, study


def _publish(capsys, *extra) -> tuple[int, str]:
    code = cli.main(["publish", "tiny", *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


def _nothing_published(project: Path) -> None:
    assert not (project / RESULTS / "tiny").exists() and not list((project / RESULTS).glob(".*"))


def test_publish_refuses_an_incomplete_study_a_dirty_tree_and_another_profiles_runs(in_project, capsys, monkeypatch):
    project, study = in_project
    last = study.run_dir(study.runs[-1])
    marker = (last / "COMPLETE").read_text()
    (last / "COMPLETE").unlink()
    code, err = _publish(capsys)
    assert code == 2 and "the tiny study is incomplete: 1 of 6 runs not finished" in err
    assert f"03_staged/{study.runs[-1].run_id}, unfinished" in err and len(err.strip().splitlines()) == 1
    (last / "COMPLETE").write_text(marker)
    _nothing_published(project)

    monkeypatch.setattr(manifest, "code_version", lambda: CLEAN + "-dirty")
    code, err = _publish(capsys)
    assert code == 2 and "the working tree is dirty (0.1.0+abc1234-dirty): commit first" in err
    monkeypatch.setattr(manifest, "code_version", lambda: CLEAN)
    _nothing_published(project)

    stray = project / "outputs" / "01_sft" / "paraphrase-sft-0000000000"
    shutil.copytree(study.run_dir(study.runs[0]), stray)
    record = json.loads((stray / "study.json").read_text())
    (stray / "study.json").write_text(json.dumps({**record, "profile": "params/profiles/smoke.yaml"}))
    try:
        code, err = _publish(capsys)
        assert code == 2 and f"{stray} (made by profile smoke) is not a run of the tiny study" in err
        _nothing_published(project)
    finally:
        shutil.rmtree(stray)

    run_manifest = study.run_dir(study.runs[0]) / "manifest.json"
    original = run_manifest.read_text()
    run_manifest.write_text(json.dumps({**json.loads(original), "code_version": CLEAN + "-dirty"}))
    try:
        code, err = _publish(capsys)
        assert code == 2 and "was made by uncommitted code (0.1.0+abc1234-dirty): rerun it at a commit" in err
        run_manifest.write_text(json.dumps({**json.loads(original), "code_version": "0.1.0+def5678"}))
        code, err = _publish(capsys)
        assert code == 2 and "made at 2 code versions (0.1.0+abc1234 (5 runs), 0.1.0+def5678 (1 runs))" in err
        _nothing_published(project)
    finally:
        run_manifest.write_text(original)


@pytest.fixture
def published(in_project, capsys):
    project, study = in_project
    code, out = _publish(capsys)
    assert code == 0, out
    yield project, study, project / RESULTS / "tiny"
    shutil.rmtree(project / RESULTS)


def test_publish_writes_the_folder_and_verify_passes(published, capsys):
    import pandas as pd

    project, study, folder = published
    meta = json.loads((folder / MANIFEST).read_text())
    assert meta["profile"] == "tiny" and meta["code_version"] == CLEAN and meta["dirty"] is False
    assert meta["study"]["runs"] == meta["study"]["done"] == 6 and meta["study"]["failed"] == 0
    assert meta["study"]["experiments"] == {"01_sft": 2, "02_dpo": 2, "03_staged": 2}
    assert 0 < meta["study"]["run_seconds"] and 0 < meta["study"]["wall_clock_seconds"]
    assert meta["models"] == ["tiny"] and meta["seeds"] == [0, 1]
    assert meta["machine"]["cores"] == os.cpu_count() and meta["machine"]["ram_bytes"] > 0
    assert meta["packages"]["torch"] and meta["machine"]["ran_the_runs"] is True
    files = set(meta["files"])
    assert {"runs.csv", "findings.csv", "findings.json", "paper/index.html"} <= files
    assert any(f.startswith("figures/") and f.endswith(".png") for f in files)
    assert all(not f.endswith((".ipynb", ".safetensors", ".pt", ".bin")) for f in files)
    assert sum((folder / f).stat().st_size for f in files) < 5 * 2**20

    runs = pd.read_csv(folder / "runs.csv")
    assert sorted(runs["run_id"]) == sorted(r.run_id for r in study.runs)
    assert "output_dir" not in runs and "data_dir" not in runs
    from prefnb.rundir import read_metrics
    for run in study.runs:
        row = runs[runs["run_id"] == run.run_id].iloc[0]
        metrics = read_metrics(study.run_dir(run))
        assert row["test/accuracy"] == pytest.approx(metrics["test/accuracy"], abs=1e-9)
        assert row["eval/accuracy"] == pytest.approx(metrics["eval/accuracy"], abs=1e-9)
        assert row["train/seconds"] == pytest.approx(metrics["train/seconds"], rel=1e-8)
    findings = pd.read_csv(folder / "findings.csv")
    assert {"comparison", "task", "difference", "seeds"} <= set(findings.columns)
    assert len(findings) >= 2 and set(findings["seeds"]) == {2}
    assert json.loads((folder / "findings.json").read_text())["rows"][0]["task"] == "paraphrase"

    # the README's section is generated from the folder; README_PROFILE's folder only (tiny ≠ laptop)
    assert _section(project / "README.md") == "\n" + readme_section(project / RESULTS)
    assert "No real-model study has been published yet" in _section(project / "README.md")

    assert cli.main(["verify", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "all 6 runs of" in out and "match runs.csv cell by cell" in out and "files match" in out


def test_readme_section_of_a_published_laptop_folder(published, tmp_path):
    """Published as results/laptop/, the folder gives the README its findings rows, model, seeds and
    the experiments left to the GPU profiles; a hand edit of the section is caught."""
    import pandas as pd

    from prefnb.publish import readme_problem, write_readme

    _, _, folder = published
    shutil.copytree(folder, tmp_path / RESULTS / README_PROFILE)
    section = readme_section(tmp_path / RESULTS)
    rows = pd.read_csv(folder / "findings.csv", dtype=str, keep_default_na=False)
    assert len(rows) >= 2
    for row in rows.itertuples(index=False):
        assert "| " + " | ".join(row) + " |" in section
    assert "model(s) `tiny`, seeds 0, 1, 6 runs at code version `0.1.0+abc1234`" in section
    assert "paraphrase: `test/accuracy`" in section and "No real-model study" not in section
    assert "prefnb study --profile laptop && prefnb publish laptop" in section
    assert "does not run `00_baselines`, `04_reference_strength`, `05_lora_vs_fft`" in section
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{BEGIN}\n{END}\n")
    write_readme(readme, tmp_path / RESULTS)
    assert readme_problem(readme, tmp_path / RESULTS) is None
    readme.write_text(readme.read_text().replace("seeds 0, 1", "seeds 0, 1, 2"))
    assert "the findings section differs" in readme_problem(readme, tmp_path / RESULTS)


def test_verify_names_the_first_changed_metric(published, capsys):
    project, study, folder = published
    run = study.runs[2]
    path = study.run_dir(run) / "metrics.json"
    original = path.read_text()
    path.write_text(json.dumps({**json.loads(original), "test/accuracy": 0.123456789}))
    try:
        assert cli.main(["verify", str(folder)]) == 1
        err = capsys.readouterr().err
        assert f"run {run.run_id}, test/accuracy: published" in err and "outputs '0.123456789'" in err
        assert len(err.strip().splitlines()) == 1
    finally:
        path.write_text(original)

    text = (folder / "runs.csv").read_text()
    (folder / "runs.csv").write_text(text.replace(CLEAN, "0.1.0+fffffff", 1))
    assert cli.main(["verify", str(folder)]) == 1
    assert "code_version: published '0.1.0+fffffff', outputs '0.1.0+abc1234'" in capsys.readouterr().err
    (folder / "runs.csv").write_text(text)

    # without the outputs: the manifest's checksums still catch a changed file
    shutil.move(project / "outputs", project / "moved")
    try:
        (folder / "findings.csv").write_text((folder / "findings.csv").read_text() + "x\n")
        assert cli.main(["verify", str(folder)]) == 1
        assert "findings.csv: sha256 differs from manifest.json's" in capsys.readouterr().err
    finally:
        shutil.move(project / "moved", project / "outputs")


def test_verify_subset_compares_the_rerun_runs_metrics(published, capsys):
    """A partial rerun (here: the outputs of the SFT runs only) reproduces those published rows."""
    project, study, folder = published
    keep = {r.run_id for r in study.runs if r.experiment == "01_sft"}
    partial = project / "partial"
    for run in study.runs:
        if run.run_id in keep:
            shutil.copytree(study.run_dir(run), partial / run.experiment / run.run_id)
    assert cli.main(["verify", str(folder), "--outputs", str(partial)]) == 1
    assert "holds 2 of the 6 published runs" in capsys.readouterr().err
    assert cli.main(["verify", str(folder), "--outputs", str(partial), "--subset"]) == 0
    assert "2 of 6 published runs are in" in capsys.readouterr().out
    rid = sorted(keep)[0]
    metrics = partial / "01_sft" / rid / "metrics.json"
    # the time an evaluation took is a cost of the machine, though named after its split
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "eval/seconds": 1e6}))
    assert cli.main(["verify", str(folder), "--outputs", str(partial), "--subset"]) == 0
    capsys.readouterr()
    metrics.write_text(json.dumps({**json.loads(metrics.read_text()), "eval/f1": 0.5, "train/seconds": 1e6}))
    assert cli.main(["verify", str(folder), "--outputs", str(partial), "--subset"]) == 1
    assert f"run {rid}, eval/f1: published" in capsys.readouterr().err
    shutil.rmtree(partial)
