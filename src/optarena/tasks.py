"""The kinds of run a sweep can hold: each one's training function, config and checks.

A sweep's ``[sweep] task`` (``train`` by default) picks the function its runs call and the
config keys they may set. This table is data only (no torch), so that a spec is validated
before anything heavy is imported.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Task:
    """A kind of run: ``function`` (``module:attr``, what executors call with the config dict),
    the module defining its ``config`` dataclass and ``check`` (``check(config, optimizer)``:
    keys, types, ranges and the optimizer's hyperparameters, without data)."""

    name: str
    function: str
    module: str
    config: str
    check: str
    description: str

    def config_class(self) -> Any:
        return getattr(importlib.import_module(self.module), self.config)

    def check_config(self, config: dict[str, Any], optimizer: bool = True) -> Any:
        return getattr(importlib.import_module(self.module), self.check)(config, optimizer)


TASKS: dict[str, Task] = {
    "train": Task(
        "train",
        "optarena.train:train",
        "optarena.train",
        "TrainConfig",
        "check_config",
        "pre-training (optarena train)",
    ),
    "finetune": Task(
        "finetune",
        "optarena.posttrain.sft:finetune",
        "optarena.posttrain.sft",
        "FinetuneConfig",
        "check_config",
        "supervised fine-tuning (optarena finetune)",
    ),
    "reward": Task(
        "reward",
        "optarena.posttrain.reward_model:train_reward_model",
        "optarena.posttrain.reward_model",
        "RewardConfig",
        "check_config",
        "reward-model training on preference pairs (optarena reward)",
    ),
    "rlhf": Task(
        "rlhf",
        "optarena.posttrain.rlhf:rlhf",
        "optarena.posttrain.rlhf",
        "RLHFConfig",
        "check_config",
        "RLHF with ReMax (optarena rlhf)",
    ),
}
DEFAULT_TASK = "train"


def task_of_function(function: str) -> Task | None:
    """The task whose function is ``function``, or None for a user's own function."""
    return next((t for t in TASKS.values() if t.function == function), None)


# What a run's summary calls its task, where that is not the task's name.
_SUMMARY_TASKS = {"reward-model": "reward"}
# A config key only one task's config has: how a run without a summary is told apart.
_CONFIG_MARKS = (("kl_coef", "rlhf"), ("eval_pairs", "reward"), ("eval_generate", "finetune"))


def task_of_run(config: Mapping[str, Any], summary: Mapping[str, Any] | None = None) -> str:
    """The task of a stored run: its summary's ``task`` when it finished, else the task whose
    config alone has one of the run's keys; ``train`` for anything else (a user's function)."""
    named = (summary or {}).get("task")
    if isinstance(named, str):
        named = _SUMMARY_TASKS.get(named, named)
        if named in TASKS:
            return named
    return next((task for key, task in _CONFIG_MARKS if key in config), DEFAULT_TASK)


def model_of_run(config: Mapping[str, Any]) -> str | None:
    """The model a run trains, as the results store records it: a pre-training run's size
    preset; a post-training run's starting model (``pretrained``) named from its config files
    (:func:`optarena.posttrain.pretrained.model_name`: ``sft (micro)``, ``gpt2-tiny (gpt2)``);
    None when the config says neither."""
    if config.get("model") is not None:
        return str(config["model"])
    base = config.get("pretrained")
    if isinstance(base, str) and base.strip():
        from optarena.posttrain.pretrained import model_name

        return model_name(base)
    return None


__all__ = ["DEFAULT_TASK", "TASKS", "Task", "model_of_run", "task_of_function", "task_of_run"]
