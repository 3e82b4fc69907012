"""``optarena tune SPEC --out DIR``: per-optimizer coordinate descent (``optarena.sweep.tune``)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from optarena.commands import sweep as sweep_command
from optarena.errors import StorageError
from optarena.sweep import tune
from optarena.sweep.spec import SweepSpec


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="tune each optimizer by coordinate descent (a spec with a [tune] table); "
        "re-running resumes it",
        description="Per-optimizer coordinate descent over the values each [[grid]] sweeps "
        "(LR, weight decay, beta2, warmup...), one axis at a time around the incumbent, until "
        "no neighbour improves by more than the noise. Results go to DIR/results.sqlite like a "
        "sweep's; re-running replays the search from it and runs only what is new.",
    )
    parser.add_argument("spec", help="a tuning spec (TOML with [tune]) or a preset (e.g. tune)")
    sweep_command.add_sweep_options(parser)
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the base config, the axes and the first round's runs with an estimated "
        "CPU time; run and write nothing",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from optarena.sweep.progress import short_value
    from optarena.sweep.store import Store

    spec = sweep_command.load(args)
    settings = tune.settings_of(spec)
    out = Path(args.out) if args.out else Path("runs") / spec.name
    if args.dry_run:
        return dry_run(spec, settings, out)
    console = Console(stderr=True, soft_wrap=True)
    executor = sweep_command.make_executor(args, out, 2, spec)
    store = Store(out)
    path_file = out / "tune" / f"{spec.name}.json"
    path_file.parent.mkdir(parents=True, exist_ok=True)
    console.print(
        f"tune [bold]{spec.name}[/]: {len(spec.grids)} searches into {out} "
        f"({args.backend}, {executor.capacity} at a time); noise: "
        f"{tune.noise_text(settings.tolerance)}",
        highlight=False,
    )
    previous = signal.signal(signal.SIGTERM, sweep_command._raise_interrupt)
    try:
        result = tune.tune(
            store,
            spec,
            executor,
            settings=settings,
            path_file=path_file,
            retry_failed=args.retry_failed,
            on_step=lambda s, step: console.print(
                tune.describe(s, step), highlight=False, markup=False
            ),
        )
    finally:
        signal.signal(signal.SIGTERM, previous)
        store.close()
    if result.storage_error:  # one line, exit 2; the search continues on the next invocation
        raise StorageError(result.storage_error)
    for s in result.searches:
        q = s.search
        best = q.evals.get(q.incumbent)
        loss = "—" if best is None else f"{best.loss:.4f}"
        point = " ".join(
            f"{k.rsplit('.', 1)[-1]}={short_value(v)}" for k, v in q.point(q.incumbent).items()
        )
        print(f"{s.grid.label}: {point} loss {loss} ({q.status}, {len(q.evals)} points)")
    print(f"ran {result.ran} runs now; path: {path_file}; report: optarena report {out}")
    if result.failed:
        console.print(
            f"[red]{result.failed} runs failed[/]: their searches stopped; errors in "
            f"{out}/runs/<id>/error.txt; re-running retries them.",
            highlight=False,
        )
        return 1
    if result.unfinished:
        console.print(
            "some runs are held by another live process; re-run later to continue.",
            highlight=False,
        )
    return 0


def dry_run(spec: SweepSpec, settings: tune.TuneSettings, out: Path) -> int:
    """Print the base config, each search's axes and start, the runs of its first round (the
    start and its neighbours on each axis) with their status in ``out`` and the estimated CPU
    time of those without a result; write nothing."""
    from rich.console import Console
    from rich.table import Table

    from optarena.sweep.progress import format_seconds, short_value
    from optarena.sweep.store import DB_NAME, Store

    status: dict[str, str] = {}
    if (out / DB_NAME).is_file():
        with Store(out) as store:
            status = {r.id: r.status for r in store.runs()}
    console = Console(file=sys.stdout)
    if not console.is_terminal:
        console = Console(file=sys.stdout, width=200)

    def say(text: str) -> None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)

    say("base config: " + ", ".join(f"{k}={short_value(v)}" for k, v in sorted(spec.base.items())))
    say(f"noise: {tune.noise_text(settings.tolerance)}; at most {settings.max_rounds} rounds")
    todo = 0.0
    for s in tune.searches_of(spec, settings):
        q = s.search
        for key, values in zip(q.keys, q.values, strict=True):
            say(f"{s.grid.label} axis {key}: " + ", ".join(short_value(v) for v in values))
        points = tune.first_round(q)
        table = Table(
            title=f"{s.grid.label}: round 1, {len(points)} points (first: the start) x "
            f"{len(s.grid.seeds)} seed{'' if len(s.grid.seeds) == 1 else 's'} (more if a move "
            f"continues) -> {out}"
        )
        for column in ("id", *(k.rsplit(".", 1)[-1] for k in q.keys), "seed", "status"):
            table.add_column(column)
        table.add_column("est. CPU")
        for index in points:
            for run in s.runs(spec, index):
                cost = sweep_command.estimated_cpu_seconds(run.config)
                state = status.get(run.id, "new")
                if cost is not None and state not in ("done", "diverged"):
                    todo += cost
                values = [short_value(v) for v in q.point(index).values()]
                est = "?" if cost is None else format_seconds(cost)
                table.add_row(run.id, *values, str(run.config["seed"]), state, est)
        console.print(table)
    say(
        f"estimated CPU time of round 1's runs without a result: about {format_seconds(todo)} "
        f"core-time ({sweep_command.COST_MODEL}; later rounds add more; divide by the cores in "
        "use; a loaded machine is slower)"
    )
    return 0
