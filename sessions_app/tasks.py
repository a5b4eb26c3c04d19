"""Celery tasks: the safety-net sweep and pruning old records.

Scaled: Celery beat runs ``sweep`` every ``SCOPE_SWEEP_SECONDS`` and
``prune_sessions`` daily (``CELERY_BEAT_SCHEDULE``). Embedded: no Celery
process exists, so ``run_sweeper`` runs both on a timer inside the web process.
"""

import asyncio
import logging
import time
from dataclasses import asdict
from typing import Any

from celery import shared_task
from django.conf import settings

from . import services
from .db_lanes import liveness_db
from .retention import retention_cutoff, sessions_prune

logger = logging.getLogger(__name__)

PRUNE_EVERY_SECONDS = 24 * 3600


@shared_task(name="sessions_app.sweep", ignore_result=True)
def sweep() -> dict[str, Any]:
    result = services.sweep()
    if result.workers_lost or result.closed or result.resent or result.placed:
        logger.warning("sweep: %s", asdict(result))
    return asdict(result)


@shared_task(name="sessions_app.prune_sessions", ignore_result=True)
def prune_sessions() -> int:
    """Delete sessions closed more than ``SCOPE_RETENTION_DAYS`` ago (0: keep them all)."""
    if not settings.SCOPE_RETENTION_DAYS:
        return 0
    return sessions_prune(older_than=retention_cutoff(settings.SCOPE_RETENTION_DAYS))


async def run_sweeper() -> None:
    """Embedded mode's sweep timer, and its daily prune (the first soon after start); runs until cancelled."""
    prune_at = time.monotonic()
    while True:
        await asyncio.sleep(settings.SCOPE_SWEEP_SECONDS)
        try:
            await liveness_db(sweep)
        except Exception:
            logger.exception("sweep failed")
        if time.monotonic() >= prune_at:
            prune_at += PRUNE_EVERY_SECONDS
            try:
                await liveness_db(prune_sessions)
            except Exception:
                logger.exception("pruning old sessions failed")
