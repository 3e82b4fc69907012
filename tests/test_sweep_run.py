"""Running sweeps: local pool, Ray and submitit backends, failures, resumption of new points.

These use ``optarena.sweep.toy:train``, a real (synthetic) training function with a known loss
landscape, so the mechanics are tested in seconds; tests/test_sweep_e2e.py uses the real one.
"""

from __future__ import annotations

import math

import pytest

from optarena.sweep import toy
from optarena.sweep.driver import run_sweep
from optarena.sweep.executors import LocalExecutor, RayExecutor, SlurmExecutor
from optarena.sweep.spec import parse_spec
from optarena.sweep.store import Store

TOY = "optarena.sweep.toy:train"


def spec(lrs_adam="[1e-4, 1e-3, 1e-2]", extra=""):
    return parse_spec(
        f"""
[base]
steps = 10
[[grid]]
optimizer = "adamw"
lr = {lrs_adam}
[[grid]]
optimizer = "sgd"
lr = [0.1, 100.0]
{extra}
"""
    )


def _finish_counts(store):
    counts = {}
    for event in store.events():
        if event["event"] == "finish":
            counts[event["run_id"]] = counts.get(event["run_id"], 0) + 1
    return counts


def test_local_sweep_records_results_and_failures(tmp_path):
    s = spec(extra="toy_fail = [false, true]")
    store = Store(tmp_path)
    result = run_sweep(store, s.runs(), LocalExecutor(TOY, workers=2, threads=1))
    # adam 3 done; sgd lr=0.1 done, lr=100 diverged (toy rule), two toy_fail runs failed
    assert (result.done, result.diverged, result.failed) == (4, 1, 2)
    for run in s.runs():
        rec = store.get(run.id)
        if run.config.get("toy_fail"):
            assert rec.status == "failed" and "toy run asked to fail" in rec.error
            assert "Traceback" in (store.run_dir(run.id) / "error.txt").read_text()
            continue
        expected = toy.expected_loss(run.config["optimizer"], run.config["lr"], 0)
        if math.isinf(expected):
            assert rec.status == "diverged" and rec.final_val_loss is None
        else:
            assert rec.status == "done" and rec.final_val_loss == pytest.approx(expected)
            assert (store.run_dir(run.id) / "summary.json").is_file()
            assert rec.summary["params"] == 1000 and rec.eval_curve
    assert not result.complete


def test_rerun_runs_only_new_points_and_retries_failures(tmp_path):
    store = Store(tmp_path)
    run_sweep(store, spec(extra="toy_exit = [false, true]").runs(), LocalExecutor(TOY, workers=2))
    crashed = [r for r in store.runs() if r.status == "failed"]
    # exactly the two runs that kill their worker process; the runs beside them finished
    assert sorted(r.lr for r in crashed) == [0.1, 100.0]
    assert all(r.config["toy_exit"] and "worker process died" in r.error for r in crashed)
    # a wider grid: only the new LR and the failed runs execute (toy_exit now false)
    bigger = spec(lrs_adam="[1e-4, 1e-3, 1e-2, 1e-1]", extra="toy_exit = [false]")
    result = run_sweep(store, bigger.runs(), LocalExecutor(TOY, workers=2))
    assert result.already_finished == 5  # 3 adam + 2 sgd toy_exit=false
    assert result.done + result.diverged == 1  # the new adam lr = 0.1
    assert all(n == 1 for n in _finish_counts(store).values())
    assert len(_finish_counts(store)) == 6
    # nothing left: a third run does nothing at all
    again = run_sweep(store, bigger.runs(), LocalExecutor(TOY, workers=1))
    assert (again.done, again.diverged, again.failed) == (0, 0, 0)
    assert again.already_finished == 6


def test_ray_backend_runs_a_two_run_sweep(tmp_path):
    pytest.importorskip("ray")
    s = parse_spec('[[grid]]\noptimizer = "adamw"\nlr = [1e-3, 1e-2]\n')
    store = Store(tmp_path)
    result = run_sweep(store, s.runs(), RayExecutor(TOY, workers=2))
    assert (result.done, result.failed) == (2, 0)
    losses = sorted(r.final_val_loss for r in store.runs())
    assert losses == pytest.approx(sorted(toy.expected_loss("adamw", lr) for lr in (1e-3, 1e-2)))


def test_submitit_local_backend_runs_a_two_run_sweep(tmp_path):
    pytest.importorskip("submitit")
    s = parse_spec('[[grid]]\noptimizer = "lion"\nlr = [1e-4, 1e-3]\ntoy_fail = [false, true]\n')
    store = Store(tmp_path)
    executor = SlurmExecutor(TOY, tmp_path / "slurm", workers=4, cluster="local")
    result = run_sweep(store, s.runs(), executor)
    assert (result.done, result.failed) == (2, 2)
    for rec in store.runs():
        if rec.config["toy_fail"]:
            assert "toy run asked to fail" in rec.error
        else:
            assert rec.final_val_loss == pytest.approx(toy.expected_loss("lion", rec.lr))
    assert any((tmp_path / "slurm").iterdir())  # submitit's job folder
