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
from django.db.models import F
from django.db.models.functions import Now
from django.utils import timezone

from . import errors, lifecycle, selectors
from .errors import ScopeError
from .messages import (
    DASHBOARD_GROUP,
    QUEUE_GROUP,
    DashboardSession,
    DashboardWorker,
    PeerCandidate,
    PeerCleanup,
    PeerClose,
    PeerOffer,
    PeerParameters,
    PeerUnview,
    PeerView,
    PeerViewCandidate,
    QueueChanged,
    SessionEnded,
    SessionPlaced,
    session_group,
)
from .models import CloseReason, SessionEvent, SessionViewer, StreamSession, SweepClock, Worker
from .sdp import count_candidates

logger = logging.getLogger(__name__)


# --- channel-layer sends, only after commit ---------------------------------


# robust: the state is committed either way; a send lost to a channel-layer outage is
# logged, and the sweep re-sends what matters (a close stuck in ``closing``).
def _send_after_commit(channel: str, message: dict[str, Any]) -> None:
    transaction.on_commit(lambda: async_to_sync(get_channel_layer().send)(channel, message), robust=True)


def _group_send_after_commit(group: str, message: dict[str, Any]) -> None:
    transaction.on_commit(lambda: async_to_sync(get_channel_layer().group_send)(group, message), robust=True)


def _announce_session(session: StreamSession) -> None:
    """Tell operators' dashboards the session changed; they read it back themselves."""
    message: DashboardSession = {"type": "dashboard.session", "session_id": str(session.pk)}
    _group_send_after_commit(DASHBOARD_GROUP, message)


def _announce_worker(worker_id: int) -> None:
    message: DashboardWorker = {"type": "dashboard.worker", "worker_id": worker_id}
    _group_send_after_commit(DASHBOARD_GROUP, message)


def _record(session: StreamSession, kind: str, *, at: datetime | None = None, **detail: Any) -> None:
    """Add a step to the session's trail; watchers (lifecycle.session_step) hear of it after commit."""
    at = at or timezone.now()
    SessionEvent.objects.create(session=session, kind=kind, at=at, detail=detail)
    step = lifecycle.SessionStep(
        kind=kind, at=at, detail=detail, session_id=str(session.pk), state=session.state,
        owner=session.owner.get_username() if session.owner_id else None, connection_id=session.connection_id,
        worker_id=session.worker_id, pipeline=session.pipeline, close_reason=session.close_reason,
        created_at=session.created_at, live_at=session.live_at, closing_at=session.closing_at,
        closed_at=session.closed_at, frames_in=session.frames_in, frames_out=session.frames_out,
    )
    transaction.on_commit(lambda: lifecycle.session_step.send(sender=lifecycle.SessionStep, step=step), robust=True)


def _worker_step(worker: Worker, kind: str, **detail: Any) -> None:
    step = lifecycle.WorkerStep(kind=kind, at=timezone.now(), worker_id=worker.pk, host=worker.host, detail=detail)
    transaction.on_commit(lambda: lifecycle.worker_step.send(sender=lifecycle.WorkerStep, step=step), robust=True)


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
        heartbeat_at=Now(),
    )
    _announce_worker(worker.pk)
    _worker_step(worker, "registered", device=device, capacity=capacity)
    _advance_queue()
    return worker


@dataclass(frozen=True)
class FrameCounts:
    frames_in: int
    frames_out: int


@dataclass(frozen=True)
class HeartbeatReply:
    # Sessions the worker holds a peer for that are already closed, with their reasons.
    closed: dict[str, str]
    # The worker had been declared gone (its sessions ended WORKER_LOST) and is placeable again.
    returned: bool


@transaction.atomic
def worker_heartbeat(
    *, worker_id: int, peer_count: int, frames: dict[str, FrameCounts], asyncio_tasks: int = 0
) -> HeartbeatReply:
    """Record that the worker is alive, what it holds (peers, event-loop tasks) and its sessions' frame counts.

    A worker declared gone that still beats was stalled, not dead (a long GC,
    swap, a stopped process): it is active again at once, and drops every peer
    it still holds, since those sessions were all ended ``WORKER_LOST``. No
    worker keeps a peer for a closed session.
    """
    worker = Worker.objects.select_for_update().get(pk=worker_id)
    returned = worker.state == Worker.State.GONE
    if returned:
        worker.state = Worker.State.ACTIVE
        logger.warning("worker %s is back after being declared gone: placeable again", worker_id)
        _worker_step(worker, "returned")
    worker.heartbeat_at = Now()
    worker.peer_count = peer_count
    worker.asyncio_tasks = asyncio_tasks
    worker.save(update_fields=["state", "heartbeat_at", "peer_count", "asyncio_tasks"])
    for session_id, counts in frames.items():
        StreamSession.objects.filter(pk=session_id, worker_id=worker_id).update(
            frames_in=counts.frames_in, frames_out=counts.frames_out
        )
    _announce_worker(worker_id)
    if returned:
        _advance_queue()
    return HeartbeatReply(closed=selectors.close_reasons_among(session_ids=list(frames)), returned=returned)


@transaction.atomic
def worker_drain(*, worker_id: int) -> None:
    """The worker is shutting down gracefully: no new sessions are placed on it."""
    worker = Worker.objects.select_for_update().get(pk=worker_id)
    if worker.state == Worker.State.ACTIVE:
        worker.state = Worker.State.DRAINING
        worker.save(update_fields=["state"])
        _worker_step(worker, "draining")
    _announce_worker(worker_id)


@transaction.atomic
def worker_retire(*, worker_id: int) -> None:
    """The worker process is exiting cleanly: it takes no more sessions."""
    worker = Worker.objects.select_for_update().get(pk=worker_id)
    worker.state, worker.peer_count = Worker.State.GONE, 0
    worker.save(update_fields=["state", "peer_count"])
    _worker_step(worker, "retired")
    _announce_worker(worker_id)


@transaction.atomic
def worker_lost(*, worker_id: int, by: str) -> list[str]:
    """A worker went silent: mark it gone and end every session it held; the ids ended.

    Nobody is left to tear those peers down or report it, so each session goes
    straight from ``closing`` to ``closed`` (its trail has no ``peer_closed``)
    and its slot is free. Sessions already closing keep their reason; those
    whose files could not be removed stay ``closing``: the files are on that
    host, and the sweep hands them to a live worker there or gives up loudly.
    """
    worker = Worker.objects.select_for_update().filter(pk=worker_id).first()
    if worker is None or worker.state == Worker.State.GONE:
        return []
    worker.state = Worker.State.GONE
    worker.peer_count = 0
    worker.save(update_fields=["state", "peer_count"])
    _worker_step(worker, "lost", by=by)
    ended = []
    files_left = {pending.session_id for pending in selectors.sessions_awaiting_cleanup() if pending.worker_id == worker_id}
    for session in StreamSession.objects.select_for_update().filter(worker=worker).exclude(
        state=StreamSession.State.CLOSED
    ).exclude(pk__in=files_left):
        if session.is_open:
            _mark_closing(session, reason=CloseReason.WORKER_LOST, by=by)
        _finish_close(session)
        ended.append(str(session.pk))
    _announce_worker(worker_id)
    return ended


# --- sessions: creation, placement, negotiation --------------------------------


@transaction.atomic
def session_create(
    *, owner: AbstractBaseUser | None, connection_id: str = "", signaling_channel: str = "",
    queue_limit: int | None = None,
) -> StreamSession:
    """A new ``waiting`` session.

    RATE_LIMITED if its owner already has their most open sessions (a queued
    one counts); NO_CAPACITY if ``queue_limit`` sessions already wait for a slot.
    """
    if owner is not None and owner.is_authenticated:
        limit = settings.SCOPE_MAX_SESSIONS_PER_USER
        if StreamSession.objects.filter(owner=owner, state__in=StreamSession.OPEN_STATES).count() >= limit:
            raise ScopeError(errors.RATE_LIMITED, f"At most {limit} open sessions per user.")
    if queue_limit is not None and selectors.queued_sessions().count() >= queue_limit:
        raise ScopeError(errors.NO_CAPACITY, f"Every media worker is busy and {queue_limit} clients already wait.")
    session = StreamSession.objects.create(
        owner=owner if owner is not None and owner.is_authenticated else None,
        connection_id=connection_id,
        signaling_channel=signaling_channel,
        signaling_seen_at=Now() if signaling_channel else None,
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
    if selectors.queued_sessions().filter(created_at__lt=session.created_at).exists():
        return False
    worker = _least_loaded_free_worker()
    if worker is None:
        return False
    _assign(session, worker)
    return True


def _least_loaded_free_worker() -> Worker | None:
    candidates = []
    for worker in selectors.live_workers().select_for_update().order_by("id"):
        used = worker.sessions.exclude(state=StreamSession.State.CLOSED).count()
        if used < worker.capacity:
            candidates.append((used, worker.pk, worker))
    return min(candidates, key=lambda item: item[:2])[2] if candidates else None


def _assign(session: StreamSession, worker: Worker) -> None:
    session.worker = worker
    session.save(update_fields=["worker"])
    _record(session, SessionEvent.Kind.PLACED, worker=worker.pk)
    _announce_session(session)


def _advance_queue() -> list[str]:
    """Give free slots to the sessions waiting longest; tell each one's socket, and the rest their new place.

    Placement happens here, once, wherever a slot frees (a close, a new or
    returning worker, the sweep), so queued sockets only listen: a freed slot
    costs one transaction, not one per queued socket.
    """
    placed = []
    for session in selectors.queued_sessions().select_for_update():
        worker = _least_loaded_free_worker()
        if worker is None:
            break
        _assign(session, worker)
        placed.append(str(session.pk))
        if session.signaling_channel:
            notice: SessionPlaced = {"type": "session.placed", "session_id": str(session.pk)}
            _send_after_commit(session.signaling_channel, notice)
    if placed:
        _announce_queue()
    return placed


def _announce_queue() -> None:
    """Tell queued sockets the queue as it now stands, in order: each finds its own place in it."""
    queued = selectors.queued_sessions().values_list("pk", flat=True)[: settings.SCOPE_MAX_QUEUE]
    message: QueueChanged = {"type": "queue.changed", "queued": [str(pk) for pk in queued]}
    _group_send_after_commit(QUEUE_GROUP, message)


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
def session_offer(*, session_id: str, pipeline: str, parameters: dict[str, Any], ignored_parameters: list[str],
                  sdp: str, sdp_type: str, reply_channel: str, request_id: Any = None) -> StreamSession:
    """A placed, waiting session received its offer: hand it to its worker.

    The max-duration clock starts here. The ``offered`` event records the
    pipeline and the client's parameters it does not use.
    """
    session = _locked_session(session_id)
    if session.state != StreamSession.State.WAITING or session.worker_id is None:
        raise ScopeError(errors.INVALID_MESSAGE, f"Session {session_id} is {session.state}, not waiting for an offer.")
    session_count_candidates(session_id=session_id, count=count_candidates(sdp))
    now = timezone.now()
    session.state = StreamSession.State.NEGOTIATING
    session.pipeline = pipeline
    session.parameters = parameters
    session.deadline_at = now + timedelta(seconds=settings.SCOPE_MAX_SESSION_SECONDS)
    session.save(update_fields=["state", "pipeline", "parameters", "deadline_at"])
    _record(session, SessionEvent.Kind.OFFERED, at=now, pipeline=pipeline, ignored_parameters=ignored_parameters)
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


@transaction.atomic
def session_count_candidates(*, session_id: str, count: int) -> None:
    """Count ``count`` more remote ICE candidates against the session's cap over its life.

    RATE_LIMITED, counting none, if they would take it past
    ``SCOPE_MAX_CANDIDATES_PER_SESSION``. Checked and counted in one UPDATE, so
    requests racing on several web processes cannot pass the cap together.
    """
    if count == 0:
        return
    cap = settings.SCOPE_MAX_CANDIDATES_PER_SESSION
    counted = StreamSession.objects.filter(pk=session_id, remote_candidates__lte=cap - count).update(
        remote_candidates=F("remote_candidates") + count
    )
    if not counted:
        if not StreamSession.objects.filter(pk=session_id).exists():
            raise ScopeError(errors.UNKNOWN_SESSION, f"No session {session_id}.")
        raise ScopeError(errors.RATE_LIMITED, f"At most {cap} ICE candidates per session, its offer's included.")


@transaction.atomic
def session_add_candidates(*, session_id: str, candidates: list[dict[str, Any] | None]) -> None:
    """Forward trickled ICE candidates to the session's worker, all or none (None: end of candidates).

    RATE_LIMITED, forwarding none, if they would take the session past its cap.
    """
    session = _open_placed_session(session_id)
    # An empty candidate string is the browser's end-of-candidates mark, not a candidate.
    named = sum(1 for candidate in candidates if candidate and candidate.get("candidate"))
    session_count_candidates(session_id=str(session.pk), count=named)
    for candidate in candidates:
        message: PeerCandidate = {"type": "peer.candidate", "session_id": str(session.pk), "candidate": candidate}
        _send_after_commit(session.worker.channel_name, message)


def session_add_candidate(*, session_id: str, candidate: dict[str, Any] | None) -> None:
    """One trickled ICE candidate (the socket's ``icecandidate``); see ``session_add_candidates``."""
    session_add_candidates(session_id=session_id, candidates=[candidate])


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


# --- WHEP viewers ----------------------------------------------------------------


@transaction.atomic
def viewer_join(*, session_id: str, user: AbstractBaseUser | None, sdp: str, reply_channel: str) -> SessionViewer:
    """A viewer asks for a session's processed video: count it, record it, hand its offer to the session's worker.

    NO_CAPACITY if the session already has ``SCOPE_MAX_VIEWERS``; INVALID_MESSAGE if it has no output yet.
    """
    session = _locked_session(session_id)
    if not session.is_open:
        raise ScopeError(errors.UNKNOWN_SESSION, f"No open session {session_id}.")
    if session.worker_id is None or session.state == StreamSession.State.WAITING:
        raise ScopeError(errors.INVALID_MESSAGE, f"Session {session_id} has no video yet.")
    limit = settings.SCOPE_MAX_VIEWERS
    if session.viewer_count >= limit:
        raise ScopeError(errors.NO_CAPACITY, f"Session {session_id} already has {limit} viewers, its most.")
    viewer = SessionViewer.objects.create(session=session, user=user, remote_candidates=count_candidates(sdp))
    session.viewer_count += 1
    session.save(update_fields=["viewer_count"])
    _record(session, SessionEvent.Kind.VIEWER_JOINED, viewer_id=str(viewer.pk),
            user=user.get_username() if user is not None else None)
    _announce_session(session)
    message: PeerView = {"type": "peer.view", "session_id": session_id, "viewer_id": str(viewer.pk), "sdp": sdp,
                         "reply_channel": reply_channel}
    _send_after_commit(session.worker.channel_name, message)
    return viewer


@transaction.atomic
def viewer_leave(*, session_id: str, viewer_id: str, reason: str, notify_worker: bool) -> bool:
    """The viewer is gone (its DELETE, its peer closed or failed, a failed answer); the session goes on.

    Idempotent: False if it had already left. The worker closes its peer unless it is the one reporting.
    """
    session = _locked_session(session_id)
    viewer = SessionViewer.objects.filter(pk=viewer_id, session=session, left_at__isnull=True).first()
    if viewer is None:
        return False
    _mark_left(session, [viewer], reason=reason)
    session.save(update_fields=["viewer_count"])
    _announce_session(session)
    if notify_worker and session.is_open and session.worker_id is not None:
        message: PeerUnview = {"type": "peer.unview", "session_id": session_id, "viewer_id": viewer_id}
        _send_after_commit(session.worker.channel_name, message)
    return True


def _mark_left(session: StreamSession, viewers: list[SessionViewer], *, reason: str) -> None:
    now = timezone.now()
    for viewer in viewers:
        viewer.left_at = now
        viewer.save(update_fields=["left_at"])
        _record(session, SessionEvent.Kind.VIEWER_LEFT, at=now, viewer_id=str(viewer.pk), reason=reason)
    session.viewer_count = max(0, session.viewer_count - len(viewers))


@transaction.atomic
def viewer_add_candidates(*, session_id: str, viewer_id: str, candidates: list[dict[str, Any] | None]) -> None:
    """Forward a viewer's trickled candidates to its peer, all or none, capped per viewer as per session."""
    session = _open_placed_session(session_id)
    named = sum(1 for candidate in candidates if candidate and candidate.get("candidate"))
    cap = settings.SCOPE_MAX_CANDIDATES_PER_SESSION
    counted = SessionViewer.objects.filter(
        pk=viewer_id, session=session, left_at__isnull=True, remote_candidates__lte=cap - named
    ).update(remote_candidates=F("remote_candidates") + named)
    if not counted:
        if not SessionViewer.objects.filter(pk=viewer_id, session=session, left_at__isnull=True).exists():
            raise ScopeError(errors.UNKNOWN_SESSION, f"No viewer {viewer_id} of session {session_id}.")
        raise ScopeError(errors.RATE_LIMITED, f"At most {cap} ICE candidates per viewer, its offer's included.")
    for candidate in candidates:
        message: PeerViewCandidate = {"type": "peer.view_candidate", "session_id": session_id,
                                      "viewer_id": viewer_id, "candidate": candidate}
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
    _mark_closing(session, reason=reason, by=by)
    if had_peer:
        _send_peer_close(session)
        # After the teardown's own message: dashboards must not delay it.
        _announce_session(session)
    else:
        _finish_close(session)
    return True


def _send_peer_close(session: StreamSession) -> None:
    message: PeerClose = {"type": "peer.close", "session_id": str(session.pk), "reason": session.close_reason}
    _send_after_commit(session.worker.channel_name, message)


def _mark_closing(session: StreamSession, *, reason: str, by: str) -> None:
    now = timezone.now()
    session.state = StreamSession.State.CLOSING
    session.close_reason = reason
    session.closing_at = now
    session.save(update_fields=["state", "close_reason", "closing_at"])
    _record(session, SessionEvent.Kind.CLOSING, at=now, reason=reason, by=by)


@transaction.atomic
def session_resend_close(*, session_id: str) -> bool:
    """Tell a closing session's worker again to tear it down (a lost message must not leave it closing)."""
    session = StreamSession.objects.select_related("worker").filter(pk=session_id).first()
    if session is None or session.state != StreamSession.State.CLOSING or session.worker is None:
        return False
    _send_peer_close(session)
    return True


@transaction.atomic
def signaling_heartbeat(*, connection_ids: list[str]) -> int:
    """A web process vouches that these sockets are still connected; how many open sessions it touched."""
    return StreamSession.objects.filter(
        connection_id__in=connection_ids, state__in=StreamSession.OPEN_STATES
    ).update(signaling_seen_at=Now())


@dataclass(frozen=True)
class TeardownStep:
    """One step of a worker's teardown, timed where it happened."""

    kind: str
    at: datetime
    detail: dict[str, Any] = field(default_factory=dict)


def failed_cleanup(steps: list[TeardownStep]) -> TeardownStep | None:
    """The teardown's ``cleaned_up`` step if removing the files failed (its detail names the directory)."""
    return next((step for step in steps if step.detail.get("failed")), None)


@transaction.atomic
def session_closed(
    *, session_id: str, steps: list[TeardownStep], frames: FrameCounts | None = None
) -> bool:
    """The worker tore a closing session down: record its steps; False if it was not closing.

    The session is closed and its slot freed, unless removing its files failed:
    then it stays ``closing``, holding the slot, while the worker that holds
    the files retries with backoff (``session_cleanup_done``,
    ``session_cleanup_given_up``; the failed ``cleaned_up`` step names the
    directory).
    """
    session = _locked_session(session_id)
    if session.state != StreamSession.State.CLOSING:
        return False
    for step in steps:
        _record(session, step.kind, at=step.at, **step.detail)
    if frames is not None:
        session.frames_in = frames.frames_in
        session.frames_out = frames.frames_out
    if failed_cleanup(steps) is None:
        _finish_close(session)
    else:
        session.save(update_fields=["frames_in", "frames_out"])
    return True


@transaction.atomic
def session_cleanup_done(*, session_id: str, files_removed: int) -> bool:
    """A retried cleanup removed the session's files: record it, close the session, free the slot."""
    session = _locked_session(session_id)
    if session.state != StreamSession.State.CLOSING:
        return False
    _record(session, SessionEvent.Kind.CLEANED_UP, files_removed=files_removed, retried=True)
    _finish_close(session)
    return True


@transaction.atomic
def session_cleanup_given_up(*, session_id: str, error: str) -> bool:
    """Files that could not be removed for ``SCOPE_CLEANUP_GIVE_UP_SECONDS``: close the session anyway, loudly."""
    session = _locked_session(session_id)
    if session.state != StreamSession.State.CLOSING:
        return False
    logger.error("session %s: gave up removing its files after %ss: %s", session_id,
                 settings.SCOPE_CLEANUP_GIVE_UP_SECONDS, error)
    _record(session, SessionEvent.Kind.CLEANED_UP, failed=error, gave_up=True)
    _finish_close(session)
    return True


def _finish_close(session: StreamSession) -> None:
    # Its viewers' peers went with the session's (the worker closes them in the same teardown).
    _mark_left(session, list(session.viewers.filter(left_at__isnull=True)), reason=session.close_reason)
    session.state = StreamSession.State.CLOSED
    session.closed_at = timezone.now()
    session.save()
    _record(session, SessionEvent.Kind.CLOSED, at=session.closed_at)
    ended: SessionEnded = {"type": "session.ended", "session_id": str(session.pk), "reason": session.close_reason}
    if session.signaling_channel and session.close_reason != CloseReason.CLIENT_DISCONNECT:
        _send_after_commit(session.signaling_channel, ended)
    _group_send_after_commit(session_group(str(session.pk)), ended)
    _announce_session(session)
    if session.worker_id is not None:
        _advance_queue()
    else:
        _announce_queue()  # it left the queue: those behind it moved up


# --- the safety net ------------------------------------------------------------


@dataclass(frozen=True)
class SweepResult:
    workers_lost: list[int]
    closed: dict[str, list[str]]  # reason → session ids this sweep ended
    resent: list[str]  # closing sessions whose worker was told again
    placed: list[str]  # queued sessions given a slot that no message had announced
    # False: this sweep had not been watching, and ended nobody for silence (see sweep()).
    silence_judged: bool


def sweep() -> SweepResult:
    """Find what nobody reported and end it; run every ``SCOPE_SWEEP_SECONDS``.

    - workers silent for 3 heartbeats: gone, their sessions ``WORKER_LOST``;
    - sessions whose signaling socket's web process went silent: ``SIGNALING_LOST``;
    - sessions past their deadline: ``MAX_DURATION_EXCEEDED``;
    - sessions holding a slot with no offer for ``SCOPE_OFFER_TIMEOUT_SECONDS``: ``IDLE_TIMEOUT``;
    - the queue: free slots given out, waiting sockets told to look again;
    - sessions ``closing`` for longer than the close bound: the close re-sent
      (unless the teardown is done and only its files wait for a retry).

    Each step is its own transaction through the services above, so one
    failing session does not stop the rest.

    Silence (the first two) is judged only by a sweep that has been watching.
    If the last sweep finished more than a sweep interval and a heartbeat
    ago, or ran for longer than that, the sweep was not running all along
    (its process, its host or the database paused), and the heartbeats of
    that time are likely missing for the same reason, not because their
    writers died: in embedded mode the worker, the web process and the sweep
    are one process. Such a sweep only notes its times; the next one judges
    whoever has not beaten since. A shorter absence cannot age a running
    process's heartbeat past the bound on its own.
    """
    last = selectors.last_sweep()
    try:
        return _sweep_once(watching=_sweep_was_watching(last))
    finally:
        sweep_finished(started_at=None if last is None else last.now)


def _sweep_was_watching(last: selectors.LastSweep | None) -> bool:
    bound = timedelta(seconds=settings.SCOPE_SWEEP_SECONDS + settings.SCOPE_HEARTBEAT_SECONDS)
    if last is None:
        return False  # the first sweep has watched nothing yet
    if last.since_finished <= bound and last.lasted <= bound:
        return True
    logger.warning("sweep: the last sweep finished %.1f s ago and ran %.1f s: silence is judged from the next one",
                   last.since_finished.total_seconds(), last.lasted.total_seconds())
    return False


def _sweep_once(*, watching: bool) -> SweepResult:
    closed: dict[str, list[str]] = {}
    lost_workers: list[int] = []
    silent_signaling: list[str] = []
    if watching:
        silent_after = selectors.heartbeat_cutoff()
        lost_workers = selectors.silent_workers(silent_after=silent_after)
        silent_signaling = selectors.sessions_with_silent_signaling(silent_after=silent_after)
    for worker_id in lost_workers:
        ended = worker_lost(worker_id=worker_id, by="sweep:worker-silent")
        closed.setdefault(CloseReason.WORKER_LOST, []).extend(ended)
    offer_due = timezone.now() - timedelta(seconds=settings.SCOPE_OFFER_TIMEOUT_SECONDS)
    for reason, sessions in (
        (CloseReason.SIGNALING_LOST, silent_signaling),
        (CloseReason.MAX_DURATION_EXCEEDED, selectors.sessions_past_deadline()),
        (CloseReason.IDLE_TIMEOUT, selectors.sessions_placed_without_offer(before=offer_due)),
    ):
        for session_id in sessions:
            if _close_quietly(session_id, reason):
                closed.setdefault(reason, []).append(session_id)
    stuck_since = timezone.now() - timedelta(seconds=settings.SCOPE_CLOSE_WAIT_SECONDS)
    resent = [sid for sid in selectors.sessions_closing_since(before=stuck_since) if session_resend_close(session_id=sid)]
    _recheck_cleanups()
    return SweepResult(workers_lost=lost_workers, closed=closed, resent=resent, placed=queue_recheck(),
                       silence_judged=watching)


@transaction.atomic
def sweep_finished(*, started_at: datetime | None) -> None:
    """Note, on the database's clock, when a sweep started (None: now) and that it finished now.

    Whether or not every step succeeded: it ran.
    """
    started = Now() if started_at is None else started_at
    if not SweepClock.objects.update(started_at=started, finished_at=Now()):
        SweepClock.objects.create(started_at=started, finished_at=Now())


@transaction.atomic
def queue_recheck() -> list[str]:
    """Place what a lost message left waiting, and have every waiting socket look again (the sweep's part)."""
    placed = _advance_queue()
    if not placed and selectors.sockets_waiting():
        _announce_queue()
    return placed


def _recheck_cleanups() -> None:
    """Remind the worker holding each failed cleanup's files to retry (it may have restarted);
    close the session anyway once past the give-up time with no worker left on that host."""
    give_up_before = timezone.now() - timedelta(seconds=settings.SCOPE_CLEANUP_GIVE_UP_SECONDS)
    for pending in selectors.sessions_awaiting_cleanup():
        channel = selectors.live_worker_channel_on(host=pending.host, preferred=pending.worker_id)
        if channel is not None:
            message: PeerCleanup = {
                "type": "peer.cleanup", "session_id": pending.session_id, "files_dir": pending.files_dir,
                "give_up_at": (pending.closing_at + timedelta(seconds=settings.SCOPE_CLEANUP_GIVE_UP_SECONDS)).timestamp(),
            }
            async_to_sync(get_channel_layer().send)(channel, message)
        elif pending.closing_at < give_up_before:
            session_cleanup_given_up(session_id=pending.session_id, error=f"no worker left on {pending.host}")


def _close_quietly(session_id: str, reason: str) -> bool:
    try:
        return session_close(session_id=session_id, reason=reason, by="sweep")
    except Exception:
        logger.exception("sweep could not close session %s (%s)", session_id, reason)
        return False


# --- retention -------------------------------------------------------------------

# Deleted a batch per transaction, so a large backlog never holds the database
# (SQLite's one write lock above all) long enough to delay heartbeats.
PRUNE_BATCH_SIZE = 500


def sessions_prune(*, older_than: datetime) -> int:
    """Delete the sessions closed before ``older_than`` and their events (a cascade); how many sessions."""
    deleted = 0
    oldest_first = selectors.sessions_closed_before(older_than).order_by("closed_at").values_list("pk", flat=True)
    while batch := list(oldest_first[:PRUNE_BATCH_SIZE]):
        with transaction.atomic():
            _, per_model = StreamSession.objects.filter(pk__in=batch).delete()
        deleted += per_model.get(StreamSession._meta.label, 0)
    if deleted:
        logger.info("pruned %d sessions closed before %s", deleted, older_than.isoformat())
    return deleted
