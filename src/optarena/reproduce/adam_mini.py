"""``optarena reproduce adam-mini``: AdamW vs Adam-mini on Llama-style models of two sizes.

Stages: (1) both optimizers over the same LR grid with the same hyperparameters (the authors
advise AdamW's settings for Adam-mini) at each size; (2) with ``--seeds 0 1 2``, seeds 1, 2 for
both at AdamW's best LR (paired comparisons). The claims checked at each size: about 50% less
optimizer state, and a loss on par or better at AdamW's hyperparameters; plus the partition
check on Hugging Face Llama (GQA), GPT-2 and BERT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optarena import atomic
from optarena.analysis import Analysis, CurvePoint, SeriesResult
from optarena.reproduce import claims as C
from optarena.reproduce import protocol as P
from optarena.reproduce.runner import Stager
from optarena.sweep.spec import Grid

OPTIMIZERS = ("adamw", "adam-mini")
# pre-training: 1 LR grid, 2 seed repeats; SFT (adam_mini_sft): 3, 4; RLHF (adam_mini_rlhf):
# 5 reward model, 6 LR grid, 7 seed repeats
TOTAL_STAGES = 7


def model_overrides(model: str) -> dict[str, Any]:
    """Llama options and grouped-query attention (half as many key/value heads)."""
    from optarena.model import PRESETS

    heads = int(PRESETS[model]["n_head"])
    return {**P.LLAMA_OVERRIDES, "n_kv_head": max(1, heads // 2)}


def base(scale: P.Scale, model: str) -> dict[str, Any]:
    b = scale.base(model)
    b["steps"] = scale.adam_mini_steps or scale.steps
    b["model_overrides"] = model_overrides(model)
    return b


def fixed() -> dict[str, Any]:
    return {f"hparams.{k}": v for k, v in P.ADAM_MINI_HPARAMS.items()}


def stage1(st: Stager, scale: P.Scale, model: str) -> list[Grid]:
    points = scale.lr_points if scale.lr_points is not None else P.ADAM_MINI_POINTS
    lrs = P.lr_grid(*P.ADAM_MINI_LRS, model, points, P.ADAM_MINI_CENTER)
    return [st.grid(opt, fixed(), {"lr": lrs}) for opt in OPTIMIZERS]


def series(analysis: Analysis, model: str) -> dict[str, SeriesResult]:
    return {s.label: s for s in analysis.series if s.model == model and not s.extra}


def stage2(st: Stager, model: str, analysis: Analysis, repeats: Sequence[int]) -> list[Grid]:
    adamw = series(analysis, model).get("adamw")
    if not repeats or adamw is None or adamw.best_lr is None:
        return []
    return [st.grid(opt, fixed(), {"lr": [adamw.best_lr]}, seeds=repeats) for opt in OPTIMIZERS]


def run_stages(st: Stager, scale: P.Scale, seeds: Sequence[int], taus: Sequence[float]) -> Analysis:
    """Stage 1 with ``seeds[0]``; stage 2 repeats AdamW's best LR with ``seeds[1:]``."""
    st.seed = seeds[0]
    for model in scale.adam_mini_models:
        st.run(
            1,
            TOTAL_STAGES,
            f"AdamW and Adam-mini over the LR grid ({model})",
            base(scale, model),
            stage1(st, scale, model),
        )
    a = st.analysis(taus)
    for model in scale.adam_mini_models:
        st.run(
            2,
            TOTAL_STAGES,
            f"seed repeats at AdamW's best LR ({model})",
            base(scale, model),
            stage2(st, model, a, list(seeds[1:])),
        )
    pretraining = st.analysis(taus)
    # post-training stages start from the pre-training stage's AdamW model
    from optarena.reproduce import adam_mini_sft

    adam_mini_sft.run_stages(st, scale, seeds, pretraining, TOTAL_STAGES)
    from optarena.reproduce import adam_mini_rlhf

    adam_mini_rlhf.run_stages(st, scale, seeds, taus, TOTAL_STAGES)
    return pretraining


# --------------------------------------------------------------------------- claims


def point_at(s: SeriesResult | None, lr: float | None) -> CurvePoint | None:
    if s is None or lr is None:
        return None
    return next((p for p in s.curve if p.x == lr and math.isfinite(p.loss)), None)


def check_claims(
    analysis: Analysis,
    models: Sequence[str],
    tol: C.Tolerances,
    noise: C.Noise,
    partition_rows: Sequence[Any] | None,
) -> list[C.Claim]:
    out: list[C.Claim] = []
    for i, model in enumerate(models, 1):
        S = series(analysis, model)
        adamw, mini = S.get("adamw"), S.get("adam-mini")
        a_bytes = adamw.state_bytes_per_param if adamw else None
        m_bytes = mini.state_bytes_per_param if mini else None
        saving = 1 - m_bytes / a_bytes if a_bytes and m_bytes is not None else None
        out.append(
            C.ratio_claim(
                f"M1.{i}",
                f"Adam-mini uses ~50% less optimizer memory than AdamW ({model})",
                f"1 − state(Adam-mini) / state(AdamW) ≥ {tol.memory_saving:g} (bytes of optimizer "
                "state per parameter, measured from the state tensors)",
                saving,
                tol.memory_saving,
                lambda v, a=a_bytes, m=m_bytes: (
                    f"Adam-mini keeps {m:.2f} bytes of state per parameter, AdamW {a:.2f}: "
                    f"{v:.1%} less."
                ),
                greater=True,
            )
            if saving is not None
            else C.missing(
                f"M1.{i}",
                f"Adam-mini uses ~50% less optimizer memory than AdamW ({model})",
                f"1 − state(Adam-mini) / state(AdamW) ≥ {tol.memory_saving:g}",
                "no finished run of both optimizers",
            )
        )
        out.append(_parity(f"M2.{i}", model, adamw, mini, tol, noise))
    out.append(_partition_claim(partition_rows))
    return out


def _parity(
    cid: str,
    model: str,
    adamw: SeriesResult | None,
    mini: SeriesResult | None,
    tol: C.Tolerances,
    noise: C.Noise,
    statement: str | None = None,
    loss: str = "loss",
) -> C.Claim:
    """Adam-mini's ``loss`` (a validation loss) at AdamW's best LR is at most δ above AdamW's."""
    statement = statement or (
        "Adam-mini's loss is on par with or better than AdamW's at the same hyperparameters "
        f"({model})"
    )
    test = (
        f"{loss}(Adam-mini) − {loss}(AdamW) ≤ δ = {tol.parity_delta:g} nats at AdamW's best LR, "
        "95% interval wholly below δ (paired over seeds when both have ≥ 2)"
    )
    pa = C.best(adamw)
    pm = point_at(mini, adamw.best_lr if adamw else None)
    if pa is None or pm is None:
        return C.missing(cid, statement, test, "no trained Adam-mini run at AdamW's best LR")
    assert adamw is not None and mini is not None
    est, half, how = C.gap_interval(pm, pa, noise)
    verdict, reason = C.decide(est, half, tol.parity_delta, greater=False)
    own = C.best(mini)
    sentence = (
        f"At AdamW's best LR {adamw.best_lr:.3g}, Adam-mini reaches {pm.loss:.4f} "
        f"(perplexity {math.exp(pm.loss):.2f}) and AdamW {pa.loss:.4f} ({math.exp(pa.loss):.2f}): "
        f"gap {est:+.4f} nats, 95% interval [{est - half:+.4f}, {est + half:+.4f}] ({how})"
        + (
            f"; Adam-mini's own best is {own.loss:.4f} at LR {mini.best_lr:.3g}"
            if own is not None and mini.best_lr != adamw.best_lr
            else ""
        )
        + "."
    )
    numbers = {
        "gap": est,
        "half_width": half,
        "adamw": pa.loss,
        "adam_mini": pm.loss,
        "lr": adamw.best_lr,
    }
    return C.Claim(cid, statement, test, sentence, verdict, reason, numbers)


def _partition_claim(rows: Sequence[Any] | None) -> C.Claim:
    statement = "Adam-mini's partition rules, applied to Hugging Face Llama (GQA), GPT-2 and BERT"
    test = (
        "every parameter's block count equals the one the rules give (written out per architecture)"
    )
    if rows is None:
        return C.missing("M3", statement, test, "transformers is not installed")
    bad = [r for r in rows if not r.ok]
    models = sorted({r.model for r in rows})
    if bad:
        listed = ", ".join(
            f"{r.model}: {r.name} ours {r.ours}, expected {r.expected}" for r in bad[:5]
        )
        return C.Claim(
            "M3", statement, test, f"{len(bad)} of {len(rows)} tensors differ: {listed}.", C.FAILS
        )
    return C.Claim(
        "M3",
        statement,
        test,
        f"All {len(rows)} tensors of {len(models)} models ({'; '.join(models)}) get the blocks "
        "the rules give.",
        C.HOLDS,
    )


# --------------------------------------------------------------------------- report


def size_rows(analysis: Analysis, models: Sequence[str], runs: dict[str, Any]) -> list[list[str]]:
    rows = []
    for model in models:
        S = series(analysis, model)
        adamw, mini = S.get("adamw"), S.get("adam-mini")
        pa = C.best(adamw)
        pm = point_at(mini, adamw.best_lr if adamw else None)
        if pa is None or pm is None or adamw is None:
            continue

        def run_of(p: CurvePoint) -> dict[str, Any]:
            rec = runs.get(p.run_ids[0])
            return (rec.summary or {}) if rec else {}

        sa, sm = run_of(pa), run_of(pm)
        params = sa.get("params") or 0

        def step_ms(s: dict[str, Any]) -> str:
            t, n = s.get("train_seconds"), s.get("steps")
            return f"{1000 * t / n:.1f}" if t and n else "—"

        def mb(s: dict[str, Any]) -> str:
            b = s.get("optimizer_state_bytes")
            return f"{b / 2**20:.2f}" if b is not None else "—"

        rows.append(
            [
                model,
                f"{params / 1e6:.2f}M",
                f"{adamw.best_lr:.3g}",
                f"{pa.loss:.4f} / {math.exp(pa.loss):.2f}",
                f"{pm.loss:.4f} / {math.exp(pm.loss):.2f}",
                f"{mb(sa)} / {mb(sm)}",
                f"{step_ms(sa)} / {step_ms(sm)}",
                f"{sa.get('tokens_per_second', 0):,.0f} / {sm.get('tokens_per_second', 0):,.0f}",
            ]
        )
    return rows


SIZE_HEADER = [
    "model",
    "params",
    "LR (AdamW's best)",
    "AdamW loss / ppl",
    "Adam-mini loss / ppl",
    "state MiB AdamW / mini",
    "step ms AdamW / mini",
    "tokens/s AdamW / mini",
]
PAPER_HEADER = ["size", "tokens", "AdamW ppl", "Adam-mini ppl", "Adam-mini − AdamW (nats)"]


def paper_rows() -> list[list[str]]:
    return [
        [size, tokens, f"{a:.3f}", f"{m:.3f}", f"{math.log(m) - math.log(a):+.4f}"]
        for size, tokens, a, m in P.ADAM_MINI_PAPER_TABLE
    ]


def curves_figure(analysis: Analysis, models: Sequence[str], runs: dict[str, Any]) -> Any:
    """Validation loss against step, AdamW and Adam-mini at AdamW's best LR, every size; the
    y-axis is cut at the lower half of the losses so that the last steps can be told apart."""
    from optarena.reproduce.render import Curve, curves_figure

    curves: list[Curve] = []
    for model in models:
        S = series(analysis, model)
        adamw = S.get("adamw")
        for opt, style in (("adamw", "-"), ("adam-mini", "--")):
            p = point_at(S.get(opt), adamw.best_lr if adamw else None)
            rec = runs.get(p.run_ids[0]) if p else None
            points = [(x, y) for x, y in (rec.eval_curve if rec else []) if y is not None]
            curves.append(Curve(points, f"{opt} ({model})", style))
    finite = sorted(y for c in curves for _, y in c.points)
    ylim = None
    if finite:
        low = finite[0]
        ylim = (low - 0.05, low + 1.5 * (finite[len(finite) // 2] - low) + 0.1)
    return curves_figure(
        curves,
        xlabel="step",
        ylabel="validation loss (nats)",
        title="AdamW vs Adam-mini at AdamW's best LR (same hyperparameters)",
        name="repro-adam-mini-curves",
        caption="AdamW vs Adam-mini at AdamW's best LR",
        ylim=ylim,
    )


def write(
    out: Path | str, analysis: Analysis, scale: P.Scale, tol: C.Tolerances, header: str
) -> tuple[Path, list[C.Claim]]:
    from optarena.report import write_report
    from optarena.report.figures import loss_vs_lr
    from optarena.reproduce import partition_check, render
    from optarena.sweep.store import Store

    out = Path(out)
    with Store(out, create=False) as store:
        runs = {r.id: r for r in store.runs()}
    from optarena.reproduce import adam_mini_sft

    noise = C.analysis_noise(analysis, scale.noise_sd)
    rows = partition_check.check()
    claims = check_claims(analysis, scale.adam_mini_models, tol, noise, rows)
    sft = adam_mini_sft.stored_analysis(out, analysis.taus)
    sft_noise = C.analysis_noise(sft, scale.noise_sd) if sft is not None else None
    claims.append(adam_mini_sft.check_claim(sft, scale, tol, sft_noise))
    sft_body, sft_figs = adam_mini_sft.section(sft, out)
    from optarena.reproduce import adam_mini_rlhf

    rl = adam_mini_rlhf.stored_analysis(out, analysis.taus)
    claims += adam_mini_rlhf.check(rl, out)
    rl_body, rl_figs = adam_mini_rlhf.section(rl, out)
    figs = [curves_figure(analysis, scale.adam_mini_models, runs)]
    for model in scale.adam_mini_models:
        group = [s for s in series(analysis, model).values() if s.best_lr is not None]
        if group:
            figs.append(
                loss_vs_lr(
                    group, f"repro-adam-mini-lr-{model}", f"Final loss vs LR ({model}, Llama-style)"
                )
            )
    report_dir = out / "report"
    render.save_figures(report_dir, figs + sft_figs + rl_figs)
    sizes = size_rows(analysis, scale.adam_mini_models, runs)
    part_rows = [
        [
            r.model,
            r.name,
            "x".join(map(str, r.shape)),
            r.rule,
            "/".join(map(str, r.expected)),
            r.ours_layout,
            "yes" if r.ok else "NO",
        ]
        for r in rows or []
    ]
    part_header = ["model", "parameter", "shape", "rule", "expected blocks", "ours", "match"]
    body = (
        f"<p>{header}</p>"
        + render.claims_html(claims, noise, tol, f"On par: δ = {tol.parity_delta:g} nats.")
        + "<h3>Ours, at AdamW's best LR (loss / perplexity; state; step time; throughput)</h3>"
        + render.html_table(SIZE_HEADER, sizes)
        + "<h3>The authors' table (Llama, Chinchilla-optimal tokens), for context</h3>"
        + render.html_table(PAPER_HEADER, paper_rows())
        + "".join(render.figure_html(f) for f in figs)
        + sft_body
        + rl_body
        + "<h3>Partition check</h3><details><summary>every parameter</summary>"
        + render.html_table(part_header, part_rows, left=4)
        + "</details>"
    )
    render.write_claims(
        report_dir, claims, {"study": "adam-mini", "scale": scale.name, "noise": noise.source}
    )
    atomic.write_text(
        report_dir / "sizes.md",
        render.markdown_table(SIZE_HEADER, sizes)
        + "\n"
        + render.markdown_table(PAPER_HEADER, paper_rows()),
    )
    if sft is not None:
        sft_table = adam_mini_sft.table_rows(sft, out)
        atomic.write_text(
            report_dir / "sft.md", render.markdown_table(adam_mini_sft.SFT_HEADER, sft_table)
        )
    if rl is not None:
        atomic.write_text(report_dir / "rlhf.md", adam_mini_rlhf.markdown(rl, out))
    atomic.write_text(report_dir / "partition.md", render.markdown_table(part_header, part_rows))
    page = write_report(out, analysis.taus, sections=[("Claims of Zhang et al. (Adam-mini)", body)])
    return page, claims
