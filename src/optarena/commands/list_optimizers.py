"""``optarena list``: every registered optimizer: its family, the class or call that builds it,
a one-line description and the reference its tests compare it with."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="list the optimizers optarena provides")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from optarena.optim import REGISTRY

    table = Table(title="optarena optimizers", show_lines=False)
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("family", no_wrap=True)
    table.add_column("class", no_wrap=True)
    table.add_column("what it is")
    table.add_column("checked against")
    for name, e in REGISTRY.items():
        cls = f"optarena.optim.{e.class_name}" if e.class_name else f"create({name!r}, ...)"
        table.add_row(name, e.family, cls, e.description, e.reference or "-")
    Console().print(table)
    return 0
