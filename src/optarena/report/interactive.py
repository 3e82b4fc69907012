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
from optarena.report.figures import PANELS, run_curves
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


def loss_vs_lr(series: Sequence[SeriesResult], ident: str, title: str, aligned: bool) -> str:
    """Final loss against LR; diverged runs as x markers on a row per series above the rest."""
    fig = go.Figure()
    finite = [p.loss for s in series for p in s.curve if math.isfinite(p.loss)]
    top = max(finite, default=1.0)
    span = (top - min(finite, default=0.0)) + 0.1
    for i, s in enumerate(series):
        scale = s.best_lr if aligned and s.best_lr else 1.0
        color = f"hsl({(i * 47) % 360},65%,42%)"
        ok = [p for p in s.curve if math.isfinite(p.loss)]
        fig.add_trace(
            go.Scatter(
                x=[p.x / scale for p in ok],
                y=[p.loss for p in ok],
                mode="lines+markers",
                name=s.name,
                legendgroup=s.name,
                line={"color": color},
                customdata=[[p.x, len(p.losses)] for p in ok],
                hovertemplate="LR %{customdata[0]:.3g}<br>loss %{y:.4f}<br>seeds %{customdata[1]}"
                "<extra>%{fullData.name}</extra>",
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
    fig.update_yaxes(title="final validation loss (nats)")
    fig.update_layout(title=title + " (x: one per diverged run)")
    return _div(fig, ident)


def curves(
    series: Sequence[SeriesResult],
    runs: dict[str, RunRecord],
    directory: Path,
    ident: str,
    title: str,
) -> str:
    """Training loss, validation loss, LR and gradient norm against tokens at each best LR."""
    fig = make_subplots(rows=2, cols=2, subplot_titles=[label for _, label, _ in PANELS])
    for i, s in enumerate(series):
        run = next((runs[r] for r in s.best_run_ids if r in runs), None)
        if run is None:
            continue
        color = f"hsl({(i * 47) % 360},65%,42%)"
        data = run_curves(directory, run)
        for k, (key, _, _) in enumerate(PANELS):
            xs, ys = data[key]
            fig.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines+markers" if key == "val_loss" else "lines",
                    name=f"{s.name} @ {s.best_lr:.3g}",
                    legendgroup=s.name,
                    showlegend=k == 0,
                    line={"color": color, "width": 1.4},
                    marker={"size": 4},
                ),
                row=k // 2 + 1,
                col=k % 2 + 1,
            )
    for k, (_, _, scale) in enumerate(PANELS):
        fig.update_xaxes(title="training tokens", row=k // 2 + 1, col=k % 2 + 1)
        if scale == "log":
            fig.update_yaxes(type="log", row=k // 2 + 1, col=k % 2 + 1)
    fig.update_layout(title=title, height=720)
    return _div(fig, ident)


def speedup(speedups: Sequence[Speedup], ident: str, title: str) -> str | None:
    shown = [s for s in speedups if s.token_speedup is not None]
    if not shown:
        return None
    low = [
        s.token_speedup - s.interval[0] if s.interval and math.isfinite(s.interval[0]) else 0.0
        for s in shown
    ]
    high = [
        (s.interval[1] - s.token_speedup if math.isfinite(s.interval[0] + s.interval[1]) else 0.0)
        if s.interval
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
    models = analysis.models()
    for model in models:
        series = [s for s in analysis.series if s.model == model and s.curve]
        if not series:
            continue
        suffix = f"-{''.join(c if c.isalnum() else '-' for c in model)}" if len(models) > 1 else ""
        where = f" ({model})" if len(models) > 1 else ""
        out.append(
            (
                f"loss-vs-lr{suffix}",
                loss_vs_lr(series, f"fig-loss-vs-lr{suffix}", f"Final loss vs LR{where}", False),
            )
        )
        out.append(
            (
                f"loss-vs-lr-aligned{suffix}",
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
