"""``optarena finetune``: supervised fine-tuning of a pretrained model from flags or a TOML
config (the CLI face of :func:`optarena.posttrain.sft.finetune`)."""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path
from typing import Any

from optarena.commands.train import (
    DIVERGED,
    _one_line_warning,
    add_run_arguments,
    apply_run_flags,
    load_toml,
    require_optimizer,
)
from optarena.errors import UserError

# flag dest -> FinetuneConfig key, for flags whose default is None ("not given"), besides
# the shared RUN_FLAG_KEYS
_FLAG_KEYS = (
    "pretrained",
    "data",
    "val_data",
    "optimizer",
    "lr",
    "steps",
    "batch_size",
    "seq_len",
    "grad_accum",
    "seed",
    "eval_examples",
    "eval_generate",
    "exact_match",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune",
        help="fine-tune a pretrained model (SFT) with one optimizer and write DIR/summary.json",
        description="Supervised fine-tuning from an `optarena train` output folder or a local "
        "Hugging Face model folder, on the built-in task or a JSONL file, with the loss on the "
        "response tokens only. Flags override --config. See docs/finetuning.md.",
    )
    p.add_argument(
        "--from",
        dest="pretrained",
        metavar="DIR",
        help="the model: an `optarena train` (or finetune) output folder, one of its "
        "checkpoints/step-N.pt, or a Hugging Face causal-LM folder",
    )
    p.add_argument(
        "--data",
        help='builtin (default: the built-in task) or a JSONL file of {"prompt", "response"} '
        'or {"messages": [...]} lines',
    )
    p.add_argument("--val-data", help="validation JSONL (default: 1 in 20 examples of --data)")
    p.add_argument("--optimizer", help="registry name (see `optarena list`)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the optimizer's)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="examples per optimizer step")
    p.add_argument("--seq-len", type=int, help="longest example in tokens (prompt + response)")
    p.add_argument("--grad-accum", type=int, help="micro-batches per step")
    p.add_argument("--seed", type=int)
    p.add_argument("--eval-examples", type=int, help="validation examples for the loss")
    p.add_argument(
        "--eval-generate", type=int, help="validation prompts decoded for exact match (0: none)"
    )
    p.add_argument(
        "--exact-match",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="score greedy responses by exact match (default: when the task has one answer)",
    )
    add_run_arguments(p, set_help="optimizer hyperparameter, e.g. betas=0.9,0.95")
    p.add_argument("--config", type=Path, help="TOML file of FinetuneConfig keys ([hparams])")
    p.set_defaults(func=run)


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config dict: TOML file, then flags, then ``--set`` on top."""
    values: dict[str, Any] = load_toml(args.config) if args.config else {}
    for key in _FLAG_KEYS:
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    if apply_run_flags(args, values):
        raise UserError("fine-tuning keeps the pretrained model's shape: no --set model.FIELD")
    if not values.get("pretrained"):
        raise UserError("which model? pass --from DIR (an `optarena train` output folder)")
    where = Path(str(values["pretrained"])).expanduser()
    if where.exists():  # absolute, so that the run's folder names its base from anywhere
        values["pretrained"] = str(where.resolve())
    require_optimizer(values)
    return values


def run(args: argparse.Namespace) -> int:
    from optarena.posttrain.sft import FinetuneConfig, finetune

    config = FinetuneConfig.from_dict(build_config(args))
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _one_line_warning
        summary = finetune(config)
    if summary["parallel"]["world_size"] > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports
    status = "DIVERGED" if summary["diverged"] else "done"

    def number(value: float | None, spec: str = ".4f") -> str:
        return format(value, spec) if value is not None else "n/a"

    match = ""
    if summary.get("final_exact_match") is not None:
        match = (
            f", exact match {number(summary['pretrained_exact_match'], '.1%')} -> "
            f"{number(summary['final_exact_match'], '.1%')}"
        )
    where = f"; {Path(config.out) / 'summary.json'}" if config.out else ""
    print(
        f"{status}: {config.optimizer} {summary['steps']} steps, response val loss "
        f"{number(summary['pretrained_val_loss'])} -> {number(summary['final_val_loss'])}"
        f"{match}, {summary['tokens_per_second']:,.0f} tokens/s{where}"
    )
    if not config.out:
        keys = ("final_val_loss", "pretrained_val_loss", "final_exact_match", "diverged", "steps")
        print(json.dumps({k: summary.get(k) for k in keys}))
    return DIVERGED if summary["diverged"] else 0
