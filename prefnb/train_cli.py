"""`prefnb train PARAMS.yaml [--profile P] [--set key=value ...] [--sweep key=[v1, v2] ...]`
and `prefnb params`."""

from __future__ import annotations

import dataclasses
import itertools
import json

from prefnb.config import ParamsError, RunParams, describe_params, load_params, parse_override
from prefnb.project import outputs_dir
from prefnb.rundir import clear_finished, mark_finished


# Settings that accelerate fixes for the life of a process: they cannot vary within one sweep.
PER_PROCESS = {"precision": "accelerate fixes mixed precision once per process; run one sweep per precision"}


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train and evaluate one run (or a sweep of runs) from params files")
    p.add_argument("files", nargs="*", help="params YAML files, applied in order (after the profile)")
    p.add_argument("--profile", default=None, help="profile applied first (e.g. smoke, gpt2, or a YAML path)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter (repeatable)")
    p.add_argument("--sweep", dest="sweeps", action="append", default=[], metavar="KEY=[V1, V2, ...]",
                   help="one run per value, all in this process (repeatable: every combination); runs after "
                        "the first skip the imports and reuse the cached reference log-probs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)

    q = subparsers.add_parser("params", help="list every run parameter, its default and allowed values")
    q.set_defaults(func=lambda args: print(describe_params()) or 0)


def run_train(args) -> int:
    runs = sweep_params(args.files, args.overrides, args.sweeps, profile=args.profile)  # validated before any work
    for params in runs:
        metrics = train_and_mark(params, progress=not args.no_progress)
        print(json.dumps({k: v for k, v in metrics.items() if k.startswith(("eval/", "test/", "train/loss", "best_step"))},
                         indent=2))
        print(f"run directory: {params.resolved_output_dir()}", flush=True)
    return 0


def sweep_params(files, overrides: list[str], sweeps: list[str], *, profile=None) -> list[RunParams]:
    """The runs of ``--sweep key=[v1, v2] ...`` (every combination, in order), each validated
    like a single run; no sweep gives the one run of ``files`` + ``overrides``.

    Raises ParamsError for a sweep that is not a non-empty list, or whose runs would share a
    run directory (``output_dir`` set by hand).
    """
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
    directories = [params.resolved_output_dir() for params in runs]
    if len(set(directories)) < len(directories):
        raise ParamsError("--sweep: runs would share a run directory (output_dir is set); leave output_dir "
                          "unset so that each run writes outputs/<experiment>/<run id>")
    return runs


def in_project(params: RunParams) -> RunParams:
    """A run without output_dir writes under the outputs/ of the project found from the working
    directory (as `prefnb study` does), not under ./outputs of wherever the command runs."""
    if params.output_dir:
        return params
    return dataclasses.replace(params, output_dir=str(params.resolved_output_dir(outputs_dir())))


def train_and_mark(params: RunParams, *, progress: bool = True) -> dict[str, float]:
    """Train one run and mark it finished; a run that fails part-way is left unmarked."""
    from prefnb.train import train  # heavy imports only once the params are known to be good

    out_dir = params.resolved_output_dir()
    clear_finished(out_dir)  # a rerun is unfinished until it finishes
    metrics = train(params, progress=progress)
    mark_finished(out_dir)
    return metrics
