"""Training on several processes: ``torchrun ... optarena train --parallel ddp|fsdp``.

Everything the training loop needs to know about other ranks lives here, so that ``train.py``
reads the same with one process or many:

* :func:`setup` joins the process group torchrun describes (NCCL on GPUs, gloo on CPU; a
  one-process group when started without torchrun) and picks this rank's device;
* :meth:`Parallel.wrap` applies ``DistributedDataParallel`` or FSDP2 ``fully_shard`` (each
  transformer block, then the root) — the optimizers handle FSDP2's DTensor shards themselves
  (``optarena.optim.sharding``);
* data are sharded by rank: every rank draws the same global batch of window *offsets* and reads
  only its own rows, so the global batch, and the trajectory, do not depend on the world size;
* metrics, summaries and checkpoint metadata are written by rank 0; checkpoints go through
  ``torch.distributed.checkpoint`` (DCP), which every rank writes its shard of and which loads
  into any world size, one process without torchrun included.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from optarena.errors import UserError

MODES = ("none", "ddp", "fsdp")
DCP_SUFFIX = ".dcp"
META_FILE = "meta.pt"


@dataclass
class Parallel:
    """This process's place in the run: mode, rank, world size, device."""

    mode: str = "none"
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # we initialised the process group, so we destroy it

    @property
    def active(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ----------------------------------------------------------------- model

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP or FSDP2 around ``model`` (already on :attr:`device`); unchanged without a mode."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DistributedDataParallel(model, device_ids=ids)
        if self.mode == "fsdp":
            from torch.distributed.fsdp import fully_shard

            for block in getattr(model, "blocks", []):
                fully_shard(block)
            fully_shard(model)
        return model

    def accumulating(self, model: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Skip the gradient reduction on all but the ``last`` micro-batch of a step (the
        reduced gradient is the same; it is only reduced once)."""
        if self.mode == "ddp" and not last:
            return model.no_sync()
        if self.mode == "fsdp":
            model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        """The module whose parameter names the optimizer and partition should see."""
        return getattr(model, "module", model)

    # ----------------------------------------------------------------- data

    def rows(self, n: int) -> slice:
        """This rank's rows of a global batch of ``n`` (``n`` divisible by the world size)."""
        share = n // self.world
        return slice(self.rank * share, (self.rank + 1) * share)

    def eval_indices(self, n: int) -> tuple[Tensor, Tensor]:
        """This rank's validation windows (every ``world``-th) padded to the same count on every
        rank, and a 0/1 weight per entry: FSDP needs every rank to run every forward."""
        mine = torch.arange(self.rank, n, self.world)
        count = -(-n // self.world)
        weight = torch.ones(count)
        if len(mine) < count:
            weight[len(mine) :] = 0.0
            mine = torch.cat([mine, torch.zeros(count - len(mine), dtype=mine.dtype)])
        return mine, weight

    # ----------------------------------------------------------------- collectives

    def sum(self, x: Tensor) -> Tensor:
        """Sum over ranks (``x`` itself with one process)."""
        if self.active and self.world > 1:
            import torch.distributed as dist

            x = x.clone()
            dist.all_reduce(x)
        return x

    def mean(self, x: Tensor) -> Tensor:
        return self.sum(x) / self.world

    def barrier(self) -> None:
        if self.active and self.world > 1:
            import torch.distributed as dist

            if self.device.type == "cuda":
                dist.barrier(device_ids=[self.device.index])
            else:
                dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owns_group = False


def clip_grad_norm_(params: list[nn.Parameter], max_norm: float) -> Tensor:
    """Global gradient-norm clipping with ``torch.nn.utils.clip_grad_norm_``'s semantics
    (``g *= min(1, max_norm / (norm + 1e-6))``), whose norm is the same on one process and on
    FSDP2 shards: float64 sums of per-row sums (FSDP2 shards whole rows), all-reduced over each
    shard group. Returns the norm before clipping (float32)."""
    from optarena.optim.sharding import local, shard_group

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    device = local(grads[0]).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    by_group: dict[Any, Tensor] = {}
    for p in params:
        if p.grad is None:
            continue
        g = local(p.grad)
        sq = _sum_of_squares(g)
        group = shard_group(p)
        if group is None:  # whole on every rank (one process, DDP)
            total += sq
        else:
            by_group[group] = by_group.get(group, torch.zeros_like(total)) + sq
    if by_group:
        import torch.distributed as dist

        for group, partial in by_group.items():
            dist.all_reduce(partial, group=group)
            total += partial
    norm = total.sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for g in grads:
        local(g).mul_(coef.to(g.dtype))
    return norm.float()


def _sum_of_squares(g: Tensor) -> Tensor:
    """``Σ g²`` as float64: each row summed in ``g``'s dtype, the rows added in float64, so the
    sum does not depend on how rows are split over shards."""
    sq = g * g
    rows = sq.reshape(sq.shape[0], -1).sum(1) if sq.dim() >= 2 else sq.reshape(-1)
    return rows.sum(dtype=torch.float64)


def launched_world() -> int:
    """The world size torchrun (or Slurm's ``srun`` with the torch variables) announced."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(mode: str, device_name: str) -> Parallel:
    """Join the process group for ``mode`` and choose this rank's device.

    ``--parallel ddp|fsdp`` needs a launcher (torchrun, or an initialised process group): run
    without one it would train in a single process while the user asked for several, so it is
    an error (a multi-rank checkpoint resumes in one process without ``--parallel``). torchrun
    with several processes and no ``--parallel`` would train the same model N times into one
    directory: an error, on every rank.
    """
    if mode not in MODES:
        raise UserError(f"--parallel {mode!r}: choose one of {', '.join(MODES)}")
    world = launched_world()
    if mode == "none":
        if world > 1:
            raise UserError(
                f"launched as {world} processes (torchrun) without --parallel: pass "
                "--parallel ddp or --parallel fsdp, or launch one process"
            )
        return Parallel()  # the caller resolves the device as for any single-process run
    import torch.distributed as dist

    if not dist.is_available():
        raise UserError(f"--parallel {mode} needs torch.distributed, which this torch lacks")
    if not dist.is_initialized() and "MASTER_ADDR" not in os.environ:
        raise UserError(
            f"--parallel {mode} needs several processes, but this is one process without "
            f"torchrun: launch it as `torchrun --nproc_per_node=N -m optarena train --parallel "
            f"{mode} ...`, or drop --parallel (a sharded checkpoint resumes in one process too)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _device(device_name, local_rank)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, **kwargs)
        owns = True
    return Parallel(mode, dist.get_rank(), dist.get_world_size(), local_rank, device, owns)


def _device(name: str, local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` where there are GPUs (``auto`` or a bare ``cuda``), else ``name``."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        name = "cuda"
    try:
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise UserError(f"device {name!r} is not usable here: {err}") from None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


# --------------------------------------------------------------------------- checkpoints
# A parallel run's checkpoint is a directory ``step-N.dcp``: the DCP files of model and
# optimizer (each rank writes its shards) plus ``meta.pt`` from rank 0 (step, RNG states, data
# position, config). It is written as ``.step-N.dcp.tmp`` and renamed by rank 0 once every rank
# has finished, so a directory with the final name is complete.


def checkpoint_dirs(folder: Path) -> list[Path]:
    """Complete DCP checkpoints in ``folder``, newest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"step-*{DCP_SUFFIX}") if (p / META_FILE).is_file()]
    return sorted(found, reverse=True)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": model_state, "optim": optim_state}


def save_dcp(
    par: Parallel,
    folder: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    meta: dict[str, Any],
    keep: int,
) -> Path:
    """Write ``folder/step-N.dcp`` from every rank (a collective); keep the newest ``keep``."""
    import torch.distributed.checkpoint as dcp

    final = folder / f"step-{step:08d}{DCP_SUFFIX}"
    tmp = folder / f".{final.name}.tmp"
    if par.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    par.barrier()
    dcp.save(_state(model, optimizer), checkpoint_id=tmp)
    if par.is_main:
        torch.save({**meta, "world_size": par.world, "parallel": par.mode}, tmp / META_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        if keep:
            for old in checkpoint_dirs(folder)[keep:]:
                shutil.rmtree(old, ignore_errors=True)
    par.barrier()
    return final


def load_meta(path: Path) -> dict[str, Any]:
    """The ``meta.pt`` of a DCP checkpoint (tensors and plain values only), once the rest of
    the checkpoint has been checked (:func:`verify_dcp`); ValueError if anything is missing,
    unreadable, not ours, or would run code."""
    from optarena.checkpoints import check_payload

    try:
        meta = torch.load(path / META_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"no {META_FILE} (an incomplete checkpoint)") from None
    except Exception as err:
        raise ValueError(f"unreadable {META_FILE} ({type(err).__name__})") from None
    verify_dcp(path)
    return check_payload(meta)


def load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load a DCP checkpoint into ``model`` and ``optimizer`` whatever their sharding (FSDP2 at
    any world size, DDP, or a plain module in one process). Nothing in the checkpoint is
    unpickled beyond DCP's metadata classes and plain values (see below); a checkpoint that
    holds anything else is refused with :class:`~optarena.errors.UserError`."""
    from torch.distributed.checkpoint.state_dict import set_state_dict

    state = _state(model, optimizer)
    _read_dcp(path, state)
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
    )


def load_dcp_model(path: Path, model: nn.Module) -> None:
    """Only the model of a DCP checkpoint, into a plain ``model`` in this one process (no
    process group): the full tensors, whatever world size and sharding (DDP, FSDP2) wrote them;
    the optimizer's state is not read. Checked and read as by :func:`load_dcp`; a checkpoint
    whose weights do not fit ``model`` (missing, extra-sized) is a ``RuntimeError`` naming the
    first problem."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    state = {"model": get_model_state_dict(model)}
    try:
        _read_dcp(path, state)
    except CheckpointException as err:  # a BaseException: one line of what failed
        failures = getattr(err, "failures", {}) or {}
        first = next(iter(failures.values()), err)
        raise RuntimeError(str(first).strip().splitlines()[0]) from None
    set_model_state_dict(model, state["model"])


def _read_dcp(path: Path, state: dict) -> None:
    """Fill ``state`` from the DCP checkpoint at ``path``: its files checked first
    (:func:`verify_dcp`; a folder optarena did not write is a one-line ``UserError``), then read
    through the safe reader and planner below."""
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # one process without a group: DCP says it assumes so
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single")
        try:
            verify_dcp(path)
        except ValueError as err:
            raise UserError(f"checkpoint {path}: {err}; it was not written by optarena") from None
        dcp.load(state, storage_reader=_safe_reader(path), planner=_safe_planner())


# --------------------------------------------------------------------------- loading safely
# DCP reads ``.metadata`` with ``pickle.load`` and non-tensor entries (the optimizer's
# hyperparameters) with ``torch.load(weights_only=False)``: either would run code from a crafted
# checkpoint. A checkpoint folder is data (docs/trust.md), so both go through restricted readers:
# the metadata through an unpickler that builds DCP's own metadata classes and nothing else,
# the entries through ``torch.load(weights_only=True)``.

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only the classes of a DCP ``.metadata`` file (and torch dtypes)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


def read_dcp_metadata(path: Path) -> Any:
    """A DCP checkpoint's ``.metadata``, read without running anything from it; ValueError
    when it holds anything but DCP's metadata, or points at files outside ``path``."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        with (path / ".metadata").open("rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except FileNotFoundError:
        raise ValueError("no .metadata (an incomplete checkpoint)") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as err:
        raise ValueError(f"refused .metadata: {err}") from None
    if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
        raise ValueError("refused .metadata: not a checkpoint's metadata")
    for info in metadata.storage_data.values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"refused .metadata: data file {name!r} is not inside the checkpoint")
        if getattr(info, "transform_descriptors", None):
            raise ValueError("refused .metadata: transformed (compressed) data is not supported")
    return metadata


def verify_dcp(path: Path) -> None:
    """Check a DCP checkpoint without running anything from it: its metadata
    (:func:`read_dcp_metadata`) and every non-tensor entry, read with ``weights_only=True``
    (tensors are read that way by DCP itself). ValueError says what was refused."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    metadata = read_dcp_metadata(path)
    for index, info in metadata.storage_data.items():
        if not isinstance(metadata.state_dict_metadata.get(index.fqn), BytesStorageMetadata):
            continue
        try:
            with (path / info.relative_path).open("rb") as fh:
                fh.seek(info.offset)
                data = fh.read(info.length)
            torch.load(io.BytesIO(data), weights_only=True)
        except Exception as err:
            raise ValueError(f"refused entry {index.fqn!r}: {_why_refused(err)}") from None


def _why_refused(err: Exception) -> str:
    """The line of torch's weights-only error that names what was refused."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for line in lines:
        if "GLOBAL" in line or "Unsupported" in line:
            return line.removeprefix("WeightsUnpickler error:").strip()
    return lines[0] if lines else type(err).__name__


def _safe_reader(path: Path) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata = read_dcp_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(path)


def _safe_planner() -> Any:
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class SafePlanner(DefaultLoadPlanner):
        """Non-tensor entries are read with ``weights_only=True`` first: only plain values
        (numbers, strings, tuples, dicts, tensors) get as far as DCP's own reader."""

        def load_bytes(self, read_item: Any, value: Any) -> None:
            data = value.read()
            try:
                torch.load(io.BytesIO(data), weights_only=True)
            except Exception as err:
                fqn = read_item.dest_index.fqn
                raise ValueError(f"refused entry {fqn!r}: {_why_refused(err)}") from None
            super().load_bytes(read_item, io.BytesIO(data))

    return SafePlanner()


def load_full(
    model_state: dict[str, Tensor],
    optim_state: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
) -> None:
    """Load a single-process checkpoint (full tensors; the optimizer's state keyed by parameter
    index) into an FSDP2 model and its optimizer: each rank keeps its rows of every sharded
    tensor, replicated block statistics stay whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    by_name = {
        "state": {order[i]: s for i, s in optim_state["state"].items()},
        "param_groups": [
            {**g, "params": [order[i] for i in g["params"]]} for g in optim_state["param_groups"]
        ],
    }
    set_state_dict(
        model,
        optimizer,
        model_state_dict=model_state,
        optim_state_dict=by_name,
        options=StateDictOptions(full_state_dict=True),
    )


__all__ = [
    "MODES",
    "Parallel",
    "checkpoint_dirs",
    "clip_grad_norm_",
    "launched_world",
    "load_dcp",
    "load_dcp_model",
    "load_full",
    "load_meta",
    "read_dcp_metadata",
    "save_dcp",
    "setup",
    "verify_dcp",
]
