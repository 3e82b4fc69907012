"""``write_report(DIR)``: the files of ``DIR/report/`` from the results store alone."""

from __future__ import annotations

import base64
import html
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from optarena import atomic
from optarena.analysis import DEFAULT_TAUS, Analysis, analyze, observations_from_store
from optarena.errors import StorageError
from optarena.report import figures, interactive, run_pages, story, tables, tuning
from optarena.report.views import views_by_task
from optarena.sweep.store import Store
from optarena.sweep.tune import read_paths

# After load, the page records on <body> how many interactive figures drew a non-empty plot
# and how many script errors happened: a browser (tests/test_report_browser.py) reads them.
_SELF_CHECK = """<script>
(function () {
  var errors = 0;
  window.addEventListener("error", function () { errors += 1; });
  window.addEventListener("load", function () {
    var plots = document.querySelectorAll(".js-plotly-plot");
    var drawn = 0;
    plots.forEach(function (p) {
      var svg = p.querySelector("svg.main-svg");
      var marks = p.querySelectorAll(".scatterlayer .trace path, .scatterlayer .point");
      if (svg && svg.getBoundingClientRect().width > 0 && marks.length > 0) { drawn += 1; }
    });
    document.body.setAttribute("data-figures", String(document.querySelectorAll(
      "figure.interactive").length));
    document.body.setAttribute("data-drawn", String(drawn));
    document.body.setAttribute("data-errors", String(errors));
  });
})();
</script>"""

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;padding:0 1rem;color:#1b1b1b;line-height:1.45}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.88rem;margin:.6rem 0}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}
figure{margin:1.2rem 0}figure img{max-width:100%;height:auto}
figcaption{font-size:.9rem;color:#555}.muted{color:#666;font-size:.9rem}
code{background:#f4f4f4;padding:0 .2rem}
"""


def write_report(
    directory: str | Path,
    taus: Sequence[float] = DEFAULT_TAUS,
    sections: Sequence[tuple[str, str]] = (),
) -> Path:
    """Write the page, ``summary.csv/json``, ``runs.csv`` and every figure; return the page.

    ``sections``: ``(heading, HTML)`` pairs shown first (``optarena reproduce`` puts its claim
    verdicts there); the HTML is trusted, callers escape what they put in it."""
    directory = Path(directory)
    out = directory / "report"
    _check_outputs(out)  # before the store is opened: a refused report leaves DIR as it was
    with Store(directory, create=False) as store:
        runs = store.runs()
        members = store.members()
        counts = store.counts()
    analysis = analyze(observations_from_store(directory), taus)
    by_id = {r.id: r for r in runs}
    told = story.tell(analysis, by_id)
    with atomic.storage_errors(out):
        out.mkdir(parents=True, exist_ok=True)
    atomic.clean_temp_files(out, recursive=True)  # of a report killed while writing

    summary = tables.summary_rows(analysis, told.speedups)
    tables.write_csv(out / "summary.csv", summary)
    tables.write_json(out / "summary.json", summary)
    atomic.write_json(out / "story.json", story_json(told))
    run_rows = tables.run_rows(runs, members)
    tables.write_csv(out / "runs.csv", run_rows)

    rendered = figures.all_figures(analysis, by_id, directory, told.speedups)
    paths = read_paths(directory)
    tuning_figures = figures.tuning_figures(paths)
    for fig in [*rendered, *(f for f in tuning_figures if f is not None)]:
        atomic.write_bytes(out / f"{fig.name}.png", fig.png)
        atomic.write_bytes(out / f"{fig.name}.svg", fig.svg)

    run_pages.write_run_pages(directory, out, runs, members, _SELF_CHECK)
    divs = dict(interactive.all_divs(analysis, by_id, directory, told.speedups))
    page = out / "index.html"
    atomic.write_text(
        page,
        _page(
            directory,
            analysis,
            told,
            rendered,
            divs,
            run_rows,
            counts,
            sections,
            paths,
            [None if f is None else f.name for f in tuning_figures],
        ),
    )
    return page


# what the report writes into DIR/report/: a folder in the way of one of these is refused first
_OUTPUT_SUFFIXES = (".html", ".csv", ".json", ".png", ".svg")


def _check_outputs(out: Path) -> None:
    """A file where ``DIR/report`` goes, or a folder where one of its files goes, is refused
    before anything is written, so a report is never half replaced by a failed ``report``."""
    if out.exists() and not out.is_dir():
        raise StorageError(
            f"cannot write the report into {out}: it is a file, not a folder; move it away"
        )
    if not out.is_dir():
        return
    for entry in out.iterdir():
        if entry.name.endswith(_OUTPUT_SUFFIXES) and entry.is_dir():
            atomic.refuse_folder(entry)


def story_json(told: story.Story) -> dict[str, Any]:
    """What the page says in words, for tools and tests: setup, conclusions, caveats."""
    noise = told.noise
    return {
        "setup": [{"what": k, "value": v} for k, v in told.setup],
        "conclusions": told.conclusions,
        "caveats": told.caveats,
        "best_group": told.best_group,
        "noise": None
        if noise is None
        else {"sd": noise.sd, "band": noise.band, "measured": noise.measured},
    }


def _page(
    directory: Path,
    analysis: Analysis,
    told: story.Story,
    rendered: Sequence[figures.Rendered],
    divs: dict[str, str],
    run_rows: Sequence[dict[str, Any]],
    counts: dict[str, int],
    sections: Sequence[tuple[str, str]] = (),
    paths: Sequence[dict[str, Any]] = (),
    tuning_files: Sequence[str | None] = (),
) -> str:
    e = html.escape
    header, cells = tables.display_rows(analysis, told.speedups)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>optarena report: {e(directory.resolve().name)}</title>",
        f"<style>{_CSS}</style>",
        interactive.script() if divs or paths else "",
        "</head><body>",
        _SELF_CHECK,
        f"<h1>optarena sweep report: <code>{e(directory.resolve().name)}</code></h1>",
        '<p class="muted">'
        + e(
            f"{sum(counts.values())} runs: "
            + ", ".join(f"{n} {status}" for status, n in counts.items() if n)
            + f". Generated {time.strftime('%Y-%m-%d %H:%M')} from {directory / 'results.sqlite'}."
        )
        + "</p>",
        *(f"<h2>{e(heading)}</h2>\n{body}" for heading, body in sections),
        "<h2>Setup</h2>",
        _table(["", ""], told.setup, left=2, css_id="setup"),
        '<h2>Conclusions</h2><div id="conclusions">',
        *(f"<p>{e(text)}</p>" for text in told.conclusions),
        "</div>",
        '<p class="muted">' + e("Noise model: " + told.noise.describe() + ".") + "</p>"
        if told.noise
        else "",
        *(
            ['<h3>Caveats</h3><ul id="caveats">']
            + [f"<li>{e(c)}</li>" for c in told.caveats]
            + ["</ul>"]
            if told.caveats
            else []
        ),
        "<h2>Summary</h2>",
        _table(header, cells, left=2, css_id="summary"),
        '<p class="muted">'
        + e(
            "Best loss: mean final validation loss over seeds at the best LR (± half-width of the "
            "95% Student-t interval when there are several seeds). Basin τ: decades of LR around "
            "the optimum whose loss stays within τ nats of the best, interpolated on log10 LR "
            "(≥: the basin reaches the edge of the grid). Diverged: share of runs that diverged. "
            "State B/param: optimizer state bytes per model parameter. × AdamW tokens: AdamW's "
            "tokens to reach the same loss (from the power law L(D) = a·D^−b + c fitted to its "
            "best run's eval curve, or to its best runs at several training lengths: see the "
            "conclusions) divided by the optimizer's tokens, with the 16–84% range over "
            "the fit's uncertainty. Steps to target: first evaluation step at or below AdamW's "
            "best final loss. Rows are sorted by best loss." + _task_note(analysis)
        )
        + "</p>",
    ]
    if not rendered and paths and not analysis.series:
        parts.append(
            "<p>No LR series: the runs of this store are tuning runs, shown under "
            '<a href="#tuning">Tuning paths</a>.</p>'
        )
    elif not rendered:
        parts.append("<p>No finished runs yet: the figures appear as runs finish.</p>")
    for fig in rendered:
        files = (
            f'(static: <a href="{e(fig.name)}.png">{e(fig.name)}.png</a>, '
            f'<a href="{e(fig.name)}.svg">{e(fig.name)}.svg</a>)'
        )
        if fig.name in divs:  # interactive: hover, click a legend entry to hide it, zoom
            parts.append(
                f'<figure class="interactive">{divs[fig.name]}'
                f"<figcaption>{e(fig.title)} {files}</figcaption></figure>"
            )
            continue
        data = base64.b64encode(fig.png).decode("ascii")
        parts.append(
            f'<figure><img alt="{e(fig.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{e(fig.title)} {files}</figcaption></figure>"
        )
    if analysis.comparisons:
        parts.append("<h2>Pairwise comparisons at the best LR</h2>")
        rows = [
            [
                c.model,
                c.a,
                c.b,
                _headline_difference(c.task, c.difference),
                "—" if c.p_value is None else f"{c.p_value:.3g}",
            ]
            for c in analysis.comparisons
        ]
        header = ["model", "A", "B", "A − B (final loss; RLHF: reward)", "p (Welch)"]
        if all(c.task == "train" for c in analysis.comparisons):
            header[3] = "loss A − B"
        parts.append(_table(header, rows, left=3))
        parts.append(
            '<p class="muted">'
            + e(
                "Welch's two-sided t-test on the seeds at each side's own best LR; needs at "
                "least two seeds per side. The best LR is chosen on the same seeds, so p-values "
                "are optimistic."
            )
            + "</p>"
        )
    if paths:
        parts.append("<h2>Tuning paths</h2>")
        parts.append(tuning.section(paths, _table, tuning_files))
    if analysis.sensitivities:
        parts.append("<h2>1-D sensitivity</h2>")
        rows = [
            [
                s.model,
                s.label,
                s.key,
                _fmt(s.best_value),
                "—" if s.best_loss is None else f"{views_by_task(s.task).shown(s.best_loss):.4f}",
                "—" if s.spread is None else f"{s.spread:.4f}",
                str(s.n_diverged),
            ]
            for s in analysis.sensitivities
        ]
        header2 = [
            "model",
            "optimizer",
            "hyperparameter",
            "best value",
            "best loss"
            if all(s.task != "rlhf" for s in analysis.sensitivities)
            else "best (RLHF: reward)",
            "spread",
            "diverged values",
        ]
        parts.append(_table(header2, rows, left=3))
    if run_rows:
        parts.append(f"<h2>Runs</h2><details><summary>{len(run_rows)} runs</summary>")
        columns = [k for k in run_rows[0] if k != "error"] + ["error"]
        body = [[_fmt(row.get(k)) for k in columns] for row in run_rows]
        for cells in body:  # each run's id opens its page: its curves, config and files
            ident = e(cells[0])
            href = e(run_pages.page_name(cells[0]))
            cells[0] = f'<a href="{href}" id="run-{ident}">{ident}</a>'
        parts.append(_table(columns, body, left=len(columns), html_columns={0}))
        parts.append(
            '<p class="muted">'
            + e(
                "Each id opens that run's page: the curves its task logs (pre-training: "
                "training and validation loss, LR and gradient norm against tokens; "
                "fine-tuning: response losses and exact match; RLHF: rewards, KL and response "
                "length; interactive, from its metrics.jsonl), its resolved config and links "
                "to its files; the best run of each series is also drawn in the curves figure "
                "above."
            )
            + "</p>"
        )
        parts.append("</details>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _headline_difference(task: str, difference: float) -> str:
    """A difference of two series' best ``val_loss`` as their task shows it (RLHF: of the
    rewards, with their sign)."""
    shown = views_by_task(task)
    value = shown.shown(difference) + 0.0  # no "-0.0000" for equal results
    return f"{value:+.4f}" + ("" if shown.sign > 0 else " reward")


def _task_note(analysis: Analysis) -> str:
    """What the ranked number is for the post-training runs of the sweep."""
    tasks = {s.task for s in analysis.series}
    notes = []
    if "finetune" in tasks:
        notes.append(
            "For fine-tuning runs the loss is the validation responses' cross-entropy (prompt "
            "tokens excluded) and exact match is the share of held-out prompts whose greedy "
            "response is the answer."
        )
    if "reward" in tasks:
        notes.append("For reward-model runs the loss is the held-out Bradley-Terry loss.")
    if "rlhf" in tasks:
        notes.append(
            "For RLHF runs the ranked number is the negative held-out mean reward of greedy "
            "responses (lower is better: the store ranks every task by loss); the reward "
            "columns and the figures show the reward with its own sign."
        )
    return "".join(" " + n for n in notes)


def _table(
    header: Sequence[str],
    rows: Sequence[Sequence[Any]],
    *,
    left: int,
    css_id: str | None = None,
    html_columns: frozenset[int] | set[int] = frozenset(),
) -> str:
    """An HTML table; cells are escaped except in ``html_columns`` (trusted markup)."""
    e = html.escape
    ident = f' id="{e(css_id)}"' if css_id else ""
    cls = [' class="l"' if i < left else "" for i in range(len(header))]
    head = "".join(f"<th{cls[i]}>{e(str(h))}</th>" for i, h in enumerate(header))
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{cls[i]}>{c if i in html_columns else e(str(c))}</td>" for i, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)
