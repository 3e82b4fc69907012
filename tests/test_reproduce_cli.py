"""``optarena reproduce`` end to end: the staged driver on the toy function (seconds), each study
at the CI-sized ``test`` scale with real training (a handful of micro runs), and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from optarena.sweep.store import Store

SRC = Path(__file__).resolve().parents[1] / "src"
TOY = "optarena.sweep.toy:train"


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run(
        [sys.executable, "-m", "optarena", "reproduce", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_staged_driver_resumes_and_reports(tmp_path):
    out = tmp_path / "d"
    first = cli(
        "deconstructing",
        "--scale",
        "test",
        "--out",
        str(out),
        "--function",
        TOY,
        "--seeds",
        "0",
        "1",
    )
    assert first.returncode == 0, first.stderr
    for n in range(1, 6):
        assert f"stage {n}/5" in first.stderr
    with Store(out, create=False) as store:
        runs = store.runs()
        n_runs = len(runs)
        sweeps = {m.sweep for m in store.members()}
    assert all(r.status in ("done", "diverged") for r in runs)
    assert {f"deconstructing-{n}" for n in (1, 2, 3, 4, 5)} <= sweeps
    # stage 2 sits at stage 1's best LR: its beta1 = 0.9 point is stage 1's run, not a new one
    best = {
        r.config["lr"]
        for r in runs
        if r.config["optimizer"] == "adamw" and r.config["hparams"]["betas"] == [0.8, 0.95]
    }
    assert len(best) == 1
    report = out / "report"
    claims = json.loads((report / "claims.json").read_text())
    assert claims["study"] == "deconstructing"
    assert {c["verdict"] for c in claims["claims"]} <= {"holds", "does not hold", "inconclusive"}
    assert "Claims of Zhao et al." in (report / "index.html").read_text()
    assert (report / "repro-lr-sweep.png").is_file()
    assert "| D1.4 |" in (report / "claims.md").read_text()

    again = cli(
        "deconstructing",
        "--scale",
        "test",
        "--out",
        str(out),
        "--function",
        TOY,
        "--seeds",
        "0",
        "1",
    )
    assert again.returncode == 0, again.stderr
    with Store(out, create=False) as store:
        assert len(store.runs()) == n_runs
        assert all(r.attempts == 1 for r in store.runs())

    only = cli("deconstructing", "--scale", "test", "--out", str(out), "--report-only")
    assert only.returncode == 0, only.stderr
    assert "stage 1" not in only.stderr


@pytest.mark.slow
@pytest.mark.parametrize("study", ["deconstructing", "adam-mini"])
def test_reduced_run_trains_for_real(tmp_path, study):
    out = tmp_path / study
    proc = cli(study, "--scale", "test", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    claims = json.loads((out / "report" / "claims.json").read_text())["claims"]
    with Store(out, create=False) as store:
        runs = store.runs()
    assert 4 <= len(runs) <= 12
    assert all(r.status in ("done", "diverged") for r in runs)
    if study == "adam-mini":
        by_id = {c["id"]: c for c in claims}
        # memory is deterministic: Adam-mini keeps about one float per parameter, AdamW two
        assert by_id["M1.1"]["verdict"] == "holds", by_id["M1.1"]
        assert by_id["M3"]["verdict"] in ("holds", "does not hold", "inconclusive")
        for figure in ("curves", "sft", "rlhf"):
            assert (out / "report" / f"repro-adam-mini-{figure}.png").is_file(), figure
        assert "Chinchilla" in (out / "report" / "index.html").read_text()
        # the SFT stage fine-tunes the pre-training stage's AdamW model, in its own store
        assert by_id["M4"]["verdict"] in ("holds", "does not hold", "inconclusive")
        with Store(out / "sft", create=False) as store:
            sft = store.runs()
        assert {r.optimizer for r in sft} == {"adamw", "adam-mini"}
        assert all(r.status == "done" and r.summary["task"] == "finetune" for r in sft)
        assert all(r.config["pretrained"].startswith(str(out.resolve())) for r in sft)
        assert "Supervised fine-tuning" in (out / "report" / "index.html").read_text()
        assert "| adam-mini |" in (out / "report" / "sft.md").read_text()
        # the RLHF stages start from the SFT stage's AdamW model, in their own store
        with Store(out / "rlhf", create=False) as store:
            rl = store.runs()
        assert sorted(r.summary["task"] for r in rl) == ["reward-model", "rlhf", "rlhf"]
        tuned = {r.config["pretrained"] for r in rl}
        assert len(tuned) == 1 and tuned.pop().startswith(str((out / "sft").resolve()))
        assert {c for c in by_id if c.startswith("R")} == {"R1.1", "R1.2", "R2"}
        assert "RLHF (ReMax" in (out / "report" / "index.html").read_text()
        assert "| adam-mini |" in (out / "report" / "rlhf.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["deconstructing", "--scale", "huge"], "unknown scale 'huge'"),
        (["adam-mini", "--seeds", "0", "0"], "--seeds 0 0"),
        (["deconstructing", "--delta", "-1"], "--delta -1"),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
    proc = cli(*args, "--out", str(tmp_path / "x"))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_report_only_needs_results(tmp_path):
    proc = cli("adam-mini", "--report-only", "--out", str(tmp_path / "empty"))
    assert proc.returncode == 2
    assert "run without --report-only first" in proc.stderr
