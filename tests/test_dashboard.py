"""Pages' access rules, the pipelines route, and the dashboard socket's pushes, in process.

The browser tests (test_pages.py) show the same pages working end to end;
these pin down who gets what and what the dashboard is told, quickly.
"""

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import AnonymousUser
from django.test import Client

from sessions_app import services
from sessions_app.dashboard import DashboardConsumer
from sessions_app.errors import CLOSE_RULES, close_message
from sessions_app.models import CloseReason

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("empty_channel_layer")]


def browser_for(user=None) -> Client:
    client = Client()
    if user is not None:
        client.force_login(user)
    return client


# --- pages ------------------------------------------------------------------------


def test_streaming_page_for_anonymous_only_where_allowed(settings):
    settings.SCOPE_ALLOW_ANONYMOUS = True
    response = browser_for().get("/")
    assert response.status_code == 200
    assert b'id="start"' in response.content
    settings.SCOPE_ALLOW_ANONYMOUS = False
    response = browser_for().get("/")
    assert response.status_code == 302 and response["Location"] == "/accounts/login/?next=/"


def test_streaming_page_tells_the_script_the_time_limit(settings, alice):
    settings.SCOPE_MAX_SESSION_SECONDS = 90
    assert b'data-max-seconds="90"' in browser_for(alice).get("/").content


def test_dashboard_is_for_staff_only(alice, staff):
    anonymous = browser_for().get("/dashboard/")
    assert anonymous.status_code == 302 and anonymous["Location"] == "/accounts/login/?next=/dashboard/"
    refused = browser_for(alice).get("/dashboard/")
    assert refused.status_code == 403 and b"Not allowed" in refused.content
    page = browser_for(staff).get("/dashboard/")
    assert page.status_code == 200 and b"Live sessions" in page.content


def test_login_and_logout(alice):
    client = Client()
    response = client.post("/accounts/login/", {"username": "alice", "password": "pw-alice"})
    assert response.status_code == 302 and response["Location"] == "/"
    assert b"Log out" in client.get("/").content
    assert client.post("/accounts/logout/").status_code == 302
    assert b"Log in" in client.get("/").content


def test_wrong_password_is_told_and_logs_nobody_in(alice):
    client = Client()
    response = client.post("/accounts/login/", {"username": "alice", "password": "nope"})
    assert response.status_code == 200 and b"don't match" in response.content
    assert "_auth_user_id" not in client.session


# --- pipelines ---------------------------------------------------------------------


def test_pipelines_route_lists_each_pipeline_with_its_parameters(settings, alice):
    settings.SCOPE_DEFAULT_PIPELINE = "invert"
    response = browser_for(alice).get("/api/v1/pipelines/")
    assert response.status_code == 200
    pipelines = {p["name"]: p for p in response.json()}
    assert {"passthrough", "invert", "grayscale", "edges", "blur"} <= pipelines.keys()
    assert [p["name"] for p in response.json() if p["default"]] == ["invert"]
    assert pipelines["blur"]["parameters"] == [
        {"name": "radius", "kind": "int", "default": 2, "minimum": 0, "maximum": 15, "choices": [],
         "label": "Blur radius (pixels)"},
    ]
    assert pipelines["passthrough"]["parameters"] == []


def test_pipelines_route_for_anonymous_only_where_allowed(settings):
    settings.SCOPE_ALLOW_ANONYMOUS = True
    assert browser_for().get("/api/v1/pipelines").status_code == 200
    settings.SCOPE_ALLOW_ANONYMOUS = False
    response = browser_for().get("/api/v1/pipelines/")
    assert response.status_code == 401 and response.json()["code"] == "UNAUTHORIZED"


# --- close reasons in words -------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "words"),
    [(3600, "Time limit of 60 minutes reached."), (90, "Time limit of 90 seconds reached."),
     (5, "Time limit of 5 seconds reached."), (1, "Time limit of 1 second reached.")],
)
def test_time_limit_is_told_in_words(seconds, words):
    assert close_message(CloseReason.MAX_DURATION_EXCEEDED, max_session_seconds=seconds) == words


def test_operator_end_is_told_in_words():
    assert close_message(CloseReason.SESSION_TERMINATED, max_session_seconds=60) == "Session ended by an operator."


# --- the dashboard socket ------------------------------------------------------------------


async def dashboard_socket(user) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(DashboardConsumer.as_asgi(), "/ws/dashboard/")
    communicator.scope["user"] = user
    connected, _ = await communicator.connect()
    assert connected
    return communicator


async def next_of_type(communicator: WebsocketCommunicator, kind: str, **match) -> dict:
    """The next message of ``kind`` (whose ``session`` has ``match``'s fields); others are skipped."""
    while True:
        message = await communicator.receive_json_from(timeout=5)
        session = message.get("session", {})
        if message["type"] == kind and all(session.get(k) == v for k, v in match.items()):
            return message


@pytest.mark.parametrize("who", ["anonymous", "alice"])
async def test_dashboard_socket_refuses_non_staff(who, alice):
    communicator = await dashboard_socket(alice if who == "alice" else AnonymousUser())
    message = await communicator.receive_json_from(timeout=5)
    assert message["type"] == "error" and message["code"] == "UNAUTHORIZED"
    assert (await communicator.receive_output(timeout=5)) == {"type": "websocket.close", "code": 4003}


async def test_dashboard_socket_pushes_every_transition_and_heartbeat(staff, alice):
    worker = await database_sync_to_async(services.worker_register)(
        channel_name="test!worker", host="h", pid=1, device="cpu", capacity=2
    )
    communicator = await dashboard_socket(staff)
    snapshot = await communicator.receive_json_from(timeout=5)
    assert snapshot["type"] == "snapshot"
    assert snapshot["sessions"] == [] and snapshot["closed"] == []
    assert [w["id"] for w in snapshot["workers"]] == [worker.pk]

    session = await database_sync_to_async(services.session_create_placed)(owner=alice)
    session_id = str(session.pk)
    placed = await next_of_type(communicator, "session", id=session_id, worker=worker.pk)
    assert placed["session"]["owner"] == "alice" and placed["session"]["state"] == "waiting"

    await database_sync_to_async(services.worker_heartbeat)(
        worker_id=worker.pk, peer_count=0, frames={session_id: services.FrameCounts(frames_in=7, frames_out=5)}
    )
    beat = await next_of_type(communicator, "worker")
    assert beat["worker"]["slots_used"] == 1
    assert [(s["id"], s["frames_in"], s["frames_out"]) for s in beat["sessions"]] == [(session_id, 7, 5)]

    await database_sync_to_async(services.session_close)(
        session_id=session_id, reason=CloseReason.SESSION_TERMINATED, by="test"
    )
    closed = await next_of_type(communicator, "session", id=session_id, state="closed")
    assert closed["session"]["close_reason"] == "SESSION_TERMINATED"
    await communicator.disconnect()


async def test_dashboard_snapshot_has_open_and_recently_closed_sessions(staff, alice):
    await database_sync_to_async(services.worker_register)(
        channel_name="test!worker", host="h", pid=1, device="cpu", capacity=2
    )
    ended = await database_sync_to_async(services.session_create_placed)(owner=alice)
    await database_sync_to_async(services.session_close)(
        session_id=str(ended.pk), reason=CloseReason.SESSION_TERMINATED, by="test"
    )
    running = await database_sync_to_async(services.session_create_placed)(owner=alice)
    communicator = await dashboard_socket(staff)
    snapshot = await communicator.receive_json_from(timeout=5)
    assert [s["id"] for s in snapshot["sessions"]] == [str(running.pk)]
    assert [(s["id"], s["close_reason"]) for s in snapshot["closed"]] == [(str(ended.pk), "SESSION_TERMINATED")]
    await communicator.disconnect()


async def test_dashboard_socket_takes_no_messages(staff):
    communicator = await dashboard_socket(staff)
    await communicator.receive_json_from(timeout=5)  # the snapshot
    await communicator.send_to(text_data='{"type": "ping"}')
    message = await communicator.receive_json_from(timeout=5)
    assert message["type"] == "error" and message["code"] == "INVALID_MESSAGE"
    await communicator.disconnect()


def test_every_close_reason_has_its_socket_code_and_words() -> None:
    assert set(CLOSE_RULES) == set(CloseReason.values)
    for reason, rule in CLOSE_RULES.items():
        assert rule.message and rule.message != reason
        # A reason either keeps the socket, closes it with its code, or finds it already gone.
        assert not (rule.keeps_socket and rule.socket_code is not None), reason
    assert {r for r, rule in CLOSE_RULES.items() if rule.socket_code is None and not rule.keeps_socket} == {
        "CLIENT_DISCONNECT"
    }
