"""The report's figures, drawn with matplotlib's object API (no pyplot, no display needed).

Each figure is rendered once to PNG (embedded in the HTML page) and to SVG (for papers).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from matplotlib.figure import Figure

from optarena.analysis import Analysis, Sensitivity, SeriesResult
from optarena.sweep.store import RunRecord

_MARKERS = "osD^v<>ph*"


@dataclass
class Rendered:
    """One figure: a file stem, a caption and its bytes in both formats."""

    name: str
    title: str
    png: bytes
    svg: bytes


def render(fig: Figure, name: str, title: str) -> Rendered:
    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches="tight")
    fig.savefig(svg, format="svg", bbox_inches="tight")
    return Rendered(name, title, png.getvalue(), svg.getvalue())


def mpl_text(text: str) -> str:
    """User text as matplotlib shows it literally (``$`` would start mathtext)."""
    return text.replace("\\", "\\\\").replace("$", r"\$")


def all_figures(analysis: Analysis, runs: dict[str, RunRecord]) -> list[Rendered]:
    out = []
    models = analysis.models()
    for model in models:
        series = [s for s in analysis.series if s.model == model and s.curve]
        suffix = f"-{_slug(model)}" if len(models) > 1 else ""
        where = f" ({model})" if len(models) > 1 else ""
        if series:
            out.append(loss_vs_lr(series, f"loss-vs-lr{suffix}", f"Final loss vs LR{where}"))
            out.append(
                loss_vs_lr(
                    series, f"loss-vs-lr-aligned{suffix}", f"Aligned at each optimum{where}", True
                )
            )
            out.append(
                best_curves(series, runs, f"curves-at-best-lr{suffix}", f"At best LR{where}")
            )
        keys = sorted({s.key for s in analysis.sensitivities if s.model == model})
        for key in keys:
            group = [
                s for s in analysis.sensitivities if s.model == model and s.key == key and s.curve
            ]
            if not group:
                continue
            out.append(sensitivity(group, f"sensitivity-{_slug(key)}{suffix}", f"{key}{where}"))
    return out


def loss_vs_lr(
    series: Sequence[SeriesResult], name: str, title: str, aligned: bool = False
) -> Rendered:
    """One line per optimizer on log-x; diverged points as crosses along the top edge."""
    fig = Figure(figsize=(8.5, 4.6))
    ax = fig.add_subplot()
    finite = [p.loss for s in series for p in s.curve if math.isfinite(p.loss)]
    top = _top(finite)
    for i, s in enumerate(series):
        scale = s.best_lr if aligned and s.best_lr else 1.0
        xs = [p.x / scale for p in s.curve]
        _plot_with_divergence(ax, xs, [p.loss for p in s.curve], s.name, i, top)
    ax.set_xscale("log")
    ax.set_xlabel("LR / best LR" if aligned else "peak learning rate")
    ax.set_ylabel("final validation loss (nats)")
    _ylim(ax, finite, top)
    if aligned:
        ax.axvline(1.0, color="0.6", linewidth=0.8, linestyle=":")
    ax.set_title(
        mpl_text(title)
        + (
            "  (x: diverged)"
            if any(not math.isfinite(p.loss) for s in series for p in s.curve)
            else ""
        )
    )
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax)
    return render(fig, name, title)


def best_curves(
    series: Sequence[SeriesResult], runs: dict[str, RunRecord], name: str, title: str
) -> Rendered:
    """Validation loss against step for each optimizer's best run (first seed)."""
    fig = Figure(figsize=(8.5, 4.6))
    ax = fig.add_subplot()
    finite: list[float] = []
    for i, s in enumerate(series):
        run = next((runs[r] for r in s.best_run_ids if r in runs and runs[r].eval_curve), None)
        if run is None:
            continue
        steps = [p[0] for p in run.eval_curve if _finite(p[1])]
        losses = [p[1] for p in run.eval_curve if _finite(p[1])]
        finite += losses
        ax.plot(
            steps,
            losses,
            marker=_MARKERS[i % len(_MARKERS)],
            markersize=3,
            label=mpl_text(f"{s.name} @ {s.best_lr:.3g}"),
        )
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats)")
    if finite:
        low = min(finite)
        ax.set_ylim(low - 0.05, low + 1.5 * (sorted(finite)[len(finite) // 2] - low) + 0.1)
    ax.set_title(mpl_text(title))
    ax.grid(True, alpha=0.3)
    _legend(ax)
    return render(fig, name, title)


def sensitivity(group: Sequence[Sensitivity], name: str, title: str) -> Rendered:
    """A 1-D sweep: loss at each value (evenly spaced, labelled), diverged as crosses."""
    values: list[Any] = []
    for s in group:
        values += [p.x for p in s.curve if p.x not in values]
    values.sort(
        key=lambda v: (
            not isinstance(v, (int, float)),
            v if isinstance(v, (int, float)) else str(v),
        )
    )
    index = {str(v): i for i, v in enumerate(values)}
    fig = Figure(figsize=(8.5, 4.2))
    ax = fig.add_subplot()
    finite = [p.loss for s in group for p in s.curve if math.isfinite(p.loss)]
    top = _top(finite)
    _ylim(ax, finite, top)
    for i, s in enumerate(group):
        xs = [index[str(p.x)] for p in s.curve]
        _plot_with_divergence(ax, xs, [p.loss for p in s.curve], s.label, i, top)
    ax.set_xticks(
        range(len(values)), [mpl_text(f"{v:g}" if isinstance(v, float) else str(v)) for v in values]
    )
    ax.set_xlabel(mpl_text(group[0].key))
    ax.set_ylabel("final validation loss (nats)")
    ax.set_title(mpl_text(f"Sensitivity to {title}"))
    ax.grid(True, alpha=0.3)
    _legend(ax)
    return render(fig, name, title)


def _plot_with_divergence(
    ax: Any, xs: Sequence[float], losses: Sequence[float], label: str, index: int, top: float
) -> None:
    """One series: a line through its finished points, an x at ``top`` for each diverged one."""
    ok = [(x, y) for x, y in zip(xs, losses, strict=True) if math.isfinite(y)]
    (line,) = ax.plot(
        [x for x, _ in ok],
        [y for _, y in ok],
        marker=_MARKERS[index % len(_MARKERS)],
        label=mpl_text(label),
    )
    bad = [x for x, y in zip(xs, losses, strict=True) if not math.isfinite(y)]
    if bad:
        ax.plot(
            bad,
            [top] * len(bad),
            linestyle="none",
            marker="x",
            markersize=9,
            markeredgewidth=2,
            color=line.get_color(),
        )


def _legend(ax: Any) -> None:
    """Outside the axes, on the right: it never hides a point or a divergence marker."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _ylim(ax: Any, finite: Sequence[float], top: float) -> None:
    """From just under the best loss to just above the divergence markers' row."""
    if finite:
        span = top - min(finite) + 0.1
        ax.set_ylim(min(finite) - 0.05 * span, top + 0.06 * span)


def _top(finite: Sequence[float]) -> float:
    """Where diverged markers sit: a little above the worst loss that trained."""
    if not finite:
        return 1.0
    return max(finite) + 0.05 * (max(finite) - min(finite) + 0.1)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in text).strip("-") or "x"
