"""Block layouts: how a parameter is cut into the blocks that share one second-moment value.

Adam, Adalayer and Adam-mini are one algorithm: ``v_b = β2 v_b + (1-β2) mean_{i∈b} g_i²`` with a
different choice of blocks ``b``. A :class:`BlockLayout` is that choice for one tensor:

* ``element`` — every entry its own block (Adam);
* ``tensor`` — the whole tensor one block (Adalayer, Adam-mini's norms);
* ``rows`` — one block per output neuron / token (Adam-mini's value, MLP, embedding, output);
* ``heads`` — one block per attention head (Adam-mini's query and key);
* ``mixed`` — a fused tensor whose parts are cut differently (QKV).

A layout is a tuple of :class:`Segment`\\ s: a slice of the tensor along one axis, reshaped so that
each block is a set of reduced axes. The block statistic of a segment is
``g.narrow(dim, start, size).reshape(shape).square().mean(reduce)``. Policies at the bottom of
this module turn a :class:`~optarena.optim.roles.ParamInfo` into the layout each optimizer uses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor

from optarena.optim.roles import ParamInfo, Role


@dataclass(frozen=True)
class Segment:
    """``x.narrow(dim, start, size).reshape(shape)``; blocks are reduced over ``reduce`` axes."""

    dim: int
    start: int
    size: int
    shape: tuple[int, ...]
    reduce: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        kept = [s for i, s in enumerate(self.shape) if i not in self.reduce]
        return math.prod(kept)

    @property
    def stat_shape(self) -> tuple[int, ...]:
        """Shape of the block statistic with reduced axes kept (for broadcasting)."""
        return tuple(1 if i in self.reduce else s for i, s in enumerate(self.shape))


@dataclass(frozen=True)
class BlockLayout:
    """How one tensor is cut into second-moment blocks (``segments == ()`` means per element)."""

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


def element_layout() -> BlockLayout:
    return BlockLayout("element")


def _axis_segment(
    shape: tuple[int, ...], dim: int, start: int, size: int, groups: int, per: str
) -> Segment:
    """A slice along ``dim`` split into ``groups`` blocks along that axis (rows or heads)."""
    before = math.prod(shape[:dim])
    after = math.prod(shape[dim + 1 :])
    if size % groups:
        raise ValueError(f"cannot split extent {size} into {groups} equal {per}")
    view = (before, groups, size // groups, after)
    return Segment(dim, start, size, view, (0, 2, 3))


def tensor_layout(shape: tuple[int, ...]) -> BlockLayout:
    extent = shape[0] if shape else 1
    return BlockLayout("tensor", (Segment(0, 0, extent, (math.prod(shape),), (0,)),))


def rows_layout(shape: tuple[int, ...], out_dim: int = 0) -> BlockLayout:
    """One block per index of ``out_dim`` (a row of ``nn.Linear``, a column of ``Conv1D``)."""
    if len(shape) < 2:
        return tensor_layout(shape)
    n = shape[out_dim]
    return BlockLayout("rows", (_axis_segment(shape, out_dim, 0, n, n, "rows"),))


def heads_layout(shape: tuple[int, ...], heads: int, out_dim: int = 0) -> BlockLayout:
    """One block per attention head laid out along ``out_dim``."""
    if len(shape) < 2:
        return tensor_layout(shape)
    n = shape[out_dim]
    return BlockLayout("heads", (_axis_segment(shape, out_dim, 0, n, heads, "heads"),))


def split_layout(shape: tuple[int, ...], out_dim: int, parts: list[tuple[int, int]]) -> BlockLayout:
    """Consecutive slices along ``out_dim`` of sizes ``parts[i][0]``, each cut into
    ``parts[i][1]`` blocks (1 = the slice is one block, size = one block per neuron)."""
    segments, start = [], 0
    for size, groups in parts:
        segments.append(_axis_segment(shape, out_dim, start, size, groups, "blocks"))
        start += size
    if start != shape[out_dim]:
        raise ValueError(f"fused parts cover {start} of {shape[out_dim]} along axis {out_dim}")
    return BlockLayout("mixed", tuple(segments))


# --------------------------------------------------------------------------- statistics


def covers(x: Tensor, s: Segment) -> bool:
    """Whether segment ``s`` spans all of ``x`` along its axis."""
    return s.start == 0 and s.size == (x.shape[s.dim] if x.dim() else 1)


def _chunk(x: Tensor, s: Segment) -> Tensor:
    return x if covers(x, s) else x.narrow(s.dim, s.start, s.size)


# Statistics that sum over rows are sharding-invariant: entries are summed in the tensor's
# dtype only *within* an index of dim 0 (FSDP2 shards whole rows), and the per-row sums are
# added in float64. Float64 sums of the same float32 terms differ by ~1e-16 whatever their order,
# so one process and any number of row shards get the same float32 statistic (bar ~1e-9 odds of
# a rounding boundary), and a sharded run reproduces a single-process one.


ROW_CHUNK = 64  # rows summed together before the sum over chunks (see ``sum_rows_float64``)


def sharding_invariant_sum(x: Tensor, dims: Iterable[int]) -> Tensor:
    """``x.sum(dims, keepdim=True)`` in float64, the same however dim 0 is cut into shards."""
    dims = sorted(set([d % x.dim() for d in dims])) if x.dim() else []  # no genexpr: dynamo
    inner = [d for d in dims if d != 0]
    part = x.sum(inner, keepdim=True) if inner else x
    if dims and dims[0] == 0:
        return sum_rows_float64(part)
    return part.to(torch.float64)


F64_CHUNK_NUMEL = 1 << 19  # entries per eager chunk: a 4 MiB float64 copy stays in cache


def sum_rows_float64(x: Tensor) -> Tensor:
    """``x.sum(0, keepdim=True)`` accumulated in float64.

    Eagerly (and on FSDP2 shards, which always step eagerly) every entry is added in float64,
    so the result does not depend on how rows are split. torch casts the whole input to float64
    before such a sum; chunks of rows keep that copy in cache (a 8192 x 512 gradient: 5x faster).
    Under ``torch.compile`` (the fast path, never on shards) a float64 sum over dim 0 walks the
    tensor one column strip at a time; there each chunk of ``ROW_CHUNK`` contiguous rows is
    summed in the tensor's dtype first, then the chunks in float64: the same statistic to
    float32 rounding (the fused-vs-eager tests hold it to float32 tolerance), twice as fast.
    """
    n = x.shape[0]
    if torch.compiler.is_compiling():
        if x.dim() >= 2 and n >= 2 * ROW_CHUNK and not n % ROW_CHUNK:
            chunks = x.reshape(n // ROW_CHUNK, ROW_CHUNK, *x.shape[1:]).sum(1)
            return chunks.sum(0, keepdim=True, dtype=torch.float64)
        return x.sum(0, keepdim=True, dtype=torch.float64)
    rows = max(1, F64_CHUNK_NUMEL // max(1, x[:1].numel()))
    if x.dim() < 2 or x.dtype == torch.float64 or rows >= n:
        return x.sum(0, keepdim=True, dtype=torch.float64)
    total = x[:rows].sum(0, keepdim=True, dtype=torch.float64)
    for start in range(rows, n, rows):
        total += x[start : start + rows].sum(0, keepdim=True, dtype=torch.float64)
    return total


def block_sums(x: Tensor, layout: BlockLayout, offset: int = 0) -> Tensor:
    """Float64 sums of ``x`` (e.g. ``g²``) in every block, ``(num_blocks,)``; ``x`` holds rows
    ``[offset, offset + len(x))`` of the tensor (all of it by default) and blocks it does not
    reach get 0, so that the sums of all shards add up to the whole tensor's."""
    n = x.shape[0] if x.dim() else 1
    sums = []
    for s in layout.segments:
        blocks = s.num_blocks
        if s.dim != 0:  # every shard holds part of every block: per-row partials, then float64
            chunk = x.narrow(s.dim, s.start, s.size)
            per_row = chunk.reshape(-1, blocks, s.shape[2], s.shape[3]).sum((2, 3))
            sums.append(per_row.sum(0, dtype=torch.float64))
            continue
        per_block = s.size // blocks  # rows per block
        out = torch.zeros(blocks, dtype=torch.float64, device=x.device)
        a, b = max(offset, s.start), min(offset + n, s.start + s.size)
        if b > a:
            rows = x.reshape(1) if not x.dim() else x.narrow(0, a - offset, b - a)
            rows = rows.reshape(b - a, -1).sum(1).to(torch.float64)
            first, last = (a - s.start) / per_block, (b - s.start) / per_block
            if first.is_integer() and last.is_integer():  # whole blocks: no index needed
                out[int(first) : int(last)] = rows.view(-1, per_block).sum(1)
            else:
                ids = torch.arange(a - s.start, b - s.start, device=x.device) // per_block
                out.index_add_(0, ids, rows)
        sums.append(out)
    return sums[0] if len(sums) == 1 else torch.cat(sums)


def block_sizes(layout: BlockLayout) -> list[int]:
    """Entries per block of each segment (the divisor of :func:`block_sums`)."""
    return [math.prod(s.shape) // s.num_blocks for s in layout.segments]


def block_means(sums: Tensor, layout: BlockLayout, dtype: torch.dtype) -> Tensor:
    """``sums / block size``, rounded once to ``dtype``."""
    sizes = block_sizes(layout)
    if len(set(sizes)) > 1:
        per_block = [
            torch.full((s.num_blocks,), n, dtype=torch.float64)
            for s, n in zip(layout.segments, sizes, strict=True)
        ]
        return (sums / torch.cat(per_block).to(sums.device)).to(dtype)
    return (sums / sizes[0]).to(dtype)


def block_mean_square(g: Tensor, layout: BlockLayout) -> Tensor:
    """Mean of ``g²`` within each block, flattened to ``(num_blocks,)`` (``g²`` if per element);
    sharding-invariant (see :func:`sharding_invariant_sum`)."""
    if layout.elementwise:
        return g * g
    return block_means(block_sums(g * g, layout), layout, g.dtype)


def blockwise(
    fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, stat: Tensor, layout: BlockLayout
) -> Tensor:
    """``fn(x_block, stat_block)`` with each block's statistic broadcast over its entries."""
    if layout.elementwise:
        return fn(x, stat)
    segs = layout.segments
    if len(segs) == 1 and covers(x, segs[0]):
        s = segs[0]
        return fn(x.reshape(s.shape), stat.reshape(s.stat_shape)).reshape(x.shape)
    out = torch.empty_like(x)
    offset = 0
    for s in segs:
        chunk = x.narrow(s.dim, s.start, s.size)
        v = stat[offset : offset + s.num_blocks].reshape(s.stat_shape)
        out.narrow(s.dim, s.start, s.size).copy_(fn(chunk.reshape(s.shape), v).reshape(chunk.shape))
        offset += s.num_blocks
    return out


# --------------------------------------------------------------------------- policies
# A policy maps the structure of a parameter to the blocks one optimizer uses for it.


def adam_mini_layout(info: ParamInfo, single_block_value: bool = False) -> BlockLayout:
    """Adam-mini v1.1.1: q/k per head, v/o/MLP/embedding/output per row, rest one block.

    Biases get the per-element layout: Adam-mini updates them with plain elementwise Adam.
    """
    shape, role = info.shape, info.role
    if role is Role.BIAS:
        return element_layout()
    if len(shape) < 2:
        return tensor_layout(shape)
    if role in (Role.Q, Role.K):
        return heads_layout(shape, info.heads or 1, info.out_dim)
    if role is Role.V:
        return tensor_layout(shape) if single_block_value else rows_layout(shape, info.out_dim)
    if role in (Role.O, Role.MLP, Role.EMBEDDING, Role.OUTPUT):
        return rows_layout(shape, info.out_dim)
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
    return tensor_layout(shape)


def adalayer_layout(
    info: ParamInfo, split_qkv: bool = True, per_row_output: bool = True
) -> BlockLayout:
    """Adalayer (Zhao et al.): one block per tensor, fused QKV split into its Q, K and V blocks,
    and one block per row (output token) of the last layer. A tied embedding table *is* the last
    layer, so it is cut per row too."""
    shape, role = info.shape, info.role
    last_layer = role is Role.OUTPUT or (role is Role.EMBEDDING and info.tied)
    if per_row_output and last_layer and len(shape) >= 2:
        return rows_layout(shape, info.out_dim)
    if split_qkv and role is Role.QKV and info.parts and len(shape) >= 2:
        return split_layout(shape, info.out_dim, [(p.size, 1) for p in info.parts])
    return tensor_layout(shape)
