"""Give the C heap's free pages back to the system after a session ends.

A session's codecs, SRTP contexts and frame buffers are C allocations
(libvpx, FFmpeg, OpenSSL), spread over glibc's per-thread arenas. When the
session ends they are freed, but glibc keeps most of the pages for reuse, so
a worker's resident memory climbed by tens of MiB over a thousand sessions
that left nothing alive behind (the churn bench). ``malloc_trim(0)`` hands
the free pages of every arena back; elsewhere than glibc it is absent and
nothing is done.
"""

import ctypes
from collections.abc import Callable


def _find_malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


_malloc_trim = _find_malloc_trim()


def release_free_heap() -> bool:
    """Return the C heap's free pages to the system; whether any were (False where not glibc).

    It walks every arena under its lock, for a few milliseconds: call it off the event loop.
    """
    return _malloc_trim is not None and bool(_malloc_trim(0))
