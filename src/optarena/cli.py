"""The ``optarena`` command line: one subcommand per module in ``optarena.commands``."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from optarena import __version__
from optarena.errors import Interrupted, UserError

# Each module defines ``register(subparsers)``; the parser it adds sets ``func(args) -> int``.
COMMAND_MODULES = [
    "optarena.commands.list_optimizers",
    "optarena.commands.train",
    "optarena.commands.finetune",
    "optarena.commands.sweep",
    "optarena.commands.tune",
    "optarena.commands.report",
    "optarena.commands.demo",
    "optarena.commands.bench",
    "optarena.commands.reproduce",
    "optarena.commands.rlhf",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optarena",
        description="Choose, study and use optimizers for language-model training.",
    )
    parser.add_argument("--version", action="version", version=f"optarena {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"optarena: error: {err}", file=sys.stderr)
        return err.exit_code
    except Interrupted as err:
        print(f"optarena: interrupted: {err}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("optarena: interrupted; everything finished so far is saved.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
