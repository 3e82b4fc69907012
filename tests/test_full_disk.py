"""A full disk or a read-only folder while optarena writes: one line naming the path and what to
do, exit code 2, no temporary file left, nothing already written lost, a sweep's run not
wedged.

A full disk is a file size limit (``RLIMIT_FSIZE``, ``SIGXFSZ`` ignored, so a write past it
fails with ``EFBIG`` as a full disk fails with ``ENOSPC``) set in a forked child at an exact
instant: when a chosen function is called for the N-th time. A read-only folder is ``chmod
0o555`` where that binds (not as root), and otherwise the ``EROFS``/``EACCES`` error injected
where the write happens.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import importlib
import io
import json
import os
import resource
import signal
import sqlite3
import sys
import traceback
from pathlib import Path

import pytest

from optarena import atomic, checkpoints
from optarena.cli import main
from optarena.errors import StorageError
from optarena.sweep.store import Store

TOY = "optarena.sweep.toy:train"
pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork and setrlimit")
TRAIN = ["train", "--optimizer", "adamw", "--steps", "4", "--batch-size", "2", "--seq-len", "16"]
TRAIN += ["--threads", "1", "--no-progress", "--vocab-size", "300", "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("full-disk")
    text = "\n\n".join(f"paragraph {i}: " + "the words of a small corpus " * 12 for i in range(80))
    (root / "text.txt").write_text(text)
    return root


@pytest.fixture(autouse=True)
def _cache(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPTARENA_CACHE", str(root / "cache"))


def limited(
    root: Path, target: str, call: int, limit: int, *argv: str, during: bool = False
) -> tuple[int, str]:
    """``optarena ARGV`` in a child forked from this process (torch already imported), whose
    file size limit drops to ``limit`` bytes at the ``call``-th call of ``target``
    ("module:attr" or "module:Class.method"), for good or (``during``) for that call only:
    exit code, stderr."""
    read, write = os.pipe()  # a pipe: no file size limit applies to it
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 1
        try:
            os.close(read)
            os.dup2(write, 2)
            sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115 (fd 2 outlives it)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            _limit_at(target, call, limit, during)
            code = main(list(argv))
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            with contextlib.suppress(BaseException):
                sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with open(read, encoding="utf-8", errors="replace") as pipe:
        stderr = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), stderr


def _limit_at(target: str, call: int, limit: int, during: bool) -> None:
    module_name, _, path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, name = path.split(".")
    for part in parents:
        owner = getattr(owner, part)
    original = getattr(owner, name)
    calls = [0]

    @functools.wraps(original)
    def with_limit(*args, **kwargs):
        calls[0] += 1
        if calls[0] != call:
            return original(*args, **kwargs)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        try:
            return original(*args, **kwargs)
        finally:
            if during:
                unlimited = (resource.RLIM_INFINITY, resource.RLIM_INFINITY)
                resource.setrlimit(resource.RLIMIT_FSIZE, unlimited)

    setattr(owner, name, with_limit)


def error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("optarena: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


def temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob(".*") if ".tmp" in p.name]


def _cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    return code, err.getvalue()


# --------------------------------------------------------------------------- full disk


def test_checkpoint_on_a_full_disk(root: Path) -> None:
    """The step-4 checkpoint does not fit: exit 2 naming it, no temp file, the step-2
    checkpoint whole, and --resume continues from it to the end."""
    out = root / "ckpt-run"
    argv = [*TRAIN, "--data", str(root / "text.txt"), "--out", str(out)]
    code, err = limited(root, "optarena.train:Run.checkpoint", 2, 1_000_000, *argv)
    line = error_line(err)
    assert code == 2
    assert "step-00000004.pt" in line and "file size limit" in line and "--resume" in line
    assert temp_files(out) == []
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [
        "step-00000002.pt",
        "step-00000002.sha256",
    ]
    assert checkpoints.load_checkpoint(out / "checkpoints" / "step-00000002.pt")["step"] == 2
    assert not (out / "summary.json").exists()
    code, err = _cli([*argv, "--resume"])
    assert code == 0, err
    assert "resuming from step 2" in err
    assert json.loads((out / "summary.json").read_text())["steps"] == 4


def test_summary_on_a_full_disk(root: Path) -> None:
    """summary.json does not fit after training finished: exit 2 naming it, no temp file, the
    final checkpoint kept; --resume writes the summary without training again."""
    out = root / "summary-run"
    argv = [*TRAIN, "--data", str(root / "text.txt"), "--out", str(out)]
    code, err = limited(root, "optarena.train:Run.summary", 1, 1000, *argv)
    line = error_line(err)
    assert code == 2 and "summary.json" in line and "file size limit" in line
    assert temp_files(out) == [] and not (out / "summary.json").exists()
    final = out / "checkpoints" / "step-00000004.pt"
    assert atomic.verify_checksum(final) is None
    code, err = _cli([*argv, "--resume"])
    assert code == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_train_loss"] is not None
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in evals if "val_loss" in r] == [summary["final_val_loss"]]


def test_store_write_on_a_full_disk(root: Path) -> None:
    """The sweep's store cannot record a result: exit 2 naming results.sqlite; the store is
    the one it was, and the next invocation finishes every run exactly once."""
    spec = root / "toy.toml"
    spec.write_text(
        '[sweep]\nname = "toy"\n[base]\nsteps = 10\n[[grid]]\noptimizer = "adamw"\n'
        "lr = [1e-3, 1e-2]\n"
    )
    out = root / "sweep"
    argv = ["sweep", str(spec), "--out", str(out), "--function", TOY, "--workers", "1"]
    code, err = limited(root, "optarena.sweep.driver:_record", 1, 1, *argv)
    line = error_line(err)
    assert code == 2 and "results.sqlite" in line
    assert temp_files(out) == []
    with Store(out) as store:
        states = {r.id: r.status for r in store.runs()}
        assert "done" not in states.values()
        for record in store.runs(status="running"):  # its driver is gone: reclaimable
            assert not atomic.pid_alive(record.pid)
    code, err = _cli(argv)
    assert code == 0, err
    db = sqlite3.connect(out / "results.sqlite")
    finishes = db.execute("SELECT run_id, count(*) FROM events WHERE event='finish' GROUP BY 1")
    assert sorted(n for _, n in finishes.fetchall()) == [1, 1]
    db.close()


def test_a_run_on_a_full_disk_stops_the_sweep(root: Path) -> None:
    """A run's worker cannot write its summary: exit 2 with the run's line, no further run
    started, the run failed (not left running); the next invocation finishes both."""
    spec = root / "toy-two.toml"
    spec.write_text(
        '[sweep]\nname = "two"\n[base]\nsteps = 10\n[[grid]]\noptimizer = "adamw"\n'
        "lr = [1e-3, 1e-2]\n"
    )
    out = root / "sweep-two"
    argv = ["sweep", str(spec), "--out", str(out), "--function", TOY, "--workers", "1"]
    # the first run's worker starts with a limit its summary does not fit; the driver has none
    target = "optarena.sweep.executors:LocalExecutor.submit"
    code, err = limited(root, target, 1, 200, *argv, during=True)
    line = error_line(err)
    assert code == 2 and "summary.json" in line and "file size limit" in line
    with Store(out) as store:
        assert sorted(r.status for r in store.runs()) == ["failed", "pending"]
    assert temp_files(out) == []
    code, err = _cli(argv)
    assert code == 0, err
    with Store(out) as store:
        assert [r.status for r in store.runs()] == ["done", "done"]


@pytest.fixture(scope="module")
def reported(root: Path) -> Path:
    """A store of toy results (recorded as the driver records them) with its report."""
    from optarena.sweep import toy
    from optarena.sweep.spec import parse_spec

    spec = '[sweep]\nname = "rep"\n[base]\nsteps = 10\n[[grid]]\noptimizer = "adamw"\n'
    runs = parse_spec(spec + "lr = [1e-3, 1e-2, 1e-1]\n").runs()
    out = root / "report-sweep"
    with Store(out) as store:
        store.add_runs(((r.id, r.config, r.label, r.point) for r in runs), sweep="rep")
        for run in runs:
            assert store.claim(run.id)
            store.finish(run.id, toy.train(run.config))
    assert _cli(["report", str(out)])[0] == 0
    return out


def test_report_on_a_full_disk(root: Path, reported: Path) -> None:
    """The report's files do not fit: exit 2 naming one, no temp file, every file of the
    report before it whole (the old or the new, never cut)."""
    out = reported
    folder = out / "report"
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    limit = 40_000  # the store's reader index (-shm, 32 KiB) fits; the figures and page do not
    code, err = limited(root, "optarena.report.tables:write_csv", 1, limit, "report", str(out))
    line = error_line(err)
    assert code == 2 and str(folder) in line and "file size limit" in line
    assert temp_files(folder) == []
    after = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert set(after) == set(before)
    cut = [p for p, data in after.items() if len(data) < min(len(before[p]), limit)]
    assert cut == []


# --------------------------------------------------------------------------- read-only


@pytest.mark.parametrize(
    ("error", "expect"),
    [
        (OSError(errno.ENOSPC, "No space left on device"), "free some space"),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), "free some space"),
        (OSError(errno.EFBIG, "File too large"), "file size limit"),
        (OSError(errno.EROFS, "Read-only file system"), "a folder you can write to"),
        (PermissionError(errno.EACCES, "Permission denied"), "a folder you can write to"),
        (PermissionError(errno.EPERM, "Operation not permitted"), "a folder you can write to"),
        (OSError(errno.EIO, "Input/output error"), "check the disk"),
        (sqlite3.OperationalError("database or disk is full"), "free some space"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "can write to"),
    ],
    ids=["enospc", "edquot", "efbig", "erofs", "eacces", "eperm", "eio", "sqlite-full", "ro"],
)
def test_storage_errors_name_the_path_and_the_fix(error: BaseException, expect: str) -> None:
    converted = atomic.storage_error("/data/out/file.json", error)
    assert isinstance(converted, StorageError)
    text = str(converted)
    assert text.startswith("cannot write /data/out/file.json: ") and expect in text
    assert "\n" not in text


def test_other_errors_are_not_storage_errors() -> None:
    assert atomic.storage_error("x", OSError(errno.ENOENT, "No such file")) is None
    assert atomic.storage_error("x", ValueError("not a disk problem")) is None


def _refuse_writes(code: int):
    def refuse(path, *args, **kwargs):
        raise OSError(code, os.strerror(code), str(path))

    return refuse


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES], ids=["erofs", "eacces"])
def test_an_atomic_write_into_a_read_only_folder(tmp_path: Path, monkeypatch, code) -> None:
    target = tmp_path / "summary.json"
    target.write_text("old\n")
    monkeypatch.setattr(os, "replace", _refuse_writes(code))
    with pytest.raises(StorageError, match=r"summary.json: .*a folder you can write to"):
        atomic.write_text(target, "new\n")
    assert target.read_text() == "old\n" and temp_files(tmp_path) == []


def test_report_into_a_read_only_folder(reported: Path, monkeypatch) -> None:
    """``report`` where its files cannot be written: one line, exit 2, the old report kept."""
    out = reported
    page = (out / "report" / "index.html").read_bytes()
    monkeypatch.setattr(atomic, "open", _refuse_writes(errno.EROFS), raising=False)
    code, err = _cli(["report", str(out)])
    line = error_line(err)
    assert code == 2 and "Read-only file system" in line and str(out / "report") in line
    assert (out / "report" / "index.html").read_bytes() == page


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a 0o555 folder anyway")
def test_train_into_a_chmod_555_folder(root: Path, tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        argv = [*TRAIN, "--data", str(root / "text.txt"), "--out", str(locked / "run")]
        code, err = _cli(argv)
        line = error_line(err)
        assert code == 2 and str(locked / "run") in line and "can write to" in line
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
