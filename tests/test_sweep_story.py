"""What a sweep says about itself: progress lines, --dry-run, the environment of every run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from optarena.commands.sweep import RUN_OVERHEAD_SECONDS, estimated_cpu_seconds
from optarena.sweep.progress import point_text, short_value

ROOT = Path(__file__).resolve().parents[1]


def test_progress_line_names_every_varying_value_shortly():
    text = point_text("adamw", {"lr": 0.00316227766017, "hparams.beta2": 0.95}, 0)
    assert text == "adamw lr=0.00316 beta2=0.95 seed=0"
    assert short_value([0.9, 0.999999]) == "(0.9, 1)"
    assert point_text("sgd", {"warmup": 0.1}) == "sgd warmup=0.1"


def test_cpu_estimate_scales_with_tokens_and_model():
    base = {"model": "micro", "steps": 100, "batch_size": 16, "seq_len": 64, "eval_every": 0}
    one = estimated_cpu_seconds(base)
    assert one is not None and one > RUN_OVERHEAD_SECONDS  # a fixed cost per run, then FLOPs
    twice = estimated_cpu_seconds({**base, "steps": 200})
    flops_one, flops_twice = one - RUN_OVERHEAD_SECONDS, twice - RUN_OVERHEAD_SECONDS
    assert 1.9 < flops_twice / flops_one < 2.0  # training doubles, the final evaluation does not
    assert estimated_cpu_seconds({**base, "model": "small"}) > 10 * one
    assert estimated_cpu_seconds({**base, "model": "no-such-model"}) is None


def test_dry_run_prints_base_varying_keys_and_estimate(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "optarena", "sweep", "beta2", "--dry-run", "--out", "x"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200"},
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("base config: batch_size=32, data=builtin")
    assert "hparams.beta2" in out and "0.98" in out
    assert "0.00316227766" not in out  # short numbers
    assert "estimated CPU time of the runs without a result: about" in out
    assert "s a run for start-up, data and evaluation" in out
    assert not (tmp_path / "x").exists()


def test_every_run_records_threads_and_versions():
    from optarena import __version__, train

    summary = train(
        {"model": "micro", "steps": 2, "batch_size": 2, "seq_len": 16, "progress": False}
    )
    env = summary["environment"]
    assert env["threads"] == torch.get_num_threads() == summary["config"]["threads"]
    assert env["torch"] == torch.__version__
    assert env["optarena"].startswith(__version__)
