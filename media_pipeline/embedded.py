"""Embedded mode: the media worker runs inside the web process."""

import asyncio

from django.conf import settings

from .worker import MediaWorker

_worker: MediaWorker | None = None
_started: asyncio.Future | None = None


async def ensure_started() -> None:
    """Start this process's media worker once; every caller waits until it is registered."""
    global _worker, _started
    if _started is None:
        _worker = MediaWorker(capacity=settings.SCOPE_WORKER_CAPACITY)
        _started = asyncio.ensure_future(_worker.start())
    await asyncio.shield(_started)
