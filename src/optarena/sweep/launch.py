"""A sweep run that is itself distributed: every rank runs the training function.

``torchrun --nproc_per_node=N -m optarena.sweep.launch FUNCTION CONFIG.json RESULT.json`` (the
local and Ray backends start it; Slurm runs :func:`slurm_task` in each task of a job). Every
rank calls ``FUNCTION(config)`` (``optarena.train`` joins the process group torchrun or Slurm
describes); rank 0 writes what came out to ``RESULT.json`` for the executor to hand back.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from optarena import atomic


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def main(argv: list[str] | None = None) -> int:
    from optarena.sweep.executors import execute

    function, config_path, result_path = argv if argv is not None else sys.argv[1:4]
    config = json.loads(Path(config_path).read_text(encoding="utf-8"))
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    payload = execute(function, config, threads)
    if _rank() == 0:
        atomic.write_json(result_path, payload, indent=None, default=str)
    return 0 if "summary" in payload else 1


def slurm_task(function: str, config: dict[str, Any], threads: int) -> dict[str, Any]:
    """One Slurm task of a distributed run (submitit): export the torch.distributed variables
    of this task (rank, world size, master address of the job's first node), then run."""
    from submitit.helpers import TorchDistributedEnvironment

    from optarena.sweep.executors import execute

    # every task sees the GPUs of its node; LOCAL_RANK picks one (optarena.distributed)
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return execute(function, config, threads)


if __name__ == "__main__":
    raise SystemExit(main())
