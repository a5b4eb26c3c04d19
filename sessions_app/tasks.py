"""Celery tasks: the safety-net sweep.

Scaled: Celery beat runs ``sweep`` every ``SCOPE_SWEEP_SECONDS``
(``CELERY_BEAT_SCHEDULE``). Embedded: no Celery process exists, so
``run_sweeper`` runs the same service on a timer inside the web process.
"""

import asyncio
import logging
from dataclasses import asdict
from typing import Any

from celery import shared_task
from channels.db import database_sync_to_async
from django.conf import settings

from . import services

logger = logging.getLogger(__name__)


@shared_task(name="sessions_app.sweep", ignore_result=True)
def sweep() -> dict[str, Any]:
    result = services.sweep()
    if result.workers_lost or result.closed or result.resent:
        logger.warning("sweep: %s", asdict(result))
    return asdict(result)


async def run_sweeper() -> None:
    """Embedded mode's sweep timer; runs until cancelled by its owner."""
    while True:
        await asyncio.sleep(settings.SCOPE_SWEEP_SECONDS)
        try:
            await database_sync_to_async(sweep)()
        except Exception:
            logger.exception("sweep failed")
