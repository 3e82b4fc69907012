"""A sweep killed with SIGKILL mid-way and resumed ends with every run done exactly once and the
same results as a sweep that was never interrupted."""

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

TOY_SPEC = """
[base]
steps = 10
toy_seconds = 0.6
[[grid]]
optimizer = "adamw"
lr = {from = 1e-4, to = 1, num = 5}
[[grid]]
optimizer = "lion"
lr = [1e-4, 1e-3, 1e-2]
"""

REAL_SPEC = """
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


def sweep(spec: Path, out: Path, function: str | None) -> subprocess.Popen[str]:
    args = [
        sys.executable,
        "-m",
        "optarena",
        "sweep",
        str(spec),
        "--out",
        str(out),
        "--workers",
        "2",
        "--threads",
        "1",
    ]
    if function:
        args += ["--function", function]
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen(
        args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for the sweep")
        time.sleep(0.05)


def has_checkpoint(out: Path, run_ids) -> bool:
    return any(
        p.is_file() and p.name != "summary.json" and p.stat().st_size > 0
        for rid in run_ids
        for p in (out / "runs" / rid).rglob("*")
    )


@pytest.mark.slow
@pytest.mark.parametrize("function", ["optarena.sweep.toy:train", None], ids=["toy", "real-train"])
def test_sigkill_then_resume(tmp_path, function):
    if function is None:
        pytest.importorskip("optarena.train")
    spec = tmp_path / "spec.toml"
    spec.write_text(TOY_SPEC if function else REAL_SPEC)
    reference, killed = tmp_path / "reference", tmp_path / "killed"

    proc = sweep(spec, killed, function)
    store = None

    def mid_way() -> bool:
        nonlocal store
        if store is None:
            if not (killed / "results.sqlite").is_file():
                return False
            store = Store(killed)
        counts = store.counts()
        running = [r.id for r in store.runs(status="running")]
        finished = counts["done"] + counts["diverged"]
        if function is None:  # the real harness: wait until a running run has a checkpoint
            return finished >= 1 and has_checkpoint(killed, running)
        return finished >= 1 and running

    wait_until(mid_way, timeout=120)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    left_running = store.runs(status="running")
    assert left_running, "the kill should leave runs marked running"
    total = len(store.runs())
    assert sum(store.counts()[s] for s in ("done", "diverged")) < total

    resumed = sweep(spec, killed, function)
    _, err = resumed.communicate(timeout=240)
    assert resumed.returncode == 0, err
    straight = sweep(spec, reference, function)
    _, err = straight.communicate(timeout=240)
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
    for rid, run in runs.items():
        assert run.status == ref[rid].status
        if run.final_val_loss is None:
            assert ref[rid].final_val_loss is None
        else:
            assert run.final_val_loss == pytest.approx(ref[rid].final_val_loss, rel=1e-5, abs=1e-6)
