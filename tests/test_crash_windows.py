"""Crash windows: a sweep of real training runs SIGKILLed at exact instants and resumed loses
nothing, duplicates nothing and degrades no summary; its results are bit-identical to a sweep
that was never interrupted. So is a report killed while writing its files.

Each kill comes from the fault-injection hook (``OPTARENA_FAULT=NAME@N``,
:func:`optarena.atomic.fault_point`), never from a timer: the process kills itself at that
instant, e.g. between a checkpoint's ``.sha256`` and its rename, or between a run's
``summary.json`` and the store's row. Every sweep invocation is a child forked from this process
(torch imported, the uninterrupted sweep already run in this process), running the real sweep
driver and store with the runs trained in that child: a kill takes the driver and its run down
together, as a killed node does, and the next invocation reclaims the run and resumes it from
its checkpoint.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from optarena import atomic
from optarena.sweep.driver import run_sweep
from optarena.sweep.executors import DEFAULT_FUNCTION, Executor, Outcome, Task, execute
from optarena.sweep.progress import SweepProgress
from optarena.sweep.spec import parse_spec
from optarena.sweep.store import Store

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")

SPEC = """
[sweep]
name = "crash"
[base]
steps = 4
batch_size = 2
seq_len = 16
vocab_size = 300
eval_every = 2
eval_windows = 4
checkpoint_every = 1
keep_checkpoints = 0
data = "{data}"
[[grid]]
optimizer = "adamw"
lr = [1e-3, 3e-3]
[[grid]]
optimizer = "sgd"
lr = [0.1]
hparams = {{momentum = 0.9}}
"""
# One invocation per fault; each kills the invocation at that instant. Per run, in the order
# the instants come: a checkpoint in its temporary file (no checksum), its checksum written but
# not renamed, committed; an atomic write's temporary file (tokenizer.json, a checksum);
# committed after the final evaluation; before and after summary.json; the driver before and
# after recording the result in the store.
PER_RUN = [
    "checkpoint-written@2",
    "checksum-written@1",
    "checkpoint-committed@1",
    "file-written@1",
    "checkpoint-committed@2",
    "before-summary",
    "after-summary",
    "before-store-write",
    "after-store-write",
]
FAULTS = [*PER_RUN, *PER_RUN, "checkpoint-written@3", "checksum-written@1"]
# summary fields that measure this session's time and memory, or name where it ran from
TIMING = {
    "tokens_per_second",
    "peak_memory_bytes",
    "wall_seconds",
    "train_seconds",
    "train_cpu_seconds",
    "resumed_from",
}
# metrics.jsonl fields that measure time
TIMING_RECORD = {"tokens_per_second", "time", "wall", "elapsed"}


class InlineExecutor(Executor):
    """Runs each task in this process as it is submitted (the training function as a worker
    calls it): a kill of this process is a kill of the driver and of its run."""

    capacity = 1

    def __init__(self) -> None:
        self.finished: list[Outcome] = []

    def submit(self, task: Task) -> None:
        payload = execute(DEFAULT_FUNCTION, task.config, threads=1)
        self.finished.append(
            Outcome(task, payload.get("summary"), payload.get("error"), payload.get("detail"))
        )

    def wait(self, timeout: float) -> list[Outcome]:
        done, self.finished = self.finished, []
        return done

    def close(self, cancel: bool = False) -> None:
        self.finished = []


def in_child(work: Callable[[], int], fault: str | None, log: Path) -> int:
    """``work()`` in a forked child with ``OPTARENA_FAULT=fault``; its exit code, or minus
    the signal that ended it (-9: killed at the fault)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.environ.pop(atomic.FAULT_ENV, None)
            if fault:
                os.environ[atomic.FAULT_ENV] = fault
            os.environ[atomic.FAULT_LOG_ENV] = str(log)
            atomic._fault_counts.clear()
            code = work()
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def sweep_once(out: Path, runs: list[Any]) -> Callable[[], int]:
    def work() -> int:
        quiet = SweepProgress(total=len(runs), already=0, console=Console(file=io.StringIO()))
        with Store(out) as store:
            result = run_sweep(store, runs, InlineExecutor(), sweep="crash", progress=quiet)
        return 0 if result.complete else 4

    return work


@pytest.fixture(scope="module")
def setting(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("crash")
    text = "\n\n".join(f"paragraph {i}: " + "the words of a small corpus " * 12 for i in range(80))
    (root / "text.txt").write_text(text)
    runs = parse_spec(SPEC.format(data=root / "text.txt")).runs()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPTARENA_CACHE", str(root / "cache"))
        mp.delenv(atomic.FAULT_ENV, raising=False)
        log = root / "kills.log"
        # in this process: what the children need is imported and built once, here
        assert sweep_once(root / "baseline", runs)() == 0
        yield {"root": root, "runs": runs, "log": log, "mp": mp}
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def crashed(setting: dict[str, Any]) -> dict[str, Any]:
    """The sweep killed at every fault of FAULTS in turn, checked after each kill, then run to
    the end without a fault."""
    root, runs, log = setting["root"], setting["runs"], setting["log"]
    out = root / "crashed"
    codes = []
    for fault in FAULTS:
        codes.append(in_child(sweep_once(out, runs), fault, log))
        assert codes[-1] == -9, f"{fault}: the invocation was not killed (exit {codes[-1]})"
        assert_nothing_torn(out)
    final = in_child(sweep_once(out, runs), None, log)
    return {"out": out, "codes": codes, "final": final}


def assert_nothing_torn(out: Path) -> None:
    """Every file under its final name is whole: checkpoints match their checksums, JSON
    parses, the store opens."""
    for ckpt in out.glob("runs/*/checkpoints/step-*.pt"):
        assert atomic.verify_checksum(ckpt) is None, ckpt
    for summary in out.glob("runs/*/summary.json"):
        json.loads(summary.read_text())
    with Store(out, create=False) as store:
        store.runs()


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


def _comparable(summary: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in summary.items() if k not in TIMING}
    for key in ("config", "requested_config"):  # the store keeps neither
        if key in kept:
            kept[key] = {k: v for k, v in kept[key].items() if k not in ("out", "resume")}
    return kept


def _records(path: Path) -> list[dict[str, Any]]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if k not in TIMING_RECORD} for r in rows]


def test_twenty_kills_at_injected_points(setting, crashed) -> None:
    kills = setting["log"].read_text().splitlines()
    assert len(kills) == len(FAULTS) >= 20
    assert [line.split()[1] for line in kills] == FAULTS  # each where it was asked, once
    assert crashed["final"] == 0


def test_no_run_lost_or_duplicated(setting, crashed) -> None:
    runs = {r.id for r in setting["runs"]}
    with Store(crashed["out"], create=False) as store:
        records = {r.id: r for r in store.runs()}
        assert set(records) == runs and all(r.status == "done" for r in records.values())
    db = sqlite3.connect(crashed["out"] / "results.sqlite")
    finishes = db.execute(
        "SELECT run_id, count(*) FROM events WHERE event='finish' GROUP BY run_id"
    )
    assert dict(finishes.fetchall()) == dict.fromkeys(runs, 1)
    duplicates = db.execute("SELECT count(*) FROM events WHERE event='duplicate-finish'")
    assert duplicates.fetchone()[0] == 0
    db.close()


def test_results_bit_identical_to_the_uninterrupted_sweep(setting, crashed) -> None:
    base, out = setting["root"] / "baseline", crashed["out"]
    with Store(base, create=False) as a, Store(out, create=False) as b:
        want = {r.id: r for r in a.runs()}
        got = {r.id: r for r in b.runs()}
    for run_id, record in want.items():
        assert got[run_id].final_val_loss == record.final_val_loss  # exactly, not approx
        assert got[run_id].eval_curve == record.eval_curve
        assert _comparable(got[run_id].summary) == _comparable(record.summary)
        ckpt = f"runs/{run_id}/checkpoints/step-00000004.pt"
        left = torch.load(base / ckpt, weights_only=True)["model"]
        right = torch.load(out / ckpt, weights_only=True)["model"]
        assert left.keys() == right.keys()
        assert all(torch.equal(left[k], right[k]) for k in left)


def test_no_summary_degraded(setting, crashed) -> None:
    """summary.json and metrics.jsonl as the uninterrupted run wrote them: a final train loss,
    a throughput, one line per record (no second final evaluation)."""
    base, out = setting["root"] / "baseline", crashed["out"]
    for run in setting["runs"]:
        mine = json.loads((out / "runs" / run.id / "summary.json").read_text())
        theirs = json.loads((base / "runs" / run.id / "summary.json").read_text())
        assert mine["final_train_loss"] is not None and mine["tokens_per_second"] > 0
        assert _comparable(mine) == _comparable(theirs)
        metrics = _records(out / "runs" / run.id / "metrics.jsonl")
        assert metrics == _records(base / "runs" / run.id / "metrics.jsonl")
        assert sum("val_loss" in r for r in metrics) == 2  # steps 2 and 4, once each


def test_no_temporary_or_orphan_files_left(crashed) -> None:
    out = crashed["out"]
    assert _temp_files(out) == []
    for sums in out.glob("runs/*/checkpoints/*.sha256"):
        assert sums.with_suffix(".pt").exists(), f"orphan checksum {sums}"


# --------------------------------------------------------------------------- report


def _whole(path: Path) -> bool:
    """Whether ``path`` holds a complete file of its kind."""
    data = path.read_bytes()
    if path.suffix == ".png":
        return data.startswith(b"\x89PNG") and data.endswith(b"IEND\xaeB`\x82")
    if path.suffix == ".svg":
        return data.rstrip().endswith(b"</svg>")
    if path.suffix == ".html":
        return data.rstrip().endswith(b"</html>")
    if path.suffix == ".json":
        json.loads(data)
        return True
    if path.suffix == ".csv":
        return len(list(csv.reader(io.StringIO(data.decode())))) > 1
    return bool(data)


def test_a_report_killed_while_writing_keeps_every_file_whole(setting, crashed) -> None:
    from optarena.report import write_report

    out, log = crashed["out"], setting["log"]
    folder = out / "report"

    def report() -> int:
        write_report(out)
        return 0

    assert report() == 0  # in this process: the children inherit the imports
    before = {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    kills = len(log.read_text().splitlines())
    assert in_child(report, "file-written@3", log) == -9
    assert len(log.read_text().splitlines()) == kills + 1
    for name in before:  # old or new, each whole; none emptied, none missing
        assert _whole(folder / name), name
    assert len(_temp_files(folder)) == 1  # the file being written when it was killed
    assert in_child(report, None, log) == 0
    assert _temp_files(folder) == []
    assert {p.relative_to(folder) for p in folder.rglob("*") if p.is_file()} == set(before)
