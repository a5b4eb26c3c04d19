"""Who may do what: every route and both sockets, for every kind of caller, as one table.

Callers: anonymous, the session's owner (alice), another user (bob), staff, and
a bad token. Anonymous streaming is off here (the scaled default); the
embedded default that allows it is covered in test_api.py and test_dashboard.py.
"""

import json

import pytest
from channels.db import database_sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.cache import cache
from rest_framework.authtoken.models import Token
from rest_framework.test import APIClient

from scope_site.asgi import router
from sessions_app import services
from sessions_app.models import Worker

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.usefixtures("empty_channel_layer")]

CALLERS = ("anonymous", "alice", "bob", "staff", "bad-token")
BAD_TOKEN = "0" * 40

# (method, path, body) → expected status per caller. "{sid}" is a session of alice's.
HTTP_MATRIX = [
    ("GET", "/api/v1/webrtc/ice-servers", None, {"anonymous": 401, "alice": 200, "bob": 200, "staff": 200, "bad-token": 401}),
    ("GET", "/api/v1/pipelines/", None, {"anonymous": 401, "alice": 200, "bob": 200, "staff": 200, "bad-token": 401}),
    # An empty offer is refused as INVALID_SDP once the caller may signal at all.
    ("POST", "/api/v1/webrtc/offer", {"sdp": "", "type": "offer"},
     {"anonymous": 401, "alice": 400, "bob": 400, "staff": 400, "bad-token": 401}),
    # Candidates for a session with no offer yet: INVALID_MESSAGE for its owner and staff; another's is unknown.
    ("PATCH", "/api/v1/webrtc/offer/{sid}",
     {"candidates": [{"candidate": "candidate:1 1 udp 1 127.0.0.1 9 typ host", "sdpMid": "0"}]},
     {"anonymous": 401, "alice": 400, "bob": 404, "staff": 400, "bad-token": 401}),
    ("GET", "/api/v1/sessions/", None, {"anonymous": 401, "alice": 200, "bob": 200, "staff": 200, "bad-token": 401}),
    ("GET", "/api/v1/sessions/{sid}/", None, {"anonymous": 401, "alice": 200, "bob": 404, "staff": 200, "bad-token": 401}),
    ("GET", "/api/v1/workers/", None, {"anonymous": 401, "alice": 403, "bob": 403, "staff": 200, "bad-token": 401}),
    ("DELETE", "/api/v1/webrtc/offer/{sid}", None, {"anonymous": 401, "alice": 204, "bob": 404, "staff": 204, "bad-token": 401}),
    ("GET", "/api/v1/schema/", None, {"anonymous": 200, "alice": 200, "bob": 200, "staff": 200, "bad-token": 200}),
    ("GET", "/healthz", None, {"anonymous": 200, "alice": 200, "bob": 200, "staff": 200, "bad-token": 200}),
]

# Pages use the browser's login session, never tokens.
PAGE_MATRIX = [
    ("/", {"anonymous": 302, "alice": 200, "bob": 200, "staff": 200}),
    ("/dashboard/", {"anonymous": 302, "alice": 403, "bob": 403, "staff": 200}),
    ("/admin/", {"anonymous": 302, "alice": 302, "bob": 302, "staff": 200}),
]

# Sockets: accepted and kept (True) or refused with UNAUTHORIZED and close 4003 (False).
SOCKET_MATRIX = [
    ("/ws/webrtc/", {"anonymous": False, "alice": True, "bob": True, "staff": True, "bad-token": False}),
    ("/ws/dashboard/", {"anonymous": False, "alice": False, "bob": False, "staff": True, "bad-token": False}),
]


@pytest.fixture
def users(alice, bob, staff, settings):
    settings.SCOPE_ALLOW_ANONYMOUS = False
    return {"alice": alice, "bob": bob, "staff": staff}


def token_of(caller: str, users) -> str | None:
    if caller == "anonymous":
        return None
    if caller == "bad-token":
        return BAD_TOKEN
    return Token.objects.get_or_create(user=users[caller])[0].key


def alice_session(users) -> str:
    """A session of alice's, placed on a stand-in worker and waiting for its offer."""
    if not Worker.objects.exists():
        services.worker_register(channel_name="test!worker", host="h", pid=1, device="cpu", capacity=4)
    return str(services.session_create_placed(owner=users["alice"]).pk)


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(("method", "path", "body", "expected"), HTTP_MATRIX, ids=[f"{m} {p}" for m, p, *_ in HTTP_MATRIX])
def test_http_routes(users, caller, method, path, body, expected):
    client = APIClient()
    token = token_of(caller, users)
    if token is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    url = path.format(sid=alice_session(users))
    response = client.generic(method, url, json.dumps(body) if body is not None else "", content_type="application/json")
    assert response.status_code == expected[caller], response.content[:300]
    if response.status_code >= 400:
        assert response.json()["code"] in {"UNAUTHORIZED", "UNKNOWN_SESSION", "INVALID_MESSAGE", "INVALID_SDP"}


@pytest.mark.parametrize("caller", ["anonymous", "alice", "bob", "staff"])
@pytest.mark.parametrize(("path", "expected"), PAGE_MATRIX, ids=[p for p, _ in PAGE_MATRIX])
def test_pages(users, client, caller, path, expected):
    if caller != "anonymous":
        client.force_login(users[caller])
    assert client.get(path).status_code == expected[caller]


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize(("path", "expected"), SOCKET_MATRIX, ids=[p for p, _ in SOCKET_MATRIX])
async def test_sockets(users, caller, path, expected):
    headers = [(b"host", b"127.0.0.1"), (b"origin", b"http://127.0.0.1")]
    token = await _token(caller, users)
    if token is not None:
        headers.append((b"authorization", f"Token {token}".encode()))
    communicator = WebsocketCommunicator(router, path, headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    first = await communicator.receive_json_from(timeout=5)
    if expected[caller]:
        assert first["type"] in ("ready", "queued", "snapshot"), first
        await communicator.disconnect()
    else:
        assert first == {"type": "error", "code": "UNAUTHORIZED", "error": first["error"]}
        assert await communicator.receive_output(timeout=5) == {"type": "websocket.close", "code": 4003}


async def _token(caller: str, users) -> str | None:
    return await database_sync_to_async(token_of)(caller, users)


async def test_socket_from_a_foreign_origin_is_refused(users):
    token = await _token("alice", users)
    communicator = WebsocketCommunicator(
        router, "/ws/webrtc/",
        headers=[(b"host", b"127.0.0.1"), (b"origin", b"http://evil.example"), (b"authorization", f"Token {token}".encode())],
    )
    connected, _ = await communicator.connect()
    assert not connected


def test_session_writes_by_cookie_need_the_csrf_token(users):
    """A page's DELETE rides on the login cookie, so it must carry the CSRF token too."""
    session_id = alice_session(users)
    client = APIClient(enforce_csrf_checks=True)
    client.force_login(users["alice"])
    refused = client.delete(f"/api/v1/webrtc/offer/{session_id}")
    assert refused.status_code == 403 and refused.json()["code"] == "UNAUTHORIZED"
    client.get("/")  # the page sets the CSRF cookie
    allowed = client.delete(f"/api/v1/webrtc/offer/{session_id}", HTTP_X_CSRFTOKEN=client.cookies["csrftoken"].value)
    assert allowed.status_code == 204


def test_session_ids_are_random_uuid4(users):
    ids = {alice_session(users) for _ in range(3)}
    assert len(ids) == 3
    assert all(len(i) == 36 and i[14] == "4" for i in ids)


async def test_too_many_connections_a_minute_are_refused_rate_limited(users, settings):
    settings.SCOPE_CONNECTIONS_PER_MINUTE = 2
    await database_sync_to_async(cache.clear)()
    token = await _token("alice", users)
    headers = [(b"host", b"127.0.0.1"), (b"origin", b"http://127.0.0.1"), (b"authorization", f"Token {token}".encode())]
    for _ in range(2):
        accepted = WebsocketCommunicator(router, "/ws/webrtc/", headers=headers)
        await accepted.connect()
        assert (await accepted.receive_json_from(timeout=5))["type"] in ("ready", "queued")
        await accepted.disconnect()
    refused = WebsocketCommunicator(router, "/ws/webrtc/", headers=headers)
    await refused.connect()
    assert (await refused.receive_json_from(timeout=5))["code"] == "RATE_LIMITED"
    assert await refused.receive_output(timeout=5) == {"type": "websocket.close", "code": 4029}
    await database_sync_to_async(cache.clear)()
