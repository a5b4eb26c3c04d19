import secrets
import uuid

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import URLValidator
from django.db import models


class Worker(models.Model):
    class State(models.TextChoices):
        ACTIVE = "active"
        DRAINING = "draining"
        GONE = "gone"

    channel_name = models.CharField(max_length=200, unique=True)
    host = models.CharField(max_length=255)
    pid = models.PositiveIntegerField()
    device = models.CharField(max_length=32)
    capacity = models.PositiveIntegerField()
    state = models.CharField(max_length=16, choices=State.choices, default=State.ACTIVE)
    heartbeat_at = models.DateTimeField()
    # Peer connections the worker actually holds, as it last reported.
    peer_count = models.PositiveIntegerField(default=0)
    # Tasks on its event loop, as it last reported: a leak shows as growth here.
    asyncio_tasks = models.PositiveIntegerField(default=0)
    started_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return f"worker {self.pk} ({self.host}:{self.pid}, {self.device})"


class SweepClock(models.Model):
    """When the safety-net sweep last started and finished, on the database's clock: one row.

    A sweep that starts long after the last one finished, or after one that
    took long, was not running all along (its process, its host or the
    database paused): it did not watch the heartbeats of that time, and passes
    no verdict of silence on them.
    """

    started_at = models.DateTimeField()
    finished_at = models.DateTimeField()


class CloseReason(models.TextChoices):
    CLIENT_DISCONNECT = "CLIENT_DISCONNECT"
    MAX_DURATION_EXCEEDED = "MAX_DURATION_EXCEEDED"
    SESSION_TERMINATED = "SESSION_TERMINATED"
    PEER_CLOSED = "PEER_CLOSED"
    PEER_FAILED = "PEER_FAILED"
    WORKER_LOST = "WORKER_LOST"
    SERVER_SHUTDOWN = "SERVER_SHUTDOWN"
    IDLE_TIMEOUT = "IDLE_TIMEOUT"
    SIGNALING_LOST = "SIGNALING_LOST"
    ERROR = "ERROR"


class StreamSession(models.Model):
    class State(models.TextChoices):
        WAITING = "waiting"
        NEGOTIATING = "negotiating"
        LIVE = "live"
        CLOSING = "closing"
        CLOSED = "closed"

    OPEN_STATES = (State.WAITING, State.NEGOTIATING, State.LIVE)

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="stream_sessions"
    )
    connection_id = models.CharField(max_length=64, blank=True, db_index=True)
    signaling_channel = models.CharField(max_length=200, blank=True)
    worker = models.ForeignKey(Worker, null=True, blank=True, on_delete=models.PROTECT, related_name="sessions")
    pipeline = models.CharField(max_length=64, blank=True)
    parameters = models.JSONField(default=dict, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.WAITING, db_index=True)
    close_reason = models.CharField(max_length=32, choices=CloseReason.choices, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    live_at = models.DateTimeField(null=True, blank=True)
    closing_at = models.DateTimeField(null=True, blank=True)
    closed_at = models.DateTimeField(null=True, blank=True)
    deadline_at = models.DateTimeField(null=True, blank=True)
    signaling_seen_at = models.DateTimeField(null=True, blank=True)
    frames_in = models.PositiveBigIntegerField(default=0)
    frames_out = models.PositiveBigIntegerField(default=0)
    # Remote ICE candidates named so far, the offer's included: capped per session.
    remote_candidates = models.PositiveIntegerField(default=0)
    # WHEP viewers watching now; kept under the session's row lock with the viewers' rows.
    viewer_count = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["worker", "state"])]

    def __str__(self) -> str:
        return f"session {self.pk} ({self.state})"

    @property
    def is_open(self) -> bool:
        return self.state in self.OPEN_STATES


class SessionEvent(models.Model):
    class Kind(models.TextChoices):
        CREATED = "created"
        PLACED = "placed"
        OFFERED = "offered"
        ANSWERED = "answered"
        LIVE = "live"
        CLOSING = "closing"
        PEER_CLOSED = "peer_closed"
        PIPELINE_STOPPED = "pipeline_stopped"
        CLEANED_UP = "cleaned_up"
        CLOSED = "closed"
        VIEWER_JOINED = "viewer_joined"
        VIEWER_LEFT = "viewer_left"

    session = models.ForeignKey(StreamSession, on_delete=models.CASCADE, related_name="events")
    kind = models.CharField(max_length=32, choices=Kind.choices)
    at = models.DateTimeField()
    detail = models.JSONField(default=dict, blank=True)

    class Meta:
        ordering = ["at", "id"]

    def __str__(self) -> str:
        return f"{self.kind} at {self.at.isoformat()}"


class SessionViewer(models.Model):
    """A WHEP viewer of a session's processed video; its peer lives on the session's worker."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    session = models.ForeignKey(StreamSession, on_delete=models.CASCADE, related_name="viewers")
    user = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="+")
    joined_at = models.DateTimeField(auto_now_add=True)
    left_at = models.DateTimeField(null=True, blank=True)
    # Remote ICE candidates named so far, the offer's included: capped per viewer as per session.
    remote_candidates = models.PositiveIntegerField(default=0)

    class Meta:
        ordering = ["joined_at", "id"]
        indexes = [models.Index(fields=["session", "left_at"])]

    def __str__(self) -> str:
        return f"viewer {self.pk} of session {self.session_id}"


# --- webhooks: signed notices of session and worker events (sessions_app/webhooks.py) ---


class WebhookEvent(models.TextChoices):
    SESSION_CREATED = "session.created"
    SESSION_LIVE = "session.live"
    SESSION_CLOSED = "session.closed"
    WORKER_LOST = "worker.lost"


def all_webhook_events() -> list[str]:
    return list(WebhookEvent.values)


def new_webhook_secret() -> str:
    return secrets.token_urlsafe(32)


class WebhookEndpoint(models.Model):
    url = models.URLField(max_length=500, validators=[URLValidator(schemes=["http", "https"])])
    secret = models.CharField(
        max_length=128, default=new_webhook_secret, help_text="Signs every request (Scope-Signature); share it with the receiver."
    )
    # Which of WebhookEvent's values this endpoint gets.
    events = models.JSONField(default=all_webhook_events)
    active = models.BooleanField(default=True)
    description = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["id"]

    def __str__(self) -> str:
        return self.url

    def clean(self) -> None:
        unknown = set(self.events or []) - set(WebhookEvent.values) if isinstance(self.events, list) else None
        if unknown is None or unknown:
            raise ValidationError({"events": f"A list of {', '.join(WebhookEvent.values)}."})


class WebhookDelivery(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        DELIVERED = "delivered"
        FAILED = "failed"

    endpoint = models.ForeignKey(WebhookEndpoint, on_delete=models.CASCADE, related_name="deliveries")
    event = models.CharField(max_length=32, choices=WebhookEvent.choices)
    # The whole body: {"id", "event", "created_at", "data"}; "id" is the event's, shared by its endpoints.
    payload = models.JSONField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING)
    attempts = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    last_status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    delivered_at = models.DateTimeField(null=True, blank=True)
    # Pending: when the next attempt is due (while one is under way, when its claim runs out).
    next_attempt_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "webhook deliveries"
        indexes = [models.Index(fields=["status", "next_attempt_at"])]

    def __str__(self) -> str:
        return f"{self.event} → {self.endpoint_id} ({self.status})"
