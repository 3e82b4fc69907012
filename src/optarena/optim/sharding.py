"""Every optimizer on FSDP2 (``fully_shard``) parameters: DTensors sharded on axis 0.

FSDP2 gives each rank a contiguous run of rows of every parameter (``torch.chunk`` sizes, so the
last ranks may hold fewer rows or none). The chain runs on the local rows (``to_local()``
views; elementwise state stays a DTensor sharded like its parameter, so
``torch.distributed.checkpoint`` can reshard it) with :class:`~optarena.optim.blocks.Rows` saying
which rows they are. The transforms' statistics are sums over the local entries: here they are
run stage by stage, every parameter's ``statistics`` at one position of its chain, then one
``all_reduce`` per process group adds them (the mesh dim that shards the tensor, so HSDP counts
each shard once), then every ``update`` at that position. The sums are identical on every rank,
so small state (block moments, factors) is kept replicated and never diverges; the buffers'
layout depends only on global shapes, so every rank issues the same collectives even when it
holds no row of a tensor. A transform that needs the whole tensor (``whole = True``) is given it:
the update so far is gathered, the transform runs on all of it, and each rank keeps its rows.

Not supported (a clear error, never a silent mis-cut): sharding on any axis but 0, several mesh
dims sharding one tensor (use HSDP: ``Replicate`` on the replica dim, ``Shard(0)`` on the other),
and FSDP1 / ZeRO flattened shards, whose 1-D slices have lost the rows and heads that block
statistics are defined on.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from optarena.optim.blocks import Rows
from optarena.optim.engine import Chain, ScalarCache, Scalars
from optarena.optim.transforms import Slot, Update, apply_

if TYPE_CHECKING:
    from optarena.optim.optimizer import ChainOptimizer, Plan


def is_dtensor(t: object) -> bool:
    """``isinstance(t, DTensor)`` without importing ``torch.distributed.tensor`` (a second of
    start-up): if nobody imported it, no DTensor exists."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: in-place updates reach the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def is_sharded(params: Iterable[Tensor]) -> bool:
    return any(is_dtensor(p) for p in params)


def _flattened(p: Tensor) -> bool:
    return bool(getattr(p, "_fsdp_flattened", False)) or type(p).__name__ == "FlatParameter"


def refuse_flattened(params: Iterable[Tensor]) -> None:
    """FSDP1's ``FlatParameter`` (and parameters flattened into one) are refused at once."""
    if any(_flattened(p) for p in params):
        raise ValueError(
            "optarena optimizers do not support FSDP1 / ZeRO flattened shards: their 1-D slices "
            "lose the rows and heads that block statistics are defined on. Shard with "
            "torch.distributed.fsdp.fully_shard (FSDP2) instead."
        )


def geometry(p: Tensor) -> tuple[Rows, Any]:
    """The rows of ``p`` held here and the process group holding the others (``None``: ``p``
    is whole here: a plain tensor, a replicated DTensor)."""
    if not is_dtensor(p):
        return Rows.whole(p.shape), None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = p.placements
    sharded = [i for i, pl in enumerate(placements) if not isinstance(pl, Replicate)]
    if not sharded:
        return Rows.whole(p.shape), None
    mesh_dim = sharded[0]
    pl = placements[mesh_dim]
    if len(sharded) > 1 or type(pl) is not Shard or pl.dim != 0:
        raise ValueError(
            "optarena optimizers support DTensor parameters sharded on dim 0 along one mesh dim "
            f"(FSDP2 fully_shard, HSDP); got placements {tuple(placements)} on a mesh of shape "
            f"{tuple(p.device_mesh.shape)}"
        )
    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, placements)
    rows = Rows(tuple(p.shape), int(offset[0]), int(shape[0]))
    return rows, p.device_mesh.get_group(mesh_dim)


_GROUPS: dict[int, tuple[weakref.ref, Any]] = {}


def shard_group(p: Tensor) -> Any | None:
    """The process group holding the other shards of ``p`` (``None``: whole here); cached per
    parameter (gradient clipping asks every step)."""
    cached = _GROUPS.get(id(p))
    if cached is not None and cached[0]() is p:
        return cached[1]
    group = geometry(p)[1]
    _GROUPS[id(p)] = (weakref.ref(p), group)
    return group


class Placement(Protocol):
    """Where a parameter's entries live: its rows here, the group holding the others, and this
    rank's part of a tensor laid out like it (the parameter, its gradient, its state)."""

    def rows(self, p: Tensor) -> Rows: ...

    def group(self, p: Tensor) -> Any: ...

    def local(self, t: Tensor, p: Tensor) -> Tensor: ...


class DTensorPlacement:
    """FSDP2's: DTensor parameters, DTensor state sharded alike, plain tensors replicated."""

    def rows(self, p: Tensor) -> Rows:
        return geometry(p)[0]

    def group(self, p: Tensor) -> Any:
        return shard_group(p)

    def local(self, t: Tensor, p: Tensor) -> Tensor:
        return local(t)


def local_slot(
    opt: ChainOptimizer, p: Tensor, group: dict[str, Any], plan: Plan, where: Placement
) -> Slot:
    """``p`` as the chain sees it here: its local rows, in its compute dtype."""
    grad = p.grad
    if is_dtensor(grad) and grad.placements != p.placements:
        grad = grad.redistribute(p.device_mesh, p.placements)
    dtype = opt._dtype(p)
    g = where.local(grad, p)
    g = g if g.dtype == dtype else g.to(dtype)
    if group["maximize"]:
        g = -g
    mine = where.local(p, p)
    target = mine if mine.dtype == dtype else mine.to(dtype)
    info = opt.param_info(p)
    decays = info.role.value not in group["no_decay_roles"]
    state = {k: where.local(v, p) for k, v in opt.state[p].items()}
    return Slot(target, g, state, info, where.rows(p), plan.const, decays)


# --------------------------------------------------------------------------- the staged step


@dataclass
class Staged:
    """One parameter's step in progress."""

    chain: Chain
    slot: Slot
    scalars: Scalars
    group: Any  # the process group of the other shards, None if whole here
    param: Tensor  # the tensor written at the end (the local view)
    source: Tensor | None = None  # the parameter (a DTensor on FSDP2), for gathers
    x: Update | None = None


class Collectives(Protocol):
    def all_reduce(self, buf: Tensor, group: Any) -> None:
        """Sum ``buf`` over the ranks of ``group`` in place."""
        ...

    def gather(self, item: Staged, rows: Tensor) -> Tensor:
        """The whole tensor whose local rows are ``rows``."""
        ...


class TorchCollectives:
    def all_reduce(self, buf: Tensor, group: Any) -> None:
        import torch.distributed as dist

        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)

    def gather(self, item: Staged, rows: Tensor) -> Tensor:
        from torch.distributed.tensor import DTensor

        p = item.source
        assert p is not None
        whole = DTensor.from_local(
            rows, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
        )
        return whole.full_tensor()


def reduce_stats(items: Sequence[Staged], stats: list[dict[str, Tensor]], comm: Collectives) -> int:
    """Add every item's statistics over its shards, one collective per process group (float64
    buffers: sums of any order agree). Returns the number of collectives."""
    by_group: dict[Any, list[Tensor]] = {}
    for item, st in zip(items, stats, strict=True):
        if item.group is not None and st:
            by_group.setdefault(item.group, []).extend(st.values())
    for group, tensors in by_group.items():
        buf = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
        comm.all_reduce(buf, group)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(buf[offset : offset + n].view(t.shape))
            offset += n
    return len(by_group)


def run_staged(items: Sequence[Staged], comm: Collectives) -> None:
    """Every item's chain, position by position, statistics added over the shards between."""
    for item in items:
        item.x = Update(item.slot.g)
    depth = max((len(it.chain.transforms) for it in items), default=0)
    for i in range(depth):
        live = [it for it in items if i < len(it.chain.transforms)]
        whole = [it for it in live if it.chain.transforms[i].whole and it.group is not None]
        for it in whole:
            _run_whole(it, i, comm)
        rest = [it for it in live if not (it.chain.transforms[i].whole and it.group is not None)]
        stats = [it.chain.transforms[i].statistics(it.x, it.slot, it.scalars[i]) for it in rest]
        reduce_stats(rest, stats, comm)
        for it, st in zip(rest, stats, strict=True):
            it.x = it.chain.transforms[i].update(it.x, it.slot, it.scalars[i], st)
    for it in items:
        apply_(it.slot.p, it.x)
        if it.slot.p is not it.param:
            it.param.copy_(it.slot.p)


def _run_whole(it: Staged, i: int, comm: Collectives) -> None:
    """Transform ``i`` on the whole tensor (the update so far, the parameter and the gradient
    gathered); this rank keeps its rows of the result."""
    slot, x = it.slot, it.x
    assert x is not None
    whole = Slot(
        comm.gather(it, slot.p.contiguous()),
        comm.gather(it, slot.g.contiguous()),
        slot.state,
        slot.info,
        Rows.whole(slot.rows.shape),
        slot.const,
        slot.decays,
    )
    start = Update(comm.gather(it, slot.direction(x).contiguous()), x.scale, None, 0.0)
    t = it.chain.transforms[i]
    done = t.update(start, whole, it.scalars[i], t.statistics(start, whole, it.scalars[i]))
    # the rows of the result, its scale kept as a factor (rounded as one process rounds it)
    mine = slot.rows.rows(whole.direction(done))
    it.x = Update(mine, done.scale, None, x.decay + done.decay)


@torch.no_grad()
def step(
    opt: ChainOptimizer,
    jobs: Sequence[tuple[dict, Any, list[Tensor]]],
    where: Placement | None = None,
    comm: Collectives | None = None,
) -> None:
    """``ChainOptimizer.step`` for groups of sharded parameters (always eager)."""
    where = where or DTensorPlacement()
    items = []
    for group, hp, params in jobs:
        plan = opt._plan(group)
        states = [opt.state_for(p, group, plan) for p in params]
        scalars = ScalarCache(plan.chain, hp)
        for p, t in zip(params, opt._counter.advance(states), strict=True):
            slot = local_slot(opt, p, group, plan, where)
            items.append(Staged(plan.chain, slot, scalars(t), where.group(p), where.local(p, p), p))
    run_staged(items, comm or TorchCollectives())


__all__ = [
    "Collectives",
    "Staged",
    "geometry",
    "is_dtensor",
    "is_sharded",
    "local",
    "local_slot",
    "reduce_stats",
    "refuse_flattened",
    "run_staged",
    "shard_group",
    "step",
]
