"""The supervised fine-tuning stages of ``optarena reproduce adam-mini``.

The Adam-mini study compares the optimizers after pre-training too: supervised fine-tuning (and
RLHF) from the same pretrained model, with the same hyperparameters for both. Here the model is
the reproduction's own: the AdamW run at AdamW's best LR on the smallest size
(``scale.adam_mini_models[0]``), seed ``seeds[0]``, read from its run folder's last checkpoint.
Both optimizers fine-tune it on the built-in task (:mod:`optarena.posttrain.builtin`) over an
LR grid around the pre-training LR (a decade either side at micro scale), then (``--seeds``)
repeat AdamW's best SFT LR. The runs have their own store, ``OUT/sft/``, so the pre-training
analysis is unchanged.

Claim M4: Adam-mini's validation loss on the responses is on par with AdamW's at AdamW's best SFT
LR (the M2 test on the fine-tuning losses).

:func:`tuned_folder` gives the fine-tuned AdamW model at its best SFT LR: where a later stage
(RLHF) starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optarena.analysis import Analysis, SeriesResult, analyze_store
from optarena.reproduce import claims as C
from optarena.reproduce import protocol as P
from optarena.reproduce.runner import Stager

SFT_DIR = "sft"  # the stages' store, under the reproduction's folder
FIRST_STAGE = 3  # stages 1-2 are pre-training (adam_mini.run_stages)
OPTIMIZERS = ("adamw", "adam-mini")


def sft_model(scale: P.Scale) -> str:
    return scale.adam_mini_models[0]


def run_folder(out: Path, analysis: Analysis, label: str, model: str | None) -> Path | None:
    """The folder of ``label``'s run at its own best LR (its first seed) that holds a
    checkpoint, or None. ``model`` None: series of any model (a fine-tuning store's)."""
    from optarena.sweep.store import Store

    found = [s for s in analysis.series if s.label == label and not s.extra]
    found = [s for s in found if model is None or s.model == model]
    point = C.best(found[0]) if found else None
    if point is None:
        return None
    with Store(out, create=False) as store:
        folder = store.run_dir(point.run_ids[0])
    return folder if any((folder / "checkpoints").glob("step-*.pt")) else None


def pretrained_folder(out: Path, analysis: Analysis, scale: P.Scale) -> Path | None:
    """The pre-training run fine-tuning starts from: AdamW at its best LR, smallest size."""
    return run_folder(out, analysis, "adamw", sft_model(scale))


def tuned_folder(out: Path) -> Path | None:
    """The SFT run of AdamW at its best SFT LR (what RLHF starts from), or None."""
    store = Path(out) / SFT_DIR
    if not (store / "results.sqlite").is_file():
        return None
    return run_folder(store, analyze_store(store), "adamw", None)


def sft_lrs(pretraining_lr: float, points: int) -> list[float]:
    """``points`` half-decade steps around the pre-training LR (five: from a decade below to a
    decade above it; an even count has the extra point below)."""
    low = -(points // 2)
    return [P.round12(pretraining_lr * 10 ** (k / 2)) for k in range(low, low + points)]


def base(scale: P.Scale, pretrained: Path) -> dict[str, Any]:
    return {
        "pretrained": str(pretrained.resolve()),
        "data": "builtin",
        "steps": scale.sft_steps,
        "batch_size": scale.sft_batch_size,
        "seq_len": scale.seq_len,
        "eval_every": max(1, scale.sft_steps // 4),
        "eval_examples": scale.sft_eval_examples,
        "eval_generate": scale.sft_eval_generate,
        "schedule": "cosine",
        "warmup": 0.05,
        "warmup_start": 0.1,
        "final_lr_fraction": 0.1,
        "grad_clip": 1.0,
    }


def fixed() -> dict[str, Any]:
    return {f"hparams.{k}": v for k, v in P.ADAM_MINI_HPARAMS.items()}


def series(analysis: Analysis) -> dict[str, SeriesResult]:
    return {s.label: s for s in analysis.series if not s.extra}


def run_stages(
    st: Stager, scale: P.Scale, seeds: Sequence[int], analysis: Analysis, total: int
) -> Analysis | None:
    """Stage 3: both optimizers over the SFT LR grid; stage 4: AdamW's best SFT LR with
    ``seeds[1:]``. None when pre-training left no model to fine-tune."""
    from optarena.posttrain.sft import FUNCTION

    pretrained = pretrained_folder(st.out, analysis, scale)
    adamw = series_of(analysis, "adamw", sft_model(scale))
    if pretrained is None or adamw is None or adamw.best_lr is None:
        st.console.print(
            f"[bold]stage {FIRST_STAGE}/{total}[/]: fine-tuning skipped: no pre-trained AdamW "
            "checkpoint at its best LR",
            highlight=False,
        )
        return None
    sub = Stager(
        st.out / SFT_DIR,
        st.args,
        f"{st.prefix}-sft",
        console=st.console,
        default_threads=st.default_threads,
        seed=seeds[0],
        function=FUNCTION,
    )
    lrs = sft_lrs(adamw.best_lr, scale.sft_lr_points)
    sft_base = base(scale, pretrained)
    sub.run(
        FIRST_STAGE,
        total,
        f"SFT of AdamW's pre-trained {sft_model(scale)}: AdamW and Adam-mini over the LR grid",
        sft_base,
        [sub.grid(opt, fixed(), {"lr": lrs}) for opt in OPTIMIZERS],
    )
    sft = sub.analysis(analysis.taus)
    best = series(sft).get("adamw")
    repeats = list(seeds[1:])
    grids = []
    if repeats and best is not None and best.best_lr is not None:
        grids = [
            sub.grid(opt, fixed(), {"lr": [best.best_lr]}, seeds=repeats) for opt in OPTIMIZERS
        ]
    sub.run(FIRST_STAGE + 1, total, "SFT seed repeats at AdamW's best SFT LR", sft_base, grids)
    st.stages.extend(sub.stages)
    return sub.analysis(analysis.taus)


def series_of(analysis: Analysis, label: str, model: str) -> SeriesResult | None:
    return next(
        (s for s in analysis.series if s.label == label and s.model == model and not s.extra),
        None,
    )


def stored_analysis(out: Path, taus: Sequence[float]) -> Analysis | None:
    store = Path(out) / SFT_DIR
    return analyze_store(store, taus) if (store / "results.sqlite").is_file() else None


# --------------------------------------------------------------------------- claim and report


def check_claim(
    sft: Analysis | None, scale: P.Scale, tol: C.Tolerances, noise: C.Noise | None
) -> C.Claim:
    from optarena.reproduce.adam_mini import _parity

    model = sft_model(scale)
    statement = f"Adam-mini's SFT loss is on par with AdamW's at the same hyperparameters ({model})"
    if sft is None or noise is None:
        return C.missing(
            "M4",
            statement,
            f"SFT response loss(Adam-mini) − (AdamW) ≤ δ = {tol.parity_delta:g} nats",
            "no fine-tuning runs (pre-training left no AdamW checkpoint)",
        )
    S = series(sft)
    return _parity(
        "M4", model, S.get("adamw"), S.get("adam-mini"), tol, noise, statement, "SFT loss"
    )


SFT_HEADER = [
    "optimizer",
    "SFT LR",
    "pretrained response loss",
    "after SFT",
    "gain (nats)",
    "exact match before → after",
    "state MiB",
    "tokens/s",
]


def table_rows(sft: Analysis, out: Path) -> list[list[str]]:
    """AdamW and Adam-mini at AdamW's best SFT LR: losses, gain, accuracy, state, speed."""
    from optarena.reproduce.adam_mini import point_at
    from optarena.sweep.store import Store

    S = series(sft)
    adamw = S.get("adamw")
    if adamw is None or adamw.best_lr is None:
        return []
    with Store(Path(out) / SFT_DIR, create=False) as store:
        runs = {r.id: r for r in store.runs()}
    rows = []
    for opt in OPTIMIZERS:
        point = point_at(S.get(opt), adamw.best_lr)
        if point is None:
            continue
        summaries = [runs[i].summary or {} for i in point.run_ids if i in runs]
        starts = [s["pretrained_val_loss"] for s in summaries if s.get("pretrained_val_loss")]
        start = sum(starts) / len(starts) if starts else math.nan

        def mean(key: str, values: list[dict[str, Any]] = summaries) -> float:
            xs = [v[key] for v in values if isinstance(v.get(key), (int, float))]
            return sum(xs) / len(xs) if xs else math.nan

        state = mean("optimizer_state_bytes") / 2**20
        rows.append(
            [
                opt,
                f"{adamw.best_lr:.3g}",
                f"{start:.4f}",
                f"{point.loss:.4f}",
                f"{start - point.loss:.3f}",
                f"{mean('pretrained_exact_match'):.1%} → {mean('final_exact_match'):.1%}",
                f"{state:.2f}",
                f"{mean('tokens_per_second'):,.0f}",
            ]
        )
    return rows


def curves_figure(sft: Analysis, out: Path) -> Any:
    """Validation response loss against SFT step, both optimizers at AdamW's best SFT LR,
    every seed."""
    from optarena.reproduce.adam_mini import point_at
    from optarena.reproduce.render import Curve, curves_figure
    from optarena.sweep.store import Store

    S = series(sft)
    adamw = S.get("adamw")
    with Store(Path(out) / SFT_DIR, create=False) as store:
        runs = {r.id: r for r in store.runs()}
    curves = []
    for opt, colour in (("adamw", "C0"), ("adam-mini", "C1")):
        p = point_at(S.get(opt), adamw.best_lr if adamw else None)
        for k, run_id in enumerate(p.run_ids if p else []):
            rec = runs.get(run_id)
            points = [(x, y) for x, y in (rec.eval_curve if rec else []) if y is not None]
            curves.append(Curve(points, opt if k == 0 else None, colour=colour))
    return curves_figure(
        curves,
        xlabel="SFT step (0: the pretrained model)",
        ylabel="validation loss on responses (nats)",
        title="SFT: AdamW vs Adam-mini at AdamW's best SFT LR",
        name="repro-adam-mini-sft",
        caption="SFT curves, AdamW vs Adam-mini",
    )


def section(sft: Analysis | None, out: Path) -> tuple[str, list[Any]]:
    """The report's SFT part (HTML) and its figures."""
    from optarena.report.figures import loss_vs_lr
    from optarena.reproduce import render

    if sft is None:
        return "<h3>Supervised fine-tuning</h3><p>Not run: no pre-trained AdamW checkpoint.</p>", []
    figs = [curves_figure(sft, out)]
    group = [s for s in series(sft).values() if s.best_lr is not None]
    if group:
        figs.append(loss_vs_lr(group, "repro-adam-mini-sft-lr", "SFT response loss vs LR"))
    body = (
        "<h3>Supervised fine-tuning (built-in task), at AdamW's best SFT LR</h3>"
        + render.html_table(SFT_HEADER, table_rows(sft, out))
        + "".join(render.figure_html(f) for f in figs)
    )
    return body, figs


__all__ = [
    "FIRST_STAGE",
    "SFT_DIR",
    "check_claim",
    "pretrained_folder",
    "run_stages",
    "section",
    "stored_analysis",
    "tuned_folder",
]
