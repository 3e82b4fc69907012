"""The training harness: ``train(config) -> summary``, as in the Deconstructing study.

One run: build (or load from cache) the token ids, the model and the optimizer; train with a
warmup + cosine schedule (or constant / linear / WSD), global gradient clipping, gradient
accumulation, z-loss and bf16 autocast where supported; drive Sophia's Hessian estimates at the
optimizer's interval; evaluate on fixed validation windows; stop and mark a run ``diverged`` when
its loss is non-finite or far above its initial value; write atomic checkpoints that resume
bit-exactly, ``metrics.jsonl`` and ``summary.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import hashlib
import json
import math
import os
import sys
import time
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from optarena.devices import resolve_device
from optarena.errors import UserError

SCHEDULES = ("cosine", "linear", "constant", "wsd")
CHECKPOINT_VERSION = 1
# Keys that may differ between a run and its resumption without changing its trajectory.
RESUMABLE_CHANGES = {
    "out",
    "resume",
    "eval_every",
    "checkpoint_every",
    "keep_checkpoints",
    "log_every",
    "progress",
    "tensorboard",
    "wandb",
    "wandb_project",
    "cache_dir",
    "threads",
    "device",
    "parallel",  # a checkpoint resumes at any world size, sharded or not
    "grad_accum",  # the same global batch in other micro-batches (e.g. on fewer GPUs)
}


@dataclass
class TrainConfig:
    """Everything that defines a run. A run's identity is this dict (see ``to_dict``)."""

    optimizer: str = "adamw"
    lr: float | None = None  # None: the optimizer's default
    hparams: dict[str, Any] = field(default_factory=dict)  # any optimizer hyperparameter
    model: str = "micro"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # GPTConfig fields
    steps: int = 200
    batch_size: int = 16  # sequences per optimizer step (split over grad_accum micro-batches)
    seq_len: int = 128
    grad_accum: int = 1
    data: str = "builtin"  # builtin | c4 | file, directory or glob
    tokenizer: str = "bpe"  # bpe | tokenizer.json | SentencePiece .model | hub name
    vocab_size: int | None = None  # BPE vocabulary; None: the preset's
    val_fraction: float = 0.05
    max_documents: int = 200_000  # for --data c4 (streamed)
    seed: int = 0
    schedule: str = "cosine"
    warmup: float = 0.1  # fraction of steps if < 1, else a number of steps
    warmup_start: float = 0.1  # warmup starts at this fraction of the peak LR
    final_lr_fraction: float = 0.1  # cosine / linear / WSD end at this fraction of the peak
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays
    grad_clip: float | None = 1.0  # global norm; None or 0 disables
    z_loss: float = 1e-4
    dtype: str = "auto"  # auto (bf16 where supported, CPU excepted) | float32 | bfloat16
    device: str = "auto"
    eval_every: int = 0  # 0: only at the end
    eval_windows: int = 64  # fixed validation windows of seq_len tokens
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    log_every: int = 10
    divergence_factor: float = 2.0  # diverged when loss > factor x initial loss
    out: str | None = None  # None: nothing written
    resume: bool = False
    tensorboard: bool = False
    wandb: str | None = None  # None | "online" | "offline"
    wandb_project: str = "optarena"
    progress: bool = True
    cache_dir: str | None = None  # None: $OPTARENA_CACHE or ~/.cache/optarena
    threads: int | None = None
    parallel: str = "none"  # none | ddp | fsdp (under torchrun; see optarena.distributed)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A validated config from a dict (TOML, JSON, a sweep); unknown keys are errors."""
        known = {f.name for f in dataclasses.fields(cls)}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(f"unknown config key {key!r}{hint}")
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Types and ranges, with one-line errors that name the key."""
        ints = (
            "steps",
            "batch_size",
            "seq_len",
            "grad_accum",
            "seed",
            "eval_every",
            "eval_windows",
            "checkpoint_every",
            "keep_checkpoints",
            "log_every",
            "max_documents",
        )
        floats = (
            "val_fraction",
            "warmup",
            "warmup_start",
            "final_lr_fraction",
            "decay_fraction",
            "z_loss",
            "divergence_factor",
        )
        for key in ints:
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise UserError(f"config key {key!r} must be an integer, not {value!r}")
        for key in (*floats, "lr", "grad_clip"):
            value = getattr(self, key)
            if value is None and key in ("lr", "grad_clip"):
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UserError(f"config key {key!r} must be a number, not {value!r}")
            setattr(self, key, float(value))
        for key in ("steps", "batch_size", "seq_len", "grad_accum", "eval_windows", "log_every"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be at least 1, not {getattr(self, key)}")
        for key in ("eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, key) < 0:
                raise UserError(f"{key} must be 0 or more, not {getattr(self, key)}")
        if self.batch_size % self.grad_accum:
            raise UserError(
                f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )
        if self.lr is not None and not self.lr >= 0:
            raise UserError(f"lr must be non-negative, not {self.lr}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"unknown schedule {self.schedule!r}; choose one of {SCHEDULES}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise UserError(f"dtype must be auto, float32 or bfloat16, not {self.dtype!r}")
        if self.parallel not in ("none", "ddp", "fsdp"):
            raise UserError(f"parallel must be none, ddp or fsdp, not {self.parallel!r}")
        if self.wandb not in (None, "online", "offline"):
            raise UserError(f"wandb must be 'online' or 'offline', not {self.wandb!r}")
        if self.resume and not self.out:
            raise UserError("--resume needs --out (the run directory to resume)")
        if not isinstance(self.hparams, dict) or not isinstance(self.model_overrides, dict):
            raise UserError("hparams and model_overrides must be tables of key = value")
        from optarena.model import PRESETS

        if self.model not in PRESETS:
            raise UserError(f"unknown model {self.model!r}; choose one of: {', '.join(PRESETS)}")


# --------------------------------------------------------------------------- schedule


def lr_multiplier(config: TrainConfig, step: int) -> float:
    """Multiplier of each group's peak LR for the update at 0-based ``step``.

    Warmup rises linearly from ``warmup_start`` to 1; cosine and linear then fall to
    ``final_lr_fraction`` at the last step; WSD holds 1 and decays linearly over the last
    ``decay_fraction`` of steps.
    """
    total = config.steps
    warmup = round(config.warmup * total) if config.warmup < 1 else int(config.warmup)
    if step < warmup:
        return config.warmup_start + (1 - config.warmup_start) * step / warmup
    final = config.final_lr_fraction
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "wsd":
        decay = max(1, round(config.decay_fraction * total))
        start = max(warmup, total - decay)
        if step < start:
            return 1.0
        progress = (step - start + 1) / max(1, total - start)
        return 1 - (1 - final) * progress
    progress = (step - warmup) / max(1, total - warmup - 1)
    if config.schedule == "linear":
        return 1 - (1 - final) * progress
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------- helpers


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor held in ``optimizer.state`` (nested lists and dicts included)."""

    def walk(value: Any) -> Iterator[Tensor]:
        if isinstance(value, Tensor):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from walk(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from walk(v)

    seen: set[int] = set()
    total = 0
    for t in walk(list(optimizer.state.values())):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def _resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 autocast on CUDA devices that support it; float32 on CPU unless asked (CPU bf16
    autocast is slower than float32 on most CPUs without AMX)."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # KiB on Linux
    except ImportError:  # pragma: no cover - Windows
        return 0


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- checkpoints


def _checkpoint_files(folder: Path) -> list[Path]:
    """Checkpoints in ``folder``, newest (highest step) first."""
    return sorted(folder.glob("step-*.pt"), reverse=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def save_checkpoint(folder: Path, step: int, payload: dict[str, Any], keep: int) -> Path:
    """Write ``step-N.pt`` atomically, then its ``.sha256``; a checkpoint without a matching
    checksum file is torn and never loaded. Keeps the newest ``keep`` (0 keeps all)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    tmp = folder / f".{path.name}.tmp{os.getpid()}"
    with tmp.open("wb") as f:
        torch.save(payload, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _atomic_write_text(path.with_suffix(".sha256"), _sha256(path) + "\n")
    if keep:
        for old in _checkpoint_files(folder)[keep:]:
            old.unlink(missing_ok=True)
            old.with_suffix(".sha256").unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A checkpoint's payload if its checksum matches; :class:`ValueError` says why not."""
    sums = path.with_suffix(".sha256")
    if not sums.is_file():
        raise ValueError("no checksum file (torn write)")
    if sums.read_text().strip() != _sha256(path):
        raise ValueError("checksum mismatch (corrupt)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"unreadable ({type(err).__name__})") from None
    if not isinstance(payload, dict) or payload.get("version") != CHECKPOINT_VERSION:
        raise ValueError("not an optarena checkpoint of this version")
    return payload


def latest_checkpoint(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest valid checkpoint, skipping torn or corrupt ones with a warning.

    ``None`` if there are none; :class:`UserError` if there are some and none is valid."""
    files = _checkpoint_files(folder) if folder.is_dir() else []
    reasons = []
    for path in files:
        try:
            return path, load_checkpoint(path)
        except ValueError as err:
            reasons.append(f"{path.name}: {err}")
            warnings.warn(f"skipping checkpoint {path}: {err}", stacklevel=2)
    if files:
        raise UserError(f"no valid checkpoint in {folder} ({'; '.join(reasons)})")
    return None


# --------------------------------------------------------------------------- loggers


class _Loggers:
    """metrics.jsonl, and optionally TensorBoard and Weights & Biases."""

    def __init__(
        self,
        config: TrainConfig,
        out: Path | None,
        resume_step: int | None,
        listener: Callable[[dict[str, Any]], None] | None = None,
    ):
        self.jsonl = None
        self.tb = None
        self.wandb_run = None
        self.listener = listener
        if out is None:
            return
        path = out / "metrics.jsonl"
        if resume_step is not None and path.exists():
            # drop what the interrupted run logged after its checkpoint; it is redone now
            kept = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= resume_step
            ]
            _atomic_write_text(path, "".join(line + "\n" for line in kept))
        # a fresh run starts a fresh log (a leftover one had no checkpoint or summary)
        self.jsonl = path.open("a" if resume_step is not None else "w")
        if config.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "--tensorboard needs tensorboard: pip install tensorboard"
                ) from None
            self.tb = SummaryWriter(str(out / "tensorboard"))
        if config.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb needs Weights & Biases: pip install wandb") from None
            self.wandb_run = wandb.init(
                project=config.wandb_project,
                dir=str(out),
                mode=config.wandb,
                config=config.to_dict(),
                name=out.name,
                resume="allow",
            )

    def log(self, record: dict[str, Any]) -> None:
        if self.listener:
            self.listener(dict(record))
        if self.jsonl:
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
        if self.tb:
            self.tb.close()
        if self.wandb_run:
            self.wandb_run.finish()


# --------------------------------------------------------------------------- the run


def _make_optimizer(config: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The named optimizer through the registry; its complaints become one-line user errors."""
    from optarena.optim import create

    hp = dict(config.hparams)
    if config.lr is not None:
        hp["lr"] = config.lr
    try:
        return create(config.optimizer, model, **hp)
    except (ValueError, TypeError) as err:
        raise UserError(f"optimizer {config.optimizer}: {err}") from None


def check_config(config: TrainConfig | dict[str, Any], optimizer: bool = True) -> TrainConfig:
    """What can be checked of a run's config without its data or device: keys, types and
    ranges, and (``optimizer``) the optimizer's name and hyperparameters, by building it over
    a stand-in model. A sweep checks every run this way before it starts any."""
    config = TrainConfig.from_dict(config if isinstance(config, dict) else config.to_dict())
    _check_optimizer_name(config.optimizer)
    if optimizer:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _make_optimizer(config, _stand_in_model())
    return config


@functools.cache
def _stand_in_model() -> torch.nn.Module:
    """The micro model (every role a real one has), for checking optimizer hyperparameters."""
    from optarena.model import build_model

    return build_model("micro")


def _check_optimizer_name(name: str) -> None:
    from optarena.optim import available

    if name.strip().lower().replace("_", "-") not in available():
        close = difflib.get_close_matches(name, list(available()), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown optimizer {name!r}{hint}; `optarena list` shows them all")


def _prepare_out(config: TrainConfig) -> Path | None:
    if not config.out:
        return None
    out = Path(config.out).expanduser()
    if not config.resume and (
        (out / "summary.json").exists() or any((out / "checkpoints").glob("step-*"))
    ):
        raise UserError(f"{out} already holds a run; pass --resume or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output directory {out}: {err.strerror}") from None
    return out


def _model_config(config: TrainConfig, vocab_size: int):
    from optarena.model import PRESETS, GPTConfig

    fields = {**PRESETS[config.model], **config.model_overrides}
    fields["vocab_size"] = vocab_size
    fields["max_seq_len"] = max(fields.get("max_seq_len", 512), config.seq_len)
    try:
        return GPTConfig(**fields)
    except TypeError as err:
        raise UserError(f"model option: {err}") from None
    except ValueError as err:
        raise UserError(f"model {config.model}: {err}") from None


def train(
    config: TrainConfig | dict[str, Any],
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train one model and return its summary (also written to ``OUT/summary.json``).

    ``on_log`` receives every record written to ``metrics.jsonl`` (loss, lr, tokens/s every
    ``log_every`` steps, validation losses), output directory or not: a notebook or a
    benchmark can follow a run without reading files. With ``parallel`` set (under torchrun),
    every rank calls this; rank 0 writes the files and calls ``on_log``, and every rank returns
    the summary."""
    config = check_config(config, optimizer=False)  # the optimizer itself is built below
    from optarena import distributed

    par = distributed.setup(config.parallel, config.device)
    try:
        return _train(config, par, on_log)
    finally:
        par.close()


def _resume_point(folder: Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint: a single-process ``step-N.pt`` or a parallel ``step-N.dcp`` (its
    ``meta.pt``: everything but the model and optimizer, which DCP loads in place)."""
    from optarena.distributed import checkpoint_dirs, load_meta

    pt = latest_checkpoint(folder) if any(folder.glob("step-*.pt")) else None
    dirs = checkpoint_dirs(folder)
    if dirs and (pt is None or load_meta(dirs[0])["step"] > int(pt[1]["step"])):
        return dirs[0], load_meta(dirs[0])
    return pt


def _train(
    config: TrainConfig, par: Any, on_log: Callable[[dict[str, Any]], None] | None
) -> dict[str, Any]:
    from optarena import distributed

    start_wall = time.perf_counter()
    if config.threads:
        torch.set_num_threads(config.threads)
    if not par.active:
        par.device = resolve_device(config.device)
    device = par.device
    dtype = _resolve_dtype(config.dtype, device)
    if config.batch_size % (par.world * config.grad_accum):
        raise UserError(
            f"batch_size {config.batch_size} is not divisible by {par.world} processes x "
            f"grad_accum {config.grad_accum}"
        )
    out = _prepare_out(config)
    requested = json.loads(json.dumps(config.to_dict()))  # as given, before defaults resolve

    # ---- resume point (read before any work, so a bad checkpoint fails fast)
    resumed: dict[str, Any] | None = None
    resumed_from = None
    if config.resume and out is not None:
        found = _resume_point(out / "checkpoints")
        if found is None:
            if par.is_main:
                print(f"optarena: no checkpoint in {out}; starting from scratch", file=sys.stderr)
        else:
            resumed_from, resumed = found
            saved = json.loads(resumed["requested_config"])
            changed = sorted(
                k
                for k in set(saved) | set(requested)
                if k not in RESUMABLE_CHANGES and saved.get(k) != requested.get(k)
            )
            if changed:
                raise UserError(
                    f"cannot resume {out}: the config differs in {', '.join(changed)} "
                    "(resume with the same settings, or use another --out)"
                )

    # ---- data
    from optarena.data import RandomWindows, prepare_data, validation_windows
    from optarena.model import GPT, PRESETS, lm_loss

    vocab = config.vocab_size or PRESETS[config.model]["vocab_size"]
    data = prepare_data(
        config.data,
        config.tokenizer,
        vocab,
        config.cache_dir,
        config.val_fraction,
        config.max_documents,
        config.progress,
    )
    config.vocab_size = vocab if config.tokenizer == "bpe" else data.tokenizer.vocab_size
    # pad the embedding to a multiple of 64 like the study (32,100 -> 32,128)
    padded_vocab = 64 * math.ceil(data.tokenizer.vocab_size / 64)
    batches = RandomWindows(
        data.train, config.batch_size, config.seq_len, config.seed, (par.rank, par.world)
    )
    val_x, val_y = validation_windows(data.val, config.eval_windows, config.seq_len)
    val_x, val_y = val_x.to(device), val_y.to(device)

    # ---- model and optimizer
    model_config = _model_config(config, padded_vocab)
    torch.manual_seed(config.seed)
    model = par.wrap(GPT(model_config).to(device))
    optimizer = _make_optimizer(config, par.unwrap(model))
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    hessian_interval = getattr(optimizer, "hessian_interval", None)
    hessian_rng = torch.Generator(device=device).manual_seed(config.seed + 1)

    step, tokens, initial_loss, train_seconds = 0, 0, None, 0.0
    eval_curve: list[dict[str, Any]] = []
    if resumed is not None:
        if "model" not in resumed:  # a DCP checkpoint, at any world size
            distributed.load_dcp(resumed_from, model, optimizer)
        elif par.mode == "fsdp":  # a single-process checkpoint onto shards
            distributed.load_full(resumed["model"], resumed["optimizer"], model, optimizer)
        else:
            par.unwrap(model).load_state_dict(resumed["model"])
            optimizer.load_state_dict(resumed["optimizer"])
        batches.load_state_dict(resumed["batches"])
        hessian_rng.set_state(resumed["hessian_rng"])
        torch.set_rng_state(resumed["torch_rng"])
        step, tokens = int(resumed["step"]), int(resumed["tokens"])
        initial_loss = resumed["initial_loss"]
        eval_curve = json.loads(resumed["eval_curve"])
        train_seconds = float(resumed["train_seconds"])

    autocast = (
        torch.autocast(device.type, dtype=dtype)
        if dtype != torch.float32
        else contextlib.nullcontext()
    )
    params = [p for p in model.parameters() if p.requires_grad]
    clip = config.grad_clip or 0.0
    micro = config.batch_size // (config.grad_accum * par.world)  # sequences per forward
    tokens_per_step = config.batch_size * config.seq_len
    loggers = _Loggers(
        config,
        out if par.is_main else None,
        step if resumed is not None else None,
        on_log if par.is_main else None,
    )

    def evaluate() -> float:
        """Mean validation cross-entropy; ranks share the windows and sum their losses."""
        model.eval()
        total = torch.zeros((), device=device)
        rows, weight = par.eval_indices(len(val_x))
        rows, weight = rows.to(device), weight.to(device)
        size = max(1, config.batch_size // par.world)
        with torch.no_grad(), autocast:
            for i in range(0, len(rows), size):
                x, y = val_x[rows[i : i + size]], val_y[rows[i : i + size]]
                logits = model(x).float()
                ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
                total += (ce.view(len(x), -1).sum(1) * weight[i : i + size]).sum()
        model.train()
        return (par.sum(total) / val_y.numel()).item()

    last_checkpoint = step if resumed is not None else -1

    def checkpoint() -> None:
        nonlocal last_checkpoint
        if out is None:
            return
        last_checkpoint = step
        payload = {
            "version": CHECKPOINT_VERSION,
            "step": step,
            "tokens": tokens,
            "initial_loss": initial_loss,
            "train_seconds": train_seconds,
            "train_cpu_seconds": session_cpu,  # CPU time of this session's steps (less noisy)
            "batches": batches.state_dict(),
            "hessian_rng": hessian_rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "eval_curve": json.dumps(eval_curve),
            "config": json.dumps(config.to_dict()),
            "requested_config": json.dumps(requested),
        }
        if par.active:  # every rank writes its shards (DCP); rank 0 the rest
            folder = out / "checkpoints"
            distributed.save_dcp(
                par, folder, step, model, optimizer, payload, config.keep_checkpoints
            )
            return
        payload["model"] = model.state_dict()
        payload["optimizer"] = optimizer.state_dict()
        save_checkpoint(out / "checkpoints", step, payload, config.keep_checkpoints)

    def hessian_update(x_local: Tensor) -> None:
        """Sophia's Gauss-Newton-Bartlett estimate: back-propagate the loss on labels sampled
        from the model's own softmax (same clipping), then ``update_hessian()``.

        As in the official Sophia loop, the estimate uses the whole batch of the step, micro-batch
        by micro-batch. Each label is drawn by inverting the softmax CDF at one uniform number per
        token of the global batch, so a token gets the same label whatever the world size and
        micro-batching."""
        tokens_local = x_local.numel()
        with torch.no_grad():
            u = torch.rand(tokens_local * par.world, generator=hessian_rng, device=device)
            u = u[par.rank * tokens_local : (par.rank + 1) * tokens_local]
        for m in range(config.grad_accum):
            x = x_local[m * micro : (m + 1) * micro]
            with par.accumulating(model, last=m == config.grad_accum - 1):
                with autocast:
                    logits = model(x)
                flat = logits.float().flatten(0, 1)
                with torch.no_grad():
                    cdf = flat.softmax(-1).cumsum(-1)
                    mine = u[m * flat.shape[0] : (m + 1) * flat.shape[0]]
                    labels = torch.searchsorted(cdf, mine.unsqueeze(-1)).squeeze(-1)
                    labels = labels.clamp_(max=flat.shape[-1] - 1)
                loss = F.cross_entropy(flat, labels)
                (loss / config.grad_accum if config.grad_accum > 1 else loss).backward()
        if clip:
            distributed.clip_grad_norm_(params, clip)
        optimizer.update_hessian()
        optimizer.zero_grad(set_to_none=True)

    from tqdm import tqdm

    bar = tqdm(
        total=config.steps,
        initial=step,
        unit="step",
        dynamic_ncols=True,
        disable=not config.progress or not par.is_main,
        desc=config.optimizer,
    )
    diverged, diverged_at, last_loss = False, None, None
    session_tokens, session_seconds, session_cpu = 0, 0.0, 0.0
    model.train()
    try:
        while step < config.steps:
            t0, c0 = time.perf_counter(), time.process_time()
            mult = lr_multiplier(config, step)
            for group in optimizer.param_groups:
                if group["initial_lr"] is not None:  # None: the optimizer sets its own step
                    group["lr"] = group["initial_lr"] * mult
            x_all, y_all = batches.next()
            x_all, y_all = x_all.to(device, non_blocking=True), y_all.to(device, non_blocking=True)
            ce_sum = torch.zeros((), device=device)
            for m in range(config.grad_accum):
                x, y = x_all[m * micro : (m + 1) * micro], y_all[m * micro : (m + 1) * micro]
                with par.accumulating(model, last=m == config.grad_accum - 1):
                    with autocast:
                        logits = model(x)
                    loss, ce = lm_loss(logits, y, config.z_loss)
                    (loss / config.grad_accum if config.grad_accum > 1 else loss).backward()
                ce_sum += ce.detach()
            grad_norm = distributed.clip_grad_norm_(params, clip) if clip else None
            if hessian_interval is not None:
                optimizer.step(bs=tokens_per_step)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens += tokens_per_step
            if hessian_interval and step % hessian_interval == 0:
                hessian_update(x_all)
            last_loss = par.mean(ce_sum).item() / config.grad_accum  # same on every rank
            dt = time.perf_counter() - t0
            train_seconds += dt
            session_seconds += dt
            session_cpu += time.process_time() - c0
            session_tokens += tokens_per_step
            bar.update(1)

            if initial_loss is None:
                initial_loss = last_loss
            if not math.isfinite(last_loss) or last_loss > config.divergence_factor * initial_loss:
                diverged, diverged_at = True, step
                loggers.log({"step": step, "loss": _finite_or_none(last_loss), "diverged": True})
                break
            if step % config.log_every == 0 or step == config.steps:
                tps = session_tokens / max(session_seconds, 1e-9)
                record = {
                    "step": step,
                    "loss": last_loss,
                    "lr": optimizer.param_groups[0]["lr"],
                    "tokens": tokens,
                    "tokens_per_second": tps,
                }
                if grad_norm is not None:
                    record["grad_norm"] = grad_norm.item()
                loggers.log(record)
                bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            if config.eval_every and step % config.eval_every == 0 and step < config.steps:
                val = evaluate()
                eval_curve.append({"step": step, "val_loss": val})
                loggers.log({"step": step, "val_loss": val})
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                checkpoint()
    finally:
        bar.close()

    final_val = evaluate()
    if not eval_curve or eval_curve[-1]["step"] != step:
        eval_curve.append({"step": step, "val_loss": _finite_or_none(final_val)})
    loggers.log({"step": step, "val_loss": _finite_or_none(final_val)})
    loggers.close()
    if not diverged and out is not None and last_checkpoint != step:
        checkpoint()

    summary = {
        "final_val_loss": _finite_or_none(final_val),
        "diverged": diverged,
        "diverged_at": diverged_at,
        "steps": step,
        "tokens": tokens,
        "tokens_per_second": session_tokens / session_seconds if session_seconds else 0.0,
        "params": par.unwrap(model).num_params(),
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "peak_memory_bytes": _peak_memory(device),
        "wall_seconds": time.perf_counter() - start_wall,
        "train_seconds": train_seconds,
        "train_cpu_seconds": session_cpu,  # CPU time of this session's steps (less noisy)
        "initial_loss": _finite_or_none(initial_loss),
        "final_train_loss": _finite_or_none(last_loss),
        "eval_curve": eval_curve,
        "optimizer": config.optimizer,
        "peak_lrs": sorted(
            {float(g["initial_lr"]) for g in optimizer.param_groups if g["initial_lr"] is not None}
        ),
        "resumed_from": str(resumed_from) if resumed_from else None,
        "device": str(device),
        "parallel": {"mode": par.mode, "world_size": par.world},
        "dtype": str(dtype).removeprefix("torch."),
        "data": {
            "corpus": data.corpus.name,
            "tokenizer": data.tokenizer.name,
            "tokenizer_vocab": data.tokenizer.vocab_size,
            "train_tokens": len(data.train),
            "val_tokens": len(data.val),
            "val_windows": len(val_x),
        },
        "model_config": model_config.to_dict(),
        "config": config.to_dict(),
    }
    if out is not None and par.is_main:
        _atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    par.barrier()
    return summary


class _CallableModule(types.ModuleType):
    """``optarena.train`` is both this module and the function: ``optarena.train(config)``."""

    def __call__(self, config: TrainConfig | dict[str, Any]) -> dict[str, Any]:
        return train(config)


sys.modules[__name__].__class__ = _CallableModule

__all__ = ["TrainConfig", "latest_checkpoint", "lr_multiplier", "optimizer_state_bytes", "train"]
