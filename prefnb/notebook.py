"""What the study notebooks share: parameters in; a figure and a table out.

A notebook's ``parameters`` cell holds plain values named like :class:`~prefnb.config.RunParams`
fields; `prefnb study` (papermill) injects the run's fully resolved values after it. The cells
that call this module are the template's, ``tools/notebooks.py``.
"""

from __future__ import annotations

import ast
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from prefnb.config import FIELDS, RunParams, resolve_params
from prefnb.rundir import atomic_write, read_metrics

if TYPE_CHECKING:
    import pandas as pd

STUDY_ENV = "PREFNB_STUDY"  # set by `prefnb study` for the kernels it starts
# The first line of every notebook's parameters cell (tools/notebooks.py writes it): how the
# kernel's input history tells that cell apart. papermill's injected cell starts with INJECTED.
PARAMETERS_HEADER = "# Parameters: plain values named like prefnb's RunParams (`prefnb params` lists them all)."
INJECTED = "# Parameters\n"
# tqdm.auto falls back to a text bar without ipywidgets; its warning says nothing useful here
warnings.filterwarnings("ignore", message="IProgress not found")

HISTORY_PANELS = {  # panel -> history columns drawn in it
    "loss": ["loss"],
    "implicit rewards": ["rewards/chosen", "rewards/rejected", "rewards/margins"],
    "log-probs": ["logps/chosen", "logps/rejected", "mean_token_logp"],
    "accuracy": ["rewards/accuracies", "eval/accuracy", "eval/implicit_reward_accuracy"],
    "chrF": ["eval/chrf", "eval/chrf_full"],
}
# The report split first (what the paper quotes), then the selection split's key metrics
# (what picked the checkpoint), then the costs of training alone.
TABLE_METRICS = ("test/accuracy", "test/f1", "test/majority_accuracy", "test/majority_f1", "test/chrf",
                 "test/chrf_full", "test/chrf_sampled", "test/chrf_full_sampled", "test/implicit_reward_accuracy",
                 "test/implicit_reward_accuracy_total", "eval/accuracy", "eval/chrf", "eval/implicit_reward_accuracy",
                 "best_step", "train/loss", "train/seconds", "train/tokens_per_second", "train/peak_memory_bytes")


def parameter_names(history: Sequence[str]) -> list[str] | None:
    """The names assigned by the last run of the parameters cell and by papermill's injected
    cell after it, from the kernel's input history (IPython's ``In``); None without one."""
    starts = [i for i, source in enumerate(history) if source.startswith(PARAMETERS_HEADER)]
    if not starts:
        return None
    names = []
    for source in [history[starts[-1]]] + [s for s in history[starts[-1] + 1:] if s.startswith(INJECTED)]:
        names += [t.id for node in ast.parse(source).body if isinstance(node, ast.Assign)
                  for t in node.targets if isinstance(t, ast.Name)]
    return names


def params_from_namespace(namespace: Mapping[str, Any], source: str = "notebook parameters") -> RunParams:
    """RunParams from the notebook's globals (validated): the names its parameters cell (and
    papermill) assigned, so that a later cell's ``model = AutoModel…`` cannot break a rerun;
    every RunParams name in the namespace where there is no input history (a script)."""
    names = parameter_names(namespace.get("In") or [])
    values = {name: namespace[name] for name in FIELDS if name in namespace and (names is None or name in names)}
    return resolve_params([(source, values)])


def run_dir(params: RunParams | str | os.PathLike) -> Path:
    return params.resolved_output_dir() if isinstance(params, RunParams) else Path(params)


def load_history(params_or_dir) -> "pd.DataFrame":
    """history.jsonl in long form: step, metric, value."""
    import pandas as pd

    path = run_dir(params_or_dir) / "history.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    wide = pd.DataFrame(rows)
    if wide.empty:
        return pd.DataFrame(columns=["step", "metric", "value"])
    return wide.melt(id_vars="step", var_name="metric", value_name="value").dropna()


def plot_history(params_or_dir, *, save: bool = True):
    """Training curves with seaborn: the loss, and for preference runs the implicit rewards,
    log-probs and reward accuracy; dev evaluations as they were logged. Saves ``history.png``
    in the run directory (unless ``save=False``) and shows it; returns the matplotlib figure (None
    when nothing was logged)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    history = load_history(params_or_dir)
    panel_of = {m: panel for panel, metrics in HISTORY_PANELS.items() for m in metrics}
    history = history[history["metric"].isin(panel_of)]
    if history.empty:
        print("no history to plot")
        return None
    panels = [p for p in HISTORY_PANELS if history["metric"].map(panel_of).eq(p).any()]
    sns.set_theme(style="whitegrid", context="notebook")
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        data = history[history["metric"].isin(HISTORY_PANELS[panel])]
        sns.lineplot(data=data, x="step", y="value", hue="metric", marker="o", markersize=4, ax=ax)
        ax.set_title(panel)
        ax.set_ylabel("")
        ax.legend(fontsize="small", title=None)
    fig.suptitle(run_dir(params_or_dir).name)
    fig.tight_layout()
    if not save:
        return fig
    path = run_dir(params_or_dir) / "history.png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
    plt.close(fig)  # show the saved file rather than render the figure a second time
    from IPython.display import Image, display

    display(Image(filename=str(path)))
    return fig


def metrics_table(params: RunParams, metrics: Mapping[str, float] | None = None) -> "pd.DataFrame":
    """This run's main metrics (one row) above those of the run it started from and of its
    reference, when those are study runs (directories holding metrics.json)."""
    import pandas as pd

    own = metrics if metrics is not None else read_metrics(run_dir(params))
    rows: dict[str, Mapping[str, Any]] = {"this run": own or {}}
    for label, source in (("start (init_from)", params.init_from), ("reference", params.reference)):
        other = read_metrics(Path(source)) if source else None
        if other is not None:
            rows[f"{label}: {Path(source).name}"] = other
    names = [m for m in TABLE_METRICS if any(m in r for r in rows.values())]
    return pd.DataFrame([[r.get(m) for m in names] for r in rows.values()], index=list(rows), columns=names)


def interactive() -> bool:
    """False when `prefnb study` executes the notebook: no progress bars in its saved copy."""
    return not os.environ.get(STUDY_ENV)


def study_figure(params: RunParams) -> list:
    """The figures of this run's experiment (:data:`prefnb.figures.FIGURES`) over the finished
    runs of the study whose outputs hold this run (this one counts once ``COMPLETE``, after its
    notebook): the answer to the notebook's question so far. A figure that cannot be drawn from
    a partial study is reported on one line and does not fail the run: the study's report draws
    it again, and fails there, from the whole study."""
    from prefnb import figures, report

    outputs = run_dir(params).resolve().parent.parent
    own = [f for f in figures.FIGURES if params.experiment in f.experiments]
    if not own:
        print(f"{params.experiment} has no study figure in prefnb.figures: the paper reads it as a table")
        return []
    df = report.collect_runs(outputs, save=False) if outputs.is_dir() else None
    drawn = []
    for figure in own:
        rows = figure.select(df) if df is not None and len(df) else []
        if not len(rows):
            print(f"figure {figure.name}: no finished runs of {', '.join(figure.experiments)} under {outputs} yet")
            continue
        runs = f"{df['experiment'].isin(figure.experiments).sum()} finished runs of {', '.join(figure.experiments)}"
        print(f"figure {figure.name}: {runs} under {outputs}")
        try:
            drawn.append(figure.draw(rows))
        except Exception as err:  # noqa: BLE001 — see the docstring
            print(f"figure {figure.name}: not drawn from the {runs}: {type(err).__name__}: {err}")
    return drawn
