"""Claim checks: pure functions from analysis results to a verdict with its numbers.

Every check has the same shape (``docs/reproduction.md`` writes each one out):

1. an *estimate* (a loss gap in nats, a basin-width gap in decades, a count of tolerated beta
   values) and an *uncertainty* around it (a half-width, or a borderline band);
2. a *bound* the study's claim puts on it (``gap <= delta``, ``gap > delta``, ...);
3. the verdict: **holds** when the whole uncertainty interval satisfies the claim, **does not
   hold** when the whole interval contradicts it, **inconclusive** when the interval straddles the
   bound, when a result is missing, or when a grid edge hides the answer (an optimum on the edge
   of its LR grid is only an upper bound on the best loss; a basin that reaches the edge is only a
   lower bound on its width; a verdict that such a bound could overturn is withheld).

Uncertainty of a loss gap ``A - B``: with two or more seeds shared by both points, the paired
Student-t 95% interval of the per-seed differences (same seed = same initialisation and data
order on both sides); otherwise ``t * sd * sqrt(1/n_A + 1/n_B)`` with ``sd`` the seed-to-seed
standard deviation pooled over every repeated point of the sweep, or the scale's assumed
``noise_sd`` (``t = 1.96``) when nothing was repeated.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import scipy.stats

from optarena.analysis import Analysis, CurvePoint, Sensitivity, SeriesResult

HOLDS = "holds"
FAILS = "does not hold"
INCONCLUSIVE = "inconclusive"
NOT_A_CLAIM = "—"  # an observation shown for context


@dataclass
class Claim:
    """One claim of a study, its precise test and what our results say."""

    id: str
    statement: str  # the study's claim, in words
    test: str  # the test, precisely (estimate, bound, tolerance)
    sentence: str  # our result, as a sentence with its numbers
    verdict: str
    reason: str = ""  # why inconclusive / caveats
    numbers: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "statement": self.statement,
            "test": self.test,
            "verdict": self.verdict,
            "sentence": self.sentence,
            "reason": self.reason,
            "numbers": self.numbers,
        }


@dataclass(frozen=True)
class Noise:
    """Seed-to-seed standard deviation of a final loss, and where it came from."""

    sd: float
    dof: float | None  # None: assumed, not measured
    source: str

    @property
    def t(self) -> float:
        return 1.96 if not self.dof else float(scipy.stats.t.ppf(0.975, self.dof))


@dataclass(frozen=True)
class Tolerances:
    """The thresholds of the claims (documented defaults; ``--delta`` etc. change them)."""

    delta: float = 0.05  # nats: "within" / "worse than" for best losses
    tau: float = 0.05  # nats: basin width tolerance
    basin_z: float = 0.5  # decades: "comparable" basin widths
    beta_tau: float = 0.1  # nats: a beta value is tolerated within this of the sweep's best
    beta_slack: int = 1  # grid values: "comparable" beta tolerance
    memory_saving: float = 0.45  # "~50% less optimizer memory": at least this fraction saved
    parity_delta: float = 0.02  # nats: Adam-mini "on par or better"


# --------------------------------------------------------------------------- the core decision


def decide(
    est: float,
    half: float,
    bound: float,
    greater: bool,
    *,
    may_be_higher: bool = False,
    may_be_lower: bool = False,
) -> tuple[str, str]:
    """Verdict for the claim ``true > bound`` (``greater``) or ``true <= bound``.

    The true value lies in ``[est - half, est + half]``; ``may_be_higher`` (``may_be_lower``):
    a grid edge means it could also lie above (below) that interval, so a verdict that would
    rely on it not doing so is withheld.
    """
    lo, hi = est - half, est + half
    if greater:
        verdict = HOLDS if lo > bound else FAILS if hi <= bound else INCONCLUSIVE
        unsafe = {HOLDS: may_be_lower, FAILS: may_be_higher}
    else:
        verdict = HOLDS if hi <= bound else FAILS if lo > bound else INCONCLUSIVE
        unsafe = {HOLDS: may_be_higher, FAILS: may_be_lower}
    if verdict == INCONCLUSIVE:
        return verdict, f"the interval [{lo:.3g}, {hi:.3g}] straddles the bound {bound:.3g}"
    if unsafe[verdict]:
        return INCONCLUSIVE, (
            f"would be '{verdict}', but an optimum or basin at the edge of its grid could "
            "overturn it"
        )
    return verdict, ""


# --------------------------------------------------------------------------- noise


def pooled_noise(points: Sequence[CurvePoint], assumed_sd: float) -> Noise:
    """Pooled within-point standard deviation over every point with two or more seeds."""
    ss, dof, n_points = 0.0, 0, 0
    for p in points:
        if len(p.losses) >= 2 and not p.diverged:
            ss += statistics.variance(p.losses) * (len(p.losses) - 1)
            dof += len(p.losses) - 1
            n_points += 1
    if dof == 0:
        return Noise(assumed_sd, None, f"assumed seed-to-seed sd {assumed_sd:g} (no repeats)")
    sd = math.sqrt(ss / dof)
    return Noise(sd, float(dof), f"sd {sd:.3g} pooled over {n_points} repeated points")


def analysis_noise(analysis: Analysis, assumed_sd: float) -> Noise:
    points = [p for s in analysis.series for p in s.curve]
    points += [p for s in analysis.sensitivities for p in s.curve]
    return pooled_noise(points, assumed_sd)


def gap_interval(a: CurvePoint, b: CurvePoint, noise: Noise) -> tuple[float, float, str]:
    """``(estimate, half-width, how)`` of ``loss(a) - loss(b)``."""
    est = a.loss - b.loss
    common = sorted(set(a.seeds) & set(b.seeds))
    if len(common) >= 2:
        la, lb = (
            dict(zip(a.seeds, a.losses, strict=True)),
            dict(zip(b.seeds, b.losses, strict=True)),
        )
        diffs = [la[s] - lb[s] for s in common]
        t = float(scipy.stats.t.ppf(0.975, len(diffs) - 1))
        half = t * statistics.stdev(diffs) / math.sqrt(len(diffs))
        return statistics.fmean(diffs), half, f"paired over {len(diffs)} seeds"
    na, nb = max(1, len(a.losses)), max(1, len(b.losses))
    half = noise.t * noise.sd * math.sqrt(1 / na + 1 / nb)
    return est, half, noise.source


# --------------------------------------------------------------------------- series helpers


def best(s: SeriesResult | None) -> CurvePoint | None:
    if s is None or s.best_lr is None:
        return None
    return next((p for p in s.curve if p.x == s.best_lr), None)


def edge(s: SeriesResult) -> str | None:
    """``"low"``/``"high"`` when the best LR is the first/last point of its grid."""
    if s.best_lr is None or len(s.curve) < 2:
        return None
    xs = [p.x for p in s.curve]
    if s.best_lr == min(xs):
        return "low"
    if s.best_lr == max(xs):
        return "high"
    return None


def grid_step(s: SeriesResult) -> float:
    """Median spacing of the series' LR grid in decades (0.5 on the study's lattice)."""
    xs = sorted(math.log10(p.x) for p in s.curve if p.x > 0)
    steps = [b - a for a, b in itertools.pairwise(xs)]
    return statistics.median(steps) if steps else 0.5


def missing(claim_id: str, statement: str, test: str, what: str) -> Claim:
    return Claim(claim_id, statement, test, f"Not tested: {what}.", INCONCLUSIVE, what)


# --------------------------------------------------------------------------- claim kinds


def loss_gap_claim(
    claim_id: str,
    statement: str,
    a: SeriesResult | None,
    b: SeriesResult | None,
    delta: float,
    noise: Noise,
    *,
    worse: bool,
    names: tuple[str, str],
) -> Claim:
    """``worse=False``: A's best loss is no worse than B's by more than ``delta``
    (``gap <= delta``); ``worse=True``: A's best is worse than B's by more than ``delta``."""
    na, nb = names
    if worse:
        test = f"best({na}) − best({nb}) > δ = {delta:g} nats, 95% interval wholly above δ"
    else:
        test = f"best({na}) − best({nb}) ≤ δ = {delta:g} nats, 95% interval wholly below δ"
    pa, pb = best(a), best(b)
    if a is None or b is None or pa is None or pb is None:
        absent = na if a is None or pa is None else nb
        return missing(claim_id, statement, test, f"no trained result for {absent}")
    est, half, how = gap_interval(pa, pb, noise)
    ea, eb = edge(a), edge(b)
    # A at an edge: its true best may be lower, so the gap may be lower; B at an edge: higher.
    verdict, reason = decide(est, half, delta, worse, may_be_higher=bool(eb), may_be_lower=bool(ea))
    if est >= 0:
        rel = f"worse than {nb}'s by {est:.3f} nats"
    else:
        rel = f"better than {nb}'s by {-est:.3f} nats"
    where = "; ".join(
        f"{n}'s optimum is at the {e} edge of its grid" for n, e in ((na, ea), (nb, eb)) if e
    )
    sentence = (
        f"{na}'s best loss ({pa.loss:.3f} at LR {a.best_lr:.3g}) is {rel} "
        f"({nb}: {pb.loss:.3f} at LR {b.best_lr:.3g}; 95% interval of the gap "
        f"[{est - half:+.3f}, {est + half:+.3f}], {how})" + (f"; {where}" if where else "") + "."
    )
    numbers = {
        "gap": est,
        "half_width": half,
        "delta": delta,
        "a_best": pa.loss,
        "b_best": pb.loss,
        "a_lr": a.best_lr,
        "b_lr": b.best_lr,
        "a_edge": ea,
        "b_edge": eb,
    }
    return Claim(claim_id, statement, test, sentence, verdict, reason, numbers)


def basin_claim(
    claim_id: str,
    statement: str,
    a: SeriesResult | None,
    b: SeriesResult | None,
    tau: float,
    z: float,
    *,
    narrower: bool,
    names: tuple[str, str],
) -> Claim:
    """``narrower=False``: A's basin at ``tau`` is not narrower than B's by more than ``z``
    decades (``w_A - w_B >= -z``); ``narrower=True``: it is (``w_A - w_B < -z``). Widths are
    interpolated to about half a grid step, the uncertainty used; a basin that reaches its
    grid's edge is a lower bound."""
    na, nb = names
    op = "<" if narrower else "≥"
    test = (
        f"w({na}) − w({nb}) {op} −Z, Z = {z:g} decades, basin width w at τ = {tau:g} nats, "
        "± half a grid step"
    )
    ba = a.basins.get(tau) if a is not None else None
    bb = b.basins.get(tau) if b is not None else None
    if ba is None or bb is None:
        absent = na if ba is None else nb
        return missing(claim_id, statement, test, f"no basin at τ={tau:g} for {absent}")
    assert a is not None and b is not None
    half = 0.5 * max(grid_step(a), grid_step(b))
    d = ba.width - bb.width
    # claim "d >= -z" is "not (d < -z)": decide on "d > -z" (greater) and mirror for narrower
    verdict, reason = decide(
        -d if narrower else d,
        half,
        z if narrower else -z,
        greater=True,
        # a censored width is a lower bound: A censored -> d may be higher, B -> lower
        may_be_higher=ba.censored if not narrower else bb.censored,
        may_be_lower=bb.censored if not narrower else ba.censored,
    )

    def fmt(basin: Any) -> str:
        return ("≥" if basin.censored else "") + f"{basin.width:.2f}"

    sentence = (
        f"At τ = {tau:g} nats, {na}'s LR basin is {fmt(ba)} decades wide and {nb}'s is "
        f"{fmt(bb)} (difference {d:+.2f} ± {half:.2f} decades; ≥: the basin reaches the "
        "grid's edge)."
    )
    numbers = {
        "a_width": ba.width,
        "b_width": bb.width,
        "difference": d,
        "half_width": half,
        "z": z,
        "a_censored": ba.censored,
        "b_censored": bb.censored,
    }
    return Claim(claim_id, statement, test, sentence, verdict, reason, numbers)


@dataclass(frozen=True)
class Tolerated:
    """How many values of a 1-D sweep keep the loss within ``beta_tau`` of its best."""

    label: str
    surely: int  # values within the tolerance even at the noisy end of their interval
    possibly: int  # values within it at the favourable end
    total: int
    best_value: Any


def tolerated(s: Sensitivity, beta_tau: float, noise: Noise) -> Tolerated | None:
    b = next((p for p in s.curve if p.x == s.best_value), None)
    if b is None:
        return None
    surely = possibly = 0
    for p in s.curve:
        if p.diverged or not math.isfinite(p.loss):
            continue
        if p is b:
            surely += 1
            possibly += 1
            continue
        est, half, _ = gap_interval(p, b, noise)
        surely += est + half <= beta_tau
        possibly += est - half <= beta_tau
    return Tolerated(s.label, surely, possibly, len(s.curve), s.best_value)


def beta_claim(
    claim_id: str,
    statement: str,
    others: Mapping[str, Sensitivity | None],
    reference: Sensitivity | None,
    tol: Tolerances,
    noise: Noise,
    *,
    fewer: bool,
    reference_name: str = "Adam",
) -> Claim:
    """Tolerated-value counts of ``others`` against the reference's.

    ``fewer=False``: every other optimizer tolerates at least as many values as the reference
    minus ``beta_slack``; ``fewer=True``: each tolerates fewer than that. With the borderline
    band ``[surely, possibly]`` on each count, each comparison is decided like an interval."""
    key = reference.key if reference is not None else "beta"
    rel = "<" if fewer else "≥"
    test = (
        f"n(X) {rel} n({reference_name}) − {tol.beta_slack}, n = values of the {key} grid with "
        f"loss within {tol.beta_tau:g} nats of the sweep's best (diverged: outside), each value's "
        "gap counted with its 95% interval"
    )
    if reference is None:
        return missing(claim_id, statement, test, f"no {reference_name} sweep")
    ref = tolerated(reference, tol.beta_tau, noise)
    if ref is None:
        return missing(claim_id, statement, test, f"{reference_name}'s sweep has no trained value")
    verdicts, parts = [], []
    for name, s in others.items():
        t = tolerated(s, tol.beta_tau, noise) if s is not None else None
        if t is None:
            verdicts.append(INCONCLUSIVE)
            parts.append(f"{name}: no result")
            continue
        if fewer:  # claim n_X < n_ref - slack
            ok = t.possibly < ref.surely - tol.beta_slack
            bad = t.surely >= ref.possibly - tol.beta_slack
        else:  # claim n_X >= n_ref - slack
            ok = t.surely >= ref.possibly - tol.beta_slack
            bad = t.possibly < ref.surely - tol.beta_slack
        verdicts.append(HOLDS if ok else FAILS if bad else INCONCLUSIVE)
        parts.append(f"{name} {_count(t)}/{t.total} (best {t.best_value:g})")
    verdict = (
        FAILS if FAILS in verdicts else HOLDS if all(v == HOLDS for v in verdicts) else INCONCLUSIVE
    )
    reason = "" if verdict != INCONCLUSIVE else "some counts overlap within their borderline band"
    sentence = (
        f"{key} values tolerated within {tol.beta_tau:g} nats of each sweep's best: "
        f"{reference_name} {_count(ref)}/{ref.total} (best {ref.best_value:g}); "
        + ", ".join(parts)
        + " (a–b: borderline values counted or not)."
    )
    return Claim(
        claim_id,
        statement,
        test,
        sentence,
        verdict,
        reason,
        {"reference": ref.__dict__, "verdicts": verdicts},
    )


def _count(t: Tolerated) -> str:
    return str(t.surely) if t.surely == t.possibly else f"{t.surely}–{t.possibly}"


def ratio_claim(
    claim_id: str,
    statement: str,
    test: str,
    value: float | None,
    bound: float,
    sentence: Callable[[float], str],
    *,
    greater: bool,
) -> Claim:
    """A deterministic quantity (bytes) against a bound: no noise, no inconclusive zone."""
    if value is None:
        return missing(claim_id, statement, test, "no measurement")
    verdict, reason = decide(value, 0.0, bound, greater)
    return Claim(claim_id, statement, test, sentence(value), verdict, reason, {"value": value})


def overall(claims: Sequence[Claim]) -> dict[str, int]:
    counts = {HOLDS: 0, FAILS: 0, INCONCLUSIVE: 0}
    for c in claims:
        if c.verdict in counts:
            counts[c.verdict] += 1
    return counts
