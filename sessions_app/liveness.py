"""This web process vouches, every heartbeat, for the signaling sockets it holds.

Each open socket-signaled session's ``signaling_seen_at`` is refreshed while
its socket is connected here. If the process dies (no ``disconnect()`` ever
runs), the refreshes stop and the sweep ends those sessions
``SIGNALING_LOST`` after 3 heartbeats. The set of connections is this
process's own business, so it lives in this process; the beat runs only while
the set is non-empty.
"""

import asyncio
import logging

from channels.db import database_sync_to_async
from django.conf import settings

from . import services

logger = logging.getLogger(__name__)

# connection id → the consumer's channel name, for every signaling socket open in this process.
_connections: dict[str, str] = {}
_beat: asyncio.Task | None = None


def socket_opened(connection_id: str, channel_name: str) -> None:
    global _beat
    _connections[connection_id] = channel_name
    if _beat is None or _beat.done():
        _beat = asyncio.create_task(_vouch_forever(), name="signaling-heartbeat")


def socket_closed(connection_id: str) -> None:
    global _beat
    _connections.pop(connection_id, None)
    if not _connections and _beat is not None:
        _beat.cancel()
        _beat = None


def open_socket_channels() -> list[str]:
    """The channels of this process's open signaling sockets (for the shutdown drain)."""
    return list(_connections.values())


async def _vouch_forever() -> None:
    while True:
        await asyncio.sleep(settings.SCOPE_HEARTBEAT_SECONDS)
        try:
            await asyncio.wait_for(
                database_sync_to_async(services.signaling_heartbeat)(connection_ids=list(_connections)),
                settings.SCOPE_HEARTBEAT_SECONDS,
            )
        except Exception:
            logger.exception("signaling heartbeat failed")
