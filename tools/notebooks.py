"""The study notebooks from one template: ``python tools/notebooks.py --check | --write``.

A study notebook is the template below with three cells of its own:

- its first cell (markdown): the title (the experiment's question) and what its runs are;
- its ``parameters`` cell (code, tagged): the defaults of a run by hand, under the shared
  header line (:data:`prefnb.notebook.PARAMETERS_HEADER`, which ``params_from_namespace``
  looks for);
- its ``## Metrics`` cell (markdown): what to read in the metrics table.

Every other cell — how the study runs it, the set-up, the training (or, for an evaluation-only
notebook, ``"prefnb": {"template": "zero_shot"}`` in its metadata, the evaluation) call, the
training curves, the metrics table and the study figure — is shared, with the experiment's
name filled in. ``--write`` rebuilds every notebook from its own cells and the template;
``--check`` (tests/test_notebooks.py runs it) lists each notebook that differs and exits 1.
A new experiment's notebook: copy one, edit its three cells, run ``--write``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from prefnb.notebook import PARAMETERS_HEADER  # noqa: E402 — the project's package, not an installed copy

PARAMETERS_NOTE = "# `prefnb study` injects each run's resolved parameters after this cell."
RUN_BY_THE_STUDY = {
    "train": """**Run by the study.** `prefnb study` executes this notebook once per run of
`params/{experiment}.yaml` (under the chosen profile), with papermill: the run's fully resolved
parameters are injected after the `parameters` cell below, and the executed copy is saved
as `outputs/{experiment}/<run_id>/notebook.ipynb`, next to `params.yaml`, `history.jsonl`,
`metrics.json`, `manifest.json` and the `checkpoint/`.

**Explore by hand.** Open it in JupyterLab (kernel: the project's environment), change a
value in the `parameters` cell and run all cells: the defaults below are a small run of the
tiny model that takes about a minute on a laptop CPU. Runs made by hand are not marked
`COMPLETE`, so the study never mistakes them for its own.""",
    "zero_shot": """**Run by the study.** `prefnb study` executes this notebook once per run of
`params/{experiment}.yaml` (under the chosen profile), with papermill, and saves the executed
copy as `outputs/{experiment}/<run_id>/notebook.ipynb` beside `params.yaml`, `metrics.json`
and `manifest.json`.

**Explore by hand.** Change a value in the `parameters` cell and run all cells (the defaults:
the tiny model, seconds). Runs made by hand are not marked `COMPLETE`.""",
}
SETUP = """import {module}
import prefnb.notebook

params = prefnb.notebook.params_from_namespace(globals())  # validated: a wrong key or value fails here
print("run directory:", params.resolved_output_dir())
params"""
BODY = {
    "train": [
        ("markdown", "train-title", "## Train and evaluate"),
        ("code", "train", "# Writes the run directory (contract 3 of DESIGN.md); a progress bar when run by hand.\n"
                          "metrics = prefnb.train.train(params, progress=prefnb.notebook.interactive())"),
        ("markdown", "curves-title", "## Training curves"),
        ("code", "curves", "prefnb.notebook.plot_history(params);"),
    ],
    "zero_shot": [
        ("markdown", "evaluate-title", "## Evaluate the starting model as it is"),
        ("code", "evaluate", "# Writes params.yaml, metrics.json and manifest.json into the run directory.\n"
                             "metrics = prefnb.baselines.zero_shot(params)"),
    ],
}
MODULE = {"train": "prefnb.train", "zero_shot": "prefnb.baselines"}
STUDY_FIGURE = """## The study so far

This experiment's figure over the finished runs of the study (the same as the report's): the
answer to the question above once the study has run. A run counts once it is `COMPLETE`, so
the study's own copy of this notebook shows the runs finished before it."""


def _own_cells(nb: nbformat.NotebookNode, name: str) -> tuple:
    """(intro, parameters, metrics notes) of a notebook; ValueError naming what is missing."""
    intro = nb.cells[0] if nb.cells and nb.cells[0].cell_type == "markdown" else None
    parameters = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    notes = [c for c in nb.cells if c.cell_type == "markdown" and c.source.startswith("## Metrics")]
    if intro is None or len(parameters) != 1 or len(notes) != 1:
        raise ValueError(f"{name}: needs a first markdown cell, one cell tagged 'parameters' and one markdown cell "
                         "starting '## Metrics'")
    return intro, parameters[0], notes[0]


def render(nb: nbformat.NotebookNode, experiment: str) -> nbformat.NotebookNode:
    """The notebook as the template makes it from its own three cells."""
    intro, parameters, notes = _own_cells(nb, experiment)
    kind = (nb.metadata.get("prefnb") or {}).get("template", "train")
    body = [line for line in parameters.source.splitlines() if line not in (PARAMETERS_HEADER, PARAMETERS_NOTE)]
    cells = [
        ("markdown", "intro", intro.source.strip()),
        ("markdown", "run-by-the-study", RUN_BY_THE_STUDY[kind].format(experiment=experiment)),
        ("code", "parameters", "\n".join([PARAMETERS_HEADER, PARAMETERS_NOTE, *body])),
        ("code", "setup", SETUP.format(module=MODULE[kind])),
        *BODY[kind],
        ("markdown", "metrics-notes", notes.source.strip()),
        ("code", "metrics", "prefnb.notebook.metrics_table(params, metrics)"),
        ("markdown", "study-figure-title", STUDY_FIGURE),
        ("code", "study-figure", "prefnb.notebook.study_figure(params);"),
    ]
    out = nbformat.v4.new_notebook(metadata=nb.metadata)
    for kind_of_cell, cell_id, source in cells:
        new = nbformat.v4.new_markdown_cell if kind_of_cell == "markdown" else nbformat.v4.new_code_cell
        cell = new(source, id=cell_id)
        if cell_id == "parameters":
            cell.metadata["tags"] = ["parameters"]
        out.cells.append(cell)
    return out


def sync(notebooks_dir: Path, write: bool) -> list[str]:
    """Names of the notebooks that differ from the template (rewritten when ``write``)."""
    stale = []
    for path in sorted(notebooks_dir.glob("*.ipynb")):
        text = path.read_text()
        expected = nbformat.writes(render(nbformat.reads(text, as_version=4), path.stem))
        expected += "" if expected.endswith("\n") else "\n"  # as nbformat.write ends a file
        if expected != text:
            stale.append(path.name)
            if write:
                path.write_text(expected)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="exit 1 if a notebook differs from the template")
    mode.add_argument("--write", action="store_true", help="rewrite the notebooks that differ")
    parser.add_argument("--notebooks", type=Path, default=ROOT / "notebooks", help="the notebooks folder")
    args = parser.parse_args(argv)
    stale = sync(args.notebooks, write=args.write)
    for name in stale:
        print(f"{'rewritten' if args.write else 'differs from the template'}: {name}")
    if stale and args.check:
        print("run `python tools/notebooks.py --write` (edit only a notebook's first, parameters and "
              "'## Metrics' cells)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
