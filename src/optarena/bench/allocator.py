"""A steady CPU allocator for benchmarks: what a training process settles into.

glibc serves large blocks with fresh ``mmap`` pages and returns them on ``free``; it raises that
threshold only as big blocks come and go. So a step's temporaries (16 MB each for the 33.7M
Llama shape) either reuse heap memory or page-fault in afresh, depending on what the process
happened to free before: on the project's 2-core VM the official adam-mini step took 57 ms in
one run and 33 ms in another, lion-pytorch 57 and 34 ms. A training loop frees activations
every step and soon runs in the first regime; ``steady()`` puts a benchmark there from the
start (blocks up to 32 MiB from the heap, the heap never trimmed).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling on 64-bit
TRIM_THRESHOLD = 1 << 30


def steady() -> bool:
    """Fix glibc's mmap and trim thresholds; ``False`` where that is not possible (not glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)) and bool(
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
