"""`prefnb train PARAMS.yaml [--profile P] [--set key=value ...]` and `prefnb params`."""

from __future__ import annotations

import json

from prefnb.config import describe_params, load_params
from prefnb.rundir import clear_finished, mark_finished


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="train and evaluate one run from params files")
    p.add_argument("files", nargs="*", help="params YAML files, applied in order (after the profile)")
    p.add_argument("--profile", default=None, help="profile applied first (e.g. smoke, gpt2, or a YAML path)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one parameter (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)

    q = subparsers.add_parser("params", help="list every run parameter, its default and allowed values")
    q.set_defaults(func=lambda args: print(describe_params()) or 0)


def run_train(args) -> int:
    params = load_params(args.files, args.overrides, profile=args.profile)  # validated before any work
    from prefnb.train import train  # heavy imports only once the params are known to be good

    out_dir = params.resolved_output_dir()
    clear_finished(out_dir)  # a rerun is unfinished until it finishes
    metrics = train(params, progress=not args.no_progress)
    mark_finished(out_dir)
    print(json.dumps({k: v for k, v in metrics.items() if k.startswith(("eval/", "train/loss", "best_step"))}, indent=2))
    print(f"run directory: {out_dir}")
    return 0
