"""``optarena sweep --refine``: half-steps around each series' optimum until it is interior.

The toy training function has a known optimum per optimizer (a parabola in log10 LR, LRs far
above it diverge), so where refinement must end is known in advance; runs execute in this
process (or, for the command line, in the local pool) in a fraction of a second each.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optarena.analysis import analyze_store
from optarena.cli import main
from optarena.sweep import refine, toy
from optarena.sweep.spec import parse_spec
from optarena.sweep.store import Store
from sweep_cases import TOY, InProcess

SRC = Path(__file__).resolve().parents[1] / "src"

SPEC = """
[sweep]
name = "refine"
[base]
steps = 10
[[grid]]
optimizer = "adamw"
lr = [1e-4, 1e-3]
[[grid]]
optimizer = "lion"
lr = {from = 1e-5, to = 1e-2, per_decade = 1}
[[grid]]
optimizer = "sgd"
lr = [0.1, 100.0]
[[grid]]
optimizer = "sgd"
label = "sgd-momentum"
lr = 1.0
hparams.momentum = [0.5, 0.9]
"""


def finishes(store: Store) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in store.events():
        if event["event"] == "finish":
            counts[event["run_id"]] = counts.get(event["run_id"], 0) + 1
    return counts


def lrs_of(store: Store, label: str) -> list[float]:
    return sorted(m.point["lr"] for m in store.members() if m.label == label and "lr" in m.point)


@pytest.mark.parametrize(
    ("curve", "step", "expected"),
    [
        # best at the low edge: half a step below, and the midpoint toward its neighbour
        ({1e-3: 3.0, 1e-2: 3.1}, 1.0, [10**-3.5, 10**-2.5]),
        ({1e-3: 3.1, 1e-2: 3.0}, 1.0, [10**-2.5, 10**-1.5]),  # at the high edge: above
        ({1e-3: 3.1, 1e-2: 3.0, 1e-1: 3.2}, 1.0, [10**-2.5, 10**-1.5]),  # interior: midpoints
        ({1e-3: 3.1, 10**-2.5: 3.05, 1e-2: 3.0, 10**-1.5: 3.02}, 1.0, []),  # settled
        ({1e-3: 3.1, 1e-2: 3.0, 1e-1: math.inf}, 1.0, [10**-2.5, 10**-1.5]),  # inf is worse
        ({1e-3: 3.1, 1e-2: math.inf}, 1.0, [10**-3.5, 10**-2.5]),  # diverged above the best
        ({1e-3: math.inf, 1e-2: math.inf}, 1.0, []),  # nothing trained: no optimum
        # the demo's rounded half-decade grid (3.16e-3, not 10^-2.5) with its midpoints: settled
        ({1e-3: 5.5, 3.16e-3: 5.4, 5.62e-3: 5.3, 1e-2: 5.35, 3.16e-2: 5.9}, 0.49969, []),
    ],
)
def test_next_lrs(curve, step, expected):
    got = refine.next_lrs(curve, step)
    assert got == pytest.approx(expected, rel=1e-9)


def test_refinement_ends_with_every_optimum_interior_and_reruns_nothing(tmp_path):
    spec = parse_spec(SPEC)
    store = Store(tmp_path)
    result = refine.refine_sweep(store, spec, InProcess())
    assert result.plan.settled and not result.plan.blocked and result.failed == 0
    # adamw's optimum is at 10^-2.5: from [1e-4, 1e-3] the half-step above the edge reaches it,
    # the one above that makes it interior, the midpoint below 1e-3 densifies
    assert lrs_of(store, "adamw") == pytest.approx([1e-4, 10**-3.5, 1e-3, 10**-2.5, 1e-2])
    # lion (optimum 10^-3.5, a tie of 1e-4 and 1e-3 on its one-decade grid): the midpoints
    # around its best point, one of them the optimum
    lion = [1e-5, 10**-4.5, 1e-4, 10**-3.5, 1e-3, 1e-2]
    assert lrs_of(store, "lion") == pytest.approx(lion)
    # sgd: 100 diverges (counts as worse), so the optimum moves to the midpoint below it
    assert lrs_of(store, "sgd") == pytest.approx([10**-2.5, 0.1, 10**0.5, 100.0])
    assert sum(m.label == "sgd-momentum" for m in store.members()) == 2  # no lr grid: left alone

    analysis = analyze_store(tmp_path)
    for s in analysis.series:
        lrs = [p.x for p in s.curve]
        assert min(lrs) < s.best_lr < max(lrs), s.name  # the report sees the interior optimum
        i = lrs.index(s.best_lr)
        step = {"adamw": 1.0, "lion": 1.0, "sgd": 3.0}[s.label]
        for j in (i - 1, i + 1):
            assert abs(math.log10(lrs[j] / s.best_lr)) <= step / 2 + 1e-6
    best = {s.label: s.best_lr for s in analysis.series}
    assert best["adamw"] == pytest.approx(10**-2.5) and best["sgd"] == pytest.approx(10**0.5)
    assert best["lion"] == pytest.approx(10**-3.5)
    adamw = next(s for s in analysis.series if s.label == "adamw")
    assert adamw.best_loss == pytest.approx(toy.expected_loss("adamw", 10**-2.5))

    before = finishes(store)
    assert all(n == 1 for n in before.values())
    again = refine.refine_sweep(store, spec, InProcess())
    assert again.added == 0 and again.rounds == 0 and again.plan.settled
    assert finishes(store) == before  # nothing ran again


def test_an_interrupted_refinement_continues_where_it_was(tmp_path):
    spec = parse_spec(SPEC)
    whole = Store(tmp_path / "whole")
    refine.refine_sweep(whole, spec, InProcess())

    parts = Store(tmp_path / "parts")
    for stop in (7, 3, 2):  # Ctrl-C after a few submits, three times
        with pytest.raises(KeyboardInterrupt):
            refine.refine_sweep(parts, spec, InProcess(stop_after=stop))
    refine.refine_sweep(parts, spec, InProcess())
    # the same runs with the same results, each run once
    assert {r.id: r.final_val_loss for r in parts.runs()} == {
        r.id: r.final_val_loss for r in whole.runs()
    }
    assert all(n == 1 for n in finishes(parts).values())
    assert {r.status for r in parts.runs()} <= {"done", "diverged"}


def test_max_rounds_stops_and_the_next_call_continues(tmp_path):
    spec = parse_spec(SPEC)
    store = Store(tmp_path)
    first = refine.refine_sweep(store, spec, InProcess(), max_rounds=1)
    assert first.rounds == 1 and not first.plan.settled
    rest = refine.refine_sweep(store, spec, InProcess())
    assert rest.plan.settled and rest.rounds >= 1
    assert lrs_of(store, "adamw") == pytest.approx([1e-4, 10**-3.5, 1e-3, 10**-2.5, 1e-2])


def test_a_refinement_under_another_base_is_not_this_series(tmp_path):
    store = Store(tmp_path)
    refine.refine_sweep(store, parse_spec(SPEC), InProcess())
    longer = parse_spec(SPEC, overrides=["steps=20"])
    series = {s.name: s for s in refine.series_of(longer, store)}
    assert series["adamw"].lrs == [1e-4, 1e-3]  # the spec's own values only


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "optarena", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


def test_sweep_refine_command(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text('[base]\nsteps = 10\n[[grid]]\noptimizer = "adamw"\nlr = [1e-4, 1e-3]\n')
    out = tmp_path / "out"
    common = [str(spec), "--out", str(out), "--function", TOY]
    proc = cli("sweep", *common, "--refine", "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "refine round 1: adamw: + lr 0.000316, 0.00316" in proc.stderr
    assert "refine round 2: adamw: + lr 0.01" in proc.stderr
    assert "refined: 3 runs added in 2 rounds" in proc.stderr
    lrs = sorted(r.lr for r in Store(out).runs())
    assert lrs == pytest.approx([1e-4, 10**-3.5, 1e-3, 10**-2.5, 1e-2])
    capsys.readouterr()
    assert main(["sweep", *common, "--refine", "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert "next refinement round adds: nothing" in dry and "0.00316" in dry
    assert main(["sweep", *common, "--refine-rounds", "2"]) == 2
    assert "--refine-rounds needs --refine" in capsys.readouterr().err


def test_lr_preset_sweeps_weight_decay_jointly_with_the_lr(tmp_path):
    from optarena.report import story
    from optarena.sweep.driver import run_sweep
    from optarena.sweep.spec import load_spec

    spec = load_spec("lr")
    for grid in spec.grids:
        assert len(grid.swept["lr"]) >= 5, grid.label
        decays = grid.swept["hparams.weight_decay"]
        assert decays[0] == 0.0 and len(decays) == 2 and decays[1] > 0, grid.label
    store = Store(tmp_path)
    run_sweep(store, spec.runs(), InProcess())
    analysis = analyze_store(tmp_path)
    # one LR series per (optimizer, decay), each over the whole LR grid
    names = {(s.label, s.extra["hparams.weight_decay"]) for s in analysis.series}
    assert names == {(g.label, d) for g in spec.grids for d in g.swept["hparams.weight_decay"]}
    assert all(len(s.curve) == len(spec.grids[0].swept["lr"]) for s in analysis.series[:1])
    assert len(refine.series_of(spec, store)) == len(names)
    # the page's conclusions and speedups compute with two AdamW series
    told = story.tell(analysis, {r.id: r for r in store.runs()})
    assert told.conclusions and "adamw (hparams.weight_decay=0" in " ".join(told.conclusions)
