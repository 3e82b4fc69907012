"""A sweep of real training runs, killed with SIGKILL mid-way and resumed, ends with every run
done exactly once and the same results as a sweep that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from optarena.sweep.store import Store

SRC = Path(__file__).resolve().parents[1] / "src"

SPEC = """
[base]
model = "micro"
data = "builtin"
steps = 40
batch_size = 8
seq_len = 32
eval_every = 10
checkpoint_every = 5
[[grid]]
optimizer = "adamw"
lr = [1e-3, 1e-2]
hparams = {weight_decay = 0.0}
[[grid]]
optimizer = "sgd"
lr = [0.1]
hparams = {momentum = 0.9}
"""


def sweep(spec: Path, out: Path) -> subprocess.Popen[str]:
    args = [sys.executable, "-m", "optarena", "sweep", str(spec), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen(
        [*args, "--workers", "2", "--threads", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the sweep")
        time.sleep(0.05)


def has_checkpoint(out: Path, run_ids) -> bool:
    return any(any((out / "runs" / rid / "checkpoints").glob("step-*.pt")) for rid in run_ids)


@pytest.mark.slow
def test_sigkill_then_resume(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text(SPEC)
    reference, killed = tmp_path / "reference", tmp_path / "killed"

    proc = sweep(spec, killed)
    store = None

    def mid_way() -> bool:
        """One run finished and another has a checkpoint: the kill interrupts real work."""
        nonlocal store
        if store is None:
            if not (killed / "results.sqlite").is_file():
                return False
            store = Store(killed)
        counts = store.counts()
        running = [r.id for r in store.runs(status="running")]
        return counts["done"] + counts["diverged"] >= 1 and has_checkpoint(killed, running)

    wait_until(mid_way, timeout=180)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left_running = store.runs(status="running")
    assert left_running, "the kill should leave runs marked running"
    had_checkpoint = {r.id for r in left_running if has_checkpoint(killed, [r.id])}
    assert had_checkpoint, "the kill should interrupt a run that has a checkpoint"
    assert sum(store.counts()[s] for s in ("done", "diverged")) < len(store.runs())

    resumed = sweep(spec, killed)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    straight = sweep(spec, reference)
    _, err = straight.communicate(timeout=300)
    assert straight.returncode == 0, err

    store = Store(killed)
    ref = {r.id: r for r in Store(reference).runs()}
    runs = {r.id: r for r in store.runs()}
    assert runs.keys() == ref.keys()
    events = store.events()
    finishes = [e["run_id"] for e in events if e["event"] == "finish"]
    assert sorted(finishes) == sorted(runs)  # every run finished exactly once
    reclaimed = {e["run_id"] for e in events if e["event"] == "reclaim"}
    assert reclaimed == {r.id for r in left_running}
    for rid in had_checkpoint:  # each picked up where it was: its checkpoint, or its summary
        log = (killed / "runs" / rid / "log.txt").read_text()
        assert runs[rid].summary.get("resumed_from") or "already finished" in log, log
    for rid, run in runs.items():
        assert run.status == ref[rid].status == "done"
        assert run.final_val_loss == pytest.approx(ref[rid].final_val_loss, rel=1e-5, abs=1e-6)
