"""``optarena reproduce deconstructing``: Zhao et al.'s experiments, then their claims checked.

Stages (each a sweep into one store; a later stage reads the earlier ones' results):

1. the LR sweep of SGD (heavy ball 0.98), Adam, Adafactor (study variant), Lion, Signum, Sophia
   and Adalayer on the study's half-decade grids;
2. 1-D sweeps of beta1 (momentum) and beta2 at each optimizer's best LR from stage 1;
3. the last-layer / LayerNorm hybrids: EMA-momentum SGD on the body with Adalayer or Adafactor
   on {last layer, LayerNorms, both}, each over the body's LR grid;
4. the frozen-preconditioner variant of Adam (all frozen; last layer and LayerNorms adaptive);
5. with ``--seeds N``, seeds 1..N-1 at every LR series' best LR, for intervals.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from optarena import atomic
from optarena.analysis import Analysis, Sensitivity, SeriesResult
from optarena.reproduce import claims as C
from optarena.reproduce import protocol as P
from optarena.reproduce.runner import Stager
from optarena.sweep.spec import Grid

NAMES = {
    "adamw": "Adam",
    "adafactor": "Adafactor",
    "adalayer": "Adalayer",
    "lion": "Lion",
    "signum": "Signum",
    "sophia": "Sophia",
    "sgd": "SGD",
    "hybrid-adalayer-last-ln": "SGD + Adalayer (last layer, LN)",
    "hybrid-adalayer-last": "SGD + Adalayer (last layer)",
    "hybrid-adalayer-ln": "SGD + Adalayer (LN)",
    "hybrid-adafactor-last-ln": "SGD + Adafactor (last layer, LN)",
    "hybrid-adafactor-last": "SGD + Adafactor (last layer)",
    "hybrid-adafactor-ln": "SGD + Adafactor (LN)",
    "adam-frozen": "Adam, frozen preconditioner",
    "adam-frozen-last-ln": "Adam, frozen except last layer and LN",
}
BETA1_KEY = {"signum": "hparams.momentum", "sgd": "hparams.momentum"}
TOTAL_STAGES = 5


def hparams(optimizer: str) -> dict[str, Any]:
    """The study's settings per optimizer, as dotted ``hparams.*`` keys of a grid."""
    adam = {"hparams.betas": list(P.BETAS), "hparams.eps": P.EPS, "hparams.weight_decay": 0.0}
    table: dict[str, dict[str, Any]] = {
        "adamw": adam,
        "adafactor": adam,
        "adalayer": adam,
        "lion": {"hparams.betas": list(P.BETAS), "hparams.weight_decay": 0.0},
        "sophia": {"hparams.betas": list(P.BETAS), "hparams.weight_decay": 0.0},
        "signum": {"hparams.momentum": P.BETAS[0], "hparams.weight_decay": 0.0},
        "sgd": {"hparams.momentum": P.SGD_MOMENTUM, "hparams.weight_decay": 0.0},
    }
    return dict(table[optimizer])


def hybrid_hparams(model: str) -> dict[str, Any]:
    return {
        "hparams.momentum": P.BETAS[0],
        "hparams.adaptive_lr": P.shifted(P.HYBRID_ADAPTIVE_LR, model),
        "hparams.betas": list(P.BETAS),
        "hparams.eps": P.EPS,
    }


def frozen_hparams(label: str, scale: P.Scale) -> dict[str, Any]:
    return {
        "hparams.betas": list(P.BETAS),
        "hparams.eps": P.EPS,
        "hparams.precondition_steps": max(1, scale.steps // 10),
        "hparams.unfrozen_roles": list(P.FROZEN_LABELS[label]),
    }


# --------------------------------------------------------------------------- stages


def stage1(st: Stager, scale: P.Scale) -> list[Grid]:
    grids = []
    for opt in scale.optimizers or P.STAGE1_OPTIMIZERS:
        lo, hi = P.LR_GRIDS[opt]
        lrs = P.lr_grid(lo, hi, scale.model, scale.lr_points, P.LR_OPTIMA[opt])
        grids.append(st.grid(opt, hparams(opt), {"lr": lrs}))
    return grids


def lr_series(analysis: Analysis, model: str) -> dict[str, SeriesResult]:
    """LR series of one model with nothing else swept, by label."""
    return {s.label: s for s in analysis.series if s.model == model and not s.extra}


def stage2(st: Stager, scale: P.Scale, analysis: Analysis) -> list[Grid]:
    series = lr_series(analysis, scale.model)
    grids = []
    stage1_opts = scale.optimizers or P.STAGE1_OPTIMIZERS
    b1 = [o for o in scale.beta_optimizers or P.BETA1_OPTIMIZERS if o in stage1_opts]
    b2 = [o for o in scale.beta_optimizers or P.BETA2_OPTIMIZERS if o in stage1_opts]
    for opt in b1:
        s = series.get(opt)
        if s is None or s.best_lr is None:
            continue
        key = BETA1_KEY.get(opt, "hparams.beta1")
        grids.append(
            st.grid(opt, {**hparams(opt), "lr": s.best_lr}, {key: list(scale.beta1_values)})
        )
    for opt in b2:
        if opt in BETA1_KEY:  # single-beta methods
            continue
        s = series.get(opt)
        if s is None or s.best_lr is None:
            continue
        fixed = {**hparams(opt), "lr": s.best_lr}
        grids.append(st.grid(opt, fixed, {"hparams.beta2": list(scale.beta2_values)}))
    return grids


def stage3(st: Stager, scale: P.Scale) -> list[Grid]:
    lo, hi = P.HYBRID_GRID
    lrs = P.lr_grid(lo, hi, scale.model, scale.lr_points, P.LR_OPTIMA["hybrid"])
    return [st.grid(h, hybrid_hparams(scale.model), {"lr": lrs}) for h in scale.hybrids]


def stage4(st: Stager, scale: P.Scale) -> list[Grid]:
    lo, hi = P.LR_GRIDS["adamw"]
    lrs = P.lr_grid(lo, hi, scale.model, scale.lr_points, P.LR_OPTIMA["adamw"])
    return [
        st.grid("adam-frozen", frozen_hparams(label, scale), {"lr": lrs}, label=label)
        for label in scale.frozen
    ]


def stage5(st: Stager, scale: P.Scale, analysis: Analysis, repeats: Sequence[int]) -> list[Grid]:
    """The repeat seeds at the best LR of every LR series of stages 1, 3 and 4."""
    if not repeats:
        return []
    series = lr_series(analysis, scale.model)
    fixed_by_label: dict[str, tuple[str, dict[str, Any]]] = {}
    for opt in scale.optimizers or P.STAGE1_OPTIMIZERS:
        fixed_by_label[opt] = (opt, hparams(opt))
    for h in scale.hybrids:
        fixed_by_label[h] = (h, hybrid_hparams(scale.model))
    for label in scale.frozen:
        fixed_by_label[label] = ("adam-frozen", frozen_hparams(label, scale))
    grids = []
    for label, (opt, fixed) in fixed_by_label.items():
        s = series.get(label)
        if s is None or s.best_lr is None:
            continue
        grids.append(st.grid(opt, fixed, {"lr": [s.best_lr]}, label=label, seeds=repeats))
    return grids


def run_stages(st: Stager, scale: P.Scale, seeds: Sequence[int], taus: Sequence[float]) -> Analysis:
    """Stages 1-4 with ``seeds[0]``; stage 5 repeats the best LRs with ``seeds[1:]``."""
    st.seed = seeds[0]
    base = scale.base()
    st.run(1, TOTAL_STAGES, "LR sweep of the seven optimizers", base, stage1(st, scale))
    a = st.analysis(taus)
    st.run(2, TOTAL_STAGES, "beta1 / beta2 at each best LR", base, stage2(st, scale, a))
    st.run(3, TOTAL_STAGES, "last-layer / LayerNorm hybrids", base, stage3(st, scale))
    st.run(4, TOTAL_STAGES, "frozen preconditioner", base, stage4(st, scale))
    a = st.analysis(taus)
    st.run(
        5,
        TOTAL_STAGES,
        f"seed repeats at the best LRs (seeds {list(seeds[1:])})",
        base,
        stage5(st, scale, a, list(seeds[1:])),
    )
    return st.analysis(taus)


# --------------------------------------------------------------------------- claims


def sensitivity(analysis: Analysis, model: str, label: str, key: str) -> Sensitivity | None:
    return next(
        (
            s
            for s in analysis.sensitivities
            if s.model == model and s.label == label and s.key == key
        ),
        None,
    )


def check_claims(
    analysis: Analysis, model: str, tol: C.Tolerances, noise: C.Noise
) -> list[C.Claim]:
    """Every claim of the study, tested on ``model``'s results (pure: no I/O)."""
    S = lr_series(analysis, model)
    adam = S.get("adamw")
    out: list[C.Claim] = []

    def gap(cid: str, label: str, statement: str, worse: bool) -> None:
        out.append(
            C.loss_gap_claim(
                cid,
                statement,
                S.get(label),
                adam,
                tol.delta,
                noise,
                worse=worse,
                names=(NAMES[label], "Adam"),
            )
        )

    def parity(cid: str, label: str, statement: str) -> None:
        gap(cid, label, statement, worse=False)

    def worse(cid: str, label: str, statement: str) -> None:
        gap(cid, label, statement, worse=True)

    def basin(cid: str, label: str, statement: str, narrower: bool = False) -> None:
        out.append(
            C.basin_claim(
                cid,
                statement,
                S.get(label),
                adam,
                tol.tau,
                tol.basin_z,
                narrower=narrower,
                names=(NAMES[label], "Adam"),
            )
        )

    f1 = "Finding 1: except SGD, the optimizers are comparable in optimal loss"
    f1s = "Finding 1: except SGD, the optimizers are comparable in stability to the LR"
    for i, label in enumerate(("adafactor", "lion", "sophia"), 1):
        parity(f"D1.{i}", label, f"{f1}: {NAMES[label]} reaches Adam's best loss")
    worse("D1.4", "sgd", "Finding 1: SGD is worse than Adam in optimal loss")
    for i, label in enumerate(("adafactor", "lion", "sophia"), 1):
        basin(f"D2.{i}", label, f"{f1s}: {NAMES[label]}'s LR basin is as wide as Adam's")
    basin("D2.4", "sgd", "Finding 1: SGD is less stable than Adam: its LR basin is narrower", True)
    parity("D3.1", "signum", "Finding 2: Signum recovers Adam's performance")
    basin("D3.2", "signum", "Finding 2: Signum recovers Adam's stability to the LR")
    parity("D3.3", "adalayer", "Adalayer (one second moment per layer) recovers Adam's performance")

    b1 = {
        NAMES[o]: sensitivity(analysis, model, o, BETA1_KEY.get(o, "hparams.beta1"))
        for o in ("adafactor", "adalayer", "lion", "signum", "sophia")
    }
    b1 = {k: v for k, v in b1.items() if v is not None} or b1
    ref1 = sensitivity(analysis, model, "adamw", "hparams.beta1")
    out.append(
        C.beta_claim(
            "D4.1",
            "Finding 1 (momentum): except SGD, the optimizers tolerate beta1 as Adam does",
            b1,
            ref1,
            tol,
            noise,
            fewer=False,
        )
    )
    out.append(
        C.beta_claim(
            "D4.2",
            "Finding 1 (momentum): SGD is more sensitive to its momentum than Adam to beta1",
            {"SGD": sensitivity(analysis, model, "sgd", "hparams.momentum")},
            ref1,
            tol,
            noise,
            fewer=True,
        )
    )
    b2 = {
        NAMES[o]: sensitivity(analysis, model, o, "hparams.beta2")
        for o in ("adafactor", "adalayer", "lion", "sophia")
    }
    b2 = {k: v for k, v in b2.items() if v is not None} or b2
    out.append(
        C.beta_claim(
            "D4.3",
            "Finding 1 (beta2): the optimizers tolerate beta2 as Adam does",
            b2,
            sensitivity(analysis, model, "adamw", "hparams.beta2"),
            tol,
            noise,
            fewer=False,
        )
    )

    f3 = "Finding 3: adaptivity on the last layer and LayerNorms"
    parity(
        "D5.1",
        "hybrid-adalayer-last-ln",
        f"{f3} (Adalayer) with SGD elsewhere recovers Adam's loss",
    )
    basin(
        "D5.2",
        "hybrid-adalayer-last-ln",
        f"{f3} (Adalayer) with SGD elsewhere recovers Adam's stability",
    )
    parity(
        "D5.3",
        "hybrid-adafactor-last-ln",
        f"{f3} (Adafactor) with SGD elsewhere recovers Adam's loss",
    )
    worse(
        "D5.4",
        "hybrid-adalayer-ln",
        "Finding 3: SGD + adaptive LayerNorms only does not recover Adam's loss",
    )
    worse(
        "D5.5",
        "hybrid-adalayer-last",
        "Finding 3: SGD + adaptive last layer only does not recover Adam's loss (both are needed)",
    )
    parity(
        "D6.1",
        "adam-frozen-last-ln",
        "Frozen preconditioner: Adam with v frozen after a burn-in, except on the last layer and "
        "LayerNorms, keeps Adam's loss",
    )
    return out


def claim_series_groups(model: str) -> list[tuple[str, str, list[str]]]:
    """(figure stem, title, labels) of the figures the reproduction report adds."""
    return [
        (
            "lr-sweep",
            f"Stage 1: final loss vs LR ({model})",
            ["adamw", "adafactor", "adalayer", "lion", "signum", "sophia", "sgd"],
        ),
        (
            "hybrids",
            f"Stage 3: SGD body + adaptive last layer / LayerNorms ({model})",
            ["adamw", "sgd", *P.HYBRIDS],
        ),
        ("frozen", f"Stage 4: frozen preconditioner ({model})", ["adamw", *P.FROZEN_LABELS]),
    ]


# --------------------------------------------------------------------------- report


def write(
    out: Any, analysis: Analysis, scale: P.Scale, tol: C.Tolerances, header: str
) -> tuple[Any, list[C.Claim]]:
    """Check the claims and write ``OUT/report/`` (index.html with the claims first,
    claims.json, claims.md, the stage figures). Returns the page and the claims."""
    from pathlib import Path

    from optarena.report import write_report
    from optarena.report.figures import loss_vs_lr
    from optarena.report.figures import sensitivity as sensitivity_figure
    from optarena.reproduce import render

    out = Path(out)
    noise = C.analysis_noise(analysis, scale.noise_sd)
    claims = check_claims(analysis, scale.model, tol, noise)
    S = lr_series(analysis, scale.model)
    figs = []
    for stem, title, labels in claim_series_groups(scale.model):
        group = [S[label] for label in labels if label in S and S[label].best_lr is not None]
        if len(group) >= 1:
            figs.append(loss_vs_lr(group, f"repro-{stem}", title, aligned=stem == "hybrids"))
            if stem == "lr-sweep":
                figs.append(loss_vs_lr(group, "repro-lr-sweep-aligned", f"{title}, aligned", True))
    for key, title in (("beta1", "beta1 / momentum"), ("beta2", "beta2")):
        keys = ("hparams.beta1", "hparams.momentum") if key == "beta1" else ("hparams.beta2",)
        group = [s for s in analysis.sensitivities if s.model == scale.model and s.key in keys]
        if key == "beta1":  # one figure: the momentum of Signum/SGD is their beta1
            group = [dataclasses.replace(s, key="beta1 / momentum") for s in group]
        if group:
            figs.append(sensitivity_figure(group, f"repro-{key}", f"{title} at each best LR"))
    report_dir = out / "report"
    render.save_figures(report_dir, figs)
    rows = []
    for label, s in S.items():
        b = s.basins.get(tol.tau)
        rows.append(
            [
                NAMES.get(label, label),
                "—" if s.best_lr is None else f"{s.best_lr:.3g}",
                "—" if s.best_loss is None else f"{s.best_loss:.4f}",
                "—" if b is None else ("≥" if b.censored else "") + f"{b.width:.2f}",
                f"{s.divergence_rate:.0%}",
                len(s.curve),
            ]
        )
    table_header = [
        "optimizer",
        "best LR",
        "best loss",
        f"basin τ={tol.tau:g} (decades)",
        "diverged",
        "LRs",
    ]
    body = (
        f"<p>{header}</p>"
        + render.claims_html(claims, noise, tol)
        + render.html_table(table_header, rows)
        + "".join(render.figure_html(f) for f in figs)
    )
    render.write_claims(
        report_dir,
        claims,
        {
            "study": "deconstructing",
            "scale": scale.name,
            "model": scale.model,
            "noise": noise.source,
        },
    )
    atomic.write_text(report_dir / "series.md", render.markdown_table(table_header, rows))
    page = write_report(
        out, analysis.taus, sections=[("Claims of Zhao et al. (Deconstructing)", body)]
    )
    return page, claims
