"""Generated bad input against a real server: the REST API from its OpenAPI schema, and the signaling socket.

Whatever arrives, the server answers with a code, never a 5xx or a crash, logs
no unhandled exception, and still streams a normal session afterwards.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.harness import ScopeServer, start_embedded
from tests.peer import ScopeClient
from tests.test_lifecycle import live_peer

CODES = {"INVALID_MESSAGE", "INVALID_SDP", "UNKNOWN_SESSION", "NO_CAPACITY", "UNAUTHORIZED", "RATE_LIMITED"}
REPLY_TYPES = {"queued", "ready", "pong", "user_id_set", "ice_servers", "answer", "icecandidate_ack", "parameters_ack",
               "error"}
MAX_MESSAGE_BYTES = 64 * 1024
REPLY_TIMEOUT = 5.0
REST_EXAMPLES = 25


@schemathesis.serializer("application/sdp", "application/trickle-ice-sdpfrag")
def sdp_text(ctx: Any, value: Any) -> bytes:
    """WHIP and WHEP bodies are text: whatever the generator made, as UTF-8."""
    return value if isinstance(value, bytes) else str(value).encode()


@pytest.fixture(scope="module")
def fuzzed_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScopeServer]:
    # The socket fuzzing opens hundreds of sockets a minute from one user and address:
    # more than the default rate limit, which is not what it tests.
    with start_embedded(tmp_path_factory.mktemp("fuzz"), SCOPE_WORKER_CAPACITY=8,
                        SCOPE_CONNECTIONS_PER_MINUTE=100_000) as server:
        yield server


def assert_no_unhandled_errors(server: ScopeServer) -> None:
    log = server.log_text()
    for marker in ("Traceback", "Internal Server Error", "Exception inside application"):
        assert marker not in log, log[log.index(marker) - 2000: log.index(marker) + 3000]


# --- the REST API, from its own schema ------------------------------------------------


def test_rest_api_answers_every_generated_request_with_a_code(fuzzed_server: ScopeServer) -> None:
    """Valid and invalid requests for every operation in /api/v1/schema/, as alice and as staff."""
    schema = schemathesis.openapi.from_url(f"{fuzzed_server.base_url}/api/v1/schema/")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8, [f"{op.method} {op.path}" for op in operations]
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=REST_EXAMPLES, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def answers_with_a_code(case) -> None:
                for user in ("alice", "staff"):
                    response = case.call(base_url=fuzzed_server.base_url, headers=fuzzed_server.auth_headers(user))
                    assert response.status_code < 500, (case.method, case.formatted_path, response.status_code,
                                                        response.text[:500])
                    if response.status_code >= 400 and response.status_code != 405:
                        body = response.json()
                        assert body["code"] in CODES, body
                        assert isinstance(body["detail"], str) and body["detail"]

            try:
                answers_with_a_code()
            except Unsatisfiable:
                # An operation that takes no input has no invalid input to make.
                assert mode == GenerationMode.NEGATIVE, f"{operation.method} {operation.path}"


# --- the signaling socket --------------------------------------------------------------------

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
message_types = st.sampled_from(
    ["offer", "icecandidate", "parameters", "ping", "set_user_id", "get_ice_servers", "answer", "", "__init__",
     "close", "handle_offer", "disconnect"]
)
sdp_like = st.text(alphabet=string.printable, max_size=300) | st.sampled_from(
    ["v=0\r\n", "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n", ""]
)
typed_messages = st.fixed_dictionaries(
    {"type": message_types},
    optional={
        "sdp": sdp_like, "sdp_type": st.sampled_from(["offer", "answer", "pranswer", 7, None]),
        "initialParameters": json_values | st.fixed_dictionaries({"pipeline": st.text(max_size=20)}),
        "candidate": json_values | st.fixed_dictionaries({"candidate": st.text(max_size=80)}),
        "sessionId": st.uuids().map(str) | json_scalars, "request_id": json_values,
        "pipeline": json_values, "radius": json_values, "user_id": json_values,
    },
)
frames = st.one_of(
    typed_messages.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=200),
    st.binary(max_size=200),
    st.integers(min_value=MAX_MESSAGE_BYTES - 64, max_value=MAX_MESSAGE_BYTES + 4096).map(lambda n: "x" * n),
)


def exchange(server: ScopeServer, sent: list[str | bytes]) -> tuple[list[dict[str, Any]], int | None]:
    """Send ``sent`` on a fresh socket as alice; every reply, and the close code if the server closed it."""
    replies: list[dict[str, Any]] = []
    with connect(server.ws_url, additional_headers=server.auth_headers("alice"), origin=server.origin,
                 max_size=None, open_timeout=10, proxy=None) as ws:
        try:
            replies.append(json.loads(ws.recv(timeout=REPLY_TIMEOUT)))  # ready (or queued)
            for frame in sent:
                ws.send(frame)
                replies.append(json.loads(ws.recv(timeout=REPLY_TIMEOUT)))
        except ConnectionClosed:
            pass
        return replies, ws.close_code


@settings(max_examples=600, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(sent=st.lists(frames, min_size=1, max_size=8))
def test_socket_answers_every_generated_message_with_a_code(fuzzed_server: ScopeServer, sent) -> None:
    replies, close_code = exchange(fuzzed_server, sent)
    oversize = any(len(f.encode() if isinstance(f, str) else f) > MAX_MESSAGE_BYTES for f in sent)
    if close_code is not None:
        # The server closes only an oversize frame (1009), or a session it ended with its own code.
        assert close_code == 1009 and oversize or 4000 <= close_code < 5000, (close_code, replies)
    for reply in replies:
        assert reply["type"] in REPLY_TYPES, reply
        if reply["type"] == "error":
            assert reply["code"] in CODES or reply.get("sessionId"), reply
            assert isinstance(reply["error"], str) and reply["error"]


async def test_after_the_fuzzing_nothing_crashed_and_a_session_streams(fuzzed_server: ScopeServer) -> None:
    assert fuzzed_server.web_process is not None and fuzzed_server.web_process.poll() is None
    async with ScopeClient() as client:
        await client.connect(fuzzed_server, "alice")
        await client.expect("ready")
        await live_peer(client, fuzzed_server, pipeline="invert")
    assert_no_unhandled_errors(fuzzed_server)
