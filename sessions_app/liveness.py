"""This web process vouches, every heartbeat, for the sockets it holds, and re-checks who holds them.

Each open socket-signaled session's ``signaling_seen_at`` is refreshed while
its socket is connected here. If the process dies (no ``disconnect()`` ever
runs), the refreshes stop and the sweep ends those sessions
``SIGNALING_LOST`` after 3 heartbeats. On the same beat, every socket whose
user was deactivated (or, on the dashboard, lost staff) since it connected is
told so and closes. The sets of sockets are this process's own business, so
they live in this process; the beat runs only while one is non-empty. Its
database calls run on the liveness pool, never behind request handling.
"""

import asyncio
import logging
from dataclasses import dataclass

from channels.layers import get_channel_layer
from django.conf import settings

from . import selectors, services
from .db_lanes import liveness_db
from .messages import SocketRevoked

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Holder:
    """Who a socket was authenticated as, to re-check on every beat."""

    user_id: int
    staff_only: bool


# connection id → the consumer's channel name, for every signaling socket open in this process.
_connections: dict[str, str] = {}
# channel name → who holds it, for every authenticated socket (signaling or dashboard) in this process.
_holders: dict[str, Holder] = {}
_beat: asyncio.Task | None = None


def socket_opened(connection_id: str, channel_name: str) -> None:
    _connections[connection_id] = channel_name
    _ensure_beat()


def socket_closed(connection_id: str) -> None:
    _connections.pop(connection_id, None)
    _stop_beat_if_idle()


def holder_joined(channel_name: str, *, user_id: int, staff_only: bool) -> None:
    _holders[channel_name] = Holder(user_id=user_id, staff_only=staff_only)
    _ensure_beat()


def holder_left(channel_name: str) -> None:
    _holders.pop(channel_name, None)
    _stop_beat_if_idle()


def open_socket_channels() -> list[str]:
    """The channels of this process's open signaling sockets (for the shutdown drain)."""
    return list(_connections.values())


def _ensure_beat() -> None:
    global _beat
    if _beat is None or _beat.done():
        _beat = asyncio.create_task(_beat_forever(), name="signaling-heartbeat")


def _stop_beat_if_idle() -> None:
    global _beat
    if not _connections and not _holders and _beat is not None:
        _beat.cancel()
        _beat = None


async def _beat_forever() -> None:
    while True:
        await asyncio.sleep(settings.SCOPE_HEARTBEAT_SECONDS)
        try:
            await asyncio.wait_for(_beat_once(), settings.SCOPE_HEARTBEAT_SECONDS)
        except Exception:
            logger.exception("signaling heartbeat failed")


async def _beat_once() -> None:
    await liveness_db(services.signaling_heartbeat, connection_ids=list(_connections))
    holders = dict(_holders)
    if not holders:
        return
    revoked = await liveness_db(
        selectors.users_no_longer_allowed,
        user_ids={holder.user_id for holder in holders.values()},
        staff_ids={holder.user_id for holder in holders.values() if holder.staff_only},
    )
    layer = get_channel_layer()
    for channel_name, holder in holders.items():
        lost_staff = holder.staff_only and holder.user_id in revoked.not_staff
        if holder.user_id in revoked.inactive or lost_staff:
            message: SocketRevoked = {"type": "socket.revoked"}
            await layer.send(channel_name, message)
