"""Atomic file writes: every file optarena writes is either its old content or its new, whole.

A write goes to a temporary file in the target's own folder (so that the final rename stays on
one file system and is atomic), is flushed and ``fsync``'d, and is then renamed over the
target. A process killed at any instant leaves the old file or the new one, never a torn one,
plus at most a temporary file named ``.NAME.tmp-HOST-PID``; :func:`clean_temp_files` removes
those whose writer is gone, and every command that writes into a folder calls it on start.

A write that fails because the disk is full, a quota is spent, a file would exceed the size
limit, or the folder is read-only removes its temporary file and raises
:class:`~optarena.errors.StorageError` (a user error: one line that names the path and says what
to do, exit code 2); the target keeps its old content.

Checkpoints carry a SHA-256 checksum in a ``.sha256`` file beside them. :func:`save_torch`
writes the checksum of the new file *before* renaming the file into place, so the rename is
the one commit: a file with its final name always has its checksum, and a checksum without its
file is an orphan that is ignored and cleaned.

``fault_point(name)`` marks the instants between the steps of such a commit. Tests set
``OPTARENA_FAULT=NAME`` (optionally ``NAME@N``, the N-th time that point is reached) to have the
process SIGKILL itself exactly there (noting it in ``$OPTARENA_FAULT_LOG`` if set); without the
variable it does nothing. The points:
``file-written`` (any atomic write, before its rename), ``checkpoint-written`` (a checkpoint in
its temporary file, no checksum yet), ``checksum-written`` (its checksum written, the rename not
done), ``checkpoint-committed``, ``before-summary`` and ``after-summary`` (a run's
``summary.json``), ``before-store-write`` and ``after-store-write`` (the sweep driver recording
a run's outcome).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from optarena.errors import StorageError

# errno values that mean "no room": say so and suggest freeing space or another disk.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
# errno values that mean "not allowed to write here".
_READ_ONLY = {errno.EROFS, errno.EACCES, errno.EPERM}
# A temporary file of ours: ``.NAME.tmp-HOST-PID``, or ``.NAME.tmpPID`` (older writers).
_TEMP = re.compile(r"^\.(?P<name>.+)\.tmp(?:-(?P<host>.+)-)?(?P<pid>\d+)$")
# Temporary files from other hosts (shared file systems) older than this are abandoned.
FOREIGN_TEMP_SECONDS = 24 * 3600.0
FAULT_ENV = "OPTARENA_FAULT"
FAULT_LOG_ENV = "OPTARENA_FAULT_LOG"  # where fault_point notes each kill (tests count them)
_fault_counts: dict[str, int] = {}


# --------------------------------------------------------------------------- fault injection


def fault_point(name: str) -> None:
    """SIGKILL this process here if ``$OPTARENA_FAULT`` names this point (``NAME`` or
    ``NAME@N`` for its N-th visit, counted from 1). A no-op otherwise."""
    wanted = os.environ.get(FAULT_ENV)
    if not wanted:
        return
    target, _, nth = wanted.partition("@")
    if target != name:
        return
    _fault_counts[name] = _fault_counts.get(name, 0) + 1
    if _fault_counts[name] == int(nth or 1):
        log = os.environ.get(FAULT_LOG_ENV)
        if log:  # one line per kill, so that a test counts them exactly
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(f"{os.getpid()} {wanted}\n")
        os.kill(os.getpid(), signal.SIGKILL)


# --------------------------------------------------------------------------- errors


def storage_error(path: str | Path, err: BaseException) -> StorageError | None:
    """The one-line user error for a failed write of ``path``, or None when ``err`` is not a
    full disk, a spent quota or a read-only location (a real bug then, not the user's)."""
    code = getattr(err, "errno", None)
    text = str(err).lower()
    if isinstance(err, sqlite3.OperationalError):
        if "disk is full" in text:
            code = errno.ENOSPC
        elif "disk i/o error" in text:
            code = _errno_of_folder(Path(path).parent)
        elif "readonly" in text or "read-only" in text or "unable to open" in text:
            code = errno.EROFS
    elif (
        isinstance(err, RuntimeError)
        and code is None
        and any(s in text for s in ("unexpected pos", "file write failed", "failed to write"))
    ):  # torch's zip writer reports a failed write as RuntimeError("... unexpected pos ...")
        code = _errno_of_folder(Path(path).parent)
    if code in _NO_SPACE:
        reason = os.strerror(code) if code != errno.EFBIG else "file size limit reached"
        return StorageError(
            f"cannot write {path}: {reason}; free some space (or give a folder on another disk) "
            "and run the same command again: what was written before is kept"
        )
    if code == errno.EIO:
        return StorageError(
            f"cannot write {path}: input/output error; check the disk and its free space, then "
            "run the same command again: what was written before is kept"
        )
    if code in _READ_ONLY:
        return StorageError(
            f"cannot write {path}: {os.strerror(code)}; give a folder you can write to (or fix "
            "its permissions) and run the same command again"
        )
    return None


def _errno_of_folder(folder: Path) -> int:
    """Why writes into ``folder`` fail, for writers that lose the errno (torch's zip writer):
    no space, a file size limit (``ulimit -f``), read-only, or else an I/O error."""
    with contextlib.suppress(OSError):
        if shutil.disk_usage(folder).free < 1 << 20:
            return errno.ENOSPC
    with contextlib.suppress(ImportError, OSError, ValueError):
        import resource

        if resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY:
            return errno.EFBIG
    if not os.access(folder, os.W_OK):
        return errno.EROFS
    return errno.EIO


@contextlib.contextmanager
def storage_errors(path: str | Path) -> Iterator[None]:
    """Turn a full disk or read-only location while writing ``path`` into a StorageError."""
    try:
        yield
    except StorageError:
        raise
    except (OSError, RuntimeError, sqlite3.OperationalError) as err:
        converted = storage_error(path, err)
        if converted is None:
            raise
        raise converted from None


# --------------------------------------------------------------------------- writes


def refuse_folder(path: Path) -> None:
    """A file's path that is a folder (or a link to one) cannot be replaced by a rename: a
    one-line error before anything is written."""
    if path.is_dir():
        raise StorageError(
            f"cannot write {path}: it is a folder, not a file; move it away (or give another "
            "output folder) and run the same command again"
        )


def temp_name(path: Path) -> Path:
    """The temporary file a write of ``path`` uses (same folder; host and pid in the name)."""
    return path.with_name(f".{path.name}.tmp-{socket.gethostname()}-{os.getpid()}")


@contextlib.contextmanager
def atomic_open(
    path: str | Path, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """A file to write ``path``'s new content into; renamed over ``path`` when the block ends
    without an exception, removed (``path`` untouched) when it raises."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}")
    path = Path(path)
    refuse_folder(path)
    tmp = temp_name(path)
    binary = mode == "wb"
    try:
        with storage_errors(path):
            text_args = {} if binary else {"encoding": encoding, "newline": newline}
            with open(tmp, mode, **text_args) as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            fault_point("file-written")  # the new content whole in its temporary file
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    with atomic_open(path, "w", encoding=encoding) as fh:
        fh.write(text)


def write_texts(items: Iterable[tuple[Path, str]], encoding: str = "utf-8") -> int:
    """Many whole files, each written as :func:`write_text` writes one (old content or new,
    never torn), with one ``sync`` for all of them instead of an ``fsync`` each: every new
    content goes to its temporary file, ``os.sync()`` makes them durable, then each is renamed
    over its target. A file that already holds exactly its new content is not rewritten.
    Returns how many files were written."""
    pending: list[tuple[Path, Path]] = []
    try:
        for path, text in items:
            path = Path(path)
            refuse_folder(path)
            data = text.encode(encoding)
            with contextlib.suppress(OSError):
                if path.stat().st_size == len(data) and path.read_bytes() == data:
                    continue
            tmp = temp_name(path)
            with storage_errors(path):
                pending.append((tmp, path))
                tmp.write_bytes(data)
        if pending:
            os.sync()
            fault_point("file-written")  # every new content whole in its temporary file
        for tmp, path in pending:
            with storage_errors(path):
                os.replace(tmp, path)
    except BaseException:
        for tmp, _ in pending:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
    return len(pending)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as fh:
        fh.write(data)


def write_json(path: str | Path, value: Any, indent: int | None = 2, **dumps: Any) -> None:
    """``value`` as JSON (with a final newline)."""
    write_text(path, json.dumps(value, indent=indent, **dumps) + "\n")


class _HashingWriter:
    """A binary file that hashes what goes through it (no second read of a large file)."""

    def __init__(self, fh: IO[bytes]) -> None:
        self.fh = fh
        self.hash = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def checksum_path(path: Path) -> Path:
    """Where the checksum of ``path`` lives: ``step-N.pt`` -> ``step-N.sha256``."""
    return path.with_suffix(".sha256")


def save_torch(path: str | Path, payload: Any) -> str:
    """``torch.save(payload)`` to ``path`` with its SHA-256 in ``checksum_path(path)``,
    committed as one unit (see the module docstring); returns the checksum."""
    import torch

    path = Path(path)
    refuse_folder(path)
    tmp = temp_name(path)
    try:
        with storage_errors(path):
            with open(tmp, "wb") as fh:
                writer = _HashingWriter(fh)
                torch.save(payload, writer)
                fh.flush()
                os.fsync(fh.fileno())
            digest = writer.hash.hexdigest()
            fault_point("checkpoint-written")
            write_text(checksum_path(path), digest + "\n")
            fault_point("checksum-written")
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fault_point("checkpoint-committed")
    return digest


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def verify_checksum(path: Path) -> str | None:
    """None if ``path`` matches its checksum file, else why not."""
    sums = checksum_path(path)
    try:
        expected = sums.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        return "no checksum file (torn write)"
    except (OSError, UnicodeDecodeError):
        return "unreadable checksum file"
    if expected != sha256_of(path):
        return "checksum mismatch (corrupt)"
    return None


# --------------------------------------------------------------------------- cleaning


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (zombies count as dead)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def clean_temp_files(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Remove the temporary files (and folders) of writes that died in ``folder``.

    A temporary file is removed when its writer is gone: a pid of this host that no longer
    exists, or a file from another host untouched for a day. A live writer's file stays.
    Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    host = socket.gethostname()
    removed = []
    entries = folder.rglob(".*") if recursive else folder.glob(".*")
    for entry in list(entries):
        match = _TEMP.match(entry.name)
        if match is None:
            continue
        pid, writer_host = int(match["pid"]), match["host"] or host
        if writer_host == host:
            if pid == os.getpid() or pid_alive(pid):
                continue
        else:
            with contextlib.suppress(OSError):
                if time.time() - entry.stat().st_mtime < FOREIGN_TEMP_SECONDS:
                    continue
        with contextlib.suppress(OSError):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
    return removed


__all__ = [
    "FAULT_ENV",
    "FAULT_LOG_ENV",
    "atomic_open",
    "checksum_path",
    "clean_temp_files",
    "fault_point",
    "pid_alive",
    "refuse_folder",
    "save_torch",
    "sha256_of",
    "storage_error",
    "storage_errors",
    "temp_name",
    "verify_checksum",
    "write_bytes",
    "write_json",
    "write_text",
]
