"""Adafactor's whole step for one matrix in one kernel on CPU.

A factored second moment needs the sum of ``g²`` over every row and every column of the matrix
before any entry is updated, so an exact step reads the matrix twice. Compiled by inductor it
read ``g`` three times: the row and the column sums are reductions along different axes (two
read-only passes; a float64 column sum over an odd number of rows walks the tensor one column
strip at a time), then the update, and every tensor's reductions ran before every tensor's
update, so each second read came from memory. This kernel (numba, called by the fast path
outside its compiled graph) takes one matrix at a time:

1. in parallel chunks of :data:`~optarena.optim.blocks.ROW_CHUNK` rows, one read-write stream
   over ``g`` and ``m``: ``m = lerp(m, g, 1-β1)``, each row's sum of ``g²``, and its squares
   added into the chunk's column accumulator (which stays in L1);
2. the factors' EMAs and their roots (``FactoredSecondMoment.roots``), once per row and column;
3. ``θ = keep·θ - size · m / (r_i c_j + ε)``, walking the chunks in reverse so that the rows of
   ``m`` written last, still in cache, are read first (a matrix of a few MB is read wholly from
   cache; the output layer's 16 MB in part).

Without a momentum (``β1 = 0``) pass 1 only reads ``g`` and pass 3 reads ``g`` again. ``size``
is the step size with the first bias correction, ``bc2`` the second, ``keep = 1 - lr·λ``: the
same numbers as the compiled expression, to float32 rounding. CPU, float32/float64, contiguous
matrices of one dtype, numba installed (``numba_support.py``); anything else (1-D tensors,
bfloat16 parameters, CUDA) keeps the compiled expression.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from torch import Tensor

from optarena.optim import numba_support
from optarena.optim.blocks import ROW_CHUNK


def applies(p: Tensor, g: Tensor, m: Tensor | None, rows: Tensor, cols: Tensor) -> bool:
    """Whether :func:`step_` runs the kernel for this matrix (``m`` None: no momentum)."""
    if p.dim() != 2 or p.shape != g.shape or (m is not None and m.shape != p.shape):
        return False
    return numba_support.plain_cpu(p, g, m, rows, cols)


@functools.cache
def _kernel() -> Any:
    """The numba kernel, compiled on first call and cached on disk."""
    import numba

    pointer = numba_support.pointer()

    @numba.njit(parallel=True, fastmath=True, cache=True, boundscheck=False, error_model="numpy")
    def step(table, sc, w1, beta2, eps, tiny):  # pragma: no cover - machine code
        dtype = sc.dtype.type
        w, decay, weight, e = dtype(w1), dtype(beta2), dtype(1.0 - beta2), dtype(eps)
        for t in range(table.shape[0]):
            n, c = table[t, 5], table[t, 6]
            g = numba.carray(pointer(table[t, 0], sc), (n, c))
            p = numba.carray(pointer(table[t, 2], sc), (n, c))
            f0 = numba.carray(pointer(table[t, 3], sc), n)
            f1 = numba.carray(pointer(table[t, 4], sc), c)
            momentum = table[t, 1] != 0
            m = numba.carray(pointer(table[t, 1] if momentum else table[t, 0], sc), (n, c))
            chunks = (n + ROW_CHUNK - 1) // ROW_CHUNK
            row_sums = np.empty(n, sc.dtype)
            col_sums = np.empty((chunks, c), sc.dtype)
            # 1. momentum and both sums of g², one pass
            for k in numba.prange(chunks):
                acc = col_sums[k]
                for j in range(c):
                    acc[j] = 0
                for i in range(k * ROW_CHUNK, min(n, (k + 1) * ROW_CHUNK)):
                    gi = g[i]
                    s = dtype(0)  # float32 rows add in float32 vector lanes
                    if momentum:
                        mi = m[i]
                        for j in range(c):
                            x = gi[j]
                            mi[j] += (x - mi[j]) * w  # m.lerp_(g, 1-β1), as transforms.ema_
                            sq = x * x
                            s += sq
                            acc[j] += sq
                    else:
                        for j in range(c):
                            sq = gi[j] * gi[j]
                            s += sq
                            acc[j] += sq
                    row_sums[i] = s
            # 2. the factors' EMAs (statistics: means in float64, as transforms.mean_over) and
            # their roots
            total = 0.0
            for i in range(n):
                f0[i] = f0[i] * decay + dtype(row_sums[i] / c) * weight
                total += f0[i]
            mean = max(dtype(total / n), dtype(tiny))
            col = np.zeros(c)
            for k in range(chunks):
                for j in range(c):
                    col[j] += col_sums[k, j]
            root_col = np.empty(c, sc.dtype)
            for j in range(c):
                f1[j] = f1[j] * decay + dtype(col[j] / n) * weight
                root_col[j] = np.sqrt(f1[j] / mean)
            # 3. the update, last chunk first (m is g without a momentum)
            size, bc2, keep = sc[t, 0], sc[t, 1], sc[t, 2]
            for r in numba.prange(chunks):
                k = chunks - 1 - r
                for i in range(k * ROW_CHUNK, min(n, (k + 1) * ROW_CHUNK)):
                    root = np.sqrt(f0[i] / bc2)
                    pi = p[i]
                    mi = m[i]
                    for j in range(c):
                        pi[j] = pi[j] * keep - mi[j] * size / (root * root_col[j] + e)

    return step


def step_(
    ps: list[Tensor],
    gs: list[Tensor],
    ms: list[Tensor] | None,
    rows: list[Tensor],
    cols: list[Tensor],
    scalars: np.ndarray,
    beta1: float,
    beta2: float,
    eps: float,
) -> None:
    """Update every matrix ``θ`` (its momentum ``m`` unless None, its row factor ``(n, 1)`` and
    column factor ``(1, c)``) in place; ``scalars`` is ``(k, 3)``: each matrix's step size,
    second bias correction and ``keep`` (see :func:`applies` for what the tensors must be).

    One kernel call for all of them: their addresses and shapes in a table (a call per matrix
    cost ~10 µs of dispatch and conversions).
    """
    table = np.empty((len(gs), 7), dtype=np.int64)
    for i, g in enumerate(gs):
        m = ms[i].data_ptr() if ms else 0
        table[i] = (
            g.data_ptr(),
            m,
            ps[i].data_ptr(),
            rows[i].data_ptr(),
            cols[i].data_ptr(),
            *g.shape,
        )
    dtype = numba_support.numpy_dtype(gs[0])
    sc = np.ascontiguousarray(scalars, dtype=dtype)  # in the tensors' dtype, as the graph's
    with numba_support.threads():
        _kernel()(table, sc, 1.0 - beta1, beta2, eps, float(np.finfo(dtype).tiny))
