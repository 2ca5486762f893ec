"""How the process's allocator keeps and hands back memory (glibc's malloc; elsewhere these are no-ops)."""

from __future__ import annotations

import os

_libc = None

# mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_MAX = 32 * 2**20  # the largest glibc accepts on 64-bit systems
TRIM_THRESHOLD = 2**30

_kept = False


def libc():
    """glibc through ctypes, or False where the C library is another one."""
    global _libc
    if _libc is None:
        try:
            import ctypes

            _libc = ctypes.CDLL("libc.so.6")
            _libc.mallopt, _libc.malloc_trim  # glibc's own functions: musl and others lack one or both
        except (OSError, AttributeError):
            _libc = False
    return _libc


def keep_freed_memory() -> None:
    """Let freed blocks of up to 32 MB wait in the allocator for the next operation instead of going back to the
    system at once.

    By default glibc returns every large freed block (an activation of a few MB, a new one for each operation of a
    prompt) to the system, and the next operation's output is page-faulted in again, zeroed page by page: 390,000
    faults and ~0.4 s of a 4.1 s float32 prompt of the medium benchmark model (BENCHMARKS.md). Kept, the freed blocks
    are reused and the prompt faults none. The peak is the same memory in use; what differs is that the allocator
    holds on to its free blocks afterwards until `release_free_memory` (the server's engine calls it when idle).
    LLAVA_NEXT_KEEP_FREED_MEMORY=0 leaves the allocator as it was. Once per process.
    """
    global _kept
    if _kept or os.environ.get("LLAVA_NEXT_KEEP_FREED_MEMORY", "1") == "0" or not libc():
        return
    _kept = True
    # (Setting either turns off glibc's sliding threshold, which would only ever reach these values.)
    libc().mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_MAX)
    libc().mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


def release_free_memory() -> None:
    """glibc's malloc_trim: memory freed by requests of many sizes on many threads stays in the allocator's pools
    (300 MB after a 32-client burst on the tiny test model; the dense weights replaced one by one while loading)
    unless handed back, and counts as the process's memory until then."""
    if libc():
        libc().malloc_trim(0)
