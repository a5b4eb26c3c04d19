"""The lifecycle against a real embedded server: real daphne, real aiortc peers, real video."""

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import datetime

import pytest
from aiortc import RTCPeerConnection, RTCSessionDescription

from media_pipeline.ice import enforce_ice_addresses
from tests.harness import ScopeServer, event_time, start_embedded
from tests.peer import ClientPeer, ScopeClient, SessionRefused, SolidColorTrack
from tests.scope_fixtures import (
    scope_initial_parameters,
    scope_initial_parameters_for_blur,
    scope_pause_update,
    scope_prompt_update,
    scope_schema_field_update,
)

SENT = (200, 60, 20)
INVERTED = tuple(255 - c for c in SENT)
FULL_TRAIL = ["created", "placed", "offered", "answered", "live", "closing", "peer_closed", "pipeline_stopped", "cleaned_up",
              "closed"]


def close_to(color, expected, tolerance: float = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(color, expected))


def peers_held(server: ScopeServer) -> int:
    return sum(worker["peer_count"] for worker in server.workers() if worker["state"] == "active")


async def live_peer(client: ScopeClient, server: ScopeServer, **kwargs) -> ClientPeer:
    peer = await client.start_session(**kwargs)
    await peer.wait_connected()
    await peer.wait_frames(5)
    await server.wait_until_async(lambda: server.session(peer.session_id)["state"] == "live", 5, what="live")
    return peer


async def connect_and_stream(client: ScopeClient, server: ScopeServer, user: str, **kwargs) -> ClientPeer:
    """Open the socket as ``user``, wait for ``ready``, and stream until the session is live."""
    await client.connect(server, user)
    await client.expect("ready", timeout=15)
    return await live_peer(client, server, **kwargs)


async def test_invert_stream_then_socket_close_tears_everything_down(embedded_server: ScopeServer) -> None:
    async with ScopeClient() as client:
        await client.connect(embedded_server, "alice")
        await client.expect("ready")
        peer = await live_peer(client, embedded_server, pipeline="invert", color=SENT)
        frames = await peer.wait_frames(20)
        assert close_to(frames[-1][1], INVERTED), f"expected inverted {INVERTED}, got {frames[-1][1]}"

        closed_at = time.monotonic()
        await client.close_socket()
        await peer.wait_server_closed(2)
        record = await asyncio.to_thread(embedded_server.closed_session, peer.session_id)
        await asyncio.sleep(2.5)  # anything still streaming would show up here

    assert record["close_reason"] == "CLIENT_DISCONNECT"
    assert [event["kind"] for event in record["events"]] == FULL_TRAIL
    assert record["frames_in"] > 0 and record["frames_out"] > 0
    late = [t - closed_at for t, _ in peer.frames_since(closed_at + 2)]
    assert not late, f"frames arrived {late} s after the socket closed"
    embedded_server.wait_until(lambda: peers_held(embedded_server) == 0, 5, what="the worker to hold no peer")


async def test_delete_ends_the_session_for_the_client(embedded_server: ScopeServer) -> None:
    async with ScopeClient() as client:
        await client.connect(embedded_server, "alice")
        await client.expect("ready")
        peer = await live_peer(client, embedded_server)
        session_path = f"/api/v1/webrtc/offer/{peer.session_id}"

        assert embedded_server.api("DELETE", session_path, user=None).status_code in (401, 403)
        refused = embedded_server.api("DELETE", session_path, user="bob")
        assert refused.status_code == 404 and refused.json()["code"] == "UNKNOWN_SESSION"
        assert embedded_server.api("DELETE", "/api/v1/webrtc/offer/00000000-0000-4000-8000-000000000000",
                                   user="alice").status_code == 404
        assert embedded_server.session(peer.session_id)["state"] == "live"  # refusals changed nothing

        response = await asyncio.to_thread(embedded_server.api, "DELETE", session_path, user="alice")
        deleted_at = time.monotonic()
        assert response.status_code == 204
        error = await client.expect("error", sessionId=peer.session_id)
        assert error["code"] == "SESSION_TERMINATED"
        assert await client.wait_closed(2) == 4009
        await peer.wait_server_closed(1)
        await asyncio.sleep(1.5)

    assert not peer.frames_since(deleted_at + 1), "frames kept coming after DELETE"
    record = embedded_server.session(peer.session_id)
    assert record["state"] == "closed" and record["close_reason"] == "SESSION_TERMINATED"
    assert [e for e in record["events"] if e["kind"] == "closing"][0]["detail"]["by"] == "api:alice"
    assert embedded_server.api("DELETE", session_path, user="alice").status_code == 204
    assert embedded_server.api("DELETE", session_path, user="staff").status_code == 204


@pytest.fixture(scope="module")
def strict_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScopeServer]:
    """Sessions limited to 3 s, and no anonymous streaming."""
    with start_embedded(tmp_path_factory.mktemp("strict"), SCOPE_MAX_SESSION_SECONDS=3,
                        SCOPE_ALLOW_ANONYMOUS=False) as server:
        yield server


async def test_max_duration_closes_on_time(strict_server: ScopeServer) -> None:
    server = strict_server
    async with ScopeClient() as client:
        await client.connect(server, "alice")
        await client.expect("ready")
        peer = await live_peer(client, server)
        error = await client.expect("error", timeout=10, sessionId=peer.session_id)
        error_at = time.time()
        code = await client.wait_closed(2)
        await peer.wait_server_closed(1)

    record = await asyncio.to_thread(server.closed_session, peer.session_id)
    deadline = datetime.fromisoformat(record["deadline_at"]).timestamp()
    assert error["code"] == "MAX_DURATION_EXCEEDED"
    assert code == 4008
    assert record["close_reason"] == "MAX_DURATION_EXCEEDED"
    assert 0 <= error_at - deadline < 1, f"error came {error_at - deadline:.3f} s after the deadline"
    assert event_time(record, "peer_closed") - deadline < 1
    server.wait_until(lambda: peers_held(server) == 0, 5, what="the worker to hold no peer")


async def test_ready_only_after_the_previous_session_is_closed(server_factory) -> None:
    server = server_factory("embedded", SCOPE_WORKER_CAPACITY=1)
    async with ScopeClient() as first, ScopeClient() as second:
        await first.connect(server, "alice")
        await first.expect("ready")
        peer = await live_peer(first, server)

        await second.connect(server, "bob")
        queued = await second.expect("queued")
        assert queued["position"] == 1
        with pytest.raises(AssertionError):
            await second.expect("ready", timeout=1)

        await first.close_socket()
        await second.expect("ready", timeout=5)
        # The slot was handed on only once the first session's teardown had finished.
        first_record = server.session(peer.session_id)
        assert first_record["state"] == "closed"
        assert [e["kind"] for e in first_record["events"]][-1] == "closed"

        second_peer = await live_peer(second, server, pipeline="grayscale")
        assert second_peer.frames


async def test_closing_the_socket_closes_every_session_it_opened(embedded_server: ScopeServer) -> None:
    async with ScopeClient() as client:
        await client.connect(embedded_server, "alice")
        await client.expect("ready")
        peers = [await live_peer(client, embedded_server, pipeline=name) for name in ("invert", "passthrough")]
        assert peers[0].session_id != peers[1].session_id
        await client.close_socket()
        for peer in peers:
            await peer.wait_server_closed(2)

    for peer in peers:
        record = embedded_server.closed_session(peer.session_id)
        assert record["close_reason"] == "CLIENT_DISCONNECT"
        assert [event["kind"] for event in record["events"]] == FULL_TRAIL


async def test_stop_then_play_again_on_one_socket_streams(embedded_server: ScopeServer) -> None:
    """Scope's Stop closes the peer and keeps the socket; Play 0.3 s later offers on the same socket."""
    async with ScopeClient() as client:
        await client.connect(embedded_server, "alice")
        first_ready = await client.expect("ready")
        first = await live_peer(client, embedded_server)
        assert first.session_id == first_ready["sessionId"]
        await first.close()
        stopped_at = time.monotonic()
        error = await client.expect("error", timeout=5, sessionId=first.session_id)
        second_ready = await client.expect("ready", timeout=5)
        await asyncio.sleep(max(0.0, stopped_at + 0.3 - time.monotonic()))
        second = await live_peer(client, embedded_server, pipeline="passthrough")
        await second.wait_frames(len(second.frames) + 10)
        assert not client.closed.is_set(), f"the socket was closed ({client.close_code})"

    assert error["code"] == "PEER_CLOSED"
    assert second.session_id == second_ready["sessionId"] != first.session_id
    record = embedded_server.closed_session(first.session_id)
    assert record["close_reason"] == "PEER_CLOSED"
    assert [event["kind"] for event in record["events"]][-5:] == FULL_TRAIL[-5:]


async def test_the_data_channel_hears_stream_stopped_before_the_peer_closes(embedded_server: ScopeServer) -> None:
    async with ScopeClient() as client:
        await client.connect(embedded_server, "alice")
        await client.expect("ready")
        peer = await live_peer(client, embedded_server)
        response = await asyncio.to_thread(
            embedded_server.api, "DELETE", f"/api/v1/webrtc/offer/{peer.session_id}", user="staff"
        )
        assert response.status_code == 204, response.text
        await peer.wait_server_closed(2)

    stopped = [(at, message) for at, message in peer.channel_messages if message.get("type") == "stream_stopped"]
    assert [message for _, message in stopped] == [
        {"type": "stream_stopped", "reason": "SESSION_TERMINATED", "error_message": "Session ended by an operator."}
    ]
    assert stopped[0][0] <= peer.remote_ended_at


async def test_scope_s_own_offer_is_answered_and_what_it_ignored_is_recorded(embedded_server: ScopeServer) -> None:
    """A real Scope offer (its default LongLive stream) and Scope's UI pointed at this server (blur, radius 5)."""
    async with ScopeClient() as client:
        await client.connect(embedded_server, "alice")
        await client.expect("ready")
        peer = await client.start_session(pipeline=None, params=scope_initial_parameters())
        await peer.wait_frames(5)
        await client.close_socket()
        await peer.wait_server_closed(2)
    async with ScopeClient() as client:
        await client.connect(embedded_server, "alice")
        await client.expect("ready")
        blur = await client.start_session(pipeline=None, params=scope_initial_parameters_for_blur())
        await blur.wait_frames(5)
        # Scope's data-channel updates: pause and prompts are ignored, a schema field applies.
        for update in (scope_pause_update(), scope_prompt_update(), scope_schema_field_update()):
            await blur.send_parameters_over_datachannel(update)
        await embedded_server.wait_until_async(
            lambda: embedded_server.session(blur.session_id)["parameters"] == {"radius": 7}, 10, what="radius 7"
        )

    longlive = embedded_server.closed_session(peer.session_id)
    offered = next(e["detail"] for e in longlive["events"] if e["kind"] == "offered")
    assert longlive["pipeline"] == "passthrough"  # Scope's "longlive" is not here: the default runs
    assert offered["ignored_parameters"] == sorted(set(scope_initial_parameters()) - {"pipeline"})
    record = embedded_server.closed_session(blur.session_id)
    offered = next(e["detail"] for e in record["events"] if e["kind"] == "offered")
    assert record["pipeline"] == "blur"
    assert offered == {"pipeline": "blur", "ignored_parameters": sorted(set(scope_initial_parameters_for_blur())
                                                                        - {"radius"})}
    channel_errors = [m for _, m in blur.channel_messages if m.get("type") == "error"]
    assert channel_errors == []


async def test_a_switch_then_a_tweak_on_the_data_channel_keeps_the_switch(embedded_server: ScopeServer) -> None:
    async with ScopeClient() as client:
        await client.connect(embedded_server, "alice")
        await client.expect("ready")
        peer = await live_peer(client, embedded_server, pipeline="invert")
        await peer.send_parameters_over_datachannel({"pipeline": "blur"})
        await peer.send_parameters_over_datachannel({"radius": 5})
        await embedded_server.wait_until_async(
            lambda: (record := embedded_server.session(peer.session_id))["pipeline"] == "blur"
            and record["parameters"] == {"radius": 5},
            10, what="blur with radius 5 recorded",
        )


async def test_end_of_candidates_is_acknowledged_as_such(embedded_server: ScopeServer) -> None:
    async with ScopeClient() as client:
        await client.connect(embedded_server, "alice")
        await client.expect("ready")
        peer = await live_peer(client, embedded_server)
        await client.send({"type": "icecandidate", "candidate": None, "sessionId": peer.session_id})
        ack = await client.expect("icecandidate_ack", sessionId=peer.session_id)

    assert ack["status"] == "end_of_candidates"


async def test_bad_messages_get_codes_and_change_nothing(embedded_server: ScopeServer) -> None:
    before = embedded_server.api("GET", "/api/v1/sessions/").json()["count"]
    async with ScopeClient() as client:
        await client.connect(embedded_server, "alice")
        await client.expect("ready")
        after_connect = embedded_server.api("GET", "/api/v1/sessions/").json()["count"]
        assert after_connect == before + 1  # the slot this socket holds

        cases = [
            ("not json {", "INVALID_MESSAGE"),
            (json.dumps([1, 2]), "INVALID_MESSAGE"),
            (json.dumps({"request_id": "r"}), "INVALID_MESSAGE"),
            (json.dumps({"type": "teleport"}), "INVALID_MESSAGE"),
            (json.dumps({"type": "offer", "sdp": "garbage", "sdp_type": "offer"}), "INVALID_SDP"),
            (json.dumps({"type": "offer", "sdp": "v=0\r\nnonsense", "sdp_type": "offer"}), "INVALID_SDP"),
            (json.dumps({"type": "offer", "sdp": 42, "sdp_type": "answer"}), "INVALID_SDP"),
            (json.dumps({"type": "icecandidate", "candidate": None,
                         "sessionId": "00000000-0000-4000-8000-000000000000"}), "UNKNOWN_SESSION"),
            (json.dumps({"type": "parameters", "radius": 3}), "UNKNOWN_SESSION"),
            (json.dumps({"type": "icecandidate", "candidate": 7}), "INVALID_MESSAGE"),
        ]
        for raw, expected in cases:
            await client._ws.send(raw)
            error = await client.expect("error", timeout=5)
            assert error["code"] == expected, f"{raw!r}: {error}"
            assert error["error"]

        await client.send({"type": "ping", "request_id": "p1"})
        assert (await client.expect("pong"))["request_id"] == "p1"
        assert embedded_server.api("GET", "/api/v1/sessions/").json()["count"] == after_connect

        with pytest.raises(SessionRefused) as refused:
            await client.start_session(pipeline="no-such-pipeline")
        assert refused.value.code == "INVALID_MESSAGE"
        peer = await live_peer(client, embedded_server)  # the socket still works afterwards
        assert peer.frames


async def test_http_signaling_streams_and_delete_closes_it(embedded_server: ScopeServer) -> None:
    enforce_ice_addresses(["127.0.0.1"])
    pc = RTCPeerConnection()
    pc.addTrack(SolidColorTrack(SENT))
    frames: list[float] = []

    @pc.on("track")
    def on_track(track) -> None:
        async def receive() -> None:
            while True:
                await track.recv()
                frames.append(time.monotonic())

        tasks.append(asyncio.ensure_future(receive()))

    tasks: list[asyncio.Task] = []
    try:
        await pc.setLocalDescription(await pc.createOffer())
        body = {"sdp": pc.localDescription.sdp, "type": "offer", "initialParameters": {"pipeline": "edges"}}
        response = await asyncio.to_thread(embedded_server.api, "POST", "/api/v1/webrtc/offer", user="alice", json=body)
        assert response.status_code == 200, response.text
        answer = response.json()
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type=answer["type"]))
        await embedded_server.wait_until_async(lambda: len(frames) >= 5, 15, what="frames over HTTP signaling")
        record = embedded_server.session(answer["sessionId"])
        assert record["pipeline"] == "edges" and record["owner"] == "alice"

        response = await asyncio.to_thread(
            embedded_server.api, "DELETE", f"/api/v1/webrtc/offer/{answer['sessionId']}/", user="alice"
        )
        deleted_at = time.monotonic()
        assert response.status_code == 204
        await asyncio.sleep(1.5)
        assert not [t for t in frames if t > deleted_at + 1]
        assert embedded_server.session(answer["sessionId"])["close_reason"] == "SESSION_TERMINATED"
    finally:
        for task in tasks:
            task.cancel()
        await pc.close()


async def test_an_offer_the_worker_cannot_serve_ends_in_error(embedded_server: ScopeServer) -> None:
    enforce_ice_addresses(["127.0.0.1"])
    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")  # valid SDP, but no video to process
    try:
        await pc.setLocalDescription(await pc.createOffer())
        async with ScopeClient() as client:
            await client.connect(embedded_server, "alice")
            await client.expect("ready")
            await client.send({"type": "offer", "sdp": pc.localDescription.sdp, "sdp_type": "offer",
                               "request_id": "bad-offer"})
            refusal = await client.expect("error", request_id="bad-offer")
            ended = await client.expect("error", code="ERROR")
            code = await client.wait_closed(2)
    finally:
        await pc.close()

    assert refusal["code"] == "INVALID_SDP"
    assert code == 4500
    record = embedded_server.closed_session(ended["sessionId"])
    assert record["close_reason"] == "ERROR"


async def test_socket_authentication_and_origin(embedded_server: ScopeServer) -> None:
    async with ScopeClient() as anonymous:  # embedded mode allows anonymous streaming
        await anonymous.connect(embedded_server, None)
        await anonymous.expect("ready")

    async with ScopeClient() as forged:
        await forged.connect(embedded_server, None, token="not-a-real-token")
        error = await forged.expect("error")
        assert error["code"] == "UNAUTHORIZED"
        assert await forged.wait_closed(2) == 4003

    async with ScopeClient() as foreign:
        with pytest.raises(Exception) as rejected:
            await foreign.connect(embedded_server, "alice", origin="http://evil.example")
        assert "403" in str(rejected.value)


async def test_an_oversized_message_closes_the_socket_with_1009(embedded_server: ScopeServer) -> None:
    async with ScopeClient() as client:
        await client.connect(embedded_server, "alice")
        await client.expect("ready")
        await client.send({"type": "ping", "padding": "x" * (65 * 1024)})
        assert await client.wait_closed(5) == 1009
    # The slot the socket held is given back like on any other close.
    embedded_server.wait_until(
        lambda: embedded_server.api("GET", "/api/v1/sessions/?state=waiting", user="alice").json()["count"] == 0,
        5, what="the socket's reserved session to close",
    )


async def test_anonymous_clients_are_refused_where_not_allowed(strict_server: ScopeServer) -> None:
    sessions_before = strict_server.api("GET", "/api/v1/sessions/").json()["count"]
    async with ScopeClient() as anonymous:
        await anonymous.connect(strict_server, None)
        error = await anonymous.expect("error")
        assert error["code"] == "UNAUTHORIZED"
        assert await anonymous.wait_closed(2) == 4003
    response = strict_server.api("POST", "/api/v1/webrtc/offer", user=None,
                                 json={"sdp": "v=0", "type": "offer"})
    assert response.status_code == 401 and response.json()["code"] == "UNAUTHORIZED"
    assert strict_server.api("GET", "/api/v1/sessions/").json()["count"] == sessions_before
