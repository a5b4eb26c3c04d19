"""Reads. Nothing here writes."""

import uuid

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import Count, Q, QuerySet

from . import errors
from .errors import ScopeError
from .models import StreamSession, Worker


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
    try:
        session_uuid = uuid.UUID(str(session_id))
        return sessions_visible_to(user).get(pk=session_uuid)
    except (ValueError, StreamSession.DoesNotExist) as exc:
        raise ScopeError(errors.UNKNOWN_SESSION, f"No session {session_id}.") from exc


def workers_with_load() -> QuerySet[Worker]:
    return Worker.objects.annotate(
        slots_used=Count("sessions", filter=~Q(sessions__state=StreamSession.State.CLOSED))
    ).order_by("id")


def queue_position(*, session_id: str) -> int:
    """1-based place among sessions waiting for a slot."""
    session = StreamSession.objects.get(pk=session_id)
    return StreamSession.objects.filter(
        state=StreamSession.State.WAITING, worker__isnull=True, created_at__lte=session.created_at
    ).count()


def open_sessions_of_connection(*, connection_id: str) -> list[str]:
    return [
        str(pk)
        for pk in StreamSession.objects.filter(
            connection_id=connection_id, state__in=StreamSession.OPEN_STATES
        ).values_list("pk", flat=True)
    ]
