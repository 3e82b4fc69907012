"""``optarena tune SPEC --out DIR``: per-optimizer coordinate descent (``optarena.sweep.tune``)."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from optarena.commands import sweep as sweep_command
from optarena.errors import StorageError


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
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from optarena.sweep import tune
    from optarena.sweep.progress import short_value
    from optarena.sweep.store import Store

    spec = sweep_command.load(args)
    settings = tune.settings_of(spec)
    out = Path(args.out) if args.out else Path("runs") / spec.name
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
