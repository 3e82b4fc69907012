"""The report's tuning section: the path each ``optarena tune`` search took.

Read from ``DIR/tune/NAME.json`` (written by the tune after every batch): per search, the
incumbent after each round with its loss, and every step (the axis, the neighbours tried, the
move or not), so a reader sees how each optimizer's settings were reached and how sure that is.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

from optarena.sweep.progress import short_value


def _point(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]}={short_value(v)}" for k, v in point.items())


def _loss(entry: Mapping[str, Any]) -> str:
    if entry.get("diverged"):
        return "diverged"
    loss = entry.get("loss")
    return "—" if loss is None else f"{loss:.4f}"


def _run_links(entry: Mapping[str, Any]) -> str:
    return " ".join(
        f'<a href="#run-{html.escape(r)}">{html.escape(r[:6])}</a>'
        for r in entry.get("run_ids", [])
    )


def figure(data: Mapping[str, Any], ident: str) -> str | None:
    """The incumbent's loss after each step of every search (interactive; hover: settings)."""
    import plotly.graph_objects as go

    from optarena.report.interactive import _div

    fig = go.Figure()
    for i, s in enumerate(data["searches"]):
        trail = [s["start"]] + [st.get("moved_to") or st["incumbent"] for st in s.get("steps", [])]
        shown = [(k, t) for k, t in enumerate(trail) if t.get("loss") is not None]
        if not shown:
            continue
        fig.add_trace(
            go.Scatter(
                x=[k for k, _ in shown],
                y=[t["loss"] for _, t in shown],
                mode="lines+markers",
                name=str(s.get("label")),
                line={"color": f"hsl({(i * 47) % 360},65%,42%)", "shape": "hv"},
                text=[_point(t["point"]) for _, t in shown],
                hovertemplate="step %{x}: %{y:.4f}<br>%{text}<extra>%{fullData.name}</extra>",
            )
        )
    if not fig.data:
        return None
    fig.update_xaxes(title="step of the search (0: the start)")
    fig.update_yaxes(title="incumbent's final validation loss (nats)")
    fig.update_layout(title="Tuning paths: the incumbent after each step")
    return _div(fig, ident)


def section(
    paths: Sequence[Mapping[str, Any]], table: Any, static: Sequence[str | None] = ()
) -> str:
    """HTML of every tuning path; ``table(header, rows, left=..., html_columns=...)`` draws a
    table as the rest of the page does; ``static[n]``: the file stem of path ``n``'s PNG/SVG
    figure beside the page, linked from its caption."""
    e = html.escape
    parts = ['<div id="tuning">']
    for n, data in enumerate(paths):
        parts.append(
            f"<p>Tuning <code>{e(str(data.get('sweep', '')))}</code>: per optimizer, "
            "coordinate descent one axis at a time around the incumbent. Noise model: "
            f"{e(str(data.get('noise', '')))}.</p>"
        )
        summary = []
        for s in data["searches"]:
            inc = s.get("incumbent") or {}
            summary.append(
                [
                    e(str(s.get("label"))),
                    e(_point(inc.get("point", {}))),
                    e(_loss(inc)),
                    e(str(s.get("status"))),
                    str(len(s.get("rounds", []))),
                    str(s.get("evaluated", 0)),
                    str(s.get("runs", 0)),
                ]
            )
        header = ["optimizer", "tuned settings", "loss", "status", "rounds", "points", "runs"]
        parts.append(table(header, summary, left=2, html_columns=set(range(7))))
        div = figure(data, f"fig-tuning-{n}")
        stem = static[n] if n < len(static) else None
        files = (
            f' (static: <a href="{e(stem)}.png">{e(stem)}.png</a>, '
            f'<a href="{e(stem)}.svg">{e(stem)}.svg</a>)'
            if stem
            else ""
        )
        if div is not None:
            parts.append(
                f'<figure class="interactive">{div}<figcaption>Each search\'s incumbent after '
                "each step (a step looks at the neighbours on one axis; flat: no neighbour won "
                f"by more than the noise).{files}</figcaption></figure>"
            )
        for s in data["searches"]:
            rows = [
                [
                    "start",
                    e(_point(s["start"]["point"])),
                    e(_loss(s["start"])),
                    _run_links(s["start"]),
                ]
            ]
            rows += [
                [str(r["round"]), e(_point(r["point"])), e(_loss(r)), _run_links(r)]
                for r in s.get("rounds", [])
            ]
            parts.append(
                f"<h3>{e(str(s.get('label')))}: incumbent per round</h3>"
                + table(
                    ["round", "incumbent", "loss", "runs"], rows, left=2, html_columns={0, 1, 2, 3}
                )
            )
            steps = []
            for st in s.get("steps", []):
                axis = st["axis"]
                tried = "; ".join(
                    f"{short_value(c['point'][axis])}: {_loss(c)}" for c in st["candidates"]
                )
                here = st["incumbent"]
                steps.append(
                    [
                        str(st["round"]),
                        e(axis),
                        e(f"{short_value(here['point'][axis])} ({_loss(here)})"),
                        e(tried),
                        "moved" if st["moved"] else "stays",
                    ]
                )
            if steps:
                parts.append(
                    f"<details><summary>{len(steps)} steps</summary>"
                    + table(
                        ["round", "axis", "incumbent value (loss)", "neighbours tried", ""],
                        steps,
                        left=5,
                        html_columns=set(range(5)),
                    )
                    + "</details>"
                )
    parts.append("</div>")
    return "\n".join(parts)
