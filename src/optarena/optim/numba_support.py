"""What the CPU kernels written with numba (``numba_kernels.py``) share on the torch side:
whether numba is here, which tensors it takes, and its threads.

The fast path calls these kernels (``factored_adam.py``, ``block_adam.py``) for the tensors
where inductor would read a tensor twice, outside its compiled graph. They run only on CPU, for
float32 and float64 contiguous tensors, and only where numba is installed; everything else
keeps the torch expression, which computes the same numbers.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import numpy as np
import torch
from torch import Tensor

DTYPES = (torch.float32, torch.float64)

# checked once, outside any trace: torch.compile reads it as a constant
HAVE_NUMBA = importlib.util.find_spec("numba") is not None


def plain_cpu(*tensors: Tensor | None) -> bool:
    """Whether numba can take these tensors as they are: on CPU, float32 or float64 of one
    dtype, contiguous, non-empty (None entries are ignored)."""
    given = [t for t in tensors if t is not None]
    dtype = given[0].dtype
    for t in given:
        if t.device.type != "cpu" or t.dtype != dtype or not t.is_contiguous() or not t.numel():
            return False
    return HAVE_NUMBA and dtype in DTYPES


def unchanged(
    params: list[Tensor], grads: list[Tensor], shapes: list[torch.Size], dtype: torch.dtype
) -> list[bool]:
    """Per tensor, whether a kernel call prepared for ``θ`` of this shape and dtype still fits:
    ``θ`` and its gradient of that shape and dtype, both contiguous (a gradient's strides may
    change from one step to the next, ``p.data`` may be replaced)."""
    return [
        p.dtype == dtype
        and g.dtype == dtype
        and p.shape == shape
        and g.shape == shape
        and p.is_contiguous()
        and g.is_contiguous()
        for p, g, shape in zip(params, grads, shapes, strict=True)
    ]


def numpy_dtype(t: Tensor) -> Any:
    """The numpy dtype of a tensor of one of :data:`DTYPES`."""
    return np.float32 if t.dtype == torch.float32 else np.float64


def run(kernel: Any, *args: Any) -> None:
    """Call a numba kernel with ``args`` and, last, its thread count: torch's, so that numba's
    parallel loops use as many threads as torch's operators. torch's count is left untouched.

    The kernel takes its thread count as an argument because one that calls
    ``numba.get_num_threads()`` is not cached on disk. Starting numba's OpenMP pool (a second
    copy of GNU OpenMP here, beside torch's) has reset ``torch.get_num_threads()`` to the cores
    (tested in a fresh process), which would make every compiled step, which guards on it,
    recompile.
    """
    import numba

    count = torch.get_num_threads()
    workers = min(count, numba.config.NUMBA_NUM_THREADS)
    numba.set_num_threads(workers)
    try:
        kernel(*args, workers)
    finally:
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
