"""`prefnb` command line: study | run | train | params | data | paper | verify | publish.

Every command's options are defined here; the work is done by the module each command's help
names. Expected errors are printed as one line on stderr, exit status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import sys

from prefnb import paper, publish, study
from prefnb.config import ParamsError, RunParams, describe_params, load_params, parse_override, resolve_params
from prefnb.project import outputs_dir
from prefnb.rundir import clear_finished, mark_finished

# Settings that accelerate fixes for the life of a process: they cannot vary within one sweep.
PER_PROCESS = {"precision": "accelerate fixes mixed precision once per process; run one sweep per precision"}
DATA_TASKS = ("paraphrase", "sonnets")  # what `prefnb data` checks by default
# Expected errors of modules that are imported only when a command needs them (torch, data).
LAZY_ERRORS = (("prefnb.data", "DataError"), ("prefnb.models", "ModelLoadError"),
               ("prefnb.prompts", "PromptFormatError"), ("prefnb.train", "TrainingError"))


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit status 2."""


def run_train(args) -> int:
    """Train each run of the sweep and mark it finished; a run that fails part-way is left unmarked."""
    runs = sweep_params(args.files, args.overrides, args.sweeps, profile=args.profile)  # validated before any work
    from prefnb.session import Session
    from prefnb.train import train  # heavy imports only once the params are known to be good

    session = Session()  # the sweep's runs tokenise, parse and hash their shared inputs once
    for params in runs:
        out_dir = params.resolved_output_dir()
        clear_finished(out_dir)  # a rerun is unfinished until it finishes
        metrics = train(params, progress=not args.no_progress, session=session)
        mark_finished(out_dir)
        shown = {k: v for k, v in metrics.items() if k.startswith(("eval/", "test/", "train/loss", "best_step"))}
        print(json.dumps(shown, indent=2))
        print(f"run directory: {out_dir}", flush=True)
    return 0


def sweep_params(files, overrides: list[str], sweeps: list[str], *, profile=None) -> list[RunParams]:
    """The runs of ``--sweep key=[v1, v2] ...`` (every combination, in order), each validated
    like a single run; no sweep gives the one run of ``files`` + ``overrides``. Raises ParamsError
    for a sweep that is not a non-empty list, or whose runs would share a run directory."""
    axes = []
    for text in sweeps:
        key, values = parse_override(text)
        if key in PER_PROCESS:
            raise ParamsError(f"--sweep {key}: {PER_PROCESS[key]}")
        if not isinstance(values, list) or not values:
            raise ParamsError(f"--sweep {text!r}: expected a non-empty list of values, e.g. {key}=[0.01, 0.1]")
        axes.append([f"{key}={json.dumps(v)}" for v in values])  # JSON is YAML: the values parse back as given
    runs = [in_project(load_params(files, [*overrides, *combination], profile=profile))
            for combination in itertools.product(*axes)]
    if len({params.resolved_output_dir() for params in runs}) < len(runs):
        raise ParamsError("--sweep: runs would share a run directory (output_dir is set); leave output_dir "
                          "unset so that each run writes outputs/<experiment>/<run id>")
    return runs


def in_project(params: RunParams) -> RunParams:
    """A run without output_dir writes under the outputs/ of the project found from the working
    directory (as `prefnb study` does), not under ./outputs of wherever the command runs."""
    if params.output_dir:
        return params
    return dataclasses.replace(params, output_dir=str(params.resolved_output_dir(outputs_dir())))


def run_data(args: argparse.Namespace) -> int:
    """Read every file a task needs with the loaders the runs use, so a file that passes here
    will not fail at the start of a run; print a few lines per task (counts before any caps)."""
    from prefnb.data import load_task, resolve_data_dir

    tasks = args.task or list(DATA_TASKS)
    if any(t != "jsonl" for t in tasks):
        print(f"data directory: {resolve_data_dir(args.data_dir)}")
    for task in tasks:
        # Validate through RunParams, like a run would (e.g. jsonl without --data-path).
        data = load_task(resolve_params([("prefnb data", {"task": task, "data_dir": args.data_dir,
                                                          "data_path": args.data_path, "data_seed": args.data_seed})]))
        stats = data.stats
        print(f"{data.task}:",
              f"  rows read {stats.get('rows_read', 0)}, malformed rows skipped {stats.get('rows_skipped', 0)}",
              f"  split (data_seed {args.data_seed}): train {stats.get('train_split', 0)}, "
              f"selection {stats.get('selection_split', 0)}, report {stats.get('report_split', 0)}",
              *(f"  {name}  sha256 {digest[:12]}" for name, digest in data.source_files.items()), sep="\n")
    return 0


def _study_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default="smoke", help="profile: smoke (default), gpt2, or a YAML path")
    p.add_argument("--outputs", metavar="DIR", help="outputs folder (default: <project>/outputs)")
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed run")
    p.add_argument("--jobs", "-j", type=int, metavar="N",
                   help="runs at a time in this process (default: the profile's study.jobs, else 1)")
    p.add_argument("--no-report", action="store_true", help="do not build the report at the end")
    for hidden in ("--project", "--params-dir", "--notebooks-dir"):  # hidden: another project's folders
        p.add_argument(hidden, metavar="DIR", help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefnb", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train and evaluate one run (or a sweep of runs) from params files")
    p.add_argument("files", nargs="*", help="params YAML files, applied in order (after the profile)")
    p.add_argument("--profile", help="profile applied first (e.g. smoke, gpt2, or a YAML path)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter (repeatable)")
    p.add_argument("--sweep", dest="sweeps", action="append", default=[], metavar="KEY=[V1, V2, ...]",
                   help="one run per value, all in this process (repeatable: every combination); runs after "
                        "the first skip the imports and reuse the cached reference log-probs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)

    p = sub.add_parser("params", help="list every run parameter, its default and allowed values")
    p.set_defaults(func=lambda args: print(describe_params()) or 0)

    p = sub.add_parser("data", help="validate the data files and summarise each task",
                       description="`prefnb data`: check the data files and print a short summary per task.")
    p.add_argument("--data-dir", help="study data directory (default: $PREFNB_DATA, then ../shared/data)")
    p.add_argument("--task", action="append", choices=("paraphrase", "sonnets", "jsonl"),
                   help="task to check; repeat for several (default: paraphrase and sonnets)")
    p.add_argument("--data-path", help="task jsonl: a JSONL file or a dataset id")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the train/dev/test split")
    p.set_defaults(func=run_data)

    p = sub.add_parser("study", help="run the study: every experiment's notebook over its grid",
                       description=study.__doc__.splitlines()[0])
    _study_options(p)
    p.add_argument("--only", nargs="+", metavar="EXPERIMENT",
                   help="only these experiments (and the runs they depend on)")
    p.add_argument("--list", action="store_true",
                   help="print one tab-separated line per run (id, experiment, status, params) and exit")
    p.add_argument("--run", dest="run_id", metavar="RUN_ID", help="run one run (its unfinished dependencies first)")
    p.set_defaults(func=study.cmd_study)
    p = sub.add_parser("run", help="run one study run by id (= study --run RUN_ID)")
    p.add_argument("run_id", metavar="RUN_ID")
    _study_options(p)
    p.set_defaults(func=study.cmd_study, only=None, list=False)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--outputs",
                        help=f"the study's outputs folder (default: ${paper.OUTPUTS_ENV} if set, as `prefnb paper` "
                             "sets it for Quarto's pre-render, else outputs/ of the project found from here)")
    common.add_argument("--paper", help="the Quarto project (default: paper/ of the project found from here)")
    p = sub.add_parser("paper", parents=[common], help="build figures/tables from outputs and render the paper",
                       description=paper.__doc__.split("\n\n")[1])
    p.add_argument("--engine", choices=("auto", "quarto", "pandoc"), default="auto",
                   help="auto: Quarto if on PATH, else a pandoc HTML preview")
    p.add_argument("--no-render", action="store_true", help="only build the report and the paper's inputs")
    p.set_defaults(func=paper.cmd_paper)
    p = sub.add_parser("verify", parents=[common], help="fail if the paper's generated inputs are stale, or (with "
                       "FOLDER) if a published folder does not match its manifest and the outputs it came from")
    p.add_argument("published", nargs="?", metavar="FOLDER",
                   help="a published folder (results/PROFILE) to check instead of the paper")
    p.add_argument("--subset", action="store_true",
                   help="with FOLDER: the outputs may hold some of the published runs (a partial rerun); their eval/ "
                        "and test/ metrics must match")
    p.add_argument("--html", nargs="?", const="", metavar="FILE",
                   help="also check the rendered paper (default: paper/_output or paper/_preview index.html): every "
                        "figure and table present, every image decodes and loads in headless Chromium (if installed)")
    p.add_argument("--pdf", nargs="?", const="", metavar="FILE",
                   help="also check the Typst PDF preview (default: paper/_preview/index.pdf): no text outside the "
                        "text area or running into its neighbour (every table fits and is whole), every citation "
                        "resolved")
    p.set_defaults(func=publish.cmd_verify)
    p = sub.add_parser("publish", help="write results/PROFILE from a finished study's outputs, and the README's "
                                       "findings from results/laptop", description=publish.__doc__.splitlines()[0])
    p.add_argument("profile", metavar="PROFILE", help="the profile whose study the outputs hold (e.g. laptop)")
    p.add_argument("--outputs", metavar="DIR", help="outputs folder (default: <project>/outputs)")
    p.set_defaults(func=publish.cmd_publish)
    return parser


def _expected_errors() -> tuple[type[BaseException], ...]:
    """UserError, ParamsError, and the errors of the lazily imported modules that the command
    imported (an error class whose module was never imported cannot have been raised)."""
    return (UserError, ParamsError, *(getattr(sys.modules[module], name) for module, name in LAZY_ERRORS
                                      if module in sys.modules))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except Exception as err:
        if not isinstance(err, _expected_errors()):
            raise
        print(f"prefnb {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prefnb {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
