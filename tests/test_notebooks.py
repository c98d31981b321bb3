"""The study notebooks are committed clean, parameterized with RunParams names, and wired to params/."""

from __future__ import annotations

import ast
import random
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from prefnb.config import FIELDS
from prefnb.grid import experiment_files, expand

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPERIMENTS = ["00_baselines", "01_sft", "02_dpo", "03_staged", "04_reference_strength", "05_lora_vs_fft", "06_dpo_variants",
               "07_sft_objectives"]


def test_one_notebook_per_experiment():
    assert [p.stem for p in NOTEBOOKS] == EXPERIMENTS
    assert list(experiment_files(ROOT / "params")) == EXPERIMENTS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_clean_and_valid(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    assert nb.nbformat == 4
    assert nb.metadata.kernelspec.name == "python3"
    assert "papermill" not in nb.metadata, "commit the notebook, not an executed copy"
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [], f"{path.name}: a code cell has outputs; clear them before committing"
            assert cell.execution_count is None, f"{path.name}: a code cell has an execution count"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# "), "first cell: a title"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_names_are_run_params(path):
    nb = nbformat.read(path, as_version=4)
    tagged = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: exactly one cell must be tagged 'parameters'"
    assert tagged[0].cell_type == "code"
    names = []
    for node in ast.parse(tagged[0].source).body:
        assert isinstance(node, ast.Assign), f"{path.name}: the parameters cell holds plain assignments only"
        for target in node.targets:
            assert isinstance(target, ast.Name)
            names.append(target.id)
        ast.literal_eval(node.value)  # plain values, no code
    unknown = sorted(set(names) - set(FIELDS))
    assert not unknown, f"{path.name}: parameters that are not RunParams fields: {unknown}"
    assert "experiment" in names
    # papermill reads `name = value  # comment` lines and warns on a second '=' in a line
    for line in tagged[0].source.splitlines():
        assert line.strip().startswith("#") or line.count("=") <= 1, f"{path.name}: {line!r}"


def test_notebook_defaults_are_valid_params():
    """Run by hand, a notebook's parameters alone must make a valid run."""
    from prefnb.notebook import params_from_namespace

    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        cell = next(c for c in nb.cells if "parameters" in c.metadata.get("tags", []))
        namespace: dict = {}
        exec(cell.source, namespace)  # noqa: S102 — literal assignments, checked above
        params = params_from_namespace(namespace)
        assert params.experiment == path.stem


@pytest.mark.parametrize("profile", ["smoke", "gpt2", "smollm2"])
def test_every_experiment_names_an_existing_notebook(profile):
    study = expand(ROOT, profile)
    notebooks = {r.notebook for r in study.runs}
    for nb in notebooks:
        assert nb.is_file(), f"missing notebook {nb}"
    assert {r.experiment for r in study.runs} == set(EXPERIMENTS)


def test_gitattributes_uses_nbdime():
    text = (ROOT / ".gitattributes").read_text()
    assert "*.ipynb diff=jupyternotebook merge=jupyternotebook" in text


def test_metrics_table_shows_the_report_split_before_the_selection_split():
    """A notebook's table leads with the reported `test/…` metrics, then the `eval/…` metric that
    selected the checkpoint; names a run did not produce are left out."""
    from prefnb.config import RunParams
    from prefnb.notebook import metrics_table

    metrics = {"eval/accuracy": 0.7, "test/f1": 0.4, "test/accuracy": 0.6, "best_step": 8, "train/seconds": 1.0}
    table = metrics_table(RunParams(), metrics)
    assert list(table.columns) == ["test/accuracy", "test/f1", "eval/accuracy", "best_step", "train/seconds"]
    assert table.loc["this run", "test/accuracy"] == 0.6


def _tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "tools" / "notebooks.py"), *args], capture_output=True, text=True)


def test_notebooks_are_the_template_with_their_own_cells(tmp_path):
    """The shared cells come from tools/notebooks.py: the committed notebooks match it, a drifted
    shared cell fails --check, and --write restores it, keeping the notebook's own cells."""
    check = _tool("--check")
    assert check.returncode == 0, check.stdout + check.stderr
    for path in NOTEBOOKS:
        assert nbformat.read(path, as_version=4).cells[-1].source == "prefnb.notebook.study_figure(params);"
    copy = tmp_path / "notebooks"
    shutil.copytree(ROOT / "notebooks", copy)
    nb = nbformat.read(copy / "02_dpo.ipynb", as_version=4)
    setup = next(c for c in nb.cells if "params_from_namespace" in c.source)
    setup.source = setup.source.replace("params_from_namespace(globals())", "RunParams()")
    nbformat.write(nb, copy / "02_dpo.ipynb")
    drift = _tool("--check", "--notebooks", str(copy))
    assert drift.returncode == 1 and drift.stdout.strip() == "differs from the template: 02_dpo.ipynb", drift.stdout
    assert _tool("--write", "--notebooks", str(copy)).returncode == 0
    assert (copy / "02_dpo.ipynb").read_text() == (ROOT / "notebooks" / "02_dpo.ipynb").read_text()


def test_a_later_cell_cannot_break_a_rerun():
    """params_from_namespace reads the names the parameters cell (and papermill's injected cell)
    assigned, not every RunParams name in the kernel: `reference = <a model>` in a later cell,
    then Run All again, still gives the notebook's own run."""
    from prefnb.notebook import params_from_namespace

    nb = nbformat.read(ROOT / "notebooks" / "01_sft.ipynb", as_version=4)
    parameters = next(c.source for c in nb.cells if "parameters" in c.metadata.get("tags", []))
    setup = next(c.source for c in nb.cells if "params_from_namespace" in c.source)
    later = "reference = object()  # e.g. a model loaded by hand\nbeta = 'strong'"
    namespace: dict = {}
    exec(parameters, namespace)  # noqa: S102 — the notebook's literal assignments
    exec(later, namespace)  # noqa: S102
    exec(parameters, namespace)  # noqa: S102 — Run All: the parameters cell again
    namespace["In"] = ["", parameters, setup, later, parameters, setup]  # IPython's input history
    params = params_from_namespace(namespace)
    assert (params.experiment, params.reference, params.beta) == ("01_sft", "policy", None)
    # run by papermill: the injected cell after the parameters cell counts too
    injected = "# Parameters\nlearning_rate = 0.5\n"
    exec(injected, namespace)  # noqa: S102
    namespace["In"] = ["", parameters, injected, setup]
    assert params_from_namespace(namespace).learning_rate == 0.5


def test_study_figure_draws_the_finished_runs_and_says_when_there_are_none(tmp_path, capsys):
    from test_report import _write_run

    from prefnb.config import RunParams
    from prefnb.notebook import study_figure

    outputs = tmp_path / "outputs"
    here = RunParams(experiment="03_staged", output_dir=str(outputs / "03_staged" / "this-run"))
    assert study_figure(here) == []
    assert "figure methods: no finished runs of 01_sft, 02_dpo, 03_staged under" in capsys.readouterr().out
    rng = random.Random(0)
    for seed in (0, 1):
        _write_run(outputs, rng, experiment="01_sft", task="paraphrase", seed=seed)
    _write_run(outputs, rng, experiment="03_staged", task="paraphrase", seed=0, finished=False)
    (figure,) = study_figure(here)
    assert figure.axes and "figure methods: 2 finished runs of 01_sft, 02_dpo, 03_staged" in capsys.readouterr().out
    assert study_figure(RunParams(experiment="00_baselines", output_dir=str(outputs / "00_baselines" / "x"))) == []
    assert "00_baselines has no study figure" in capsys.readouterr().out
