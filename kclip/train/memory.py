"""glibc's malloc on the CPU training path.

By default glibc hands large freed blocks back to the kernel (munmap, or trimming the heap's top) and adapts its
thresholds as it goes. A training step frees all its activations and gradients and allocates them again in the next
one, so every step faults its ~150 MB back in, zeroed, one 4 KiB page at a time: ~40,000 page faults and ~13% of a demo
step on a CPU (BENCHMARKS.md, "kclip vs open_clip"). Fixing the thresholds keeps freed blocks in the process for the
next step, as tcmalloc or jemalloc would; the resident size stays at the peak of a step (+4% on the demo).
"""
from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger("kclip.train")

# glibc's malloc.h
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# glibc's ceiling for the mmap threshold on 64-bit (HEAP_MAX_SIZE / 2): blocks above it are always mapped anew, which
# for them is cheap next to the work that fills them.
_MMAP_THRESHOLD = 32 << 20
# Only a heap top larger than this goes back to the kernel: what a step frees is reused by the next one.
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Set glibc's malloc to keep freed memory for reuse in this process (and the loader workers it forks afterwards).
    False where that is not glibc (macOS, musl): nothing is changed there."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL("libc.so.6")
    # mallopt returns 1 on success; fixing the mmap threshold also stops glibc's dynamic adjustment of both.
    kept = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1
    log.debug("malloc: freed memory kept for reuse: %s", kept)
    return kept
