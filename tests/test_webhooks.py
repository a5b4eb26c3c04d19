"""Webhooks against real servers: a real session's events reach a receiver on loopback, signed, in order.

The receiver is a small HTTP server on 127.0.0.1 that can fail, or never answer.
Signatures are checked with ``sessions_app.webhook_signing.verify``, the same
five lines docs/operations.md gives operators.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from unittest import mock

import pytest
from django.utils import timezone

from sessions_app import lifecycle, services, webhooks
from sessions_app.models import WebhookDelivery, WebhookEndpoint
from sessions_app.webhook_signing import sign, verify
from tests.harness import ARTIFACTS, REPO_ROOT, ScopeServer, event_time
from tests.peer import ClientPeer, ScopeClient

SESSION_EVENTS = ["session.created", "session.live", "session.closed"]
# Retries 0.2, 0.4, 0.8 … s apart, so a test sees three attempts within a second.
FAST_RETRIES = {"SCOPE_WEBHOOK_RETRY_BASE_SECONDS": 0.2}
# closing → closed of a normal teardown: aiortc's close is bounded at 1 s, the rest is quick.
CLOSE_BOUND_SECONDS = 1.5


@dataclass
class Received:
    at: float  # time.monotonic() when it arrived
    wall: float  # time.time() then
    headers: dict[str, str]  # names lower-cased
    body: bytes

    @property
    def event(self) -> str:
        return self.headers["scope-event"]

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)

    def verified(self, secret: str) -> bool:
        return verify(secret, self.body, self.headers["scope-timestamp"], self.headers["scope-signature"])


class Receiver:
    """An HTTP receiver on a free loopback port: answers ``statuses`` in turn (then 200), or never answers (``hang``)."""

    def __init__(self, statuses: list[int] | None = None, hang: bool = False) -> None:
        self.requests: list[Received] = []
        self._statuses = list(statuses or [])
        self._hang = hang
        self._released = threading.Event()
        self._lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver._lock:
                    receiver.requests.append(
                        Received(time.monotonic(), time.time(), {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                    status = receiver._statuses.pop(0) if receiver._statuses else 200
                if receiver._hang:
                    receiver._released.wait(120)  # never answers while the test runs
                    self.close_connection = True
                    return
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/hooks/scope"

    def events(self) -> list[str]:
        with self._lock:
            return [request.event for request in self.requests]

    def of(self, event: str) -> list[Received]:
        with self._lock:
            return [request for request in self.requests if request.event == event]

    def close(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def receivers() -> Iterator[list[Receiver]]:
    """Receivers a test opens: ``receivers.append(Receiver(...))``; all closed after it."""
    opened: list[Receiver] = []
    yield opened
    for receiver in opened:
        receiver.close()


def open_receiver(receivers: list[Receiver], **kwargs: Any) -> Receiver:
    receiver = Receiver(**kwargs)
    receivers.append(receiver)
    return receiver


def deliveries(server: ScopeServer, endpoint_id: int) -> list[dict[str, Any]]:
    return server.db_query(
        "SELECT id, event, status, attempts, last_status_code, last_error FROM sessions_app_webhookdelivery "
        "WHERE endpoint_id = %s ORDER BY id",
        (endpoint_id,),
    )


async def stream_one_session(server: ScopeServer) -> tuple[ClientPeer, dict[str, Any]]:
    """A real session: socket, offer, live with media, then the client leaves; its closed record."""
    async with ScopeClient() as client:
        await client.connect(server, "alice")
        await client.expect("ready")
        peer = await client.start_session(pipeline="invert")
        await peer.wait_connected()
        await peer.wait_frames(5)
        await server.wait_until_async(lambda: server.session(peer.session_id)["state"] == "live", 5, what="live")
        await client.close_socket()
        record = await asyncio.to_thread(server.closed_session, peer.session_id)
    return peer, record


def assert_session_events(receiver: Receiver, secret: str, session_id: str, reason: str) -> None:
    """The session's three events arrived once each, in order, correctly signed, saying what happened."""
    mine = [r for r in receiver.requests if r.event in SESSION_EVENTS and r.json["data"]["session_id"] == session_id]
    assert [r.event for r in mine] == SESSION_EVENTS
    for request in mine:
        assert request.verified(secret), f"{request.event}: bad signature {request.headers}"
        assert request.headers["content-type"] == "application/json"
        body = request.json
        assert set(body) == {"id", "event", "created_at", "data"} and body["event"] == request.event
    assert len({r.json["id"] for r in mine}) == 3
    live, closed = mine[1].json["data"], mine[2].json["data"]
    assert live["live_at"] and live["owner"] == "alice" and live["pipeline"] == "invert"
    assert closed["reason"] == reason and closed["owner"] == "alice" and closed["worker_id"] is not None
    assert closed["frames_in"] > 0 and closed["frames_out"] > 0
    assert 0 < closed["live_seconds"] <= closed["duration_seconds"]


def test_the_verifier_is_the_documented_one() -> None:
    """Operators copy docs/operations.md's verifier; these tests use that very function."""
    doc = (REPO_ROOT / "docs" / "operations.md").read_text()
    source = inspect.getsource(verify)
    assert source in doc
    assert len(source.strip().splitlines()) == 5


def test_signatures_refuse_tampering_staleness_and_other_secrets() -> None:
    body = b'{"data":{"session_id":"s"},"event":"session.closed"}'
    now = str(int(time.time()))
    assert verify("s3cret", body, now, sign("s3cret", now, body))
    assert not verify("s3cret", body.replace(b'"s"', b'"t"'), now, sign("s3cret", now, body))  # tampered body
    assert not verify("other", body, now, sign("s3cret", now, body))  # someone without the secret
    stale = str(int(time.time()) - 301)
    assert not verify("s3cret", body, stale, sign("s3cret", stale, body))  # genuinely signed, but old: a replay
    assert not verify("s3cret", body, "12ab", sign("s3cret", "12ab", body))


async def test_embedded_session_events_signed_in_order_and_tamper_evident(
    server_factory: Any, receivers: list[Receiver]
) -> None:
    server = server_factory("embedded", **FAST_RETRIES)
    everything = open_receiver(receivers)
    closes_only = open_receiver(receivers)
    endpoint = await asyncio.to_thread(server.add_webhook, everything.url)
    closes = await asyncio.to_thread(server.add_webhook, closes_only.url, ["session.closed"])

    peer, record = await stream_one_session(server)
    assert record["close_reason"] == "CLIENT_DISCONNECT"
    await server.wait_until_async(lambda: len(everything.requests) >= 3 and closes_only.requests, 10,
                                  what="the session's events at both receivers")
    await asyncio.sleep(0.5)  # nothing more should come

    assert_session_events(everything, endpoint["secret"], peer.session_id, "CLIENT_DISCONNECT")
    assert closes_only.events() == ["session.closed"]
    assert closes_only.requests[0].verified(closes["secret"])
    assert not closes_only.requests[0].verified(endpoint["secret"])  # each endpoint signs with its own secret
    # The same event has the same id at every endpoint, for deduplication.
    assert closes_only.requests[0].json["id"] == everything.of("session.closed")[0].json["id"]

    # What a receiver must refuse: a changed body, or a genuine request kept and replayed later.
    closed = everything.of("session.closed")[0]
    tampered = closed.body.replace(b'"CLIENT_DISCONNECT"', b'"ERROR"')
    assert tampered != closed.body
    assert not verify(endpoint["secret"], tampered, closed.headers["scope-timestamp"], closed.headers["scope-signature"])
    sent_at = int(closed.headers["scope-timestamp"])
    with mock.patch("time.time", return_value=sent_at + 301):  # the genuine request, replayed 5 minutes later
        assert not closed.verified(endpoint["secret"])
    stale = str(sent_at - 301)
    assert not verify(endpoint["secret"], closed.body, stale, sign(endpoint["secret"], stale, closed.body))

    log = deliveries(server, endpoint["id"])
    assert [(row["event"], row["status"], row["attempts"], row["last_status_code"]) for row in log] == [
        (event, "delivered", 1, 200) for event in SESSION_EVENTS
    ]


async def test_embedded_receiver_failing_twice_gets_it_on_the_third_attempt(
    server_factory: Any, receivers: list[Receiver]
) -> None:
    server = server_factory("embedded", **FAST_RETRIES)
    flaky = open_receiver(receivers, statuses=[500, 500])
    endpoint = await asyncio.to_thread(server.add_webhook, flaky.url, ["session.created"])

    async with ScopeClient() as client:
        await client.connect(server, "alice")  # reserves a session: session.created
        await client.expect("ready")
        await server.wait_until_async(lambda: len(flaky.requests) >= 3, 10, what="three attempts")
        await server.wait_until_async(lambda: deliveries(server, endpoint["id"])[0]["status"] != "pending", 5,
                                      what="the delivery to finish")

    first, second, third = flaky.requests
    assert {r.json["id"] for r in flaky.requests} == {first.json["id"]}  # one event, sent three times
    assert all(r.verified(endpoint["secret"]) for r in flaky.requests)
    # Exponential backoff: 0.2 s, then 0.4 s (FAST_RETRIES).
    assert 0.15 <= second.at - first.at < 2 and 0.35 <= third.at - second.at < 2
    [row] = deliveries(server, endpoint["id"])
    assert (row["status"], row["attempts"], row["last_status_code"], row["last_error"]) == ("delivered", 3, 200, "")


async def test_embedded_hanging_receiver_delays_no_close(server_factory: Any, receivers: list[Receiver]) -> None:
    """A receiver that never answers: sessions close in their usual time while a delivery hangs, and it times out."""
    timeout = 10
    server = server_factory("embedded", SCOPE_WEBHOOK_TIMEOUT_SECONDS=timeout, SCOPE_WEBHOOK_MAX_ATTEMPTS=1)
    silent = open_receiver(receivers, hang=True)
    endpoint = await asyncio.to_thread(server.add_webhook, silent.url)

    measured = []
    for _ in range(2):  # the first session's own session.created is still hanging as it closes; so is the second's
        _, record = await stream_one_session(server)
        closing, closed = event_time(record, "closing"), event_time(record, "closed")
        hanging = [r for r in silent.requests if r.wall <= closing and closed < r.wall + timeout]
        assert hanging, f"no delivery was hanging while the session closed ({closing}): {silent.requests}"
        measured.append(closed - closing)
    assert max(measured) < CLOSE_BOUND_SECONDS, f"closing → closed took {measured} s"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with open(ARTIFACTS / "webhook-times.jsonl", "a") as out:
        out.write(json.dumps({"test": "hanging receiver", "closing_to_closed_seconds": measured}) + "\n")

    # The hanging attempt was cut off at the timeout (after the last attempt the delivery reads failed).
    first = await server.wait_until_async(
        lambda: (rows := deliveries(server, endpoint["id"])) and rows[0]["status"] != "pending" and rows[0],
        timeout + 5, interval=0.5, what="the first delivery to give up")
    assert (first["event"], first["status"], first["attempts"], first["last_status_code"], first["last_error"]) == (
        "session.created", "failed", 1, None, f"no answer within {timeout}s")


async def test_scaled_celery_delivers_in_order_retries_and_reports_a_lost_worker(
    server_factory: Any, receivers: list[Receiver]
) -> None:
    server = server_factory("scaled", workers=1, **FAST_RETRIES)
    everything = open_receiver(receivers)
    flaky = open_receiver(receivers, statuses=[503, 500])
    endpoint = await asyncio.to_thread(server.add_webhook, everything.url)
    flaky_endpoint = await asyncio.to_thread(server.add_webhook, flaky.url, ["session.closed"])

    peer, record = await stream_one_session(server)
    await server.wait_until_async(lambda: len(everything.requests) >= 3 and len(flaky.requests) >= 3, 15,
                                  what="the session's events, and three attempts at the flaky receiver")
    assert_session_events(everything, endpoint["secret"], peer.session_id, "CLIENT_DISCONNECT")
    assert flaky.events() == ["session.closed"] * 3
    assert all(r.verified(flaky_endpoint["secret"]) for r in flaky.requests)
    await server.wait_until_async(lambda: deliveries(server, flaky_endpoint["id"])[0]["status"] == "delivered", 5,
                                  what="the flaky delivery to read delivered")
    [row] = deliveries(server, flaky_endpoint["id"])
    assert (row["attempts"], row["last_status_code"]) == (3, 200)

    # A worker killed outright: the sweep (Celery beat) declares it lost, and operators hear of it.
    worker_id = next(w["id"] for w in server.workers() if w["state"] == "active")
    server.worker_processes[0].send_signal(signal.SIGKILL)
    lost = await server.wait_until_async(lambda: everything.of("worker.lost"), 20, what="worker.lost")
    assert lost[0].verified(endpoint["secret"])
    assert lost[0].json["data"]["worker_id"] == worker_id and lost[0].json["data"]["host"]


# --- in process: recording, one attempt, the sweep's resend, the admin -------------------------

in_db = pytest.mark.django_db(transaction=True)


@pytest.fixture
def handed_on(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Deliveries handed to the dispatcher, which is kept from running (tests make attempts themselves)."""
    handed: list[int] = []
    monkeypatch.setattr(webhooks.dispatcher, "submit", lambda delivery_id, delay=0.0: handed.append(delivery_id) or True)
    return handed


@in_db
def test_steps_become_deliveries_for_active_subscribed_endpoints(handed_on: list[int]) -> None:
    everything = WebhookEndpoint.objects.create(url="http://127.0.0.1:9/all")
    closes = WebhookEndpoint.objects.create(url="http://127.0.0.1:9/closes", events=["session.closed", "worker.lost"])
    WebhookEndpoint.objects.create(url="http://127.0.0.1:9/off", active=False)
    worker = services.worker_register(channel_name="test!w", host="gpu-7", pid=1, device="cpu", capacity=1)
    session = services.session_create_placed(owner=None)  # created, placed
    services.session_close(session_id=str(session.pk), reason="SESSION_TERMINATED", by="test")  # closing, closed
    services.worker_lost(worker_id=worker.pk, by="sweep")

    rows = list(WebhookDelivery.objects.order_by("id"))
    assert [(row.endpoint_id, row.event) for row in rows] == [
        (everything.pk, "session.created"),
        (everything.pk, "session.closed"),
        (closes.pk, "session.closed"),
        (everything.pk, "worker.lost"),
        (closes.pk, "worker.lost"),
    ]
    assert handed_on == [row.pk for row in rows]
    assert all(row.status == "pending" and row.attempts == 0 for row in rows)
    assert rows[1].payload == rows[2].payload  # one event, one id, whatever the endpoint
    closed = rows[1].payload["data"]
    assert closed["session_id"] == str(session.pk) and closed["reason"] == "SESSION_TERMINATED"
    assert closed["live_at"] is None and closed["live_seconds"] is None and closed["duration_seconds"] >= 0
    assert rows[3].payload["data"] == {
        "worker_id": worker.pk, "host": "gpu-7", "lost_at": rows[3].payload["created_at"], "by": "sweep",
    }


@in_db
def test_a_failing_webhook_never_reaches_the_close_path_or_later_receivers(monkeypatch: pytest.MonkeyPatch) -> None:
    WebhookEndpoint.objects.create(url="http://127.0.0.1:9/all")
    monkeypatch.setattr(webhooks, "record", lambda *args: 1 / 0)
    heard: list[str] = []

    def later_receiver(sender: Any, step: lifecycle.SessionStep, **kwargs: Any) -> None:
        heard.append(step.kind)

    lifecycle.session_step.connect(later_receiver)
    try:
        services.worker_register(channel_name="test!w", host="h", pid=1, device="cpu", capacity=1)
        session = services.session_create_placed(owner=None)
        assert services.session_close(session_id=str(session.pk), reason="SESSION_TERMINATED", by="test")
    finally:
        lifecycle.session_step.disconnect(later_receiver)
    assert heard == ["created", "placed", "closing", "closed"]
    assert not WebhookDelivery.objects.exists()


def test_retry_delays_double_from_the_base_and_are_capped(settings: Any) -> None:
    settings.SCOPE_WEBHOOK_RETRY_BASE_SECONDS = 1
    assert [webhooks.retry_delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 32, 64]
    assert webhooks.retry_delay(40) == webhooks.RETRY_CAP_SECONDS


@in_db
def test_attempts_are_claimed_backed_off_and_end_failed(
    settings: Any, handed_on: list[int], receivers: list[Receiver]
) -> None:
    settings.SCOPE_WEBHOOK_RETRY_BASE_SECONDS = 0.5
    settings.SCOPE_WEBHOOK_MAX_ATTEMPTS = 3
    down = open_receiver(receivers, statuses=[500, 502, 500])
    endpoint = WebhookEndpoint.objects.create(url=down.url)
    [delivery_id] = webhooks.record("session.created", timezone.now(), {"session_id": "s"})

    def make_due() -> None:
        WebhookDelivery.objects.filter(pk=delivery_id).update(next_attempt_at=timezone.now())

    assert webhooks.attempt(delivery_id) == 0.5
    assert webhooks.attempt(delivery_id) is None  # not due yet: a second hand holding the id does nothing
    make_due()
    assert webhooks.attempt(delivery_id) == 1.0
    make_due()
    assert webhooks.attempt(delivery_id) is None  # the last attempt

    row = WebhookDelivery.objects.get(pk=delivery_id)
    assert (row.status, row.attempts, row.last_status_code, row.last_error) == ("failed", 3, 500, "HTTP 500")
    assert row.next_attempt_at is None and row.delivered_at is None
    make_due()
    assert webhooks.attempt(delivery_id) is None  # failed rows are left alone
    assert len(down.requests) == 3 and all(r.verified(endpoint.secret) for r in down.requests)

    # Deactivated while pending: it stops, without another request.
    [later_id] = webhooks.record("session.created", timezone.now(), {"session_id": "t"})
    WebhookEndpoint.objects.filter(pk=endpoint.pk).update(active=False)
    assert webhooks.attempt(later_id) is None
    assert WebhookDelivery.objects.get(pk=later_id).status == "failed" and len(down.requests) == 3


@in_db
def test_the_sweep_hands_on_deliveries_whose_hand_off_was_lost(
    monkeypatch: pytest.MonkeyPatch, handed_on: list[int]
) -> None:
    endpoint = WebhookEndpoint.objects.create(url="http://127.0.0.1:9/all")
    now = timezone.now()
    lost = WebhookDelivery.objects.create(endpoint=endpoint, event="session.live", payload={},
                                          next_attempt_at=now - timedelta(minutes=5))
    WebhookDelivery.objects.create(endpoint=endpoint, event="session.live", payload={}, next_attempt_at=now)
    WebhookDelivery.objects.create(endpoint=endpoint, event="session.live", payload={}, status="failed",
                                   next_attempt_at=now - timedelta(minutes=5))
    monkeypatch.setattr(webhooks, "_last_resend", 0.0)
    assert webhooks.resend_overdue() == 1
    assert handed_on == [lost.pk]
    assert webhooks.resend_overdue() == 0  # at most every RESEND_EVERY_SECONDS
    lost.refresh_from_db()
    assert lost.next_attempt_at >= now  # due again, and not overdue for another minute


@in_db
def test_admin_edits_endpoints_and_retries_failed_deliveries(
    client: Any, django_user_model: Any, handed_on: list[int]
) -> None:
    admin_user = django_user_model.objects.create_superuser("root", password="pw-root")
    client.force_login(admin_user)
    assert client.get("/admin/sessions_app/webhookendpoint/add/").status_code == 200
    response = client.post("/admin/sessions_app/webhookendpoint/add/", {
        "url": "https://billing.example.com/scope", "description": "billing",
        "events": ["session.live", "session.closed"], "active": "on", "secret": "s" * 40,
    })
    assert response.status_code == 302, response.content[:2000]
    endpoint = WebhookEndpoint.objects.get()
    assert endpoint.events == ["session.live", "session.closed"] and endpoint.secret == "s" * 40
    refused = client.post("/admin/sessions_app/webhookendpoint/add/", {
        "url": "ftp://example.com/", "events": ["session.live"], "active": "on", "secret": "x",
    })
    assert refused.status_code == 200 and WebhookEndpoint.objects.count() == 1

    failed = WebhookDelivery.objects.create(endpoint=endpoint, event="session.closed", payload={}, status="failed",
                                            attempts=8, last_error="HTTP 500", last_status_code=500)
    delivered = WebhookDelivery.objects.create(endpoint=endpoint, event="session.live", payload={},
                                               status="delivered", attempts=1)
    staff_user = django_user_model.objects.create_user("ops", password="pw-ops", is_staff=True)
    client.force_login(staff_user)
    changelist = client.get("/admin/sessions_app/webhookdelivery/")
    assert changelist.status_code == 200 and b"HTTP 500" in changelist.content
    assert client.get(f"/admin/sessions_app/webhookdelivery/{failed.pk}/change/").status_code == 200
    response = client.post("/admin/sessions_app/webhookdelivery/", {
        "action": "retry_deliveries", "_selected_action": [failed.pk, delivered.pk],
    })
    assert response.status_code == 302
    failed.refresh_from_db()
    assert (failed.status, failed.attempts) == ("pending", 0) and handed_on == [failed.pk]
    assert WebhookDelivery.objects.get(pk=delivered.pk).status == "delivered"
