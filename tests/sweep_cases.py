"""An executor for sweep tests: each task runs the toy training function in this process."""

from __future__ import annotations

from optarena.sweep.executors import Executor, Outcome, Task, execute

TOY = "optarena.sweep.toy:train"


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
