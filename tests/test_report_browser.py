"""The report page in a real browser (headless Chromium): no console errors, every interactive
figure draws, and the conclusions on the page are those of ``story.json``.

Skipped on a machine without Chromium; ``.ci/run`` installs it and sets
``OPTARENA_REQUIRE_BROWSER=1``, which turns that skip into a failure.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess

import pytest

from optarena.report import write_report
from optarena.sweep import toy
from optarena.sweep.driver import register_runs
from optarena.sweep.spec import parse_spec
from optarena.sweep.store import Store

SPEC = """
[[grid]]
optimizer = "adamw"
lr = [1e-4, 3.16e-4, 1e-3, 3.16e-3, 1e-2, 3.16e-2, 1e1]
[[grid]]
optimizer = "lion"
lr = [1e-5, 3.16e-5, 1e-4, 3.16e-4, 1e-3, 1e2]
[[grid]]
optimizer = "sgd"
lr = [1e-2, 1e-1, 1.0, 1e3]
"""


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    reason = "needs headless Chromium (`apt-get install chromium`)"
    if os.environ.get("OPTARENA_REQUIRE_BROWSER"):
        pytest.fail(reason)
    pytest.skip(reason)


def test_report_page_renders_in_headless_chromium(tmp_path):
    browser = chromium()
    store = Store(tmp_path)
    runs = parse_spec(SPEC).runs()
    register_runs(store, runs, "s")
    for run in runs:  # the synthetic function: a demo-scale store in milliseconds
        assert store.claim(run.id)
        store.finish(run.id, toy.train({**run.config, "eval_every": 10}))
    store.close()
    page = write_report(tmp_path)
    proc, attrs = render(browser, page)
    assert int(attrs["figures"]) >= 3  # loss vs LR, aligned, curves (speedup when fitted)
    told = json.loads((tmp_path / "report" / "story.json").read_text())
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    best = summary[0]
    assert told["conclusions"][0].startswith(
        f"Best final validation loss: {best['optimizer']}, {best['best_final_val_loss']:.4f}"
    )
    text = html.unescape(re.sub(r"<[^>]+>", "", proc.stdout))
    for sentence in told["conclusions"] + told["caveats"]:
        assert sentence in text
    # a run's own page (plotly.js from the file beside it) draws its curves too
    run_page = tmp_path / "report" / "runs" / f"{runs[2].id}.html"
    _, attrs = render(browser, run_page)
    assert attrs["figures"] == "1"


def test_tuning_report_renders_in_headless_chromium(tmp_path):
    """A store of tuning runs only: the tuning figure draws, no script error."""
    from optarena.sweep import tune
    from sweep_cases import InProcess

    browser = chromium()
    spec = parse_spec(
        "[base]\ntoy_hparams = true\n[tune]\ntolerance = 0.001\n"
        '[[grid]]\noptimizer = "adamw"\nlr = [1e-4, 1e-3, 1e-2]\n'
        "hparams.weight_decay = [0.0, 0.1]\n"
    )
    store = Store(tmp_path)
    (tmp_path / "tune").mkdir()
    tune.tune(store, spec, InProcess(capacity=4), path_file=tmp_path / "tune" / "t.json")
    store.close()
    _, attrs = render(browser, write_report(tmp_path))
    assert attrs["figures"] == "1"


def render(browser: str, page) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """Load ``page`` headless: no console message, no script error, every figure drawn."""
    proc = subprocess.run(
        [
            browser,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=15000",
            "--dump-dom",
            page.resolve().as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    body = re.search(r"<body([^>]*)>", proc.stdout)
    assert body, proc.stdout[:500]
    attrs = dict(re.findall(r'data-(\w+)="(\d+)"', body.group(1)))
    assert attrs.get("errors") == "0"
    assert attrs["drawn"] == attrs["figures"]  # every figure drew marks in an SVG of its own
    return proc, attrs
