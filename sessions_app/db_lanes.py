"""Database calls that must not wait behind request handling.

Channels runs every ``database_sync_to_async`` call of a process on one
thread, one after another. Liveness — heartbeats, the sweep, the media
worker's reports — must never queue behind a burst of sockets connecting or
failing there, or a busy process would be taken for a dead one. Those calls
run on a small pool of their own.
"""

import asyncio
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any, Callable, TypeVar

from django.db import close_old_connections

T = TypeVar("T")

_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="liveness-db")


def _call(func: Callable[..., T], kwargs: dict[str, Any]) -> T:
    close_old_connections()
    try:
        return func(**kwargs)
    finally:
        close_old_connections()


async def liveness_db(func: Callable[..., T], /, **kwargs: Any) -> T:
    """Run ``func(**kwargs)`` on the liveness pool, with Django's per-call connection handling."""
    return await asyncio.get_running_loop().run_in_executor(_pool, partial(_call, func, kwargs))
