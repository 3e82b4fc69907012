"""``optarena train``: one training run from flags or a TOML config (the CLI face of
:func:`optarena.train.train`)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from optarena.errors import UserError

# flag dest -> TrainConfig key, for flags whose default is None ("not given"), besides
# RUN_FLAG_KEYS
_FLAG_KEYS = (
    "optimizer",
    "lr",
    "model",
    "steps",
    "batch_size",
    "seq_len",
    "grad_accum",
    "data",
    "tokenizer",
    "vocab_size",
    "seed",
    "z_loss",
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model with one optimizer and write DIR/summary.json",
        description="Train the study's transformer with one optimizer. Flags override --config.",
    )
    p.add_argument("--optimizer", help="registry name (see `optarena list`)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the optimizer's)")
    p.add_argument("--model", help="size preset: micro, tiny, small, 150m, 300m, 600m, 1.2b")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="sequences per optimizer step")
    p.add_argument("--seq-len", type=int)
    p.add_argument("--grad-accum", type=int, help="micro-batches per step")
    p.add_argument(
        "--data",
        nargs="+",
        help="builtin (default), c4, or a text/JSONL file, directory or glob (quote a glob: "
        "--data 'texts/*.txt')",
    )
    p.add_argument(
        "--tokenizer", help="bpe (default), a tokenizer.json or .model file, or a hub name"
    )
    p.add_argument("--vocab-size", type=int, help="vocabulary of the trained BPE")
    p.add_argument("--seed", type=int)
    p.add_argument("--z-loss", type=float, help="z-loss coefficient (0 disables)")
    add_run_arguments(
        p, set_help="optimizer hyperparameter (e.g. betas=0.9,0.95) or model.FIELD=VALUE"
    )
    p.add_argument("--config", type=Path, help="TOML file of TrainConfig keys ([hparams] table)")
    p.set_defaults(func=run)


# the flags of add_run_arguments whose dest is the config key of the same name
RUN_FLAG_KEYS = (
    "schedule",
    "warmup",
    "grad_clip",
    "dtype",
    "device",
    "eval_every",
    "checkpoint_every",
    "log_every",
    "threads",
    "parallel",
    "out",
    "wandb",
)


def add_run_arguments(
    p: argparse.ArgumentParser,
    *,
    set_help: str,
    schedule: str = "cosine",
    parallel: bool = True,
    loggers: bool = True,
) -> None:
    """The flags every training command shares: schedule, precision and device, evaluation,
    checkpoint and log cadence, threads, the run folder, resume, progress and ``--set``
    (``schedule``: the command's default, for the help); ``parallel`` adds ``--parallel``
    and ``loggers`` adds ``--tensorboard`` and ``--wandb``."""
    p.add_argument("--schedule", help=f"cosine, linear, constant or wsd (default: {schedule})")
    p.add_argument("--warmup", type=float, help="warmup: fraction of steps (<1) or steps")
    p.add_argument("--grad-clip", type=float, help="global gradient-norm clip (0 disables)")
    p.add_argument("--dtype", help="auto, float32 or bfloat16")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--eval-every", type=int, help="evaluate every N steps (0: at the end only)")
    p.add_argument("--checkpoint-every", type=int, help="checkpoint every N steps (and at the end)")
    p.add_argument("--log-every", type=int)
    p.add_argument("--threads", type=int, help="CPU threads for torch")
    if parallel:
        p.add_argument(
            "--parallel",
            choices=["none", "ddp", "fsdp"],
            help="under torchrun: DistributedDataParallel or FSDP2 (fully_shard); see "
            "docs/scaling.md",
        )
    p.add_argument("--out", help="run directory (checkpoints/, metrics.jsonl, summary.json)")
    p.add_argument(
        "--resume", action="store_true", help="continue from the newest valid checkpoint"
    )
    if loggers:
        p.add_argument("--tensorboard", action="store_true", help="also log to DIR/tensorboard")
        p.add_argument(
            "--wandb",
            nargs="?",
            const="online",
            choices=["online", "offline"],
            help="also log to Weights & Biases (offline mode works without network)",
        )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help=set_help
    )


def parse_value(text: str) -> Any:
    """A ``--set`` value: bool, none, int, float, a comma-separated tuple, or a string."""
    if "," in text:
        return tuple(parse_value(part) for part in text.split(","))
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text.strip()


def parse_sets(items: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``--set`` items as (optimizer hyperparameters, model overrides)."""
    hparams: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key or not value.strip() or any(c.isspace() for c in key):
            raise UserError(f"malformed --set {item!r}: expected KEY=VALUE, e.g. betas=0.9,0.95")
        if key.startswith("model."):
            model[key.removeprefix("model.")] = parse_value(value)
        else:
            hparams[key] = parse_value(value)
    return hparams, model


def load_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise UserError(f"config file {path} is not valid TOML: {err}") from None
    except OSError as err:
        raise UserError(f"cannot read config file {path}: {err.strerror}") from None


def build_config(args: argparse.Namespace) -> dict[str, Any]:
    """The config dict: TOML file, then flags, then ``--set`` on top."""
    values: dict[str, Any] = load_toml(args.config) if args.config else {}
    if args.data is not None:
        args.data = one_data_path(args.data)
    for key in _FLAG_KEYS:
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    model = apply_run_flags(args, values)
    if model:
        values["model_overrides"] = {**values.get("model_overrides", {}), **model}
    require_optimizer(values)
    return values


def apply_run_flags(args: argparse.Namespace, values: dict[str, Any]) -> dict[str, Any]:
    """Put the flags every training command shares into ``values`` (those of
    :data:`RUN_FLAG_KEYS` that were given, ``--resume``, ``--tensorboard`` where the command
    has it, ``--no-progress``, ``--grad-clip 0`` = none, ``--set`` hyperparameters) and return
    the ``--set model.FIELD`` overrides, which each command takes or refuses."""
    for key in RUN_FLAG_KEYS:
        if (value := getattr(args, key, None)) is not None:
            values[key] = value
    if args.resume:
        values["resume"] = True
    if getattr(args, "tensorboard", False):
        values["tensorboard"] = True
    if args.no_progress:
        values["progress"] = False
    if values.get("grad_clip") == 0:
        values["grad_clip"] = None
    hparams, model = parse_sets(args.sets)
    if hparams:
        values["hparams"] = {**values.get("hparams", {}), **hparams}
    return model


def require_optimizer(values: dict[str, Any]) -> None:
    if "optimizer" not in values:
        raise UserError("which optimizer? pass --optimizer NAME (see `optarena list`)")


def one_data_path(paths: list[str]) -> str:
    """``--data`` takes one path or pattern; several are a glob the shell expanded."""
    if len(paths) == 1:
        return paths[0]
    first = Path(paths[0])
    pattern = f"{first.parent}/*{first.suffix}"
    raise UserError(
        f"--data got {len(paths)} paths ({paths[0]} ...): the shell expanded a glob; quote "
        f"it so that optarena reads every file, e.g. --data '{pattern}', or give the folder"
    )


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"optarena: warning: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from optarena.train import TrainConfig, train

    config = TrainConfig.from_dict(build_config(args))
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = _one_line_warning
        summary = train(config)
    if summary["parallel"]["world_size"] > 1 and int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports
    loss = summary["final_val_loss"]
    status = "DIVERGED" if summary["diverged"] else "done"
    where = f"; {Path(config.out) / 'summary.json'}" if config.out else ""
    loss_text = f"{loss:.4f}" if loss is not None else "n/a"
    print(
        f"{status}: {config.optimizer} {summary['steps']} steps, final_val_loss {loss_text}, "
        f"{summary['tokens_per_second']:,.0f} tokens/s{where}"
    )
    if not config.out:
        print(json.dumps({k: summary[k] for k in ("final_val_loss", "diverged", "steps")}))
    return DIVERGED if summary["diverged"] else 0


# The exit code of a run that diverged: it ran, its summary is written (``diverged: true``),
# but its model is not one to use; a script can tell it from success (0) and bad input (2).
DIVERGED = 3
