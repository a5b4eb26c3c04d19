"""Prometheus metrics: the web process's ``GET /metrics``, lifecycle timings, and the cluster's figures.

Three kinds of figures, by where they can be counted:

- **This process's**, in prometheus_client's default registry: the lifecycle
  histograms below, observed from ``lifecycle.session_step`` in the process
  that recorded the step, and a media worker's frame figures
  (media_pipeline/metrics.py). Scaled, ``answered``, ``live`` and a worker's
  teardown are recorded by the media worker, so those histograms are on its
  own endpoint (``SCOPE_METRICS_PORT``); embedded, everything is one process.
- **The cluster's state**, read from the database at scrape time
  (``scope_sessions``, ``scope_queue_length``, ``scope_worker_slots``).
- **The cluster's counts** of what any process may record — closes by reason
  and the sweep's actions, which Celery records when scaled and Celery serves
  no endpoint: kept in a Redis hash that every process adds to and every web
  process reports (in this process when embedded).

The last two are the same from every web process: aggregate them with
``max``, not ``sum``.
"""

import atexit
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Any

import redis
from django.conf import settings
from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db import DatabaseError
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views.decorators.http import require_safe
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from rest_framework.authentication import TokenAuthentication
from rest_framework.exceptions import AuthenticationFailed

from media_pipeline.metrics import REFUSED_DETAIL, client_allowed

from . import errors, lifecycle, selectors
from .models import CloseReason, SessionEvent, StreamSession

logger = logging.getLogger(__name__)

# --- this process's: lifecycle timings ------------------------------------------------------

NEGOTIATION_SECONDS = Histogram(
    "scope_negotiation_seconds", "Offer to answer: the worker's peer set up and its answer sent.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
SETUP_SECONDS = Histogram(
    "scope_setup_seconds", "Offer to live: the peer connection with the client reached 'connected'.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0, 20.0, 30.0, 60.0),
)
TEARDOWN_SECONDS = Histogram(
    "scope_teardown_seconds", "Closing to closed, for sessions whose worker tore a peer down (files removed, slot freed).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0),
)


class _Recent:
    """A bounded map of session id → moment, for steps whose partner step may be recorded elsewhere.

    Scaled, a web process records ``offered`` but its worker records the rest,
    so entries here may never be claimed: the oldest go once it is full.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[str, datetime] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, session_id: str, moment: datetime) -> None:
        with self._lock:
            self._items[session_id] = moment
            self._items.move_to_end(session_id)
            while len(self._items) > self._size:
                self._items.popitem(last=False)

    def get(self, session_id: str) -> datetime | None:
        with self._lock:
            return self._items.get(session_id)

    def pop(self, session_id: str) -> datetime | None:
        with self._lock:
            return self._items.pop(session_id, None)


RECENT_SESSIONS = 10_000
_offered = _Recent(RECENT_SESSIONS)  # offer times seen by this process
_torn_down = _Recent(RECENT_SESSIONS)  # sessions whose peer teardown this process recorded (peer_closed)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    seconds = (end - start).total_seconds()
    return seconds if seconds >= 0 else None  # hosts' clocks disagree: no sample rather than a wrong one


def _offered_at(session_id: str) -> datetime | None:
    """The session's offer time: seen here (embedded), or read from its trail (scaled: a web process recorded it)."""
    return _offered.get(session_id) or selectors.session_event_at(session_id=session_id, kind=SessionEvent.Kind.OFFERED)


def _observe(histogram: Histogram, seconds: float | None) -> None:
    if seconds is not None:
        histogram.observe(seconds)


@receiver(lifecycle.session_step, dispatch_uid="sessions_app.metrics")
def _on_session_step(sender: Any, step: lifecycle.SessionStep, **kwargs: Any) -> None:
    # Sent on the close path after commit: must be quick, and must never raise into it (nor stop
    # the receivers after this one, which a raising receiver would).
    try:
        _count_step(step)
    except Exception:
        logger.exception("metrics: could not count step %s of session %s", step.kind, step.session_id)


def _count_step(step: lifecycle.SessionStep) -> None:
    kind = step.kind
    if kind == SessionEvent.Kind.OFFERED:
        _offered.put(step.session_id, step.at)
    elif kind == SessionEvent.Kind.ANSWERED:
        _observe(NEGOTIATION_SECONDS, _seconds(_offered_at(step.session_id), step.at))
    elif kind == SessionEvent.Kind.LIVE:
        _observe(SETUP_SECONDS, _seconds(_offered_at(step.session_id), step.live_at or step.at))
        _offered.pop(step.session_id)
    elif kind == SessionEvent.Kind.PEER_CLOSED:
        _torn_down.put(step.session_id, step.at)
    elif kind == SessionEvent.Kind.CLOSED:
        _offered.pop(step.session_id)
        SESSION_CLOSES.inc(step.close_reason or "UNKNOWN")
        # A session that never had a peer closes at once: not a teardown, and it would drown the real ones.
        if _torn_down.pop(step.session_id) is not None:
            _observe(TEARDOWN_SECONDS, _seconds(step.closing_at, step.closed_at or step.at))


# --- the cluster's counts --------------------------------------------------------------------

SHARED_KEY_PREFIX = "scope:metrics:"
SHARED_RETRY_SECONDS = 1.0
SHARED_TIMEOUT_SECONDS = 2.0


class _SharedTotals:
    """Additions to Redis hashes, sent from a thread of their own so no caller ever waits on Redis.

    Additions made while Redis is away are kept (one number per label value)
    and sent once it is back; those still unsent when the process exits are
    sent then, within the timeout.
    """

    def __init__(self) -> None:
        self._reset()
        os.register_at_fork(after_in_child=self._reset)  # Celery's pool children start afresh
        atexit.register(self._flush_at_exit)

    def _reset(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], int] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None
        self._failing = False

    def client(self) -> redis.Redis:
        if self._client is None:
            options: dict[str, Any] = {"socket_connect_timeout": SHARED_TIMEOUT_SECONDS, "socket_timeout": SHARED_TIMEOUT_SECONDS}
            try:  # as scope_site/channel_layers.py: a dead idle connection is then replaced, not handed out
                from redis.maint_notifications import MaintNotificationsConfig

                options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
            except ImportError:
                pass
            self._client = redis.Redis.from_url(settings.REDIS_URL, **options)
        return self._client

    def add(self, key: str, field: str, amount: int) -> None:
        with self._lock:
            self._pending[(key, field)] = self._pending.get((key, field), 0) + amount
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="metrics-shared", daemon=True)
                self._thread.start()
        self._wake.set()

    def read(self, key: str) -> dict[str, int]:
        return {field.decode(): int(value) for field, value in self.client().hgetall(key).items()}

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while not self.flush():
                time.sleep(SHARED_RETRY_SECONDS)

    def flush(self) -> bool:
        """Send what is pending; False (keeping it) if Redis did not take it."""
        with self._lock:
            batch, self._pending = self._pending, {}
        if not batch:
            return True
        try:
            pipe = self.client().pipeline(transaction=True)  # all or nothing: a retry never counts twice
            for (key, field), amount in batch.items():
                pipe.hincrby(key, field, amount)
            pipe.execute()
        except (redis.RedisError, OSError) as exc:
            with self._lock:
                for item, amount in batch.items():
                    self._pending[item] = self._pending.get(item, 0) + amount
                if not self._failing:
                    logger.warning("metrics: Redis did not take the cluster counts (%s); keeping them and retrying", exc)
                self._failing = True
            return False
        if self._failing:
            logger.info("metrics: Redis takes the cluster counts again")
            self._failing = False
        return True

    def _flush_at_exit(self) -> None:
        if self._pending:
            self.flush()


_shared = _SharedTotals()


class ClusterCounter(Collector):
    """A counter any process adds to and every web process reports: a Redis hash when scaled, this process embedded."""

    def __init__(self, name: str, documentation: str, label: str, known: Iterable[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.label = label
        self._known = tuple(known)  # reported at 0 before their first count, so rates start from the first one
        self._lock = threading.Lock()
        self._local: dict[str, int] = {}

    @property
    def key(self) -> str:
        return SHARED_KEY_PREFIX + self.name

    def inc(self, value: str, amount: int = 1) -> None:
        if settings.REDIS_URL:
            _shared.add(self.key, value, amount)
        else:
            with self._lock:
                self._local[value] = self._local.get(value, 0) + amount

    def describe(self) -> Iterable[Metric]:
        return [CounterMetricFamily(self.name, self.documentation, labels=[self.label])]

    def collect(self) -> Iterator[Metric]:
        totals = dict.fromkeys(self._known, 0)
        if settings.REDIS_URL:
            try:
                totals.update(_shared.read(self.key))
            except (redis.RedisError, OSError) as exc:
                logger.warning("metrics: could not read %s from Redis (%s); left out of this scrape", self.name, exc)
                return
        else:
            with self._lock:
                totals.update(self._local)
        family = CounterMetricFamily(self.name, self.documentation, labels=[self.label])
        for value, count in sorted(totals.items()):
            family.add_metric([value], count)
        yield family


SESSION_CLOSES = ClusterCounter(
    "scope_session_closes", "Sessions closed, by close reason (whichever process recorded the close).",
    "reason", CloseReason.values,
)
SWEEP_ACTIONS = ClusterCounter(
    "scope_sweep_actions", "What the safety-net sweep had to do: workers_lost, closed (sessions), resent (closes), "
    "placed (queued sessions).", "action", ("workers_lost", "closed", "resent", "placed"),
)


def count_sweep(result: Any) -> None:
    """Count one sweep's actions (a services.SweepResult); never raises into the sweep."""
    try:
        for action, amount in (
            ("workers_lost", len(result.workers_lost)),
            ("closed", sum(len(ids) for ids in result.closed.values())),
            ("resent", len(result.resent)),
            ("placed", len(result.placed)),
        ):
            if amount:
                SWEEP_ACTIONS.inc(action, amount)
    except Exception:
        logger.exception("metrics: could not count the sweep's actions")


# --- the cluster's state ---------------------------------------------------------------------

REPORTED_STATES = [state for state in StreamSession.State.values if state != StreamSession.State.CLOSED]


class ClusterStateCollector(Collector):
    """Sessions by state, the queue and every worker's slots, read from the database at scrape time."""

    def collect(self) -> Iterator[Metric]:
        try:
            by_state = selectors.session_counts_by_state()
            queued = selectors.queue_length()
            workers = selectors.worker_slots()
        except DatabaseError:
            logger.warning("metrics: database unreachable; sessions, queue and slots left out", exc_info=True)
            return
        sessions = GaugeMetricFamily("scope_sessions", "Sessions in each state short of closed.", labels=["state"])
        for state in REPORTED_STATES:
            sessions.add_metric([state], by_state.get(state, 0))
        yield sessions
        yield GaugeMetricFamily("scope_queue_length", "Sockets waiting for a slot.", value=queued)
        slots = GaugeMetricFamily(
            "scope_worker_slots", "Each live (or draining) worker's slots: used (sessions not closed) and capacity.",
            labels=["worker", "kind"],
        )
        for worker_id, used, capacity in workers:
            slots.add_metric([str(worker_id), "used"], used)
            slots.add_metric([str(worker_id), "capacity"], capacity)
        yield slots


# Only the web process's /metrics reports these: a media worker's endpoint shows its own figures.
CLUSTER_REGISTRY = CollectorRegistry(auto_describe=False)  # never a query at import
CLUSTER_REGISTRY.register(ClusterStateCollector())
CLUSTER_REGISTRY.register(SESSION_CLOSES)
CLUSTER_REGISTRY.register(SWEEP_ACTIONS)


# --- GET /metrics ------------------------------------------------------------------------------


def _staff(user: AbstractBaseUser | AnonymousUser | None) -> bool:
    return bool(user is not None and user.is_active and user.is_staff)


def _refused(status: int, detail: str) -> JsonResponse:
    response = JsonResponse({"code": errors.UNAUTHORIZED, "detail": detail}, status=status)
    if status == 401:
        response["WWW-Authenticate"] = "Token"
    return response


@require_safe
def metrics_view(request: HttpRequest) -> HttpResponse:
    """Prometheus text format, for an address in ``SCOPE_METRICS_ALLOW`` or a staff user (session or token)."""
    if not client_allowed(request.META.get("REMOTE_ADDR") or ""):
        try:
            authenticated = TokenAuthentication().authenticate(request)
        except AuthenticationFailed as exc:
            return _refused(401, str(exc.detail))
        user = authenticated[0] if authenticated is not None else getattr(request, "user", None)
        if not _staff(user):
            return _refused(403, REFUSED_DETAIL)
    body = generate_latest(REGISTRY) + generate_latest(CLUSTER_REGISTRY)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
