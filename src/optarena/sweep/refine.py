"""``optarena sweep SPEC --refine``: half-steps around each series' optimum until it is interior.

A *series* is one ``[[grid]]`` that sweeps ``lr`` (two values or more), at one combination of
its other swept values. Its LR grid is the spec's LR values plus those refinement added before:
the store's members of this sweep with the same label and other values whose run id is the one
this spec gives that LR (a refinement made under another ``[base]`` is not this series').

Each round, on the loss of every LR of a series (the mean final validation loss over its seeds;
a point where any seed diverged counts as worse than every point that trained):

- ``step`` is the smallest gap between the spec's own LR values, in decades; ``half = step/2``;
- an optimum at the lowest (highest) LR of its grid adds ``optimum·10^∓half`` beyond it;
- an interior optimum adds the geometric midpoint toward each neighbour farther than ``half``
  (5% slack: a grid written with rounded values, 3.16e-3 for 10^-2.5, has slightly uneven
  steps);
- nothing to add: the series is settled, its optimum interior with neighbours half a step away.

Rounds repeat until every series is settled or ``max_rounds`` is reached. New points are added
to the store (members of this sweep) before they run and run through the same driver, so a
killed refinement reruns nothing stored and continues where it was, and refining a settled
sweep runs nothing. The report sees the denser grid as part of each series.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from optarena.sweep.driver import SweepResult, register_runs, run_sweep
from optarena.sweep.executors import Executor
from optarena.sweep.progress import point_text, short_value
from optarena.sweep.spec import Grid, Run, SweepSpec, rounded
from optarena.sweep.store import Store

LR_KEY = "lr"
DEFAULT_ROUNDS = 8
# Two LRs closer than this (in decades) are the same point.
_SAME = 1e-6
# A gap up to this much over half a step counts as half a step: grids are written with rounded
# values (3.16e-3 for 10^-2.5), so their steps differ by a fraction of a percent.
_SLACK = 0.05


@dataclass
class Series:
    """One grid at one combination of its other swept values: the unit refinement works on."""

    grid: Grid
    others: dict[str, Any]  # swept keys other than lr -> value
    spec_lrs: list[float]
    step: float  # smallest gap between the spec's LR values, in decades
    lrs: list[float] = field(default_factory=list)  # spec + stored refinements, sorted

    @property
    def name(self) -> str:
        return point_text(self.grid.label, self.others)

    def point(self, lr: float) -> dict[str, Any]:
        return {k: lr if k == LR_KEY else self.others[k] for k in self.grid.swept}

    def runs(self, spec: SweepSpec, lr: float) -> list[Run]:
        return [spec.run_at(self.grid, self.point(lr), seed) for seed in self.grid.seeds]


@dataclass
class Addition:
    """LRs a round adds to one series, and their runs (every seed of the grid)."""

    series: Series
    lrs: list[float]
    runs: list[Run]


@dataclass
class Plan:
    """What the next round adds; series that cannot be refined yet, with the reason."""

    additions: list[Addition]
    blocked: list[tuple[str, str]]  # (series name, why)

    @property
    def settled(self) -> bool:
        return not self.additions


@dataclass
class RefineResult:
    """What one ``--refine`` invocation did, over all its rounds."""

    rounds: int  # rounds that added points
    added: int  # runs added by this invocation
    sweeps: list[SweepResult]
    plan: Plan  # what is left (empty additions: every refinable series settled)

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.sweeps)


def next_lrs(curve: Mapping[float, float], step: float) -> list[float]:
    """LRs to add to a series whose points give ``curve`` (LR -> loss, ``inf``: diverged).

    ``step`` is the series' grid step in decades. Empty when the optimum is interior with both
    neighbours within half a step, or when no point trained (there is no optimum to refine)."""
    finite = {x: y for x, y in curve.items() if math.isfinite(y)}
    if not finite or step <= 0:
        return []
    xs = sorted(curve)
    best = min(sorted(finite), key=lambda x: finite[x])
    i = xs.index(best)
    half = step / 2.0
    limit = half * (1.0 + _SLACK)
    out = []
    if i == 0:
        out.append(best * 10**-half)
    elif math.log10(best / xs[i - 1]) > limit:
        out.append(math.sqrt(best * xs[i - 1]))
    if i == len(xs) - 1:
        out.append(best * 10**half)
    elif math.log10(xs[i + 1] / best) > limit:
        out.append(math.sqrt(best * xs[i + 1]))
    return [rounded(x) for x in out]


def series_of(spec: SweepSpec, store: Store | None = None) -> list[Series]:
    """Every refinable series of ``spec``, with the LRs refinement stored for it before."""
    members = store.members() if store is not None else []
    out = []
    for grid in spec.grids:
        lrs = [float(x) for x in grid.swept.get(LR_KEY, []) if _positive(x)]
        if len(lrs) < 2:
            continue
        logs = sorted(math.log10(x) for x in lrs)
        step = min(b - a for a, b in itertools.pairwise(logs))
        keys = [k for k in grid.swept if k != LR_KEY]
        for values in itertools.product(*(grid.swept[k] for k in keys)):
            series = Series(grid, dict(zip(keys, values, strict=True)), lrs, step)
            series.lrs = sorted(set(lrs) | set(_stored_lrs(spec, series, members)))
            out.append(series)
    return out


def _stored_lrs(spec: SweepSpec, series: Series, members: Sequence[Any]) -> list[float]:
    """LRs of earlier refinements of this very series (same sweep, label, values and config)."""
    out = []
    for m in members:
        lr = m.point.get(LR_KEY)
        if m.sweep != spec.name or m.label != series.grid.label or not _positive(lr):
            continue
        if {k: v for k, v in m.point.items() if k != LR_KEY} != series.others:
            continue
        if m.run_id in {r.id for r in series.runs(spec, float(lr))}:
            out.append(float(lr))
    return out


def all_runs(spec: SweepSpec, series: Sequence[Series]) -> list[Run]:
    """The spec's runs and every refinement run so far (spec order, then refinements by LR)."""
    runs = spec.runs()
    known = {r.id for r in runs}
    for s in series:
        for lr in s.lrs:
            runs.extend(r for r in s.runs(spec, lr) if r.id not in known)
    return runs


def plan(spec: SweepSpec, store: Store) -> Plan:
    """The next round's additions from what the store holds now."""
    records = {r.id: r for r in store.runs()}
    additions, blocked = [], []
    for series in series_of(spec, store):
        curve: dict[float, float] = {}
        waiting = None
        for lr in series.lrs:
            states = [records.get(r.id) for r in series.runs(spec, lr)]
            if any(s is None or s.status not in ("done", "diverged") for s in states):
                bad = [s for s in states if s is not None and s.status == "failed"]
                waiting = "has failed runs" if bad else "has runs without a result"
                continue
            losses = [s.final_val_loss for s in states if s.status == "done"]
            diverged = len(losses) < len(states) or any(
                x is None or not math.isfinite(x) for x in losses
            )
            curve[lr] = math.inf if diverged else math.fsum(losses) / len(losses)
        if waiting is not None:
            blocked.append((series.name, waiting))
            continue
        if curve and not any(math.isfinite(y) for y in curve.values()):
            blocked.append((series.name, "no LR of its grid trained"))
            continue
        lrs = [x for x in next_lrs(curve, series.step) if not _known(x, series.lrs)]
        if lrs:
            runs = [r for lr in lrs for r in series.runs(spec, lr)]
            additions.append(Addition(series, lrs, runs))
    return Plan(additions, blocked)


def refine_sweep(
    store: Store,
    spec: SweepSpec,
    executor: Executor,
    *,
    max_rounds: int = DEFAULT_ROUNDS,
    retry_failed: bool = True,
    on_round: Callable[[int, Plan], None] | None = None,
) -> RefineResult:
    """Run the spec, then add half-steps round by round until every series is settled (or
    ``max_rounds`` rounds added points); the executor is closed at the end."""
    sweeps: list[SweepResult] = []
    added = rounds = 0
    try:
        while True:
            runs = all_runs(spec, series_of(spec, store))
            sweeps.append(
                run_sweep(
                    store,
                    runs,
                    executor,
                    sweep=spec.name,
                    retry_failed=retry_failed,
                    close_executor=False,
                )
            )
            step = plan(spec, store)
            if step.settled or rounds >= max_rounds or sweeps[-1].storage_error:
                return RefineResult(rounds, added, sweeps, step)
            rounds += 1
            if on_round is not None:
                on_round(rounds, step)
            added += register_runs(store, [r for a in step.additions for r in a.runs], spec.name)
    finally:
        executor.close()


def describe(addition: Addition) -> str:
    """``adamw: + lr 0.00178, 0.00562``"""
    return f"{addition.series.name}: + lr " + ", ".join(short_value(x) for x in addition.lrs)


def _known(lr: float, lrs: Sequence[float]) -> bool:
    return any(abs(math.log10(lr / x)) < _SAME for x in lrs)


def _positive(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
