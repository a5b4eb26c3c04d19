"""The operators' live dashboard socket, ``/ws/dashboard/``.

Staff only. On connect it sends a snapshot; after that every session
transition and worker heartbeat that the services announce to
``DASHBOARD_GROUP`` is read back from the database and pushed, so the page
never polls. Rows have the REST API's shapes.
"""

import json
from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.utils import timezone

from . import errors, liveness, selectors
from .messages import DASHBOARD_GROUP, DashboardSession, DashboardWorker, SocketRevoked
from .serializers import StreamSessionSerializer, WorkerSerializer

CLOSE_UNAUTHORIZED = 4003
RECENTLY_CLOSED = 20
GONE_WORKERS_SHOWN_FOR = timedelta(hours=1)


def _snapshot() -> dict[str, Any]:
    open_sessions, closed = selectors.dashboard_sessions(recently_closed=RECENTLY_CLOSED)
    workers = selectors.dashboard_workers(gone_within=GONE_WORKERS_SHOWN_FOR)
    return {
        "type": "snapshot",
        "now": timezone.now().isoformat(),
        "sessions": StreamSessionSerializer(open_sessions, many=True).data,
        "closed": StreamSessionSerializer(closed, many=True).data,
        "workers": WorkerSerializer(workers, many=True).data,
    }


def _session_update(session_id: str) -> dict[str, Any] | None:
    session = selectors.dashboard_session(session_id=session_id)
    if session is None:
        return None
    return {"type": "session", "now": timezone.now().isoformat(), "session": StreamSessionSerializer(session).data}


def _worker_update(worker_id: int) -> dict[str, Any] | None:
    worker = selectors.workers_with_load().filter(pk=worker_id).first()
    if worker is None:
        return None
    # A heartbeat also carries the worker's sessions' frame counts.
    sessions = selectors.open_sessions_of_worker(worker_id=worker_id)
    return {
        "type": "worker",
        "now": timezone.now().isoformat(),
        "worker": WorkerSerializer(worker).data,
        "sessions": StreamSessionSerializer(sessions, many=True).data,
    }


class DashboardConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        user = self.scope.get("user")
        self.joined = False
        await self.accept()
        if self.scope.get("auth_error") or user is None or not (user.is_authenticated and user.is_staff):
            await self._send({"type": "error", "code": errors.UNAUTHORIZED, "error": "Staff only."})
            await self.close(CLOSE_UNAUTHORIZED)
            return
        # Joined before the snapshot is read, so no change falls between the two.
        await self.channel_layer.group_add(DASHBOARD_GROUP, self.channel_name)
        self.joined = True
        liveness.holder_joined(self.channel_name, user_id=user.pk, staff_only=True)
        await self._send(await database_sync_to_async(_snapshot)())

    async def disconnect(self, code: int) -> None:
        if self.joined:
            await self.channel_layer.group_discard(DASHBOARD_GROUP, self.channel_name)
            liveness.holder_left(self.channel_name)

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        # The dashboard only listens; its one action (terminate) goes through the REST API.
        await self._send({"type": "error", "code": errors.INVALID_MESSAGE, "error": "This socket takes no messages."})

    async def socket_revoked(self, message: SocketRevoked) -> None:
        """Its user lost staff or was deactivated since connecting."""
        await self._send({"type": "error", "code": errors.UNAUTHORIZED, "error": "Staff only."})
        await self.close(CLOSE_UNAUTHORIZED)

    async def dashboard_session(self, message: DashboardSession) -> None:
        update = await database_sync_to_async(_session_update)(message["session_id"])
        if update is not None:
            await self._send(update)

    async def dashboard_worker(self, message: DashboardWorker) -> None:
        update = await database_sync_to_async(_worker_update)(message["worker_id"])
        if update is not None:
            await self._send(update)

    async def _send(self, payload: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(payload))
