"""Celery tasks: the safety-net sweep, pruning old records, delivering webhooks.

Scaled: Celery beat runs ``sweep`` every ``SCOPE_SWEEP_SECONDS`` and
``prune_sessions`` daily (``CELERY_BEAT_SCHEDULE``). Embedded: no Celery
process exists, so ``run_sweeper`` and ``run_pruner`` run them inside the web process.
"""

import asyncio
import logging
from dataclasses import asdict
from typing import Any

from celery import shared_task
from django.conf import settings

from . import metrics, selectors, services, webhooks
from .db_lanes import liveness_db

logger = logging.getLogger(__name__)

PRUNE_EVERY_SECONDS = 24 * 3600


@shared_task(name="sessions_app.sweep", ignore_result=True)
def sweep() -> dict[str, Any]:
    result = services.sweep()
    metrics.count_sweep(result)
    if result.workers_lost or result.closed or result.resent or result.placed:
        logger.warning("sweep: %s", asdict(result))
    try:
        webhooks.resend_overdue()  # webhook deliveries whose hand-off was lost
    except Exception:
        logger.exception("webhooks: resending overdue deliveries failed")
    return asdict(result)


@shared_task(name="sessions_app.deliver_webhook", bind=True, ignore_result=True, max_retries=None)
def deliver_webhook(self, delivery_id: int) -> None:
    """One attempt at a webhook delivery (scaled); a failed one comes back after its backoff (webhooks.attempt)."""
    delay = webhooks.attempt(delivery_id)
    if delay is not None:
        raise self.retry(countdown=delay)


@shared_task(name="sessions_app.prune_sessions", ignore_result=True)
def prune_sessions() -> int:
    """Delete sessions closed more than ``SCOPE_RETENTION_DAYS`` ago (0: keep them all)."""
    if not settings.SCOPE_RETENTION_DAYS:
        return 0
    cutoff = selectors.retention_cutoff(settings.SCOPE_RETENTION_DAYS)
    webhooks.prune(older_than=cutoff)  # finished webhook deliveries, on the same schedule
    return services.sessions_prune(older_than=cutoff)


async def run_sweeper() -> None:
    """Embedded mode's sweep timer; runs until cancelled by its owner."""
    while True:
        await asyncio.sleep(settings.SCOPE_SWEEP_SECONDS)
        try:
            await liveness_db(sweep)
        except Exception:
            logger.exception("sweep failed")


async def run_pruner() -> None:
    """Embedded mode's daily prune (the first soon after start), apart from the sweep so a backlog never delays it."""
    while True:
        try:
            await liveness_db(prune_sessions)
        except Exception:
            logger.exception("pruning old sessions failed")
        await asyncio.sleep(PRUNE_EVERY_SECONDS)
