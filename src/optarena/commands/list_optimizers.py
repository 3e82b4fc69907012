"""``optarena list``: every registered optimizer: its family, the class or call that builds it,
a one-line description and the reference its tests compare it with."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("list", help="list the optimizers optarena provides")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    from optarena.optim import REGISTRY

    rows = [
        (
            name,
            e.family,
            f"optarena.optim.{e.class_name}" if e.class_name else f"create({name!r}, ...)",
            e.description,
            e.reference or "-",
        )
        for name, e in REGISTRY.items()
    ]
    table = Table(title="optarena optimizers", show_lines=False)
    table.add_column("name", style="bold cyan", no_wrap=True)
    table.add_column("family", no_wrap=True)
    table.add_column("class", no_wrap=True)
    table.add_column("what it is")
    table.add_column("checked against")
    for row in rows:
        table.add_row(*row)
    console = Console()
    if (
        Measurement.get(console, console.options.update_width(10**6), table).maximum
        <= console.width
    ):
        console.print(table)
        return 0
    # a terminal narrower than the table's rows: one block per optimizer, nothing cut
    console.print("[bold]optarena optimizers[/bold]")
    for name, family, cls, description, reference in rows:
        console.print(f"[bold cyan]{name}[/bold cyan] ({family}): {cls}", soft_wrap=True)
        console.print(f"    {description}", soft_wrap=True, highlight=False)
        console.print(f"    checked against: {reference}", soft_wrap=True, highlight=False)
    return 0
