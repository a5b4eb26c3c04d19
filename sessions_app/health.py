"""Liveness and readiness probes: JSON, no auth."""

import asyncio
import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import DatabaseError, connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_safe

from . import selectors

logger = logging.getLogger(__name__)

READYZ_GROUP = "scope.readyz"
CHANNEL_LAYER_TIMEOUT_SECONDS = 1.0


@require_safe
def healthz(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def _database_ok() -> bool:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except DatabaseError:
        logger.warning("readyz: database unreachable", exc_info=True)
        return False
    return True


async def _ping_channel_layer() -> None:
    # A send to an empty group still makes a round trip to the layer's backend.
    await asyncio.wait_for(
        get_channel_layer().group_send(READYZ_GROUP, {"type": "readyz.ping"}), CHANNEL_LAYER_TIMEOUT_SECONDS
    )


def _channel_layer_ok() -> bool:
    try:
        async_to_sync(_ping_channel_layer)()
    except Exception:  # backends fail in many ways (timeouts, OSError, redis errors); any is "not ready"
        logger.warning("readyz: channel layer unreachable", exc_info=True)
        return False
    return True


def _worker_ok() -> bool:
    try:
        return selectors.live_workers().exists()
    except DatabaseError:
        return False


@require_safe
def readyz(request: HttpRequest) -> JsonResponse:
    checks = {"database": _database_ok(), "channel_layer": _channel_layer_ok(), "worker": _worker_ok()}
    ready = all(checks.values())
    return JsonResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks},
        status=200 if ready else 503,
    )
