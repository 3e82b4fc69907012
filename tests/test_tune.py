"""``optarena tune``: coordinate descent over LR, weight decay, beta2 and warmup.

The search is checked on functions whose minimum is known (separable quadratics, a plateau
within the noise), then end to end on the toy training function (``toy_hparams``: quadratic
in each hyperparameter around known optima), in this process and through the command line.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optarena.analysis import analyze_store
from optarena.cli import main
from optarena.report import write_report
from optarena.sweep import toy, tune
from optarena.sweep.executors import Outcome
from optarena.sweep.spec import parse_spec
from optarena.sweep.store import Store
from sweep_cases import TOY, InProcess

SRC = Path(__file__).resolve().parents[1] / "src"

SPEC = """
[sweep]
name = "tuned"
seeds = [0, 1]
[base]
steps = 10
toy_hparams = true
hparams.betas = [0.9, 0.95]
[tune]
tolerance = 0.001
axes = ["lr", "hparams.weight_decay", "hparams.beta2", "warmup"]
[[grid]]
optimizer = "adamw"
lr = {from = 1e-4, to = 1e-1, per_decade = 2}
hparams.weight_decay = [0.0, 0.03, 0.1, 0.3]
hparams.beta2 = [0.9, 0.95, 0.99, 0.999]
warmup = [0.0, 0.05, 0.1, 0.2]
start = {lr = 1e-4, warmup = 0.2}
[[grid]]
optimizer = "lion"
lr = {from = 1e-5, to = 1e-2, per_decade = 2}
hparams.weight_decay = [0.0, 0.1]
"""


def drive(search: tune.CoordinateSearch, loss) -> None:
    """Answer the search's requests with ``loss(point) -> list of seed losses``."""
    while not search.done:
        assert search.wanted
        search.feed(
            {
                i: tune.Evaluation(
                    [x for x in loss(search.point(i)) if math.isfinite(x)],
                    sum(not math.isfinite(x) for x in loss(search.point(i))),
                    [],
                )
                for i in search.wanted
            }
        )


def test_coordinate_descent_finds_the_minimum_of_a_separable_function():
    axes = {"a": list(range(9)), "b": list(range(7)), "c": [0, 1, 2]}
    target = {"a": 6, "b": 1, "c": 2}

    def loss(p):
        return [sum((p[k] - target[k]) ** 2 for k in p) * 0.1]

    search = tune.CoordinateSearch(axes, (0, 6, 0), tolerance=0.01, max_rounds=10)
    drive(search, loss)
    assert search.status == "converged"
    assert search.point(search.incumbent) == target
    # one axis at a time, every move an improvement, each point evaluated once
    moves = [s for s in search.steps if s.moved_to is not None]
    for step in moves:
        changed = [
            k for k, (x, y) in enumerate(zip(step.incumbent, step.moved_to, strict=True)) if x != y
        ]
        assert len(changed) == 1 and search.keys[changed[0]] == step.axis
        assert search.evals[step.moved_to].loss < search.evals[step.incumbent].loss
    assert len(moves) == 6 + 5 + 2
    # the last round moved nothing; every neighbour of the result was looked at
    assert search.rounds[-1] == search.rounds[-2] == search.incumbent
    for axis in range(3):
        for d in (-1, 1):
            j = search.incumbent[axis] + d
            if 0 <= j < len(search.values[axis]):
                inc = search.incumbent
                assert (*inc[:axis], j, *inc[axis + 1 :]) in search.evals


def test_no_move_within_the_noise_and_seed_spread_widens_it():
    axes = {"lr": [1, 2, 3]}
    flat = tune.CoordinateSearch(axes, (1,), tolerance=0.05, max_rounds=5)
    drive(flat, lambda p: [3.0 - 0.04 * (p["lr"] == 3)])  # better by 0.04 < 0.05
    assert flat.status == "converged" and flat.incumbent == (1,)
    assert len(flat.evals) == 3

    # lr=3 is 0.1 better on average, but its same-seed differences are 0.3 and -0.1: twice
    # their standard error is 0.4, so 0.1 is noise
    spread = tune.CoordinateSearch(axes, (1,), tolerance=0.0, max_rounds=5)
    drive(spread, lambda p: [2.8, 3.0] if p["lr"] == 3 else [3.1, 2.9])
    assert spread.incumbent == (1,)
    a, b = tune.Evaluation([3.1, 2.9], 0, []), tune.Evaluation([2.8, 3.0], 0, [])
    assert tune.noise(a, b, 0.0) == pytest.approx(2 * math.sqrt(0.08) / math.sqrt(2))
    assert tune.noise(a, b, 0.5) == 0.5
    # a seed offset common to both points cancels: a consistent 0.1 gain is a move
    paired = tune.CoordinateSearch(axes, (1,), tolerance=0.0, max_rounds=5)
    drive(paired, lambda p: [3.0 - 0.1 * (p["lr"] == 3) + d for d in (-0.2, 0.2)])
    assert paired.incumbent == (2,)
    # a diverged start is worse than anything that trained
    bad = tune.CoordinateSearch(axes, (2,), tolerance=0.01, max_rounds=5)
    drive(bad, lambda p: [math.inf if p["lr"] == 3 else 3.0 + p["lr"]])
    assert bad.incumbent == (0,)


def test_max_rounds_stops_the_search():
    axes = {"a": list(range(5)), "b": list(range(5))}
    # round 1 moves both axes to the minimum; only a second round could confirm it
    search = tune.CoordinateSearch(axes, (0, 0), tolerance=0.0, max_rounds=1)
    drive(search, lambda p: [(p["a"] - 3) ** 2 + (p["b"] - 3) ** 2])
    assert search.status == "max rounds" and search.rounds == [(3, 3)]


def optimum_of(grid, spec):
    """Brute force over the grid's product on the toy's own formula (mean over seeds)."""
    keys = list(grid.swept)
    best = None
    for values in itertools.product(*(grid.swept[k] for k in keys)):
        point = dict(zip(keys, values, strict=True))
        runs = [spec.run_at(grid, point, s) for s in grid.seeds]
        losses = [toy.train(r.config)["final_val_loss"] for r in runs]
        loss = math.inf if None in losses else sum(losses) / len(losses)
        if best is None or loss < best[0]:
            best = (loss, point)
    return best


def finishes(store: Store) -> dict[str, int]:
    counts: dict[str, int] = {}
    for event in store.events():
        if event["event"] == "finish":
            counts[event["run_id"]] = counts.get(event["run_id"], 0) + 1
    return counts


def test_tune_on_the_toy_finds_the_grid_optimum_and_resumes(tmp_path):
    spec = parse_spec(SPEC)
    store = Store(tmp_path / "a")
    path = tmp_path / "a" / "tune" / "tuned.json"
    path.parent.mkdir(parents=True)
    result = tune.tune(store, spec, InProcess(capacity=4), path_file=path)
    for s in result.searches:
        assert s.search.status == "converged"
        loss, point = optimum_of(s.grid, spec)
        assert s.search.point(s.search.incumbent) == point
        assert s.search.evals[s.search.incumbent].loss == pytest.approx(loss)
    adamw = result.searches[0].search
    assert adamw.point(adamw.incumbent) == {
        "lr": pytest.approx(10**-2.5),
        "hparams.weight_decay": 0.1,
        "hparams.beta2": 0.99,
        "warmup": 0.05,
    }
    size = math.prod(len(v) for v in spec.grids[0].swept.values())
    assert len(adamw.evals) < size / 4  # far fewer points than the grid
    assert all(n == 1 for n in finishes(store).values())
    assert len(finishes(store)) == 2 * sum(len(s.search.evals) for s in result.searches)

    # the path file: start, steps, incumbents per round with their losses and runs
    data = json.loads(path.read_text())
    first = data["searches"][0]
    assert first["label"] == "adamw" and first["status"] == "converged"
    assert first["start"]["point"]["lr"] == pytest.approx(1e-4)
    losses = [r["loss"] for r in first["rounds"]]
    assert losses == sorted(losses, reverse=True) and losses[-1] == pytest.approx(
        adamw.evals[adamw.incumbent].loss
    )
    assert all(len(r["run_ids"]) == 2 for r in first["rounds"])
    assert "standard error" in data["noise"]

    # a converged tune runs nothing
    before = finishes(store)
    again = tune.tune(store, spec, InProcess(capacity=4))
    assert again.ran == 0 and finishes(store) == before

    # killed three times on the way, then finished: the same runs, each once, same path
    other = Store(tmp_path / "b")
    for stop in (5, 3, 9):
        with pytest.raises(KeyboardInterrupt):
            tune.tune(other, spec, InProcess(capacity=4, stop_after=stop))
    resumed = tune.tune(other, spec, InProcess(capacity=4))
    assert [s.search.incumbent for s in resumed.searches] == [
        s.search.incumbent for s in result.searches
    ]
    assert {r.id: r.final_val_loss for r in other.runs()} == {
        r.id: r.final_val_loss for r in store.runs()
    }
    assert all(n == 1 for n in finishes(other).values())

    # the report shows the path and keeps tuning runs out of the LR series
    assert analyze_store(tmp_path / "a").series == []
    page = write_report(tmp_path / "a").read_text()
    assert 'id="tuning"' in page and "converged" in page
    assert "the runs of this store are tuning runs" in page
    assert 'id="fig-tuning-0"' in page  # the incumbent's loss after each step, interactive
    for suffix in ("png", "svg"):  # and static, beside the page and linked from its caption
        static = tmp_path / "a" / "report" / f"tuning-paths.{suffix}"
        assert static.stat().st_size > 1000
        assert f'href="tuning-paths.{suffix}"' in page
    assert (tmp_path / "a" / "report" / "tuning-paths.png").read_bytes()[:4] == b"\x89PNG"
    moved = [st for st in first["steps"] if st["moved"]]
    assert moved and all(st["moved_to"]["loss"] < st["incumbent"]["loss"] for st in moved)
    assert "0.99" in page and "warmup" in page


def test_tune_spec_errors():
    with pytest.raises(Exception, match=r"start hparams.weight_decay = 0.2 is not one of"):
        parse_spec(SPEC.replace("start = {lr = 1e-4", 'start = {"hparams.weight_decay" = 0.2'))
    with pytest.raises(Exception, match="start sets 'steps', which the grid does not sweep"):
        parse_spec(SPEC.replace("start = {lr = 1e-4", "start = {steps = 3"))
    bad = parse_spec(SPEC.replace("tolerance = 0.001", "tolerance = -1"))
    with pytest.raises(Exception, match="tolerance must be a number >= 0"):
        tune.settings_of(bad)
    plain = parse_spec('[[grid]]\noptimizer = "adamw"\nlr = [1e-3, 1e-2]\n')
    with pytest.raises(Exception, match=r"no \[tune\] table"):
        tune.settings_of(plain)


def test_the_tune_preset_is_a_tuning_spec():
    from optarena.sweep.spec import load_spec

    spec = load_spec("tune")
    settings = tune.settings_of(spec)
    assert settings.axes == ("lr", "hparams.weight_decay", "hparams.beta2", "warmup")
    for s in tune.searches_of(spec, settings):
        assert list(s.search.keys) == list(settings.axes)
        assert s.search.wanted == [s.search.start]  # it asks for its start point first
        (run,) = s.runs(spec, s.search.start)
        assert run.config["hparams"]["betas"][1] == s.grid.start["hparams.beta2"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "optarena", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )


def test_tune_command(tmp_path, capsys):
    spec = tmp_path / "spec.toml"
    spec.write_text(
        "[base]\nsteps = 10\ntoy_hparams = true\n[tune]\ntolerance = 0.001\n"
        '[[grid]]\noptimizer = "adamw"\nlr = [1e-3, 3.16e-3]\n'
        "hparams.weight_decay = [0.0, 0.1]\nstart = {lr = 1e-3}\n"
    )
    out = tmp_path / "out"
    proc = cli("tune", str(spec), "--out", str(out), "--function", TOY, "--workers", "2")
    assert proc.returncode == 0, proc.stderr
    assert "adamw round 1, lr: 0.001 -> 0.00316" in proc.stderr
    assert "adamw round 2, weight_decay: stays at 0.1" in proc.stderr
    assert "adamw: lr=0.00316 weight_decay=0.1 loss" in proc.stdout and "converged" in proc.stdout
    capsys.readouterr()
    assert main(["tune", str(spec), "--out", str(out), "--function", TOY]) == 0
    assert "ran 0 runs now" in capsys.readouterr().out
    assert main(["sweep", str(spec), "--out", str(out), "--function", TOY]) == 2
    assert "it is a tuning spec; run it with `optarena tune`" in capsys.readouterr().err


def test_tune_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["tune", "tune", "--dry-run", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("base config: batch_size=16, data=builtin")
    assert "adamw axis lr: 0.0001, 0.000316, 0.001, 0.00316" in text  # short numbers
    assert "0.000316227766" not in text
    assert "adamw axis hparams.beta2: 0.9, 0.95, 0.98, 0.99, 0.999" in text
    assert "adamw: round 1, 8 points (first: the start) x 1 seed" in text
    assert "estimated CPU time of round 1's runs without a result: about" in text
    assert not out.exists()

    # over a store, each run shows its status and a finished one costs nothing
    spec = tmp_path / "spec.toml"
    spec.write_text(
        "[base]\nsteps = 10\ntoy_hparams = true\n[tune]\ntolerance = 0.001\n"
        '[[grid]]\noptimizer = "adamw"\nlr = [1e-3, 3.16e-3]\nstart = {lr = 1e-3}\n'
    )
    assert main(["tune", str(spec), "--out", str(out), "--function", TOY]) == 0
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    capsys.readouterr()
    assert main(["tune", str(spec), "--dry-run", "--out", str(out), "--function", TOY]) == 0
    text = capsys.readouterr().out
    assert text.count(" done ") == 2 and "without a result: about 0m00s" in text
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before


def test_a_full_disk_stops_the_tune_and_the_next_call_continues(tmp_path):
    """A run whose worker cannot write (StorageError) stops the whole tune at once, not one
    search after another; with the disk back, the next invocation finishes the same path."""

    class FullDisk(InProcess):
        def wait(self, timeout: float) -> list[Outcome]:
            done, self.queue = self.queue, []
            return [Outcome(t, error="StorageError: no space left on /x; free some") for t in done]

    spec = parse_spec(SPEC)
    store = Store(tmp_path)
    stopped = tune.tune(store, spec, FullDisk(capacity=4))
    assert stopped.storage_error == "no space left on /x; free some"
    assert len(stopped.sweeps) == 1  # no second batch after the failure
    kept = tune.tune(store, spec, InProcess(capacity=4), retry_failed=False)  # --no-retry-failed
    assert kept.ran == 0 and all(s.search.status.startswith("failed") for s in kept.searches)
    done = tune.tune(store, spec, InProcess(capacity=4))
    reference = tune.tune(Store(tmp_path / "ref"), spec, InProcess(capacity=4))
    assert [s.search.incumbent for s in done.searches] == [
        s.search.incumbent for s in reference.searches
    ]
    assert all(s.search.status == "converged" for s in done.searches)
