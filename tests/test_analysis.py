"""Stability metrics on synthetic sweeps whose answers are known in closed form."""

from __future__ import annotations

import math

import pytest

from optarena.analysis import (
    Observation,
    analyze,
    basin_width,
    mean_interval,
    welch_test,
)


def test_mean_interval_by_hand():
    # mean 2, sd 1, n 3: half width = t(0.975, 2) * 1 / sqrt(3) = 4.303 / 1.732
    lo, hi = mean_interval([1.0, 2.0, 3.0])
    assert (lo + hi) / 2 == pytest.approx(2.0)
    assert (hi - lo) / 2 == pytest.approx(4.3027 / math.sqrt(3), rel=1e-4)
    assert mean_interval([1.0]) is None


def test_welch_by_hand():
    # means 3 and 6, variances 2.5 and 10, n = 5 each: se = sqrt(0.5 + 2) and
    # Welch-Satterthwaite dof = 2.5^2 / (0.5^2/4 + 2^2/4)
    t, dof, p = welch_test([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert t == pytest.approx(-3 / math.sqrt(2.5))
    assert dof == pytest.approx(6.25 / (0.0625 + 1.0))
    assert 0.1 < p < 0.11  # |t| = 1.90 at ~5.9 dof: between the 0.2 and 0.1 columns, near 0.1
    assert welch_test([1.0], [2.0, 3.0]) is None
    assert welch_test([1.0, 1.0], [2.0, 2.0])[2] == 0.0


def test_basin_width_piecewise_linear():
    lrs = [1e-4, 1e-3, 1e-2, 1e-1, 1.0]
    losses = [3.0, 2.5, 2.0, 2.6, math.inf]
    narrow = basin_width(lrs, losses, 0.1)
    # left crossing 0.1/0.5 of a decade below 1e-2, right 0.1/0.6 above it
    assert narrow.width == pytest.approx(0.2 + 1 / 6)
    assert narrow.lr_low == pytest.approx(10**-2.2)
    assert not narrow.censored
    wide = basin_width(lrs, losses, 1.0)
    # reaches the grid's left end (censored); stops at 0.1 because 1.0 diverged
    assert wide.width == pytest.approx(3.0)
    assert wide.censored
    assert wide.lr_high == pytest.approx(0.1)


def test_basin_width_of_a_parabola():
    # loss = 2 + a (log10 lr - c)^2 has a basin of exactly 2 sqrt(tau / a) decades
    a, c = 0.5, -2.5
    lrs = [10 ** (k / 50) for k in range(-250, 1)]
    losses = [2 + a * (math.log10(x) - c) ** 2 for x in lrs]
    for tau in (0.01, 0.05, 0.1):
        assert basin_width(lrs, losses, tau).width == pytest.approx(
            2 * math.sqrt(tau / a), rel=2e-3
        )


def test_basin_is_contiguous_around_the_best():
    lrs = [1e-3, 1e-2, 1e-1, 1.0, 10.0]
    losses = [2.0, 5.0, 2.05, 3.0, 2.01]  # a second dip beyond a wall is not part of the basin
    basin = basin_width(lrs, losses, 0.1)
    assert basin.lr_low == pytest.approx(1e-3) and basin.censored
    assert basin.width == pytest.approx(0.1 / 3.0)


def _obs(label, lr, seed, loss, status="done", model="micro", point=None, **summary):
    return Observation(
        run_id=f"{label}-{lr}-{seed}-{point}",
        label=label,
        model=model,
        optimizer=label,
        point=point if point is not None else {"lr": lr},
        seed=seed,
        status=status,
        final_val_loss=loss,
        summary=summary,
    )


def _sweep():
    obs = []
    # adam: parabola with optimum at 1e-2 and seeds offset by +-0.01
    for k, lr in enumerate([1e-4, 1e-3, 1e-2, 1e-1, 1.0]):
        for seed, off in ((0, -0.01), (1, 0.01)):
            if lr == 1.0:
                obs.append(_obs("adam", lr, seed, None, "diverged"))
            else:
                obs.append(
                    _obs(
                        "adam",
                        lr,
                        seed,
                        2.0 + 0.2 * (k - 2) ** 2 + off,
                        params=100,
                        optimizer_state_bytes=800,
                        tokens_per_second=50.0,
                    )
                )
    # sgd: optimum at 1.0 (edge of the grid), one seed diverges at 1e-1
    for lr, loss in ((1e-2, 3.0), (1e-1, 2.5), (1.0, 2.4)):
        for seed in (0, 1):
            diverged = lr == 1e-1 and seed == 1
            obs.append(
                _obs(
                    "sgd",
                    lr,
                    seed,
                    None if diverged else loss + 0.02 * seed,
                    "diverged" if diverged else "done",
                )
            )
    obs.append(_obs("sgd", 10.0, 0, None, "failed"))
    return obs


def test_series_metrics_on_synthetic_sweep():
    result = analyze(_sweep())
    adam, sgd = (next(s for s in result.series if s.label == n) for n in ("adam", "sgd"))
    assert adam.best_lr == 1e-2
    assert adam.best_loss == pytest.approx(2.0)
    lo, hi = adam.best_interval
    assert (hi - lo) / 2 == pytest.approx(12.706 * math.sqrt(2e-4) / math.sqrt(2), rel=1e-3)
    assert adam.divergence_rate == pytest.approx(2 / 10)
    # tau = 0.1 on a curve rising 0.2 per decade: half a decade each side
    assert adam.basins[0.1].width == pytest.approx(1.0)
    assert adam.basins[0.01].width == pytest.approx(0.1)
    assert adam.state_bytes_per_param == pytest.approx(8.0)
    assert adam.tokens_per_second == pytest.approx(50.0)
    aligned = dict(adam.aligned())
    assert aligned[1.0] == pytest.approx(2.0) and math.isinf(aligned[100.0])
    # sgd: the point where one seed diverged counts as diverged
    assert sgd.best_lr == 1.0 and sgd.best_loss == pytest.approx(2.41)
    assert sgd.divergence_rate == pytest.approx(1 / 6)
    assert sgd.n_failed == 1
    assert sgd.basins[0.1].censored and sgd.basins[0.1].width == pytest.approx(0.0)
    (cmp,) = result.comparisons
    assert cmp.difference == pytest.approx(2.0 - 2.41)
    assert cmp.p_value is not None and cmp.p_value < 0.05


def test_one_dimensional_sensitivity_and_model_sizes():
    obs = [
        _obs("adam", 1e-3, 0, loss, point={"hparams.beta1": b1})
        for b1, loss in ((0.0, 2.5), (0.5, 2.2), (0.9, 2.0), (0.99, None))
    ]
    obs[-1].status = "diverged"
    obs += [_obs("adam", 1e-3, 0, 2.1, model="small"), _obs("adam", 1e-2, 0, 1.9, model="small")]
    result = analyze(obs)
    (sens,) = result.sensitivities
    assert sens.key == "hparams.beta1" and sens.best_value == 0.9
    assert sens.spread == pytest.approx(0.5) and sens.n_diverged == 1
    (small,) = result.series
    assert small.model == "small" and small.best_lr == 1e-2
    assert result.models() == ["micro", "small"]


def test_series_split_by_other_swept_values():
    obs = [
        _obs("sgd", lr, 0, 3.0 - lr + m, point={"lr": lr, "hparams.momentum": m})
        for lr in (0.1, 1.0)
        for m in (0.9, 0.98)
    ]
    result = analyze(obs)
    assert sorted(s.name for s in result.series) == [
        "sgd (hparams.momentum=0.9)",
        "sgd (hparams.momentum=0.98)",
    ]
    assert all(s.best_lr == 1.0 for s in result.series)
