"""Claim tables (HTML for the report, Markdown for docs) and the reproduction's own figures."""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optarena import atomic
from optarena.reproduce.claims import FAILS, HOLDS, INCONCLUSIVE, Claim, Noise, Tolerances, overall

_COLOURS = {HOLDS: "#1a7f37", FAILS: "#cf222e", INCONCLUSIVE: "#9a6700"}


def claims_html(claims: Sequence[Claim], noise: Noise, tol: Tolerances, note: str = "") -> str:
    e = html.escape
    counts = overall(claims)
    rows = []
    for c in claims:
        colour = _COLOURS.get(c.verdict, "#555")
        why = f'<br><span class="muted">{e(c.reason)}</span>' if c.reason else ""
        rows.append(
            f'<tr><td class="l">{e(c.id)}</td><td class="l">{e(c.statement)}</td>'
            f'<td class="l" style="color:{colour};font-weight:600">{e(c.verdict)}</td>'
            f'<td class="l">{e(c.sentence)}{why}</td></tr>'
        )
    tests = "".join(f"<li><b>{e(c.id)}</b>: {e(c.test)}</li>" for c in claims)
    return (
        f"<p>{counts[HOLDS]} hold, {counts[FAILS]} do not hold, {counts[INCONCLUSIVE]} are "
        f"inconclusive at this scale. Noise: {e(noise.source)}. Tolerances: "
        f"δ = {tol.delta:g} nats, τ = {tol.tau:g} nats, Z = {tol.basin_z:g} decades. {e(note)}</p>"
        '<table id="claims"><thead><tr><th class="l">id</th><th class="l">claim</th>'
        '<th class="l">verdict</th><th class="l">our result</th></tr></thead><tbody>'
        + "".join(rows)
        + "</tbody></table>"
        + f"<details><summary>the tests, precisely</summary><ul>{tests}</ul></details>"
    )


def claims_markdown(claims: Sequence[Claim]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| id | claim | verdict | our result |", "| --- | --- | --- | --- |"]
    for c in claims:
        result = c.sentence + (f" *({c.reason})*" if c.reason else "")
        lines.append(f"| {c.id} | {cell(c.statement)} | **{c.verdict}** | {cell(result)} |")
    return "\n".join(lines) + "\n"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], left: int = 1) -> str:
    e = html.escape
    cls = [' class="l"' if i < left else "" for i in range(len(header))]
    head = "".join(f"<th{cls[i]}>{e(str(h))}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>" + "".join(f"<td{cls[i]}>{e(str(c))}</td>" for i, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure_html(fig: Any) -> str:
    data = base64.b64encode(fig.png).decode("ascii")
    e = html.escape
    return (
        f'<figure><img alt="{e(fig.title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{e(fig.title)} (<code>{e(fig.name)}.png</code>)</figcaption></figure>"
    )


@dataclass(frozen=True)
class Curve:
    """One line of a comparison figure: (x, y) points, its legend label (None: unlabelled, a
    further seed of a labelled line) and matplotlib's style and colour."""

    points: Sequence[tuple[float, float]]
    label: str | None
    style: str = "-"
    colour: str | None = None


def curves_figure(
    curves: Sequence[Curve],
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    name: str,
    caption: str,
    ylim: tuple[float, float] | None = None,
) -> Any:
    """The reproduction's curve figures (validation loss, SFT loss, RLHF reward against step):
    every curve with markers, a grid, and a legend when something is drawn."""
    from matplotlib.figure import Figure

    from optarena.report.figures import render

    fig = Figure(figsize=(7.5, 4.4))
    ax = fig.add_subplot()
    for c in curves:
        if c.points:
            xs, ys = zip(*c.points, strict=True)
            ax.plot(xs, ys, c.style, color=c.colour, marker="o", markersize=3, label=c.label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
        if ylim is not None:
            ax.set_ylim(*ylim)
    ax.set_title(title)
    return render(fig, name, caption)


def save_figures(out: Path, figs: Sequence[Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for fig in figs:
        atomic.write_bytes(out / f"{fig.name}.png", fig.png)
        atomic.write_bytes(out / f"{fig.name}.svg", fig.svg)


def write_claims(out: Path, claims: Sequence[Claim], extra: dict[str, Any]) -> None:
    """``claims.json`` (verdicts and numbers) and ``claims.md`` (the table for docs)."""
    out.mkdir(parents=True, exist_ok=True)
    payload = {**extra, "claims": [c.to_dict() for c in claims], "counts": overall(claims)}
    atomic.write_text(out / "claims.json", json.dumps(payload, indent=2, default=str) + "\n")
    atomic.write_text(out / "claims.md", claims_markdown(claims))
