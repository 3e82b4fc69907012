"""The report from a store alone: before any run finished, and with labels that look like code."""

from __future__ import annotations

import json

from optarena.report import write_report
from optarena.sweep import toy
from optarena.sweep.driver import register_runs
from optarena.sweep.spec import parse_spec
from optarena.sweep.store import Store

SPEC = """
[[grid]]
optimizer = "adamw"
label = "Adam $\\\\frac{$ <i>"
lr = [1e-3, 1e-2]
[[grid]]
optimizer = "sgd"
lr = 0.1
hparams.momentum = [0.5, 0.9]
"""


def test_report_before_any_run_finished(tmp_path):
    register_runs(Store(tmp_path), parse_spec(SPEC).runs(), "s")
    page = write_report(tmp_path)
    text = page.read_text()
    assert "No finished runs yet" in text
    rows = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert [r["best_final_val_loss"] for r in rows] == [None]
    assert "<img" not in text


def test_labels_with_markup_and_mathtext_are_shown_literally(tmp_path):
    store = Store(tmp_path)
    runs = parse_spec(SPEC).runs()
    register_runs(store, runs, "s")
    for run in runs:  # finish them in-process with the synthetic function
        assert store.claim(run.id)
        store.finish(run.id, toy.train(run.config))
    page = write_report(tmp_path)
    text = page.read_text()
    assert "Adam $\\frac{$ &lt;i&gt;" in text and "<i>" not in text
    # as maths "$\\frac{$" does not parse (write_report would raise): shown as plain text
    assert (tmp_path / "report" / "loss-vs-lr.svg").stat().st_size > 1000
    assert (tmp_path / "report" / "sensitivity-hparams-momentum.png").is_file()


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised(tmp_path):
    import csv

    from optarena.report.tables import write_csv

    rows = [
        {"label": '=HYPERLINK("http://x","y")', "n": -1.5, "note": "+1", "at": "@SUM(A1)"},
        {"label": "-cmd", "n": 2, "note": "plain", "at": None},
    ]
    write_csv(tmp_path / "t.csv", rows)
    got = list(csv.DictReader((tmp_path / "t.csv").open()))
    assert got[0] == {
        "label": '\'=HYPERLINK("http://x","y")',
        "n": "-1.5",
        "note": "'+1",
        "at": "'@SUM(A1)",
    }
    assert got[1] == {"label": "'-cmd", "n": "2", "note": "plain", "at": ""}
