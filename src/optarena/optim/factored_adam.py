"""Adafactor's whole step for one matrix in one kernel on CPU.

A factored second moment needs the sum of ``g²`` over every row and every column of the matrix
before any entry is updated, so an exact step reads the matrix twice. Compiled by inductor it
read ``g`` three times: the row and the column sums are reductions along different axes (two
read-only passes; a float64 column sum over an odd number of rows walks the tensor one column
strip at a time), then the update, and every tensor's reductions ran before every tensor's
update, so each second read came from memory. This kernel (numba, called by the fast path
outside its compiled graph) takes one matrix at a time:

1. in chunks of :data:`~optarena.optim.blocks.ROW_CHUNK` rows, one read-write stream over
   ``g`` and ``m``: ``m = lerp(m, g, 1-β1)``, each row's sum of ``g²``, and its squares added
   into the chunk's column accumulator (which stays in L1);
2. the factors' EMAs and their roots (``FactoredSecondMoment.roots``), once per row and column;
3. ``θ = keep·θ - size · m / (r_i c_j + ε)``, walking the chunks of pass 1 in reverse, so
   that the rows of ``m`` written last, still in cache, are read first (a matrix of a few MB
   is read wholly from cache; the output layer's 16 MB in part).

Each thread takes whole matrices (``numba_kernels.owners``), so a matrix's passes never wait
for another thread; one too large to balance that way is shared, each thread taking a run of
its chunks in both passes. Either way the sums are added chunk by chunk in order: the result
does not depend on the threads.

Without a momentum (``β1 = 0``) pass 1 only reads ``g`` and pass 3 reads ``g`` again. ``size``
is the step size with the first bias correction, ``bc2`` the second, ``keep = 1 - lr·λ``: the
same numbers as the compiled expression, to float32 rounding. CPU, float32/float64, contiguous
matrices of one dtype, numba installed (``numba_support.py``). Adafactor's vectors (one
second moment each) go to ``block_adam``'s kernel as one row; anything else (tensors of more
than two axes, bfloat16 parameters, CUDA) keeps the compiled expression.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
from torch import Tensor

from optarena.optim import numba_support


def applies(p: Tensor, g: Tensor, m: Tensor | None, rows: Tensor, cols: Tensor) -> bool:
    """Whether :func:`step_` runs the kernel for this matrix (``m`` None: no momentum)."""
    if p.dim() != 2 or p.shape != g.shape or (m is not None and m.shape != p.shape):
        return False
    return numba_support.plain_cpu(p, g, m, rows, cols)


@functools.cache
def _kernel() -> Any:
    """The numba kernel (``numba_kernels.factored_adam``), compiled on first call, cached on
    disk."""
    from optarena.optim import numba_kernels

    return numba_kernels.factored_adam


class Bucket:
    """One kernel call for a bucket's matrices, prepared once: a table of addresses and shapes
    (a call per matrix cost ~10 µs of dispatch and conversions). Each call fills in the
    addresses of the gradients (new tensors each step when they are set to None) and of ``θ``
    (``p.data`` may be replaced); ``m`` and the factors are the optimizer's own state."""

    def __init__(
        self, ps: list[Tensor], ms: list[Tensor] | None, rows: list[Tensor], cols: list[Tensor]
    ) -> None:
        self.ps = ps
        momenta = [m.data_ptr() for m in ms] if ms else [0] * len(ps)  # 0: no momentum
        self.table = np.array(
            [
                (0, m, 0, r.data_ptr(), c.data_ptr(), *p.shape)
                for p, m, r, c in zip(ps, momenta, rows, cols, strict=True)
            ],
            dtype=np.int64,
        ).reshape(-1, 7)
        self.dtype = numba_support.numpy_dtype(ps[0])

    def __call__(
        self, gs: list[Tensor], scalars: np.ndarray, beta1: float, beta2: float, eps: float
    ) -> None:
        """Update every matrix ``θ`` (its momentum, row factor ``(n, 1)`` and column factor
        ``(1, c)``) in place; ``scalars`` is ``(k, 3)``: each matrix's step size, second bias
        correction and ``keep``."""
        self.table[:, 0] = [g.data_ptr() for g in gs]
        self.table[:, 2] = [p.data_ptr() for p in self.ps]
        # in the tensors' dtype, as the graph's
        sc = np.ascontiguousarray(scalars, dtype=self.dtype)
        tiny = float(np.finfo(self.dtype).tiny)
        numba_support.run(_kernel(), self.table, sc, 1.0 - beta1, beta2, eps, tiny)


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
    """One step of every matrix in one call (see :class:`Bucket`; :func:`applies` says what the
    tensors must be; ``ms`` None: no momentum)."""
    Bucket(ps, ms, rows, cols)(gs, scalars, beta1, beta2, eps)
