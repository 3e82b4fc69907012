"""Adam with one second moment per block of rows (Adalayer) in one kernel on CPU.

A block second moment needs the mean of ``g²`` over a whole block before any entry of the block
is updated. Compiled by inductor, each tensor's update is a reduction loop over g and then an
update loop over g, m and θ; inductor schedules every reduction of the bucket before every
update, so the second read of g comes from memory, and its read-only reductions move bytes at
~0.6x the rate of a read-write stream on the project's CPU. This kernel (numba, registered as
a torch op and called from the compiled step) takes one tensor at a time:

1. ``m = lerp(m, g, 1-β1)`` and each block's sum of ``g²`` (float64), in parallel chunks of
   rows: one read-write stream over g and m;
2. ``v_b = β2 v_b + (1-β2) mean``, then ``θ = keep·θ - size · m / (√v_b + ε)``, reading the
   m it has just written (from cache for all but the largest tensors) instead of g.

Blocks of at most ROW_CHUNK rows (a head, a row) do both passes per block while it is in L1.
``size`` and ``ε`` are the fast path's folded scalars (bias corrections included, see
``rules.AdaptiveMoment.fused_scalars``) and ``keep = 1 - lr·λ``: the same update as the
compiled expression, to float32 rounding. Blocks are runs of consecutive rows (``Segment`` along
dim 0), which covers every Adalayer (and Adam-mini) layout of a ``nn.Linear`` or embedding
weight; anything else (per-column blocks, 1-D tensors, bfloat16) keeps the compiled expression.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor

from optarena.optim import numba_support
from optarena.optim.blocks import ROW_CHUNK, BlockLayout


def row_blocks(layout: BlockLayout, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The layout's blocks as ``(first row, rows per block, blocks)`` per segment, flattened;
    None when a block is not a run of whole rows of this 2-D shape."""
    if len(shape) != 2 or layout.elementwise:
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
def _kernels() -> tuple[Any, Any]:
    """The numba kernels (blocks in cache; blocks over several chunks), compiled on first call
    and cached on disk."""
    import numba

    inner = numba.njit(fastmath=True, cache=True, boundscheck=False)
    jit = numba.njit(parallel=True, fastmath=True, cache=True, boundscheck=False)

    @inner
    def momentum_and_sum(g, m, w, lo, hi):  # pragma: no cover - machine code
        total = 0.0
        for i in range(lo, hi):
            gi = g[i]
            mi = m[i]
            s = gi[0] * 0  # a zero of g's dtype: the row adds in its vector lanes
            for j in range(g.shape[1]):
                x = gi[j]
                mi[j] += (x - mi[j]) * w
                s += x * x
            total += s
        return total

    @inner
    def update(p, m, keep, d, lo, hi):  # pragma: no cover - machine code
        for i in range(lo, hi):
            pi = p[i]
            mi = m[i]
            for j in range(p.shape[1]):
                pi[j] = pi[j] * keep - mi[j] * d

    @inner
    def new_v(v, b, total, count, beta2):  # pragma: no cover - machine code
        # v = β2 v + (1-β2) mean, with (1-β2) rounded once as torch rounds add_'s alpha
        dtype = v.dtype.type
        v[b] = v[b] * dtype(beta2) + dtype(total / count) * dtype(1.0 - beta2)
        return v[b]

    @jit
    def in_cache(g, m, p, v, items, w1, beta2, sc):  # pragma: no cover - machine code
        w = m.dtype.type(w1)
        keep = p.dtype.type(sc[2])
        for t in numba.prange(items.shape[0]):
            lo, hi, b = items[t, 0], items[t, 1], items[t, 2]
            total = momentum_and_sum(g, m, w, lo, hi)
            vb = new_v(v, b, total, (hi - lo) * g.shape[1], beta2)
            update(p, m, keep, p.dtype.type(sc[0] / (np.sqrt(vb) + sc[1])), lo, hi)

    @jit
    def two_passes(g, m, p, v, items, w1, beta2, sc):  # pragma: no cover - machine code
        w = m.dtype.type(w1)
        keep = p.dtype.type(sc[2])
        partial = np.empty(items.shape[0])
        for t in numba.prange(items.shape[0]):
            partial[t] = momentum_and_sum(g, m, w, items[t, 0], items[t, 1])
        totals = np.zeros(v.shape[0])
        rows = np.zeros(v.shape[0])
        for t in range(items.shape[0]):
            totals[items[t, 2]] += partial[t]
            rows[items[t, 2]] += items[t, 1] - items[t, 0]
        d = np.empty(v.shape[0])
        for b in range(v.shape[0]):
            vb = new_v(v, b, totals[b], rows[b] * g.shape[1], beta2)
            d[b] = sc[0] / (np.sqrt(vb) + sc[1])
        for t in numba.prange(items.shape[0]):
            update(p, m, keep, p.dtype.type(d[items[t, 2]]), items[t, 0], items[t, 1])

    return in_cache, two_passes


# the low-level registration: a call costs ~3 µs (``torch.library.custom_op``'s wrapper ~25 µs)
_LIB = torch.library.Library("optarena", "FRAGMENT")
_LIB.define(
    "block_adam_(Tensor(a!)[] ps, Tensor[] gs, Tensor(b!)[] ms, Tensor(c!)[] vs, "
    "Tensor scalars, int[] blocks, float beta1, float beta2) -> ()"
)


def _block_adam_cpu(
    ps: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    scalars: Tensor,
    blocks: list[int],
    beta1: float,
    beta2: float,
) -> None:
    in_cache, two_passes = _kernels()
    sc = numba_support.array(scalars.to(torch.float64))
    offset = 0
    with numba_support.threads():
        for i, p in enumerate(ps):
            length = blocks[offset]
            items, cached = _chunks(tuple(blocks[offset + 1 : offset + 1 + length]))
            offset += 1 + length
            kernel = in_cache if cached else two_passes
            g, m, p, v = (numba_support.array(t) for t in (gs[i], ms[i], p, vs[i]))
            kernel(g, m, p, v, items, 1.0 - beta1, beta2, sc[i])


_LIB.impl("block_adam_", _block_adam_cpu, "CPU")


@torch.library.register_fake("optarena::block_adam_")
def _(ps, gs, ms, vs, scalars, blocks, beta1, beta2) -> None:
    return None


def step_(
    ps: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor],
    vs: list[Tensor],
    scalars: Tensor,
    blocks: list[tuple[int, ...]],
    beta1: float,
    beta2: float,
) -> None:
    """Update every ``θ`` (and its ``m`` and ``v``) in place; ``scalars`` is ``(n, 3)``: each
    tensor's folded step size, folded ε and ``keep``; ``blocks`` each tensor's
    :func:`row_blocks`. One call for a whole bucket (see ``numba_support.threads``)."""
    flat: list[int] = []
    for b in blocks:
        flat += [len(b), *b]
    torch.ops.optarena.block_adam_.default(ps, gs, ms, vs, scalars, flat, beta1, beta2)
