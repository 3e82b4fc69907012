"""Classic Adafactor's whole step for one tensor in one kernel on CPU.

Its step size and its clipping are reductions of the same step: RMS(θ) scales the step size,
RMS(u) of the whole update clips it. Compiled by inductor, the step read ``g`` and ``θ`` five
times and more (4-6x the bandwidth bound on the benchmark model). This kernel (numba, called by
the fast path outside its compiled graph) takes one tensor at a time, in chunks of
:data:`~optarena.optim.blocks.ROW_CHUNK` rows, in two passes:

1. one read of ``g`` and ``θ``: the chunk's column sums of ``g² + ε1`` and its sum of ``θ²``;
   each row's factor ``R_i`` as soon as its row is summed, and (the row still in L1) the
   chunk's column sums of ``g²/R_i``. Then the step size, the column factor ``C_j`` and the
   roots. The sum of ``u² = g²·mean(R)/(R_i C_j)``, hence the clipping, is
   ``mean(R)·Σ_j (Σ_i g²/R_i)/C_j``: no second read of ``g`` for it;
2. ``θ = (1 - λ·lr_t)·θ - lr_t/clip · u`` (through the momentum when ``beta1`` is set), last
   chunk first: the rows read last are still in cache.

A tensor held whole by one thread (``numba_kernels.owners``) is read from memory about once: its
``g`` and ``θ`` stay in the last-level cache between the passes. Sums are added per chunk, in
chunk order, so the result does not depend on the threads. A vector (one second moment per
entry) is one row whose columns are its moment. CPU, float32/float64, contiguous tensors of
one or two axes, numba installed (``numba_support.py``); anything else keeps the compiled
expression (``AdafactorClassic.fused_direction``), which computes the same numbers.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import Tensor

from optarena.optim import numba_support


def applies(p: Tensor, g: Tensor, state: dict[str, Tensor]) -> bool:
    """Whether :class:`Bucket` can make this parameter's whole step."""
    if p.dim() not in (1, 2) or p.shape != g.shape:
        return False
    lr = state.get("lr")
    if lr is None or lr.dtype != torch.float64 or lr.device.type != "cpu" or lr.dim():
        return False
    keys = ("exp_avg_sq",) if p.dim() == 1 else ("exp_avg_sq_row", "exp_avg_sq_col")
    factors = [state.get(k) for k in keys]
    m = state.get("exp_avg")
    if any(f is None for f in factors) or (m is not None and m.shape != p.shape):
        return False
    return numba_support.plain_cpu(p, g, m, *factors)


@functools.cache
def _kernel() -> Any:
    """The numba kernel (``numba_kernels.classic_adafactor``), compiled on first call, cached
    on disk."""
    from optarena.optim import numba_kernels

    return numba_kernels.classic_adafactor


class Bucket:
    """One kernel call for a bucket's tensors, prepared once: a table of addresses and shapes.
    Each call fills in the addresses of the gradients and of ``θ`` (``p.data`` may be
    replaced); the momentum, the factors and ``lr`` (where the step size is written, for the
    weight decay of the eager path and for checkpoints) are the optimizer's own state."""

    def __init__(self, ps: list[Tensor], states: list[dict[str, Tensor]]) -> None:
        self.ps = ps
        rows = []
        for p, st in zip(ps, states, strict=True):
            m = st["exp_avg"].data_ptr() if "exp_avg" in st else 0  # 0: no momentum
            if p.dim() == 1:  # one row; its columns' factor is its second moment
                row, col, shape = 0, st["exp_avg_sq"].data_ptr(), (1, p.numel())
            else:
                row, col = st["exp_avg_sq_row"].data_ptr(), st["exp_avg_sq_col"].data_ptr()
                shape = tuple(p.shape)
            rows.append((0, m, 0, row, col, st["lr"].data_ptr(), *shape))
        self.table = np.array(rows, dtype=np.int64).reshape(-1, 8)
        self.like = np.empty(0, numba_support.numpy_dtype(ps[0]))

    def __call__(self, gs: list[Tensor], scalars: np.ndarray, group: dict[str, Any]) -> None:
        """Update every ``θ`` in place; ``scalars`` is ``(k, 3)``: each tensor's step size
        before RMS(θ) scaling, ``β2_t`` and ``keep = 1 - λ``."""
        self.table[:, 0] = [g.data_ptr() for g in gs]
        self.table[:, 2] = [p.data_ptr() for p in self.ps]
        eps1, eps2 = group["eps"]
        beta1 = group["beta1"]
        numba_support.run(
            _kernel(),
            self.table,
            np.ascontiguousarray(scalars, dtype=np.float64),
            self.like,
            float(eps1),
            float(eps2),
            float(group["clip_threshold"]),
            1.0 - (beta1 or 0.0),
            bool(group["scale_parameter"]),
        )
