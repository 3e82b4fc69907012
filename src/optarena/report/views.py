"""What each kind of run records and how the report names and plots it.

Every task's runs rank by ``val_loss`` in the store (lower is better), but what that number is
differs: pre-training's validation loss, fine-tuning's response loss, a reward model's held-out
Bradley-Terry loss, and for RLHF the *negative* held-out reward. A :class:`View` says, per
task (:mod:`optarena.tasks`), what the headline number is called and with which sign it is
shown, and which curves of the run's ``metrics.jsonl`` its figures draw, under the names the
task logs them with: a training record (``loss``, ``lr``, ...: the records with ``loss``) and
an evaluation record (the records with ``val_loss``) may hold keys of the same name (RLHF's
``reward`` and ``kl`` are in both), so each curve names which records it reads.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optarena.run_log import METRICS_FILE, read_records
from optarena.sweep.store import RunRecord
from optarena.tasks import DEFAULT_TASK, task_of_run

TRAIN, EVAL = "train", "eval"  # the records a curve is read from


@dataclass(frozen=True)
class Curve:
    """One panel: ``key`` of the ``records`` (``train`` or ``eval``) records, its axis label
    and scale."""

    key: str
    records: str
    label: str
    scale: str = "linear"

    @property
    def ident(self) -> str:
        """The curve's name in :func:`run_curves` (``eval:reward``, ``train:loss``)."""
        return f"{self.records}:{self.key}"


@dataclass(frozen=True)
class View:
    """How the report shows one task's runs.

    ``headline`` labels the final number against LR; it is ``sign * val_loss`` (RLHF's is
    −1: its ``val_loss`` is the negative reward), and ``curves[evaluated]`` is its curve over
    the run's evaluations. ``noun`` names it in titles and sentences,
    ``unit`` its differences. ``x`` is what the curves are drawn against (``tokens`` or
    ``step``). ``speedups``: whether a power law in training tokens describes the headline, so
    that token-equivalent speedups over AdamW mean something."""

    task: str
    headline: str
    noun: str
    unit: str
    sign: float
    x: str
    curves: tuple[Curve, ...]
    evaluated: int = 1
    speedups: bool = True

    @property
    def x_label(self) -> str:
        return "training tokens" if self.x == "tokens" else "optimizer step"

    @property
    def stem(self) -> str:
        """The file stem of the headline-against-LR figures: ``loss-vs-lr`` or
        ``reward-vs-lr``."""
        return "reward" if self.sign < 0 else "loss"

    def shown(self, loss: float) -> float:
        """The headline of a run whose ``val_loss`` is ``loss`` (an infinite one stays infinite)."""
        return self.sign * loss

    def caption(self) -> str:
        return ", ".join(c.label for c in self.curves) + f" against {self.x_label}"


_LR = Curve("lr", TRAIN, "learning rate", "log")

VIEWS: dict[str, View] = {
    "train": View(
        "train",
        "final validation loss (nats)",
        "loss",
        "nats",
        1.0,
        "tokens",
        (
            Curve("loss", TRAIN, "training loss (nats)"),
            Curve("val_loss", EVAL, "validation loss (nats)"),
            _LR,
            Curve("grad_norm", TRAIN, "gradient norm (before clipping)", "log"),
        ),
    ),
    "finetune": View(
        "finetune",
        "final validation response loss (nats)",
        "response loss",
        "nats",
        1.0,
        "step",
        (
            Curve("loss", TRAIN, "training response loss (nats)"),
            Curve("val_loss", EVAL, "validation response loss (nats)"),
            Curve("exact_match", EVAL, "exact match of greedy responses (held out)"),
            _LR,
        ),
    ),
    "reward": View(
        "reward",
        "final held-out Bradley-Terry loss (nats)",
        "Bradley-Terry loss",
        "nats",
        1.0,
        "step",
        (
            Curve("loss", TRAIN, "training Bradley-Terry loss (nats)"),
            Curve("val_loss", EVAL, "held-out Bradley-Terry loss (nats)"),
            Curve("accuracy", EVAL, "held-out pair accuracy"),
            _LR,
        ),
        speedups=False,
    ),
    "rlhf": View(
        "rlhf",
        "final held-out reward (greedy responses)",
        "held-out reward",
        "reward",
        -1.0,
        "step",
        (
            Curve("reward", TRAIN, "mean reward of sampled responses (training batch)"),
            Curve("reward", EVAL, "held-out mean reward (greedy responses)"),
            Curve("kl", TRAIN, "KL to the reference (nats per sampled response)"),
            Curve("response_length", TRAIN, "sampled response length (tokens)"),
            Curve("accuracy", EVAL, "held-out exact match (greedy responses)"),
            _LR,
        ),
        speedups=False,
    ),
}


def views_by_task(task: str) -> View:
    """The view of ``task`` (pre-training's for a task it does not know)."""
    return VIEWS.get(task, VIEWS[DEFAULT_TASK])


def view_of(series: Sequence[Any]) -> View:
    """The view of a group of series (or sensitivities, anything with ``task``) of one task."""
    return views_by_task(series[0].task if series else DEFAULT_TASK)


def run_view(run: RunRecord) -> View:
    return views_by_task(task_of_run(run.config, run.summary))


Curves = dict[str, tuple[list[float], list[float]]]


def run_curves(directory: Path, run: RunRecord, shown: View | None = None) -> Curves:
    """``Curve.ident -> (xs, values)`` of every curve of the run's view, from its
    ``metrics.jsonl``; the store's evaluation curve (``val_loss`` only) when the file is gone.
    Values are as logged, except an RLHF run's stored ``val_loss``, shown as the reward it is
    the negative of. A summary's ``initial`` evaluation (RLHF's starting model, which its log
    does not hold) is the evaluation curves' step 0."""
    shown = shown or run_view(run)
    records = read_records(directory / "runs" / run.id / METRICS_FILE)
    summary = run.summary or {}
    per_step = (summary.get("tokens") or 0) / (summary.get("steps") or 1) or float(
        run.config.get("batch_size", 16) * run.config.get("seq_len", 128)
    )

    def x_of(record: Mapping[str, Any]) -> float:
        step = record.get("step", 0)
        if shown.x == "step":
            return step
        return record.get("tokens", step * per_step)

    out: Curves = {c.ident: ([], []) for c in shown.curves}
    for record in records:
        kind = EVAL if "val_loss" in record else TRAIN if "loss" in record else None
        for c in shown.curves:
            value = record.get(c.key)
            if c.records == kind and _finite(value):
                out[c.ident][0].append(x_of(record))
                out[c.ident][1].append(value)
    xs, ys = out[shown.curves[shown.evaluated].ident]
    if not xs:
        for step, loss in run.eval_curve:
            if _finite(loss):
                xs.append(x_of({"step": step}))
                ys.append(shown.shown(loss))
    start = summary.get("initial")
    if isinstance(start, dict):
        for c in shown.curves:
            xs, ys = out[c.ident]
            if c.records == EVAL and _finite(start.get(c.key)) and not (xs and xs[0] == 0):
                xs.insert(0, 0)
                ys.insert(0, start[c.key])
    return out


def drawn(curves: Sequence[Curve], data: Sequence[Curves]) -> list[Curve]:
    """The curves that hold a point in at least one run: a task's optional metric (accuracy
    without answers) leaves no empty panel."""
    return [c for c in curves if any(d.get(c.ident, ([], []))[0] for d in data)]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


__all__ = [
    "EVAL",
    "TRAIN",
    "VIEWS",
    "Curve",
    "View",
    "drawn",
    "run_curves",
    "run_view",
    "view_of",
    "views_by_task",
]
