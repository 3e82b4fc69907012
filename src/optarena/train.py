"""The training harness: ``train(config) -> summary``, as in the Deconstructing study.

One run: build (or load from cache) the token ids, the model and the optimizer; train with a
warmup + cosine schedule (or constant / linear / WSD), global gradient clipping, gradient
accumulation, z-loss and bf16 autocast where supported; drive Sophia's Hessian estimates at the
optimizer's interval; evaluate on fixed validation windows; stop and mark a run ``diverged`` when
its loss is non-finite or far above its initial value; write checkpoints that resume
bit-exactly (:mod:`optarena.checkpoints`), ``metrics.jsonl`` (:mod:`optarena.run_log`) and
``summary.json``, every file atomically (:mod:`optarena.atomic`).

:class:`Run` is the loop every task shares (set-up, step, evaluation, checkpoints, resume,
signals, summary); :class:`LanguageModelRun` is pre-training, what :func:`train` runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import json
import math
import signal
import sys
import threading
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

from optarena import atomic, checkpoints, distributed
from optarena.checkpoints import CHECKPOINT_VERSION
from optarena.devices import resolve_device
from optarena.environment import run_environment
from optarena.errors import Interrupted, StorageError, UserError
from optarena.run_log import RunLog

SCHEDULES = ("cosine", "linear", "constant", "wsd")
SUMMARY_FILE = "summary.json"
TOKENIZER_FILE = "tokenizer.json"  # a run's tokenizer, beside its checkpoints
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


def _check_keys(values: dict[str, Any], known: set[str], what: str, listed: bool = False) -> None:
    """Unknown keys are one-line errors with the closest known one (and, ``listed``, all)."""
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            every = f"; known: {', '.join(sorted(known))}" if listed else ""
            raise UserError(f"unknown {what} {key!r}{hint}{every}")


def _check_types(config: Any, ints: tuple[str, ...], floats: tuple[str, ...]) -> None:
    """Integers are integers; numbers are finite numbers (stored as float). ``None`` passes
    for keys whose default is None."""
    for key in ints:
        value = getattr(config, key)
        if value is None and key in _OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key {key!r} must be an integer, not {value!r}")
    for key in floats:
        value = getattr(config, key)
        if value is None and key in _OPTIONAL:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key {key!r} must be a number, not {value!r}")
        if not math.isfinite(value):
            raise UserError(f"config key {key!r} must be a finite number, not {value!r}")
        setattr(config, key, float(value))


def _check_range(
    key: str, value: float, low: float, high: float | None = None, hint: str = ""
) -> None:
    """``low <= value`` (and ``<= high``), or a one-line error naming the key and the range."""
    if value < low or (high is not None and value > high):
        allowed = f"between {low:g} and {high:g}" if high is not None else f"at least {low:g}"
        raise UserError(f"{key} must be {allowed}, not {value:g}{hint}")


# Keys whose value may be None (their default): "not given".
_OPTIONAL = {"lr", "grad_clip", "vocab_size", "threads", "wandb", "out", "cache_dir"}


@dataclass
class RunConfig:
    """What every training loop reads (:class:`Run`): optimizer, schedule, batch, clipping,
    precision, intervals, output and logging. A task's config extends it with its data and
    model (:class:`TrainConfig` for pre-training). A run's identity is its dict (``to_dict``)."""

    optimizer: str = "adamw"
    lr: float | None = None  # None: the optimizer's default
    hparams: dict[str, Any] = field(default_factory=dict)  # any optimizer hyperparameter
    steps: int = 200
    batch_size: int = 16  # sequences per optimizer step (split over grad_accum micro-batches)
    seq_len: int = 128
    grad_accum: int = 1
    seed: int = 0
    schedule: str = "cosine"
    warmup: float = 0.1  # fraction of steps if < 1, else a number of steps
    warmup_start: float = 0.1  # warmup starts at this fraction of the peak LR
    final_lr_fraction: float = 0.1  # cosine / linear / WSD end at this fraction of the peak
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays
    grad_clip: float | None = 1.0  # global norm; None or 0 disables
    dtype: str = "auto"  # auto (bf16 where supported, CPU excepted) | float32 | bfloat16
    device: str = "auto"
    eval_every: int = 0  # 0: only at the end
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
    threads: int | None = None
    parallel: str = "none"  # none | ddp | fsdp (under torchrun; see optarena.distributed)

    _INTS = (
        "steps",
        "batch_size",
        "seq_len",
        "grad_accum",
        "seed",
        "eval_every",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "threads",
    )
    _FLOATS = (
        "lr",
        "grad_clip",
        "warmup",
        "warmup_start",
        "final_lr_fraction",
        "decay_fraction",
        "divergence_factor",
    )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Any:
        """A validated config from a dict (TOML, JSON, a sweep); unknown keys are errors."""
        if not isinstance(values, dict):
            raise UserError(f"a run's config must be a table of key = value, not {values!r}")
        _check_keys(values, {f.name for f in dataclasses.fields(cls)}, "config key")
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        """Types and ranges, with one-line errors that name the key; every value that would
        train something else than asked (a negative clip, a negative warmup) is refused."""
        _check_types(self, self._INTS, self._FLOATS)
        for key in ("steps", "batch_size", "seq_len", "grad_accum", "log_every"):
            _check_range(key, getattr(self, key), 1)
        for key in ("seed", "eval_every", "checkpoint_every", "keep_checkpoints"):
            _check_range(key, getattr(self, key), 0)
        _check_range("warmup", self.warmup, 0, hint=" (a fraction of the steps, or steps)")
        for key in ("warmup_start", "final_lr_fraction", "decay_fraction"):
            _check_range(key, getattr(self, key), 0, 1)
        if self.threads is not None:
            _check_range("threads", self.threads, 1, hint=" (omit it for torch's default)")
        if self.lr is not None:
            _check_range("lr", self.lr, 0)
        if self.grad_clip is not None:  # 0 (like None) disables clipping
            _check_range("grad_clip", self.grad_clip, 0, hint=" (0 disables clipping)")
        if not self.divergence_factor > 1:
            raise UserError(
                f"divergence_factor must be more than 1, not {self.divergence_factor:g} (a run "
                "is diverged when its loss exceeds this many times its first loss)"
            )
        if self.batch_size % self.grad_accum:
            raise UserError(
                f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}"
            )
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
        if not isinstance(self.hparams, dict):
            raise UserError("hparams must be a table of key = value")
        for key in ("optimizer", "device", "wandb_project"):
            if not isinstance(getattr(self, key), str):
                raise UserError(f"config key {key!r} must be a string, not {getattr(self, key)!r}")
        for key in ("out", "cache_dir"):
            value = getattr(self, key, None)
            if value is not None and not isinstance(value, str):
                raise UserError(f"config key {key!r} must be a path, not {value!r}")


@dataclass
class TrainConfig(RunConfig):
    """A pre-training run (:func:`train`): the loop's settings, the model and the data."""

    model: str = "micro"
    model_overrides: dict[str, Any] = field(default_factory=dict)  # GPTConfig fields
    data: str = "builtin"  # builtin | c4 | file, directory or glob
    tokenizer: str = "bpe"  # bpe | tokenizer.json | SentencePiece .model | hub name
    vocab_size: int | None = None  # BPE vocabulary; None: the preset's
    val_fraction: float = 0.05
    max_documents: int = 200_000  # for --data c4 (streamed)
    z_loss: float = 1e-4
    eval_windows: int = 64  # fixed validation windows of seq_len tokens
    cache_dir: str | None = None  # None: $OPTARENA_CACHE or ~/.cache/optarena

    _INTS = (*RunConfig._INTS, "vocab_size", "max_documents", "eval_windows")
    _FLOATS = (*RunConfig._FLOATS, "val_fraction", "z_loss")

    def validate(self) -> None:
        super().validate()
        _check_range("eval_windows", self.eval_windows, 1)
        _check_range("max_documents", self.max_documents, 1)
        _check_range("z_loss", self.z_loss, 0, hint=" (0 disables the z-loss)")
        if not 0 < self.val_fraction < 1:
            raise UserError(f"val_fraction must be between 0 and 1, not {self.val_fraction:g}")
        if self.vocab_size is not None and self.tokenizer == "bpe":
            _check_range("vocab_size", self.vocab_size, MIN_BPE_VOCAB)
        for key in ("data", "tokenizer"):
            if not isinstance(getattr(self, key), str) or not getattr(self, key).strip():
                raise UserError(f"config key {key!r} must be a non-empty string")
        if not isinstance(self.model_overrides, dict):
            raise UserError("model_overrides must be a table of key = value")
        from optarena.model import PRESETS

        if not isinstance(self.model, str):
            raise UserError(
                f"model must be a preset name, not {self.model!r}; a model's fields go in "
                "model_overrides (e.g. model_overrides.n_layer = 4)"
            )
        if self.model not in PRESETS:
            raise UserError(f"unknown model {self.model!r}; choose one of: {', '.join(PRESETS)}")
        _model_config(self, PRESETS[self.model]["vocab_size"])  # field names, types, shapes


# A byte-level BPE holds the 256 bytes and end-of-text before it learns any merge.
MIN_BPE_VOCAB = 257


# --------------------------------------------------------------------------- schedule


def lr_multiplier(config: RunConfig, step: int) -> float:
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


def _make_optimizer(config: RunConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
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
    config = TrainConfig.from_dict(config.to_dict() if isinstance(config, RunConfig) else config)
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


def _model_config(config: TrainConfig, vocab_size: int):
    """The model's GPTConfig: the preset, ``model_overrides`` (names and types checked against
    GPTConfig's fields: ``model.n_layers`` or ``model.d_model=abc`` is a one-line error), the
    vocabulary and room for ``seq_len``."""
    from optarena.model import PRESETS, GPTConfig

    known = {f.name: str(f.type) for f in dataclasses.fields(GPTConfig)}
    _check_keys(config.model_overrides, set(known) - {"vocab_size"}, "model field", listed=True)
    for key, value in config.model_overrides.items():
        if value is None and "None" in known[key]:
            continue
        kind = next(k for k in (bool, int, float, str) if k.__name__ in known[key])
        ok = isinstance(value, kind) or (kind is float and isinstance(value, int))
        if not ok or (kind is not bool and isinstance(value, bool)):
            expected = {bool: "true or false", int: "an integer", float: "a number"}
            raise UserError(f"model.{key} must be {expected.get(kind, 'a string')}, not {value!r}")
    fields = {**PRESETS[config.model], **config.model_overrides}
    fields["vocab_size"] = vocab_size
    fields["max_seq_len"] = max(fields.get("max_seq_len", 512), config.seq_len)
    try:
        return GPTConfig(**fields)
    except (TypeError, ValueError) as err:
        raise UserError(f"model {config.model}: {err}") from None


def _json_round_trip(value: Any) -> Any:
    return json.loads(json.dumps(value))


# --------------------------------------------------------------------------- the run


@dataclass
class Throughput:
    """Tokens and time of the steps this process ran (a resumed run counts only its own)."""

    tokens: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class Run:
    """One training run: set up, step, evaluate, checkpoint, resume, finish.

    ``Run(config, par).run()`` trains and returns the summary. Everything that is not about the
    task lives here once: the output folder and its temporary files, resuming bit-exactly from
    the newest valid checkpoint (and refusing a changed config), the LR schedule, gradient
    clipping, Sophia's ``bs``, divergence, ``metrics.jsonl`` and ``on_log``, evaluation and
    checkpoints at their intervals, SIGINT/SIGTERM (a checkpoint at the current step), the
    progress bar, and ``summary.json``.

    A task (pre-training here, :class:`LanguageModelRun`; fine-tuning or RLHF elsewhere)
    subclasses it and provides:

    * :meth:`build` — data, ``self.model`` (unwrapped, on ``self.device``) and anything else;
      the optimizer is made by :meth:`make_optimizer` over the wrapped model;
    * :meth:`next_batch` and :meth:`forward_backward` — one optimizer step's batch, and its loss
      back-propagated (accumulating over micro-batches as the task likes);
    * :meth:`evaluate` — the validation loss;
    * :meth:`data_state` / :meth:`load_data_state` — what the checkpoint needs beyond the model,
      optimizer and torch RNG to redraw the same batches;
    * optionally :meth:`step_tokens`, :meth:`is_diverged`, :meth:`hessian_update`,
      :meth:`log_fields` and :meth:`summary_fields`.
    """

    # config keys that may change between a run and its resumption
    resumable_changes: frozenset[str] = frozenset(RESUMABLE_CHANGES)

    def __init__(
        self,
        config: RunConfig,
        par: Any = None,
        on_log: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        from optarena import distributed

        self.config = config
        self.par = par if par is not None else distributed.Parallel()
        self.on_log = on_log
        self.requested = _json_round_trip(config.to_dict())  # as given, before defaults resolve
        self.start_wall = time.perf_counter()
        self.out: Path | None = None
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.step = 0
        self.tokens = 0
        self.initial_loss: float | None = None
        self.last_loss: float | None = None
        self.train_seconds = 0.0
        self.eval_curve: list[dict[str, Any]] = []
        self.session = Throughput()
        self.diverged_at: int | None = None
        self.resumed_from: Path | None = None
        self.last_checkpoint = -1
        self.last_checkpoint_path: Path | None = None
        self.final_val: float | None = None
        self.grad_norm: Tensor | None = None
        self.log: RunLog | None = None
        self.stop_signal: str | None = None
        self._resumed: dict[str, Any] | None = None
        self._earlier_session: dict[str, Any] | None = None
        self._wall_before = 0.0

    @property
    def diverged(self) -> bool:
        return self.diverged_at is not None

    # ----------------------------------------------------------------- the whole run

    def run(self) -> dict[str, Any]:
        """Set up, train to ``config.steps`` (or divergence, or a signal), finish; the summary.

        A run whose folder already holds its summary is not run again: ``--resume`` of a
        finished run returns the stored summary. A full disk or a read-only folder stops the
        run with :class:`~optarena.errors.StorageError`, its checkpoints kept, saying how to
        continue."""
        try:
            finished = self.setup()
            if finished is not None:
                return finished
            self.bar = self.progress_bar()
            try:
                with self.stop_on_signals():
                    while self.step < self.config.steps and not self.diverged:
                        self.train_step()
                        self.bar.update(1)
                        self.after_step()
                        if self.should_stop():
                            self.interrupt()
            except BaseException:
                self.log.close()
                raise
            finally:
                self.bar.close()
            return self.finish()
        except StorageError as err:
            if self.last_checkpoint_path is None or self.config.resume:
                raise
            raise StorageError(
                f"{err} (this run: add --resume to continue from its checkpoint at step "
                f"{self.last_checkpoint})"
            ) from None

    # ----------------------------------------------------------------- set-up

    def setup(self) -> dict[str, Any] | None:
        """Threads, device, output folder, resume point, :meth:`build`, the optimizer, the
        restored state and the log. Returns the stored summary of a finished run instead."""
        config, par = self.config, self.par
        if config.threads:
            torch.set_num_threads(config.threads)
        else:  # the number used, not None: results depend on it
            config.threads = torch.get_num_threads()
        if not par.active:
            par.device = resolve_device(config.device)
        self.device = par.device
        self.dtype = _resolve_dtype(config.dtype, self.device)
        if config.batch_size % (par.world * config.grad_accum):
            raise UserError(
                f"batch_size {config.batch_size} is not divisible by {par.world} processes x "
                f"grad_accum {config.grad_accum}"
            )
        self.out = self.prepare_out()
        if config.resume and self.out is not None:
            finished = self.finished_summary()
            if finished is not None:
                return finished
            self.find_resume_point()  # before any work, so that a changed config fails fast
        self.build()
        assert self.model is not None, "build() must set self.model"
        self.model = par.wrap(self.model)
        self.optimizer = self.make_optimizer()
        self.make_out()  # once the data and the optimizer are good: bad input writes nothing
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.hessian_interval = getattr(self.optimizer, "hessian_interval", None)
        if self._resumed is not None:
            self.restore(self._resumed)
        self.autocast = (
            torch.autocast(self.device.type, dtype=self.dtype)
            if self.dtype != torch.float32
            else contextlib.nullcontext()
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.log = RunLog(
            self.out if par.is_main else None,
            self.step if self._resumed is not None else None,
            self.on_log if par.is_main else None,
            tensorboard=config.tensorboard,
            wandb=config.wandb,
            wandb_project=config.wandb_project,
            wandb_config=config.to_dict(),
        )
        self.model.train()
        return None

    def prepare_out(self) -> Path | None:
        """The output folder (not made yet: :meth:`make_out`). A folder that holds a run is
        refused unless resuming, and so is a path that cannot be a folder."""
        config = self.config
        if not config.out:
            return None
        out = Path(config.out).expanduser()
        if not config.resume and (
            (out / SUMMARY_FILE).exists() or any((out / "checkpoints").glob("step-*"))
        ):
            raise UserError(f"{out} already holds a run; pass --resume or choose another --out")
        blocked = next((p for p in (out, *out.parents) if p.exists()), None)
        if blocked is not None and not blocked.is_dir():
            raise UserError(
                f"cannot use {out} as the run directory: {blocked} is a file; choose another --out"
            )
        return out

    def make_out(self) -> None:
        """The output folder, created; temporary files of dead writers removed."""
        out = self.out
        if out is None:
            return
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            converted = atomic.storage_error(out, err)
            if converted is not None:
                raise converted from None
            raise UserError(f"cannot create output directory {out}: {err.strerror}") from None
        if self.par.is_main:
            atomic.clean_temp_files(out)
            checkpoints.clean_folder(out / "checkpoints")

    def finished_summary(self) -> dict[str, Any] | None:
        """The summary of a run this folder finished with the same config, or None."""
        assert self.out is not None
        path = self.out / SUMMARY_FILE
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # none, or torn by an older writer: the run is redone from a checkpoint
        if not isinstance(summary, dict) or "requested_config" not in summary:
            return None
        self.check_resumable(summary["requested_config"], path)
        if self.par.is_main:
            print(
                f"optarena: {self.out} already finished ({summary.get('steps')} steps"
                f"{', diverged' if summary.get('diverged') else ''}); nothing to resume, "
                f"the summary is {path}",
                file=sys.stderr,
            )
        return summary

    def check_resumable(self, saved: dict[str, Any], where: Path) -> None:
        changed = sorted(
            k
            for k in set(saved) | set(self.requested)
            if k not in self.resumable_changes and saved.get(k) != self.requested.get(k)
        )
        if changed:
            raise UserError(
                f"cannot resume {self.out}: the config differs in {', '.join(changed)} from "
                f"{where} (resume with the same settings, or use another --out)"
            )

    def find_resume_point(self) -> None:
        """The newest valid checkpoint, its config checked; newer unusable ones removed."""
        assert self.out is not None
        folder = self.out / "checkpoints"
        found = checkpoints.resume_point(folder)
        if found is None:
            if self.par.is_main:
                print(f"optarena: no checkpoint in {self.out}; starting fresh", file=sys.stderr)
            return
        self.check_resumable(json.loads(found.payload["requested_config"]), found.path)
        if self.par.is_main:
            for stale in found.skipped:  # the resumed run writes these steps again
                checkpoints.remove_checkpoint(stale)
            print(f"optarena: resuming from step {found.step} ({found.path})", file=sys.stderr)
        self.resumed_from, self._resumed = found.path, found.payload

    def build(self) -> None:
        """Data and ``self.model`` (unwrapped, on ``self.device``). Subclasses implement it."""
        raise NotImplementedError

    def make_optimizer(self) -> torch.optim.Optimizer:
        return _make_optimizer(self.config, self.par.unwrap(self.model))

    # ----------------------------------------------------------------- one step

    def train_step(self) -> None:
        """One optimizer step: schedule, batch, loss and gradients, clipping, update."""
        config, optimizer = self.config, self.optimizer
        t0, c0 = time.perf_counter(), time.process_time()
        multiplier = lr_multiplier(config, self.step)
        for group in optimizer.param_groups:
            if group["initial_lr"] is not None:  # None: the optimizer sets its own step
                group["lr"] = group["initial_lr"] * multiplier
        batch = self.next_batch()
        loss = self.forward_backward(batch)
        clip = config.grad_clip or 0.0
        self.grad_norm = distributed.clip_grad_norm_(self.params, clip) if clip else None
        step_tokens = self.step_tokens(batch)
        if self.hessian_interval is not None:
            optimizer.step(bs=step_tokens)
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += step_tokens
        if self.hessian_interval and self.step % self.hessian_interval == 0:
            self.hessian_update(batch)
        self.last_loss = self.par.mean(loss).item()  # the same on every rank
        dt = time.perf_counter() - t0
        self.train_seconds += dt
        self.session.seconds += dt
        self.session.cpu_seconds += time.process_time() - c0
        self.session.tokens += step_tokens
        if self.initial_loss is None:
            self.initial_loss = self.last_loss

    def after_step(self) -> None:
        """Divergence, the log line, evaluation and checkpoint at their intervals."""
        config, step = self.config, self.step
        if self.is_diverged(self.last_loss):
            self.diverged_at = step
            self.log.log({"step": step, "loss": _finite_or_none(self.last_loss), "diverged": True})
            return
        if step % config.log_every == 0 or step == config.steps:
            record = {
                "step": step,
                "loss": self.last_loss,
                "lr": self.optimizer.param_groups[0]["lr"],
                "tokens": self.tokens,
                "tokens_per_second": self.session.tokens / max(self.session.seconds, 1e-9),
            }
            if self.grad_norm is not None:
                record["grad_norm"] = self.grad_norm.item()
            record.update(self.log_fields())
            self.log.log(record)
            tok_s = f"{record['tokens_per_second']:,.0f}"
            self.bar.set_postfix(loss=f"{self.last_loss:.3f}", tok_s=tok_s, refresh=False)
        if config.eval_every and step % config.eval_every == 0 and step < config.steps:
            metrics = self.eval_metrics()
            self.eval_curve.append({"step": step, **metrics})
            self.log.log({"step": step, **metrics})
        # the last step's checkpoint is written by finish(), after the final evaluation
        if config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps:
            self.checkpoint()

    def is_diverged(self, loss: float) -> bool:
        """Non-finite, or more than ``divergence_factor`` times the first step's loss."""
        return not math.isfinite(loss) or loss > self.config.divergence_factor * self.initial_loss

    # ----------------------------------------------------------------- task hooks

    def next_batch(self) -> Any:
        raise NotImplementedError

    def forward_backward(self, batch: Any) -> Tensor:
        """Back-propagate the step's loss; return it (0-d, detached, this rank's mean)."""
        raise NotImplementedError

    def evaluate(self) -> float | dict[str, float]:
        """The validation loss, or a dict of named metrics with at least ``val_loss``."""
        raise NotImplementedError

    def eval_metrics(self) -> dict[str, Any]:
        """:meth:`evaluate` as a dict that holds ``val_loss``, at the optimizer's eval point."""
        with self.eval_point():
            result = self.evaluate()
        metrics = dict(result) if isinstance(result, dict) else {"val_loss": result}
        if "val_loss" not in metrics:
            raise TypeError(f"{type(self).__name__}.evaluate() returned no 'val_loss'")
        return metrics

    @contextlib.contextmanager
    def eval_point(self) -> Iterator[None]:
        """The parameters at the optimizer's evaluation point while evaluating (Schedule-Free
        evaluates its average ``x``, not the point ``y`` it steps at), back at the train point
        after: steps and checkpoints always see the train point, so a resumed run continues
        exactly. Optimizers without ``eval()``/``train()`` (torch's) are left alone."""
        optimizer = self.optimizer
        swaps = callable(getattr(optimizer, "eval", None)) and callable(
            getattr(optimizer, "train", None)
        )
        if swaps:
            optimizer.eval()
        try:
            yield
        finally:
            if swaps:
                optimizer.train()

    def step_tokens(self, batch: Any) -> int:
        """Tokens one optimizer step trains on (all ranks): throughput and Sophia's ``bs``."""
        return self.config.batch_size * self.config.seq_len

    def hessian_update(self, batch: Any) -> None:
        name = type(self).__name__
        raise UserError(f"{name} has no Hessian estimate for {self.config.optimizer}")

    def data_state(self) -> dict[str, Any]:
        return {}

    def load_data_state(self, state: dict[str, Any]) -> None:
        pass

    def log_fields(self) -> dict[str, float]:
        """Extra numbers for each training record of the log (e.g. a reward)."""
        return {}

    def summary_fields(self) -> dict[str, Any]:
        """Extra entries of the summary (e.g. the data's description)."""
        return {}

    # ----------------------------------------------------------------- checkpoints

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds besides the model and optimizer."""
        return {
            "version": checkpoints.CHECKPOINT_VERSION,
            "step": self.step,
            "tokens": self.tokens,
            "initial_loss": self.initial_loss,
            "last_loss": self.last_loss,
            "train_seconds": self.train_seconds,
            "train_cpu_seconds": self.session.cpu_seconds,  # this session's steps (less noisy)
            "session": json.dumps(
                {**dataclasses.asdict(self.session), "wall": self.wall_seconds()}
            ),
            "torch_rng": torch.get_rng_state(),
            "eval_curve": json.dumps(self.eval_curve),
            "config": json.dumps(self.config.to_dict()),
            "requested_config": json.dumps(self.requested),
            **self.data_state(),
        }

    def checkpoint(self) -> Path | None:
        """A checkpoint of the current step (every rank takes part when parallel)."""
        if self.out is None:
            return None
        payload = self.state()
        folder, keep = self.out / "checkpoints", self.config.keep_checkpoints
        if self.par.active:  # every rank writes its shards (DCP); rank 0 the rest
            model, optimizer, step = self.model, self.optimizer, self.step
            path = distributed.save_dcp(self.par, folder, step, model, optimizer, payload, keep)
        else:
            payload["model"] = self.model.state_dict()
            payload["optimizer"] = self.optimizer.state_dict()
            path = checkpoints.save_checkpoint(folder, self.step, payload, keep)
        self.last_checkpoint, self.last_checkpoint_path = self.step, path
        return path

    def restore(self, payload: dict[str, Any]) -> None:
        """Model, optimizer, data position, RNG and counters from a checkpoint."""
        model, optimizer = self.model, self.optimizer
        if "model" not in payload:  # a DCP checkpoint, at any world size
            distributed.load_dcp(self.resumed_from, model, optimizer)
        elif self.par.mode == "fsdp":  # a single-process checkpoint onto shards
            distributed.load_full(payload["model"], payload["optimizer"], model, optimizer)
        else:
            self.par.unwrap(model).load_state_dict(payload["model"])
            optimizer.load_state_dict(payload["optimizer"])
        self.load_data_state(payload)
        torch.set_rng_state(payload["torch_rng"])
        self.step, self.tokens = int(payload["step"]), int(payload["tokens"])
        self.initial_loss = payload["initial_loss"]
        self.last_loss = payload.get("last_loss")
        self.eval_curve = json.loads(payload["eval_curve"])
        self.train_seconds = float(payload["train_seconds"])
        self.last_checkpoint, self.last_checkpoint_path = self.step, self.resumed_from
        if "session" in payload:
            self._earlier_session = json.loads(payload["session"])

    # ----------------------------------------------------------------- signals

    @contextlib.contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM stop the run at the end of the current step, with a checkpoint
        of that step (:meth:`interrupt`); a second signal stops at once. Handlers someone set
        on purpose (a sweep worker ignores SIGINT) and other threads are left alone."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            if self.stop_signal:
                raise KeyboardInterrupt
            self.stop_signal = signal.Signals(signum).name

        defaults = ((signal.SIGINT, signal.default_int_handler), (signal.SIGTERM, signal.SIG_DFL))
        for sig, default in defaults:
            if signal.getsignal(sig) is default:
                previous[sig] = signal.signal(sig, handler)
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)

    def should_stop(self) -> bool:
        """Whether a signal asked to stop, agreed by every rank (they stop at the same step)."""
        if not (self.par.active and self.par.world > 1):
            return self.stop_signal is not None
        flag = torch.tensor(float(self.stop_signal is not None), device=self.device)
        if self.par.sum(flag).item() > 0:
            self.stop_signal = self.stop_signal or "SIGTERM"
            return True
        return False

    def interrupt(self) -> None:
        """Checkpoint the current step and stop with :class:`~optarena.errors.Interrupted`."""
        if self.last_checkpoint != self.step:
            self.checkpoint()
        if self.last_checkpoint_path is None:
            where = "no --out: nothing saved"
        else:
            where = f"checkpoint {self.last_checkpoint_path}; continue with --resume"
        steps = f"step {self.step} of {self.config.steps}"
        raise Interrupted(f"{self.stop_signal} at {steps} ({where})")

    # ----------------------------------------------------------------- the end

    def progress_bar(self) -> Any:
        from tqdm import tqdm

        return tqdm(
            total=self.config.steps,
            initial=self.step,
            unit="step",
            dynamic_ncols=True,
            disable=not self.config.progress or not self.par.is_main,
            desc=self.config.optimizer,
        )

    def wall_seconds(self) -> float:
        """Seconds of this session (of the one that trained, when this one only finished)."""
        return self._wall_before + time.perf_counter() - self.start_wall

    def finish(self) -> dict[str, Any]:
        """The final evaluation, the last checkpoint, ``summary.json``; returns the summary."""
        step = self.step
        if self.eval_curve and self.eval_curve[-1]["step"] == step and self.last_checkpoint == step:
            # resumed from the last checkpoint, written after the final evaluation
            self.final_val = self.eval_curve[-1]["val_loss"]
        else:
            metrics = self.eval_metrics()
            metrics["val_loss"] = self.final_val = _finite_or_none(metrics["val_loss"])
            if not self.eval_curve or self.eval_curve[-1]["step"] != step:
                self.eval_curve.append({"step": step, **metrics})
            self.log.log({"step": step, **metrics})
        self.log.close()
        if not self.diverged and self.out is not None and self.last_checkpoint != step:
            self.checkpoint()
        earlier = self._earlier_session
        if earlier is not None and self.session.tokens == 0:  # the session that trained
            self.session = Throughput(earlier["tokens"], earlier["seconds"], earlier["cpu_seconds"])
            self._wall_before = earlier["wall"]
        summary = self.summary()
        if self.out is not None and self.par.is_main:
            atomic.fault_point("before-summary")
            atomic.write_json(self.out / SUMMARY_FILE, summary)
            atomic.fault_point("after-summary")
        self.par.barrier()
        return summary

    def summary(self) -> dict[str, Any]:
        from optarena.optim import state_bytes

        optimizer = self.optimizer
        groups = optimizer.param_groups
        peaks = {float(g["initial_lr"]) for g in groups if g["initial_lr"] is not None}
        return {
            "final_val_loss": self.final_val,
            "diverged": self.diverged,
            "diverged_at": self.diverged_at,
            "steps": self.step,
            "tokens": self.tokens,
            "tokens_per_second": self.session.tokens_per_second,
            "params": sum(p.numel() for p in self.model.parameters()),  # global under FSDP
            "optimizer_state_bytes": state_bytes(optimizer),
            "peak_memory_bytes": _peak_memory(self.device),
            "wall_seconds": self.wall_seconds(),
            "train_seconds": self.train_seconds,
            "train_cpu_seconds": self.session.cpu_seconds,  # this session's steps (less noisy)
            "initial_loss": _finite_or_none(self.initial_loss),
            "final_train_loss": _finite_or_none(self.last_loss),
            "eval_curve": self.eval_curve,
            "optimizer": self.config.optimizer,
            "peak_lrs": sorted(peaks),
            "resumed_from": str(self.resumed_from) if self.resumed_from else None,
            "device": str(self.device),
            "parallel": {"mode": self.par.mode, "world_size": self.par.world},
            "dtype": str(self.dtype).removeprefix("torch."),
            "environment": run_environment(),
            **self.summary_fields(),
            "config": self.config.to_dict(),
            "requested_config": self.requested,
        }


class LanguageModelRun(Run):
    """Pre-training the study's transformer on a corpus: random windows of ``seq_len`` tokens,
    next-token cross-entropy with z-loss, fixed validation windows, Sophia's Gauss-Newton-Bartlett
    Hessian estimate."""

    def build(self) -> None:
        from optarena.data import RandomWindows, prepare_data, validation_windows
        from optarena.model import GPT, PRESETS

        config, par = self.config, self.par
        vocab = config.vocab_size or PRESETS[config.model]["vocab_size"]
        self.data = prepare_data(
            config.data,
            config.tokenizer,
            vocab,
            config.cache_dir,
            config.val_fraction,
            config.max_documents,
            config.progress,
        )
        config.vocab_size = vocab if config.tokenizer == "bpe" else self.data.tokenizer.vocab_size
        # pad the embedding to a multiple of 64 like the study (32,100 -> 32,128)
        padded_vocab = 64 * math.ceil(self.data.tokenizer.vocab_size / 64)
        self.batches = RandomWindows(
            self.data.train, config.batch_size, config.seq_len, config.seed, (par.rank, par.world)
        )
        val_x, val_y = validation_windows(self.data.val, config.eval_windows, config.seq_len)
        self.val_x, self.val_y = val_x.to(self.device), val_y.to(self.device)
        self.model_config = _model_config(config, padded_vocab)
        torch.manual_seed(config.seed)
        self.model = GPT(self.model_config).to(self.device)
        self.hessian_rng = torch.Generator(device=self.device).manual_seed(config.seed + 1)
        # sequences per forward pass on this rank
        self.micro = config.batch_size // (config.grad_accum * par.world)

    def make_out(self) -> None:
        """The folder, with the run's tokenizer in it: the folder is a self-contained pretrained
        model (:mod:`optarena.posttrain`)."""
        super().make_out()
        definition = self.data.tokenizer.definition
        if self.out is not None and self.par.is_main and definition is not None:
            atomic.write_text(self.out / TOKENIZER_FILE, definition)

    def data_state(self) -> dict[str, Any]:
        return {"batches": self.batches.state_dict(), "hessian_rng": self.hessian_rng.get_state()}

    def load_data_state(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state["batches"])
        self.hessian_rng.set_state(state["hessian_rng"])

    def next_batch(self) -> tuple[Tensor, Tensor]:
        x, y = self.batches.next()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def micro_batches(self, x: Tensor) -> Iterator[tuple[int, slice]]:
        for m in range(self.config.grad_accum):
            yield m, slice(m * self.micro, (m + 1) * self.micro)

    def forward_backward(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        from optarena.model import lm_loss

        x_all, y_all = batch
        accum = self.config.grad_accum
        ce_sum = torch.zeros((), device=self.device)
        for m, rows in self.micro_batches(x_all):
            with self.par.accumulating(self.model, last=m == accum - 1):
                with self.autocast:
                    logits = self.model(x_all[rows])
                loss, ce = lm_loss(logits, y_all[rows], self.config.z_loss)
                (loss / accum if accum > 1 else loss).backward()
            ce_sum += ce.detach()
        return ce_sum.double() / accum  # float64: the mean rounds once, as a Python float

    def evaluate(self) -> float:
        """Mean validation cross-entropy; ranks share the windows and sum their losses."""
        model, par, device = self.model, self.par, self.device
        model.eval()
        total = torch.zeros((), device=device)
        rows, weight = par.eval_indices(len(self.val_x))
        rows, weight = rows.to(device), weight.to(device)
        size = max(1, self.config.batch_size // par.world)
        with torch.no_grad(), self.autocast:
            for i in range(0, len(rows), size):
                x, y = self.val_x[rows[i : i + size]], self.val_y[rows[i : i + size]]
                logits = model(x).float()
                ce = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
                total += (ce.view(len(x), -1).sum(1) * weight[i : i + size]).sum()
        model.train()
        return (par.sum(total) / self.val_y.numel()).item()

    def hessian_update(self, batch: tuple[Tensor, Tensor]) -> None:
        """Sophia's Gauss-Newton-Bartlett estimate: back-propagate the loss on labels sampled
        from the model's own softmax (same clipping), then ``update_hessian()``.

        As in the official Sophia loop, the estimate uses the whole batch of the step, micro-batch
        by micro-batch. Each label is drawn by inverting the softmax CDF at one uniform number per
        token of the global batch, so a token gets the same label whatever the world size and
        micro-batching."""
        x_local = batch[0]
        par, accum = self.par, self.config.grad_accum
        tokens_local = x_local.numel()
        with torch.no_grad():
            u = torch.rand(tokens_local * par.world, generator=self.hessian_rng, device=self.device)
            u = u[par.rank * tokens_local : (par.rank + 1) * tokens_local]
        for m, rows in self.micro_batches(x_local):
            with par.accumulating(self.model, last=m == accum - 1):
                with self.autocast:
                    logits = self.model(x_local[rows])
                flat = logits.float().flatten(0, 1)
                with torch.no_grad():
                    cdf = flat.softmax(-1).cumsum(-1)
                    mine = u[m * flat.shape[0] : (m + 1) * flat.shape[0]]
                    labels = torch.searchsorted(cdf, mine.unsqueeze(-1)).squeeze(-1)
                    labels = labels.clamp_(max=flat.shape[-1] - 1)
                loss = F.cross_entropy(flat, labels)
                (loss / accum if accum > 1 else loss).backward()
        if self.config.grad_clip:
            distributed.clip_grad_norm_(self.params, self.config.grad_clip)
        self.optimizer.update_hessian()
        self.optimizer.zero_grad(set_to_none=True)

    def summary_fields(self) -> dict[str, Any]:
        data = self.data
        return {
            "data": {
                "corpus": data.corpus.name,
                "tokenizer": data.tokenizer.name,
                "tokenizer_vocab": data.tokenizer.vocab_size,
                "train_tokens": len(data.train),
                "val_tokens": len(data.val),
                "val_windows": len(self.val_x),
            },
            "model_config": self.model_config.to_dict(),
        }


def train(
    config: TrainConfig | dict[str, Any],
    on_log: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train one model and return its summary (also written to ``OUT/summary.json``).

    ``on_log`` receives every record written to ``metrics.jsonl`` (loss, lr, tokens/s every
    ``log_every`` steps, validation losses), output directory or not: a notebook or a
    benchmark can follow a run without reading files. With ``parallel`` set (under torchrun),
    every rank calls this; rank 0 writes the files and calls ``on_log``, and every rank returns
    the summary. ``resume`` of a run that already finished returns its stored summary."""
    config = check_config(config, optimizer=False)  # the optimizer itself is built below
    par = distributed.setup(config.parallel, config.device)
    try:
        return LanguageModelRun(config, par, on_log).run()
    finally:
        par.close()


# kept importable from here: the checkpoint API predates optarena.checkpoints
latest_checkpoint = checkpoints.latest_checkpoint
load_checkpoint = checkpoints.load_checkpoint
save_checkpoint = checkpoints.save_checkpoint


class _CallableModule(types.ModuleType):
    """``optarena.train`` is both this module and the function: ``optarena.train(config)``."""

    def __call__(self, config: TrainConfig | dict[str, Any]) -> dict[str, Any]:
        return train(config)


sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "CHECKPOINT_VERSION",
    "SUMMARY_FILE",
    "LanguageModelRun",
    "Run",
    "RunConfig",
    "Throughput",
    "TrainConfig",
    "check_config",
    "latest_checkpoint",
    "lr_multiplier",
    "train",
]
