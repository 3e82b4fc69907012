"""The RLHF stages of ``optarena reproduce adam-mini``, on the SFT stage's model.

(1) A reward model: the SFT stage's AdamW model (its first seed) with a scalar head, trained
with AdamW on the built-in task's preference pairs (``optarena reward``). (2) ReMax from the same
SFT model against that reward model with AdamW and Adam-mini over one LR grid and the same
hyperparameters (``optarena rlhf``). (3) With ``--seeds 0 1 2``, the other seeds for both at
AdamW's best RLHF LR (paired comparisons; a seed is the RLHF run's sampling and prompt order).

Claims: R1 — the RLHF stage raises the held-out reward of the SFT model (both optimizers; the
interval of the gain wholly above 0); R2 — Adam-mini's held-out reward is on par with AdamW's at
AdamW's best LR: the shortfall ``reward(AdamW) − reward(Adam-mini)`` at most ``δ_R`` = a quarter
of AdamW's own gain over the SFT model (a reward model's scale is its own, so the tolerance is
relative to what RLHF achieves), the 95% interval wholly below it. The reward model's held-out
accuracy is reported with them (chance is 50%).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import scipy.stats

from optarena.analysis import Analysis, SeriesResult
from optarena.reproduce import claims as C
from optarena.reproduce import protocol as P
from optarena.reproduce.runner import Stager

OPTIMIZERS = ("adamw", "adam-mini")
LABELS = {opt: f"{opt} (RLHF)" for opt in OPTIMIZERS}
REWARD_LABEL = "reward model"
STAGES = 3
# δ_R as a share of AdamW's RLHF gain (R2)
PARITY_SHARE = 0.25


def reward_base(scale: P.Scale, sft: Path) -> dict[str, Any]:
    return {
        "pretrained": str(sft),
        "pairs": "builtin",
        "steps": scale.reward_steps,
        "batch_size": 32,
        "eval_pairs": 512,
        "schedule": "cosine",
        "warmup": 0.1,
    }


def rlhf_base(scale: P.Scale, sft: Path, reward: Path) -> dict[str, Any]:
    return {
        "pretrained": str(sft),
        "reward": "model",
        "reward_model": str(reward),
        "steps": scale.rlhf_steps,
        "batch_size": 16,
        "max_new_tokens": scale.rlhf_max_new_tokens,
        "eval_prompts": scale.rlhf_eval_prompts,
        "eval_every": max(1, scale.rlhf_steps // 4),
        "schedule": "constant",
        "warmup": 0.0,
    }


def fixed() -> dict[str, Any]:
    """The Adam-mini study's AdamW hyperparameters for both, as in pre-training."""
    return {f"hparams.{k}": v for k, v in P.ADAM_MINI_HPARAMS.items()}


def rlhf_series(analysis: Analysis) -> dict[str, SeriesResult]:
    by_label = {s.label: s for s in analysis.series if not s.extra}
    return {opt: by_label[label] for opt, label in LABELS.items() if label in by_label}


def reward_folder(st: Stager, sft: Path) -> Path | None:
    """The finished reward-model run on ``sft``, or None."""
    from optarena.sweep.store import Store

    with Store(st.out, create=False) as store:
        for r in store.runs(status="done"):
            if r.config.get("pairs") is not None and r.config.get("pretrained") == str(sft):
                return store.run_dir(r.id)
    return None


def run_stages(
    st: Stager, scale: P.Scale, seeds: Sequence[int], sft: Path | None, first: int, total: int
) -> None:
    """Stages ``first`` .. ``first + 2`` of ``total`` on the SFT model ``sft``."""
    if sft is None:
        st.console.print("[yellow]RLHF stages skipped: the SFT stage trained no model[/]")
        return
    st.run(
        first,
        total,
        "reward model on the built-in preference pairs (AdamW)",
        reward_base(scale, sft),
        [st.grid("adamw", {}, {"lr": [scale.reward_lr]}, label=REWARD_LABEL)],
        task="reward",
    )
    reward = reward_folder(st, sft)
    if reward is None:
        st.console.print("[yellow]RLHF skipped: the reward model did not train[/]")
        return
    base = rlhf_base(scale, sft, reward)
    lrs = list(scale.rlhf_lrs)
    grids = [st.grid(opt, fixed(), {"lr": lrs}, label=LABELS[opt]) for opt in OPTIMIZERS]
    title = "RLHF (ReMax): AdamW and Adam-mini over the LR grid"
    st.run(first + 1, total, title, base, grids, task="rlhf")
    adamw = rlhf_series(st.analysis((0.05,))).get("adamw")
    repeats = list(seeds[1:])
    grids = []
    if repeats and adamw is not None and adamw.best_lr is not None:
        grids = [
            st.grid(opt, fixed(), {"lr": [adamw.best_lr]}, label=LABELS[opt], seeds=repeats)
            for opt in OPTIMIZERS
        ]
    st.run(first + 2, total, "RLHF seed repeats at AdamW's best LR", base, grids, task="rlhf")


# --------------------------------------------------------------------------- claims


def _summaries(s: SeriesResult | None, lr: float | None, runs: dict[str, Any]) -> list[dict]:
    point = next((p for p in s.curve if p.x == lr), None) if s is not None else None
    if point is None:
        return []
    out = []
    for run_id in point.run_ids:
        rec = runs.get(run_id)
        if rec is not None and rec.summary and rec.summary.get("reward_gain"):
            out.append(rec.summary)
    return out


def gain_interval(summaries: Sequence[dict[str, Any]]) -> tuple[float, float, str] | None:
    """``(mean gain, half-width, how)`` over runs: Student-t over the seeds' mean gains with
    two or more seeds, else the one run's interval paired over the held-out prompts."""
    gains = [s["reward_gain"] for s in summaries]
    if not gains:
        return None
    if len(gains) >= 2:
        means = [g["mean"] for g in gains]
        t = float(scipy.stats.t.ppf(0.975, len(means) - 1))
        half = t * statistics.stdev(means) / math.sqrt(len(means))
        return statistics.fmean(means), half, f"over {len(means)} seeds"
    g = gains[0]
    return g["mean"], (g["high"] - g["low"]) / 2, f"paired over {g['n']} held-out prompts"


def check_claims(analysis: Analysis, runs: dict[str, Any], noise: C.Noise) -> list[C.Claim]:
    S = rlhf_series(analysis)
    adamw, mini = S.get("adamw"), S.get("adam-mini")
    lr = adamw.best_lr if adamw else None
    out = []
    for i, (opt, s) in enumerate((("adamw", adamw), ("adam-mini", mini)), 1):
        statement = f"RLHF (ReMax) raises the SFT model's reward ({opt}, at AdamW's best LR)"
        test = "held-out reward after − before > 0, 95% interval wholly above 0"
        found = gain_interval(_summaries(s, lr, runs))
        if found is None:
            out.append(C.missing(f"R1.{i}", statement, test, f"no finished RLHF run of {opt}"))
            continue
        est, half, how = found
        verdict, reason = C.decide(est, half, 0.0, greater=True)
        first = _summaries(s, lr, runs)[0]
        sentence = (
            f"At LR {lr:.3g}, {opt} takes the held-out reward from "
            f"{first['initial']['reward']:.3f} to {s.reward:.3f}: gain {est:+.3f}, 95% interval "
            f"[{est - half:+.3f}, {est + half:+.3f}] ({how})."
        )
        numbers = {"gain": est, "half_width": half, "lr": lr, "final_reward": s.reward}
        out.append(C.Claim(f"R1.{i}", statement, test, sentence, verdict, reason, numbers))
    out.append(_parity(adamw, mini, runs, noise))
    return out


def _parity(
    adamw: SeriesResult | None, mini: SeriesResult | None, runs: dict[str, Any], noise: C.Noise
) -> C.Claim:
    statement = "Adam-mini's RLHF reward is on par with AdamW's at the same hyperparameters"
    test = (
        "reward(AdamW) − reward(Adam-mini) ≤ δ_R at AdamW's best LR, 95% interval wholly below "
        f"δ_R = {PARITY_SHARE:g} × AdamW's RLHF gain (paired over seeds when both have ≥ 2)"
    )
    pa = C.best(adamw)
    lr = adamw.best_lr if adamw else None
    pm = next((p for p in mini.curve if p.x == lr), None) if mini and lr else None
    gain = gain_interval(_summaries(adamw, lr, runs))
    if pa is None or pm is None or not math.isfinite(pm.loss) or gain is None:
        return C.missing("R2", statement, test, "no finished Adam-mini RLHF run at AdamW's best LR")
    delta = PARITY_SHARE * max(gain[0], 0.0)
    # losses are negative rewards: loss(Adam-mini) − loss(AdamW) = reward(AdamW) − reward(mini)
    est, half, how = C.gap_interval(pm, pa, noise)
    verdict, reason = C.decide(est, half, delta, greater=False)
    if gain[0] <= 0:
        verdict, reason = C.INCONCLUSIVE, "AdamW's RLHF did not raise the reward: no scale for δ_R"
    sentence = (
        f"At AdamW's best RLHF LR {lr:.3g}, Adam-mini reaches a held-out reward of {-pm.loss:.3f} "
        f"and AdamW {-pa.loss:.3f}: shortfall {est:+.3f}, 95% interval [{est - half:+.3f}, "
        f"{est + half:+.3f}] ({how}); δ_R = {delta:.3f}."
    )
    numbers = {"gap": est, "half_width": half, "delta": delta, "lr": lr}
    return C.Claim("R2", statement, test, sentence, verdict, reason, numbers)


def reward_model_row(runs: dict[str, Any]) -> list[str] | None:
    rec = next((r for r in runs.values() if r.config.get("pairs") and r.summary), None)
    if rec is None:
        return None
    s = rec.summary
    return [
        f"{s['pairs']['train']:,}",
        f"{s['pairs']['held_out']:,}",
        f"{s['accuracy']:.1%}" if s.get("accuracy") is not None else "—",
        f"{s['final_val_loss']:.4f}" if s.get("final_val_loss") is not None else "—",
        str(s["steps"]),
    ]


REWARD_HEADER = [
    "training pairs",
    "held-out pairs",
    "held-out accuracy",
    "held-out BT loss",
    "steps",
]
RLHF_HEADER = [
    "optimizer",
    "LR",
    "seeds",
    "reward before → after",
    "gain [95%]",
    "accuracy before → after",
    "KL",
    "response tokens",
]


def rlhf_rows(analysis: Analysis, runs: dict[str, Any]) -> list[list[str]]:
    S = rlhf_series(analysis)
    adamw = S.get("adamw")
    lr = adamw.best_lr if adamw else None
    rows = []
    for opt in OPTIMIZERS:
        summaries = _summaries(S.get(opt), lr, runs)
        found = gain_interval(summaries)
        if not summaries or found is None:
            continue
        est, half, _ = found

        def mean(key: str, part: str, of: list[dict] = summaries) -> float | None:
            values = [s[part].get(key) for s in of if s[part].get(key) is not None]
            return statistics.fmean(values) if values else None

        acc_a, acc_b = mean("accuracy", "initial"), mean("accuracy", "final")
        rows.append(
            [
                opt,
                f"{lr:.3g}",
                str(len(summaries)),
                f"{mean('reward', 'initial'):.3f} → {mean('reward', 'final'):.3f}",
                f"{est:+.3f} [{est - half:+.3f}, {est + half:+.3f}]",
                f"{acc_a:.1%} → {acc_b:.1%}" if acc_a is not None and acc_b is not None else "—",
                f"{mean('kl', 'final'):.2f}",
                f"{mean('response_length', 'final'):.1f}",
            ]
        )
    return rows
