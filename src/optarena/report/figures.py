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
from matplotlib.ticker import EngFormatter, MaxNLocator

from optarena.analysis import Analysis, Sensitivity, SeriesResult
from optarena.report.story import unbounded
from optarena.report.views import View, drawn, run_curves, view_of, views_by_task
from optarena.speedup import Speedup
from optarena.sweep.store import RunRecord

_MARKERS = "osD^v<>ph*"
_LINESTYLES = ("-", "--", "-.", ":")


def style(index: int) -> dict[str, str]:
    """Colour, marker and line style of series ``index``. Matplotlib has ten colours: series
    ``i`` and ``i + 10`` share one, so the later gets the next marker and the next line style,
    and no two of the first forty series look alike (a preset of thirteen optimizers has
    three pairs)."""
    lap = index // 10
    return {
        "color": f"C{index % 10}",
        "marker": _MARKERS[(index + lap) % len(_MARKERS)],
        "linestyle": _LINESTYLES[lap % len(_LINESTYLES)],
    }


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


@dataclass(frozen=True)
class Group:
    """The series of one model and one task: one set of figures, its file-name ``suffix``
    and the words ``where`` added to its titles (empty when the store holds one group)."""

    model: str
    view: View
    suffix: str
    where: str


def groups(analysis: Analysis) -> list[Group]:
    """Every (model, task) of the analysis; suffixes and titles name the model when there are
    several, and the task when one model has several."""
    models = analysis.models()
    mine = [*analysis.series, *analysis.sensitivities]
    out = []
    for model in models:
        tasks = sorted({s.task for s in mine if s.model == model}, key=lambda t: (t != "train", t))
        for task in tasks:
            suffix = f"-{_slug(model)}" if len(models) > 1 else ""
            where = [model] if len(models) > 1 else []
            if len(tasks) > 1:
                suffix += f"-{_slug(task)}"
                where.append(task)
            text = f" ({', '.join(where)})" if where else ""
            out.append(Group(model, views_by_task(task), suffix, text))
    return out


def all_figures(
    analysis: Analysis,
    runs: dict[str, RunRecord],
    directory: Path,
    speedups: dict[str, Speedup] | None = None,
) -> list[Rendered]:
    out = []
    for g in groups(analysis):
        series = [
            s for s in analysis.series if s.model == g.model and s.task == g.view.task and s.curve
        ]
        suffix, where, shown = g.suffix, g.where, g.view
        if series:
            stem = f"{shown.stem}-vs-lr{suffix}"
            out.append(loss_vs_lr(series, stem, f"Final {shown.noun} vs LR{where}", view=shown))
            out.append(
                loss_vs_lr(
                    series,
                    f"{shown.stem}-vs-lr-aligned{suffix}",
                    f"Aligned at each optimum{where}",
                    True,
                    shown,
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
        sens = [s for s in analysis.sensitivities if s.model == g.model and s.task == shown.task]
        for key in sorted({s.key for s in sens}):
            group = [s for s in sens if s.key == key and s.curve]
            if not group:
                continue
            name = f"sensitivity-{_slug(key)}{suffix}"
            out.append(sensitivity(group, name, f"{key}{where}", shown))
    return out


def loss_vs_lr(
    series: Sequence[SeriesResult],
    name: str,
    title: str,
    aligned: bool = False,
    view: View | None = None,
) -> Rendered:
    """One line per optimizer on log-x; diverged points as crosses along the top edge."""
    return render(loss_vs_lr_figure(series, title, aligned, view), name, title)


def loss_vs_lr_figure(
    series: Sequence[SeriesResult], title: str, aligned: bool = False, view: View | None = None
) -> Figure:
    """The figure of :func:`loss_vs_lr`: the view's headline (the reward with its own sign for
    RLHF) at each LR."""
    shown = view or view_of(series)
    fig = Figure(figsize=(8.5, 4.6))
    ax = fig.add_subplot()
    finite = [shown.shown(p.loss) for s in series for p in s.curve if math.isfinite(p.loss)]
    top = _top(finite)
    for i, s in enumerate(series):
        scale = s.best_lr if aligned and s.best_lr else 1.0
        xs = [p.x / scale for p in s.curve]
        counts = [p.n_diverged for p in s.curve]
        ys = [shown.shown(p.loss) if math.isfinite(p.loss) else math.inf for p in s.curve]
        _plot_with_divergence(ax, xs, ys, s.name, i, _row(finite, top, i), counts, log_x=True)
    ax.set_xscale("log")
    ax.set_xlabel("LR / best LR" if aligned else "peak learning rate")
    ax.set_ylabel(shown.headline)
    _ylim(ax, finite, _highest_row(finite, top, series))
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
    return fig


def best_run_curves(
    series: Sequence[SeriesResult], runs: dict[str, RunRecord], directory: Path
) -> list[tuple[SeriesResult, dict[str, tuple[list[float], list[float]]]]]:
    """Each series with the curves of its best run (its first seed), series without a run
    left out."""
    shown = view_of(series)
    out = []
    for s in series:
        run = next((runs[r] for r in s.best_run_ids if r in runs), None)
        if run is not None:
            out.append((s, run_curves(directory, run, shown)))
    return out


def best_curves(
    series: Sequence[SeriesResult],
    runs: dict[str, RunRecord],
    directory: Path,
    name: str,
    title: str,
) -> Rendered:
    """The curves of each series' best run (its task's: :mod:`optarena.report.views`), axes
    unclipped: every logged point is inside them."""
    return render(best_curves_figure(series, runs, directory, title), name, title)


def best_curves_figure(
    series: Sequence[SeriesResult], runs: dict[str, RunRecord], directory: Path, title: str
) -> Figure:
    shown = view_of(series)
    data = best_run_curves(series, runs, directory)
    panels = drawn(shown.curves, [d for _, d in data]) or list(shown.curves)
    rows = math.ceil(len(panels) / 2)
    fig = Figure(figsize=(11, 3.75 * rows))
    axes = fig.subplots(rows, 2, squeeze=False).flatten()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for i, (s, curves) in enumerate(data):
        for ax, c in zip(axes, panels, strict=False):
            xs, ys = curves[c.ident]
            if xs:
                look = style(i)
                ax.plot(
                    xs,
                    ys,
                    # one point (a run logged once) would be invisible as a line
                    marker=look["marker"] if c.records == "eval" or len(xs) == 1 else None,
                    markersize=3,
                    linewidth=1.1,
                    color=look["color"],
                    linestyle=look["linestyle"],
                    label=mpl_text(f"{s.name} @ {s.best_lr:.3g}"),
                )
    for ax, c in zip(axes, panels, strict=False):
        ax.set_xlabel(shown.x_label)
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 150k, not 150000 run into 160000
        ax.set_ylabel(c.label)
        if ax.lines and c.scale == "log":
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    legend_ax = axes[min(1, len(panels) - 1)]
    if legend_ax.get_legend_handles_labels()[0]:
        legend_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(mpl_text(title))
    return fig


def speedup_figure(speedups: Sequence[Speedup], name: str, title: str) -> Rendered:
    """Token-equivalent speedup over AdamW per optimizer, with its 16-84% interval."""
    fig = Figure(figsize=(8.5, 0.5 + 0.45 * max(len(speedups), 1)))
    ax = fig.add_subplot()
    shown = [s for s in speedups if s.token_speedup is not None]
    for i, s in enumerate(shown):
        ax.plot([s.token_speedup], [i], marker="o", color=f"C{i % 10}")
        if s.interval is not None and not unbounded(s):
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
                label=mpl_text(str(s.get("label"))),
                **style(i),
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


def sensitivity(
    group: Sequence[Sensitivity], name: str, title: str, view: View | None = None
) -> Rendered:
    """A 1-D sweep: the headline at each value (evenly spaced, labelled), diverged as
    crosses."""
    shown = view or view_of(group)
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
    finite = [shown.shown(p.loss) for s in group for p in s.curve if math.isfinite(p.loss)]
    top = _top(finite)
    _ylim(ax, finite, _highest_row(finite, top, group))
    for i, s in enumerate(group):
        xs = [index[str(p.x)] for p in s.curve]
        counts = [p.n_diverged for p in s.curve]
        ys = [shown.shown(p.loss) if math.isfinite(p.loss) else math.inf for p in s.curve]
        _plot_with_divergence(ax, xs, ys, s.label, i, _row(finite, top, i), counts)
    ax.set_xticks(
        range(len(values)), [mpl_text(f"{v:g}" if isinstance(v, float) else str(v)) for v in values]
    )
    ax.set_xlabel(mpl_text(group[0].key))
    ax.set_ylabel(shown.headline)
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
    (line,) = ax.plot([x for x, _ in ok], [y for _, y in ok], label=mpl_text(label), **style(index))
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


def _highest_row(finite: Sequence[float], top: float, series: Sequence[Any]) -> float:
    """The top of what the axes must show: the divergence row of the last series with a
    diverged run, or the worst finite loss when none diverged (no empty rows above it)."""
    diverged = [
        i
        for i, s in enumerate(series)
        if any(p.n_diverged or not math.isfinite(p.loss) for p in s.curve)
    ]
    if diverged:
        return _row(finite, top, max(diverged))
    return max(finite) if finite else top


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
