"""Freed C memory goes back to the system when the worker asks (media_pipeline/native_heap.py)."""

import json
import subprocess
import sys

import pytest

from media_pipeline.native_heap import _malloc_trim
from tests.harness import REPO_ROOT

# Run in a fresh interpreter: in the test process's own heap, after hundreds of tests, where freed blocks
# land and what free() already returns by itself depend on what ran before.
HEAP_SCRIPT = """
import ctypes, json, os
from media_pipeline.native_heap import release_free_heap

BLOCK, BLOCKS = 16 * 1024, 4096  # 64 MiB in blocks below glibc's mmap threshold, as codec buffers are

def resident():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
before = resident()
blocks = [libc.malloc(BLOCK) for _ in range(BLOCKS)]
for block in blocks:
    ctypes.memset(block, 1, BLOCK)
above = libc.malloc(64)  # holds the heap's top, as a live session's allocations do
for block in blocks:
    libc.free(block)
freed = resident()
trimmed = release_free_heap()
print(json.dumps({"before": before, "freed": freed, "trimmed": trimmed, "after": resident()}))
"""
MIB = 1 << 20


@pytest.mark.skipif(_malloc_trim is None, reason="not glibc: there is nothing to trim with")
def test_freed_heap_blocks_leave_resident_memory_only_when_trimmed():
    run = subprocess.run([sys.executable, "-c", HEAP_SCRIPT], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=60, check=True)
    sizes = json.loads(run.stdout)
    assert sizes["freed"] - sizes["before"] > 32 * MIB, f"free() alone gave the 64 MiB back: {sizes}"
    assert sizes["trimmed"]
    assert sizes["freed"] - sizes["after"] > 32 * MIB, sizes
