"""`prefnb` command line: study | run | train | data | params | paper | verify.

Each subcommand lives with the module that does the work; this file only wires them up
and turns expected errors (bad params, bad data, a model that cannot load) into one
clear line on stderr and a non-zero exit, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (subcommand, module that defines `register(subparsers)`)
SUBCOMMANDS = (
    ("train", "prefnb.train_cli"),
    ("data", "prefnb.data_cli"),
    ("params", "prefnb.train_cli"),
    ("study", "prefnb.study"),
    ("run", "prefnb.study"),
    ("paper", "prefnb.paper"),
    ("verify", "prefnb.paper"),
)


class UserError(Exception):
    """An error caused by the user's input; printed as one line, exit status 2."""


def _expected_errors() -> tuple[type[BaseException], ...]:
    from prefnb.config import ParamsError

    errors: list[type[BaseException]] = [UserError, ParamsError]
    for module, name in (("prefnb.data", "DataError"), ("prefnb.models", "ModelLoadError"),
                         ("prefnb.prompts", "PromptFormatError"), ("prefnb.train", "TrainingError")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prefnb", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    registered = set()
    for _, module in SUBCOMMANDS:
        if module in registered:
            continue
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name == module:  # that part of the package is not there (yet)
                continue
            raise
        mod.register(sub)
        registered.add(module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except _expected_errors() as err:
        print(f"prefnb {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"prefnb {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
