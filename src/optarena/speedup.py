"""Speedup against AdamW: how many of AdamW's tokens another optimizer's result is worth.

Token-equivalent speedup (defined in ``docs/analysis.md``): fit AdamW's validation loss against
training tokens with the power law ``L(D) = a * D**-b + c`` (its best run's eval curve; with
runs of several lengths, the best run of every length: :func:`baseline_fit`), read off the
tokens ``D_A`` AdamW needs to reach an optimizer's final loss, and divide by the tokens ``D``
that optimizer used:
``speedup = D_A / D`` (above 1: it needs fewer tokens than AdamW for the same loss). A fit to
evaluation curves is anchored at AdamW's final loss (:func:`token_speedup`), so that AdamW is
exactly 1x against itself. The uncertainty comes from the fit's covariance: parameters are
drawn from the normal distribution it describes and the 16th-84th percentiles of the resulting
speedups are reported.

Steps-to-target: the first evaluation step at or below a target loss (AdamW's best final loss),
and AdamW's steps divided by the optimizer's.

Plain numbers in, plain numbers out (numpy and scipy, no torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.optimize

BASELINE = "adamw"
DRAWS = 2000


@dataclass
class PowerLaw:
    """``L(D) = a D^-b + c`` with the covariance of ``(a, b, c)`` (None: not estimable)."""

    a: float
    b: float
    c: float
    cov: np.ndarray | None
    points: int

    def loss(self, tokens: float) -> float:
        return self.a * tokens ** (-self.b) + self.c

    def tokens_for(
        self, loss: float, a: float | None = None, b: float | None = None, c: float | None = None
    ) -> float:
        """Tokens at which the curve reaches ``loss``; inf at or below the floor ``c``."""
        a, b, c = (
            (self.a if a is None else a),
            (self.b if b is None else b),
            (self.c if c is None else c),
        )
        if loss <= c or a <= 0 or b <= 0:
            return math.inf
        return ((loss - c) / a) ** (-1.0 / b)


def fit_power_law(tokens: Sequence[float], losses: Sequence[float]) -> PowerLaw | None:
    """Least-squares fit of ``a D^-b + c`` to finite points with ``D > 0``; None when fewer
    than four points or the fit fails. ``D`` is scaled to millions internally."""
    pts = sorted(
        (float(d), float(y))
        for d, y in zip(tokens, losses, strict=True)
        if d and d > 0 and y is not None and math.isfinite(y)
    )
    if len(pts) < 4:
        return None
    scale = 1e6
    x = np.array([d / scale for d, _ in pts])
    y = np.array([v for _, v in pts])
    low = float(y.min())
    try:
        params, cov = scipy.optimize.curve_fit(
            lambda d, a, b, c: a * d ** (-b) + c,
            x,
            y,
            p0=(max(float(y[0] - low), 1e-3) * x[0] ** 0.5, 0.5, low - 0.1),
            bounds=([0.0, 1e-3, -np.inf], [np.inf, 5.0, low]),
            maxfev=20000,
        )
    except (RuntimeError, ValueError):
        return None
    a, b, c = (float(v) for v in params)
    # back to raw tokens: a (D/s)^-b = a s^b D^-b
    factor = scale**b
    ok = np.all(np.isfinite(cov)) and len(pts) > 3
    if ok:
        jac = np.diag([factor, 1.0, 1.0])
        jac[0, 1] = a * factor * math.log(scale)  # d(a s^b)/db
        cov = jac @ cov @ jac.T
    return PowerLaw(a * factor, b, c, cov if ok else None, len(pts))


@dataclass
class Speedup:
    """One optimizer against the baseline's fitted curve."""

    label: str
    final_loss: float
    tokens: float
    token_speedup: float | None  # None: its loss is below AdamW's fitted floor (beyond reach)
    interval: tuple[float, float] | None  # 16th-84th percentile over the fit's uncertainty
    steps_to_target: int | None
    step_speedup: float | None
    fit_source: str = ""  # what AdamW's power law was fitted to (see ``baseline_fit``)


def token_speedup(
    fit: PowerLaw,
    loss: float,
    tokens: float,
    seed: int = 0,
    anchor: tuple[float, float] | None = None,
) -> tuple[float | None, tuple[float, float] | None]:
    """``D_A(loss) / tokens`` and its 16-84% interval under the fit's covariance.

    ``anchor = (L_A, D_A)``, AdamW's own final loss and tokens, shifts the curve along log D so
    that it passes through that point: ``D_A(loss) = D(loss) / D(L_A) * D_A``. An evaluation
    curve is measured at a high LR and lies above what a finished schedule reaches, so without
    the shift AdamW would not be 1x against itself; with it, AdamW is exactly 1."""

    def ratio(a: float | None = None, b: float | None = None, c: float | None = None) -> float:
        reach = fit.tokens_for(loss, a, b, c)
        if anchor is not None:
            if loss == anchor[0]:
                return anchor[1] / tokens
            base = fit.tokens_for(anchor[0], a, b, c)
            if not math.isfinite(base):  # the anchor is at the floor: no shift is defined
                return math.nan
            reach = reach / base * anchor[1]
        return reach / tokens

    central = ratio()
    value = central if math.isfinite(central) else None
    if fit.cov is None or (anchor is not None and value is None):
        return value, None
    rng = np.random.default_rng(seed)
    try:
        draws = rng.multivariate_normal(
            [fit.a, fit.b, fit.c], fit.cov, size=DRAWS, check_valid="ignore"
        )
    except (ValueError, np.linalg.LinAlgError):
        return value, None
    with np.errstate(over="ignore", invalid="ignore"):  # extreme draws: inf, as they should be
        ratios = np.array([ratio(*d) for d in draws], dtype=float)
    if anchor is not None:
        # draws that put AdamW's own final loss at or below their floor define no shift; when
        # they are the majority the fit cannot bound the speedup at all
        ratios = ratios[~np.isnan(ratios)]
        if ratios.size < DRAWS // 2:
            return value, (0.0, math.inf)
    ratios = np.sort(np.nan_to_num(ratios, nan=np.inf, posinf=np.inf))
    # order statistics, not np.percentile: draws past AdamW's floor are inf and stay inf
    n = ratios.size
    lo, hi = ratios[int(0.16 * (n - 1))], ratios[int(0.84 * (n - 1))]
    return value, (float(lo), float(hi))


# With AdamW runs of at least this many training lengths, the power law is fitted to their
# final losses alone (each run's schedule completed); with fewer, to their eval curves.
ENDPOINT_LENGTHS = 4


def baseline_fit(
    lengths: dict[float, tuple[float, Sequence[Sequence[float]]]],
) -> tuple[PowerLaw | None, str]:
    """AdamW's power law from its best run at each training length.

    ``lengths`` maps training tokens to ``(final loss, eval curve as (tokens, loss) pairs)`` of
    AdamW's best point at that length. With ``ENDPOINT_LENGTHS`` lengths or more the fit uses the
    final losses only: each is a run whose schedule ran to its end, where an eval curve's inner
    points are losses of a run still at a high LR. With fewer, the eval curves of every length
    together; with one, its eval curve."""
    if len(lengths) >= ENDPOINT_LENGTHS:
        tokens = sorted(lengths)
        fit = fit_power_law(tokens, [lengths[t][0] for t in tokens])
        return fit, f"final losses of AdamW's best runs at {len(tokens)} training lengths"
    xs = [float(d) for _, curve in lengths.values() for d, _ in curve]
    ys = [float(y) for _, curve in lengths.values() for _, y in curve]
    fit = fit_power_law(xs, ys)
    if len(lengths) == 1:
        return fit, "eval curve of AdamW's best run"
    return fit, f"eval curves of AdamW's best runs at {len(lengths)} training lengths"


def first_step_at_or_below(curve: Sequence[Sequence[float | None]], target: float) -> int | None:
    for step, loss in curve:
        if loss is not None and math.isfinite(loss) and loss <= target:
            return int(step)
    return None
