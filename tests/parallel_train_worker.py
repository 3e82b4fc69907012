"""Run several training jobs in one ``torchrun`` launch (one process group for all of them,
which saves a launcher start-up per run): ``parallel_train_worker.py JOBS.json``.

``JOBS.json`` is a list of ``{"function": "MODULE:FUNCTION", "config": {...}}``: each job's
config (its ``parallel`` mode included) is run by its function (``optarena.train:train`` for
pre-training, ``optarena.posttrain.sft:finetune`` for fine-tuning), which finds the process
group already made here and leaves it alone.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch.distributed as dist


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    try:
        for job in jobs:
            module, name = job["function"].split(":")
            getattr(importlib.import_module(module), name)(job["config"])
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
