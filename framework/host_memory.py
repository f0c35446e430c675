"""Keep freed host memory inside the process, so that a CPU step's large temporaries reuse
pages instead of mapping fresh ones.

glibc serves allocations of 32 MiB and more (and, through its adaptive threshold, many
smaller ones) with a fresh mmap, which the kernel zero-fills page by page on first touch and
unmaps again on free. A TopK step at n=16384, d=512 allocates several such blocks (gradients,
decoder projections, AuxK's scatter), so it page-faults tens of thousands of times per step;
on the 2-core VM that measured it, that was ~15% of the step. PyTorch caches device memory
for the same reason; its CPU allocator leaves it to malloc, which these two settings turn
into a cache: no mmap for large blocks, and no returning the top of the heap to the OS
below 2 GiB free. The cost is resident memory: the heap stays at its peak, plus a few
blocks of the largest size while malloc's free lists settle (3 extra 64 MiB blocks for a
loop of 64 MiB allocations, after which every block reuses pages: tests/test_host_memory.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_TRIM_ABOVE = (1 << 31) - 1  # bytes free at the top of the heap before any is returned

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Apply the settings once per process (glibc on Linux; elsewhere a no-op). True if applied."""
    global _applied
    if _applied is None:
        _applied = _mallopt(_M_MMAP_MAX, 0) and _mallopt(_M_TRIM_THRESHOLD, _TRIM_ABOVE)
    return _applied


def _mallopt(param: int, value: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)  # absent from musl
    return bool(mallopt is not None and mallopt(param, value) == 1)
