"""The page's interactive figures (hover, toggle a series in the legend, zoom), with plotly.

Each figure is a ``<div>`` with its data; plotly.js itself is inlined once per page
(:func:`script`), so the page works offline from a plain file. The static PNG/SVG of the same
figures (``optarena.report.figures``) stay beside it for papers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import plotly.graph_objects as go
from plotly.offline import get_plotlyjs
from plotly.subplots import make_subplots

from optarena.analysis import Analysis, SeriesResult
from optarena.report.figures import best_run_curves, groups
from optarena.report.story import unbounded
from optarena.report.views import View, drawn, view_of
from optarena.speedup import Speedup
from optarena.sweep.store import RunRecord

_CONFIG = {"displaylogo": False, "responsive": True}


def script() -> str:
    """plotly.js, once per page."""
    return f'<script type="text/javascript">{get_plotlyjs()}</script>'


def _div(fig: go.Figure, ident: str) -> str:
    fig.update_layout(template="plotly_white", margin={"l": 60, "r": 20, "t": 50, "b": 50})
    return fig.to_html(
        full_html=False,
        include_plotlyjs=False,
        div_id=ident,
        config=_CONFIG,
        default_height="460px",
    )


def loss_vs_lr(
    series: Sequence[SeriesResult], ident: str, title: str, aligned: bool, view: View | None = None
) -> str:
    return _div(loss_vs_lr_figure(series, title, aligned, view), ident)


def loss_vs_lr_figure(
    series: Sequence[SeriesResult], title: str, aligned: bool, view: View | None = None
) -> go.Figure:
    """The headline of the series' task (the final loss; an RLHF run's reward with its own
    sign) against LR; diverged runs as x markers on a row per series above the rest."""
    shown = view or view_of(series)
    fig = go.Figure()
    finite = [shown.shown(p.loss) for s in series for p in s.curve if math.isfinite(p.loss)]
    top = max(finite, default=1.0)
    span = (top - min(finite, default=0.0)) + 0.1
    for i, s in enumerate(series):
        scale = s.best_lr if aligned and s.best_lr else 1.0
        color = f"hsl({(i * 47) % 360},65%,42%)"
        ok = [p for p in s.curve if math.isfinite(p.loss)]
        fig.add_trace(
            go.Scatter(
                x=[p.x / scale for p in ok],
                y=[shown.shown(p.loss) for p in ok],
                mode="lines+markers",
                name=s.name,
                legendgroup=s.name,
                line={"color": color},
                customdata=[[p.x, len(p.losses)] for p in ok],
                hovertemplate=f"LR %{{customdata[0]:.3g}}<br>{shown.noun} %{{y:.4f}}<br>seeds "
                "%{customdata[1]}<extra>%{fullData.name}</extra>",
            )
        )
        bad = [(p.x, k) for p in s.curve for k in range(p.n_diverged)]
        if bad:
            row = top + 0.05 * span * (i + 1)
            fig.add_trace(
                go.Scatter(
                    x=[x / scale * 10 ** (0.04 * k) for x, k in bad],
                    y=[row] * len(bad),
                    mode="markers",
                    marker={"symbol": "x", "size": 10, "color": color},
                    name=f"{s.name}: diverged",
                    legendgroup=s.name,
                    showlegend=False,
                    customdata=[x for x, _ in bad],
                    hovertemplate="LR %{customdata:.3g}: diverged<extra>%{fullData.name}</extra>",
                )
            )
    fig.update_xaxes(type="log", title="LR / best LR" if aligned else "peak learning rate")
    fig.update_yaxes(title=shown.headline)
    fig.update_layout(title=title + " (x: one per diverged run)")
    return fig


def curves(
    series: Sequence[SeriesResult],
    runs: dict[str, RunRecord],
    directory: Path,
    ident: str,
    title: str,
) -> str:
    return _div(curves_figure(series, runs, directory, title), ident)


def curves_figure(
    series: Sequence[SeriesResult], runs: dict[str, RunRecord], directory: Path, title: str
) -> go.Figure:
    """The curves of the series' task (:mod:`optarena.report.views`) at each best LR, one
    panel each, titled with what it plots."""
    shown = view_of(series)
    data = best_run_curves(series, runs, directory)
    panels = drawn(shown.curves, [d for _, d in data]) or list(shown.curves)
    rows = math.ceil(len(panels) / 2)
    fig = make_subplots(rows=rows, cols=2, subplot_titles=[c.label for c in panels])
    for i, (s, curves) in enumerate(data):
        color = f"hsl({(i * 47) % 360},65%,42%)"
        for k, c in enumerate(panels):
            xs, ys = curves[c.ident]
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines+markers" if c.records == "eval" or len(xs) == 1 else "lines",
                    name=f"{s.name} @ {s.best_lr:.3g}",
                    legendgroup=s.name,
                    showlegend=k == 0,
                    line={"color": color, "width": 1.4},
                    marker={"size": 4},
                    hovertemplate=f"%{{x:,.0f}}<br>%{{y:.4g}}<extra>{c.label}</extra>",
                ),
                row=k // 2 + 1,
                col=k % 2 + 1,
            )
    for k, c in enumerate(panels):
        fig.update_xaxes(title=shown.x_label, row=k // 2 + 1, col=k % 2 + 1)
        fig.update_yaxes(title=c.label, row=k // 2 + 1, col=k % 2 + 1)
        if c.scale == "log":
            fig.update_yaxes(type="log", row=k // 2 + 1, col=k % 2 + 1)
    fig.update_layout(title=title, height=360 * rows)
    return fig


def speedup(speedups: Sequence[Speedup], ident: str, title: str) -> str | None:
    shown = [s for s in speedups if s.token_speedup is not None]
    if not shown:
        return None
    # no bar where the fit cannot bound the speedup (a bar to 0 on a log axis has no end)
    low = [
        s.token_speedup - s.interval[0] if s.interval and not unbounded(s) else 0.0 for s in shown
    ]
    high = [
        s.interval[1] - s.token_speedup
        if s.interval and not unbounded(s) and math.isfinite(s.interval[1])
        else 0.0
        for s in shown
    ]
    fig = go.Figure(
        go.Scatter(
            x=[s.token_speedup for s in shown],
            y=[s.label for s in shown],
            mode="markers",
            error_x={"type": "data", "symmetric": False, "array": high, "arrayminus": low},
            marker={"size": 10},
            name="speedup",
            hovertemplate="%{y}: %{x:.2f}× AdamW's tokens<extra></extra>",
        )
    )
    fig.add_vline(x=1.0, line_dash="dot", line_color="gray")
    fig.update_xaxes(type="log", title="token-equivalent speedup over AdamW (16–84% range)")
    fig.update_layout(title=title, showlegend=False)
    return _div(fig, ident)


def all_divs(
    analysis: Analysis,
    runs: dict[str, RunRecord],
    directory: Path,
    speedups: dict[str, Speedup],
) -> list[tuple[str, str]]:
    """``(file stem of the static twin, div)`` per interactive figure."""
    out = []
    for g in groups(analysis):
        series = [
            s for s in analysis.series if s.model == g.model and s.task == g.view.task and s.curve
        ]
        if not series:
            continue
        suffix, where, stem = g.suffix, g.where, g.view.stem
        out.append(
            (
                f"{stem}-vs-lr{suffix}",
                loss_vs_lr(
                    series, f"fig-{stem}-vs-lr{suffix}", f"Final {g.view.noun} vs LR{where}", False
                ),
            )
        )
        out.append(
            (
                f"{stem}-vs-lr-aligned{suffix}",
                loss_vs_lr(series, f"fig-aligned{suffix}", f"Aligned at each optimum{where}", True),
            )
        )
        out.append(
            (
                f"curves-at-best-lr{suffix}",
                curves(series, runs, directory, f"fig-curves{suffix}", f"At best LR{where}"),
            )
        )
        sp = speedup(
            [speedups[s.name] for s in series if s.name in speedups],
            f"fig-speedup{suffix}",
            f"Speedup vs AdamW{where}",
        )
        if sp is not None:
            out.append((f"speedup-vs-adamw{suffix}", sp))
    return out
