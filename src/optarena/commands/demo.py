"""``optarena demo``: the ``demo`` sweep preset end to end, then its report.

Seven optimizers x five half-decade learning rates around each one's basin, on the micro model
and the built-in corpus: a few minutes on a laptop CPU, and the shortest path from install to the
study's loss-vs-LR figure.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from optarena.commands import sweep as sweep_command

DEFAULT_OUT = "optarena-demo"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the demo sweep (9 optimizers x 5 LRs, micro model) and write its report",
    )
    sweep_command.add_sweep_options(parser, default_out=DEFAULT_OUT)
    parser.set_defaults(func=run, spec="demo")


def run(args: argparse.Namespace) -> int:
    start = time.monotonic()
    spec = sweep_command.load(args)
    out = Path(args.out)
    estimate = sum(sweep_command.estimated_cpu_seconds(r.config) or 0.0 for r in spec.runs())
    from optarena.sweep.progress import format_seconds

    print(
        f"demo: {len(spec.runs())} runs, about {format_seconds(estimate)} of CPU-core time "
        "(less on several idle cores, more on a loaded machine)",
        flush=True,
    )
    # micro-model runs use one core well and two poorly: one run per core
    code = sweep_command.execute(args, spec, out, default_threads=1)
    from optarena.report import write_report

    page = write_report(out)
    minutes, seconds = divmod(round(time.monotonic() - start), 60)
    print(f"demo finished in {minutes}m{seconds:02d}s")
    print(f"report: {page.resolve()}")
    print(f"table:  optarena report {out} --format table")
    return code
