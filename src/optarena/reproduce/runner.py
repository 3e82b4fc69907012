"""A staged driver on top of the sweep machinery.

A reproduction is a sequence of sweeps into one results store: a later stage is built from the
analysis of what the store already holds (the 1-D beta sweeps sit at each optimizer's best LR of
stage 1), so each stage re-reads the store. Re-running a reproduction resumes: finished runs are
never rerun, interrupted ones restart from their checkpoints (the sweep driver's rules).
"""

from __future__ import annotations

import argparse
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from optarena.analysis import Analysis, analyze_store
from optarena.errors import StorageError
from optarena.sweep.spec import Grid, SweepSpec

DEFAULT_FUNCTION = "optarena.train:train"


@dataclass
class StageReport:
    name: str
    runs: int
    done: int
    diverged: int
    failed: int
    already: int
    seconds: float


@dataclass
class Stager:
    """Runs stages into ``out`` with the executor the command-line flags ask for."""

    out: Path
    args: argparse.Namespace
    prefix: str
    console: Console = field(default_factory=lambda: Console(stderr=True, soft_wrap=True))
    stages: list[StageReport] = field(default_factory=list)
    default_threads: int = 1
    seed: int = 0  # the seed of every stage's runs (repeats name their own)
    function: str | None = None  # the runs' function (None: --function, i.e. pre-training)

    def grid(
        self,
        optimizer: str,
        fixed: dict[str, Any],
        swept: dict[str, list[Any]],
        *,
        label: str | None = None,
        seeds: Sequence[int] | None = None,
    ) -> Grid:
        seeds = [self.seed] if seeds is None else list(seeds)
        return Grid(0, optimizer, label or optimizer, dict(fixed), dict(swept), seeds)

    def run(
        self, number: int, total: int, title: str, base: dict[str, Any], grids: list[Grid]
    ) -> StageReport:
        """Run one stage (every run without a result), print what it did, return the counts."""
        from optarena.commands.sweep import check_runs, make_executor
        from optarena.sweep.driver import run_sweep
        from optarena.sweep.store import Store
        from optarena.tasks import task_of_function

        for i, g in enumerate(grids):
            g.index = i
        spec = SweepSpec(f"{self.prefix}-{number}", title, base, grids)
        runs = spec.runs()
        args = self.args
        if self.function is not None:
            args = argparse.Namespace(**{**vars(args), "function": self.function})
        executor = make_executor(args, self.out, self.default_threads)
        task = task_of_function(args.function)
        if runs and task is not None:
            check_runs(spec, f"stage {number}", task)  # bad values: one line, nothing stored
        start = time.monotonic()
        self.console.print(
            f"[bold]stage {number}/{total}[/]: {title} ({len({r.id for r in runs})} runs)",
            highlight=False,
        )
        if not runs:
            report = StageReport(title, 0, 0, 0, 0, 0, 0.0)
            self.stages.append(report)
            return report
        store = Store(self.out)
        previous = signal.signal(signal.SIGTERM, _raise_interrupt)
        try:
            result = run_sweep(store, runs, executor, sweep=spec.name, retry_failed=True)
        finally:
            signal.signal(signal.SIGTERM, previous)
            store.close()
        if result.storage_error:  # a full disk: the later stages would fail the same way
            raise StorageError(result.storage_error)
        report = StageReport(
            title,
            result.total,
            result.done,
            result.diverged,
            result.failed,
            result.already_finished,
            time.monotonic() - start,
        )
        self.stages.append(report)
        if result.failed:
            self.console.print(
                f"[red]{result.failed} runs failed in this stage[/] (errors in "
                f"{self.out}/runs/<id>/error.txt); later stages use what trained; re-run to retry.",
                highlight=False,
            )
        return report

    def analysis(self, taus: Sequence[float]) -> Analysis:
        return analyze_store(self.out, taus)


def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
