"""A run's log: ``OUT/metrics.jsonl`` (one JSON record per line), a listener (``on_log``), and
optionally TensorBoard and Weights & Biases.

Records are appended and flushed one line at a time, so a kill leaves at most a torn last line;
reading skips lines that do not parse. A resumed run first drops what the interrupted one logged
after its checkpoint (it is logged again as the steps are redone), so every step appears once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from optarena import atomic
from optarena.errors import UserError

METRICS_FILE = "metrics.jsonl"


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; lines that do not parse (a torn last line) are skipped."""
    records = []
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class RunLog:
    """Where a run's records go. ``out=None`` (no output folder, or not rank 0) keeps only the
    listener."""

    def __init__(
        self,
        out: Path | None,
        resume_step: int | None,
        listener: Callable[[dict[str, Any]], None] | None = None,
        *,
        tensorboard: bool = False,
        wandb: str | None = None,
        wandb_project: str = "optarena",
        wandb_config: dict[str, Any] | None = None,
    ) -> None:
        self.jsonl = None
        self.tb = None
        self.wandb_run = None
        self.listener = listener
        if out is None:
            return
        self.path = out / METRICS_FILE
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_records(self.path) if r.get("step", 0) <= resume_step]
            atomic.write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        # a fresh run starts a fresh log (a leftover one had no checkpoint or summary)
        with atomic.storage_errors(self.path):
            self.jsonl = self.path.open("a" if resume_step is not None else "w", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "--tensorboard needs tensorboard: pip install tensorboard"
                ) from None
            self.tb = SummaryWriter(str(out / "tensorboard"))
        if wandb:
            try:
                import wandb as wandb_module
            except ImportError:
                raise UserError("--wandb needs Weights & Biases: pip install wandb") from None
            self.wandb_run = wandb_module.init(
                project=wandb_project,
                dir=str(out),
                mode=wandb,
                config=wandb_config,
                name=out.name,
                resume="allow",
            )

    def log(self, record: dict[str, Any]) -> None:
        if self.listener:
            self.listener(dict(record))
        if self.jsonl:
            with atomic.storage_errors(self.path):
                self.jsonl.write(json.dumps(record) + "\n")
                self.jsonl.flush()
        step = record["step"]
        values = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)
        if self.wandb_run:
            self.wandb_run.log(values, step=step)

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
            self.jsonl = None
        if self.tb:
            self.tb.close()
            self.tb = None
        if self.wandb_run:
            self.wandb_run.finish()
            self.wandb_run = None


__all__ = ["METRICS_FILE", "RunLog", "read_records"]
