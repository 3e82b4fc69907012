"""A run's checkpoints: ``OUT/checkpoints/step-N.pt`` (one process) or ``step-N.dcp/`` (DDP /
FSDP, see :mod:`optarena.distributed`), newest first, each either whole and valid or skipped.

A ``.pt`` checkpoint and its ``.sha256`` are committed as one unit (:func:`optarena.atomic.
save_torch`): the file's rename is the commit, its checksum is already there. Loading checks the
checksum, then reads the file with ``torch.load(weights_only=True)``, which builds tensors and
plain containers only and never runs code from the file.

:func:`resume_point` picks the newest checkpoint that loads. One that does not (a torn write of
an older version, a flipped bit, a file cut short) is skipped with a warning naming it, and the
run resumes from the one before; with none left it starts from scratch. A run is never wedged by
a bad checkpoint. A checkpoint whose checksum matches but that is not an optarena checkpoint of
this version (a file someone put there, another tool's) is not skipped but refused
(:class:`~optarena.errors.UserError`): starting fresh would overwrite it.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optarena import atomic
from optarena.errors import UserError

CHECKPOINT_VERSION = 1
_STEP = re.compile(r"^step-(\d+)\.(pt|dcp)$")


class NotACheckpoint(ValueError):
    """A whole file that is not an optarena checkpoint of this version (not a torn write)."""


@dataclass
class Found:
    """A loadable checkpoint: where it is, its payload (for DCP: ``meta.pt``; the model and
    optimizer are loaded in place later), and the unusable newer ones that were skipped."""

    path: Path
    payload: dict[str, Any]
    skipped: list[Path]

    @property
    def step(self) -> int:
        return int(self.payload["step"])


def step_of(path: Path) -> int | None:
    match = _STEP.match(path.name)
    return int(match[1]) if match else None


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:08d}.pt"


def _checkpoint_files(folder: Path) -> list[Path]:
    """``step-N.pt`` files in ``folder``, newest (highest step) first."""
    return sorted(folder.glob("step-*.pt"), reverse=True)


def save_checkpoint(folder: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``step-N.pt`` with its checksum (one commit); keep the newest ``keep`` (0: all)."""
    with atomic.storage_errors(folder):
        folder.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(folder, step)
    atomic.save_torch(path, payload)
    if keep:
        for old in _checkpoint_files(folder)[keep:]:
            remove_checkpoint(old)
    return path


def remove_checkpoint(path: Path) -> None:
    """Delete a checkpoint: the file first, then its checksum (an orphan checksum is inert)."""
    if path.is_dir():
        import shutil

        shutil.rmtree(path, ignore_errors=True)
        return
    path.unlink(missing_ok=True)
    atomic.checksum_path(path).unlink(missing_ok=True)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's payload if its checksum matches; :class:`ValueError` says why not."""
    import torch

    problem = atomic.verify_checksum(path)
    if problem:
        raise ValueError(problem)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"unreadable ({type(err).__name__})") from None
    return check_payload(payload)


def check_payload(payload: Any) -> dict[str, Any]:
    """``payload`` if it is an optarena checkpoint of this version, else ValueError."""
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        raise NotACheckpoint("not an optarena checkpoint of this version")
    missing = [k for k in ("step", "requested_config") if k not in payload]
    if missing:
        raise NotACheckpoint(f"not an optarena checkpoint (no {', '.join(missing)})")
    try:
        config = json.loads(payload["requested_config"])
    except (TypeError, ValueError):
        config = None
    if not isinstance(config, dict) or isinstance(payload["step"], bool):
        raise NotACheckpoint("not an optarena checkpoint (requested_config is not a JSON table)")
    if not isinstance(payload["step"], int) or payload["step"] < 0:
        raise NotACheckpoint(f"not an optarena checkpoint (step {payload['step']!r})")
    return payload


def latest_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest valid ``step-N.pt``, skipping torn or corrupt ones with a warning; None if
    none is valid."""
    found = resume_point(folder, parallel=False)
    return (found.path, found.payload) if found else None


def resume_point(folder: Path, parallel: bool = True) -> Found | None:
    """The newest checkpoint that loads, a ``.pt`` or (``parallel``) a ``.dcp`` directory,
    with a warning for each newer one skipped; None when there is none."""
    from optarena.distributed import load_meta

    if not folder.is_dir():
        return None
    candidates = [p for p in folder.iterdir() if step_of(p) is not None]
    if not parallel:
        candidates = [p for p in candidates if p.suffix == ".pt"]
    candidates.sort(key=lambda p: (step_of(p), p.suffix == ".pt"), reverse=True)
    skipped = []
    for path in candidates:
        try:
            payload = load_meta(path) if path.suffix == ".dcp" else load_checkpoint(path)
        except NotACheckpoint as err:
            raise UserError(
                f"{path} is {err}; move it out of {folder} (or choose another --out): a fresh "
                "start would overwrite it"
            ) from None
        except ValueError as err:
            warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=2)
            skipped.append(path)
            continue
        return Found(path, payload, skipped)
    if skipped:
        warnings.warn(f"no valid checkpoint in {folder}; starting from scratch", stacklevel=2)
    return None


def clean_folder(folder: Path) -> None:
    """Temporary files of dead writers, and checksums whose checkpoint is gone."""
    atomic.clean_temp_files(folder)
    if folder.is_dir():
        for sums in folder.glob("step-*.sha256"):
            if not sums.with_suffix(".pt").exists():
                sums.unlink(missing_ok=True)


__all__ = [
    "CHECKPOINT_VERSION",
    "Found",
    "NotACheckpoint",
    "check_payload",
    "checkpoint_path",
    "clean_folder",
    "latest_checkpoint",
    "load_checkpoint",
    "remove_checkpoint",
    "resume_point",
    "save_checkpoint",
    "step_of",
]
