"""Keeping host memory flat over a long run (glibc malloc; no-ops elsewhere).

Every section allocates and frees the same large transients (the VAE decode's convolution
buffers, hundreds of MB at full resolution). With glibc's defaults, freed blocks stay in the heap
fragmented, the dynamic mmap threshold grows after each large free, and the peak resident size
creeps up with the number of sections even though live memory is constant.
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 16 << 20


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def tune_allocator(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Serve allocations of ``threshold`` bytes or more by mmap, so freeing them returns the
    memory to the OS at once; fixing the threshold also stops glibc from raising it. Process-wide:
    applications (the CLI, the UI server) call this once at start, the library never does.
    """
    libc = _libc()
    ok = bool(libc is not None and hasattr(libc, "mallopt") and libc.mallopt(M_MMAP_THRESHOLD, threshold))
    log.debug("mmap threshold %s", f"set to {threshold} bytes" if ok else "unchanged (not glibc)")
    return ok


def release_freed_memory() -> None:
    """Return freed heap pages to the OS (``malloc_trim``); the pipeline calls it each section."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
