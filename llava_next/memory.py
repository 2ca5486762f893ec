"""Handing memory the process no longer uses back to the system."""

from __future__ import annotations

_malloc_trim = None


def release_free_memory() -> None:
    """glibc's malloc_trim: memory freed by requests of many sizes on many threads stays in the allocator's pools
    (300 MB after a 32-client burst on the tiny test model; the dense weights replaced one by one while loading)
    unless handed back, and counts as the process's memory until then. Elsewhere a no-op."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)
