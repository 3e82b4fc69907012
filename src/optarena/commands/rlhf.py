"""``optarena reward`` (train a reward model on preference pairs) and ``optarena rlhf`` (ReMax
from an SFT model against that reward model or an exact-match reward); the CLI faces of
:mod:`optarena.posttrain.reward_model` and :mod:`optarena.posttrain.rlhf`."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

from optarena.commands.train import (
    _one_line_warning,
    add_run_arguments,
    apply_run_flags,
    load_toml,
    require_optimizer,
)
from optarena.errors import UserError

# flags the reward and RLHF runs share besides RUN_FLAG_KEYS: flag dest -> config key
# (None: not given)
_RUN_FLAGS = (
    "optimizer",
    "lr",
    "steps",
    "batch_size",
    "grad_accum",
    "seed",
)
_REWARD_FLAGS = ("pairs", "eval_pairs")
_RLHF_FLAGS = (
    "reward",
    "reward_model",
    "prompts",
    "max_new_tokens",
    "temperature",
    "kl_coef",
    "eval_prompts",
)


def _run_options(p: argparse.ArgumentParser, schedule: str) -> None:
    p.add_argument(
        "--from",
        dest="pretrained",
        help="the model to start from: an optarena train/finetune folder or a Hugging Face folder",
    )
    p.add_argument("--optimizer", help="registry name (see `optarena list`)")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--grad-accum", type=int, help="micro-batches per step")
    p.add_argument("--seed", type=int)
    add_run_arguments(
        p,
        schedule=schedule,
        parallel=False,
        loggers=False,
        set_help="optimizer hyperparameter, e.g. betas=0.9,0.95",
    )
    p.add_argument("--config", type=Path, help="TOML file of the run's keys ([hparams] table)")


def register(subparsers: argparse._SubParsersAction) -> None:
    reward = subparsers.add_parser(
        "reward",
        help="train a reward model on preference pairs (Bradley-Terry) for `optarena rlhf`",
        description="Train a reward model: the --from model's final hidden state through a "
        "scalar head, on preference pairs (built-in or a JSONL of prompt/chosen/rejected), "
        "with the Bradley-Terry loss; reports its accuracy on held-out pairs.",
    )
    _run_options(reward, schedule="cosine")
    reward.add_argument(
        "--pairs", help='builtin (default) or a JSONL file of {"prompt", "chosen", "rejected"}'
    )
    reward.add_argument("--eval-pairs", type=int, help="held-out pairs evaluated (default 512)")
    reward.set_defaults(func=run_reward, flags=_RUN_FLAGS + _REWARD_FLAGS)

    rl = subparsers.add_parser(
        "rlhf",
        help="RLHF with ReMax from an SFT model, against a reward model or exact match",
        description="ReMax (REINFORCE with the greedy response's reward as baseline) from an "
        "SFT model, with a KL penalty to it; the reward is a model trained by `optarena reward` "
        "or, for prompts with one answer, exact match.",
    )
    _run_options(rl, schedule="constant")
    rl.add_argument("--reward", choices=["model", "exact-match"], help="default: model")
    rl.add_argument("--reward-model", help="an `optarena reward` output folder")
    rl.add_argument("--prompts", help='builtin (default) or a JSONL file of {"prompt", "answer"?}')
    rl.add_argument("--max-new-tokens", type=int, help="longest response (default 16)")
    rl.add_argument("--temperature", type=float, help="sampling temperature (default 1)")
    rl.add_argument("--kl-coef", type=float, help="β of the per-token KL penalty (default 0.05)")
    rl.add_argument("--eval-prompts", type=int, help="held-out prompts evaluated (default 128)")
    rl.set_defaults(func=run_rlhf, flags=_RUN_FLAGS + _RLHF_FLAGS)


def build_values(args: argparse.Namespace) -> dict[str, Any]:
    """The config dict: TOML file, then flags, then ``--set`` on top."""
    values: dict[str, Any] = load_toml(args.config) if args.config else {}
    for key in ("pretrained", *args.flags):
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    for key in ("pretrained", "reward_model"):
        # absolute: the run's config names the folders whatever the working directory of
        # whoever loads it later (a next stage, a sweep worker)
        if isinstance(values.get(key), str) and values[key].strip():
            values[key] = str(Path(values[key]).expanduser().resolve())
    if getattr(args, "reward_model", None) and "reward" not in values:
        values["reward"] = "model"
    if apply_run_flags(args, values):
        raise UserError("--set model.* changes the architecture; a pretrained model keeps its own")
    require_optimizer(values)
    return values


def _report(summary: dict[str, Any], out: str | None, what: str) -> None:
    status = "DIVERGED" if summary["diverged"] else "done"
    where = f"; {Path(out) / 'summary.json'}" if out else ""
    print(f"{status}: {summary['optimizer']} {summary['steps']} steps, {what}{where}")


def run_reward(args: argparse.Namespace) -> int:
    from optarena.posttrain.reward_model import RewardConfig, train_reward_model

    config = RewardConfig.from_dict(build_values(args))
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _one_line_warning
        summary = train_reward_model(config)
    acc = summary.get("accuracy")
    acc_text = f"{acc:.1%}" if acc is not None else "n/a"
    _report(summary, config.out, f"held-out pair accuracy {acc_text}")
    if not config.out:
        print(json.dumps({k: summary[k] for k in ("accuracy", "final_val_loss", "diverged")}))
    return 0


def run_rlhf(args: argparse.Namespace) -> int:
    from optarena.posttrain.rlhf import RLHFConfig, rlhf

    config = RLHFConfig.from_dict(build_values(args))
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _one_line_warning
        summary = rlhf(config)
    initial, final = summary.get("initial") or {}, summary.get("final") or {}
    gain = summary.get("reward_gain")
    text = "reward n/a"
    if final.get("reward") is not None and initial.get("reward") is not None:
        text = f"held-out reward {initial['reward']:.3f} -> {final['reward']:.3f}"
        if gain:
            text += f" (gain {gain['mean']:+.3f}, 95% [{gain['low']:+.3f}, {gain['high']:+.3f}])"
        if "accuracy" in final:
            text += f", accuracy {initial['accuracy']:.1%} -> {final['accuracy']:.1%}"
    _report(summary, config.out, text)
    if not config.out:
        keys = ("final_reward", "reward_gain", "diverged")
        print(json.dumps({k: summary[k] for k in keys}))
    return 0
