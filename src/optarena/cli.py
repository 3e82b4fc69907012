"""The ``optarena`` command line: one subcommand per module in ``optarena.commands``."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from optarena import __version__
from optarena.errors import Interrupted, UserError

# Each module defines ``register(subparsers)``; the parser it adds sets ``func(args) -> int``.
COMMAND_MODULES = [
    "optarena.commands.list_optimizers",
    "optarena.commands.train",
    "optarena.commands.sweep",
    "optarena.commands.report",
    "optarena.commands.demo",
    "optarena.commands.bench",
    "optarena.commands.reproduce",
]

# numba's CPU kernels run on a second copy of GNU OpenMP beside torch's (numba links the system
# libgomp by file name). After each parallel loop a pool's threads spin for 300,000 pauses
# (milliseconds) before they sleep, on the cores the other pool needs next: paired on the
# benchmark model (150 rounds), Adafactor's step read 1.23x its bandwidth bound with libgomp's
# default (1.27x with 30,000 spins), 1.07-1.09x with 1000 spins in both runtimes, and
# 1.23-1.24x with either runtime alone throttled. Each runtime reads it when it loads: before
# torch is imported.
OPENMP_SPINS = "1000"


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
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPINS)  # a user's own setting wins
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
