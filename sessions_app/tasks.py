"""Celery tasks: the safety-net sweep, and retrying a session's file cleanup.

Scaled: Celery beat runs ``sweep`` every ``SCOPE_SWEEP_SECONDS``
(``CELERY_BEAT_SCHEDULE``). Embedded: no Celery process exists, so
``run_sweeper`` runs the same service on a timer inside the web process.
"""

import asyncio
import logging
from dataclasses import asdict
from pathlib import Path
from typing import Any

from celery import shared_task
from channels.db import database_sync_to_async
from django.conf import settings

from . import services
from .session_files import remove_session_files

logger = logging.getLogger(__name__)

CLEANUP_BACKOFF_CAP_SECONDS = 60


@shared_task(name="sessions_app.sweep", ignore_result=True)
def sweep() -> dict[str, Any]:
    result = services.sweep()
    if result.workers_lost or result.closed or result.resent:
        logger.warning("sweep: %s", asdict(result))
    return asdict(result)


@shared_task(bind=True, name="sessions_app.retry_session_cleanup", ignore_result=True, max_retries=None)
def retry_session_cleanup(self, *, session_id: str, files_dir: str) -> None:
    """Remove a closing session's files that its worker could not; then the session closes.

    Retries with exponential backoff (1 s doubling, capped at a minute) until it
    succeeds; in embedded mode (eager) the sweep calls it again instead.
    """
    try:
        removed = remove_session_files(Path(files_dir))
    except OSError as exc:
        logger.warning("cleanup of session %s still failing: %s", session_id, exc)
        if self.request.is_eager:
            return
        raise self.retry(exc=exc, countdown=min(CLEANUP_BACKOFF_CAP_SECONDS, 2**self.request.retries)) from exc
    services.session_cleanup_done(session_id=session_id, files_removed=removed)


async def run_sweeper() -> None:
    """Embedded mode's sweep timer; runs until cancelled by its owner."""
    while True:
        await asyncio.sleep(settings.SCOPE_SWEEP_SECONDS)
        try:
            await database_sync_to_async(sweep)()
        except Exception:
            logger.exception("sweep failed")
