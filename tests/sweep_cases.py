"""An executor for sweep tests: each task runs the toy training function in this process."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from optarena.sweep import toy
from optarena.sweep.executors import Executor, Outcome, Task, execute

TOY = "optarena.sweep.toy:train"
SLOW_FIRST = "sweep_cases:slow_first_attempt"


def slow_first_attempt(config: dict[str, Any]) -> dict[str, Any]:
    """The toy run, which sleeps ``toy_seconds`` on its first attempt only (marked in its
    ``out``): time to kill what runs it; a retry writes ``toy_started`` and returns at once."""
    first = Path(config["out"]) / "first_attempt"
    if first.exists():
        config = {**config, "toy_seconds": 1e-3}
    else:
        first.parent.mkdir(parents=True, exist_ok=True)
        first.write_text(str(os.getpid()))
    return toy.train(config)


class InProcess(Executor):
    """Runs ``capacity`` tasks at a time in this process; after ``stop_after`` submits it
    raises KeyboardInterrupt (what Ctrl-C does to a sweep or a tune)."""

    def __init__(self, capacity: int = 2, stop_after: int | None = None) -> None:
        self.capacity = capacity
        self.queue: list[Task] = []
        self.submitted = 0
        self.stop_after = stop_after

    def submit(self, task: Task) -> None:
        if self.stop_after is not None and self.submitted >= self.stop_after:
            raise KeyboardInterrupt
        self.submitted += 1
        self.queue.append(task)

    def wait(self, timeout: float) -> list[Outcome]:
        done, self.queue = self.queue, []
        return [Outcome(t, summary=execute(TOY, t.config)["summary"]) for t in done]

    def close(self, cancel: bool = False) -> None:
        self.queue.clear()
