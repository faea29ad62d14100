"""One switch for glibc's allocator, shared by the study's workers and the benchmarks."""
from __future__ import annotations


def keep_freed_memory() -> bool:
    """Keep freed memory in glibc's heap (a fixed mmap threshold, no trimming), so that large
    tensors freed and allocated again every step are reused memory, not fresh pages faulted in
    each time. Blocks above glibc's ceiling for the threshold (~32-64 MB) are still mapped afresh.
    The process's resident memory stays at its peak. Returns False off glibc (nothing done)."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))
    except (OSError, AttributeError):
        return False
