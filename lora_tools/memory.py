"""Give freed heap memory back to the operating system between batches.

The capture and evaluation loops allocate many large temporaries of changing sizes (a batch's (tokens, out)
outputs per layer and approximation, logits of a 49k vocabulary) between long-lived ones (covariances, statistics).
glibc's malloc serves temporaries below its dynamic mmap threshold (up to 32 MB) from the heap, and the freed
holes between long-lived blocks are never returned: on the bundled SmolLM2 example compare-quant's resident memory
grew from 3.6 GB to 14 GB over the held-out pass with nothing live. ``malloc_trim(0)`` after each batch releases
the free pages (glibc >= 2.8 also returns pages inside the heap); it costs milliseconds per batch. Forcing every
large allocation through mmap (MALLOC_MMAP_THRESHOLD_) bounds memory as well but made that pass 2.4x slower.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from collections.abc import Callable


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None  # not glibc (musl has no malloc_trim): nothing to do
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_memory() -> None:
    """Return the allocator's free pages to the OS (glibc); a no-op elsewhere."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
