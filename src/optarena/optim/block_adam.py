"""Adam with one second moment per block of rows (Adalayer, Adam-mini) in one kernel on CPU.

A block second moment needs the mean of ``g²`` over a whole block before any entry of the block
is updated. Compiled by inductor, each tensor's update is a reduction loop over g and then an
update loop over g, m and θ; inductor schedules every reduction of the bucket before every
update, so for a whole-tensor block (Adalayer) the second read of g comes from memory, and its
read-only reductions move bytes at ~0.6x the rate of a read-write stream on the project's CPU.
This kernel (numba, called by the fast path outside its compiled graph) takes one tensor at a
time:

1. ``m = lerp(m, g, 1-β1)`` and each block's sum of ``g²`` (float64), in chunks of rows: one
   read-write stream over g and m;
2. ``v_b = β2 v_b + (1-β2) mean``, then ``θ = keep·θ - size · m / (√v_b + ε)``, reading the
   m it has just written instead of g: the rows of pass 1, last first, so from cache for all
   but the largest tensors.

Each thread takes whole tensors (``numba_kernels.owners``): a tensor's two passes never wait
for another thread, and the bucket's step is one parallel region (a region per pass and
tensor cost 1-8% at the benchmark's size, paired). A tensor too large to balance that way is shared,
each thread taking a run of its rows in both passes; the sums are added chunk by chunk in
order either way, so the result does not depend on the threads.

Blocks of at most ROW_CHUNK rows (Adam-mini's heads and rows) do both passes per block while it
is in cache: one pass over memory. Each block's update runs in one loop with the next block's
momentum, row by row (``numba_kernels.blocks_in_cache``), so that θ, g and m stream at once:
block after block, one or two streams were in flight at a time and Adam-mini's step slowed by
up to 1.4x whenever the VM's memory latency rose (paired, the pipelined kernel took 0.83-0.95x
the time). ``size`` and ``ε`` are the fast path's folded scalars (bias
corrections included, see ``rules.AdaptiveMoment.fused_scalars``) and ``keep = 1 - lr·λ``: the
same update as the compiled expression, to float32 rounding. Blocks are runs of consecutive rows
(``Segment`` along dim 0), which covers every Adalayer and Adam-mini layout of a ``nn.Linear``
or embedding weight; a vector with one second moment (a LayerNorm weight, Adafactor's
unfactored vectors) is one row. Anything else (per-column blocks, bfloat16) keeps the compiled
expression. A bucket's tensors go to the kernel in one call, as a table of addresses.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from torch import Tensor

from optarena.optim import numba_support
from optarena.optim.blocks import ROW_CHUNK, BlockLayout

VECTOR = (0, 1, 1)  # the blocks of a vector with one second moment: the kernel's one row


@functools.lru_cache(maxsize=4096)
def row_blocks(layout: BlockLayout, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The layout's blocks as ``(first row, rows per block, blocks)`` per segment, flattened;
    None when a block is not a run of whole rows of this 2-D shape. A vector with one block
    (a LayerNorm weight) is one row: :data:`VECTOR`."""
    if layout.elementwise:
        return None
    if len(shape) == 1:
        return VECTOR if layout.num_blocks(shape) == 1 else None
    if len(shape) != 2:
        return None
    out: list[int] = []
    for s in layout.segments:
        if s.dim != 0 or s.size % s.num_blocks:
            return None
        out += [s.start, s.size // s.num_blocks, s.num_blocks]
    return tuple(out)


def applies(p: Tensor, g: Tensor, m: Tensor, v: Tensor, blocks: tuple[int, ...] | None) -> bool:
    """Whether :func:`step_` runs the kernel for this tensor."""
    return (
        blocks is not None and p.shape == g.shape == m.shape and numba_support.plain_cpu(p, g, m, v)
    )


@functools.cache
def _chunks(blocks: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """Work items ``(first row, end row, block)`` of at most ROW_CHUNK rows, each within one
    block, and whether every block is a single item (then each is updated while in cache)."""
    items = []
    block = 0
    for k in range(0, len(blocks), 3):
        start, rows, count = blocks[k : k + 3]
        for b in range(count):
            lo = start + b * rows
            for c in range(lo, lo + rows, ROW_CHUNK):
                items.append((c, min(c + ROW_CHUNK, lo + rows), block))
            block += 1
    return np.asarray(items, dtype=np.int64).reshape(-1, 3), len(items) == block


@functools.cache
def _bucket(layouts: tuple[tuple[int, ...], ...]) -> tuple[np.ndarray, np.ndarray]:
    """A bucket's work items, concatenated, and per tensor ``(first item, end item, whether
    each block is one item, blocks)``."""
    parts, spans = [], []
    offset = 0
    for blocks in layouts:
        items, cached = _chunks(blocks)
        parts.append(items)
        count = int(items[:, 2].max()) + 1 if len(items) else 0
        spans.append((offset, offset + len(items), int(cached), count))
        offset += len(items)
    return np.concatenate(parts), np.asarray(spans, dtype=np.int64).reshape(-1, 4)


@functools.cache
def _kernel() -> Any:
    """The numba kernel (``numba_kernels.block_adam``), compiled on first call, cached on
    disk."""
    from optarena.optim import numba_kernels

    return numba_kernels.block_adam


def _rows_cols(g: Tensor) -> tuple[int, int]:
    """The shape the kernel sees: a matrix as it is, a vector as one row."""
    return (g.shape[0], g.shape[1]) if g.dim() == 2 else (1, g.numel())


class Bucket:
    """One kernel call for a bucket's tensors, prepared once: the work items and a table of
    addresses and shapes (a call per tensor cost ~10 µs of dispatch and conversions). Each call
    fills in the addresses of the gradients (new tensors each step when they are set to None)
    and of ``θ`` (``p.data`` may be replaced); ``m`` and ``v`` are the optimizer's own state.
    """

    def __init__(
        self, ps: list[Tensor], ms: list[Tensor], vs: list[Tensor], blocks: list[tuple[int, ...]]
    ) -> None:
        self.ps = ps
        self.items, self.spans = _bucket(tuple(blocks))
        self.table = np.array(
            [
                (0, m.data_ptr(), 0, v.data_ptr(), *_rows_cols(p))
                for p, m, v in zip(ps, ms, vs, strict=True)
            ],
            dtype=np.int64,
        ).reshape(-1, 6)
        self.dtype = numba_support.numpy_dtype(ps[0])

    def __call__(self, gs: list[Tensor], scalars: np.ndarray, beta1: float, beta2: float) -> None:
        """Update every ``θ`` (and its ``m`` and ``v``) in place; ``scalars`` is ``(n, 3)``:
        each tensor's folded step size, folded ε and ``keep``."""
        self.table[:, 0] = [g.data_ptr() for g in gs]
        self.table[:, 2] = [p.data_ptr() for p in self.ps]
        sc = np.ascontiguousarray(scalars, dtype=self.dtype)
        numba_support.run(_kernel(), self.table, self.spans, self.items, sc, 1.0 - beta1, beta2)


def step_(
    ps: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    scalars: np.ndarray,
    blocks: list[tuple[int, ...]],
    beta1: float,
    beta2: float,
) -> None:
    """One step of every ``θ`` in one call (see :class:`Bucket`; :func:`applies` says what the
    tensors must be); ``blocks`` is each tensor's :func:`row_blocks`."""
    Bucket(ps, ms, vs, blocks)(gs, scalars, beta1, beta2)
