"""``optarena list``: every registered optimizer with a one-line description."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="list the optimizers optarena provides")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from optarena.optim import available

    table = Table(title="optarena optimizers", show_lines=False)
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("what it is")
    for name, description in available().items():
        table.add_row(name, description)
    Console().print(table)
    return 0
