"""The RLHF stages of ``reproduce adam-mini`` at the test scale: a reward model, ReMax with
AdamW and Adam-mini over the LR grid, seed repeats at AdamW's best LR, and the claims built
from the store."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from optarena.cli import build_parser
from optarena.reproduce import adam_mini_rlhf as R
from optarena.reproduce import claims as C
from optarena.reproduce import protocol as P
from optarena.reproduce.runner import Stager

pytestmark = pytest.mark.usefixtures("single_thread")


def test_rlhf_stages_and_their_claims(pretrained_run: Path, tmp_path: Path) -> None:
    from optarena.sweep.store import Store

    args = build_parser().parse_args(
        ["reproduce", "adam-mini", "--scale", "test", "--workers", "2", "--threads", "1"]
    )
    out = tmp_path / "repro"
    st = Stager(out, args, "adam-mini")
    # one LR: the stages' runs are what is tested (the best LR of a grid is the analysis')
    scale = dataclasses.replace(P.get_scale("test"), rlhf_lrs=(1e-3,))
    R.run_stages(st, scale, [0, 1], pretrained_run, 1, 3)
    with Store(out, create=False) as store:
        runs = {r.id: r for r in store.runs()}
    assert all(r.status == "done" for r in runs.values())
    tasks = sorted(r.summary["task"] for r in runs.values())
    # one reward model; 2 optimizers at the LR; 2 optimizers x 1 repeat at AdamW's best LR
    assert tasks == ["reward-model"] + ["rlhf"] * 4
    reward = R.reward_folder(st, pretrained_run)
    assert reward is not None and (reward / "summary.json").is_file()
    assert all(
        r.config["reward_model"] == str(reward) for r in runs.values() if "reward_model" in r.config
    )

    analysis = st.analysis((0.05,))
    series = R.rlhf_series(analysis)
    assert set(series) == {"adamw", "adam-mini"}
    lr = series["adamw"].best_lr
    best = next(p for p in series["adamw"].curve if p.x == lr)
    assert sorted(best.seeds) == [0, 1]
    # the best LR is the one whose mean final reward is highest
    for p in series["adamw"].curve:
        assert -p.loss <= -best.loss

    claims = R.check_claims(analysis, runs, C.Noise(0.02, None, "assumed"))
    assert [c.id for c in claims] == ["R1.1", "R1.2", "R2"]
    assert all(c.verdict in (C.HOLDS, C.FAILS, C.INCONCLUSIVE) for c in claims)
    gain = claims[0].numbers["gain"]
    summaries = [runs[i].summary for i in best.run_ids]
    assert gain == pytest.approx(sum(s["reward_gain"]["mean"] for s in summaries) / 2)
    rows = R.rlhf_rows(analysis, runs)
    assert [r[0] for r in rows] == ["adamw", "adam-mini"] and rows[0][2] == "2"
    assert R.reward_model_row(runs) is not None

    # re-running resumes: nothing new is trained
    report = st.run(2, 3, "again", R.rlhf_base(scale, pretrained_run, reward), [], task="rlhf")
    assert report.runs == 0


def test_gain_interval_over_seeds_and_prompts() -> None:
    one = {"reward_gain": {"mean": 0.2, "low": 0.1, "high": 0.3, "n": 64}}
    assert R.gain_interval([one]) == (0.2, pytest.approx(0.1), "paired over 64 held-out prompts")
    two = [
        {"reward_gain": {"mean": 0.1, "low": 0, "high": 1, "n": 8}},
        {"reward_gain": {"mean": 0.3, "low": 0, "high": 1, "n": 8}},
    ]
    mean, half, how = R.gain_interval(two)
    # t(0.975, 1) = 12.706; sd of (0.1, 0.3) = 0.1414
    assert mean == pytest.approx(0.2) and half == pytest.approx(
        12.7062 * 0.141421 / 2**0.5, rel=1e-4
    )
    assert how == "over 2 seeds" and R.gain_interval([]) is None
