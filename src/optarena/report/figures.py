"""The report's figures, drawn with matplotlib's object API (no pyplot, no display needed).

Each figure is rendered once to PNG (embedded in the HTML page) and to SVG (for papers).
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from optarena.analysis import Analysis, Sensitivity, SeriesResult
from optarena.run_log import METRICS_FILE, read_records
from optarena.speedup import Speedup
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
    """PNG and SVG cropped to what the figure draws (legends outside the axes included). The
    crop is measured once for both formats: ``bbox_inches="tight"`` would measure per save."""
    bbox = fig.get_tightbbox(FigureCanvasAgg(fig).get_renderer()).padded(0.1)
    png, svg = io.BytesIO(), io.BytesIO()
    fig.savefig(png, format="png", dpi=110, bbox_inches=bbox)
    fig.savefig(svg, format="svg", bbox_inches=bbox)
    return Rendered(name, title, png.getvalue(), svg.getvalue())


def mpl_text(text: str) -> str:
    """User text as matplotlib shows it literally (``$`` would start mathtext)."""
    return text.replace("\\", "\\\\").replace("$", r"\$")


def all_figures(
    analysis: Analysis,
    runs: dict[str, RunRecord],
    directory: Path,
    speedups: dict[str, Speedup] | None = None,
) -> list[Rendered]:
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
                best_curves(
                    series, runs, directory, f"curves-at-best-lr{suffix}", f"At best LR{where}"
                )
            )
            mine = [speedups[s.name] for s in series if speedups and s.name in speedups]
            if any(s.token_speedup is not None for s in mine):
                out.append(
                    speedup_figure(mine, f"speedup-vs-adamw{suffix}", f"Speedup vs AdamW{where}")
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
        counts = [p.n_diverged for p in s.curve]
        _plot_with_divergence(
            ax, xs, [p.loss for p in s.curve], s.name, i, _row(finite, top, i), counts, log_x=True
        )
    ax.set_xscale("log")
    ax.set_xlabel("LR / best LR" if aligned else "peak learning rate")
    ax.set_ylabel("final validation loss (nats)")
    _ylim(ax, finite, _row(finite, top, len(series) - 1))
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


PANELS = (
    ("loss", "training loss (nats)", "linear"),
    ("val_loss", "validation loss (nats)", "linear"),
    ("lr", "learning rate", "log"),
    ("grad_norm", "gradient norm (before clipping)", "log"),
)


def run_curves(directory: Path, run: RunRecord) -> dict[str, tuple[list[float], list[float]]]:
    """``key -> (tokens, values)`` from the run's ``metrics.jsonl`` (the store's eval curve when
    the file is gone): training loss, validation loss, LR and gradient norm."""
    records = read_records(directory / "runs" / run.id / METRICS_FILE)
    summary = run.summary or {}
    per_step = (summary.get("tokens") or 0) / (summary.get("steps") or 1) or float(
        run.config.get("batch_size", 16) * run.config.get("seq_len", 128)
    )
    out: dict[str, tuple[list[float], list[float]]] = {key: ([], []) for key, _, _ in PANELS}
    for record in records:
        tokens = record.get("tokens", record.get("step", 0) * per_step)
        for key, _, _ in PANELS:
            value = record.get(key)
            if _finite(value):
                out[key][0].append(tokens)
                out[key][1].append(value)
    if not out["val_loss"][0]:
        for step, loss in run.eval_curve:
            if _finite(loss):
                out["val_loss"][0].append(step * per_step)
                out["val_loss"][1].append(loss)
    return out


def best_curves(
    series: Sequence[SeriesResult],
    runs: dict[str, RunRecord],
    directory: Path,
    name: str,
    title: str,
) -> Rendered:
    """Training loss, validation loss, LR and gradient norm against tokens for each series'
    best run (its first seed), axes unclipped: every logged point is inside them."""
    fig = Figure(figsize=(11, 7.5))
    axes = fig.subplots(2, 2).flatten()
    for i, s in enumerate(series):
        run = next((runs[r] for r in s.best_run_ids if r in runs), None)
        if run is None:
            continue
        curves = run_curves(directory, run)
        for ax, (key, _, _) in zip(axes, PANELS, strict=True):
            xs, ys = curves[key]
            if xs:
                ax.plot(
                    xs,
                    ys,
                    marker=_MARKERS[i % len(_MARKERS)] if key == "val_loss" else None,
                    markersize=3,
                    linewidth=1.1,
                    color=f"C{i % 10}",
                    label=mpl_text(f"{s.name} @ {s.best_lr:.3g}"),
                )
    for ax, (_, label, scale) in zip(axes, PANELS, strict=True):
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        if ax.lines and scale == "log":
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(mpl_text(title))
    return render(fig, name, title)


def speedup_figure(speedups: Sequence[Speedup], name: str, title: str) -> Rendered:
    """Token-equivalent speedup over AdamW per optimizer, with its 16-84% interval."""
    fig = Figure(figsize=(8.5, 0.5 + 0.45 * max(len(speedups), 1)))
    ax = fig.add_subplot()
    shown = [s for s in speedups if s.token_speedup is not None]
    for i, s in enumerate(shown):
        ax.plot([s.token_speedup], [i], marker="o", color=f"C{i % 10}")
        if s.interval is not None and math.isfinite(s.interval[0]):
            hi = s.interval[1] if math.isfinite(s.interval[1]) else s.token_speedup * 10
            ax.plot([s.interval[0], hi], [i, i], color=f"C{i % 10}", linewidth=2)
    ax.set_yticks(range(len(shown)), [mpl_text(s.label) for s in shown])
    ax.axvline(1.0, color="0.5", linestyle=":", linewidth=1)
    ax.set_xscale("log")
    ax.set_xlabel("token-equivalent speedup over AdamW (AdamW tokens for the same loss / tokens)")
    ax.set_title(mpl_text(title))
    ax.grid(True, which="both", alpha=0.3)
    return render(fig, name, title)


def tuning_figures(paths: Sequence[dict[str, Any]]) -> list[Rendered | None]:
    """The static figure of each tune's path (None for a tune with no loss yet), one file stem
    per tune: ``tuning-paths``, or ``tuning-paths-NAME`` when the store holds several tunes."""
    out = []
    for data in paths:
        name = str(data.get("sweep", ""))
        stem = "tuning-paths" if len(paths) == 1 else f"tuning-paths-{_slug(name)}"
        out.append(tuning_paths(data, stem, f"Tuning paths: {name}"))
    return out


def tuning_paths(data: dict[str, Any], name: str, title: str) -> Rendered | None:
    """The incumbent's loss after each step of every search of one tune (``DIR/tune/NAME.json``),
    as steps: flat where no neighbour won by more than the noise. None when nothing has a loss."""
    fig = Figure(figsize=(8.5, 4.6))
    ax = fig.add_subplot()
    for i, s in enumerate(data.get("searches", [])):
        trail = [s["start"]] + [st.get("moved_to") or st["incumbent"] for st in s.get("steps", [])]
        shown = [(k, t["loss"]) for k, t in enumerate(trail) if _finite(t.get("loss"))]
        if shown:
            ax.plot(
                [k for k, _ in shown],
                [y for _, y in shown],
                drawstyle="steps-post",
                marker=_MARKERS[i % len(_MARKERS)],
                color=f"C{i % 10}",
                label=mpl_text(str(s.get("label"))),
            )
    if not ax.lines:
        return None
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step of the search (0: the start)")
    ax.set_ylabel("incumbent's final validation loss (nats)")
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
    _ylim(ax, finite, _row(finite, top, len(group) - 1))
    for i, s in enumerate(group):
        xs = [index[str(p.x)] for p in s.curve]
        counts = [p.n_diverged for p in s.curve]
        _plot_with_divergence(
            ax, xs, [p.loss for p in s.curve], s.label, i, _row(finite, top, i), counts
        )
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
    ax: Any,
    xs: Sequence[float],
    losses: Sequence[float],
    label: str,
    index: int,
    row: float,
    counts: Sequence[int] | None = None,
    log_x: bool = False,
) -> None:
    """One series: a line through its finished points and, on its own row ``row`` above the
    losses, one x per diverged run (several runs at one x side by side), so markers of
    different series or seeds never hide each other."""
    ok = [(x, y) for x, y in zip(xs, losses, strict=True) if math.isfinite(y)]
    (line,) = ax.plot(
        [x for x, _ in ok],
        [y for _, y in ok],
        marker=_MARKERS[index % len(_MARKERS)],
        label=mpl_text(label),
    )
    counts = counts or [1] * len(xs)
    bad_x: list[float] = []
    for x, y, n in zip(xs, losses, counts, strict=True):
        if math.isfinite(y) and not n:
            continue
        for k in range(max(n, 1)):
            shift = (k - (max(n, 1) - 1) / 2) * 0.04
            bad_x.append(x * 10**shift if log_x else x + shift * 2)
    if bad_x:
        ax.plot(
            bad_x,
            [row] * len(bad_x),
            linestyle="none",
            marker="x",
            markersize=8,
            markeredgewidth=2,
            color=line.get_color(),
        )


def _row(finite: Sequence[float], top: float, index: int) -> float:
    """The divergence row of series ``index``: stacked above the worst finite loss."""
    span = (max(finite) - min(finite) + 0.1) if finite else 1.0
    return top + 0.045 * span * index


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
