"""The glibc allocator settings (stream_server/memory.py) do what they claim, in a fresh process each.

glibc raises its mmap threshold each time an mmap-served block is freed, so after a 4 MiB buffer comes
and goes, 1 MiB buffers are carved from the heap, where freed space fragments. Pinned, they stay on
mmap and go back to the OS when freed. ``mallinfo2().hblks`` (blocks served by mmap) shows which.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

from stream_server import memory

PROBE = r"""
import ctypes, ctypes.util, sys
from stream_server import memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
                 "fordblks", "keepcost")]

libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
print("applied", memory.pin_malloc_thresholds(int(sys.argv[1]) * 1024))
libc.free(libc.malloc(4 << 20))          # raises glibc's dynamic threshold to 4 MiB unless pinned
before = libc.mallinfo2().hblks
block = libc.malloc(1 << 20)
print("mmapped", libc.mallinfo2().hblks - before)
libc.free(block)
"""


def _glibc_with_mallinfo2() -> bool:
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    return hasattr(libc, "mallopt") and hasattr(libc, "mallinfo2")


def probe(threshold_kb: int) -> str:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(threshold_kb)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return done.stdout


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc 2.33+ (mallopt, mallinfo2)")
def test_pinned_threshold_keeps_megabyte_buffers_on_mmap() -> None:
    assert probe(256).split() == ["applied", "True", "mmapped", "1"]


@pytest.mark.skipif(not _glibc_with_mallinfo2(), reason="needs glibc 2.33+ (mallopt, mallinfo2)")
def test_without_pinning_glibc_moves_them_to_the_heap() -> None:
    """The control: 0 leaves glibc's defaults, and the same 1 MiB buffer comes from the heap."""
    assert probe(0).split() == ["applied", "False", "mmapped", "0"]


def test_trim_and_zero_threshold_are_harmless() -> None:
    assert memory.pin_malloc_thresholds(0) is False
    assert isinstance(memory.trim(), bool)
