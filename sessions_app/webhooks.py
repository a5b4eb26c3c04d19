"""Signed webhooks: operators' endpoints hear of sessions and workers (billing, alerting).

Which steps become which events:

- session step ``created`` → ``session.created``, ``live`` → ``session.live``,
  ``closed`` → ``session.closed``; worker step ``lost`` → ``worker.lost``.

The receivers below run where the step was recorded (a web process, a media
worker, Celery), after its transaction committed, on the close path among
others. So they only record one ``WebhookDelivery`` row per active endpoint
that subscribes to the event and hand its id to this process's dispatcher
thread; they never send anything, never wait on the network, and never raise.

The dispatcher (one daemon thread per process, a bounded queue) hands each
delivery on:

- scaled (Celery has a worker): as the ``sessions_app.deliver_webhook`` task,
  which retries with exponential backoff;
- embedded (``CELERY_TASK_ALWAYS_EAGER``: no Celery process): it delivers
  itself, one POST at a time, each bounded by ``SCOPE_WEBHOOK_TIMEOUT_SECONDS``,
  and keeps the retries' schedule.

Each attempt first claims its row (one conditional UPDATE), so however many
hands hold a delivery's id, one attempt runs at a time. Attempt n that fails
(no 2xx, or no answer in time) is retried ``SCOPE_WEBHOOK_RETRY_BASE_SECONDS``
× 2^(n-1) later (capped at an hour); after ``SCOPE_WEBHOOK_MAX_ATTEMPTS`` the
row reads ``failed``. A pending row nobody carried on (its process died, the
queue was full, the broker was down) is handed on again by the sweep
(``resend_overdue``). Delivery is at least once: receivers deduplicate by the
body's ``id``.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import logging
import os
import queue
import threading
import time
import uuid
from datetime import timedelta
from typing import Any

import httpx
from django.conf import settings
from django.db import close_old_connections, transaction
from django.db.models import F, Q
from django.dispatch import receiver
from django.utils import timezone

from . import lifecycle
from .models import WebhookDelivery, WebhookEndpoint, WebhookEvent
from .webhook_signing import sign

logger = logging.getLogger(__name__)

SESSION_EVENTS = {
    "created": WebhookEvent.SESSION_CREATED,
    "live": WebhookEvent.SESSION_LIVE,
    "closed": WebhookEvent.SESSION_CLOSED,
}
WORKER_EVENTS = {"lost": WebhookEvent.WORKER_LOST}

RETRY_CAP_SECONDS = 3600.0
QUEUE_SIZE = 10_000
# An attempt due this long ago that nobody made lost its hand-off; the sweep hands it on again.
OVERDUE_SECONDS = 60.0
RESEND_EVERY_SECONDS = 30.0
# A claimed attempt holds its row this long past its own timeout.
CLAIM_MARGIN_SECONDS = 30.0
# A retry may fire a moment early (timers, clocks); one earlier than this finds its row not due and leaves it.
DUE_SLACK = timedelta(seconds=0.1)
USER_AGENT = "Scope-Webhooks/1"


# --- what an event says ------------------------------------------------------


def _iso(moment: Any) -> str | None:
    return moment.isoformat() if moment is not None else None


def _seconds(start: Any, end: Any) -> float | None:
    return round((end - start).total_seconds(), 3) if start is not None and end is not None else None


def session_data(step: lifecycle.SessionStep) -> dict[str, Any]:
    data: dict[str, Any] = {
        "session_id": step.session_id,
        "owner": step.owner,
        "pipeline": step.pipeline,
        "worker_id": step.worker_id,
        "created_at": _iso(step.created_at),
    }
    if step.kind in ("live", "closed"):
        data["live_at"] = _iso(step.live_at)
    if step.kind == "closed":
        data.update(
            reason=step.close_reason,
            closed_at=_iso(step.closed_at),
            # From the offer's reservation to closed, and the part of it spent streaming (null if never live).
            duration_seconds=_seconds(step.created_at, step.closed_at),
            live_seconds=_seconds(step.live_at, step.closed_at),
            frames_in=step.frames_in,
            frames_out=step.frames_out,
        )
    return data


def worker_data(step: lifecycle.WorkerStep) -> dict[str, Any]:
    return {"worker_id": step.worker_id, "host": step.host, "lost_at": _iso(step.at), "by": step.detail.get("by")}


# --- the receivers: record and hand on, never more ------------------------------------


@receiver(lifecycle.session_step, dispatch_uid="sessions_app.webhooks.session_step")
def on_session_step(sender: Any, step: lifecycle.SessionStep, **kwargs: Any) -> None:
    event = SESSION_EVENTS.get(step.kind)
    if event is not None:
        _emit(event, step.at, lambda: session_data(step))


@receiver(lifecycle.worker_step, dispatch_uid="sessions_app.webhooks.worker_step")
def on_worker_step(sender: Any, step: lifecycle.WorkerStep, **kwargs: Any) -> None:
    event = WORKER_EVENTS.get(step.kind)
    if event is not None:
        _emit(event, step.at, lambda: worker_data(step))


def _emit(event: str, at: Any, data: Any) -> None:
    # Other receivers of the same signal come after this one: nothing may escape.
    try:
        delivery_ids = record(event, at, data())
    except Exception:
        logger.exception("webhooks: could not record %s", event)
        return
    for delivery_id in delivery_ids:
        dispatcher.submit(delivery_id)


def record(event: str, at: Any, data: dict[str, Any]) -> list[int]:
    """One pending delivery per active endpoint subscribed to ``event``; their ids."""
    endpoints = [e for e in WebhookEndpoint.objects.filter(active=True).only("pk", "events") if event in e.events]
    if not endpoints:
        return []
    payload = {"id": str(uuid.uuid4()), "event": event, "created_at": _iso(at), "data": data}
    now = timezone.now()
    with transaction.atomic():
        return [
            WebhookDelivery.objects.create(endpoint=endpoint, event=event, payload=payload, next_attempt_at=now).pk
            for endpoint in endpoints
        ]


# --- one attempt -------------------------------------------------------------------


def retry_delay(attempts: int) -> float:
    """Seconds from failed attempt number ``attempts`` (1, 2, …) to the next: base × 1, 2, 4 …, capped."""
    return min(settings.SCOPE_WEBHOOK_RETRY_BASE_SECONDS * 2 ** (attempts - 1), RETRY_CAP_SECONDS)


def encode(payload: dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


async def _post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> int:
    # One bound for the whole exchange: httpx's own timeouts are per read, which a trickling receiver evades.
    async with asyncio.timeout(timeout):
        async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
            async with client.stream("POST", url, content=body, headers=headers) as response:
                return response.status_code


def post(url: str, secret: str, event: str, payload: dict[str, Any]) -> int:
    """POST the signed body once; its HTTP status. Raises on no answer within ``SCOPE_WEBHOOK_TIMEOUT_SECONDS``."""
    body = encode(payload)
    timestamp = str(int(time.time()))
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        "Scope-Event": event,
        "Scope-Timestamp": timestamp,
        "Scope-Signature": sign(secret, timestamp, body),
    }
    return asyncio.run(_post(url, body, headers, settings.SCOPE_WEBHOOK_TIMEOUT_SECONDS))


def attempt(delivery_id: int) -> float | None:
    """Make the delivery's next attempt if it is due and nobody else is making it.

    Returns the seconds until the next attempt is due, or None when there is
    none for this caller (delivered, failed, or not its turn).
    """
    now = timezone.now()
    timeout = settings.SCOPE_WEBHOOK_TIMEOUT_SECONDS
    claimed = (
        WebhookDelivery.objects.filter(pk=delivery_id, status=WebhookDelivery.Status.PENDING)
        .filter(Q(next_attempt_at__isnull=True) | Q(next_attempt_at__lte=now + DUE_SLACK))
        .update(attempts=F("attempts") + 1, next_attempt_at=now + timedelta(seconds=timeout + CLAIM_MARGIN_SECONDS))
    )
    if not claimed:
        return None
    delivery = WebhookDelivery.objects.select_related("endpoint").get(pk=delivery_id)
    endpoint = delivery.endpoint
    status_code: int | None = None
    if not endpoint.active:
        error = "endpoint deactivated"
    else:
        try:
            status_code = post(endpoint.url, endpoint.secret, delivery.event, delivery.payload)
            error = "" if 200 <= status_code < 300 else f"HTTP {status_code}"
        except TimeoutError:
            error = f"no answer within {timeout:g}s"
        except Exception as exc:  # noqa: BLE001 - any failure to deliver is the receiver's, and is retried
            error = f"{type(exc).__name__}: {exc}"[:1000]
    done = timezone.now()
    fields: dict[str, Any] = {"last_status_code": status_code, "last_error": error}
    delay: float | None = None
    if not error:
        fields.update(status=WebhookDelivery.Status.DELIVERED, delivered_at=done, next_attempt_at=None)
    elif delivery.attempts >= settings.SCOPE_WEBHOOK_MAX_ATTEMPTS or not endpoint.active:
        fields.update(status=WebhookDelivery.Status.FAILED, next_attempt_at=None)
        logger.warning("webhook %s (%s) to %s failed for good after %d attempts: %s",
                       delivery_id, delivery.event, endpoint.url, delivery.attempts, error)
    else:
        delay = retry_delay(delivery.attempts)
        fields.update(next_attempt_at=done + timedelta(seconds=delay))
        logger.info("webhook %s (%s) to %s: attempt %d failed (%s); next in %gs",
                    delivery_id, delivery.event, endpoint.url, delivery.attempts, error, delay)
    WebhookDelivery.objects.filter(pk=delivery_id, status=WebhookDelivery.Status.PENDING).update(**fields)
    return delay


# --- handing on ----------------------------------------------------------------------


def _delivers_here() -> bool:
    """Embedded: no Celery process exists, so this process delivers itself."""
    return bool(settings.CELERY_TASK_ALWAYS_EAGER)


class Dispatcher:
    """This process's one webhook thread, started on first use (and again in a forked child)."""

    def __init__(self) -> None:
        self._order = itertools.count()
        self._forget()
        # A forked child (Celery's prefork pool) has no thread, and maybe a lock its parent held.
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[int, float]] = queue.Queue(maxsize=QUEUE_SIZE)
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._held: set[int] = set()  # ids queued or scheduled here

    def submit(self, delivery_id: int, delay: float = 0.0) -> bool:
        """Hand a delivery to the thread (due in ``delay`` s); False if its queue is full (the sweep resends it)."""
        with self._lock:
            if self._thread is None or self._pid != os.getpid() or not self._thread.is_alive():
                self._queue = queue.Queue(maxsize=QUEUE_SIZE)
                self._held = set()
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="scope-webhooks", daemon=True)
                self._thread.start()
            if delivery_id in self._held:
                return True
            try:
                self._queue.put_nowait((delivery_id, time.monotonic() + delay))
            except queue.Full:
                logger.warning("webhooks: hand-off queue full; delivery %s waits for the sweep", delivery_id)
                return False
            self._held.add(delivery_id)
            return True

    def holds(self, delivery_id: int) -> bool:
        return delivery_id in self._held

    def _run(self) -> None:
        inbox = self._queue
        scheduled: list[tuple[float, int, int]] = []  # (due, order, id): retries waiting their turn
        while True:
            timeout = max(0.0, scheduled[0][0] - time.monotonic()) if scheduled else None
            try:
                delivery_id, due = inbox.get(timeout=timeout)
                heapq.heappush(scheduled, (due, next(self._order), delivery_id))
                continue  # take everything already queued before working
            except queue.Empty:
                pass
            if not scheduled or scheduled[0][0] > time.monotonic():
                continue
            _, _, delivery_id = heapq.heappop(scheduled)
            delay = self._hand_on(delivery_id)
            if delay is not None:
                heapq.heappush(scheduled, (time.monotonic() + delay, next(self._order), delivery_id))
            else:
                with self._lock:
                    self._held.discard(delivery_id)

    def _hand_on(self, delivery_id: int) -> float | None:
        close_old_connections()
        try:
            if _delivers_here():
                return attempt(delivery_id)
            from .tasks import deliver_webhook

            deliver_webhook.apply_async((delivery_id,))
        except Exception:
            logger.exception("webhooks: could not hand on delivery %s; the sweep resends it", delivery_id)
        finally:
            close_old_connections()
        return None


dispatcher = Dispatcher()

_last_resend = 0.0


def resend_overdue() -> int:
    """Hand on again pending deliveries whose attempt is long overdue; at most every ``RESEND_EVERY_SECONDS``.

    Called by the sweep (Celery beat when scaled, the in-process timer when
    embedded). Overdue means its hand-off was lost: the process that held it
    died, its queue was full, or the broker was down.
    """
    global _last_resend
    if time.monotonic() - _last_resend < RESEND_EVERY_SECONDS:
        return 0
    _last_resend = time.monotonic()
    now = timezone.now()
    overdue = list(
        WebhookDelivery.objects.filter(
            status=WebhookDelivery.Status.PENDING, next_attempt_at__lt=now - timedelta(seconds=OVERDUE_SECONDS)
        ).values_list("pk", flat=True)[:1000]
    )
    resent = 0
    for delivery_id in overdue:
        if dispatcher.holds(delivery_id):
            continue  # this process still has it, only late (a backlog behind slow receivers)
        # Due now: the claim in ``attempt`` lets one hand through, and the next overdue check is a minute away.
        WebhookDelivery.objects.filter(pk=delivery_id, status=WebhookDelivery.Status.PENDING).update(next_attempt_at=now)
        resent += dispatcher.submit(delivery_id)
    if resent:
        logger.warning("webhooks: handed on %d overdue deliveries again", resent)
    return resent


def prune(older_than: Any) -> int:
    """Delete delivered and failed deliveries created before ``older_than``; how many."""
    finished = WebhookDelivery.objects.filter(created_at__lt=older_than).exclude(status=WebhookDelivery.Status.PENDING)
    deleted = 0
    while batch := list(finished.values_list("pk", flat=True)[:500]):  # short transactions, however large the backlog
        deleted += WebhookDelivery.objects.filter(pk__in=batch).delete()[0]
    return deleted
