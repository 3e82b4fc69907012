"""``optarena report DIR``: the HTML report, CSV/JSON tables and figures of a sweep."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from optarena.errors import UserError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "report",
        help="write DIR/report/index.html (or print the summary table) from a sweep's results",
    )
    parser.add_argument("dir", metavar="DIR", help="a sweep's --out folder")
    parser.add_argument(
        "--format",
        choices=("html", "table"),
        default="html",
        help="html: write DIR/report/ (page, CSV, JSON, figures); table: print the summary",
    )
    parser.add_argument(
        "--tau",
        type=float,
        action="append",
        default=None,
        metavar="NATS",
        help="basin tolerance(s) in nats (default: 0.01, 0.05, 0.1); repeat for several",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from optarena.analysis import DEFAULT_TAUS

    taus = tuple(args.tau) if args.tau else DEFAULT_TAUS
    for tau in taus:
        if not (math.isfinite(tau) and tau > 0):
            raise UserError(
                f"--tau {tau:g}: give a positive finite loss tolerance in nats, e.g. --tau 0.05"
            )
    directory = Path(args.dir)
    if args.format == "table":
        print_table(directory, taus)
        return 0
    from optarena.report import write_report

    page = write_report(directory, taus)
    print(f"report: {page}")
    return 0


def print_table(directory: Path, taus: tuple[float, ...]) -> None:
    from rich.console import Console
    from rich.table import Table

    from optarena.analysis import analyze_store
    from optarena.report.story import tell
    from optarena.report.tables import display_rows
    from optarena.sweep.store import Store

    analysis = analyze_store(directory, taus)
    with Store(directory, create=False) as store:
        runs = {r.id: r for r in store.runs()}
    told = tell(analysis, runs)
    header, rows = display_rows(analysis, told.speedups)
    table = Table(title=f"optarena sweep: {directory}")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < 2 else "right", no_wrap=i < 2)
    for row in rows:
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:  # a pipe or a file: as wide as the table, columns unsqueezed
        wide = Console(width=10_000)
        console = Console(width=max(80, wide.measure(table).maximum))
    console.print(table)
    for text in told.conclusions + [f"caveat: {c}" for c in told.caveats]:
        console.print(text, highlight=False, markup=False, soft_wrap=True)
