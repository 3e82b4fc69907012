"""Run several training configs in one ``torchrun`` launch (one process group for all of them,
which saves a launcher start-up per run): ``parallel_train_worker.py MODE CONFIGS.json
[MODULE:FUNCTION]``.

Every config in the JSON list is run with ``parallel=MODE`` by the function (default
``optarena.train:train``; ``optarena.posttrain.sft:finetune`` for fine-tuning), which finds the
process group already made here and leaves it alone.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import torch.distributed as dist


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    module, name = (sys.argv[3] if len(sys.argv) > 3 else "optarena.train:train").split(":")
    run = getattr(importlib.import_module(module), name)
    configs = json.loads(Path(path).read_text())
    dist.init_process_group("gloo")
    try:
        for config in configs:
            run({**config, "parallel": mode})
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
