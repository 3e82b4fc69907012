"""Claim checks on synthetic analysis results: one that holds, one that fails, one inconclusive,
for each kind of test, plus the grid-edge and censoring rules."""

from __future__ import annotations

import math

import pytest

from optarena.analysis import Observation, analyze
from optarena.reproduce import claims as C
from optarena.reproduce import deconstructing as D
from optarena.reproduce import protocol as P
from optarena.sweep.spec import _log_range

LRS = [1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e-1]


def curve(label: str, center: float, floor: float, curvature: float = 0.2, seeds=(0,), jitter=None):
    """Observations of a parabola in log10(LR) with its optimum at ``center``; LRs more than 1.5
    decades above it diverge."""
    out = []
    for lr in LRS:
        offset = math.log10(lr) - math.log10(center)
        for seed in seeds:
            loss = floor + curvature * offset**2 + (jitter(seed) if jitter else 0.0)
            diverged = offset > 1.5
            out.append(
                Observation(
                    f"{label}-{lr}-{seed}",
                    label,
                    "micro",
                    label,
                    {"lr": lr},
                    seed,
                    "diverged" if diverged else "done",
                    None if diverged else loss,
                    summary={"optimizer_state_bytes": 8, "params": 1},
                )
            )
    return out


def series(*obs_lists):
    a = analyze([o for obs in obs_lists for o in obs])
    return a, D.lr_series(a, "micro")


NOISE = C.Noise(0.01, None, "assumed")
TOL = C.Tolerances()


# --------------------------------------------------------------------------- decide


@pytest.mark.parametrize(
    ("est", "half", "greater", "verdict"),
    [
        (0.2, 0.05, True, C.HOLDS),  # interval [0.15, 0.25] above 0.1
        (0.0, 0.05, True, C.FAILS),  # [-0.05, 0.05] at or below 0.1
        (0.1, 0.05, True, C.INCONCLUSIVE),  # straddles
        (0.0, 0.05, False, C.HOLDS),
        (0.2, 0.05, False, C.FAILS),
        (0.12, 0.05, False, C.INCONCLUSIVE),
    ],
)
def test_decide(est, half, greater, verdict):
    assert C.decide(est, half, 0.1, greater)[0] == verdict


def test_decide_withholds_what_an_edge_could_overturn():
    # claim true > 0.1 holds on the interval, but the truth may be lower: withheld
    assert C.decide(0.2, 0.05, 0.1, True, may_be_lower=True)[0] == C.INCONCLUSIVE
    # ...a truth that may be higher cannot overturn "holds"
    assert C.decide(0.2, 0.05, 0.1, True, may_be_higher=True)[0] == C.HOLDS
    assert C.decide(0.0, 0.05, 0.1, True, may_be_higher=True)[0] == C.INCONCLUSIVE
    assert C.decide(0.0, 0.05, 0.1, False, may_be_higher=True)[0] == C.INCONCLUSIVE
    assert C.decide(0.0, 0.05, 0.1, False, may_be_lower=True)[0] == C.HOLDS


# --------------------------------------------------------------------------- loss gaps


def test_sgd_worse_holds_fails_inconclusive():
    adam = curve("adamw", 3.16e-3, 3.0)
    _, S = series(adam, curve("sgd", 3.16e-3, 3.3))
    c = C.loss_gap_claim(
        "x", "", S["sgd"], S["adamw"], 0.05, NOISE, worse=True, names=("SGD", "Adam")
    )
    assert c.verdict == C.HOLDS
    assert c.numbers["gap"] == pytest.approx(0.3)
    assert "worse than Adam's by 0.300 nats" in c.sentence

    _, S = series(adam, curve("sgd", 3.16e-3, 3.01))
    c = C.loss_gap_claim(
        "x", "", S["sgd"], S["adamw"], 0.05, NOISE, worse=True, names=("SGD", "Adam")
    )
    assert c.verdict == C.FAILS

    # gap 0.05 exactly at the bound with half-width 1.96*0.01*sqrt(2) = 0.028: straddles
    _, S = series(adam, curve("sgd", 3.16e-3, 3.05))
    c = C.loss_gap_claim(
        "x", "", S["sgd"], S["adamw"], 0.05, NOISE, worse=True, names=("SGD", "Adam")
    )
    assert c.verdict == C.INCONCLUSIVE
    assert c.numbers["half_width"] == pytest.approx(1.96 * 0.01 * math.sqrt(2))


def test_optimum_on_grid_edge_makes_a_worse_claim_inconclusive():
    # SGD's optimum lies beyond the grid's low end: its measured best is only an upper bound
    _, S = series(curve("adamw", 3.16e-3, 3.0), curve("sgd", 1e-5, 3.0))
    assert C.edge(S["sgd"]) == "low"
    c = C.loss_gap_claim(
        "x", "", S["sgd"], S["adamw"], 0.05, NOISE, worse=True, names=("SGD", "Adam")
    )
    assert c.numbers["gap"] > 0.1
    assert c.verdict == C.INCONCLUSIVE
    assert "edge" in c.reason


def test_parity_uses_paired_seeds_when_both_have_them():
    jitter = {0: 0.0, 1: 0.03, 2: -0.02}.get
    _, S = series(
        curve("adamw", 3.16e-3, 3.0, seeds=(0, 1, 2), jitter=jitter),
        curve("lion", 3.16e-3, 3.01, seeds=(0, 1, 2), jitter=jitter),
    )
    c = C.loss_gap_claim(
        "x", "", S["lion"], S["adamw"], 0.05, NOISE, worse=False, names=("Lion", "Adam")
    )
    # same per-seed offsets: the paired differences are all 0.01, so the interval has width ~0
    assert c.numbers["gap"] == pytest.approx(0.01)
    assert c.numbers["half_width"] == pytest.approx(0.0, abs=1e-9)
    assert c.verdict == C.HOLDS
    assert "paired over 3 seeds" in c.sentence


def test_missing_series_is_inconclusive():
    _, S = series(curve("adamw", 3.16e-3, 3.0))
    c = C.loss_gap_claim(
        "x", "", S.get("lion"), S["adamw"], 0.05, NOISE, worse=False, names=("Lion", "Adam")
    )
    assert c.verdict == C.INCONCLUSIVE
    assert "no trained result for Lion" in c.sentence


def test_pooled_noise_from_repeats():
    a, _ = series(curve("adamw", 3.16e-3, 3.0, seeds=(0, 1), jitter={0: 0.0, 1: 0.02}.get))
    noise = C.analysis_noise(a, 0.5)
    assert noise.dof == len(LRS) - 1  # two seeds at every LR but the diverged one
    assert noise.sd == pytest.approx(0.02 / math.sqrt(2))
    assert C.analysis_noise(series(curve("adamw", 3.16e-3, 3.0))[0], 0.5).sd == 0.5


# --------------------------------------------------------------------------- basins


def test_basin_claims():
    # same curvature: same width -> "not narrower" holds
    _, S = series(curve("adamw", 3.16e-3, 3.0), curve("lion", 3.16e-3, 3.0))
    c = C.basin_claim(
        "x", "", S["lion"], S["adamw"], 0.05, 0.5, narrower=False, names=("Lion", "Adam")
    )
    assert c.verdict == C.HOLDS
    # much sharper: width 2*sqrt(0.05/a) decades; a = 0.2 -> 1.0, a = 5 -> 0.2 (plus grid effects)
    _, S = series(curve("adamw", 3.16e-3, 3.0, 0.05), curve("sgd", 3.16e-3, 3.0, 5.0))
    c = C.basin_claim(
        "x", "", S["sgd"], S["adamw"], 0.05, 0.5, narrower=True, names=("SGD", "Adam")
    )
    assert c.numbers["difference"] < -1.0
    assert c.verdict == C.HOLDS
    c = C.basin_claim(
        "x", "", S["sgd"], S["adamw"], 0.05, 0.5, narrower=False, names=("SGD", "Adam")
    )
    assert c.verdict == C.FAILS
    # a moderately sharper one: the difference sits within half a grid step of -Z
    _, S = series(curve("adamw", 3.16e-3, 3.0, 0.2), curve("sophia", 3.16e-3, 3.0, 0.6))
    c = C.basin_claim(
        "x", "", S["sophia"], S["adamw"], 0.05, 0.5, narrower=False, names=("Sophia", "Adam")
    )
    assert -0.75 < c.numbers["difference"] < -0.25
    assert c.verdict == C.INCONCLUSIVE


def test_censored_basin_cannot_support_narrower():
    # Adam's basin is flat to the edges (censored): Lion narrower would need Adam's true width
    _, S = series(curve("adamw", 3.16e-3, 3.0, 0.001), curve("lion", 3.16e-3, 3.0, 5.0))
    assert S["adamw"].basins[0.05].censored
    c = C.basin_claim(
        "x", "", S["lion"], S["adamw"], 0.05, 0.5, narrower=True, names=("Lion", "Adam")
    )
    assert c.verdict == C.HOLDS  # Adam's true width is at least this: Lion is narrower anyway
    c = C.basin_claim(
        "x", "", S["adamw"], S["lion"], 0.05, 0.5, narrower=True, names=("Adam", "Lion")
    )
    assert c.verdict == C.FAILS  # Adam censored: its true width can only be larger


# --------------------------------------------------------------------------- beta tolerance


def beta_obs(label: str, key: str, losses: dict[float, float | None]):
    return [
        Observation(
            f"{label}-{key}-{v}",
            label,
            "micro",
            label,
            {key: v},
            0,
            "diverged" if loss is None else "done",
            loss,
        )
        for v, loss in losses.items()
    ]


def test_beta_tolerance_claims():
    noise = C.Noise(0.001, None, "assumed")  # tight noise: counts are exact
    adam = beta_obs(
        "adamw", "hparams.beta1", {0.0: 3.5, 0.5: 3.05, 0.9: 3.0, 0.95: 3.0, 0.99: 3.02}
    )
    lion = beta_obs("lion", "hparams.beta1", {0.0: 3.4, 0.5: 3.2, 0.9: 3.0, 0.95: 3.01, 0.99: 3.05})
    sgd = beta_obs("sgd", "hparams.momentum", {0.0: 4.0, 0.5: 3.8, 0.9: 3.5, 0.95: 3.2, 0.99: None})
    a = analyze(adam + lion + sgd)
    ref = D.sensitivity(a, "micro", "adamw", "hparams.beta1")
    lion_s = D.sensitivity(a, "micro", "lion", "hparams.beta1")
    sgd_s = D.sensitivity(a, "micro", "sgd", "hparams.momentum")
    assert C.tolerated(ref, 0.1, noise).surely == 4
    assert C.tolerated(lion_s, 0.1, noise).surely == 3
    c = C.beta_claim("x", "", {"Lion": lion_s}, ref, TOL, noise, fewer=False)
    assert c.verdict == C.HOLDS  # 3 >= 4 - 1
    c = C.beta_claim("x", "", {"SGD": sgd_s}, ref, TOL, noise, fewer=True)
    assert c.verdict == C.HOLDS  # 1 < 4 - 1
    c = C.beta_claim("x", "", {"SGD": sgd_s}, ref, TOL, noise, fewer=False)
    assert c.verdict == C.FAILS
    # loud noise: borderline values make the counts overlap
    loud = C.Noise(0.05, None, "assumed")
    c = C.beta_claim("x", "", {"Lion": lion_s}, ref, TOL, loud, fewer=True)
    assert c.verdict == C.INCONCLUSIVE


# --------------------------------------------------------------------------- the study's list


def test_check_claims_on_a_synthetic_study():
    obs = []
    for opt in ("adamw", "adafactor", "adalayer", "lion", "signum", "sophia"):
        center = 3.16e-3 if opt in ("adamw", "adafactor", "adalayer") else 3.16e-4
        obs += curve(opt, center, 3.0)
    obs += curve("sgd", 3.16e-3, 3.4, 1.0)
    obs += curve("hybrid-adalayer-last-ln", 3.16e-3, 3.01)
    obs += curve("hybrid-adalayer-ln", 3.16e-3, 3.3)
    a = analyze(obs)
    claims = {c.id: c for c in D.check_claims(a, "micro", TOL, NOISE)}
    assert claims["D1.1"].verdict == C.HOLDS  # Adafactor = Adam
    assert claims["D1.4"].verdict == C.HOLDS  # SGD worse by 0.4
    assert claims["D2.4"].verdict == C.HOLDS  # SGD's basin is 5x sharper
    assert claims["D5.1"].verdict == C.HOLDS
    assert claims["D5.4"].verdict == C.HOLDS
    assert claims["D5.3"].verdict == C.INCONCLUSIVE  # not run
    assert "not run" not in claims["D5.3"].sentence
    assert all(c.verdict in (C.HOLDS, C.FAILS, C.INCONCLUSIVE) for c in claims.values())


def test_lr_grids_follow_the_study_lattice():
    # micro (width 64) shifts the grids by two half decades
    assert P.half_decades("micro") == 2
    assert P.lr_grid(1e-4, 1.0, "micro") == [
        1e-3,
        3.16227766017e-3,
        1e-2,
        3.16227766017e-2,
        0.1,
        0.316227766017,
        1.0,
        3.16227766017,
        10.0,
    ]
    assert P.lr_grid(1e-4, 1.0, "micro", 2, 3.16e-3) == [1e-2, 3.16227766017e-2]
    # unshifted at the study's width, identical to a spec's range (so run ids agree)
    spec_range = _log_range({"from": 1e-4, "to": 1.0, "per_decade": 2}, "", "")
    assert P.lr_grid(1e-4, 1.0, "150m") == spec_range


# --------------------------------------------------------------------------- Adam-mini


def test_partition_check_holds_and_catches_a_wrong_layout(monkeypatch):
    pytest.importorskip("transformers")
    from optarena.optim import blocks
    from optarena.reproduce import adam_mini, partition_check

    rows = partition_check.check()
    assert rows and {r.model.split()[0] for r in rows} == {"Llama", "GPT-2", "BERT"}
    assert adam_mini._partition_claim(rows).verdict == C.HOLDS
    k = next(r for r in rows if r.name.endswith("k_proj.weight"))
    assert k.ours == 2  # grouped-query attention: one block per key/value head
    # a layout that ignores heads and neurons (one block per tensor) must be caught
    monkeypatch.setattr(blocks, "adam_mini_layout", lambda info: blocks.tensor_layout(info.shape))
    bad = adam_mini._partition_claim(partition_check.check())
    assert bad.verdict == C.FAILS
    assert "differ" in bad.sentence


def test_adam_mini_claims_memory_and_parity():
    obs = curve("adamw", 3.16e-3, 3.0, seeds=(0, 1, 2), jitter={0: 0.0, 1: 0.02, 2: -0.01}.get)
    mini = curve(
        "adam-mini", 3.16e-3, 3.005, seeds=(0, 1, 2), jitter={0: 0.0, 1: 0.02, 2: -0.01}.get
    )
    for o in mini:
        o.summary = {"optimizer_state_bytes": 4.1, "params": 1}
    worse = curve("adam-mini", 3.16e-3, 3.2)
    for o in worse:
        o.summary = {"optimizer_state_bytes": 6.0, "params": 1}
        o.model = "tiny"
    adam_tiny = curve("adamw", 3.16e-3, 3.0)
    for o in adam_tiny:
        o.model = "tiny"
    from optarena.reproduce import adam_mini

    a = analyze(obs + mini + worse + adam_tiny)
    claims = {c.id: c for c in adam_mini.check_claims(a, ["micro", "tiny"], TOL, NOISE, None)}
    assert claims["M1.1"].verdict == C.HOLDS  # 1 - 4.1/8 = 48.75% >= 45%
    assert claims["M2.1"].verdict == C.HOLDS  # paired gap 0.005 exactly, interval ~0
    assert claims["M1.2"].verdict == C.FAILS  # 25% saved
    assert claims["M2.2"].verdict == C.FAILS  # 0.2 nats worse
    assert claims["M3"].verdict == C.INCONCLUSIVE  # no transformers rows given
