"""Notices of what happened to sessions and workers, for whatever watches: logs, metrics, webhooks.

The services send them once the transaction that recorded the step has
committed, in the process that recorded it (a web process, a media worker or
Celery), so a receiver never sees a step that was rolled back. Receivers must
be quick and must not raise into the close path: anything slow (a webhook's
delivery) is handed off.
"""

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from django.dispatch import Signal


@dataclass(frozen=True)
class SessionStep:
    """One recorded step of a session's life (an event of its trail), with the session as it stood."""

    kind: str  # the SessionEvent kind: created, placed, offered, answered, live, closing, …, closed
    at: datetime
    detail: dict[str, Any]
    session_id: str
    state: str
    owner: str | None  # the username
    connection_id: str
    worker_id: int | None
    pipeline: str
    close_reason: str
    created_at: datetime
    live_at: datetime | None
    closing_at: datetime | None
    closed_at: datetime | None
    frames_in: int
    frames_out: int


@dataclass(frozen=True)
class WorkerStep:
    kind: str  # registered, lost, returned, draining, retired
    at: datetime
    worker_id: int
    host: str
    detail: dict[str, Any] = field(default_factory=dict)


# send(sender=SessionStep, step=SessionStep(...)) / send(sender=WorkerStep, step=WorkerStep(...))
session_step = Signal()
worker_step = Signal()
