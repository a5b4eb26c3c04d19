"""Embedded mode: the media worker and the safety-net sweep run inside the web process."""

import asyncio

from django.conf import settings

from sessions_app.tasks import run_sweeper

from .worker import MediaWorker

_worker: MediaWorker | None = None
_started: asyncio.Future | None = None
# Lives as long as the process: it is the embedded stand-in for Celery beat.
_sweeper: asyncio.Task | None = None


async def ensure_started() -> None:
    """Start this process's media worker and sweeper once; every caller waits until the worker is registered."""
    global _worker, _started, _sweeper
    if _started is None:
        _worker = MediaWorker(capacity=settings.SCOPE_WORKER_CAPACITY)
        _started = asyncio.ensure_future(_worker.start())
        _sweeper = asyncio.create_task(run_sweeper(), name="embedded-sweeper")
    await asyncio.shield(_started)


async def stop() -> None:
    """Drain the in-process worker (its sessions end SERVER_SHUTDOWN) and stop the sweeper."""
    if _sweeper is not None:
        _sweeper.cancel()
    if _worker is not None and _started is not None and _started.done():
        await _worker.stop()
