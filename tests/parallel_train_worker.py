"""Run several training configs in one ``torchrun`` launch (one process group for all of them,
which saves a launcher start-up per run): ``parallel_train_worker.py MODE CONFIGS.json``.

Every config in the JSON list is trained with ``parallel=MODE``; ``optarena.train`` finds the
process group already made here and leaves it alone.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from optarena.train import train


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    configs = json.loads(Path(path).read_text())
    dist.init_process_group("gloo")
    try:
        for config in configs:
            train({**config, "parallel": mode})
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
