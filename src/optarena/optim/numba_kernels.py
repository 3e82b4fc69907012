"""The CPU kernels, in numba: Adafactor's step (``factored_adam``) and the block-moment Adam
step (``block_adam``); what each computes and why is in ``factored_adam.py`` and
``block_adam.py``, which check the tensors and call these.

Imported only when a kernel first runs (importing numba takes a while). Every function here is
a module global, so that numba caches the machine code on disk (a kernel calling a closure
variable is compiled again in every process, 2-3 s). A bucket's tensors arrive as a table of
addresses and shapes, one call for all of them: :func:`pointer` makes a typed pointer of an
address (``Tensor.data_ptr()``) for ``numba.carray``.

Threads: each thread takes whole tensors (:func:`owners`: largest first, each to the thread
with the least work so far), so a tensor's two passes never wait for another thread and the
bucket's step is one parallel region. A tensor too large to balance that way (more than a
tenth of a 2-thread bucket: on the benchmark model the embedding and the output layer, whose m
would not stay in one thread's cache between the passes) is shared instead: every thread takes
a run of its rows in both passes, meeting at the statistic. Which thread takes a tensor never
changes its result: sums are taken per chunk of rows and added in chunk order either way.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.core import types
from numba.extending import intrinsic

from optarena.optim.blocks import ROW_CHUNK

_KERNEL = {"fastmath": True, "cache": True, "boundscheck": False, "error_model": "numpy"}
_inner = numba.njit(**_KERNEL)

# a tensor larger than this fraction of a thread's share of the bucket is shared by the threads
# (paired on the benchmark model: 0.2, which shares the embedding and output layer, ran 2-3%
# faster than 0.25, which gave each of them to one thread)
SHARED_ABOVE = 0.2


@intrinsic
def pointer(typingctx, address, like):  # pragma: no cover - compile time
    """A pointer to ``like``'s dtype at an integer address."""
    ptr = types.CPointer(like.dtype)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(ptr))

    return ptr(address, like), codegen


@_inner
def owners(sizes, workers):  # pragma: no cover - machine code
    """The thread that takes each tensor whole (largest first, to the least loaded), or -1
    for one shared by all threads (larger than SHARED_ABOVE of a thread's share)."""
    owner = np.full(sizes.shape[0], -1, np.int64)
    load = np.zeros(workers)
    limit = SHARED_ABOVE * sizes.sum() / workers
    for t in np.argsort(-sizes):
        if workers == 1 or sizes[t] <= limit:
            k = np.argmin(load)
            owner[t] = k
            load[k] += sizes[t]
    return owner


# --------------------------------------------------------------------------- factored_adam


@_inner
def factored_sums(g, m, w, momentum, row_sums, col_sums, first, end):  # pragma: no cover
    """Pass 1 over chunks ``[first, end)``: momentum, each row's sum of g², each chunk's
    column sums."""
    dtype = g.dtype.type
    n, c = g.shape
    for k in range(first, end):
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


@_inner
def factored_roots(f0, f1, row_sums, col_sums, decay, weight, tiny):  # pragma: no cover
    """The factors' EMAs (statistics: means in float64, as transforms.mean_over) and the
    column roots."""
    dtype = f0.dtype.type
    n, c = f0.shape[0], f1.shape[0]
    mean = max(dtype(factor_ema(f0, row_sums, c, decay, weight) / n), dtype(tiny))
    factor_ema(f1, column_totals(col_sums), n, decay, weight)
    root_col = np.empty(c, f0.dtype)
    for j in range(c):
        root_col[j] = np.sqrt(f1[j] / mean)
    return root_col


@_inner
def factor_ema(f, sums, count, decay, weight):  # pragma: no cover - machine code
    """``f = decay·f + weight·sums/count`` (the means in float64, as transforms.mean_over);
    returns the sum of the new ``f``, in float64."""
    dtype = f.dtype.type
    total = 0.0
    for i in range(f.shape[0]):
        f[i] = f[i] * decay + dtype(sums[i] / count) * weight
        total += f[i]
    return total


@_inner
def column_totals(col_sums):  # pragma: no cover - machine code
    """A matrix's column sums from its chunks' (added in chunk order, in float64)."""
    total = np.zeros(col_sums.shape[1])
    for k in range(col_sums.shape[0]):
        for j in range(col_sums.shape[1]):
            total[j] += col_sums[k, j]
    return total


@_inner
def factored_update(p, m, f0, root_col, bc2, keep, size, e, first, end):  # pragma: no cover
    """Pass 2 over chunks ``[first, end)``, last first: the rows of m written last are still
    in this thread's cache."""
    n, c = p.shape
    for k in range(end - 1, first - 1, -1):
        for i in range(k * ROW_CHUNK, min(n, (k + 1) * ROW_CHUNK)):
            root = np.sqrt(f0[i] / bc2)
            pi = p[i]
            mi = m[i]
            for j in range(c):
                pi[j] = pi[j] * keep - mi[j] * size / (root * root_col[j] + e)


@_inner
def factored_views(table, sc, t):  # pragma: no cover - machine code
    """Matrix ``t`` of the table: g, m (g itself without a momentum), θ, the factors."""
    n, c = table[t, 5], table[t, 6]
    g = numba.carray(pointer(table[t, 0], sc), (n, c))
    m = numba.carray(pointer(table[t, 1] if table[t, 1] != 0 else table[t, 0], sc), (n, c))
    p = numba.carray(pointer(table[t, 2], sc), (n, c))
    f0 = numba.carray(pointer(table[t, 3], sc), n)
    f1 = numba.carray(pointer(table[t, 4], sc), c)
    return g, m, p, f0, f1


@numba.njit(parallel=True, **_KERNEL)
def factored_adam(table, sc, w1, beta2, eps, tiny, workers):  # pragma: no cover - machine code
    """Adafactor's step for each matrix of the table (``factored_adam.step_``)."""
    dtype = sc.dtype.type
    w, decay, weight, e = dtype(w1), dtype(beta2), dtype(1.0 - beta2), dtype(eps)
    owner = owners(table[:, 5] * table[:, 6], workers)
    for t in range(table.shape[0]):  # shared: each thread the same run of chunks in both passes
        if owner[t] >= 0:
            continue
        g, m, p, f0, f1 = factored_views(table, sc, t)
        momentum = table[t, 1] != 0
        chunks = (g.shape[0] + ROW_CHUNK - 1) // ROW_CHUNK
        row_sums = np.empty(g.shape[0], sc.dtype)
        col_sums = np.empty((chunks, g.shape[1]), sc.dtype)
        for worker in numba.prange(workers):
            first, end = worker * chunks // workers, (worker + 1) * chunks // workers
            factored_sums(g, m, w, momentum, row_sums, col_sums, first, end)
        root_col = factored_roots(f0, f1, row_sums, col_sums, decay, weight, tiny)
        size, bc2, keep = sc[t, 0], sc[t, 1], sc[t, 2]
        for worker in numba.prange(workers):
            first, end = worker * chunks // workers, (worker + 1) * chunks // workers
            factored_update(p, m, f0, root_col, bc2, keep, size, e, first, end)
    for worker in numba.prange(workers):  # whole: each thread its own matrices
        for t in range(table.shape[0]):
            if owner[t] != worker:
                continue
            g, m, p, f0, f1 = factored_views(table, sc, t)
            chunks = (g.shape[0] + ROW_CHUNK - 1) // ROW_CHUNK
            row_sums = np.empty(g.shape[0], sc.dtype)
            col_sums = np.empty((chunks, g.shape[1]), sc.dtype)
            factored_sums(g, m, w, table[t, 1] != 0, row_sums, col_sums, 0, chunks)
            root_col = factored_roots(f0, f1, row_sums, col_sums, decay, weight, tiny)
            size, bc2, keep = sc[t, 0], sc[t, 1], sc[t, 2]
            factored_update(p, m, f0, root_col, bc2, keep, size, e, 0, chunks)


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
def row_sum_sq(gi):  # pragma: no cover - machine code
    """A row's sum of squares in its dtype's vector lanes, after its momentum (the row in L1):
    in :func:`blocks_in_cache` every sum is this one loop, whichever loop read the row, so the
    bits do not depend on where a thread's run of blocks starts."""
    s = gi[0] * 0
    for j in range(gi.shape[0]):
        s += gi[j] * gi[j]
    return s


@_inner
def momentum_then_sum(g, m, w, lo, hi):  # pragma: no cover - machine code
    """:func:`momentum_and_sum` with the sums taken by :func:`row_sum_sq`."""
    total = 0.0
    for i in range(lo, hi):
        gi = g[i]
        mi = m[i]
        for j in range(g.shape[1]):
            mi[j] += (gi[j] - mi[j]) * w
        total += row_sum_sq(gi)
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


@_inner
def blocks_in_cache(g, m, p, v, items, lo, hi, w, beta2, keep, size, eps):  # pragma: no cover
    """Items ``[lo, hi)``, each a whole block of at most ROW_CHUNK rows: block k's update in
    the same loop as block k+1's momentum and sum of g², row by row, so that three memory
    streams (θ of one block, g and m of the next) are in flight at once; block k's m is read
    back from cache. One block after the other, the two passes kept one or two streams going
    at a time, and the step slowed by up to 1.4x whenever the VM's memory latency rose."""
    c = g.shape[1]
    if lo >= hi:
        return
    total = momentum_then_sum(g, m, w, items[lo, 0], items[lo, 1])
    for k in range(lo, hi):
        first, end = items[k, 0], items[k, 1]
        vb = new_v(v, items[k, 2], total, (end - first) * c, beta2)
        d = g.dtype.type(size / (np.sqrt(vb) + eps))
        if k + 1 == hi:
            update(p, m, keep, d, first, end)
            return
        nfirst, nend = items[k + 1, 0], items[k + 1, 1]
        total = 0.0
        for r in range(max(end - first, nend - nfirst)):
            i, n = first + r, nfirst + r
            if i < end and n < nend:
                pi, mi, gn, mn = p[i], m[i], g[n], m[n]
                for j in range(c):
                    pi[j] = pi[j] * keep - mi[j] * d
                    mn[j] += (gn[j] - mn[j]) * w
                total += row_sum_sq(gn)  # the row is in L1
            elif i < end:
                update(p, m, keep, d, i, i + 1)
            else:
                total += momentum_then_sum(g, m, w, n, n + 1)


@_inner
def block_steps(v, items, partial, size, eps, beta2, c):  # pragma: no cover - machine code
    """Each block's ``v`` from its items' sums of g² (added in item order), and its step."""
    totals = np.zeros(v.shape[0])
    rows = np.zeros(v.shape[0])
    for k in range(items.shape[0]):
        totals[items[k, 2]] += partial[k]
        rows[items[k, 2]] += items[k, 1] - items[k, 0]
    d = np.empty(v.shape[0], v.dtype)
    for b in range(v.shape[0]):
        d[b] = size / (np.sqrt(new_v(v, b, totals[b], rows[b] * c, beta2)) + eps)
    return d


@_inner
def block_views(table, spans, sc, t):  # pragma: no cover - machine code
    """Tensor ``t`` of the table as (rows, columns): g, m, θ, and its v."""
    n, c = table[t, 4], table[t, 5]
    g = numba.carray(pointer(table[t, 0], sc), (n, c))
    m = numba.carray(pointer(table[t, 1], sc), (n, c))
    p = numba.carray(pointer(table[t, 2], sc), (n, c))
    v = numba.carray(pointer(table[t, 3], sc), spans[t, 3])
    return g, m, p, v


@numba.njit(parallel=True, **_KERNEL)
def block_adam(table, spans, all_items, sc, w1, beta2, workers):  # pragma: no cover
    """The block-moment Adam step for each tensor of the table (``block_adam.step_``)."""
    w = sc.dtype.type(w1)
    owner = owners(table[:, 4] * table[:, 5], workers)
    for t in range(table.shape[0]):  # shared by the threads
        if owner[t] >= 0:
            continue
        g, m, p, v = block_views(table, spans, sc, t)
        items = all_items[spans[t, 0] : spans[t, 1]]
        size, eps, keep = sc[t, 0], sc[t, 1], sc[t, 2]
        count = items.shape[0]
        if spans[t, 2]:  # every block one item: both passes while it is in cache
            for worker in numba.prange(workers):
                first, end = worker * count // workers, (worker + 1) * count // workers
                blocks_in_cache(g, m, p, v, items, first, end, w, beta2, keep, size, eps)
            continue
        # each thread takes the same run of items in both passes, the second in reverse: the
        # rows of m it wrote last are still in its cache
        partial = np.empty(count)
        for worker in numba.prange(workers):
            for k in range(worker * count // workers, (worker + 1) * count // workers):
                partial[k] = momentum_and_sum(g, m, w, items[k, 0], items[k, 1])
        d = block_steps(v, items, partial, size, eps, beta2, g.shape[1])
        for worker in numba.prange(workers):
            first = worker * count // workers
            for k in range((worker + 1) * count // workers - 1, first - 1, -1):
                update(p, m, keep, d[items[k, 2]], items[k, 0], items[k, 1])
    for worker in numba.prange(workers):  # whole: each thread its own tensors
        for t in range(table.shape[0]):
            if owner[t] != worker:
                continue
            g, m, p, v = block_views(table, spans, sc, t)
            items = all_items[spans[t, 0] : spans[t, 1]]
            size, eps, keep = sc[t, 0], sc[t, 1], sc[t, 2]
            if spans[t, 2]:
                blocks_in_cache(g, m, p, v, items, 0, items.shape[0], w, beta2, keep, size, eps)
                continue
            partial = np.empty(items.shape[0])
            for k in range(items.shape[0]):
                partial[k] = momentum_and_sum(g, m, w, items[k, 0], items[k, 1])
            d = block_steps(v, items, partial, size, eps, beta2, g.shape[1])
            for k in range(items.shape[0] - 1, -1, -1):
                update(p, m, keep, d[items[k, 2]], items[k, 0], items[k, 1])


# --------------------------------------------------------------------------- classic_adafactor


@_inner
def classic_sums(
    g, p, row, vector, col_sums, weighted, theta_sq, eps1, beta2t, first, end
):  # pragma: no cover - machine code
    """Pass 1 over chunks ``[first, end)``: each chunk's column sums of ``g² + ε1``, its sum of
    ``θ²`` (for RMS(θ)) and its column sums of ``g²/R_i``, each row's factor ``R_i`` updated
    as soon as its row is summed (a vector has no row factor: ``R_i = 1``). With those, the sum
    of ``u² = g²·mean(R)/(R_i C_j)`` needs no second read of ``g``: it is
    ``mean(R)·Σ_j (Σ_i g²/R_i)/C_j`` (:func:`classic_roots`)."""
    dtype = g.dtype.type
    e, b, w = dtype(eps1), dtype(beta2t), dtype(1.0 - beta2t)
    n, c = g.shape
    for k in range(first, end):
        acc, wk = col_sums[k], weighted[k]
        for j in range(c):
            acc[j] = 0
            wk[j] = 0
        total = 0.0
        for i in range(k * ROW_CHUNK, min(n, (k + 1) * ROW_CHUNK)):
            gi = g[i]
            pi = p[i]
            s = dtype(0)
            q = dtype(0)
            for j in range(c):
                sq = gi[j] * gi[j] + e
                s += sq
                acc[j] += sq
            for j in range(c):  # a loop of its own streams faster (paired, ~5%)
                q += pi[j] * pi[j]
            total += q
            a = dtype(1)
            if not vector:
                row[i] = row[i] * b + dtype(s / c) * w  # as factor_ema
                a = dtype(1) / row[i]
            for j in range(c):  # the row is still in L1
                wk[j] += gi[j] * gi[j] * a
        theta_sq[k] = total


@_inner
def classic_roots(row, col, col_sums, weighted, beta2t, vector):  # pragma: no cover
    """The column factor's EMA (statistics: means in float64), ``1/sqrt`` of the normalised row
    factor and of the column factor, and the sum of ``u²`` (float64); a vector is one row
    whose columns are its second moment."""
    dtype = col.dtype.type
    n, c = row.shape[0], col.shape[0]
    root_row = np.ones(n, col.dtype)
    mean = 1.0
    if not vector:
        total = 0.0
        for i in range(n):
            total += row[i]
        mean = dtype(total / n)
        for i in range(n):
            root_row[i] = 1 / np.sqrt(row[i] / mean)
    factor_ema(col, column_totals(col_sums), n, dtype(beta2t), dtype(1.0 - beta2t))
    root_col = np.empty(c, col.dtype)
    u_sq = 0.0
    weights = column_totals(weighted)
    for j in range(c):
        root_col[j] = 1 / np.sqrt(col[j])
        u_sq += weights[j] / col[j]
    return root_row, root_col, u_sq * mean


@_inner
def classic_update(
    p, g, m, momentum, root_row, root_col, scale, keep, w1, first, end
):  # pragma: no cover
    """Pass 2 over chunks ``[first, end)``, last first (the rows read last are still in cache):
    ``θ = keep·θ - scale·u``, through the momentum ``m = lerp(m, scale·u, 1-β1)`` if there is
    one."""
    dtype = p.dtype.type
    n, c = p.shape
    w, kp = dtype(w1), dtype(keep)
    for k in range(end - 1, first - 1, -1):
        for i in range(k * ROW_CHUNK, min(n, (k + 1) * ROW_CHUNK)):
            gi = g[i]
            pi = p[i]
            f = dtype(scale * root_row[i])
            if momentum:
                mi = m[i]
                for j in range(c):
                    mi[j] += (gi[j] * root_col[j] * f - mi[j]) * w
                    pi[j] = pi[j] * kp - mi[j]
            else:
                for j in range(c):
                    pi[j] = pi[j] * kp - gi[j] * root_col[j] * f


@_inner
def classic_views(table, like, t):  # pragma: no cover - machine code
    """Tensor ``t`` of the table as (rows, columns), in ``like``'s dtype: g, m (g itself without
    a momentum), θ, the row factor (for a vector the column factor, never written), the column
    factor, and whether it is a vector."""
    n, c = table[t, 6], table[t, 7]
    g = numba.carray(pointer(table[t, 0], like), (n, c))
    m = numba.carray(pointer(table[t, 1] if table[t, 1] != 0 else table[t, 0], like), (n, c))
    p = numba.carray(pointer(table[t, 2], like), (n, c))
    row = numba.carray(pointer(table[t, 3] if table[t, 3] != 0 else table[t, 4], like), n)
    col = numba.carray(pointer(table[t, 4], like), c)
    return g, m, p, row, col, table[t, 3] == 0


@_inner
def classic_scales(table, sc, t, theta_sq, eps2, scale_parameter):  # pragma: no cover
    """The step size ``lr_t`` (scaled by RMS(θ)), written to the tensor's ``lr`` state."""
    count = table[t, 6] * table[t, 7]
    lr = sc[t, 0]
    if scale_parameter:
        lr = lr * max(eps2, np.sqrt(theta_sq.sum() / count))
    numba.carray(pointer(table[t, 5], np.empty(1)), 1)[0] = lr
    return lr


@_inner
def classic_scratch(n, c, like):  # pragma: no cover - machine code
    """Chunks of a tensor's rows, each chunk's column sums of ``g² + ε1`` and of ``g²/R_i``,
    and its sum of ``θ²``."""
    chunks = (n + ROW_CHUNK - 1) // ROW_CHUNK
    col_sums, weighted = np.empty((chunks, c), like.dtype), np.empty((chunks, c), like.dtype)
    return chunks, col_sums, weighted, np.empty(chunks)


@_inner
def classic_clip(lr, u_sq, count, clip, keep):  # pragma: no cover - machine code
    """The update's scale (the step size over the clipping factor) and ``1 - λ·lr`` from the
    table's ``keep = 1 - λ``."""
    return lr / max(1.0, np.sqrt(u_sq / count) / clip), 1.0 - (1.0 - keep) * lr


@_inner
def classic_between(
    table, sc, t, row, col, col_sums, weighted, theta_sq, eps2, clip, scale_parameter
):  # pragma: no cover - machine code
    """Between the passes: the step size, the roots and the update's scale and ``keep``."""
    lr = classic_scales(table, sc, t, theta_sq, eps2, scale_parameter)
    vector = table[t, 3] == 0
    root_row, root_col, u_sq = classic_roots(row, col, col_sums, weighted, sc[t, 1], vector)
    scale, keep = classic_clip(lr, u_sq, table[t, 6] * table[t, 7], clip, sc[t, 2])
    return root_row, root_col, scale, keep


@numba.njit(parallel=True, **_KERNEL)
def classic_adafactor(
    table, sc, like, eps1, eps2, clip, w1, scale_parameter, workers
):  # pragma: no cover
    """Classic Adafactor's step for each tensor of the table (``classic_adafactor.Bucket``):
    ``sc`` holds each tensor's base step size, ``β2_t`` and ``keep = 1 - λ`` in float64, the
    tensors are of ``like``'s dtype."""
    owner = owners(table[:, 6] * table[:, 7], workers)
    for t in range(table.shape[0]):  # shared: each thread the same run of chunks in both passes
        if owner[t] >= 0:
            continue
        g, m, p, row, col, vector = classic_views(table, like, t)
        chunks, col_sums, weighted, theta_sq = classic_scratch(g.shape[0], g.shape[1], like)
        for worker in numba.prange(workers):
            first, end = worker * chunks // workers, (worker + 1) * chunks // workers
            classic_sums(
                g, p, row, vector, col_sums, weighted, theta_sq, eps1, sc[t, 1], first, end
            )
        root_row, root_col, scale, keep = classic_between(
            table, sc, t, row, col, col_sums, weighted, theta_sq, eps2, clip, scale_parameter
        )
        for worker in numba.prange(workers):
            first, end = worker * chunks // workers, (worker + 1) * chunks // workers
            classic_update(
                p, g, m, table[t, 1] != 0, root_row, root_col, scale, keep, w1, first, end
            )
    for worker in numba.prange(workers):  # whole: each thread its own tensors
        for t in range(table.shape[0]):
            if owner[t] != worker:
                continue
            g, m, p, row, col, vector = classic_views(table, like, t)
            chunks, col_sums, weighted, theta_sq = classic_scratch(g.shape[0], g.shape[1], like)
            classic_sums(g, p, row, vector, col_sums, weighted, theta_sq, eps1, sc[t, 1], 0, chunks)
            root_row, root_col, scale, keep = classic_between(
                table, sc, t, row, col, col_sums, weighted, theta_sq, eps2, clip, scale_parameter
            )
            classic_update(
                p, g, m, table[t, 1] != 0, root_row, root_col, scale, keep, w1, 0, chunks
            )
