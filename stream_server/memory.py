"""Keep the process's resident memory honest over hours: glibc allocator settings.

glibc serves large allocations with ``mmap`` and hands them back to the OS when freed, but only above
a threshold that it *raises* each time such a block is freed (up to 32 MiB). In a server that
allocates audio buffers and model activations of a few MiB every second, the threshold soon climbs
above them, so they come from the heap instead, where freed blocks fragment and resident memory creeps
up for hours before it levels off. Fixing the threshold (``mallopt(M_MMAP_THRESHOLD, ...)`` also turns
off the raising) keeps every large buffer on ``mmap``: freed is returned, and resident memory follows
what is actually in use. Nothing here is needed for correctness; on other C libraries it does nothing.

The threshold is a trade. Every mmap-served block costs fresh zeroed pages each time it is allocated. On
the project's 2-core machine (int8 SenseVoice, two sessions carrying 8 h of audio each at full speed,
``load_tests/soak.py``) glibc's defaults let RSS wander between 1.03 and 1.26 GB, a drift of +9.5 %
between the first and last hour (+4.2 % in an earlier run, +10.8 % with ``MALLOC_ARENA_MAX=2``); pinned
at 2 MiB it stayed between 0.98 and 1.10 GB with a drift of +1.6 %, but the run took 26.0 minutes
instead of 16.7: with the model saturated by large batches it ran about 1.6x slower. At live pace, one
call at a time, no difference showed (int8 model calls 0.33-0.40 s either way). At 256 KiB single calls
were already about 1.8x slower. Flat memory is this server's promise, so 2 MiB is the default; a CPU
deployment that runs saturated may prefer ``--malloc-mmap-threshold-kb 0``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") else None


def pin_malloc_thresholds(mmap_threshold_bytes: int) -> bool:
    """Fix glibc's mmap threshold (and trim threshold) so freed large buffers go back to the OS.

    Args:
        mmap_threshold_bytes: allocations at least this large are served by mmap; 0 leaves glibc's
            defaults alone.

    Returns:
        True when the settings were applied (glibc), False otherwise.
    """
    if mmap_threshold_bytes <= 0:
        return False
    libc = _libc()
    if libc is None:
        logger.debug("no glibc mallopt here; allocator left as it is")
        return False
    ok = bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(mmap_threshold_bytes)))
    ok = bool(libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(2 * mmap_threshold_bytes))) and ok
    logger.info("glibc allocator: mmap threshold %d KiB (applied: %s)", mmap_threshold_bytes // 1024, ok)
    return ok


def trim() -> bool:
    """Return free heap memory to the OS now (``malloc_trim(0)``); False where there is no glibc."""
    libc = _libc()
    if libc is None or not hasattr(libc, "malloc_trim"):
        return False
    return bool(libc.malloc_trim(0))
