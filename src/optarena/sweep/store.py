"""The results store: one SQLite file (``DIR/results.sqlite``, WAL mode) holding every run.

Only the sweep driver writes here (workers return results to it), so one file on the driver's
disk serves local pools, Ray and Slurm alike. Status moves pending -> running -> done |
diverged | failed. A claim records pid, host and a heartbeat: a run left ``running`` by a
process that no longer exists (same host) or whose heartbeat went stale (another host) can be
claimed again, which is how a sweep resumes after SIGKILL without running anything twice.
An ``events`` table keeps the history of every claim and finish, for audits and tests.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optarena import atomic
from optarena.atomic import pid_alive, storage_error
from optarena.errors import UserError
from optarena.tasks import model_of_run

STATUSES = ("pending", "running", "done", "diverged", "failed")
FINISHED = ("done", "diverged")  # a result: never rerun
DB_NAME = "results.sqlite"
# Members of sweeps named "tune:NAME" are tuning runs (``optarena tune``): the report shows
# their path, not LR series.
TUNE_PREFIX = "tune:"
# A running run whose heartbeat is older than this is presumed dead (other hosts).
STALE_SECONDS = 120.0
# Summary entries the store keeps elsewhere (the curve, the run's config) or not at all.
_NOT_IN_SUMMARY = ("eval_curve", "config", "requested_config")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    config TEXT NOT NULL,
    optimizer TEXT NOT NULL,
    model TEXT,
    lr REAL,
    seed INTEGER,
    status TEXT NOT NULL DEFAULT 'pending',
    error TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    pid INTEGER,
    host TEXT,
    heartbeat REAL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    final_val_loss REAL,
    wall_seconds REAL,
    summary TEXT,
    eval_curve TEXT
);
CREATE TABLE IF NOT EXISTS members (
    run_id TEXT NOT NULL REFERENCES runs(id),
    label TEXT NOT NULL,
    point TEXT NOT NULL,
    sweep TEXT NOT NULL,
    PRIMARY KEY (run_id, label, point)
);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    event TEXT NOT NULL,
    time REAL NOT NULL,
    pid INTEGER,
    host TEXT,
    detail TEXT
);
CREATE TABLE IF NOT EXISTS slurm_jobs (
    run_id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    nonce TEXT NOT NULL,
    submitted REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_status ON runs(status);
"""


@dataclass
class RunRecord:
    """One row of ``runs`` with its JSON columns decoded."""

    id: str
    config: dict[str, Any]
    optimizer: str
    model: str | None
    lr: float | None
    seed: int | None
    status: str
    error: str | None
    attempts: int
    pid: int | None
    host: str | None
    heartbeat: float | None
    started: float | None
    finished: float | None
    final_val_loss: float | None
    wall_seconds: float | None
    summary: dict[str, Any] | None
    eval_curve: list[list[float]]


@dataclass(frozen=True)
class Member:
    """A run's place in a series: its label and the swept values that define its point."""

    run_id: str
    label: str
    point: dict[str, Any]
    sweep: str


class Store:
    """A handle on ``DIR/results.sqlite``; cheap to open, safe to share across threads."""

    def __init__(self, directory: str | Path, *, create: bool = True) -> None:
        """``create=False`` opens an existing store read-only (``report``): nothing in the
        folder is written, a schema is never added to a file that lacks one."""
        self.dir = Path(directory)
        self.path = self.dir / DB_NAME
        self.host = socket.gethostname()
        self.pid = os.getpid()
        if create:
            self._conn = self._open_for_writing()
        else:
            self._conn = self._open_read_only()
        self._conn.row_factory = sqlite3.Row

    def _open_for_writing(self) -> sqlite3.Connection:
        if self.dir.exists() and not self.dir.is_dir():
            raise UserError(f"{self.dir} is a file, not a folder; give --out a folder")
        try:
            with atomic.storage_errors(self.path):
                self.dir.mkdir(parents=True, exist_ok=True)
                conn = sqlite3.connect(
                    self.path, timeout=60.0, isolation_level=None, check_same_thread=False
                )
        except (OSError, sqlite3.OperationalError) as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise UserError(
                f"cannot open the results folder {self.dir}: {reason}; give --out a folder "
                "you can write to"
            ) from None
        try:
            with atomic.storage_errors(self.path):
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:  # the file is left as it is
            conn.close()
            raise UserError(
                f"{self.path} is not a results database ({err}); move it aside or give "
                "another --out"
            ) from None
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_read_only(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise UserError(
                f"{self.dir} holds no sweep results ({DB_NAME} missing); run "
                f"`optarena sweep SPEC --out {self.dir}` first"
            )
        if self.path.stat().st_size == 0:
            raise UserError(
                f"{self.path} is empty (0 bytes): no sweep has written there yet; run "
                f"`optarena sweep SPEC --out {self.dir}` first"
            )
        uri = self.path.resolve().as_uri()
        # on a read-only medium SQLite cannot make the WAL index: read the file as it is
        mode = "mode=ro" if os.access(self.dir, os.W_OK) else "immutable=1"
        try:
            conn = sqlite3.connect(
                f"{uri}?{mode}",
                uri=True,
                timeout=60.0,
                isolation_level=None,
                check_same_thread=False,
            )
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        except sqlite3.DatabaseError as err:
            full = isinstance(err, sqlite3.OperationalError) and storage_error(self.path, err)
            if full:  # the reader's index (-shm) could not be made: a full disk, not a bad file
                raise full from None
            raise UserError(
                f"{self.path} is not a results database ({err}); move it aside or give "
                "another folder"
            ) from None
        if not {"runs", "members"} <= tables:
            conn.close()
            raise UserError(f"{self.path} is an SQLite file but not an optarena results store")
        return conn

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run_dir(self, run_id: str) -> Path:
        """Where a run's own files (metrics, checkpoints) live."""
        return self.dir / "runs" / run_id

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; a full disk or read-only store becomes a StorageError (the
        transaction rolled back, the store as it was)."""
        with atomic.storage_errors(self.path):
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _event(self, run_id: str, event: str, detail: str | None = None) -> None:
        self._conn.execute(
            "INSERT INTO events(run_id, event, time, pid, host, detail) VALUES (?,?,?,?,?,?)",
            (run_id, event, time.time(), self.pid, self.host, detail),
        )

    # ----------------------------------------------------------------------------- writes

    def add_runs(
        self,
        runs: Iterable[tuple[str, Mapping[str, Any], str, Mapping[str, Any]]],
        *,
        sweep: str = "",
    ) -> int:
        """Insert ``(id, config, label, point)`` rows; existing runs are left untouched.

        Returns how many runs are new. Idempotent: adding the same runs twice changes nothing.
        """
        now = time.time()
        new = 0
        with self._transaction() as db:
            for run_id, config, label, point in runs:
                cur = db.execute(
                    "INSERT OR IGNORE INTO runs(id, config, optimizer, model, lr, seed, created)"
                    " VALUES (?,?,?,?,?,?,?)",
                    (
                        run_id,
                        _dumps(config),
                        config["optimizer"],
                        model_of_run(config),
                        config.get("lr"),
                        config.get("seed"),
                        now,
                    ),
                )
                new += cur.rowcount
                db.execute(
                    "INSERT OR IGNORE INTO members(run_id, label, point, sweep) VALUES (?,?,?,?)",
                    (run_id, label, _dumps(point), sweep),
                )
        return new

    def claim(
        self, run_id: str, *, retry_failed: bool = True, stale_seconds: float = STALE_SECONDS
    ) -> bool:
        """Mark a run ``running`` for this process if nobody else holds it; True on success."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT status, pid, host, heartbeat FROM runs WHERE id=?", (run_id,)
            ).fetchone()
            if row is None or not self._claimable(row, retry_failed, stale_seconds):
                return False
            reclaimed = row["status"] == "running"
            now = time.time()
            db.execute(
                "UPDATE runs SET status='running', pid=?, host=?, heartbeat=?, started=?,"
                " attempts=attempts+1, error=NULL WHERE id=?",
                (self.pid, self.host, now, now, run_id),
            )
            self._event(
                run_id,
                "reclaim" if reclaimed else "claim",
                f"from {row['host']}:{row['pid']}" if reclaimed else None,
            )
        return True

    def _claimable(self, row: sqlite3.Row, retry_failed: bool, stale_seconds: float) -> bool:
        status = row["status"]
        if status == "pending" or (status == "failed" and retry_failed):
            return True
        if status != "running":
            return False
        if row["host"] == self.host and row["pid"] is not None:
            return row["pid"] != self.pid and not pid_alive(row["pid"])
        return time.time() - (row["heartbeat"] or 0.0) > stale_seconds

    def heartbeat(self, run_ids: Iterable[str]) -> None:
        """Tell other drivers these runs are still being worked on."""
        ids = list(run_ids)
        if not ids:
            return
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "UPDATE runs SET heartbeat=? WHERE id=? AND status='running' AND pid=? AND host=?",
                [(now, i, self.pid, self.host) for i in ids],
            )

    def finish(self, run_id: str, summary: Mapping[str, Any]) -> str:
        """Record a training summary; status becomes ``diverged`` or ``done``. Returns it.

        A second finish of a run that already has a result is ignored (and logged), so a late
        duplicate can never overwrite or double a result.
        """
        diverged = bool(summary.get("diverged"))
        loss = _finite_or_none(summary.get("final_val_loss"))
        status = "diverged" if diverged or loss is None else "done"
        curve = normalize_curve(summary.get("eval_curve") or [])
        slim = {k: v for k, v in summary.items() if k not in _NOT_IN_SUMMARY}
        with self._transaction() as db:
            row = db.execute("SELECT status FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None:
                raise KeyError(run_id)
            if row["status"] in FINISHED:
                self._event(run_id, "duplicate-finish", status)
                return row["status"]
            db.execute(
                "UPDATE runs SET status=?, error=NULL, finished=?, final_val_loss=?,"
                " wall_seconds=?, summary=?, eval_curve=?, heartbeat=? WHERE id=?",
                (
                    status,
                    time.time(),
                    loss,
                    _finite_or_none(summary.get("wall_seconds")),
                    _dumps(slim),
                    _dumps(curve),
                    time.time(),
                    run_id,
                ),
            )
            self._event(run_id, "finish", status)
        return status

    def fail(self, run_id: str, error: str) -> None:
        """Record that a run raised; it is retried on the next sweep (not this one)."""
        with self._transaction() as db:
            row = db.execute("SELECT status FROM runs WHERE id=?", (run_id,)).fetchone()
            if row is None or row["status"] in FINISHED:
                return
            db.execute(
                "UPDATE runs SET status='failed', error=?, finished=? WHERE id=?",
                (error, time.time(), run_id),
            )
            self._event(run_id, "fail", error)

    def release(self, run_ids: Iterable[str]) -> None:
        """Give runs this process holds back to ``pending`` (clean interruption)."""
        with self._transaction() as db:
            for run_id in run_ids:
                cur = db.execute(
                    "UPDATE runs SET status='pending' WHERE id=? AND status='running' AND pid=?"
                    " AND host=?",
                    (run_id, self.pid, self.host),
                )
                if cur.rowcount:
                    self._event(run_id, "release")

    def slurm_jobs(self) -> SlurmJobs:
        """The Slurm jobs this store's sweeps submitted (the Slurm backend keeps them here)."""
        return SlurmJobs(self)

    # ------------------------------------------------------------------------------ reads

    def runs(self, *, status: str | Iterable[str] | None = None) -> list[RunRecord]:
        """Every run (optionally only some statuses), oldest first."""
        sql = "SELECT * FROM runs"
        args: tuple[Any, ...] = ()
        if status is not None:
            wanted = (status,) if isinstance(status, str) else tuple(status)
            sql += f" WHERE status IN ({','.join('?' * len(wanted))})"
            args = wanted
        rows = self._conn.execute(sql + " ORDER BY created, rowid", args).fetchall()
        return [_record(r) for r in rows]

    def get(self, run_id: str) -> RunRecord | None:
        row = self._conn.execute("SELECT * FROM runs WHERE id=?", (run_id,)).fetchone()
        return _record(row) if row else None

    def members(self) -> list[Member]:
        rows = self._conn.execute("SELECT * FROM members ORDER BY rowid").fetchall()
        return [Member(r["run_id"], r["label"], json.loads(r["point"]), r["sweep"]) for r in rows]

    def counts(self) -> dict[str, int]:
        rows = self._conn.execute("SELECT status, COUNT(*) AS n FROM runs GROUP BY status")
        out = dict.fromkeys(STATUSES, 0)
        out.update({r["status"]: r["n"] for r in rows})
        return out

    def events(self, run_id: str | None = None) -> list[dict[str, Any]]:
        sql, args = "SELECT * FROM events", ()
        if run_id is not None:
            sql, args = sql + " WHERE run_id=?", (run_id,)
        return [dict(r) for r in self._conn.execute(sql + " ORDER BY seq", args)]


class SlurmJobs:
    """The ``slurm_jobs`` table: run id -> the job that runs it and the nonce its result file
    carries. Only the driver's process writes it (the executor lives there)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, run_id: str) -> dict[str, str] | None:
        row = self.store._conn.execute(
            "SELECT job_id, nonce FROM slurm_jobs WHERE run_id=?", (run_id,)
        ).fetchone()
        return {"job": row["job_id"], "nonce": row["nonce"]} if row else None

    def all(self) -> dict[str, dict[str, str]]:
        rows = self.store._conn.execute("SELECT run_id, job_id, nonce FROM slurm_jobs")
        return {r["run_id"]: {"job": r["job_id"], "nonce": r["nonce"]} for r in rows}

    def record(self, jobs: list[tuple[str, str, str]]) -> None:
        now = time.time()
        with self.store._transaction() as db:
            db.executemany(
                "INSERT OR REPLACE INTO slurm_jobs(run_id, job_id, nonce, submitted)"
                " VALUES (?,?,?,?)",
                [(run_id, job, nonce, now) for run_id, job, nonce in jobs],
            )
            for run_id, job, _ in jobs:
                self.store._event(run_id, "submit", f"slurm job {job}")

    def forget(self, run_ids: list[str]) -> None:
        with self.store._transaction() as db:
            db.executemany("DELETE FROM slurm_jobs WHERE run_id=?", [(r,) for r in run_ids])


def normalize_curve(curve: Iterable[Any]) -> list[list[float | None]]:
    """``[[step, val_loss], ...]`` from pairs or ``{"step", "val_loss"}`` dicts (the harness)."""
    out = []
    for point in curve:
        if isinstance(point, Mapping):
            step, loss = point.get("step"), point.get("val_loss", point.get("loss"))
        else:
            step, loss = point[0], point[1]
        out.append([step, _finite_or_none(loss)])
    return out


def _record(row: sqlite3.Row) -> RunRecord:
    return RunRecord(
        id=row["id"],
        config=json.loads(row["config"]),
        optimizer=row["optimizer"],
        model=row["model"],
        lr=row["lr"],
        seed=row["seed"],
        status=row["status"],
        error=row["error"],
        attempts=row["attempts"],
        pid=row["pid"],
        host=row["host"],
        heartbeat=row["heartbeat"],
        started=row["started"],
        finished=row["finished"],
        final_val_loss=row["final_val_loss"],
        wall_seconds=row["wall_seconds"],
        summary=json.loads(row["summary"]) if row["summary"] else None,
        eval_curve=json.loads(row["eval_curve"]) if row["eval_curve"] else [],
    )


def _dumps(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=_json_default)


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _finite_or_none(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None
