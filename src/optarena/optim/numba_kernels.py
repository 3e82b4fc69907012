"""The CPU kernels, in numba: Adafactor's step (``factored_adam``) and the block-moment Adam
step (``block_adam``); what each computes and why is in ``factored_adam.py`` and
``block_adam.py``, which check the tensors and call these.

Imported only when a kernel first runs (importing numba takes a while). Every function here is
a module global, so that numba caches the machine code on disk (a kernel calling a closure
variable is compiled again in every process, 2-3 s). A bucket's tensors arrive as a table of
addresses and shapes, one call for all of them: :func:`pointer` makes a typed pointer of an
address (``Tensor.data_ptr()``) for ``numba.carray``.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.core import types
from numba.extending import intrinsic

from optarena.optim.blocks import ROW_CHUNK

_KERNEL = {"fastmath": True, "cache": True, "boundscheck": False, "error_model": "numpy"}
_inner = numba.njit(**_KERNEL)


@intrinsic
def pointer(typingctx, address, like):  # pragma: no cover - compile time
    """A pointer to ``like``'s dtype at an integer address."""
    ptr = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(address, like), codegen


# --------------------------------------------------------------------------- factored_adam


@numba.njit(parallel=True, **_KERNEL)
def factored_adam(table, sc, w1, beta2, eps, tiny, workers):  # pragma: no cover - machine code
    """Adafactor's step for each matrix of the table (``factored_adam.step_``)."""
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
        # each thread takes the same run of chunks in both passes
        # 1. momentum and both sums of g², one pass
        for worker in numba.prange(workers):
            for k in range(worker * chunks // workers, (worker + 1) * chunks // workers):
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
        # 3. the update, each thread its own chunks, last first (m is g without a momentum)
        size, bc2, keep = sc[t, 0], sc[t, 1], sc[t, 2]
        for worker in numba.prange(workers):
            first = worker * chunks // workers
            for k in range((worker + 1) * chunks // workers - 1, first - 1, -1):
                for i in range(k * ROW_CHUNK, min(n, (k + 1) * ROW_CHUNK)):
                    root = np.sqrt(f0[i] / bc2)
                    pi = p[i]
                    mi = m[i]
                    for j in range(c):
                        pi[j] = pi[j] * keep - mi[j] * size / (root * root_col[j] + e)


# --------------------------------------------------------------------------- block_adam


@_inner
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


@_inner
def update(p, m, keep, d, lo, hi):  # pragma: no cover - machine code
    for i in range(lo, hi):
        pi = p[i]
        mi = m[i]
        for j in range(p.shape[1]):
            pi[j] = pi[j] * keep - mi[j] * d


@_inner
def new_v(v, b, total, count, beta2):  # pragma: no cover - machine code
    # v = β2 v + (1-β2) mean, with (1-β2) rounded once as torch rounds add_'s alpha
    dtype = v.dtype.type
    v[b] = v[b] * dtype(beta2) + dtype(total / count) * dtype(1.0 - beta2)
    return v[b]


@numba.njit(parallel=True, **_KERNEL)
def block_adam(table, spans, all_items, sc, w1, beta2, workers):  # pragma: no cover
    """The block-moment Adam step for each tensor of the table (``block_adam.step_``)."""
    dtype = sc.dtype.type
    w = dtype(w1)
    for t in range(table.shape[0]):
        n, c = table[t, 4], table[t, 5]
        g = numba.carray(pointer(table[t, 0], sc), (n, c))
        m = numba.carray(pointer(table[t, 1], sc), (n, c))
        p = numba.carray(pointer(table[t, 2], sc), (n, c))
        v = numba.carray(pointer(table[t, 3], sc), spans[t, 3])
        items = all_items[spans[t, 0] : spans[t, 1]]
        size, eps, keep = sc[t, 0], sc[t, 1], sc[t, 2]
        if spans[t, 2]:  # every block one item: both passes while it is in cache
            for k in numba.prange(items.shape[0]):
                lo, hi, b = items[k, 0], items[k, 1], items[k, 2]
                total = momentum_and_sum(g, m, w, lo, hi)
                vb = new_v(v, b, total, (hi - lo) * c, beta2)
                update(p, m, keep, dtype(size / (np.sqrt(vb) + eps)), lo, hi)
            continue
        # each thread takes the same run of items in both passes, the second in reverse:
        # the rows of m it wrote last are still in its cache
        count = items.shape[0]
        partial = np.empty(count)
        for worker in numba.prange(workers):
            for k in range(worker * count // workers, (worker + 1) * count // workers):
                partial[k] = momentum_and_sum(g, m, w, items[k, 0], items[k, 1])
        totals = np.zeros(v.shape[0])
        rows = np.zeros(v.shape[0])
        for k in range(items.shape[0]):
            totals[items[k, 2]] += partial[k]
            rows[items[k, 2]] += items[k, 1] - items[k, 0]
        d = np.empty(v.shape[0], sc.dtype)
        for b in range(v.shape[0]):
            d[b] = size / (np.sqrt(new_v(v, b, totals[b], rows[b] * c, beta2)) + eps)
        for worker in numba.prange(workers):
            first = worker * count // workers
            for k in range((worker + 1) * count // workers - 1, first - 1, -1):
                update(p, m, keep, d[items[k, 2]], items[k, 0], items[k, 1])
