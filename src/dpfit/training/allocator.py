"""Keep freed host memory inside the process (glibc malloc), so training steps do not page-fault.

A training step allocates and frees arrays of the same sizes every step (the embedding rows, their
gradients, the fitting nets' activations: up to a few MB each on the water example). With glibc's
defaults, arrays above the mmap threshold get fresh pages from the kernel and the freed top of the heap
goes back to it, so every step faults in (and the kernel zeroes) thousands of pages again: about 5000
per float64 water step on the development machine, where keeping them made the step ~8% faster
(median of medians 63.8 -> 55.9 ms, six interleaved rounds; 5100 -> 15 faults per step). The cost is
that the process keeps the memory of its largest step instead of returning it between steps.

Linux with glibc only (elsewhere :func:`keep_freed_memory` does nothing and returns False). CUDA
memory is PyTorch's own caching allocator and is not affected.
"""

from __future__ import annotations

import ctypes
import logging
import sys

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

#: glibc's largest mmap threshold on 64-bit systems (larger values are refused)
MAX_MMAP_THRESHOLD = 32 << 20


def keep_freed_memory(trim_threshold: int = 1 << 30, top_pad: int = 256 << 20,
                      mmap_threshold: int = MAX_MMAP_THRESHOLD) -> bool:
    """Tell glibc malloc to serve allocations up to ``mmap_threshold`` bytes from its heap, to grow the
    heap ``top_pad`` bytes at a time and to return freed memory only beyond ``trim_threshold`` bytes.
    Returns whether every setting was taken (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl or another libc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, mmap_threshold), (M_TOP_PAD, top_pad), (M_TRIM_THRESHOLD, trim_threshold))
    ok = all(mallopt(option, value) == 1 for option, value in settings)
    if ok:
        log.debug("glibc malloc keeps freed memory (mmap threshold %d, top pad %d, trim threshold %d bytes)",
                  mmap_threshold, top_pad, trim_threshold)
    return ok
