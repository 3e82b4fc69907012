"""One small page per run (``DIR/report/runs/<id>.html``): its settings, outcome and curves.

The runs table of the report links each run here. A page shows what the run was (optimizer,
model, the values its grid swept, seed, the resolved config), how it ended, and an interactive
figure of its task's curves (:mod:`optarena.report.views`: pre-training's training loss,
validation loss, LR and gradient norm against tokens; an RLHF run's rewards, KL and response
length against steps; ...), from its ``metrics.jsonl``. plotly.js is written once, to
``DIR/report/plotly.min.js``, and every page loads it by a relative path: the pages work
offline from plain files, and each stays small. The figure is built as plotly's JSON directly
(no figure objects), so that hundreds of pages take a second or two.
"""

from __future__ import annotations

import dataclasses
import hashlib
import html
import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from plotly.offline import get_plotlyjs

from optarena import atomic
from optarena.report import views
from optarena.report.views import View, drawn, run_curves, run_view
from optarena.run_log import METRICS_FILE
from optarena.sweep.store import Member, RunRecord

PLOTLY_FILE = "plotly.min.js"
FOLDER = "runs"
MAX_POINTS = 4000  # per curve; longer logs are thinned evenly (the last point kept)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5rem auto;
max-width:1100px;padding:0 1rem;color:#1b1b1b;line-height:1.45}
h1{font-size:1.3rem}table{border-collapse:collapse;font-size:.88rem;margin:.6rem 0}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:left}th{background:#f4f4f4}
pre{background:#f6f6f6;padding:.6rem;font-size:.8rem;overflow:auto}.muted{color:#666}
"""


def page_name(run_id: str) -> str:
    """The page of a run, relative to ``DIR/report/``."""
    return f"{FOLDER}/{run_id}.html"


def write_run_pages(
    directory: Path,
    out: Path,
    runs: Sequence[RunRecord],
    members: Sequence[Member],
    self_check: str = "",
) -> int:
    """Write every run's page under ``out/runs/`` and plotly.js beside them; returns how many
    pages changed (an unchanged page is not rewritten). ``self_check`` is a script that
    records on ``<body>`` what drew (the browser test)."""
    folder = out / FOLDER
    with atomic.storage_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    script = out / PLOTLY_FILE
    js = get_plotlyjs()
    if not script.is_file() or script.stat().st_size != len(js.encode("utf-8")):
        atomic.write_text(script, js)
    places: dict[str, list[Member]] = {}
    for m in members:
        places.setdefault(m.run_id, []).append(m)
    pages = []
    for run in runs:
        path = folder / f"{run.id}.html"
        stamp = signature(directory, run, places.get(run.id, []), self_check)
        if _stamp_of(path) == stamp:  # nothing it shows changed: not even its log is read
            continue
        pages.append((path, _page(directory, run, places.get(run.id, []), self_check, stamp)))
    return atomic.write_texts(pages)


def signature(directory: Path, run: RunRecord, places: Sequence[Member], self_check: str) -> str:
    """What a run's page is made of, hashed: the store's record of the run, its series, the
    size and time of its files, the page's own code. Equal signatures, equal pages."""
    files = []
    for name in (METRICS_FILE, "summary.json", "log.txt", "error.txt"):
        try:
            stat = (directory / "runs" / run.id / name).stat()
            files.append([name, stat.st_size, stat.st_mtime_ns])
        except OSError:
            files.append([name, None, None])
    blob = json.dumps(
        [
            dataclasses.asdict(run),
            sorted(
                ([m.label, m.point, m.sweep] for m in places),
                key=lambda place: json.dumps(place, sort_keys=True, default=str),
            ),  # points are dicts: a run in two series of one label would not sort
            files,
            hashlib.sha256((self_check + _CSS).encode()).hexdigest(),
            [Path(f).stat().st_mtime_ns for f in (__file__, views.__file__)],
        ],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _stamp_of(path: Path) -> str | None:
    """The signature a page was written with (its third line), or None."""
    try:
        with path.open("r", encoding="utf-8") as fh:
            head = [fh.readline() for _ in range(3)]
    except (OSError, UnicodeDecodeError):
        return None
    match = re.fullmatch(r'<meta name="optarena-run-page" content="([0-9a-f]+)">\n', head[2])
    return match.group(1) if match else None


def figure_json(
    curves: Mapping[str, tuple[list[float], list[float]]], view: View
) -> dict[str, Any] | None:
    """plotly's ``{data, layout}`` with a panel per curve of the run's task that holds a
    point; None when nothing was logged."""
    panels = drawn(view.curves, [curves])
    if not panels:
        return None
    data: list[dict[str, Any]] = []
    rows = math.ceil(len(panels) / 2)
    layout: dict[str, Any] = {
        "grid": {"rows": rows, "columns": 2, "pattern": "independent"},
        "height": 320 * rows,
        "showlegend": False,
        "margin": {"l": 70, "r": 20, "t": 30, "b": 50},
    }
    unit = "tokens" if view.x == "tokens" else "steps"
    for k, c in enumerate(panels):
        suffix = "" if k == 0 else str(k + 1)
        xs, ys = _thin(*curves[c.ident])
        data.append(
            {
                "type": "scatter",
                "mode": "lines+markers" if c.records == "eval" or len(xs) == 1 else "lines",
                "x": xs,
                "y": ys,
                "name": c.label,
                "xaxis": f"x{suffix}",
                "yaxis": f"y{suffix}",
                "line": {"width": 1.4, "color": f"hsl({k * 60},60%,40%)"},
                "marker": {"size": 4},
                "hovertemplate": f"%{{x:,.0f}} {unit}<br>%{{y:.4g}}<extra>{c.label}</extra>",
            }
        )
        layout[f"xaxis{suffix}"] = {"title": {"text": view.x_label}}
        layout[f"yaxis{suffix}"] = {"title": {"text": c.label}, "type": c.scale}
    return {"data": data, "layout": layout}


def _thin(xs: list[float], ys: list[float]) -> tuple[list[float], list[float]]:
    if len(xs) <= MAX_POINTS:
        return xs, ys
    step = math.ceil(len(xs) / MAX_POINTS)
    keep = list(range(0, len(xs), step))
    if keep[-1] != len(xs) - 1:
        keep.append(len(xs) - 1)
    return [xs[i] for i in keep], [ys[i] for i in keep]


def _page(
    directory: Path, run: RunRecord, places: Sequence[Member], self_check: str, stamp: str
) -> str:
    e = html.escape
    summary = run.summary or {}
    shown = run_view(run)
    headline = None if run.final_val_loss is None else shown.shown(run.final_val_loss)
    rows = [
        ("optimizer", run.optimizer),
        ("model", run.model),
        ("series", "; ".join(f"{m.label} ({_point(m.point)})" for m in places) or run.optimizer),
        ("seed", run.seed),
        ("status", run.status),
        (shown.headline, _number(headline)),
        ("training tokens", summary.get("tokens")),
        ("wall seconds", _number(run.wall_seconds)),
        ("threads", (summary.get("environment") or {}).get("threads")),
    ]
    if run.error:
        rows.append(("error", run.error))
    table = "".join(
        f"<tr><th>{e(k)}</th><td>{e('' if v is None else str(v))}</td></tr>" for k, v in rows
    )
    fig = figure_json(run_curves(directory, run, shown), shown)
    files = " · ".join(
        f'<a href="../../runs/{e(run.id)}/{name}">{name}</a>'
        for name in ("metrics.jsonl", "summary.json", "log.txt", "error.txt")
        if (directory / "runs" / run.id / name).is_file()
    )
    if fig is None:
        figure = "<p>No metrics were logged for this run.</p>"
    else:
        blob = json.dumps(fig, allow_nan=False, default=_plain).replace("</", "<\\/")
        figure = (
            '<figure class="interactive"><div id="curves" class="js-plotly-plot-target"></div>'
            f"<figcaption>{e(shown.caption()[:1].upper() + shown.caption()[1:])} "
            "(hover for values, drag to zoom, double-click to reset).</figcaption></figure>"
            f"<script>(function(){{var f={blob};"
            'Plotly.newPlot("curves",f.data,f.layout,{displaylogo:false,responsive:true});'
            "})();</script>"
        )
    config = json.dumps(run.config, indent=2, sort_keys=True, default=str)
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f'<meta name="optarena-run-page" content="{stamp}">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>run {e(run.id)}</title><style>{_CSS}</style>",
            f'<script src="../{PLOTLY_FILE}"></script>',
            "</head><body>",
            self_check,
            f'<p><a href="../index.html#run-{e(run.id)}">← the report</a></p>',
            f"<h1>Run <code>{e(run.id)}</code>: {e(run.optimizer)}</h1>",
            f"<table>{table}</table>",
            figure,
            f'<p class="muted">Files of this run: {files or "none left"}.</p>',
            f"<h2>Config</h2><pre>{e(config)}</pre>",
            "</body></html>",
        ]
    )


def _point(point: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "—"


def _number(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    return str(value)
