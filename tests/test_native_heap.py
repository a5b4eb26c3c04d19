"""Freed C memory goes back to the system when the worker asks (media_pipeline/native_heap.py)."""

import ctypes
import os

import pytest

from media_pipeline.native_heap import _malloc_trim, release_free_heap

BLOCK = 16 * 1024  # below glibc's mmap threshold: these come from the heap, as codec buffers do
BLOCKS = 4096  # 64 MiB


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(_malloc_trim is None, reason="not glibc: there is nothing to trim with")
def test_freed_heap_blocks_leave_resident_memory_only_when_trimmed():
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    blocks = [libc.malloc(BLOCK) for _ in range(BLOCKS)]
    for block in blocks:
        ctypes.memset(block, 1, BLOCK)  # resident now
    above = libc.malloc(64)  # holds the heap's top, as a live session's allocations do
    try:
        for block in blocks:
            libc.free(block)
        freed_but_kept = resident_bytes()
        assert release_free_heap()
        assert resident_bytes() < freed_but_kept - BLOCK * BLOCKS // 2
    finally:
        libc.free(above)
