"""Every state change of workers and sessions.

Each service is keyword-only and atomic; messages that other processes must see
are sent only after the transaction commits. ``session_close`` is the one entry
point for ending a session, whatever the cause, and is idempotent.
"""

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from . import errors, selectors
from .errors import ScopeError
from .messages import (
    DASHBOARD_GROUP,
    QUEUE_GROUP,
    DashboardSession,
    DashboardWorker,
    PeerCandidate,
    PeerClose,
    PeerOffer,
    PeerParameters,
    QueueChanged,
    SessionEnded,
    session_group,
)
from .models import CloseReason, SessionEvent, StreamSession, Worker

logger = logging.getLogger(__name__)


# --- channel-layer sends, only after commit ---------------------------------


def _send_after_commit(channel: str, message: dict[str, Any]) -> None:
    transaction.on_commit(lambda: async_to_sync(get_channel_layer().send)(channel, message))


def _group_send_after_commit(group: str, message: dict[str, Any]) -> None:
    transaction.on_commit(lambda: async_to_sync(get_channel_layer().group_send)(group, message))


def _announce_session(session: StreamSession) -> None:
    """Tell operators' dashboards the session changed; they read it back themselves."""
    message: DashboardSession = {"type": "dashboard.session", "session_id": str(session.pk)}
    _group_send_after_commit(DASHBOARD_GROUP, message)


def _announce_worker(worker_id: int) -> None:
    message: DashboardWorker = {"type": "dashboard.worker", "worker_id": worker_id}
    _group_send_after_commit(DASHBOARD_GROUP, message)


def _record(session: StreamSession, kind: str, *, at: datetime | None = None, **detail: Any) -> None:
    SessionEvent.objects.create(session=session, kind=kind, at=at or timezone.now(), detail=detail)


def _locked_session(session_id: str) -> StreamSession:
    session = StreamSession.objects.select_for_update().filter(pk=session_id).first()
    if session is None:
        raise ScopeError(errors.UNKNOWN_SESSION, f"No session {session_id}.")
    return session


# --- workers ----------------------------------------------------------------


@transaction.atomic
def worker_register(*, channel_name: str, host: str, pid: int, device: str, capacity: int) -> Worker:
    worker = Worker.objects.create(
        channel_name=channel_name,
        host=host,
        pid=pid,
        device=device,
        capacity=capacity,
        heartbeat_at=timezone.now(),
    )
    _announce_worker(worker.pk)
    return worker


@dataclass(frozen=True)
class FrameCounts:
    frames_in: int
    frames_out: int


@transaction.atomic
def worker_heartbeat(
    *, worker_id: int, peer_count: int, frames: dict[str, FrameCounts], asyncio_tasks: int = 0
) -> None:
    """Record that the worker is alive, what it holds (peers, event-loop tasks) and its sessions' frame counts."""
    Worker.objects.filter(pk=worker_id).update(
        heartbeat_at=timezone.now(), peer_count=peer_count, asyncio_tasks=asyncio_tasks
    )
    for session_id, counts in frames.items():
        StreamSession.objects.filter(pk=session_id, worker_id=worker_id).update(
            frames_in=counts.frames_in, frames_out=counts.frames_out
        )
    _announce_worker(worker_id)


@transaction.atomic
def worker_retire(*, worker_id: int) -> None:
    """The worker process is exiting cleanly: it takes no more sessions."""
    Worker.objects.filter(pk=worker_id).update(state=Worker.State.GONE, peer_count=0)
    _announce_worker(worker_id)


# --- sessions: creation, placement, negotiation --------------------------------


@transaction.atomic
def session_create(
    *, owner: AbstractBaseUser | None, connection_id: str = "", signaling_channel: str = ""
) -> StreamSession:
    session = StreamSession.objects.create(
        owner=owner if owner is not None and owner.is_authenticated else None,
        connection_id=connection_id,
        signaling_channel=signaling_channel,
        signaling_seen_at=timezone.now() if signaling_channel else None,
    )
    _record(session, SessionEvent.Kind.CREATED, connection_id=connection_id)
    _announce_session(session)
    return session


@transaction.atomic
def session_place(*, session_id: str) -> bool:
    """Hold a worker slot for a waiting session; False while none is free.

    Waiting sessions are placed first come, first served. A slot stays held
    until its session is ``closed``, so a freed slot means a finished teardown.
    """
    session = _locked_session(session_id)
    if session.worker_id is not None:
        return True
    if session.state != StreamSession.State.WAITING:
        return False
    ahead = StreamSession.objects.filter(
        state=StreamSession.State.WAITING, worker__isnull=True, created_at__lt=session.created_at
    )
    if ahead.exists():
        return False
    candidates = []
    for worker in selectors.live_workers().select_for_update().order_by("id"):
        used = worker.sessions.exclude(state=StreamSession.State.CLOSED).count()
        if used < worker.capacity:
            candidates.append((used, worker.pk, worker))
    if not candidates:
        return False
    _, _, worker = min(candidates, key=lambda item: item[:2])
    session.worker = worker
    session.save(update_fields=["worker"])
    _record(session, SessionEvent.Kind.PLACED, worker=worker.pk)
    _announce_session(session)
    return True


@transaction.atomic
def session_create_placed(
    *, owner: AbstractBaseUser | None, connection_id: str = "", signaling_channel: str = ""
) -> StreamSession:
    """Create a session that holds a slot now, or raise NO_CAPACITY and create nothing."""
    session = session_create(owner=owner, connection_id=connection_id, signaling_channel=signaling_channel)
    if not session_place(session_id=str(session.pk)):
        transaction.set_rollback(True)
        raise ScopeError(errors.NO_CAPACITY, "No media worker has a free slot.")
    return StreamSession.objects.select_related("worker").get(pk=session.pk)


@transaction.atomic
def session_offer(*, session_id: str, pipeline: str, parameters: dict[str, Any], sdp: str, sdp_type: str,
                  reply_channel: str, request_id: Any = None) -> StreamSession:
    """A placed, waiting session received its offer: hand it to its worker.

    The max-duration clock starts here.
    """
    session = _locked_session(session_id)
    if session.state != StreamSession.State.WAITING or session.worker_id is None:
        raise ScopeError(errors.INVALID_MESSAGE, f"Session {session_id} is {session.state}, not waiting for an offer.")
    now = timezone.now()
    session.state = StreamSession.State.NEGOTIATING
    session.pipeline = pipeline
    session.parameters = parameters
    session.deadline_at = now + timedelta(seconds=settings.SCOPE_MAX_SESSION_SECONDS)
    session.save(update_fields=["state", "pipeline", "parameters", "deadline_at"])
    _announce_session(session)
    message: PeerOffer = {
        "type": "peer.offer",
        "session_id": str(session.pk),
        "sdp": sdp,
        "sdp_type": sdp_type,
        "pipeline": pipeline,
        "parameters": parameters,
        "reply_channel": reply_channel,
        "request_id": request_id,
    }
    _send_after_commit(session.worker.channel_name, message)
    return session


@transaction.atomic
def session_answered(*, session_id: str) -> datetime | None:
    """The worker produced an answer: its deadline, or None if the session ended meanwhile."""
    session = _locked_session(session_id)
    if session.state != StreamSession.State.NEGOTIATING:
        return None
    _record(session, SessionEvent.Kind.ANSWERED)
    return session.deadline_at


@transaction.atomic
def session_live(*, session_id: str) -> bool:
    """The peer connection reached ``connected``."""
    session = _locked_session(session_id)
    if session.state != StreamSession.State.NEGOTIATING:
        return False
    session.state = StreamSession.State.LIVE
    session.live_at = timezone.now()
    session.save(update_fields=["state", "live_at"])
    _record(session, SessionEvent.Kind.LIVE, at=session.live_at)
    _announce_session(session)
    return True


def _open_placed_session(session_id: str) -> StreamSession:
    session = StreamSession.objects.select_related("worker").filter(pk=session_id).first()
    if session is None or not session.is_open:
        raise ScopeError(errors.UNKNOWN_SESSION, f"No open session {session_id}.")
    if session.worker is None or session.state == StreamSession.State.WAITING:
        raise ScopeError(errors.INVALID_MESSAGE, f"Session {session_id} has no offer yet.")
    return session


def session_add_candidate(*, session_id: str, candidate: dict[str, Any] | None) -> None:
    """Forward a trickled ICE candidate to the session's worker (None: end of candidates)."""
    session = _open_placed_session(session_id)
    message: PeerCandidate = {"type": "peer.candidate", "session_id": str(session.pk), "candidate": candidate}
    async_to_sync(get_channel_layer().send)(session.worker.channel_name, message)


@transaction.atomic
def session_set_parameters(*, session_id: str, pipeline: str, parameters: dict[str, Any], notify_worker: bool) -> None:
    """Record new pipeline parameters; tell the worker unless it is the one reporting them."""
    session = _open_placed_session(session_id)
    session.pipeline = pipeline
    session.parameters = parameters
    session.save(update_fields=["pipeline", "parameters"])
    _announce_session(session)
    if notify_worker:
        message: PeerParameters = {
            "type": "peer.parameters",
            "session_id": str(session.pk),
            "parameters": {"pipeline": pipeline, **parameters},
        }
        _send_after_commit(session.worker.channel_name, message)


# --- sessions: the close path --------------------------------------------------


@transaction.atomic
def session_close(*, session_id: str, reason: str, by: str) -> bool:
    """End a session, whatever the cause. The one entry point; idempotent.

    Marks the session ``closing`` (once: a later call returns False and changes
    nothing) and tells its worker to tear the peer down. A session that never
    reached a worker has nothing to tear down and is closed at once.
    """
    if reason not in CloseReason.values:
        raise ValueError(f"unknown close reason {reason!r}")
    session = _locked_session(session_id)
    if not session.is_open:
        return False
    had_peer = session.state != StreamSession.State.WAITING
    now = timezone.now()
    session.state = StreamSession.State.CLOSING
    session.close_reason = reason
    session.closing_at = now
    session.save(update_fields=["state", "close_reason", "closing_at"])
    _record(session, SessionEvent.Kind.CLOSING, at=now, reason=reason, by=by)
    if had_peer:
        message: PeerClose = {"type": "peer.close", "session_id": str(session.pk), "reason": reason}
        _send_after_commit(session.worker.channel_name, message)
        # After the teardown's own message: dashboards must not delay it.
        _announce_session(session)
    else:
        _finish_close(session)
    return True


@dataclass(frozen=True)
class TeardownStep:
    """One step of a worker's teardown, timed where it happened."""

    kind: str
    at: datetime
    detail: dict[str, Any] = field(default_factory=dict)


@transaction.atomic
def session_closed(
    *, session_id: str, steps: list[TeardownStep], frames: FrameCounts | None = None
) -> bool:
    """The worker finished tearing a closing session down: record it and free the slot."""
    session = _locked_session(session_id)
    if session.state != StreamSession.State.CLOSING:
        return False
    for step in steps:
        _record(session, step.kind, at=step.at, **step.detail)
    if frames is not None:
        session.frames_in = frames.frames_in
        session.frames_out = frames.frames_out
    _finish_close(session)
    return True


def _finish_close(session: StreamSession) -> None:
    session.state = StreamSession.State.CLOSED
    session.closed_at = timezone.now()
    session.save()
    _record(session, SessionEvent.Kind.CLOSED, at=session.closed_at)
    ended: SessionEnded = {"type": "session.ended", "session_id": str(session.pk), "reason": session.close_reason}
    if session.signaling_channel and session.close_reason != CloseReason.CLIENT_DISCONNECT:
        _send_after_commit(session.signaling_channel, ended)
    _group_send_after_commit(session_group(str(session.pk)), ended)
    if session.worker_id is not None:
        queue_changed: QueueChanged = {"type": "queue.changed"}
        _group_send_after_commit(QUEUE_GROUP, queue_changed)
    _announce_session(session)
