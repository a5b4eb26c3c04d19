"""Python's garbage collector in a media worker: its start-up objects left out, its pauses measured.

A collection holds the GIL while it walks the objects of its generations, so
every session's frames (decode, pipeline, encode, RTP) wait for it. A worker
holds about 300 000 objects once started (Django, torch, aiortc, the
pipelines), and they live as long as the process: a full collection walked
them all, for 113–162 ms on the bench machine, and sessions coming and going
set one off every 15 s or so. Frozen once the worker has started, they are
left out, and a full collection walks what sessions allocated: 11–33 ms.
"""

import gc
import time
from typing import Any

from .metrics import GC_PAUSE_SECONDS

_pause_started = 0.0
_observing = False


def freeze_start_up_objects() -> int:
    """Collect once, then leave every object alive now out of all later collections; how many that is."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def observe_pauses() -> None:
    """Time every collection into ``scope_gc_pause_seconds{generation}`` (once per process)."""
    global _observing
    if not _observing:
        gc.callbacks.append(_on_collection)
        _observing = True


def _on_collection(phase: str, info: dict[str, Any]) -> None:
    # Collections never overlap (each holds the GIL throughout), so one start time suffices.
    global _pause_started
    if phase == "start":
        _pause_started = time.perf_counter()
    else:
        GC_PAUSE_SECONDS[info["generation"]].observe(time.perf_counter() - _pause_started)
