"""Per-run pages: the runs table links every run to a page with its curves, config and files,
which works offline (plotly.js beside the pages, loaded by a relative path)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

from plotly.offline import get_plotlyjs

from optarena.report import write_report
from optarena.report.build import _SELF_CHECK
from optarena.report.run_pages import MAX_POINTS, PLOTLY_FILE, figure_json, write_run_pages
from optarena.report.views import VIEWS
from optarena.run_log import METRICS_FILE
from optarena.sweep import toy
from optarena.sweep.driver import register_runs
from optarena.sweep.spec import parse_spec
from optarena.sweep.store import Store

SPEC = """
[[grid]]
optimizer = "adamw"
label = "adam </script><b>x</b>"
lr = [1e-3, 1e-2, 1e2]
"""


def store_with_runs(tmp_path: Path) -> tuple[list, dict]:
    store = Store(tmp_path)
    runs = parse_spec(SPEC).runs()
    register_runs(store, runs, "s")
    for run in runs:
        assert store.claim(run.id)
        store.finish(run.id, toy.train({**run.config, "out": str(store.run_dir(run.id))}))
    # the first run logged like the training harness: a record per step, evaluations among them
    logged = runs[0].id
    records = [
        {"step": s, "tokens": 64 * s, "loss": 5.0 - 0.01 * s, "lr": 1e-3, "grad_norm": 1.0 + s}
        for s in range(1, 101)
    ] + [{"step": s, "tokens": 64 * s, "val_loss": 5.1 - 0.01 * s} for s in (50, 100)]
    (store.run_dir(logged) / METRICS_FILE).write_text(
        "\n".join(json.dumps(r) for r in records) + "\n"
    )
    store.close()
    return runs, {"id": logged, "records": records}


def runs_of(directory: Path) -> list:
    with Store(directory, create=False) as store:
        return store.runs()


def members_of(directory: Path) -> list:
    with Store(directory, create=False) as store:
        return store.members()


class Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str | None]] = []
        self.scripts: list[str | None] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a":
            self.links.append((attrs.get("href"), attrs.get("id")))
        if tag == "script":
            self.scripts.append(attrs.get("src"))


def test_every_run_has_a_page_with_its_curves(tmp_path):
    runs, logged = store_with_runs(tmp_path)
    page = write_report(tmp_path)
    report = tmp_path / "report"
    index = Links()
    index.feed(page.read_text())
    for run in runs:  # the runs table links each id to its page
        assert (f"runs/{run.id}.html", f"run-{run.id}") in index.links
    assert (report / PLOTLY_FILE).read_text() == get_plotlyjs()  # once, beside the pages

    text = (report / "runs" / f"{logged['id']}.html").read_text()
    parser = Links()
    parser.feed(text)
    assert parser.scripts[0] == f"../{PLOTLY_FILE}"  # offline: a file beside the pages
    assert all(not (s or "").startswith("http") for s in parser.scripts)
    assert (f"../index.html#run-{logged['id']}", None) in parser.links
    assert (f"../../runs/{logged['id']}/metrics.jsonl", None) in parser.links
    assert "</script><b>" not in text  # the label cannot close the figure's script
    blob = re.search(r"var f=(\{.*?\});Plotly\.newPlot", text, re.S).group(1)
    fig = json.loads(blob.replace("<\\/", "</"))
    by_name = {t["name"]: t for t in fig["data"]}
    steps = [r for r in logged["records"] if "loss" in r]
    train = by_name["training loss (nats)"]
    assert train["x"] == [r["tokens"] for r in steps] and train["y"] == [r["loss"] for r in steps]
    assert by_name["validation loss (nats)"]["y"] == [4.6, 4.1]
    assert by_name["gradient norm (before clipping)"]["y"][-1] == 101.0
    assert fig["layout"]["yaxis3"]["type"] == "log"  # the LR panel

    # a second report rewrites no page; a run whose log grew gets its page rebuilt, alone
    assert (
        write_run_pages(tmp_path, report, runs_of(tmp_path), members_of(tmp_path), _SELF_CHECK) == 0
    )
    with (tmp_path / "runs" / logged["id"] / METRICS_FILE).open("a") as fh:
        fh.write(json.dumps({"step": 101, "tokens": 6464, "loss": 3.5}) + "\n")
    assert (
        write_run_pages(tmp_path, report, runs_of(tmp_path), members_of(tmp_path), _SELF_CHECK) == 1
    )
    assert "6464" in (report / "runs" / f"{logged['id']}.html").read_text()

    # a run without metrics.jsonl still shows its eval curve (from the store)
    other = (report / "runs" / f"{runs[1].id}.html").read_text()
    assert "Plotly.newPlot" in other and "diverged" not in other
    diverged = (report / "runs" / f"{runs[2].id}.html").read_text()
    assert "diverged" in diverged


def test_long_logs_are_thinned_to_a_bounded_figure():
    n = 3 * MAX_POINTS + 7
    xs = list(range(n))
    train = VIEWS["train"]
    empty = {c.ident: ([], []) for c in train.curves}
    fig = figure_json({**empty, "train:loss": (xs, xs)}, train)
    (trace,) = fig["data"]  # only the panel that holds points
    assert len(trace["x"]) <= MAX_POINTS + 1 and trace["x"][-1] == n - 1
    assert figure_json(empty, train) is None


def test_write_texts_writes_changed_files_whole_and_skips_the_rest(tmp_path):
    from optarena import atomic
    from optarena.errors import StorageError

    a, b = tmp_path / "a.html", tmp_path / "b.html"
    assert atomic.write_texts([(a, "one"), (b, "two")]) == 2
    before = b.stat().st_mtime_ns
    assert atomic.write_texts([(a, "ONE"), (b, "two")]) == 1  # b already holds its content
    assert a.read_text() == "ONE" and b.read_text() == "two" and b.stat().st_mtime_ns == before
    (tmp_path / "c.html").mkdir()  # a folder in the way: refused, nothing else replaced
    try:
        atomic.write_texts([(a, "new"), (tmp_path / "c.html", "x")])
    except StorageError:
        pass
    else:
        raise AssertionError("a folder in the way was not refused")
    assert a.read_text() == "ONE"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "b.html", "c.html"]


def test_the_report_command_never_loads_torch():
    """``optarena report`` reads a store with numpy, scipy, matplotlib and plotly only: torch
    would add seconds to every report (every command's parser is built at start-up)."""
    import os
    import subprocess
    import sys

    code = (
        "import sys; from optarena.cli import build_parser; build_parser(); "
        "import optarena.commands.report, optarena.report.build; "
        "print(sorted(m for m in ('torch', 'optarena.train') if m in sys.modules))"
    )
    src = Path(__file__).resolve().parents[1] / "src"
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(src)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_a_runs_task_is_its_summarys_or_its_configs():
    from optarena.tasks import task_of_run

    assert task_of_run({"model": "micro"}, None) == "train"
    assert task_of_run({"kl_coef": 0.05, "pretrained": "p"}, None) == "rlhf"
    assert task_of_run({"eval_pairs": 8, "pretrained": "p"}, None) == "reward"
    assert task_of_run({"eval_generate": 8, "pretrained": "p"}, None) == "finetune"
    assert task_of_run({}, {"task": "reward-model"}) == "reward"  # what reward summaries say
    assert task_of_run({"eval_generate": 8}, {"task": "rlhf"}) == "rlhf"
    assert task_of_run({}, {"task": "something else"}) == "train"
