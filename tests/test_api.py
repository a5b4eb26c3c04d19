"""REST API, health probes and admin, without a media worker process.

Where a worker is needed, a ``Worker`` row stands in for it and the test reads
what the server sent to its channel, or answers on its behalf.
"""

import asyncio
import time

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.urls import reverse
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from sessions_app import channels_util, health, services
from sessions_app.models import SessionEvent, StreamSession

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("empty_channel_layer")]

WORKER_CHANNEL = "test!1"

OFFER_SDP = (
    "\r\n".join(
        [
            "v=0",
            "o=- 4611731400430051336 2 IN IP4 127.0.0.1",
            "s=-",
            "t=0 0",
            "a=group:BUNDLE 0",
            "m=video 9 UDP/TLS/RTP/SAVPF 96",
            "c=IN IP4 0.0.0.0",
            "a=ice-ufrag:abcd",
            "a=ice-pwd:abcdefghijklmnopqrstuvwx",
            "a=fingerprint:sha-256 " + ":".join(["AB"] * 32),
            "a=setup:actpass",
            "a=mid:0",
            "a=sendrecv",
            "a=rtcp-mux",
            "a=rtpmap:96 VP8/90000",
        ]
    )
    + "\r\n"
)


def client_for(user=None) -> APIClient:
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {Token.objects.create(user=user).key}")
    return client


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.content
    body = response.json()
    assert body["code"] == code
    assert isinstance(body["detail"], str) and body["detail"]


def live_worker():
    return services.worker_register(channel_name=WORKER_CHANNEL, host="h", pid=1, device="cpu", capacity=1)


def worker_messages() -> list[dict]:
    """Everything the server sent to the stand-in worker so far."""
    received = []
    while (message := async_to_sync(channels_util.receive_within)(WORKER_CHANNEL, 0.05)) is not None:
        received.append(message)
    return received


def negotiating_session(owner) -> StreamSession:
    """A session placed on the stand-in worker and handed an offer, as HTTP or socket signaling would."""
    live_worker()
    return offered_session(owner)


def offered_session(owner) -> StreamSession:
    """A session placed on an existing worker and handed an offer."""
    session = services.session_create_placed(owner=owner)
    services.session_offer(
        session_id=str(session.pk),
        pipeline="passthrough",
        parameters={},
        ignored_parameters=[],
        sdp=OFFER_SDP,
        sdp_type="offer",
        reply_channel="test!reply",
        request_id=None,
    )
    return session


def event_kinds(session: StreamSession) -> list[str]:
    return list(SessionEvent.objects.filter(session=session).values_list("kind", flat=True))


# --- authentication and visibility ---------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/v1/sessions/"),
        ("get", "/api/v1/workers/"),
        ("delete", "/api/v1/webrtc/offer/00000000-0000-4000-8000-000000000000"),
    ],
)
def test_operator_routes_refuse_anonymous_with_401(settings, method, path):
    settings.SCOPE_ALLOW_ANONYMOUS = True
    response = getattr(APIClient(), method)(path)
    assert_error(response, 401, "UNAUTHORIZED")
    assert response["WWW-Authenticate"] == "Token"


def test_bad_token_is_401_even_where_anonymous_streaming_is_allowed(settings):
    settings.SCOPE_ALLOW_ANONYMOUS = True
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token not-a-real-key")
    assert_error(client.get("/api/v1/webrtc/ice-servers"), 401, "UNAUTHORIZED")


def test_ice_servers_for_anonymous_only_where_allowed(settings, alice):
    settings.SCOPE_ICE_SERVERS = [{"urls": ["stun:stun.example.org:3478"]}]
    settings.SCOPE_ALLOW_ANONYMOUS = True
    response = APIClient().get("/api/v1/webrtc/ice-servers")
    assert response.status_code == 200
    assert response.json() == {"iceServers": [{"urls": ["stun:stun.example.org:3478"]}]}

    settings.SCOPE_ALLOW_ANONYMOUS = False
    assert_error(APIClient().get("/api/v1/webrtc/ice-servers"), 401, "UNAUTHORIZED")
    assert client_for(alice).get("/api/v1/webrtc/ice-servers").status_code == 200


def test_workers_are_for_staff_only(alice, staff):
    live_worker()
    assert_error(client_for(alice).get("/api/v1/workers/"), 403, "UNAUTHORIZED")

    services.session_create_placed(owner=alice)
    response = client_for(staff).get("/api/v1/workers/")
    assert response.status_code == 200
    [worker] = response.json()
    assert worker["host"] == "h"
    assert worker["device"] == "cpu"
    assert worker["capacity"] == 1
    assert worker["slots_used"] == 1
    assert worker["state"] == "active"


def test_users_see_only_their_own_sessions(alice, bob):
    own = services.session_create(owner=alice)
    other = services.session_create(owner=bob)
    client = client_for(alice)

    listed = client.get("/api/v1/sessions/").json()
    assert [row["id"] for row in listed["results"]] == [str(own.pk)]
    assert listed["results"][0]["owner"] == "alice"
    assert listed["results"][0]["worker"] is None

    detail = client.get(f"/api/v1/sessions/{own.pk}/")
    assert detail.status_code == 200
    assert detail.json()["state"] == "waiting"
    assert [event["kind"] for event in detail.json()["events"]] == ["created"]

    assert_error(client.get(f"/api/v1/sessions/{other.pk}/"), 404, "UNKNOWN_SESSION")


@pytest.mark.parametrize("session_id", ["not-a-uuid", "a.b", "00000000-0000-4000-8000-000000000000"])
def test_unknown_or_malformed_session_id_is_404(alice, session_id):
    assert_error(client_for(alice).get(f"/api/v1/sessions/{session_id}/"), 404, "UNKNOWN_SESSION")


def test_staff_see_every_session(alice, bob, staff):
    sessions = [services.session_create(owner=alice), services.session_create(owner=bob)]
    client = client_for(staff)

    listed = client.get("/api/v1/sessions/").json()
    assert listed["count"] == 2
    # Newest first.
    assert [row["id"] for row in listed["results"]] == [str(sessions[1].pk), str(sessions[0].pk)]
    assert client.get(f"/api/v1/sessions/{sessions[0].pk}").status_code == 200


def test_sessions_filter_by_state(staff, alice):
    waiting = services.session_create(owner=alice)
    closed = services.session_create(owner=alice)
    services.session_close(session_id=str(closed.pk), reason="SESSION_TERMINATED", by="test")
    client = client_for(staff)

    assert [row["id"] for row in client.get("/api/v1/sessions/?state=waiting").json()["results"]] == [str(waiting.pk)]
    assert [row["id"] for row in client.get("/api/v1/sessions/?state=closed").json()["results"]] == [str(closed.pk)]
    assert client.get("/api/v1/sessions/?state=live").json()["results"] == []
    assert_error(client.get("/api/v1/sessions/?state=sleeping"), 400, "INVALID_MESSAGE")


@pytest.mark.parametrize(
    "path",
    ["/api/v1/sessions", "/api/v1/workers", "/api/v1/webrtc/ice-servers", "/api/v1/sessions/{id}"],
)
def test_routes_answer_with_and_without_trailing_slash(staff, path):
    session = services.session_create(owner=staff)
    client = client_for(staff)
    for variant in (path, path + "/"):
        response = client.get(variant.format(id=session.pk))
        assert response.status_code == 200, (variant, response.status_code)


def test_method_not_allowed_is_json(alice):
    response = client_for(alice).get("/api/v1/webrtc/offer")
    assert_error(response, 405, "INVALID_MESSAGE")


# --- HTTP signaling: offer -----------------------------------------------------------


def test_offer_with_garbage_sdp_is_invalid_sdp_and_creates_nothing(alice):
    live_worker()
    response = client_for(alice).post(
        "/api/v1/webrtc/offer", {"sdp": "hello", "type": "offer"}, format="json"
    )
    assert_error(response, 400, "INVALID_SDP")
    assert not StreamSession.objects.exists()


def test_offer_with_missing_fields_is_invalid_message(alice):
    response = client_for(alice).post("/api/v1/webrtc/offer", {"type": "offer"}, format="json")
    assert_error(response, 400, "INVALID_MESSAGE")
    assert "sdp" in response.json()["detail"]
    assert not StreamSession.objects.exists()


@pytest.mark.parametrize(
    ("body", "content_type"),
    [("{not json", "application/json"), ("sdp=v%3D0", "text/plain")],
)
def test_offer_body_that_is_not_json_is_invalid_message(alice, body, content_type):
    response = client_for(alice).post("/api/v1/webrtc/offer", body, content_type=content_type)
    assert_error(response, 400, "INVALID_MESSAGE")
    assert not StreamSession.objects.exists()


def test_offer_with_unknown_pipeline_is_invalid_message_and_creates_nothing(alice):
    live_worker()
    response = client_for(alice).post(
        "/api/v1/webrtc/offer",
        {"sdp": OFFER_SDP, "type": "offer", "initialParameters": {"pipeline": "no-such-pipeline"}},
        format="json",
    )
    assert_error(response, 400, "INVALID_MESSAGE")
    assert not StreamSession.objects.exists()


def test_offer_without_a_live_worker_is_no_capacity_and_creates_nothing(alice):
    response = client_for(alice).post("/api/v1/webrtc/offer", {"sdp": OFFER_SDP, "type": "offer"}, format="json")
    assert_error(response, 503, "NO_CAPACITY")
    assert not StreamSession.objects.exists()


def test_offer_by_anonymous_only_where_allowed(settings):
    settings.SCOPE_ALLOW_ANONYMOUS = False
    response = APIClient().post("/api/v1/webrtc/offer", {"sdp": OFFER_SDP, "type": "offer"}, format="json")
    assert_error(response, 401, "UNAUTHORIZED")
    assert not StreamSession.objects.exists()


@pytest.fixture
def answering_worker(monkeypatch):
    """Stands in for the media worker: takes the offer off its channel and replies with ``reply``."""

    def install(reply: dict) -> None:
        real_receive_within = channels_util.receive_within

        async def receive_within(channel, timeout):
            layer = get_channel_layer()
            offer = await layer.receive(WORKER_CHANNEL)
            await layer.send(
                offer["reply_channel"],
                {"session_id": offer["session_id"], "request_id": offer["request_id"], **reply},
            )
            return await real_receive_within(channel, timeout)

        monkeypatch.setattr(channels_util, "receive_within", receive_within)

    return install


def test_offer_answered_by_the_worker_is_200_with_the_answer(alice, answering_worker):
    live_worker()
    answering_worker({"type": "signaling.answer", "sdp": "v=0\r\nanswer\r\n", "sdp_type": "answer"})
    response = client_for(alice).post(
        "/api/v1/webrtc/offer/",
        {"sdp": OFFER_SDP, "type": "offer", "initialParameters": {"pipeline": "invert"}},
        format="json",
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["sdp"] == "v=0\r\nanswer\r\n"
    assert body["type"] == "answer"
    assert response["Location"] == f"/api/v1/webrtc/offer/{body['sessionId']}"
    session = StreamSession.objects.get(pk=body["sessionId"])
    assert session.owner == alice
    assert session.state == "negotiating"
    assert session.pipeline == "invert"


def test_offer_refused_by_the_worker_reports_its_code(alice, answering_worker):
    live_worker()
    answering_worker({"type": "signaling.error", "code": "INVALID_SDP", "error": "No codec in common."})
    response = client_for(alice).post("/api/v1/webrtc/offer", {"sdp": OFFER_SDP, "type": "offer"}, format="json")
    assert_error(response, 400, "INVALID_SDP")
    assert response.json()["detail"] == "No codec in common."


def test_offer_unanswered_in_time_is_504_and_the_session_is_closed(settings, alice):
    settings.SCOPE_NEGOTIATION_TIMEOUT_SECONDS = 0.2
    live_worker()
    response = client_for(alice).post("/api/v1/webrtc/offer", {"sdp": OFFER_SDP, "type": "offer"}, format="json")
    assert_error(response, 504, "ERROR")
    session = StreamSession.objects.get()
    assert session.state == "closing"
    assert session.close_reason == "ERROR"
    assert [message["type"] for message in worker_messages()] == ["peer.offer", "peer.close"]


# --- HTTP signaling: candidates --------------------------------------------------------


def test_candidates_are_forwarded_to_the_worker(alice):
    session = negotiating_session(alice)
    candidate = {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host", "sdpMid": "0", "sdpMLineIndex": 0}
    response = client_for(alice).patch(
        f"/api/v1/webrtc/offer/{session.pk}",
        {"candidates": [candidate, {"candidate": "", "sdpMid": "0"}, None]},
        format="json",
    )
    assert response.status_code == 204, response.content
    forwarded = [message for message in worker_messages() if message["type"] == "peer.candidate"]
    assert [message["candidate"] for message in forwarded] == [candidate, None, None]


def test_candidates_for_another_users_session_are_404(alice, bob):
    session = negotiating_session(alice)
    response = client_for(bob).patch(
        f"/api/v1/webrtc/offer/{session.pk}", {"candidates": [None]}, format="json"
    )
    assert_error(response, 404, "UNKNOWN_SESSION")


def test_anonymous_candidates_only_for_ownerless_sessions(settings, alice):
    settings.SCOPE_ALLOW_ANONYMOUS = True
    owned = negotiating_session(alice)
    assert_error(
        APIClient().patch(f"/api/v1/webrtc/offer/{owned.pk}", {"candidates": [None]}, format="json"),
        404,
        "UNKNOWN_SESSION",
    )
    services.session_close(session_id=str(owned.pk), reason="SESSION_TERMINATED", by="test")
    services.session_closed(session_id=str(owned.pk), steps=[])

    ownerless = offered_session(None)
    response = APIClient().patch(f"/api/v1/webrtc/offer/{ownerless.pk}/", {"candidates": [None]}, format="json")
    assert response.status_code == 204, response.content

    settings.SCOPE_ALLOW_ANONYMOUS = False
    assert_error(
        APIClient().patch(f"/api/v1/webrtc/offer/{ownerless.pk}", {"candidates": [None]}, format="json"),
        401,
        "UNAUTHORIZED",
    )


def test_malformed_candidates_are_invalid_message(alice):
    session = negotiating_session(alice)
    response = client_for(alice).patch(
        f"/api/v1/webrtc/offer/{session.pk}", {"candidates": [{"sdpMid": "0"}]}, format="json"
    )
    assert_error(response, 400, "INVALID_MESSAGE")
    assert "candidate" in response.json()["detail"]


def test_candidates_before_an_offer_are_invalid_message(alice):
    session = services.session_create(owner=alice)
    response = client_for(alice).patch(f"/api/v1/webrtc/offer/{session.pk}", {"candidates": [None]}, format="json")
    assert_error(response, 400, "INVALID_MESSAGE")


# --- HTTP signaling: close -----------------------------------------------------------


def test_delete_closes_a_waiting_session_and_is_idempotent(alice):
    session = services.session_create(owner=alice)
    client = client_for(alice)

    response = client.delete(f"/api/v1/webrtc/offer/{session.pk}")
    assert response.status_code == 204, response.content
    session.refresh_from_db()
    assert session.state == "closed"
    assert session.close_reason == "SESSION_TERMINATED"
    assert event_kinds(session) == ["created", "closing", "closed"]
    closing = SessionEvent.objects.get(session=session, kind="closing")
    assert closing.detail == {"reason": "SESSION_TERMINATED", "by": "api:alice"}

    assert client.delete(f"/api/v1/webrtc/offer/{session.pk}/").status_code == 204
    assert event_kinds(session) == ["created", "closing", "closed"]


def test_delete_of_another_users_session_is_404_and_leaves_it_open(alice, bob):
    session = services.session_create(owner=alice)
    assert_error(client_for(bob).delete(f"/api/v1/webrtc/offer/{session.pk}"), 404, "UNKNOWN_SESSION")
    session.refresh_from_db()
    assert session.state == "waiting"


def test_staff_delete_any_session(alice, staff):
    session = services.session_create(owner=alice)
    assert client_for(staff).delete(f"/api/v1/webrtc/offer/{session.pk}").status_code == 204
    session.refresh_from_db()
    assert session.state == "closed"


def test_delete_unconfirmed_by_the_worker_is_202_with_the_closing_session(settings, alice):
    settings.SCOPE_CLOSE_WAIT_SECONDS = 0.2
    session = negotiating_session(alice)
    response = client_for(alice).delete(f"/api/v1/webrtc/offer/{session.pk}")
    assert response.status_code == 202, response.content
    assert response.json()["state"] == "closing"
    assert response.json()["close_reason"] == "SESSION_TERMINATED"
    assert [message["type"] for message in worker_messages()] == ["peer.offer", "peer.close"]


# --- admin ---------------------------------------------------------------------------------


def test_admin_terminate_action_closes_sessions(client, staff, alice):
    session = services.session_create(owner=alice)
    client.force_login(staff)
    response = client.post(
        reverse("admin:sessions_app_streamsession_changelist"),
        {"action": "terminate_sessions", "_selected_action": [str(session.pk)], "index": 0},
        follow=True,
    )
    assert response.status_code == 200
    assert "Ended 1 session." in [str(message) for message in response.context["messages"]]
    session.refresh_from_db()
    assert session.state == "closed"
    assert session.close_reason == "SESSION_TERMINATED"
    assert SessionEvent.objects.get(session=session, kind="closing").detail["by"] == "admin:staff"


def test_admin_lists_open_sessions_before_closed_ones(client, staff, alice):
    older_open = services.session_create(owner=alice)
    newer_closed = services.session_create(owner=alice)
    services.session_close(session_id=str(newer_closed.pk), reason="SESSION_TERMINATED", by="test")
    client.force_login(staff)
    response = client.get(reverse("admin:sessions_app_streamsession_changelist"))
    assert response.status_code == 200
    assert [session.pk for session in response.context["cl"].result_list] == [older_open.pk, newer_closed.pk]


def test_admin_session_page_is_read_only(client, staff, alice):
    session = services.session_create(owner=alice)
    client.force_login(staff)
    page = client.get(reverse("admin:sessions_app_streamsession_change", args=[session.pk]))
    assert page.status_code == 200
    assert not page.context["has_change_permission"]
    assert client.get(reverse("admin:sessions_app_streamsession_add")).status_code == 403


# --- health -------------------------------------------------------------------------------


def test_healthz():
    response = APIClient().get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_readyz_needs_a_live_worker():
    response = APIClient().get("/readyz")
    assert response.status_code == 503
    assert response.json() == {
        "status": "unavailable",
        "checks": {"database": True, "channel_layer": True, "worker": False},
    }

    live_worker()
    response = APIClient().get("/readyz")
    assert response.status_code == 200
    assert response.json() == {
        "status": "ok",
        "checks": {"database": True, "channel_layer": True, "worker": True},
    }


def test_readyz_bounds_an_unresponsive_channel_layer(monkeypatch):
    live_worker()

    class HangingLayer:
        async def group_send(self, group, message):
            await asyncio.sleep(60)

    monkeypatch.setattr(health, "get_channel_layer", HangingLayer)
    started = time.monotonic()
    response = APIClient().get("/readyz")
    assert time.monotonic() - started < 5
    assert response.status_code == 503
    assert response.json()["checks"] == {"database": True, "channel_layer": False, "worker": True}
