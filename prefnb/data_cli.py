"""`prefnb data`: check the data files and print a short summary per task.

It reads every file a task needs with the same loaders the runs use, so a file that
passes here will not fail at the start of a run. Problems raise DataError, which
`prefnb.cli` prints as one line (exit status 2).
"""

from __future__ import annotations

import argparse

from prefnb.config import resolve_params
from prefnb.data import load_task, resolve_data_dir

DEFAULT_TASKS = ("paraphrase", "sonnets")


def register(subparsers) -> None:
    parser = subparsers.add_parser("data", help="validate the data files and summarise each task",
                                   description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=None,
                        help="study data directory (default: $PREFNB_DATA, then ../shared/data)")
    parser.add_argument("--task", action="append", choices=("paraphrase", "sonnets", "jsonl"),
                        help="task to check; repeat for several (default: paraphrase and sonnets)")
    parser.add_argument("--data-path", default=None, help="task jsonl: a JSONL file or a dataset id")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the train/dev/test split")
    parser.set_defaults(func=run)


def summarise(data, data_seed: int) -> list[str]:
    """A few lines about one loaded task (counts before any train_size / max caps)."""
    s = data.stats
    lines = [f"{data.task}:",
             f"  rows read {s.get('rows_read', 0)}, malformed rows skipped {s.get('rows_skipped', 0)}",
             f"  split (data_seed {data_seed}): train {s.get('train_split', 0)}, "
             f"selection {s.get('selection_split', 0)}, report {s.get('report_split', 0)}"]
    lines += [f"  {name}  sha256 {digest[:12]}" for name, digest in data.source_files.items()]
    return lines


def run(args: argparse.Namespace) -> int:
    tasks = args.task or list(DEFAULT_TASKS)
    if any(t != "jsonl" for t in tasks):
        print(f"data directory: {resolve_data_dir(args.data_dir)}")
    for task in tasks:
        # Validate through RunParams, like a run would (e.g. jsonl without --data-path).
        params = resolve_params([("prefnb data", {"task": task, "data_dir": args.data_dir,
                                                  "data_path": args.data_path, "data_seed": args.data_seed})])
        print("\n".join(summarise(load_task(params), args.data_seed)))
    return 0
