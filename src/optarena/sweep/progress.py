"""What a running sweep shows: runs done / running / left, best loss per optimizer, ETA.

On a terminal a live rich panel; elsewhere (logs, CI, a Slurm driver's output file) one plain
line per finished run, so that a log stays readable.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


def short_value(value: Any) -> str:
    """A swept value as people read it: ``0.00316`` not ``0.00316227766017``."""
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(short_value(v) for v in value) + ")"
    return str(value)


def point_text(label: str, point: dict[str, Any], seed: Any = None) -> str:
    """``adamw lr=0.00316 beta2=0.95 seed=0``: the series and every value its grid varies
    (dotted keys by their last part: ``hparams.beta2`` is ``beta2``)."""
    parts = [label, *(f"{key.rsplit('.', 1)[-1]}={short_value(v)}" for key, v in point.items())]
    if seed is not None:
        parts.append(f"seed={seed}")
    return " ".join(parts)


def format_seconds(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


@dataclass
class SweepProgress:
    """Counts and bests of one sweep invocation; ``update`` after every change."""

    total: int
    already: int  # finished before this invocation started
    console: Console = field(default_factory=lambda: Console(stderr=True))
    done: int = 0
    diverged: int = 0
    failed: int = 0
    running: int = 0
    elsewhere: int = 0  # runs another live driver holds
    best: dict[str, tuple[float, float]] = field(default_factory=dict)  # label -> (loss, lr)
    start: float = field(default_factory=time.monotonic)
    _live: Live | None = None

    @property
    def finished_now(self) -> int:
        return self.done + self.diverged + self.failed

    @property
    def left(self) -> int:
        used = self.already + self.finished_now + self.running + self.elsewhere
        return max(0, self.total - used)

    def eta(self) -> float:
        """Remaining runs times the observed time per finished run of this invocation."""
        if not self.finished_now:
            return math.inf
        per_run = (time.monotonic() - self.start) / self.finished_now
        return per_run * (self.left + self.running)

    def __enter__(self) -> SweepProgress:
        if self.console.is_terminal:
            self._live = Live(self._render(), console=self.console, refresh_per_second=2)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None

    def record(
        self, label: str, lr: float | None, status: str, loss: float | None, line: str
    ) -> None:
        """One run finished: count it, track the best loss, print or refresh."""
        if status == "done":
            self.done += 1
        elif status == "diverged":
            self.diverged += 1
        else:
            self.failed += 1
        improves = loss is not None and (label not in self.best or loss < self.best[label][0])
        if status == "done" and improves and math.isfinite(loss):
            self.best[label] = (loss, lr if lr is not None else math.nan)
        if self._live is None:
            self.console.print(
                f"[{self.already + self.finished_now}/{self.total}] {line}"
                f" | ETA {format_seconds(self.eta())}",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
        self.refresh()

    def refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _render(self) -> Group:
        finished = self.already + self.finished_now
        head = Text.assemble(
            ("sweep ", "bold"),
            f"{finished}/{self.total} finished ",
            (
                f"({self.done} done, {self.diverged} diverged, {self.failed} failed now; "
                f"{self.already} before) ",
                "dim",
            ),
            f"| {self.running} running | "
            + (f"{self.elsewhere} held by another driver | " if self.elsewhere else "")
            + f"{self.left} left | "
            f"ETA {format_seconds(self.eta())} | {format_seconds(time.monotonic() - self.start)}"
            " elapsed",
        )
        table = Table(box=None, pad_edge=False, show_header=True, header_style="bold")
        table.add_column("optimizer")
        table.add_column("best loss so far", justify="right")
        table.add_column("at LR", justify="right")
        for label, (loss, lr) in sorted(self.best.items(), key=lambda kv: kv[1][0]):
            table.add_row(label, f"{loss:.4f}", f"{lr:.3g}")
        return Group(head, table)
