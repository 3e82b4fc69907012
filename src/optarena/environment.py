"""What decides a run's numbers besides its config: threads, library versions, the code.

Results of the same config differ with the torch thread count (reductions are split
differently) and across torch versions, so every training summary records them
(``summary["environment"]``) and the report states them. Reading this costs nothing at import:
``git`` is asked once per process.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path
from typing import Any


def _git(root: Path, *args: str) -> str:
    """The stripped output of ``git -C root ARGS`` (raises when git fails or is missing)."""
    done = subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5, check=True
    )
    return done.stdout.strip()


@functools.cache
def code_version() -> str:
    """``optarena <version>`` plus the git commit of this checkout (``+dirty`` when it has
    uncommitted changes), or the version alone for an installed copy outside git."""
    from optarena import __version__

    root = Path(__file__).resolve().parents[2]
    try:
        commit = _git(root, "rev-parse", "--short=12", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return __version__
    if not commit:
        return __version__
    return f"{__version__}+g{commit}{'.dirty' if dirty else ''}"


def run_environment() -> dict[str, Any]:
    """The environment of the training process calling it (torch must be importable)."""
    import torch

    return {
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "optarena": code_version(),
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
