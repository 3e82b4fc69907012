"""Exit codes that say whether the work is complete: a diverged ``train`` (3), a sweep that
finishes while another live driver still holds some of its runs (3, totals unchanged)."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

from optarena.cli import main
from optarena.commands.sweep import INCOMPLETE
from optarena.commands.train import DIVERGED
from optarena.sweep.spec import parse_spec
from optarena.sweep.store import Store

TOY = "optarena.sweep.toy:train"
SPEC = """
[sweep]
name = "two"
[base]
steps = 10
[[grid]]
optimizer = "adamw"
lr = [1e-3, 1e-2, 3e-2]
"""


def _cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def test_a_diverged_run_exits_3_with_its_summary_written(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("OPTARENA_CACHE", str(tmp_path / "cache"))
    text = "\n\n".join(f"paragraph {i} " + "words and more words " * 20 for i in range(60))
    (tmp_path / "text.txt").write_text(text)
    out = tmp_path / "run"
    argv = ["train", "--optimizer", "sgd", "--lr", "1e4", "--steps", "8", "--batch-size", "2"]
    argv += ["--seq-len", "16", "--threads", "1", "--no-progress", "--vocab-size", "300"]
    argv += ["--data", str(tmp_path / "text.txt"), "--out", str(out), "--grad-clip", "0"]
    code, stdout, _ = _cli(argv)
    assert code == DIVERGED == 3, stdout
    assert stdout.startswith("DIVERGED:")
    assert json.loads((out / "summary.json").read_text())["diverged"] is True


def test_a_sweep_beside_a_live_driver_exits_3_and_keeps_its_totals(tmp_path: Path) -> None:
    """Another live process holds one run: this driver runs the other two, says how many are
    held, counts progress out of all three, and exits 3; once the holder is gone, 0."""
    (tmp_path / "spec.toml").write_text(SPEC)
    out = tmp_path / "out"
    runs = parse_spec(SPEC).runs()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        with Store(out) as store:
            store.add_runs(((r.id, r.config, r.label, r.point) for r in runs), sweep="two")
            store.pid = holder.pid  # the other driver, alive
            assert store.claim(runs[1].id)
        argv = ["sweep", str(tmp_path / "spec.toml"), "--out", str(out), "--function", TOY]
        code, _, err = _cli(argv)
        assert code == INCOMPLETE == 3, err
        assert "another driver still holds 1 runs" in err
        assert "[2/3]" in err and "/2]" not in err  # the total is the sweep's, not shrunk
        with Store(out) as store:
            assert store.counts()["done"] == 2 and store.get(runs[1].id).status == "running"
    finally:
        holder.kill()
        holder.wait()
    code, _, err = _cli(argv)  # the holder died: its run is reclaimed and run
    assert code == 0, err
    with Store(out) as store:
        assert store.counts()["done"] == 3


def test_a_run_the_other_driver_finished_meanwhile_counts_as_finished(tmp_path: Path) -> None:
    """A run finished by another driver after this one listed it is not 'held': exit 0."""
    from optarena.sweep import driver
    from optarena.sweep.executors import LocalExecutor
    from optarena.sweep.progress import SweepProgress

    runs = parse_spec(SPEC).runs()
    with Store(tmp_path) as store:
        store.add_runs(((r.id, r.config, r.label, r.point) for r in runs), sweep="two")
        real_claim = store.claim

        def claim(run_id: str, **kw) -> bool:
            if run_id == runs[0].id:  # the other driver got there first, and finished it
                other = Store(tmp_path)
                assert other.claim(run_id)
                other.finish(run_id, {"final_val_loss": 3.0, "diverged": False})
                other.close()
                return False
            return real_claim(run_id, **kw)

        store.claim = claim
        progress = SweepProgress(total=3, already=0)
        executor = LocalExecutor(TOY, workers=1, threads=1)
        result = driver.run_sweep(store, runs, executor, sweep="two", progress=progress)
    assert result.held_elsewhere == 0 and result.done == 2 and result.already_finished == 1
    assert progress.total == 3 and progress.left == 0
