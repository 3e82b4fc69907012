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
REWARD_LABEL = "reward model"
RLHF_DIR = "rlhf"  # the stages' store, under the reproduction's folder
FIRST_STAGE = 5  # 1-2 pre-training, 3-4 SFT (adam_mini_sft)
# δ_R as a share of AdamW's RLHF gain (R2)
PARITY_SHARE = 0.25


def reward_base(scale: P.Scale, sft: Path) -> dict[str, Any]:
    return {
        "pretrained": str(sft.resolve()),
        "pairs": "builtin",
        "steps": scale.reward_steps,
        "batch_size": 32,
        "eval_pairs": 512,
        "schedule": "cosine",
        "warmup": 0.1,
    }


def rlhf_base(scale: P.Scale, sft: Path, reward: Path) -> dict[str, Any]:
    return {
        "pretrained": str(sft.resolve()),
        "reward": "model",
        "reward_model": str(reward.resolve()),
        "steps": scale.rlhf_steps,
        "batch_size": 16,
        "max_new_tokens": scale.rlhf_max_new_tokens,
        "eval_prompts": scale.rlhf_eval_prompts,
        "eval_every": max(1, scale.rlhf_steps // 4),
        "schedule": "constant",
        "warmup": 0.0,
    }


def fixed() -> dict[str, Any]:
    """The Adam-mini study's AdamW hyperparameters for both, as in pre-training and SFT."""
    return {f"hparams.{k}": v for k, v in P.ADAM_MINI_HPARAMS.items()}


def rlhf_series(analysis: Analysis) -> dict[str, SeriesResult]:
    return {s.label: s for s in analysis.series if s.label in OPTIMIZERS and not s.extra}


def reward_folder(store_dir: Path, sft: Path) -> Path | None:
    """The finished reward-model run on ``sft`` in the store at ``store_dir``, or None."""
    from optarena.sweep.store import Store

    if not (Path(store_dir) / "results.sqlite").is_file():
        return None
    with Store(store_dir, create=False) as store:
        for r in store.runs(status="done"):
            if r.config.get("pairs") is not None and r.config.get("pretrained") == str(
                sft.resolve()
            ):
                return store.run_dir(r.id)
    return None


def stored_analysis(out: Path, taus: Sequence[float]) -> Analysis | None:
    from optarena.analysis import analyze_store

    store = Path(out) / RLHF_DIR
    return analyze_store(store, taus) if (store / "results.sqlite").is_file() else None


def run_stages(
    st: Stager,
    scale: P.Scale,
    seeds: Sequence[int],
    taus: Sequence[float],
    total: int,
    sft: Path | None = None,
) -> Analysis | None:
    """Stage 5: the reward model; 6: ReMax with both optimizers over the LR grid; 7: AdamW's
    best RLHF LR with ``seeds[1:]``; on ``sft`` (default: the SFT stage's AdamW model at its
    best SFT LR). None when there is no SFT model."""
    from optarena.reproduce import adam_mini_sft
    from optarena.tasks import TASKS

    sft = sft or adam_mini_sft.tuned_folder(st.out)
    if sft is None:
        st.console.print(
            f"[bold]stage {FIRST_STAGE}/{total}[/]: RLHF skipped: no fine-tuned AdamW model",
            highlight=False,
        )
        return None

    def sub(task: str) -> Stager:
        return Stager(
            st.out / RLHF_DIR,
            st.args,
            f"{st.prefix}-rlhf",
            console=st.console,
            default_threads=st.default_threads,
            seed=seeds[0],
            function=TASKS[task].function,
        )

    rm = sub("reward")
    rm.run(
        FIRST_STAGE,
        total,
        "reward model on the built-in preference pairs (AdamW, from the SFT model)",
        reward_base(scale, sft),
        [rm.grid("adamw", {}, {"lr": [scale.reward_lr]}, label=REWARD_LABEL)],
    )
    stagers = [rm]
    reward = reward_folder(st.out / RLHF_DIR, sft)
    if reward is not None:
        rl = sub("rlhf")
        stagers.append(rl)
        base = rlhf_base(scale, sft, reward)
        lrs = list(scale.rlhf_lrs)
        title = "RLHF (ReMax) from the SFT model: AdamW and Adam-mini over the LR grid"
        rl.run(
            FIRST_STAGE + 1,
            total,
            title,
            base,
            [rl.grid(o, fixed(), {"lr": lrs}) for o in OPTIMIZERS],
        )
        adamw = rlhf_series(rl.analysis(taus)).get("adamw")
        repeats = list(seeds[1:])
        grids = []
        if repeats and adamw is not None and adamw.best_lr is not None:
            grids = [
                rl.grid(o, fixed(), {"lr": [adamw.best_lr]}, seeds=repeats) for o in OPTIMIZERS
            ]
        rl.run(FIRST_STAGE + 2, total, "RLHF seed repeats at AdamW's best RLHF LR", base, grids)
    else:
        st.console.print("[yellow]RLHF skipped: the reward model did not train[/]")
    for s in stagers:
        st.stages.extend(s.stages)
    return stored_analysis(st.out, taus)


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
        summaries = _summaries(s, lr, runs)
        before = statistics.fmean(x["initial"]["reward"] for x in summaries)
        after = statistics.fmean(x["final_reward"] for x in summaries)
        sentence = (
            f"At LR {lr:.3g}, {opt} takes the held-out reward from {before:.3f} to {after:.3f}: "
            f"gain {est:+.3f}, 95% interval [{est - half:+.3f}, {est + half:+.3f}] ({how})."
        )
        numbers = {"gain": est, "half_width": half, "lr": lr, "final_reward": after}
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


def store_runs(out: Path) -> dict[str, Any]:
    from optarena.sweep.store import Store

    store = Path(out) / RLHF_DIR
    if not (store / "results.sqlite").is_file():
        return {}
    with Store(store, create=False) as st:
        return {r.id: r for r in st.runs()}


def curves_figure(rl: Analysis, runs: dict[str, Any]) -> Any:
    """Held-out reward against RLHF step (0: the SFT model), both optimizers at AdamW's best
    RLHF LR, every seed."""
    from optarena.reproduce.render import Curve, curves_figure

    S = rlhf_series(rl)
    adamw = S.get("adamw")
    lr = adamw.best_lr if adamw else None
    curves = []
    for opt, colour in (("adamw", "C0"), ("adam-mini", "C1")):
        point = next((p for p in S[opt].curve if p.x == lr), None) if opt in S else None
        for k, run_id in enumerate(point.run_ids if point else []):
            summary = runs[run_id].summary or {} if run_id in runs else {}
            start = (summary.get("initial") or {}).get("reward")
            points = [(0, start)] if start is not None else []
            points += [(c["step"], c["reward"]) for c in summary.get("eval_curve", [])]
            curves.append(Curve(points, opt if k == 0 else None, colour=colour))
    return curves_figure(
        curves,
        xlabel="RLHF step (0: the SFT model)",
        ylabel="held-out reward (greedy responses)",
        title="RLHF (ReMax): AdamW vs Adam-mini at AdamW's best RLHF LR",
        name="repro-adam-mini-rlhf",
        caption="RLHF reward curves, AdamW vs Adam-mini",
    )


def section(rl: Analysis | None, out: Path) -> tuple[str, list[Any]]:
    """The report's RLHF part (HTML) and its figures."""
    from optarena.reproduce import render

    if rl is None:
        return "<h3>RLHF</h3><p>Not run: no fine-tuned AdamW model.</p>", []
    runs = store_runs(out)
    figs = [curves_figure(rl, runs)]
    rm = reward_model_row(runs)
    body = (
        "<h3>RLHF (ReMax, built-in task) from the SFT model, at AdamW's best RLHF LR</h3>"
        + "<p>The reward model (AdamW, from the SFT model, built-in preference pairs):</p>"
        + render.html_table(REWARD_HEADER, [rm] if rm else [])
        + render.html_table(RLHF_HEADER, rlhf_rows(rl, runs))
        + "".join(render.figure_html(f) for f in figs)
    )
    return body, figs


def markdown(rl: Analysis | None, out: Path) -> str:
    from optarena.reproduce import render

    if rl is None:
        return ""
    runs = store_runs(out)
    rm = reward_model_row(runs)
    return (
        render.markdown_table(REWARD_HEADER, [rm] if rm else [])
        + "\n"
        + render.markdown_table(RLHF_HEADER, rlhf_rows(rl, runs))
    )


def check(rl: Analysis | None, out: Path) -> list[C.Claim]:
    """R1.1, R1.2 and R2 from the stages' store (missing when RLHF did not run)."""
    if rl is None:
        return [
            C.missing(
                "R1.1",
                "RLHF (ReMax) raises the SFT model's reward (adamw)",
                "gain > 0",
                "no RLHF runs (no fine-tuned AdamW model)",
            ),
            C.missing(
                "R1.2",
                "RLHF (ReMax) raises the SFT model's reward (adam-mini)",
                "gain > 0",
                "no RLHF runs (no fine-tuned AdamW model)",
            ),
            C.missing(
                "R2",
                "Adam-mini's RLHF reward is on par with AdamW's",
                "shortfall ≤ δ_R",
                "no RLHF runs (no fine-tuned AdamW model)",
            ),
        ]
    runs = store_runs(out)
    return check_claims(rl, runs, reward_noise(rl, runs))


def reward_noise(rl: Analysis, runs: dict[str, Any]) -> C.Noise:
    """Seed-to-seed sd of the held-out reward pooled over repeated points; without repeats,
    the sd that AdamW's best run's interval over the held-out prompts implies."""
    points = [p for s in rl.series if s.label in OPTIMIZERS for p in s.curve]
    adamw = rlhf_series(rl).get("adamw")
    found = gain_interval(_summaries(adamw, adamw.best_lr if adamw else None, runs))
    assumed = found[1] / 1.96 if found else 0.0
    noise = C.pooled_noise(points, assumed)
    if noise.dof is None:
        return C.Noise(assumed, None, f"sd {assumed:.3g} over the held-out prompts (no repeats)")
    return noise
