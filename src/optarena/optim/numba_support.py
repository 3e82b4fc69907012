"""What the CPU kernels written with numba share: whether numba is here, and its threads.

The fast path calls these kernels (``square_sums.py``, ``block_adam.py``) from inside its
compiled graphs, where inductor would read a tensor twice. They run only on CPU, for float32 and
float64 contiguous tensors, and only where numba is installed; everything else keeps the torch
expression, which computes the same numbers.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterator
from typing import Any

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


def array(t: Tensor) -> Any:
    """``t``'s memory as a numpy array (no copy), detached if it requires grad."""
    return (t.detach() if t.requires_grad else t).numpy()


@functools.cache
def pointer() -> Any:
    """A numba intrinsic: ``pointer(address, like)`` is a pointer to ``like``'s dtype at an
    integer address (``Tensor.data_ptr()``), for ``numba.carray``: a kernel then takes a whole
    bucket's tensors as one table of addresses, in one call."""
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def pointer(typingctx, address, like):
        ptr = types.CPointer(like.dtype)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(ptr))

        return ptr(address, like), codegen

    return pointer


@contextlib.contextmanager
def threads() -> Iterator[None]:
    """Run numba's parallel loops on torch's thread count, and leave torch's untouched.

    numba's OpenMP pool may share the OpenMP runtime with torch: starting it sizes the runtime
    to the cores, which would change ``torch.get_num_threads()`` (and make every compiled step,
    which guards on it, recompile).
    """
    import numba

    count = torch.get_num_threads()
    numba.set_num_threads(min(count, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        if torch.get_num_threads() != count:
            torch.set_num_threads(count)
