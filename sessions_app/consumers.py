"""The signaling WebSocket, ``/ws/webrtc/``.

One handler per client message type (``handle_<type>``) and per channel-layer
message type (``signaling_answer``, ``session_ended``, …). All state lives in
the database; this consumer only remembers which sessions its socket opened,
and owns the timers it starts.
"""

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer
from django.conf import settings
from django.utils import timezone

from media_pipeline.parameters import apply_update
from media_pipeline.pipelines import ParameterError, ignored_parameters, validate_parameters

from . import errors, limits, liveness, selectors, services
from .errors import ScopeError, close_message, keeps_socket, socket_close_code
from .json_limits import parse_json_message
from .messages import (
    QUEUE_GROUP,
    QueueChanged,
    SessionEnded,
    SessionPlaced,
    SignalingAnswer,
    SignalingError,
    SignalingShutdown,
    SocketRevoked,
)
from .models import CloseReason
from .sdp import validate_offer
from .turn import ice_servers_for

logger = logging.getLogger(__name__)

CLOSE_UNAUTHORIZED = 4003
# A socket refused at connect, before it held anything: HTTP's status, in the application range.
REFUSAL_CLOSE_CODES = {errors.RATE_LIMITED: 4029, errors.NO_CAPACITY: 4503}
# A queued socket hears of its new place at most this often.
PLACE_UPDATE_INTERVAL_SECONDS = 1.0
MAX_USER_ID_LENGTH = 128


def _db(func: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    return database_sync_to_async(func)


class SignalingConsumer(AsyncWebsocketConsumer):
    async def connect(self) -> None:
        self.user = self.scope.get("user")
        self.connection_id = uuid.uuid4().hex
        self.authorized = False
        self.revoked = False
        self.ended = False
        self.user_label = ""
        # Open sessions of this socket, oldest first; the first is reserved at connect.
        self.session_ids: list[str] = []
        self.reserved_session_id: str | None = None
        self.queued = False
        self.place_sent: int | None = None  # the queue place this socket was last told
        self.place_sent_at = 0.0
        self.place_due: int | None = None  # the place to tell at the next update
        self.timers: dict[tuple[str, str], asyncio.TimerHandle] = {}
        self.tasks: set[asyncio.Task] = set()
        await self.accept()
        allowed = self.user is not None and (self.user.is_authenticated or settings.SCOPE_ALLOW_ANONYMOUS)
        if self.scope.get("auth_error") or not allowed:
            await self._send_error(errors.UNAUTHORIZED, "Authentication required.")
            await self.close(CLOSE_UNAUTHORIZED)
            return
        try:
            await _db(limits.check_connection)(user=self.user, address=self._address())
            await self._reserve_session()
        except ScopeError as exc:
            await self._send_error(exc.code, exc.message)
            await self.close(REFUSAL_CLOSE_CODES[exc.code])
            return
        self.authorized = True
        liveness.socket_opened(self.connection_id, self.channel_name)
        if self.user.is_authenticated:
            liveness.holder_joined(self.channel_name, user_id=self.user.pk, staff_only=False)
        await self._offer_slot()

    async def _reserve_session(self) -> None:
        """A waiting session for this socket's next offer (RATE_LIMITED, NO_CAPACITY: queue full)."""
        session = await _db(services.session_create)(
            owner=self.user, connection_id=self.connection_id, signaling_channel=self.channel_name,
            queue_limit=settings.SCOPE_MAX_QUEUE,
        )
        self.reserved_session_id = str(session.pk)
        self.session_ids.append(self.reserved_session_id)

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            # Channels skips disconnect() when a consumer crashes or is cancelled;
            # its sessions must end with it all the same.
            if getattr(self, "authorized", False) and not self.ended:
                await asyncio.shield(self._end_sessions(f"socket:{self.connection_id}:consumer-ended"))

    async def disconnect(self, code: int) -> None:
        for timer in self.timers.values():
            timer.cancel()
        for task in self.tasks:
            task.cancel()
        if self.queued:
            await self.channel_layer.group_discard(QUEUE_GROUP, self.channel_name)
        if self.authorized:
            await self._end_sessions(f"socket:{self.connection_id}")

    async def _end_sessions(self, by: str) -> None:
        """Every session this socket created ends with it (CLIENT_DISCONNECT). Once."""
        self.ended = True
        liveness.socket_closed(self.connection_id)
        liveness.holder_left(self.channel_name)
        await self._close_open_sessions(CloseReason.CLIENT_DISCONNECT, by)

    async def _close_open_sessions(self, reason: str, by: str) -> None:
        # From the database, not self.session_ids: even sessions this socket lost track of.
        for session_id in await _db(selectors.open_sessions_of_connection)(connection_id=self.connection_id):
            await _db(services.session_close)(session_id=session_id, reason=reason, by=by)

    # --- the ready gate ------------------------------------------------------

    async def _offer_slot(self) -> None:
        """Send ``ready`` once the reserved session holds a slot, else ``queued`` with its place."""
        session_id = self.reserved_session_id
        if session_id is None or session_id not in self.session_ids:
            return
        if not self.queued:
            # Joined before trying, so a slot given out right after the try is still heard of.
            self.queued = True
            await self.channel_layer.group_add(QUEUE_GROUP, self.channel_name)
        if await _db(services.session_place)(session_id=session_id):
            await self._slot_ready(session_id)
        else:
            await self._tell_place(session_id, await _db(selectors.queue_place)(session_id=session_id))

    async def _slot_ready(self, session_id: str) -> None:
        self.queued = False
        self._disarm(session_id, "place")
        await self.channel_layer.group_discard(QUEUE_GROUP, self.channel_name)
        self._arm(session_id, "offer", settings.SCOPE_OFFER_TIMEOUT_SECONDS, CloseReason.IDLE_TIMEOUT, "offer-timeout")
        await self._send({"type": "ready", "connection_id": self.connection_id, "sessionId": session_id})

    async def _tell_place(self, session_id: str, place: int | None) -> None:
        """Act on the place looked up for the reserved session (0: it holds a slot; None: it ended)."""
        # Re-checked after the lookup: a ``session.placed`` may have been handled meanwhile.
        if not self.queued or session_id != self.reserved_session_id or place is None:
            return
        if place == 0:
            await self._slot_ready(session_id)
            return
        self.place_due = place
        key = (session_id, "place")
        if key in self.timers:
            return  # an update is already due: it will carry this place
        loop = asyncio.get_running_loop()
        delay = max(0.0, self.place_sent_at + PLACE_UPDATE_INTERVAL_SECONDS - loop.time())

        def send_due() -> None:
            self.timers.pop(key, None)
            self._spawn(self._send_due_place())

        self.timers[key] = loop.call_later(delay, send_due)

    async def _send_due_place(self) -> None:
        place = self.place_due
        if not self.queued or place == self.place_sent:
            return
        self.place_sent, self.place_sent_at = place, asyncio.get_running_loop().time()
        await self._send({"type": "queued", "position": place})

    async def session_placed(self, message: SessionPlaced) -> None:
        if self.queued and message["session_id"] == self.reserved_session_id:
            await self._slot_ready(message["session_id"])

    async def queue_changed(self, message: QueueChanged) -> None:
        """Places moved: the message lists the queue, so each socket finds its own without the database."""
        session_id = self.reserved_session_id
        if not self.queued or session_id is None:
            return
        if session_id in message["queued"]:
            place: int | None = message["queued"].index(session_id) + 1
        else:
            # Not queued any more (placed, its notice late or lost; or ended) or newer than the list: ask.
            place = await _db(selectors.queue_place)(session_id=session_id)
        await self._tell_place(session_id, place)

    # --- client messages -----------------------------------------------------

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        # Messages over 64 KiB never get here: the WebSocket layer closes with 1009
        # (scope_site/daphne_limits.py).
        if not self.authorized or self.revoked:
            return
        request_id = None
        try:
            if text_data is None:
                raise ScopeError(errors.INVALID_MESSAGE, "Messages must be JSON text frames.")
            message = parse_json_message(text_data)
            if not isinstance(message, dict):
                raise ScopeError(errors.INVALID_MESSAGE, "A message must be a JSON object.")
            request_id = message.get("request_id")
            kind = message.get("type")
            handler = getattr(self, f"handle_{kind}", None) if isinstance(kind, str) and kind.isidentifier() else None
            if handler is None:
                raise ScopeError(errors.INVALID_MESSAGE, f"Unknown message type {kind!r}.")
            await handler(message, request_id)
        except ScopeError as exc:
            await self._send_error(exc.code, exc.message, request_id=request_id)
        except ParameterError as exc:
            await self._send_error(errors.INVALID_MESSAGE, str(exc), request_id=request_id)

    async def handle_ping(self, message: dict[str, Any], request_id: Any) -> None:
        await self._send({"type": "pong"}, request_id)

    async def handle_set_user_id(self, message: dict[str, Any], request_id: Any) -> None:
        user_id = message.get("user_id")
        if not isinstance(user_id, (str, int)) or len(str(user_id)) > MAX_USER_ID_LENGTH:
            raise ScopeError(errors.INVALID_MESSAGE, "user_id must be a string of at most 128 characters.")
        self.user_label = str(user_id)  # a label only: identity comes from authentication
        await self._send({"type": "user_id_set", "user_id": self.user_label}, request_id)

    async def handle_get_ice_servers(self, message: dict[str, Any], request_id: Any) -> None:
        await self._send(
            {"type": "ice_servers", "data": {"iceServers": ice_servers_for(self.user)}, "status": 200}, request_id
        )

    async def handle_offer(self, message: dict[str, Any], request_id: Any) -> None:
        sdp = validate_offer(message.get("sdp"), message.get("sdp_type", "offer"))
        initial = message.get("initialParameters")
        pipeline, parameters = validate_parameters(initial, default_pipeline=settings.SCOPE_DEFAULT_PIPELINE)
        await _db(limits.check_offer)(user=self.user, address=self._address())
        session_id = await self._session_for_offer()
        session = await _db(services.session_offer)(
            session_id=session_id, pipeline=pipeline, parameters=parameters,
            ignored_parameters=ignored_parameters(initial, pipeline=pipeline), sdp=sdp, sdp_type="offer",
            reply_channel=self.channel_name, request_id=request_id,
        )
        self._arm(session_id, "negotiation", settings.SCOPE_NEGOTIATION_TIMEOUT_SECONDS,
                  CloseReason.ERROR, "negotiation-timeout")
        delay = (session.deadline_at - timezone.now()).total_seconds()
        self._arm(session_id, "deadline", delay, CloseReason.MAX_DURATION_EXCEEDED, "deadline")

    async def _session_for_offer(self) -> str:
        """The reserved session for the first offer; a newly placed one for each further offer."""
        reserved = self.reserved_session_id
        if reserved in self.session_ids:
            if self.queued:
                raise ScopeError(errors.NO_CAPACITY, "Still queued: wait for 'ready' before sending an offer.")
            self._disarm(reserved, "offer")
            self.reserved_session_id = None
            return reserved
        if len(self.session_ids) >= settings.SCOPE_MAX_SESSIONS_PER_SOCKET:
            raise ScopeError(
                errors.NO_CAPACITY,
                f"At most {settings.SCOPE_MAX_SESSIONS_PER_SOCKET} sessions per socket.",
            )
        session = await _db(services.session_create_placed)(
            owner=self.user, connection_id=self.connection_id, signaling_channel=self.channel_name
        )
        self.session_ids.append(str(session.pk))
        return str(session.pk)

    async def handle_icecandidate(self, message: dict[str, Any], request_id: Any) -> None:
        candidate = message.get("candidate")
        if candidate is not None and not (isinstance(candidate, dict) and isinstance(candidate.get("candidate"), str)):
            raise ScopeError(errors.INVALID_MESSAGE, "candidate must be null or an object with a 'candidate' string.")
        session_id = self._own_session(message)
        await _db(services.session_add_candidate)(session_id=session_id, candidate=candidate)
        status = "ok" if candidate is not None else "end_of_candidates"
        await self._send({"type": "icecandidate_ack", "status": status, "sessionId": session_id}, request_id)

    async def handle_parameters(self, message: dict[str, Any], request_id: Any) -> None:
        session_id = self._own_session(message)
        update = {k: v for k, v in message.items() if k not in ("type", "request_id", "sessionId")}
        current_pipeline, current_parameters = await _db(selectors.session_pipeline)(session_id=session_id)
        pipeline, parameters = apply_update(pipeline=current_pipeline, parameters=current_parameters, update=update)
        await _db(services.session_set_parameters)(
            session_id=session_id, pipeline=pipeline, parameters=parameters, notify_worker=True
        )
        await self._send({"type": "parameters_ack", "sessionId": session_id, "pipeline": pipeline, **parameters},
                         request_id)

    def _own_session(self, message: dict[str, Any]) -> str:
        """The session a message names (default: this socket's newest offered one), if this socket owns it."""
        session_id = message.get("sessionId")
        if session_id is None:
            offered = [sid for sid in self.session_ids if sid != self.reserved_session_id]
            if not offered:
                raise ScopeError(errors.UNKNOWN_SESSION, "No session on this socket yet: send an offer first.")
            return offered[-1]
        if not isinstance(session_id, str) or session_id not in self.session_ids:
            raise ScopeError(errors.UNKNOWN_SESSION, f"No open session {session_id!r} on this socket.")
        return session_id

    # --- timers ----------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _arm(self, session_id: str, name: str, delay: float, reason: str, cause: str) -> None:
        def fire() -> None:
            self.timers.pop((session_id, name), None)
            self._spawn(_db(services.session_close)(session_id=session_id, reason=reason, by=f"socket:{cause}"))

        self.timers[(session_id, name)] = asyncio.get_running_loop().call_later(max(0.0, delay), fire)

    def _disarm(self, session_id: str, name: str) -> None:
        timer = self.timers.pop((session_id, name), None)
        if timer is not None:
            timer.cancel()

    # --- channel-layer messages -------------------------------------------------

    async def signaling_answer(self, message: SignalingAnswer) -> None:
        self._disarm(message["session_id"], "negotiation")
        await self._send(
            {"type": "answer", "sdp": message["sdp"], "sdp_type": message["sdp_type"],
             "sessionId": message["session_id"]},
            message["request_id"],
        )

    async def signaling_error(self, message: SignalingError) -> None:
        self._disarm(message["session_id"], "negotiation")
        await self._send_error(message["code"], message["error"], request_id=message["request_id"],
                               session_id=message["session_id"])

    async def signaling_shutdown(self, message: SignalingShutdown) -> None:
        """This web process is stopping: end this socket's sessions; the last one's end closes it (4012)."""
        await self._close_open_sessions(CloseReason.SERVER_SHUTDOWN, f"socket:{self.connection_id}:shutdown")
        if not self.session_ids:
            await self.close(socket_close_code(CloseReason.SERVER_SHUTDOWN))

    async def socket_revoked(self, message: SocketRevoked) -> None:
        """Its user was deactivated: the account's sessions end as an operator's act would end them.

        Each ending reaches this socket as usual (the error, then 4009 after the
        last); the socket takes no more messages, and closes after the close
        bound even if an ending's message was lost.
        """
        self.revoked = True
        await self._close_open_sessions(CloseReason.SESSION_TERMINATED, f"socket:{self.connection_id}:user-inactive")
        code = socket_close_code(CloseReason.SESSION_TERMINATED)
        self.timers[("", "revoked")] = asyncio.get_running_loop().call_later(
            settings.SCOPE_CLOSE_WAIT_SECONDS, lambda: self._spawn(self.close(code))
        )

    async def session_ended(self, message: SessionEnded) -> None:
        session_id, reason = message["session_id"], message["reason"]
        if session_id not in self.session_ids:
            return
        self.session_ids.remove(session_id)
        if session_id == self.reserved_session_id and self.queued:
            self.queued = False
            await self.channel_layer.group_discard(QUEUE_GROUP, self.channel_name)
        for timer in ("negotiation", "deadline", "offer", "place"):
            self._disarm(session_id, timer)
        await self._send_error(
            reason, close_message(reason, max_session_seconds=settings.SCOPE_MAX_SESSION_SECONDS), session_id=session_id
        )
        if keeps_socket(reason):
            # The client closed or lost only its peer: it may offer again on this socket.
            if self.reserved_session_id not in self.session_ids:
                try:
                    await self._reserve_session()
                except ScopeError as exc:
                    # As at connect: a socket that may not wait for a slot is closed, not left hanging.
                    await self._send_error(exc.code, exc.message)
                    if not self.session_ids:
                        await self.close(REFUSAL_CLOSE_CODES[exc.code])
                    return
                await self._offer_slot()
            return
        code = socket_close_code(reason)
        if not self.session_ids and code is not None:
            await self.close(code)

    def _address(self) -> str | None:
        client = self.scope.get("client")
        return client[0] if client else None

    # --- sending -----------------------------------------------------------------

    async def _send(self, payload: dict[str, Any], request_id: Any = None) -> None:
        if request_id is not None:
            payload["request_id"] = request_id
        await self.send(text_data=json.dumps(payload))

    async def _send_error(self, code: str, text: str, *, request_id: Any = None, session_id: str | None = None) -> None:
        payload: dict[str, Any] = {"type": "error", "code": code, "error": text}
        if session_id is not None:
            payload["sessionId"] = session_id
        await self._send(payload, request_id)
