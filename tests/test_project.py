"""One project wherever you stand: every command finds the project from the working directory.

A second copy of the project (a temporary "clone") used from inside it must train into, build
the paper from, and verify against ITS outputs/ and paper/, never the package checkout's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from prefnb import cli

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def clone(tmp_path) -> Path:
    """The files of a project that the commands read (no package: it stays installed from ROOT)."""
    copy = tmp_path / "clone"
    for name in ("params", "notebooks"):
        shutil.copytree(ROOT / name, copy / name)
    (copy / "paper").mkdir(parents=True)
    for name in ("index.qmd", "_quarto.yml", "references.bib"):
        shutil.copy(ROOT / "paper" / name, copy / "paper" / name)
    return copy


def test_find_project_walks_up_from_the_working_directory(clone, tmp_path, monkeypatch):
    from prefnb.config import params_root
    from prefnb.paper import default_paper_dir
    from prefnb.project import find_project, outputs_dir

    monkeypatch.chdir(clone / "notebooks")
    assert find_project() == clone.resolve()
    assert outputs_dir() == clone.resolve() / "outputs" and default_paper_dir() == clone.resolve() / "paper"
    assert params_root() == clone.resolve() / "params"
    elsewhere = tmp_path / "not-a-project"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert find_project() == ROOT  # outside any project: the package's checkout


def test_study_paper_verify_in_a_second_clone_use_its_outputs_and_paper(clone, monkeypatch, capsys):
    """`study --only 01_sft` (fake executor: the test is about where things go), `paper`, `verify`."""
    import prefnb.study

    clone_root = clone.resolve()

    def fake_execute(run, study, run_dir):
        assert Path(run_dir).resolve().is_relative_to(clone_root), f"run written outside the clone: {run_dir}"
        params = run.params.to_dict()
        (run_dir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        metric = {"paraphrase": "accuracy", "sonnets": "chrf"}[run.params.task]
        (run_dir / "metrics.json").write_text(json.dumps({f"eval/{metric}": 0.5, f"test/{metric}": 0.4}))
        (run_dir / "notebook.ipynb").write_text("{}")

    monkeypatch.setattr(prefnb.study, "execute_notebook", fake_execute)
    monkeypatch.chdir(clone / "notebooks")  # anywhere inside the clone
    assert cli.main(["study", "--only", "01_sft", "--no-report"]) == 0
    finished = sorted(clone.glob("outputs/01_sft/*/COMPLETE"))
    assert len(finished) == 4  # smoke: 2 tasks x {FFT, LoRA} x 1 seed
    assert cli.main(["paper", "--no-render"]) == 0
    assert "01_sft" in (clone / "paper" / "_generated" / "runs.csv").read_text()
    assert yaml.safe_load((clone / "paper" / "_variables.yml").read_text())["runs"]["01_sft"] == 4
    capsys.readouterr()
    assert cli.main(["verify"]) == 0, capsys.readouterr().err
    # a run in the clone's outputs that the paper has not seen makes the CLONE's paper stale
    extra = finished[0].parent.parent / "extra-run"
    shutil.copytree(finished[0].parent, extra)
    assert cli.main(["verify"]) == 1


def test_train_without_output_dir_writes_under_the_projects_outputs(clone, monkeypatch):
    """`prefnb train` from a subfolder of a project: outputs/<experiment>/<run id> of that project."""
    from prefnb.cli import sweep_params

    monkeypatch.chdir(clone / "notebooks")
    [params] = sweep_params([], ["experiment=mine"], [])
    assert params.output_dir == str(clone.resolve() / "outputs" / "mine" / params.run_id())
    [explicit] = sweep_params([], ["output_dir=somewhere"], [])
    assert explicit.output_dir == "somewhere"  # a path the user gave is theirs


def test_adding_an_experiment_is_a_notebook_a_params_file_and_its_declaration(clone, monkeypatch, capsys):
    """README, "Adding an experiment", step by step; the study runs the toy on the tiny model."""
    from prefnb.experiments import EXPERIMENTS, Experiment

    # 1. the notebook: the shape of 01_sft.ipynb
    shutil.copy(clone / "notebooks" / "01_sft.ipynb", clone / "notebooks" / "08_toy.ipynb")
    # 2. the params file: the grid (the study records each run's group and axis labels)
    (clone / "params" / "08_toy.yaml").write_text(yaml.safe_dump({
        "notebook": "08_toy.ipynb", "description": "Does a smaller learning rate help the toy?",
        "groups": {"toy": {"description": "SFT at two learning rates.",
                           "base": {"objective": "sft", "max_steps": 2, "max_train_examples": 16,
                                    "max_eval_examples": 8, "max_test_examples": 8, "max_length": 128},
                           "grid": {"task": ["paraphrase"], "learning_rate_scale": [1.0, 0.5]}}}}))
    # 3. the declaration: one entry in prefnb/experiments.py's EXPERIMENTS
    monkeypatch.setitem(EXPERIMENTS, "08_toy", Experiment(
        {"toy": lambda run: {"method": "SFT", "stage": f"lr × {run['learning_rate_scale']}"}},
        cells=("stage",), metrics=("test_quality",), caption="The toy: SFT at two learning rates"))
    monkeypatch.chdir(clone)
    assert cli.main(["study", "--only", "08_toy", "--list"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2
    assert cli.main(["study", "--only", "08_toy"]) == 0
    assert len(list(clone.glob("outputs/08_toy/*/COMPLETE"))) == 2
    assert cli.main(["paper", "--no-render"]) == 0
    appendix = (clone / "paper" / "_generated" / "appendix.md").read_text()
    assert "## 08_toy" in appendix
    assert "The toy: SFT at two learning rates — paraphrase {#tbl-toy-paraphrase}" in appendix
    assert "| lr × 1.0 |" in appendix and "| lr × 0.5 |" in appendix  # its labels, from its grid
    assert yaml.safe_load((clone / "paper" / "_variables.yml").read_text())["runs"]["08_toy"] == 2
