"""Block layouts: how a parameter is cut into the blocks that share one second-moment value.

Adam, Adalayer and Adam-mini are one algorithm: ``v_b = β2 v_b + (1-β2) mean_{i∈b} g_i²`` with a
different choice of blocks ``b``. A :class:`BlockLayout` is that choice for one tensor:

* ``element`` — every entry its own block (Adam);
* ``tensor`` — the whole tensor one block (Adalayer, Adam-mini's norms); per expert for a fused
  mixture-of-experts tensor;
* ``rows`` — one block per output neuron / token (Adam-mini's value, MLP, embedding, output);
* ``heads`` — one block per attention head (Adam-mini's query and key);
* ``mixed`` — a fused tensor whose parts are cut differently (QKV).

A layout is a tuple of :class:`Segment`\\ s, each a slice of the tensor along one axis viewed as
``(batch, lead, groups, per, trail)``: one block per ``(batch, group)`` pair. ``batch`` spans the
stacked experts of a fused MoE tensor (axis 0), ``lead`` the other axes before the slice's axis,
``trail`` those after it.

:class:`Rows` is where a tensor's entries live: all of it, or (on FSDP2) the rows
``[offset, offset + length)`` of axis 0 held by this rank. Its block sums of the local entries,
added over every rank, are the whole tensor's; its broadcast of block values covers exactly the
local entries. One process is the one-shard case, so the same code serves both.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from optarena.optim.roles import ParamInfo, Role


@dataclass(frozen=True)
class Segment:
    """``x.narrow(dim, start, size)`` viewed as ``(batch, lead, groups, per, trail)``."""

    dim: int
    start: int
    size: int
    groups: int
    batch: int = 1  # stacked experts along axis 0 (``batched``), else 1
    lead: int = 1
    trail: int = 1
    batched: bool = False

    @property
    def num_blocks(self) -> int:
        return self.batch * self.groups

    @property
    def block_numel(self) -> int:
        return self.lead * (self.size // self.groups) * self.trail

    def view(self, batch: int, lead: int) -> tuple[int, int, int, int, int]:
        return (batch, lead, self.groups, self.size // self.groups, self.trail)


@dataclass(frozen=True)
class BlockLayout:
    """How one tensor is cut into second-moment blocks (``segments == ()``: per element)."""

    kind: str
    segments: tuple[Segment, ...] = ()

    @property
    def elementwise(self) -> bool:
        return len(self.segments) == 0  # (``not tuple`` is not traceable by dynamo)

    def num_blocks(self, shape: tuple[int, ...] | torch.Size) -> int:
        if self.elementwise:
            return math.prod(shape)
        return sum(s.num_blocks for s in self.segments)

    def describe(self, shape: tuple[int, ...] | torch.Size) -> str:
        return f"{self.kind} ({self.num_blocks(shape)})"


# --------------------------------------------------------------------------- constructors


def _segment(
    shape: tuple[int, ...], dim: int, start: int, size: int, groups: int, batched: bool
) -> Segment:
    if size % groups:
        raise ValueError(f"cannot split extent {size} of axis {dim} into {groups} equal blocks")
    first = 1 if batched else 0
    return Segment(
        dim,
        start,
        size,
        groups,
        batch=math.prod(shape[:first]),
        lead=math.prod(shape[first:dim]),
        trail=math.prod(shape[dim + 1 :]),
        batched=batched,
    )


def element_layout() -> BlockLayout:
    return BlockLayout("element")


def tensor_layout(shape: tuple[int, ...], experts: bool = False) -> BlockLayout:
    """One block for the tensor, or one per expert of a fused MoE tensor."""
    if experts and len(shape) >= 2:
        return BlockLayout("tensor", (_segment(shape, 1, 0, shape[1], 1, True),))
    shape = shape or (1,)
    return BlockLayout("tensor", (_segment(shape, 0, 0, shape[0], 1, False),))


def rows_layout(shape: tuple[int, ...], out_dim: int = 0, experts: bool = False) -> BlockLayout:
    """One block per index of ``out_dim`` (a row of ``nn.Linear``, a column of ``Conv1D``), per
    expert of a fused MoE tensor."""
    if len(shape) < 2 + experts:
        return tensor_layout(shape)
    n = shape[out_dim]
    return BlockLayout("rows", (_segment(shape, out_dim, 0, n, n, experts),))


def heads_layout(
    shape: tuple[int, ...], heads: int, out_dim: int = 0, experts: bool = False
) -> BlockLayout:
    """One block per attention head laid out along ``out_dim``."""
    if len(shape) < 2 + experts:
        return tensor_layout(shape)
    n = shape[out_dim]
    return BlockLayout("heads", (_segment(shape, out_dim, 0, n, heads, experts),))


def split_layout(shape: tuple[int, ...], out_dim: int, parts: list[tuple[int, int]]) -> BlockLayout:
    """Consecutive slices along ``out_dim`` of sizes ``parts[i][0]``, each cut into
    ``parts[i][1]`` blocks (1 = the slice is one block, size = one block per neuron)."""
    segments, start = [], 0
    for size, groups in parts:
        segments.append(_segment(shape, out_dim, start, size, groups, False))
        start += size
    if start != shape[out_dim]:
        raise ValueError(f"fused parts cover {start} of {shape[out_dim]} along axis {out_dim}")
    return BlockLayout("mixed", tuple(segments))


# --------------------------------------------------------------------------- where entries live


STREAMS = 8  # runs of a long block summed side by side in a compiled step
MIN_RUN = 1024  # entries of one run (4 KiB of float32: a page each)


def long_block_sums(x: Tensor) -> Tensor:
    """``x.sum(1)`` for a ``(blocks, entries)`` view. In a compiled step a block of at least
    ``STREAMS * MIN_RUN`` entries is cut into ``STREAMS`` equal runs that are added entry
    by entry before the sum: one loop reads ``STREAMS`` places of memory at a time, where a single
    read-only stream runs at well under the memory's rate on one core (the hardware fetches
    ahead on each stream). Eagerly the runs would be temporaries: one ``sum``."""
    n = x.shape[1]
    if not torch.compiler.is_compiling() or n < STREAMS * MIN_RUN or n % STREAMS:
        return x.sum(1)
    runs = x.view(x.shape[0], STREAMS, n // STREAMS).unbind(1)
    total = runs[0]
    for run in runs[1:]:
        total = total + run
    return total.sum(1)


def entry_sum(x: Tensor) -> Tensor:
    """The sum of all of ``x``'s entries, as :func:`long_block_sums` sums one block."""
    return long_block_sums(x.reshape(1, -1))[0]


@dataclass(frozen=True)
class Rows:
    """The entries of a tensor of ``shape`` held here: rows ``[offset, offset + length)`` of
    axis 0 (all of them on one process)."""

    shape: tuple[int, ...]
    offset: int
    length: int

    @classmethod
    def whole(cls, shape: tuple[int, ...] | torch.Size) -> Rows:
        shape = tuple(shape)
        return cls(shape, 0, shape[0] if shape else 1)

    @property
    def is_whole(self) -> bool:
        return self.offset == 0 and self.length == (self.shape[0] if self.shape else 1)

    @property
    def numel(self) -> int:
        """Entries of the whole tensor (global counts divide the sums of every shard)."""
        return math.prod(self.shape)

    def rows(self, t: Tensor) -> Tensor:
        """This shard's rows of ``t`` when its axis 0 is the parameter's axis 0 (a tensor of
        extent 1 there broadcasts over every row and is returned as it is)."""
        if self.is_whole or t.dim() == 0 or t.shape[0] != (self.shape[0] if self.shape else 1):
            return t
        return t.narrow(0, self.offset, self.length)

    def scatter(self, local: Tensor) -> Tensor:
        """A tensor of local rows placed in zeros of the global extent (sums add up)."""
        if self.is_whole:
            return local
        out = local.new_zeros((self.shape[0] if self.shape else 1, *local.shape[1:]))
        out.narrow(0, self.offset, self.length).copy_(local)
        return out

    # ----------------------------------------------------------------- block statistics

    def block_sums(self, x: Tensor, layout: BlockLayout) -> Tensor:
        """Sums of the local entries of ``x`` in every block, ``(num_blocks,)``; blocks this
        shard does not reach get 0, so the sums of all shards are the whole tensor's."""
        x = x.reshape(self.length, 1) if x.dim() < 2 else x
        sums = [self._segment_sums(x, s) for s in layout.segments]
        return sums[0] if len(sums) == 1 else torch.cat(sums)

    def _segment_sums(self, x: Tensor, s: Segment) -> Tensor:
        if s.dim == 0:
            return self._row_block_sums(x, s)
        chunk = x.narrow(s.dim, s.start, s.size)
        if s.batched:  # this shard's experts fill their part of the (batch, groups) sums
            local = chunk.reshape(s.view(self.length, s.lead)).sum((1, 3, 4))
            return self.scatter(local).reshape(-1)
        lead = chunk.numel() // (s.size * s.trail)  # axis 0 is among the reduced ones
        return chunk.reshape(s.view(1, lead)).sum((0, 1, 3, 4))

    def _row_block_sums(self, x: Tensor, s: Segment) -> Tensor:
        """Blocks that are runs of ``per`` rows of axis 0 (rows, heads, fused parts)."""
        if self.is_whole:
            return long_block_sums(x.narrow(0, s.start, s.size).reshape(s.groups, -1))
        per = s.size // s.groups
        a, b = max(self.offset, s.start), min(self.offset + self.length, s.start + s.size)
        out = x.new_zeros(s.groups)
        if b > a:
            rows = x.narrow(0, a - self.offset, b - a).reshape(b - a, -1).sum(1)
            first, last = a - s.start, b - s.start
            if first % per == 0 and last % per == 0:
                out[first // per : last // per] = rows.view(-1, per).sum(1)
            else:  # a shard boundary cuts a block
                ids = torch.arange(first, last, device=x.device) // per
                out.index_add_(0, ids, rows)
        return out

    def block_means(self, sums: Tensor, layout: BlockLayout) -> Tensor:
        """Global block sums divided by the entries of each block."""
        sizes = [s.block_numel for s in layout.segments]
        if len(set(sizes)) == 1:
            return sums / sizes[0]
        per_block = [torch.full((s.num_blocks,), float(s.block_numel)) for s in layout.segments]
        return sums / torch.cat(per_block).to(sums)

    # ----------------------------------------------------------------- broadcasting

    def per_block(self, x: Tensor, values: Tensor, layout: BlockLayout) -> tuple[Tensor, Tensor]:
        """``(x', v')`` such that ``x' op v'`` applies each block's value to its local entries:
        views of ``x`` and ``values`` that broadcast where one segment tiles the local tensor,
        else ``x`` and the values expanded to its shape."""
        segs = layout.segments
        if len(segs) == 1 and x.is_contiguous():
            s = segs[0]
            if s.dim == 0 and self.is_whole and s.size == self.length:
                # x keeps its shape and each row gets its block's value: a (blocks, entries)
                # view of x would send inductor's update loop through a gather indexed by
                # nested modulos (a scalar loop) when a block spans several rows (heads)
                x = x.reshape(1) if x.dim() == 0 else x
                if s.groups == 1:  # the whole tensor one block: one value for every entry
                    return x, values.reshape((1,) * x.dim())
                per = s.size // s.groups
                v = values if per == 1 else values.repeat_interleave(per)
                return x, v.reshape((self.length,) + (1,) * (x.dim() - 1))
            if s.dim > 0 and s.start == 0 and s.size == x.shape[s.dim]:
                view, v = self._broadcast(s, x, values)
                return x.view(view), v
        return x, self.expand(values, layout, x)

    def _broadcast(self, s: Segment, chunk: Tensor, v: Tensor) -> tuple[tuple[int, ...], Tensor]:
        """``chunk`` (a segment's slice along ``s.dim > 0`` of local rows) as a shape
        ``(batch, lead, groups, per, trail)``, and the segment's values ``v`` shaped to broadcast
        against it: per local expert where ``batched``, else with axis 0 among ``lead``."""
        if s.batched:
            stat = self.rows(v.view(s.batch, s.groups)).reshape(self.length, 1, s.groups, 1, 1)
            return s.view(self.length, s.lead), stat
        return s.view(1, chunk.numel() // (s.size * s.trail)), v.reshape(1, 1, s.groups, 1, 1)

    def expand(self, values: Tensor, layout: BlockLayout, like: Tensor) -> Tensor:
        """Each block's value at every local entry, in the shape of ``like``."""
        like2 = like.reshape(self.length, 1) if like.dim() < 2 else like
        out = torch.empty(like2.shape, dtype=values.dtype, device=like.device)
        offset = 0
        for s in layout.segments:
            v = values[offset : offset + s.num_blocks]
            offset += s.num_blocks
            if s.dim == 0:
                a, b = max(self.offset, s.start), min(self.offset + self.length, s.start + s.size)
                if b > a:
                    ids = torch.arange(a - s.start, b - s.start, device=like.device)
                    rows = v[ids // (s.size // s.groups)]
                    out.narrow(0, a - self.offset, b - a).copy_(
                        rows.reshape((b - a,) + (1,) * (like2.dim() - 1))
                    )
                continue
            chunk = out.narrow(s.dim, s.start, s.size)
            view, stat = self._broadcast(s, chunk, v)
            chunk.copy_(stat.expand(view).reshape(chunk.shape))
        return out.reshape(like.shape)


def blockwise(
    fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, values: Tensor, layout: BlockLayout
) -> Tensor:
    """``fn(x_block, value)`` for every block of a whole tensor, in ``x``'s shape."""
    a, b = Rows.whole(x.shape).per_block(x, values, layout)
    return fn(a, b).reshape(x.shape)


def block_mean_square(g: Tensor, layout: BlockLayout) -> Tensor:
    """Mean of ``g²`` within each block of a whole tensor, ``(num_blocks,)`` (``g²`` per
    element)."""
    if layout.elementwise:
        return g * g
    rows = Rows.whole(g.shape)
    return rows.block_means(rows.block_sums(g * g, layout), layout)


# --------------------------------------------------------------------------- policies
# A policy maps the structure of a parameter to the blocks one optimizer uses for it.


def adam_mini_layout(info: ParamInfo, single_block_value: bool = False) -> BlockLayout:
    """Adam-mini v1.1.1: q/k per head, v/o/MLP/embedding/output per row, rest one block; a
    fused MoE tensor per expert and per row. Biases get the per-element layout: Adam-mini
    updates them with plain elementwise Adam."""
    shape, role, experts = info.shape, info.role, bool(info.experts)
    if role is Role.BIAS:
        return element_layout()
    if len(shape) < 2:
        return tensor_layout(shape)
    if role in (Role.Q, Role.K):
        return heads_layout(shape, info.heads or 1, info.out_dim, experts)
    if role is Role.V and single_block_value:
        return tensor_layout(shape, experts)
    if role in (Role.V, Role.O, Role.MLP, Role.EMBEDDING, Role.OUTPUT):
        return rows_layout(shape, info.out_dim, experts)
    if role is Role.QKV and info.parts:
        parts = []
        for p in info.parts:
            if p.role in (Role.Q, Role.K):
                parts.append((p.size, p.heads or 1))
            elif p.role is Role.V and single_block_value:
                parts.append((p.size, 1))
            else:
                parts.append((p.size, p.size))
        return split_layout(shape, info.out_dim, parts)
    return tensor_layout(shape, experts)


def adalayer_layout(
    info: ParamInfo, split_qkv: bool = True, per_row_output: bool = True
) -> BlockLayout:
    """Adalayer (Zhao et al.): one block per tensor (per expert of a fused MoE tensor), fused
    QKV split into its Q, K and V blocks, and one block per row (output token) of the last
    layer. A tied embedding table *is* the last layer, so it is cut per row too."""
    shape, role = info.shape, info.role
    last_layer = role is Role.OUTPUT or (role is Role.EMBEDDING and info.tied)
    if per_row_output and last_layer and len(shape) >= 2:
        return rows_layout(shape, info.out_dim)
    if split_qkv and role is Role.QKV and info.parts and len(shape) >= 2:
        return split_layout(shape, info.out_dim, [(p.size, 1) for p in info.parts])
    return tensor_layout(shape, bool(info.experts))
