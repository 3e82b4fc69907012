"""The SQLite results store: idempotent inserts, claims, crash recovery, results."""

from __future__ import annotations

import math
import multiprocessing as mp
import sqlite3
from pathlib import Path

import pytest

from optarena.errors import UserError
from optarena.sweep.spec import run_id
from optarena.sweep.store import Store, pid_alive


def _runs(lrs):
    for lr in lrs:
        config = {"optimizer": "adamw", "lr": lr, "model": "micro", "seed": 0}
        yield run_id(config), config, "adamw", {"lr": lr}


def test_wal_mode_and_idempotent_add(tmp_path):
    store = Store(tmp_path)
    assert store.add_runs(_runs([0.1, 0.01])) == 2
    assert store.add_runs(_runs([0.1, 0.01, 0.001])) == 1
    assert store.counts()["pending"] == 3
    assert len(store.members()) == 3
    mode = sqlite3.connect(tmp_path / "results.sqlite").execute("PRAGMA journal_mode").fetchone()
    assert mode[0] == "wal"


def test_claim_finish_and_no_second_claim(tmp_path):
    store = Store(tmp_path)
    ((rid, *_),) = list(_runs([0.1]))
    store.add_runs(_runs([0.1]))
    assert store.claim(rid)
    assert not store.claim(rid)  # this process holds it
    other = Store(tmp_path)
    assert not other.claim(rid)  # a live holder on this host
    curve = [{"step": 0, "val_loss": 5.0}, {"step": 10, "val_loss": 3.5}]  # the harness's form
    status = store.finish(
        rid,
        {
            "final_val_loss": 3.5,
            "diverged": False,
            "wall_seconds": 2.0,
            "eval_curve": curve,
            "params": 10,
        },
    )
    assert status == "done"
    rec = store.get(rid)
    assert (
        rec.status == "done"
        and rec.final_val_loss == 3.5
        and rec.eval_curve == [[0, 5.0], [10, 3.5]]
    )
    assert rec.summary["params"] == 10 and rec.attempts == 1
    assert not store.claim(rid)  # finished runs are never claimed again
    assert store.finish(rid, {"final_val_loss": 9.0}) == "done"  # late duplicate ignored
    assert store.get(rid).final_val_loss == 3.5
    assert [e["event"] for e in store.events(rid)] == ["claim", "finish", "duplicate-finish"]


def test_diverged_and_failed(tmp_path):
    store = Store(tmp_path)
    ids = [r[0] for r in _runs([1.0, 10.0])]
    store.add_runs(_runs([1.0, 10.0]))
    for rid in ids:
        assert store.claim(rid)
    assert store.finish(ids[0], {"final_val_loss": math.nan, "diverged": True}) == "diverged"
    store.fail(ids[1], "ValueError: boom")
    rec = store.get(ids[1])
    assert rec.status == "failed" and rec.error == "ValueError: boom"
    assert store.counts() == {"pending": 0, "running": 0, "done": 0, "diverged": 1, "failed": 1}
    assert not store.claim(ids[1], retry_failed=False)
    assert store.claim(ids[1])  # failed runs are retried by default
    assert store.get(ids[1]).attempts == 2


def _claim_and_die(directory, rid):
    Store(directory).claim(rid)


def test_run_of_dead_process_is_reclaimable(tmp_path):
    store = Store(tmp_path)
    store.add_runs(_runs([0.1]))
    ((rid, *_),) = list(_runs([0.1]))
    proc = mp.get_context("spawn").Process(target=_claim_and_die, args=(str(tmp_path), rid))
    proc.start()
    proc.join()
    rec = store.get(rid)
    assert rec.status == "running" and rec.pid == proc.pid
    assert not pid_alive(proc.pid)
    assert store.claim(rid)
    assert [e["event"] for e in store.events(rid)] == ["claim", "reclaim"]


def test_stale_heartbeat_from_another_host(tmp_path):
    store = Store(tmp_path)
    store.add_runs(_runs([0.1]))
    ((rid, *_),) = list(_runs([0.1]))
    assert store.claim(rid)
    elsewhere = Store(tmp_path)
    elsewhere.host = "another-host"
    assert not elsewhere.claim(rid, stale_seconds=60)  # heartbeat is fresh
    assert elsewhere.claim(rid, stale_seconds=-1)  # stale: presumed dead


def test_release_gives_runs_back(tmp_path):
    store = Store(tmp_path)
    store.add_runs(_runs([0.1]))
    ((rid, *_),) = list(_runs([0.1]))
    store.claim(rid)
    store.release([rid])
    assert store.get(rid).status == "pending"


def test_missing_store_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="holds no sweep results"):
        Store(tmp_path / "nothing", create=False)


def test_a_file_that_is_not_a_database_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "results.sqlite"
    path.write_bytes(b"not a database\n")
    with pytest.raises(UserError, match=r"is not a results database.*move it aside"):
        Store(tmp_path)
    assert path.read_bytes() == b"not a database\n"
    (tmp_path / "afile").write_text("")
    with pytest.raises(UserError, match="cannot open the results folder"):
        Store(tmp_path / "afile" / "sub")
