"""The RLHF stages of ``reproduce adam-mini`` at the test scale: a reward model, ReMax with
AdamW and Adam-mini over the LR grid, seed repeats at AdamW's best LR, and the claims built
from the store."""

from __future__ import annotations

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
    scale = P.get_scale("test")  # one RLHF LR: the stages' runs are what is tested
    rl = R.run_stages(st, scale, [0, 1], (0.05,), 7, sft=pretrained_run)
    assert rl is not None and st.stages[0].name.startswith("reward model")
    with Store(out / R.RLHF_DIR, create=False) as store:
        runs = {r.id: r for r in store.runs()}
    assert all(r.status == "done" for r in runs.values())
    tasks = sorted(r.summary["task"] for r in runs.values())
    # one reward model; 2 optimizers at the LR; 2 optimizers x 1 repeat at AdamW's best LR
    assert tasks == ["reward-model"] + ["rlhf"] * 4
    reward = R.reward_folder(out / R.RLHF_DIR, pretrained_run)
    assert reward is not None and (reward / "summary.json").is_file()
    assert all(
        r.config["reward_model"] == str(reward.resolve())
        for r in runs.values()
        if "reward_model" in r.config
    )

    series = R.rlhf_series(rl)
    assert set(series) == {"adamw", "adam-mini"}
    lr = series["adamw"].best_lr
    best = next(p for p in series["adamw"].curve if p.x == lr)
    assert sorted(best.seeds) == [0, 1]

    claims = R.check(rl, out)
    assert [c.id for c in claims] == ["R1.1", "R1.2", "R2"]
    assert all(c.verdict in (C.HOLDS, C.FAILS, C.INCONCLUSIVE) for c in claims)
    gain = claims[0].numbers["gain"]
    summaries = [runs[i].summary for i in best.run_ids]
    assert gain == pytest.approx(sum(s["reward_gain"]["mean"] for s in summaries) / 2)
    # R2's shortfall is AdamW's mean reward minus Adam-mini's, paired over the two seeds
    mini = next(p for p in series["adam-mini"].curve if p.x == lr)
    assert claims[2].numbers["gap"] == pytest.approx(best.loss * -1 - mini.loss * -1)
    # R1.2 is Adam-mini's result at AdamW's best LR
    mini_rewards = [runs[i].summary["final_reward"] for i in mini.run_ids]
    assert claims[1].numbers["final_reward"] == pytest.approx(sum(mini_rewards) / 2)
    rows = R.rlhf_rows(rl, runs)
    assert [r[0] for r in rows] == ["adamw", "adam-mini"] and rows[0][2] == "2"
    assert R.reward_model_row(runs) is not None
    body, figs = R.section(rl, out)
    assert "RLHF" in body and len(figs) == 1
    assert R.check(None, out)[2].verdict == C.INCONCLUSIVE

    # re-running resumes: nothing new is trained
    again = Stager(out, args, "adam-mini")
    R.run_stages(again, scale, [0, 1], (0.05,), 7, sft=pretrained_run)
    assert sum(s.runs - s.already for s in again.stages) == 0


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
