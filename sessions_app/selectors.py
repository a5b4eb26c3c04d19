"""Reads. Nothing here writes."""

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Count, DurationField, ExpressionWrapper, F, Q, QuerySet
from django.db.models.expressions import CombinedExpression
from django.db.models.functions import Now
from django.utils import timezone

from . import errors
from .errors import ScopeError
from .models import SessionEvent, SessionViewer, StreamSession, SweepClock, Worker


def sessions_visible_to(user: AbstractBaseUser | AnonymousUser) -> QuerySet[StreamSession]:
    """Staff see every session; a user only their own; anonymous users none."""
    sessions = StreamSession.objects.select_related("owner", "worker")
    if user.is_staff:
        return sessions
    if not user.is_authenticated:
        return sessions.none()
    return sessions.filter(owner=user)


def session_for_user(*, session_id: str, user: AbstractBaseUser | AnonymousUser) -> StreamSession:
    """A session the user may see; another's is reported unknown, never forbidden."""
    return _one_session(sessions_visible_to(user), session_id)


def _one_session(sessions: QuerySet[StreamSession], session_id: str) -> StreamSession:
    """The session with this id among ``sessions``; a malformed or absent id is UNKNOWN_SESSION."""
    try:
        return sessions.get(pk=uuid.UUID(str(session_id)))
    except (ValueError, StreamSession.DoesNotExist) as exc:
        raise ScopeError(errors.UNKNOWN_SESSION, f"No session {session_id}.") from exc


def session_for_streamer(*, session_id: str, user: AbstractBaseUser | AnonymousUser) -> StreamSession:
    """The session a streaming client may signal on.

    A signed-in user gets their own (staff any). An anonymous client (only where
    anonymous streaming is on) gets any ownerless session: its id, a random
    UUID4 handed only to the client that made it, is the capability.
    """
    if user.is_authenticated:
        return session_for_user(session_id=session_id, user=user)
    return _one_session(StreamSession.objects.filter(owner__isnull=True), session_id)


def viewer_exists(*, session_id: str, viewer_id: str) -> bool:
    """Whether the viewer still watches the session; a malformed id never does."""
    try:
        viewer_uuid = uuid.UUID(str(viewer_id))
    except ValueError:
        return False
    return SessionViewer.objects.filter(pk=viewer_uuid, session_id=session_id, left_at__isnull=True).exists()


def _ids(queryset: QuerySet) -> list[str]:
    return [str(pk) for pk in queryset.values_list("pk", flat=True)]


def heartbeat_cutoff() -> CombinedExpression:
    """A worker or web process not heard from since this moment (three heartbeats ago) counts as silent.

    On the database's clock, as heartbeats are written: hosts' clocks may differ.
    """
    return Now() - timedelta(seconds=3 * settings.SCOPE_HEARTBEAT_SECONDS)


def live_workers() -> QuerySet[Worker]:
    """Workers taking sessions: active, with a heartbeat within three intervals."""
    return Worker.objects.filter(state=Worker.State.ACTIVE, heartbeat_at__gte=heartbeat_cutoff())


@dataclass(frozen=True)
class LastSweep:
    """The last sweep's times, against the database's clock as it read ``now``."""

    now: datetime
    since_finished: timedelta
    lasted: timedelta


def last_sweep() -> LastSweep | None:
    """None before the first sweep."""
    row = (
        SweepClock.objects.annotate(
            now=Now(),
            since_finished=ExpressionWrapper(Now() - F("finished_at"), output_field=DurationField()),
            lasted=ExpressionWrapper(F("finished_at") - F("started_at"), output_field=DurationField()),
        )
        .values("now", "since_finished", "lasted")
        .first()
    )
    return None if row is None else LastSweep(**row)


def silent_workers(*, silent_after: CombinedExpression) -> list[int]:
    """Workers still counted on (active or draining) whose last heartbeat is older than ``silent_after``."""
    return list(
        Worker.objects.filter(
            state__in=[Worker.State.ACTIVE, Worker.State.DRAINING], heartbeat_at__lt=silent_after
        ).values_list("pk", flat=True)
    )


def workers_with_load() -> QuerySet[Worker]:
    return Worker.objects.annotate(
        slots_used=Count("sessions", filter=~Q(sessions__state=StreamSession.State.CLOSED))
    ).order_by("id")


def session_pipeline(*, session_id: str) -> tuple[str, dict]:
    """A session's current pipeline name and parameters."""
    pipeline, parameters = StreamSession.objects.values_list("pipeline", "parameters").get(pk=session_id)
    return pipeline, parameters


def queued_sessions() -> QuerySet[StreamSession]:
    """Sessions waiting for a slot, first come first served."""
    return StreamSession.objects.filter(state=StreamSession.State.WAITING, worker__isnull=True).order_by(
        "created_at", "pk"
    )


def queue_place(*, session_id: str) -> int | None:
    """1-based place of a waiting session among those queued for a slot; 0 once it holds one; None if it ended."""
    session = StreamSession.objects.filter(pk=session_id).values("state", "worker_id", "created_at").first()
    if session is None or session["state"] != StreamSession.State.WAITING:
        return None
    if session["worker_id"] is not None:
        return 0
    return queued_sessions().filter(created_at__lte=session["created_at"]).count()


def sockets_waiting() -> bool:
    """Whether any socket waits: queued, or told ``ready`` and not yet offering."""
    return StreamSession.objects.filter(state=StreamSession.State.WAITING).exclude(signaling_channel="").exists()


def sessions_placed_without_offer(*, before: datetime) -> list[str]:
    """Sessions holding a slot since before ``before`` whose client never sent its offer."""
    return _ids(
        StreamSession.objects.filter(
            state=StreamSession.State.WAITING,
            worker__isnull=False,
            events__kind=SessionEvent.Kind.PLACED,
            events__at__lt=before,
        )
    )


def open_sessions_of_connection(*, connection_id: str) -> list[str]:
    return _ids(StreamSession.objects.filter(connection_id=connection_id, state__in=StreamSession.OPEN_STATES))


def dashboard_sessions(*, recently_closed: int) -> tuple[list[StreamSession], list[StreamSession]]:
    """Open sessions (oldest first) and the last ``recently_closed`` closed ones (newest first)."""
    sessions = StreamSession.objects.select_related("owner", "worker")
    open_sessions = list(sessions.filter(state__in=StreamSession.OPEN_STATES).order_by("created_at", "pk"))
    closed = list(sessions.filter(state=StreamSession.State.CLOSED).order_by("-closed_at", "-pk")[:recently_closed])
    return open_sessions, closed


def dashboard_session(*, session_id: str) -> StreamSession | None:
    return StreamSession.objects.select_related("owner", "worker").filter(pk=session_id).first()


def dashboard_workers(*, gone_within: timedelta) -> QuerySet[Worker]:
    """Workers an operator cares about: every one still serving, and those gone lately."""
    return workers_with_load().filter(
        ~Q(state=Worker.State.GONE) | Q(heartbeat_at__gte=timezone.now() - gone_within)
    )


def open_sessions_of_worker(*, worker_id: int) -> list[StreamSession]:
    return list(
        StreamSession.objects.select_related("owner", "worker").filter(
            worker_id=worker_id, state__in=StreamSession.OPEN_STATES
        )
    )


def sessions_with_silent_signaling(*, silent_after: CombinedExpression) -> list[str]:
    """Open socket-signaled sessions whose web process has not vouched for their socket lately."""
    return _ids(
        StreamSession.objects.filter(state__in=StreamSession.OPEN_STATES, signaling_seen_at__lt=silent_after)
        .exclude(signaling_channel="")
    )


def sessions_past_deadline() -> list[str]:
    return _ids(StreamSession.objects.filter(state__in=StreamSession.OPEN_STATES, deadline_at__lt=timezone.now()))


def _failed_cleanups() -> QuerySet[SessionEvent]:
    """Failed cleanups of sessions still closing: only those sessions' events are read, not the whole table."""
    return SessionEvent.objects.filter(
        session__state=StreamSession.State.CLOSING, kind=SessionEvent.Kind.CLEANED_UP, detail__has_key="failed"
    )


def sessions_closing_since(*, before: datetime) -> list[str]:
    """Sessions closing since before ``before`` whose teardown has not run (a failed cleanup waits for its retry)."""
    return _ids(
        StreamSession.objects.filter(state=StreamSession.State.CLOSING, closing_at__lt=before)
        .exclude(pk__in=_failed_cleanups().values("session_id"))
    )


@dataclass(frozen=True)
class PendingCleanup:
    session_id: str
    files_dir: str
    worker_id: int
    host: str  # where the files are
    closing_at: datetime


def sessions_awaiting_cleanup() -> list[PendingCleanup]:
    """Closing sessions whose files their worker could not remove yet."""
    return [
        PendingCleanup(str(session_id), detail["files_dir"], worker_id, host, closing_at)
        for session_id, detail, worker_id, host, closing_at in _failed_cleanups().values_list(
            "session_id", "detail", "session__worker_id", "session__worker__host", "session__closing_at"
        )
    ]


def live_worker_channel_on(*, host: str, preferred: int) -> str | None:
    """The channel of a live worker on ``host``, ``preferred`` if it is one."""
    workers = live_workers().filter(host=host).order_by("-pk")
    own = workers.filter(pk=preferred).values_list("channel_name", flat=True).first()
    return own or workers.values_list("channel_name", flat=True).first()


@dataclass(frozen=True)
class RevokedUsers:
    inactive: set[int]  # deactivated or deleted
    not_staff: set[int]  # no longer staff


def users_no_longer_allowed(*, user_ids: set[int], staff_ids: set[int]) -> RevokedUsers:
    """Which of these users may no longer stream (``user_ids``) or watch the dashboard (``staff_ids``)."""
    users = dict(get_user_model().objects.filter(pk__in=user_ids | staff_ids, is_active=True).values_list("pk", "is_staff"))
    return RevokedUsers(
        inactive={pk for pk in user_ids | staff_ids if pk not in users},
        not_staff={pk for pk in staff_ids if pk in users and not users[pk]},
    )


def close_reasons_among(*, session_ids: list[str]) -> dict[str, str]:
    """Which of these sessions are closed, each with its close reason."""
    closed = StreamSession.objects.filter(pk__in=session_ids, state=StreamSession.State.CLOSED)
    return {str(pk): reason for pk, reason in closed.values_list("pk", "close_reason")}


def retention_cutoff(days: float) -> datetime:
    return timezone.now() - timedelta(days=days)


def sessions_closed_before(older_than: datetime) -> QuerySet[StreamSession]:
    """Closed sessions that closed before ``older_than``; open and closing ones never."""
    return StreamSession.objects.filter(state=StreamSession.State.CLOSED, closed_at__lt=older_than)


# --- operators' commands (manage.py sessions, terminate, workers, drainworker) ---


def sessions_for_operators(*, states: list[str] | None = None) -> QuerySet[StreamSession]:
    """Sessions in ``states`` (None: every one not yet closed), oldest first."""
    sessions = StreamSession.objects.select_related("owner", "worker")
    if states is None:
        sessions = sessions.exclude(state=StreamSession.State.CLOSED)
    else:
        sessions = sessions.filter(state__in=states)
    return sessions.order_by("created_at", "pk")


def open_session_ids() -> list[str]:
    """Every open session (waiting, negotiating or live), oldest first."""
    return _ids(StreamSession.objects.filter(state__in=StreamSession.OPEN_STATES).order_by("created_at", "pk"))


def workers_for_operators(*, gone_within: timedelta | None = None) -> QuerySet[Worker]:
    """Workers with ``slots_used`` and ``heartbeat_age`` (on the database's clock, as heartbeats are written).

    Gone workers only if they were heard from within ``gone_within``; None: every worker ever registered.
    """
    workers = workers_with_load() if gone_within is None else dashboard_workers(gone_within=gone_within)
    return workers.annotate(
        heartbeat_age=ExpressionWrapper(Now() - F("heartbeat_at"), output_field=DurationField())
    )


# --- metrics (read at scrape time: sessions_app/metrics.py) ---------------------------


NOT_CLOSED = (*StreamSession.OPEN_STATES, StreamSession.State.CLOSING)


def session_counts_by_state() -> dict[str, int]:
    """How many sessions are in each state short of ``closed`` (closed ones are history, counted as closes)."""
    rows = StreamSession.objects.filter(state__in=NOT_CLOSED).values_list("state").annotate(count=Count("pk")).order_by()
    return dict(rows)


def queue_length() -> int:
    return queued_sessions().count()


def worker_slots() -> list[tuple[int, int, int]]:
    """``(worker id, slots used, capacity)`` of every worker still counted on, or gone with slots still held.

    Two index-backed queries, so closed history and long-gone workers cost nothing.
    """
    used = dict(
        StreamSession.objects.filter(worker__isnull=False, state__in=NOT_CLOSED)
        .values_list("worker_id").annotate(count=Count("pk")).order_by()
    )
    workers = Worker.objects.filter(~Q(state=Worker.State.GONE) | Q(pk__in=list(used))).order_by("pk")
    return [(pk, used.get(pk, 0), capacity) for pk, capacity in workers.values_list("pk", "capacity")]


def session_event_at(*, session_id: str, kind: str) -> datetime | None:
    """When the session's first event of ``kind`` happened; None if it has none (or is gone)."""
    return SessionEvent.objects.filter(session_id=session_id, kind=kind).order_by("at").values_list("at", flat=True).first()
