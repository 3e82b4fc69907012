"""The sweep driver: puts a spec's runs in the store and runs whatever has no result yet.

The driver is the only writer of the store. It claims a run just before submitting it, keeps
claimed runs' heartbeats fresh, and records each outcome as it arrives, so at any instant the
store says exactly which runs have results, which are being worked on (and by which process),
and which are left. Killing the driver loses only work in progress; the next invocation
reclaims those runs and the training function resumes them from their last checkpoint
(``resume = True``, run directory ``DIR/runs/<id>/``).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from optarena import atomic
from optarena.sweep.executors import Executor, Outcome, Task
from optarena.sweep.progress import SweepProgress, point_text
from optarena.sweep.spec import Run
from optarena.sweep.store import FINISHED, Store

HEARTBEAT_SECONDS = 10.0


@dataclass
class SweepResult:
    """What one invocation did."""

    total: int
    already_finished: int
    done: int
    diverged: int
    failed: int
    held_elsewhere: int  # runs another live driver is working on
    storage_error: str | None = None  # a run could not write its files: no more runs started

    @property
    def complete(self) -> bool:
        return self.failed == 0 and self.held_elsewhere == 0


def register_runs(store: Store, runs: Sequence[Run], sweep: str) -> int:
    """Add a spec's runs (and their series memberships) to the store; returns how many are new."""
    return store.add_runs(((r.id, r.config, r.label, r.point) for r in runs), sweep=sweep)


def run_sweep(
    store: Store,
    runs: Sequence[Run],
    executor: Executor,
    *,
    sweep: str = "",
    retry_failed: bool = True,
    progress: SweepProgress | None = None,
    close_executor: bool = True,
) -> SweepResult:
    """Run every run of ``runs`` that has no result in ``store``; never raises for a bad run.
    A run that cannot write its files (a full disk, a read-only folder) is recorded as failed
    and starts no further run: ``storage_error`` says why.

    ``close_executor=False`` leaves the executor open for another call (refinement and tuning
    run several batches through one executor and close it themselves)."""
    register_runs(store, runs, sweep)
    executor.attach(store)
    unique = list({r.id: r for r in runs}.values())
    records = {rec.id: rec for rec in store.runs()}
    finished_before = [r for r in unique if records[r.id].status in FINISHED]
    todo = [r for r in unique if records[r.id].status not in FINISHED]
    if progress is None:
        progress = SweepProgress(total=len(unique), already=len(finished_before))
    for r in finished_before:
        rec = records[r.id]
        if rec.status == "done" and rec.final_val_loss is not None:
            best = progress.best.get(r.label)
            if best is None or rec.final_val_loss < best[0]:
                progress.best[r.label] = (rec.final_val_loss, rec.lr or math.nan)

    result = SweepResult(len(unique), len(finished_before), 0, 0, 0, 0)
    held: list[str] = []  # runs another live driver holds
    in_flight: dict[str, Run] = {}
    queue = list(todo)
    last_beat = time.monotonic()
    with progress:
        try:
            while (queue and not result.storage_error) or in_flight:
                while queue and len(in_flight) < executor.capacity and not result.storage_error:
                    run = queue.pop(0)
                    if not store.claim(run.id, retry_failed=retry_failed):
                        _not_claimed(store.get(run.id).status, run.id, held, result, progress)
                        continue
                    run_dir = store.run_dir(run.id)
                    config = {
                        **run.config,
                        "out": str(run_dir),
                        "resume": _has_files(run_dir),  # an interrupted attempt left files
                        "progress": False,  # the sweep shows progress; workers stay quiet
                    }
                    run_dir.mkdir(parents=True, exist_ok=True)
                    in_flight[run.id] = run  # first: an interrupted submit releases it too
                    executor.submit(Task(run.id, config))
                    progress.running = len(in_flight)
                    progress.refresh()
                for outcome in executor.wait(timeout=1.0):
                    run = in_flight.pop(outcome.task.run_id)
                    progress.running = len(in_flight)
                    _record(store, run, outcome, result, progress)
                if time.monotonic() - last_beat > HEARTBEAT_SECONDS:
                    store.heartbeat(in_flight)
                    last_beat = time.monotonic()
        except BaseException:
            executor.close(cancel=True)
            store.release(in_flight)
            raise
    if close_executor:
        executor.close()
    # what the other driver has finished meanwhile has its result; the rest is still its
    result.held_elsewhere = sum(store.get(run_id).status not in FINISHED for run_id in held)
    return result


def _not_claimed(
    status: str, run_id: str, held: list[str], result: SweepResult, progress: SweepProgress
) -> None:
    """A run another driver got first: held by it (``running``), or finished by it since
    this invocation started. The totals stay; the run is counted where it is."""
    if status == "running":
        held.append(run_id)
        progress.elsewhere += 1
    elif status in FINISHED:
        result.already_finished += 1
        progress.already += 1
    else:  # failed before, and --no-retry-failed leaves it
        progress.already += 1
    progress.refresh()


def _record(
    store: Store, run: Run, outcome: Outcome, result: SweepResult, progress: SweepProgress
) -> None:
    lr = run.config.get("lr")
    where = point_text(run.label, run.point, run.config.get("seed"))
    atomic.fault_point("before-store-write")
    if outcome.summary is not None:
        status = store.finish(run.id, outcome.summary)
        loss = outcome.summary.get("final_val_loss")
        if status == "done":
            result.done += 1
            line = f"{where}: loss {loss:.4f}"
        else:
            result.diverged += 1
            line = f"{where}: diverged"
        _write_error_file(store.run_dir(run.id), None)
    else:
        status, loss = "failed", None
        store.fail(run.id, outcome.error or "unknown error")
        _write_error_file(store.run_dir(run.id), outcome.detail or outcome.error)
        result.failed += 1
        line = f"{where}: FAILED: {outcome.error}"
        if (outcome.error or "").startswith(_STORAGE):  # a full disk fails every run after it
            result.storage_error = outcome.error.removeprefix(_STORAGE)
    atomic.fault_point("after-store-write")
    progress.record(run.label, lr, status, loss, line)


# how a run's StorageError (a full disk, a read-only folder) comes back from its worker
_STORAGE = "StorageError: "


def _has_files(run_dir: Path) -> bool:
    """Whether an earlier attempt wrote anything besides the sweep's own error/log notes."""
    if not run_dir.is_dir():
        return False
    return any(p.name not in ("error.txt", "log.txt") for p in run_dir.iterdir())


def _write_error_file(run_dir: Path, text: str | None) -> None:
    """The full traceback of a failed run sits next to its files (the store keeps one line)."""
    path = run_dir / "error.txt"
    if text is None:
        path.unlink(missing_ok=True)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, text)
