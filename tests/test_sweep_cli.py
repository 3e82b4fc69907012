"""The ``sweep`` and ``report`` commands as a user runs them: exit codes, messages, files."""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from optarena.sweep.store import Store

SRC = Path(__file__).resolve().parents[1] / "src"
TOY = "optarena.sweep.toy:train"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "optarena", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=180,
    )


SPEC = """
[sweep]
name = "cli"
[base]
steps = 10
[[grid]]
optimizer = "adamw"
label = "Adam <b>&amp; co</b>"
lr = {from = 1e-4, to = 1e-1, per_decade = 1}
[[grid]]
optimizer = "lion"
lr = [1e-5, 1e-4, 1e-3]
toy_fail = [false, true]
[[grid]]
optimizer = "sgd"
lr = 1.0
hparams.momentum = [0.5, 0.9, 0.98]
"""


@pytest.fixture(scope="module")
def swept(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "spec.toml").write_text(SPEC)
    out = root / "out"
    proc = cli(
        "sweep", str(root / "spec.toml"), "--out", str(out), "--function", TOY, "--workers", "2"
    )
    return root, out, proc


def test_sweep_with_a_failing_run_continues_and_exits_1(swept):
    _, out, proc = swept
    assert proc.returncode == 1, proc.stderr
    assert "3 runs failed" in proc.stderr and "Traceback" not in proc.stderr
    counts = Store(out).counts()
    assert counts == {"pending": 0, "running": 0, "done": 10, "diverged": 0, "failed": 3}


def test_report_files_and_html(swept):
    _, out, _ = swept
    proc = cli("report", str(out))
    assert proc.returncode == 0, proc.stderr
    page = out / "report" / "index.html"
    assert str(page) in proc.stdout
    text = page.read_text()

    class Parser(HTMLParser):
        def __init__(self):
            super().__init__()
            self.cells, self.images, self.tags, self._in_summary, self._cell = (
                [],
                [],
                [],
                False,
                None,
            )
            self.scripts = []

        def handle_starttag(self, tag, attrs):
            attrs = dict(attrs)
            self.tags.append(tag)
            if tag == "table" and attrs.get("id") == "summary":
                self._in_summary = True
            if self._in_summary and tag == "td":
                self._cell = ""
            if tag == "img":
                self.images.append(attrs["src"])
            if tag == "script":
                self.scripts.append(attrs)

        def handle_endtag(self, tag):
            if tag == "table":
                self._in_summary = False
            if tag == "td" and self._cell is not None:
                self.cells.append(self._cell)
                self._cell = None

        def handle_data(self, data):
            if self._cell is not None:
                self._cell += data

    parser = Parser()
    parser.feed(text)
    # every optimizer (series) has a row in the summary table, the label shown literally
    for name in ("Adam <b>&amp; co</b>", "lion (toy_fail=False)", "lion (toy_fail=True)"):
        assert name in parser.cells
    assert "<b>" not in text  # the user's markup was escaped, never interpreted
    # self-contained: scripts are inline (plotly.js once, the figures' data), images are inline
    # data, nothing outside the scripts' own code points at the network
    assert parser.scripts and all("src" not in attrs for attrs in parser.scripts)
    assert text.count("<script") == text.count("</script>")
    assert text.count("Plotly.newPlot(") >= 3  # loss vs LR, aligned, curves
    assert len(parser.images) >= 1 and all(
        s.startswith("data:image/png;base64,") for s in parser.images
    )
    outside = re.sub(r"<script.*?</script>", "", text, flags=re.S)
    assert "http://" not in outside and "https://" not in outside
    for stem in (
        "loss-vs-lr",
        "loss-vs-lr-aligned",
        "curves-at-best-lr",
        "sensitivity-hparams-momentum",
    ):
        assert (out / "report" / f"{stem}.png").stat().st_size > 1000
        assert (out / "report" / f"{stem}.svg").read_text().lstrip().startswith("<?xml")
    rows = list(csv.DictReader((out / "report" / "runs.csv").open()))
    assert len(rows) == 13
    assert {
        "id",
        "optimizer",
        "lr",
        "hparams.momentum",
        "toy_fail",
        "seed",
        "status",
        "final_val_loss",
    } <= set(rows[0])
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert {row["optimizer"] for row in summary} == {
        "Adam <b>&amp; co</b>",
        "lion (toy_fail=False)",
        "lion (toy_fail=True)",
    }
    adam = next(row for row in summary if row["registry_name"] == "adamw")
    assert adam["best_lr"] in (1e-3, 1e-2)  # the toy's optimum is 10^-2.5
    with (out / "report" / "summary.csv").open() as fh:
        assert len(list(csv.DictReader(fh))) == 3


def test_report_table_format(swept):
    _, out, _ = swept
    proc = cli("report", str(out), "--format", "table")
    assert proc.returncode == 0
    assert "lion (toy_fail=False)" in proc.stdout and "best loss" in proc.stdout


def test_rerun_after_adding_values_runs_only_new_points(swept):
    root, out, _ = swept
    (root / "spec2.toml").write_text(SPEC.replace("[1e-5, 1e-4, 1e-3]", "[1e-5, 1e-4, 1e-3, 1e-2]"))
    proc = cli(
        "sweep", str(root / "spec2.toml"), "--out", str(out), "--function", TOY, "--no-retry-failed"
    )
    # the new lion LR, once with toy_fail = false and once with true; old failures left alone
    assert "1 done, 0 diverged, 1 failed now; 10 had results already" in proc.stderr
    assert proc.returncode == 1, proc.stderr
    counts = Store(out).counts()
    assert counts == {"pending": 0, "running": 0, "done": 11, "diverged": 0, "failed": 4}


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["sweep", "nope"], "no sweep spec file or preset named 'nope'"),
        (["sweep", "missing.toml"], "not found"),
        (["sweep", "bad.toml"], "not valid TOML"),
        (["sweep", "unknown.toml"], "unknown optimizer 'adamx'; did you mean 'adamw'"),
        (["sweep", "range.toml"], "range has from=1 > to=0.0001; swap them"),
        (["report", "empty"], "holds no sweep results"),
        (["sweep", "demo", "--set", "steps"], "expected KEY=VALUE"),
        (["sweep", "demo", "--workers", "0", "--function", TOY], "--workers 0"),
        # every run's config and optimizer are checked before any run starts
        (
            ["sweep", "demo", "--set", "steps=abc", "--out", "never"],
            "preset 'demo': run adamw (lr=0.000316): config key 'steps' must be an integer",
        ),
        (["sweep", "rho.toml", "--out", "never"], "lion: unknown hyperparameter(s) 'rho'"),
        (["sweep", "demo", "--out", "afile/never"], "cannot open the results folder afile/never"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, needle):
    (tmp_path / "bad.toml").write_text("[[grid]\n")
    (tmp_path / "unknown.toml").write_text('[[grid]]\noptimizer = "adamx"\nlr = 1e-3\n')
    (tmp_path / "range.toml").write_text(
        '[[grid]]\noptimizer = "adamw"\nlr = {from = 1, to = 1e-4, per_decade = 2}\n'
    )
    (tmp_path / "rho.toml").write_text(
        '[[grid]]\noptimizer = "lion"\nlr = [1e-4, 1e-3]\nhparams.rho = 0.1\n'
    )
    (tmp_path / "empty").mkdir()
    (tmp_path / "afile").write_text("")
    proc = cli(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("optarena: error:"), proc.stderr
    assert needle in lines[0]
    assert not (tmp_path / "never").exists()  # refused before anything was written


def test_demo_command_runs_the_demo_preset_and_reports(tmp_path):
    # the synthetic training function keeps this to seconds; the real one is exercised by
    # tests/test_sweep_resume.py and the demo preset is validated against TrainConfig
    proc = cli("demo", "--out", str(tmp_path / "demo"), "--function", TOY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    page = tmp_path / "demo" / "report" / "index.html"
    assert f"report: {page}" in proc.stdout
    summary = json.loads((tmp_path / "demo" / "report" / "summary.json").read_text())
    names = {row["optimizer"] for row in summary}
    assert {"adamw", "sgd", "lion", "signum", "adam-mini"} <= names
    runs = list(csv.DictReader((tmp_path / "demo" / "report" / "runs.csv").open()))
    lrs = {}
    for row in runs:
        lrs.setdefault(row["optimizer"], set()).add(row["lr"])
    assert all(len(v) >= 5 for v in lrs.values())
    assert all(row["status"] in ("done", "diverged") for row in runs)
