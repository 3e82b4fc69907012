"""``optarena tune SPEC``: per-optimizer coordinate descent over the axes each grid sweeps.

A tuning spec is a sweep spec with a ``[tune]`` table. Each ``[[grid]]`` is one search; its
swept keys (lists or ranges: ``lr``, ``hparams.weight_decay``, ``hparams.beta2``, ``warmup``...)
are the axes, in ``[tune] axes`` order, and the search never leaves their values. It starts at
the grid's ``start`` values (default: the middle value of each axis) and, round after round,
walks one axis at a time: it evaluates the incumbent's neighbours on that axis (the adjacent
values), moves to the better one when it beats the incumbent by more than the noise, and keeps
going in that direction while that holds; then the next axis. A round in which no axis moved
ends the search (converged); so does ``max_rounds``.

Noise model. A point's loss is the mean final validation loss over the grid's seeds; a point
where any seed diverged has loss ``inf`` (worse than every point that trained). A neighbour
replaces the incumbent only when its loss is lower by more than ``max(tolerance, 2·sd(d)/√n)``:
the spec's ``tolerance`` in nats (default 0.01), or, with two seeds or more, twice the standard
error of the mean same-seed difference ``d`` between the two points (every point runs the same
seeds, so they pair up), whichever is larger.

Resumable: the search is a deterministic function of the results, so every invocation replays
it from the store, taking stored results as they are and running only the points it reaches
that have none (all searches' missing points go out as one batch). A killed tune continues
where it was and never reruns a stored run; a converged tune runs nothing. Runs are members of
the sweep ``tune:NAME``; the path (every step, and the incumbent after each round) is written
to ``DIR/tune/NAME.json`` after every batch, and the report shows it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optarena import atomic
from optarena.errors import UserError
from optarena.sweep.driver import SweepResult, run_sweep
from optarena.sweep.executors import Executor
from optarena.sweep.progress import short_value
from optarena.sweep.spec import Grid, Run, SweepSpec
from optarena.sweep.store import FINISHED, TUNE_PREFIX, RunRecord, Store

TUNE_KEYS = frozenset({"tolerance", "axes", "max_rounds"})
DEFAULT_TOLERANCE = 0.01
DEFAULT_ROUNDS = 10

Index = tuple[int, ...]  # one value index per axis


@dataclass(frozen=True)
class TuneSettings:
    """The ``[tune]`` table."""

    tolerance: float = DEFAULT_TOLERANCE
    axes: tuple[str, ...] = ()  # axis order (keys not listed follow in grid order)
    max_rounds: int = DEFAULT_ROUNDS


def settings_of(spec: SweepSpec) -> TuneSettings:
    """The validated ``[tune]`` table of a spec (a UserError naming the key when it is wrong)."""
    table = spec.extra.get("tune")
    if table is None:
        raise UserError(
            f"{spec.source}: no [tune] table; add one (e.g. [tune] tolerance = 0.01) to tune "
            "with this spec, or run it with `optarena sweep`"
        )
    for key in table:
        if key not in TUNE_KEYS:
            raise UserError(
                f"{spec.source}: [tune] has unknown key {key!r}; allowed: "
                f"{', '.join(sorted(TUNE_KEYS))}"
            )
    tolerance = table.get("tolerance", DEFAULT_TOLERANCE)
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or tolerance < 0:
        raise UserError(f"{spec.source}: [tune] tolerance must be a number >= 0 (nats)")
    axes = table.get("axes", [])
    if not isinstance(axes, list) or not all(isinstance(a, str) for a in axes):
        raise UserError(f'{spec.source}: [tune] axes must be a list of keys, e.g. ["lr"]')
    rounds = table.get("max_rounds", DEFAULT_ROUNDS)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise UserError(f"{spec.source}: [tune] max_rounds must be a whole number >= 1")
    for grid in spec.grids:
        if not grid.swept:
            raise UserError(
                f"{spec.source}: [[grid]] #{grid.index + 1} ({grid.label}) sweeps nothing: give "
                "each axis to tune a list or range of values"
            )
    return TuneSettings(float(tolerance), tuple(axes), rounds)


def axes_of(grid: Grid, settings: TuneSettings) -> list[str]:
    """The grid's swept keys, in ``[tune] axes`` order first."""
    listed = [a for a in settings.axes if a in grid.swept]
    return listed + [k for k in grid.swept if k not in listed]


@dataclass
class Evaluation:
    """One point of a search: its runs' losses over the seeds."""

    losses: list[float]
    n_diverged: int
    run_ids: list[str]
    failed: str | None = None  # the error of a run that failed

    @property
    def loss(self) -> float:
        if self.n_diverged or not self.losses:
            return math.inf
        return math.fsum(self.losses) / len(self.losses)


def noise(a: Evaluation, b: Evaluation, tolerance: float) -> float:
    """How much better ``b`` must be than ``a`` to count: the noise model of the module doc.

    Both points ran the grid's seeds in the same order, so the seeds pair up: the standard
    error is that of the mean same-seed difference (what a seed changes, the initialisation
    and the data order, moves both points alike and cancels)."""
    n = len(a.losses)
    if n >= 2 and len(b.losses) == n:
        diffs = [x - y for x, y in zip(a.losses, b.losses, strict=True)]
        return max(tolerance, 2.0 * statistics.stdev(diffs) / math.sqrt(n))
    return tolerance


@dataclass
class Step:
    """One look at the incumbent's neighbours along one axis."""

    round: int
    axis: str
    incumbent: Index
    candidates: list[Index]
    moved_to: Index | None


class CoordinateSearch:
    """Coordinate descent on one grid; a generator underneath, driven by results.

    ``wanted`` lists the points whose evaluations it needs next; :meth:`feed` gives them and
    advances to the next request (or to the end: ``done``)."""

    def __init__(
        self, axes: Mapping[str, Sequence[Any]], start: Index, tolerance: float, max_rounds: int
    ) -> None:
        self.keys = list(axes)
        self.values = [list(axes[k]) for k in self.keys]
        self.tolerance = tolerance
        self.max_rounds = max_rounds
        self.evals: dict[Index, Evaluation] = {}
        self.steps: list[Step] = []
        self.rounds: list[Index] = []  # the incumbent after each round
        self.start = start
        self.incumbent = start
        self.status = "running"  # converged | max rounds | failed: ...
        self.wanted: list[Index] = []
        self._gen = self._search()
        self._advance(None)

    @property
    def done(self) -> bool:
        return self.status != "running"

    def point(self, index: Index) -> dict[str, Any]:
        return {k: self.values[a][i] for a, (k, i) in enumerate(zip(self.keys, index, strict=True))}

    def feed(self, evals: Mapping[Index, Evaluation]) -> None:
        self.evals.update(evals)
        self._advance(None)

    def _advance(self, value: None) -> None:
        try:
            self.wanted = self._gen.send(value)
        except StopIteration:
            self.wanted = []

    def _need(self, points: Iterable[Index]) -> Generator[list[Index], None, bool]:
        """Wait for ``points``; False when one of them has a failed run (the search stops)."""
        missing = [p for p in points if p not in self.evals]
        if missing:
            yield missing
        failed = next((self.evals[p].failed for p in points if self.evals[p].failed), None)
        if failed:
            self.status = f"failed: {failed}"
            return False
        return True

    def _search(self) -> Generator[list[Index], None, None]:
        if not (yield from self._need([self.incumbent])):
            return
        for number in range(1, self.max_rounds + 1):
            moved = False
            for axis in range(len(self.keys)):
                direction = 0
                while True:
                    here = self.incumbent
                    cands = [
                        (*here[:axis], here[axis] + d, *here[axis + 1 :])
                        for d in (-1, 1)
                        if direction in (0, d) and 0 <= here[axis] + d < len(self.values[axis])
                    ]
                    if not cands:
                        break
                    if not (yield from self._need(cands)):
                        return
                    best = min(cands, key=lambda p: self.evals[p].loss)
                    gain = self.evals[here].loss - self.evals[best].loss
                    better = gain > noise(self.evals[here], self.evals[best], self.tolerance)
                    self.steps.append(
                        Step(number, self.keys[axis], here, cands, best if better else None)
                    )
                    if not better:
                        break
                    self.incumbent, moved = best, True
                    direction = best[axis] - here[axis]
            self.rounds.append(self.incumbent)
            if not moved:
                self.status = "converged"
                return
        self.status = "max rounds"


def first_round(search: CoordinateSearch) -> list[Index]:
    """The points round 1 evaluates when no axis moves: the start, then its neighbours on each
    axis in turn (a move adds the next value in its direction and shifts later axes' looks)."""
    start = search.start
    out = [start]
    for axis, values in enumerate(search.values):
        for d in (-1, 1):
            if 0 <= start[axis] + d < len(values):
                out.append((*start[:axis], start[axis] + d, *start[axis + 1 :]))
    return out


@dataclass
class GridSearch:
    """A search and the grid it tunes."""

    grid: Grid
    search: CoordinateSearch

    def runs(self, spec: SweepSpec, index: Index) -> list[Run]:
        point = self.search.point(index)
        return [spec.run_at(self.grid, point, seed) for seed in self.grid.seeds]


def searches_of(spec: SweepSpec, settings: TuneSettings) -> list[GridSearch]:
    out = []
    for grid in spec.grids:
        keys = axes_of(grid, settings)
        axes = {k: grid.swept[k] for k in keys}
        start = tuple(
            axes[k].index(grid.start[k]) if k in grid.start else (len(axes[k]) - 1) // 2
            for k in keys
        )
        search = CoordinateSearch(axes, start, settings.tolerance, settings.max_rounds)
        out.append(GridSearch(grid, search))
    return out


def evaluation(runs: Sequence[Run], records: Mapping[str, RunRecord]) -> Evaluation | None:
    """The point's evaluation from stored results, or None while a run has none."""
    losses, diverged, failed = [], 0, None
    for run in runs:
        rec = records.get(run.id)
        if rec is None:
            return None
        if rec.status == "failed":
            failed = f"run {run.id} failed: {rec.error}"
        elif rec.status not in FINISHED:
            return None
        elif rec.status == "diverged" or rec.final_val_loss is None:
            diverged += 1
        else:
            losses.append(rec.final_val_loss)
    return Evaluation(losses, diverged, [r.id for r in runs], failed)


@dataclass
class TuneResult:
    searches: list[GridSearch]
    sweeps: list[SweepResult] = field(default_factory=list)

    @property
    def failed(self) -> int:
        return sum(r.failed for r in self.sweeps)

    @property
    def storage_error(self) -> str | None:
        return next((r.storage_error for r in self.sweeps if r.storage_error), None)

    @property
    def ran(self) -> int:
        return sum(r.done + r.diverged + r.failed for r in self.sweeps)

    @property
    def unfinished(self) -> bool:
        """Some search is still running (another live process holds its next runs)."""
        return any(not s.search.done for s in self.searches)


def tune(
    store: Store,
    spec: SweepSpec,
    executor: Executor,
    *,
    settings: TuneSettings | None = None,
    path_file: Path | None = None,
    on_step: Callable[[GridSearch, Step], None] | None = None,
    retry_failed: bool = True,
) -> TuneResult:
    """Replay every search from the store, running the points it reaches without a result,
    until each search has converged, hit ``max_rounds`` or met a failed run. The executor is
    closed at the end; the path is written to ``path_file`` after every batch."""
    settings = settings or settings_of(spec)
    searches = searches_of(spec, settings)
    result = TuneResult(searches)
    attempted: set[str] = set()  # a failed run is retried once per invocation
    shown = dict.fromkeys((id(s) for s in searches), 0)
    try:
        while True:
            records = {r.id: r for r in store.runs()}
            _replay(spec, searches, records, attempted if retry_failed else None)
            if on_step is not None:
                for s in searches:
                    for step in s.search.steps[shown[id(s)] :]:
                        on_step(s, step)
                    shown[id(s)] = len(s.search.steps)
            if path_file is not None:
                atomic.write_json(path_file, path_json(spec, settings, searches, records))
            batch = [
                run
                for s in searches
                if not s.search.done
                for index in s.search.wanted
                for run in s.runs(spec, index)
            ]
            if not batch:
                return result
            attempted.update(r.id for r in batch)
            ran = run_sweep(
                store,
                batch,
                executor,
                sweep=TUNE_PREFIX + spec.name,
                retry_failed=retry_failed,
                close_executor=False,
            )
            result.sweeps.append(ran)
            if ran.storage_error:  # a full disk or read-only folder fails every run after it
                return result
            if ran.held_elsewhere and not ran.done + ran.diverged + ran.failed:
                return result  # another live process holds what comes next: re-run later
    finally:
        executor.close()


def _replay(
    spec: SweepSpec,
    searches: Sequence[GridSearch],
    records: Mapping[str, RunRecord],
    attempted: set[str] | None,
) -> None:
    """Advance every search as far as stored results go. A failed run counts as failed once
    this invocation has retried it (``attempted``), at once when failures are not retried
    (``attempted=None``)."""
    for s in searches:
        while not s.search.done and s.search.wanted:
            ready = {}
            for index in s.search.wanted:
                runs = s.runs(spec, index)
                ev = evaluation(runs, records)
                retry = attempted is not None and not attempted & {r.id for r in runs}
                if ev is None or (ev.failed and retry):
                    break  # no result yet, or a failure from before: run (retry) it
                ready[index] = ev
            else:
                s.search.feed(ready)
                continue
            break


def path_json(
    spec: SweepSpec,
    settings: TuneSettings,
    searches: Sequence[GridSearch],
    records: Mapping[str, RunRecord],
) -> dict[str, Any]:
    """The path of every search, as ``DIR/tune/NAME.json`` keeps it for the report."""

    def ev(search: CoordinateSearch, index: Index) -> dict[str, Any]:
        e = search.evals.get(index)
        loss = None if e is None or not math.isfinite(e.loss) else e.loss
        return {
            "point": search.point(index),
            "loss": loss,
            "diverged": bool(e and e.n_diverged),
            "seeds": len(e.losses) if e else 0,
            "run_ids": e.run_ids if e else [],
        }

    out = []
    for s in searches:
        q = s.search
        out.append(
            {
                "label": s.grid.label,
                "optimizer": s.grid.optimizer,
                "axes": {k: list(v) for k, v in zip(q.keys, q.values, strict=True)},
                "status": q.status,
                "evaluated": len(q.evals),
                "runs": sum(len(e.run_ids) for e in q.evals.values()),
                "start": ev(q, q.start),
                "steps": [
                    {
                        "round": st.round,
                        "axis": st.axis,
                        "incumbent": ev(q, st.incumbent),
                        "candidates": [ev(q, c) for c in st.candidates],
                        "moved": st.moved_to is not None,
                        "moved_to": None if st.moved_to is None else ev(q, st.moved_to),
                    }
                    for st in q.steps
                ],
                "rounds": [{"round": i + 1, **ev(q, inc)} for i, inc in enumerate(q.rounds)],
                "incumbent": ev(q, q.incumbent),
            }
        )
    return {
        "sweep": spec.name,
        "tolerance": settings.tolerance,
        "noise": noise_text(settings.tolerance),
        "searches": out,
    }


def noise_text(tolerance: float) -> str:
    return (
        f"a neighbour replaces the incumbent when its mean loss is lower by more than "
        f"max({tolerance:g} nats, 2 × the standard error of the mean same-seed difference "
        "between the two points when they have two seeds or more); a point where a seed "
        "diverged counts as worse than every point that trained"
    )


def describe(search: GridSearch, step: Step) -> str:
    """``adamw round 1, lr: 0.001 -> 0.00316 (3.4525 -> 3.0525)``"""
    q = search.search
    here = q.evals[step.incumbent].loss
    value = short_value(q.point(step.incumbent)[step.axis])
    name = step.axis.rsplit(".", 1)[-1]
    if step.moved_to is None:
        tried = ", ".join(short_value(q.point(c)[step.axis]) for c in step.candidates)
        return (
            f"{search.grid.label} round {step.round}, {name}: stays at {value} ({here:.4f}; "
            f"tried {tried})"
        )
    to = short_value(q.point(step.moved_to)[step.axis])
    return (
        f"{search.grid.label} round {step.round}, {name}: {value} -> {to} "
        f"({here:.4f} -> {q.evals[step.moved_to].loss:.4f})"
    )


def read_paths(directory: str | Path) -> list[dict[str, Any]]:
    """Every ``DIR/tune/*.json`` path file (the report's input), by name."""
    import json

    folder = Path(directory) / "tune"
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and isinstance(data.get("searches"), list):
            out.append(data)
    return out
