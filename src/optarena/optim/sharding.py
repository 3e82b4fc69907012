"""Every optimizer on FSDP2 (``fully_shard``) parameters: DTensors sharded on dim 0.

FSDP2 gives each rank a contiguous run of rows of every parameter (``torch.chunk`` sizes, so the
last ranks may hold fewer rows or none). Elementwise rules (Adam, Lion, Signum, Sophia, SGD) are
local: they run on ``to_local()`` views and their state stays sharded like the parameter
(DTensor state, so ``torch.distributed.checkpoint`` can reshard it to another world size).

Block statistics are not local: Adalayer's per-tensor mean, Adam-mini's heads (which a shard
boundary may cut when head counts do not divide evenly, e.g. 3 key/value heads on 2 ranks),
Adafactor's row and column means, classic Adafactor's RMS terms. Here every rank computes the
*partial sums* of the blocks its rows overlap, scattered into a vector of the global statistic's
shape (zeros elsewhere); all partial sums of one step go into ONE float64 buffer and one
``all_reduce`` per process group (the mesh dim that shards the tensor: never the world size,
so HSDP across nodes counts each shard once); the sums are divided by the global block sizes.
Partial sums are per-row sums in the gradient's dtype added in float64 (``blocks.
sharding_invariant_sum``), and one process computes its statistics the same way, so a sharded
run gets the float32 statistic one process gets, bit for bit in practice. The result is
identical on every rank, so the small block-vector state (``exp_avg_sq`` of shape
``(num_blocks,)``, Adafactor's factors) is kept replicated and never diverges. The buffer's
layout depends only on global shapes and the param groups, so every rank issues the same
collective even when it holds no row of a tensor: no hang.

Only classic Adafactor needs a second collective: it clips its update by the update's global RMS,
which is known only after the first reduction.

Not supported (a clear error, never a silent mis-cut): sharding on any dim but 0, several mesh
dims sharding one tensor (use HSDP: ``Replicate`` on the replica dim, ``Shard(0)`` on the other),
and FSDP1 / ZeRO flattened shards, whose 1-D slices have lost the rows and heads that block
statistics are defined on.
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from optarena.optim.blocks import BlockLayout, block_means, block_sums, sharding_invariant_sum

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from optarena.optim.base import RuleOptimizer

# The key under which a sharded parameter's :class:`LocalShard` travels in the per-step state view
# handed to a rule (never stored in the optimizer's state).
SHARD_KEY = "__shard__"


def is_dtensor(t: object) -> bool:
    """``isinstance(t, DTensor)`` without importing ``torch.distributed.tensor`` (about a second
    of start-up): if nobody imported it, no DTensor exists."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view: in-place updates reach the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def shard_of(state: dict[str, Any]) -> LocalShard | None:
    """The :class:`LocalShard` of the parameter whose state view this is, if it is sharded."""
    return state.get(SHARD_KEY)


def is_flattened_shard(p: Tensor) -> bool:
    """FSDP1's ``FlatParameter`` and the parameters flattened into one (``use_orig_params``)."""
    return bool(getattr(p, "_fsdp_flattened", False)) or type(p).__name__ == "FlatParameter"


# --------------------------------------------------------------------------- geometry


@dataclass
class LocalShard:
    """Rows ``[offset, offset + length)`` along dim 0 of a tensor of ``shape``, held by this rank,
    and the global sums its rule asked for in the current step."""

    shape: tuple[int, ...]
    offset: int
    length: int
    group: Any = None  # the process group that holds the other shards
    _requests: list[_Request] = field(default_factory=list, repr=False)
    _stats: dict[str, Tensor] = field(default_factory=dict, repr=False)
    _rows: dict[BlockLayout, list[tuple[int, int, Tensor]]] = field(
        default_factory=dict, repr=False
    )

    # ----------------------------------------------------------------- requests

    def request_sum(self, name: str, x: Tensor, keep: Iterable[int] = ()) -> None:
        """Ask for the mean of ``x`` over every axis not in ``keep`` across all shards (``x`` is
        this rank's rows of a tensor of the parameter's global shape). The result has the
        global shape with averaged axes kept as 1, in ``x``'s dtype."""
        keep = {k % len(self.shape) for k in keep} if self.shape else set()
        reduce = [d for d in range(x.dim()) if d not in keep]
        partial = sharding_invariant_sum(x, reduce)
        shape = tuple(s if d in keep else 1 for d, s in enumerate(self.shape))
        if 0 in keep:  # this rank's rows of the statistic; other ranks fill the rest
            full = partial.new_zeros(shape)
            full.narrow(0, self.offset, self.length).copy_(partial)
            partial = full
        count = math.prod(self.shape[d] for d in reduce)
        dtype = x.dtype

        def finish(total: Tensor) -> Tensor:
            return (total / count).to(dtype).reshape(shape)

        self._requests.append(_Request(self, name, partial.reshape(-1), finish))

    def request_blocks(self, name: str, x: Tensor, layout: BlockLayout) -> None:
        """Ask for the mean of ``x`` in every block of ``layout`` (``x``: this rank's rows of a
        tensor such as ``g²``), flattened to ``(num_blocks,)`` like ``block_mean_square``."""
        dtype = x.dtype

        def finish(total: Tensor) -> Tensor:
            return block_means(total, layout, dtype)

        partial = block_sums(x, layout, self.offset)
        self._requests.append(_Request(self, name, partial, finish))

    def mean(self, name: str) -> Tensor:
        """A statistic requested this step, after the reduction (global, same on all ranks)."""
        try:
            return self._stats[name]
        except KeyError:
            raise RuntimeError(
                f"sharded statistic {name!r} was not requested before the reduction"
            ) from None

    def reset(self) -> None:
        self._requests.clear()
        self._stats.clear()

    # ----------------------------------------------------------------- local views

    def rows(self, t: Tensor) -> Tensor:
        """This rank's rows of a replicated tensor whose dim 0 is the parameter's dim 0."""
        return t.narrow(0, self.offset, self.length)

    def blockwise(
        self, fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, stat: Tensor, layout: BlockLayout
    ) -> Tensor:
        """``blocks.blockwise`` on this rank's rows: ``fn(x_block, stat_block)`` with each
        block's (global) statistic broadcast over the local entries of that block."""
        out = torch.empty_like(x)
        offset = 0
        for seg, rows in zip(layout.segments, self._row_blocks(layout), strict=True):
            v = stat[offset : offset + seg.num_blocks]
            offset += seg.num_blocks
            if seg.dim == 0:
                for start, size, ids in rows:
                    chunk = x.narrow(0, start, size)
                    per_row = v[ids].reshape((size,) + (1,) * (x.dim() - 1))
                    out.narrow(0, start, size).copy_(fn(chunk, per_row))
            else:
                chunk = x.narrow(seg.dim, seg.start, seg.size)
                view = chunk.reshape(-1, seg.num_blocks, seg.shape[2], seg.shape[3])
                res = fn(view, v.reshape(1, -1, 1, 1)).reshape(chunk.shape)
                out.narrow(seg.dim, seg.start, seg.size).copy_(res)
        return out

    def _row_blocks(self, layout: BlockLayout) -> list[list[tuple[int, int, Tensor]]]:
        """Per segment along dim 0: ``(local_start, rows, block_ids)`` of the local rows it
        covers (at most one run); segments along another dim get ``[]``."""
        cached = self._rows.get(layout)
        if cached is None:
            cached = []
            lo, hi = self.offset, self.offset + self.length
            for seg in layout.segments:
                runs: list[tuple[int, int, Tensor]] = []
                a, b = max(lo, seg.start), min(hi, seg.start + seg.size)
                if seg.dim == 0 and b > a:
                    per_block = seg.size // seg.num_blocks
                    ids = (torch.arange(a, b) - seg.start).div_(per_block, rounding_mode="floor")
                    runs.append((a - lo, b - a, ids))
                cached.append(runs)
            self._rows[layout] = cached
        return cached


@dataclass
class _Request:
    shard: LocalShard
    name: str
    partial: Tensor  # flat float64 partial sums of this rank
    finish: Callable[[Tensor], Tensor]  # the global sums -> the statistic


def describe_placement(p: DTensor) -> str:
    return f"placements {tuple(p.placements)} on a mesh of shape {tuple(p.device_mesh.shape)}"


def make_shard(p: Tensor) -> LocalShard | None:
    """The geometry of ``p``'s local rows, or ``None`` when ``p`` is whole on every rank (a plain
    tensor under DDP, a replicated DTensor)."""
    if not is_dtensor(p):
        if is_flattened_shard(p):
            raise ValueError(
                "optarena optimizers do not support FSDP1 / ZeRO flattened shards: their 1-D "
                "slices lose the rows and heads that block statistics are defined on. Shard "
                "with torch.distributed.fsdp.fully_shard (FSDP2) instead."
            )
        return None
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    placements = p.placements
    sharded = [i for i, pl in enumerate(placements) if not isinstance(pl, Replicate)]
    if not sharded:
        return None
    mesh_dim = sharded[0]
    pl = placements[mesh_dim]
    if len(sharded) > 1 or type(pl) is not Shard or pl.dim != 0:
        raise ValueError(
            "optarena optimizers support DTensor parameters sharded on dim 0 along one mesh "
            f"dim (FSDP2 fully_shard, HSDP); got {describe_placement(p)}"
        )
    local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, placements)
    group = p.device_mesh.get_group(mesh_dim)
    return LocalShard(tuple(p.shape), int(offset[0]), int(local_shape[0]), group)


# --------------------------------------------------------------------------- the reduction

AllReduce = Callable[[Tensor, Any], None]


def _all_reduce(buf: Tensor, group: Any) -> None:
    import torch.distributed as dist

    dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)


def reduce_requests(shards: Iterable[LocalShard], all_reduce: AllReduce = _all_reduce) -> int:
    """Sum every pending request of ``shards`` across their process groups, one collective per
    group, and store the means. Returns the number of collectives issued."""
    by_group: dict[Any, list[_Request]] = {}
    for shard in shards:
        for req in shard._requests:
            by_group.setdefault(req.shard.group, []).append(req)
        shard._requests = []
    for group, reqs in by_group.items():
        buf = torch.cat([r.partial for r in reqs])  # float64: sums of any order agree
        all_reduce(buf, group)
        offset = 0
        for r in reqs:
            n = r.partial.numel()
            r.shard._stats[r.name] = r.finish(buf[offset : offset + n])
            offset += n
    return len(by_group)


# --------------------------------------------------------------------------- the step


@dataclass
class _Item:
    p: Tensor
    group: dict[str, Any]
    hp: dict[str, Any]
    rule: Any
    state: dict[str, Any]
    view: dict[str, Any]
    grad: Tensor
    step: int
    dtype: torch.dtype
    shard: LocalShard | None
    u: Tensor | None = None


def state_view(state: dict[str, Any], shard: LocalShard | None) -> dict[str, Any]:
    """The state a rule sees for one sharded step: local views of DTensor entries, replicated
    entries as they are, and the shard geometry under :data:`SHARD_KEY`."""
    view = {k: local(v) for k, v in state.items()}
    if shard is not None:
        view[SHARD_KEY] = shard
    return view


def _write_back(state: dict[str, Any], view: dict[str, Any]) -> None:
    """Entries a rule (re)assigned in its view (e.g. classic Adafactor's ``lr``) go back; a
    sharded entry must be updated in place (its view *is* the shard)."""
    for key, value in view.items():
        if key == SHARD_KEY:
            continue
        old = state.get(key)
        if is_dtensor(old):
            mine = old.to_local()
            if value.shape != mine.shape or (mine.numel() and value.data_ptr() != mine.data_ptr()):
                raise RuntimeError(f"a rule replaced the sharded state {key!r}; update it in place")
        elif old is None or old is not value:
            state[key] = value


# id(p) -> (weak reference to p, group): tensors compare elementwise, so no WeakKeyDictionary
_GROUPS: dict[int, tuple[weakref.ref, Any]] = {}


def shard_group(p: Tensor) -> Any | None:
    """The process group holding the other shards of ``p`` (``None``: ``p`` is whole here);
    cached per parameter (gradient clipping asks every step)."""
    cached = _GROUPS.get(id(p))
    if cached is not None and cached[0]() is p:
        return cached[1]
    shard = make_shard(p)
    group = None if shard is None else shard.group
    _GROUPS[id(p)] = (weakref.ref(p), group)  # a stale id fails the identity check above
    return group


def shards(opt: RuleOptimizer) -> dict[int, LocalShard | None]:
    """``id(p) -> LocalShard`` for every parameter of ``opt`` (cached on the optimizer)."""
    cache: dict[int, LocalShard | None] = opt.__dict__.setdefault("_shard_cache", {})
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) not in cache:
                cache[id(p)] = make_shard(p)
    return cache


def has_dtensors(params: Iterable[Tensor]) -> bool:
    """Whether the sharded step is needed; rejects FSDP1 flattened parameters early."""
    found = False
    for p in params:
        if is_dtensor(p):
            found = True
        elif is_flattened_shard(p):
            make_shard(p)  # raises the explanation
    return found


@torch.no_grad()
def step(opt: RuleOptimizer, bs: float | None = None) -> None:
    """``RuleOptimizer.step`` for DTensor parameters: rules on local shards, block statistics
    reduced in one collective (two for classic Adafactor), replicated block state."""
    geometry = shards(opt)
    if any(g.get("fused") for g in opt.param_groups) and not opt.__dict__.get("_fused_warned"):
        opt._fused_warned = True  # type: ignore[attr-defined]
        warnings.warn(
            "fused=True is not used on FSDP2 (DTensor) parameters: they take the eager "
            "per-shard step",
            stacklevel=3,
        )
    items: list[_Item] = []
    for group in opt.param_groups:
        rule = opt.rule_of(group)
        hp = group if bs is None or "bs" not in group else {**group, "bs": bs}
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = p.grad
            if is_dtensor(p) and is_dtensor(grad) and grad.placements != p.placements:
                grad = grad.redistribute(p.device_mesh, p.placements)
            state = opt._state_for(p, group, rule)
            state["step"] += 1
            dtype = opt._dtype(p)
            g = local(grad)
            g = g if g.dtype == dtype else g.to(dtype)
            shard = geometry[id(p)]
            if shard is not None:
                shard.reset()
            view = state_view(state, shard)
            t = int(state["step"].item())
            item = _Item(p, group, hp, rule, state, view, g, t, dtype, shard)
            if shard is not None:
                rule.shard_stats(g, local(p), view, hp, item.step, opt.param_info(p))
            items.append(item)
    reduce_requests(i.shard for i in items if i.shard is not None)

    second: list[_Item] = []
    for it in items:
        info = opt.param_info(it.p)
        if it.shard is not None and getattr(it.rule, "clips_update_rms", False):
            it.u = it.rule.unclipped(it.grad, local(it.p), it.view, it.hp, it.step, info)
            it.shard.request_sum("update_sq", it.u * it.u)
            second.append(it)
            continue
        u, size = it.rule.direction(it.grad, local(it.p), it.view, it.hp, it.step, info)
        _finish(opt, it, u, size)
    if second:
        reduce_requests(i.shard for i in second if i.shard is not None)
        for it in second:
            assert it.shard is not None and it.u is not None
            u_rms = it.shard.mean("update_sq").reshape(()).sqrt()
            u, size = it.rule.finish(it.u, u_rms, it.view, it.hp)
            _finish(opt, it, u, size)


def _finish(opt: RuleOptimizer, it: _Item, u: Tensor | None, size: float) -> None:
    _write_back(it.state, it.view)
    if u is None:
        return
    info = opt.param_info(it.p)
    decay = 0.0 if info.role in it.hp["no_decay_roles"] else it.hp["weight_decay"]
    decay *= it.rule.decay_lr(it.p, it.state, it.hp)
    opt._apply(local(it.p), u, size, decay, it.dtype)


__all__ = [
    "SHARD_KEY",
    "LocalShard",
    "has_dtensors",
    "local",
    "make_shard",
    "reduce_requests",
    "shard_group",
    "shard_of",
    "state_view",
    "step",
]
