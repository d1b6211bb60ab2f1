"""The process' C heap (glibc only; a no-op on another libc such as musl).

From the start the mmap threshold is pinned (`bound_heap`), so large payloads (update chunks,
manifests, up to 1 MiB each) are mapped and unmapped on their own instead of fragmenting the heap:
under a flood of 1 MiB messages the agent's RSS grew 14-25 MiB without it, 9-10 MiB with it and the
4 MiB intake/handler queues (tests/test_intake_flood.py). Once settled, `trim` gives freed heap
pages back to the kernel.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it switches the dynamic threshold off
MMAP_THRESHOLD_BYTES = 128 << 10  # glibc's initial value, kept fixed


def _libc(symbol: str) -> Callable[..., int] | None:
    """A glibc function, or None on another libc (musl has neither mallopt nor malloc_trim)."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), symbol, None) if name else None
    except OSError:
        return None


def bound_heap() -> None:
    """At start: allocations over 128 KiB always get their own mapping, given back when freed.

    glibc raises the threshold to the size of each mapped block freed (up to 32 MiB), after which
    1 MiB payloads come from the heap and their freed pages stay resident."""
    mallopt = _libc("mallopt")
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def trim() -> None:
    """Give freed heap pages back to the kernel (malloc_trim)."""
    malloc_trim = _libc("malloc_trim")
    if malloc_trim is not None:
        malloc_trim(0)
