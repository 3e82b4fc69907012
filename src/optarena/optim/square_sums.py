"""Row and column sums of ``g²`` in one read of ``g``: Adafactor's statistics at one pass.

Adafactor's factored second moment needs, for every matrix gradient, the sum of ``g²`` over
each row and over each column. Compiled by inductor these are two reductions along different
axes, hence two reads of ``g`` (and a float64 column sum over an odd number of rows walks the
tensor one column strip at a time); on the project's CPU they took longer than the update that
follows them. A loop that walks the rows once, keeping each row's sum and adding its squares
into a column accumulator that stays in L1, reads ``g`` once. No inductor reduction does that
(both sums in one loop need its outer-loop fusion, which falls back here), so it is written
here with numba, parallel over chunks of rows, and registered as a torch custom op so that the
compiled step calls it from inside its graph.

The column sums come back per chunk of :data:`~optarena.optim.blocks.ROW_CHUNK` rows, in the
gradient's dtype; the caller adds the chunks in float64, exactly as the compiled path's
:func:`~optarena.optim.blocks.sum_rows_float64` does. CPU only (float32/float64, contiguous,
numba installed: ``numba_support.py``); :func:`applies` says when, and everything else keeps the
torch expression.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import Tensor

from optarena.optim import numba_support
from optarena.optim.blocks import ROW_CHUNK


@functools.cache
def _kernel() -> Any:
    """The numba kernel, compiled on first call (once with a momentum, once without: numba
    prunes the ``m is None`` branch per signature) and cached on disk."""
    import numba

    @numba.njit(parallel=True, fastmath=True, cache=True, boundscheck=False)
    def sums(g, m, weight, rows, chunks, chunk):  # pragma: no cover - runs as machine code
        n, c = g.shape
        for k in numba.prange((n + chunk - 1) // chunk):
            acc = chunks[k]
            acc[:] = 0
            for i in range(k * chunk, min(n, (k + 1) * chunk)):
                gi = g[i]
                rows[i] = 0
                s = rows[i]  # a zero of g's dtype: float32 rows add in float32 vector lanes
                if m is None:
                    for j in range(c):
                        sq = gi[j] * gi[j]
                        s += sq
                        acc[j] += sq
                else:
                    mi = m[i]
                    w = mi.dtype.type(weight)
                    for j in range(c):
                        x = gi[j]
                        mi[j] += (x - mi[j]) * w  # m.lerp_(g, weight), as transforms.ema_
                        sq = x * x
                        s += sq
                        acc[j] += sq
                rows[i] = s

    return sums


def applies(g: Tensor, m: Tensor | None = None) -> bool:
    """Whether :func:`square_sums` runs the one-read kernel for ``g`` (and ``m``)."""
    if g.dim() != 2 or (m is not None and m.shape != g.shape):
        return False
    return numba_support.plain_cpu(g, m)


# the low-level registration: a call costs ~3 µs (``torch.library.custom_op``'s wrapper, ~25 µs).
# Results are written into buffers the caller allocates (a returned Tensor[] beside a mutated
# Tensor[] cannot be functionalized).
_LIB = torch.library.Library("optarena", "FRAGMENT")
_LIB.define(
    "square_sums(Tensor[] gs, Tensor(a!)[] ms, float weight, Tensor(b!)[] rows, "
    "Tensor(c!)[] chunks) -> ()"
)


def _square_sums_cpu(
    gs: list[Tensor], ms: list[Tensor], weight: float, rows: list[Tensor], chunks: list[Tensor]
) -> None:
    sums = _kernel()
    with numba_support.threads():
        for i, g in enumerate(gs):
            m = numba_support.array(ms[i]) if ms else None
            sums(numba_support.array(g), m, weight, rows[i].numpy(), chunks[i].numpy(), ROW_CHUNK)


_LIB.impl("square_sums", _square_sums_cpu, "CPU")


@torch.library.register_fake("optarena::square_sums")
def _(gs, ms, weight, rows, chunks) -> None:
    return None


def square_sums(
    gs: list[Tensor], ms: list[Tensor] | None = None, weight: float = 0.0
) -> list[tuple[Tensor, Tensor]]:
    """For each matrix ``g``: ``(Σ_j g² per row: (n,), Σ_i g² per chunk of ROW_CHUNK rows:
    (ceil(n/ROW_CHUNK), c))`` in ``g``'s dtype, reading ``g`` once (see :func:`applies`).

    With ``ms`` (their momenta) the same pass also makes ``m.lerp_(g, weight)``: one read-write
    stream instead of a read-only pass here and a momentum update later. One call for a whole
    bucket, the kernels back to back: one call per matrix, between inductor's small kernels,
    cost about 3 ms more a step on the benchmark model.
    """
    rows = [g.new_empty(g.shape[0]) for g in gs]
    chunks = [g.new_empty(-(-g.shape[0] // ROW_CHUNK), g.shape[1]) for g in gs]
    torch.ops.optarena.square_sums.default(gs, ms or [], weight, rows, chunks)
    return list(zip(rows, chunks, strict=True))
