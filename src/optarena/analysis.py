"""Stability analysis of a sweep: best loss, LR-basin width, divergence, sensitivity, tests.

Everything here works on plain numbers read from the results store (no torch), so a report can
be made on a laptop from a store copied off a cluster. The definitions are written out in
``docs/analysis.md``; the functions below are their executable form:

- a *series* is one optimizer (grid label) at one model size, with every swept value other than
  the LR and the seed held fixed; its *LR curve* has one point per learning rate;
- a point's loss is the mean final validation loss over its seeds; a point where any seed
  diverged counts as diverged (loss +inf): a stable LR is one where every seed trained;
- the *basin width* at tolerance tau is how many decades of LR around the best point keep the
  loss within tau of the best, with the crossing interpolated linearly on log10(LR).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import scipy.stats

from optarena.tasks import task_of_run

DEFAULT_TAUS = (0.01, 0.05, 0.1)
SEED_KEY = "seed"
LR_KEY = "lr"


@dataclass
class Observation:
    """One run as the analysis sees it: where it sits in a sweep and how it ended."""

    run_id: str
    label: str
    model: str
    optimizer: str
    point: dict[str, Any]  # swept values (dotted keys), seed excluded
    seed: int
    status: str  # done | diverged | failed | pending | running
    final_val_loss: float | None = None
    eval_curve: list[list[float]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    task: str = "train"  # the kind of run (optarena.tasks): what its val_loss is

    @property
    def diverged(self) -> bool:
        return self.status == "diverged"

    @property
    def finished(self) -> bool:
        return self.status in ("done", "diverged")


@dataclass
class CurvePoint:
    """One x value of a curve (an LR or a hyperparameter value), over its seeds."""

    x: Any
    losses: list[float]  # final losses of the seeds that trained
    n_diverged: int
    run_ids: list[str]
    seeds: list[int] = field(default_factory=list)  # the seed of each loss in ``losses``

    @property
    def diverged(self) -> bool:
        return self.n_diverged > 0

    @property
    def loss(self) -> float:
        """Mean over seeds; +inf when any seed diverged."""
        if self.diverged or not self.losses:
            return math.inf
        return statistics.fmean(self.losses)


@dataclass
class Basin:
    """The LR interval around the optimum whose loss stays within ``tau`` of the best."""

    tau: float
    width: float  # decades of LR
    lr_low: float
    lr_high: float
    censored: bool  # the basin reaches the edge of the grid: the true width is at least this


@dataclass
class SeriesResult:
    """Everything the report says about one optimizer at one model size."""

    model: str
    label: str
    optimizer: str
    extra: dict[str, Any]
    curve: list[CurvePoint]
    best_lr: float | None
    best_loss: float | None
    best_interval: tuple[float, float] | None
    best_losses: list[float]
    best_run_ids: list[str]
    basins: dict[float, Basin]
    divergence_rate: float
    n_runs: int
    n_failed: int
    state_bytes_per_param: float | None
    tokens_per_second: float | None
    # fine-tuning runs: exact-match accuracy at the best LR (mean over its seeds), and the
    # validation loss of the model they started from
    exact_match: float | None = None
    start_loss: float | None = None
    # RLHF runs (whose val_loss is the negative held-out reward): the mean final reward at the
    # best LR and the reward of the model they started from
    reward: float | None = None
    start_reward: float | None = None
    task: str = "train"  # the kind of run (optarena.tasks): what ``best_loss`` measures

    @property
    def name(self) -> str:
        if not self.extra:
            return self.label
        return self.label + " (" + ", ".join(f"{k}={_fmt(v)}" for k, v in self.extra.items()) + ")"

    def aligned(self) -> list[tuple[float, float]]:
        """``(lr / best_lr, loss)`` per point: the study's optimum-aligned curve."""
        if not self.best_lr:
            return []
        return [(p.x / self.best_lr, p.loss) for p in self.curve]


@dataclass
class Sensitivity:
    """A 1-D sweep of one hyperparameter (other than the LR) for one series."""

    model: str
    label: str
    key: str
    curve: list[CurvePoint]
    best_value: Any
    best_loss: float | None
    spread: float | None  # worst minus best loss among values that trained
    n_diverged: int  # values at which some seed diverged
    task: str = "train"


@dataclass
class Comparison:
    """Two series of one model size compared at their own best LRs."""

    model: str
    a: str
    b: str
    difference: float  # best loss of a minus best loss of b (negative: a is better)
    t: float | None
    dof: float | None
    p_value: float | None  # Welch's two-sided t-test; None below 2 seeds on either side
    task: str = "train"  # of both series


@dataclass
class Analysis:
    series: list[SeriesResult]
    sensitivities: list[Sensitivity]
    comparisons: list[Comparison]
    taus: tuple[float, ...]

    def models(self) -> list[str]:
        return sorted({s.model for s in self.series} | {s.model for s in self.sensitivities})


# --------------------------------------------------------------------------- statistics


def mean_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float] | None:
    """Student-t confidence interval of the mean; None with fewer than two values."""
    n = len(values)
    if n < 2:
        return None
    mean = statistics.fmean(values)
    half = scipy.stats.t.ppf(0.5 + level / 2.0, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return (mean - float(half), mean + float(half))


def welch_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float, float] | None:
    """Welch's unequal-variance t-test: ``(t, dof, two-sided p)``; None below 2 values a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.fmean(a) - statistics.fmean(b)
    if va + vb == 0.0:
        if diff == 0.0:
            return (0.0, float(len(a) + len(b) - 2), 1.0)
        return (math.copysign(math.inf, diff), float(len(a) + len(b) - 2), 0.0)
    result = scipy.stats.ttest_ind(a, b, equal_var=False)
    return (float(result.statistic), float(result.df), float(result.pvalue))


# ------------------------------------------------------------------------------ curves


def basin_width(lrs: Sequence[float], losses: Sequence[float], tau: float) -> Basin | None:
    """Decades of LR around the best point whose loss stays within ``tau`` of the best.

    ``losses`` may hold ``inf`` for diverged points. Between a point inside the basin and one
    outside, the edge is placed where the straight line between them on (log10 LR, loss) crosses
    best + tau; next to a diverged point the edge is the last point that trained (nothing is
    known in between). Only the contiguous interval containing the best point counts. When the
    basin runs to the end of the grid it is cut there and marked ``censored``.
    """
    pts = sorted(zip(lrs, losses, strict=True))
    finite = [i for i, (_, y) in enumerate(pts) if math.isfinite(y)]
    if not finite:
        return None
    best = min(finite, key=lambda i: pts[i][1])
    limit = pts[best][1] + tau
    xs = [math.log10(x) for x, _ in pts]
    ys = [y for _, y in pts]

    def edge(step: int) -> tuple[float, bool]:
        i = best
        while 0 <= i + step < len(pts) and ys[i + step] <= limit:
            i += step
        j = i + step
        if not 0 <= j < len(pts):
            return xs[i], True
        if not math.isfinite(ys[j]):
            return xs[i], False
        frac = (limit - ys[i]) / (ys[j] - ys[i])
        return xs[i] + frac * (xs[j] - xs[i]), False

    lo, lo_cut = edge(-1)
    hi, hi_cut = edge(+1)
    return Basin(tau, hi - lo, 10**lo, 10**hi, lo_cut or hi_cut)


def build_curve(observations: Iterable[Observation], key: str) -> list[CurvePoint]:
    """Group finished runs by the value of ``key`` (``lr`` or a swept key), sorted by value."""
    groups: dict[str, CurvePoint] = {}
    for obs in observations:
        if not obs.finished:
            continue
        x = obs.point[key]
        point = groups.setdefault(_key(x), CurvePoint(x, [], 0, []))
        point.run_ids.append(obs.run_id)
        if obs.diverged or obs.final_val_loss is None or not math.isfinite(obs.final_val_loss):
            point.n_diverged += 1
        else:
            point.losses.append(obs.final_val_loss)
            point.seeds.append(obs.seed)
    return sorted(groups.values(), key=lambda p: _sort_key(p.x))


def best_point(curve: Sequence[CurvePoint]) -> CurvePoint | None:
    """The point with the lowest mean loss among those where every seed trained."""
    usable = [p for p in curve if math.isfinite(p.loss)]
    return min(usable, key=lambda p: p.loss) if usable else None


# ---------------------------------------------------------------------------- analysis


def analyze(observations: Iterable[Observation], taus: Sequence[float] = DEFAULT_TAUS) -> Analysis:
    """Series, 1-D sensitivities and pairwise comparisons of every run in a sweep."""
    obs = list(observations)
    taus = tuple(taus)
    lr_groups: dict[tuple[Any, ...], list[Observation]] = defaultdict(list)
    sens_groups: dict[tuple[Any, ...], list[Observation]] = defaultdict(list)
    for o in obs:
        if LR_KEY in o.point:
            extra = {k: v for k, v in sorted(o.point.items()) if k != LR_KEY}
            lr_groups[(o.model, o.task, o.label, _key(extra))].append(o)
        elif len(o.point) == 1:
            (key,) = o.point
            sens_groups[(o.model, o.task, o.label, key)].append(o)

    series = [_series(group, taus) for group in lr_groups.values()]
    series.sort(key=lambda s: (s.model, s.label, _key(s.extra)))
    sensitivities = [_sensitivity(g, key) for (*_, key), g in sens_groups.items()]
    sensitivities.sort(key=lambda s: (s.model, s.key, s.label))
    return Analysis(series, sensitivities, _comparisons(series), taus)


def _series(group: list[Observation], taus: tuple[float, ...]) -> SeriesResult:
    first = group[0]
    curve = build_curve(group, LR_KEY)
    best = best_point(curve)
    basins: dict[float, Basin] = {}
    if best is not None:
        for tau in taus:
            basin = basin_width([p.x for p in curve], [p.loss for p in curve], tau)
            if basin is not None:
                basins[tau] = basin
    finished = [o for o in group if o.finished]
    done = [o for o in group if o.status == "done"]
    return SeriesResult(
        model=first.model,
        label=first.label,
        optimizer=first.optimizer,
        extra={k: v for k, v in sorted(first.point.items()) if k != LR_KEY},
        curve=curve,
        best_lr=best.x if best else None,
        best_loss=best.loss if best else None,
        best_interval=mean_interval(best.losses) if best else None,
        best_losses=list(best.losses) if best else [],
        best_run_ids=list(best.run_ids) if best else [],
        basins=basins,
        divergence_rate=(sum(o.diverged for o in finished) / len(finished)) if finished else 0.0,
        n_runs=len(group),
        n_failed=sum(o.status == "failed" for o in group),
        state_bytes_per_param=_median(
            o.summary["optimizer_state_bytes"] / o.summary["params"]
            for o in done
            if o.summary.get("optimizer_state_bytes") is not None and o.summary.get("params")
        ),
        tokens_per_second=_median(o.summary.get("tokens_per_second") for o in done),
        exact_match=_mean(
            o.summary.get("final_exact_match")
            for o in done
            if best is not None and o.run_id in best.run_ids
        ),
        start_loss=_median(o.summary.get("pretrained_val_loss") for o in done),
        reward=_mean(
            o.summary.get("final_reward")
            for o in done
            if best is not None and o.run_id in best.run_ids
        ),
        start_reward=_median((o.summary.get("initial") or {}).get("reward") for o in done),
        task=first.task,
    )


def _sensitivity(group: list[Observation], key: str) -> Sensitivity:
    first = group[0]
    curve = build_curve(group, key)
    best = best_point(curve)
    trained = [p.loss for p in curve if math.isfinite(p.loss)]
    return Sensitivity(
        model=first.model,
        label=first.label,
        key=key,
        curve=curve,
        best_value=best.x if best else None,
        best_loss=best.loss if best else None,
        spread=(max(trained) - min(trained)) if trained else None,
        n_diverged=sum(p.diverged for p in curve),
        task=first.task,
    )


def _comparisons(series: Sequence[SeriesResult]) -> list[Comparison]:
    out = []
    for i, a in enumerate(series):
        for b in series[i + 1 :]:
            if a.model != b.model or a.task != b.task or a.best_loss is None:
                continue
            if b.best_loss is None:
                continue
            test = welch_test(a.best_losses, b.best_losses)
            out.append(
                Comparison(
                    model=a.model,
                    a=a.name,
                    b=b.name,
                    difference=a.best_loss - b.best_loss,
                    t=test[0] if test else None,
                    dof=test[1] if test else None,
                    p_value=test[2] if test else None,
                    task=a.task,
                )
            )
    return out


# ------------------------------------------------------------------------------- store


def observations_from_store(directory: str | Path) -> list[Observation]:
    """Every (run, series membership) pair of a store as analysis input; runs that only a
    tuning path holds (members of ``tune:NAME`` sweeps) are the report's tuning section."""
    from optarena.sweep.store import TUNE_PREFIX, Store

    with Store(directory, create=False) as store:
        runs = {r.id: r for r in store.runs()}
        members = store.members()
    seen = set()
    out = []
    for m in members:
        run = runs.get(m.run_id)
        if run is None:
            continue
        seen.add(run.id)
        if m.sweep.startswith(TUNE_PREFIX):  # a tuning path, shown as such, not a series
            continue
        out.append(_observation(run, m.label, m.point))
    for run in runs.values():  # runs added without a membership: their LR is the swept value
        if run.id not in seen:
            out.append(_observation(run, run.optimizer, {LR_KEY: run.lr}))
    return out


def _observation(run: Any, label: str, point: Mapping[str, Any]) -> Observation:
    return Observation(
        run_id=run.id,
        label=label,
        # a store written before runs named their starting model: the summary names it
        model=run.model or ((run.summary or {}).get("pretrained") or {}).get("name") or "default",
        optimizer=run.optimizer,
        point=dict(point),
        seed=run.seed if run.seed is not None else 0,
        status=run.status,
        final_val_loss=run.final_val_loss,
        eval_curve=run.eval_curve,
        summary=run.summary or {},
        task=task_of_run(run.config, run.summary),
    )


def analyze_store(directory: str | Path, taus: Sequence[float] = DEFAULT_TAUS) -> Analysis:
    return analyze(observations_from_store(directory), taus)


# ----------------------------------------------------------------------------- helpers


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _sort_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    if isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
        return (1, tuple(value))
    return (2, _key(value))


def _median(values: Iterable[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.median(numbers) if numbers else None


def _mean(values: Iterable[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return statistics.fmean(numbers) if numbers else None


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
