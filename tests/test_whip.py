"""WHIP publishing and WHEP playback against a real embedded server, with aiortc peers on loopback.

Clients nobody here wrote (GStreamer's WHIP client, an npm WHEP player in
Chromium) are in test_whip_clients.py; these cover the routes' every answer.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator

import pytest
from aiortc import RTCConfiguration, RTCPeerConnection

from media_pipeline.ice import enforce_ice_addresses
from tests.harness import ScopeServer, start_embedded
from tests.peer import ScopeClient
from tests.test_lifecycle import FULL_TRAIL, connect_and_stream
from tests.whip_peers import Publisher, Viewer, bearer, delete, post_sdp

COLOR = (200, 60, 20)
INVERTED = tuple(255 - c for c in COLOR)
# A frame already on the wire when the server closed may still arrive: this much, no more.
LATE_FRAME_BOUND = 0.2
# How long an answered viewer may take to connect before it gives its place back.
CONNECT_BOUND = 4.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScopeServer]:
    with start_embedded(tmp_path_factory.mktemp("whip"), SCOPE_MAX_VIEWERS=2, SCOPE_WORKER_CAPACITY=2,
                        SCOPE_NEGOTIATION_TIMEOUT_SECONDS=CONNECT_BOUND) as server:
        yield server


@pytest.fixture(autouse=True)
def loopback_ice() -> Iterator[None]:
    enforce_ice_addresses(["127.0.0.1"])
    yield
    enforce_ice_addresses([])


@pytest.fixture
async def peers() -> AsyncIterator[list]:
    """Every publisher and viewer a test makes, closed after it."""
    made: list = []
    yield made
    await asyncio.gather(*(peer.close() for peer in made))


def close_to(color: tuple[float, ...], expected: tuple[int, ...], tolerance: float = 25) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(color, expected, strict=True))


def encoded_frames(server: ScopeServer) -> float:
    """The worker's count of frames encoded for viewers (the embedded worker shares the web's /metrics)."""
    text = server.http.get("/metrics").text
    return sum(float(value) for value in re.findall(r'^scope_viewer_frames_encoded_total\{[^}]*\} (\S+)$', text, re.M))


async def publish(server: ScopeServer, peers: list, query: str = "?pipeline=invert") -> Publisher:
    publisher = Publisher(server, "alice", COLOR)
    peers.append(publisher)
    response = await publisher.exchange(f"/api/v1/whip{query}")
    assert response.status_code == 201, response.text
    await server.wait_until_async(lambda: server.session(publisher.session_id)["state"] == "live", 15,
                                  what="the WHIP session live")
    return publisher


async def watch(server: ScopeServer, peers: list, session_id: str, user: str = "alice") -> Viewer:
    viewer = Viewer(server, user)
    peers.append(viewer)
    response = await viewer.exchange(f"/api/v1/whep/{session_id}")
    assert response.status_code == 201, response.text
    return viewer


async def test_publish_watch_and_hang_up(server, peers):
    publisher = await publish(server, peers)
    response = publisher.response
    assert response.headers["Content-Type"] == "application/sdp"
    assert response.headers["Location"] == f"/api/v1/whip/{publisher.session_id}"
    assert response.text.startswith("v=0")
    record = server.session(publisher.session_id)
    assert record["pipeline"] == "invert" and record["owner"] == "alice"
    await server.wait_until_async(lambda: server.session(publisher.session_id)["frames_in"] > 0, 10,
                                  what="frames_in rising")

    first, second = await watch(server, peers, publisher.session_id), await watch(server, peers, publisher.session_id)
    assert first.location != second.location
    assert first.location.startswith(f"/api/v1/whep/{publisher.session_id}/")
    await asyncio.gather(first.wait_frames(20), second.wait_frames(20))
    # The pipeline's output, not the camera: both viewers see the inverted colour.
    assert close_to(first.frames[-1][1], INVERTED) and close_to(second.frames[-1][1], INVERTED), first.frames[-1]
    assert server.session(publisher.session_id)["viewers"] == 2

    # Encoded once for both: the encoder's count grows like one viewer's frames, not two viewers'.
    encoded_before, received_before = encoded_frames(server), len(second.frames)
    await asyncio.sleep(2)
    encoded, received = encoded_frames(server) - encoded_before, len(second.frames) - received_before
    assert received > 10 and encoded < 1.5 * received, (encoded, received)

    # One viewer leaves: the other goes on.
    assert (await first.hang_up()).status_code == 200
    await server.wait_until_async(lambda: first.dtls_state == "closed", 5, what="the first viewer's peer closed")
    seen = len(second.frames)
    await second.wait_frames(seen + 15)
    record = server.session(publisher.session_id)
    assert record["state"] == "live" and record["viewers"] == 1
    left = [e for e in record["events"] if e["kind"] == "viewer_left"]
    assert [e["detail"]["reason"] for e in left] == ["left"]
    assert (await first.hang_up()).status_code == 404  # already gone

    # The publisher hangs up: the session ends with its whole trail, and the remaining viewer with it.
    hung_up = await publisher.hang_up()
    returned = time.monotonic()
    assert hung_up.status_code == 200, hung_up.text
    record = server.closed_session(publisher.session_id)
    assert record["close_reason"] == "SESSION_TERMINATED"
    kinds = [e["kind"] for e in record["events"] if not e["kind"].startswith("viewer_")]
    assert kinds == FULL_TRAIL, kinds
    assert [e["detail"]["reason"] for e in record["events"] if e["kind"] == "viewer_left"] == [
        "left", "SESSION_TERMINATED"]
    peer_closed = next(e for e in record["events"] if e["kind"] == "peer_closed")
    assert peer_closed["detail"].get("viewers") == 1
    await server.wait_until_async(lambda: second.dtls_state == "closed", 3, what="the last viewer's peer closed")
    assert all(at <= returned + LATE_FRAME_BOUND for at, _ in second.frames)


async def test_a_socket_sessions_output_can_be_watched_and_the_socket_close_ends_its_viewer(server, peers):
    async with ScopeClient() as client:
        streamer = await connect_and_stream(client, server, "alice", pipeline="invert", color=COLOR)
        viewer = await watch(server, peers, streamer.session_id)
        await viewer.wait_frames(15)
        # The client and the viewer see the same output.
        assert close_to(viewer.frames[-1][1], INVERTED) and close_to(streamer.frames[-1][1], INVERTED)
        await client.close_socket()
        closed_at = time.monotonic()
        record = await asyncio.to_thread(server.closed_session, streamer.session_id)
    assert record["close_reason"] == "CLIENT_DISCONNECT"
    await server.wait_until_async(lambda: viewer.dtls_state == "closed", 3, what="the viewer's peer closed")
    assert all(at <= closed_at + 1 for at, _ in viewer.frames)


async def test_viewer_limit_is_503_with_retry_after(server, peers):
    publisher = await publish(server, peers)
    await watch(server, peers, publisher.session_id)
    await watch(server, peers, publisher.session_id, user="staff")  # staff may watch anyone's
    refused = await post_sdp(server, f"/api/v1/whep/{publisher.session_id}", await viewer_offer(), "alice")
    assert refused.status_code == 503 and refused.json()["code"] == "NO_CAPACITY", refused.text
    assert int(refused.headers["Retry-After"]) > 0
    assert server.session(publisher.session_id)["viewers"] == 2
    assert (await publisher.hang_up()).status_code == 200


async def test_a_viewer_that_never_connects_gives_its_place_back(server, peers):
    publisher = await publish(server, peers)
    hoarders = [await post_sdp(server, f"/api/v1/whep/{publisher.session_id}", await viewer_offer(), "alice")
                for _ in range(2)]
    assert [response.status_code for response in hoarders] == [201, 201]
    refused = await post_sdp(server, f"/api/v1/whep/{publisher.session_id}", await viewer_offer(), "alice")
    assert refused.status_code == 503
    # Neither answer is ever applied: both places come back within the bound, and a real viewer gets one.
    await server.wait_until_async(lambda: server.session(publisher.session_id)["viewers"] == 0, CONNECT_BOUND + 3,
                                  what="the silent viewers' places back")
    record = server.session(publisher.session_id)
    assert [e["detail"]["reason"] for e in record["events"] if e["kind"] == "viewer_left"] == ["connect_timeout"] * 2
    viewer = await watch(server, peers, publisher.session_id)
    await viewer.wait_frames(10)
    assert (await publisher.hang_up()).status_code == 200


async def test_errors_in_rfc_style(server, peers):
    offer = await viewer_offer()
    # Wrong content type: 415, nothing made.
    response = await asyncio.to_thread(server.http.post, "/api/v1/whip", content=offer,
                                       headers={"Content-Type": "application/json", **bearer(server, "alice")})
    assert response.status_code == 415 and response.json()["code"] == "INVALID_MESSAGE", response.text
    # Not SDP: 400.
    response = await post_sdp(server, "/api/v1/whip", "hello", "alice")
    assert response.status_code == 400 and response.json()["code"] == "INVALID_SDP", response.text
    # No token: 401, naming the scheme.
    response = await post_sdp(server, "/api/v1/whip", offer, None)
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    # A parameter of the wrong kind: 400 naming it.
    response = await post_sdp(server, "/api/v1/whip?pipeline=blur&radius=wide", offer, "alice")
    assert response.status_code == 400 and "radius" in response.json()["detail"], response.text
    # Unknown session: 404.
    response = await post_sdp(server, "/api/v1/whep/00000000-0000-4000-8000-000000000000", offer, "alice")
    assert response.status_code == 404 and response.json()["code"] == "UNKNOWN_SESSION"
    assert server.api("GET", "/api/v1/sessions/?state=live").json()["count"] == 0

    # Another user's session: as unknown as any other (its existence is not disclosed).
    publisher = await publish(server, peers)
    response = await post_sdp(server, f"/api/v1/whep/{publisher.session_id}", offer, "bob")
    assert response.status_code == 404 and response.json()["code"] == "UNKNOWN_SESSION"
    response = await delete(server, publisher.location, "bob")
    assert response.status_code == 404
    assert server.session(publisher.session_id)["state"] == "live"
    assert (await publisher.hang_up()).status_code == 200


async def test_trickled_candidates_are_accepted(server, peers):
    publisher = await publish(server, peers)
    fragment = ("a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\nm=video 9 UDP/TLS/RTP/SAVPF 0\r\n"
                "a=mid:0\r\na=candidate:1 1 udp 2130706431 127.0.0.1 9 typ host\r\na=end-of-candidates\r\n")
    response = await asyncio.to_thread(
        server.http.patch, publisher.location, content=fragment,
        headers={"Content-Type": "application/trickle-ice-sdpfrag", **bearer(server, "alice")})
    assert response.status_code == 204, response.text
    response = await asyncio.to_thread(
        server.http.patch, publisher.location, content=fragment,
        headers={"Content-Type": "application/sdp", **bearer(server, "alice")})
    assert response.status_code == 415
    assert server.session(publisher.session_id)["state"] == "live"
    assert (await publisher.hang_up()).status_code == 200


async def test_publisher_gone_silent_ends_the_session_and_its_viewers(server_factory, peers):
    server = server_factory("embedded", SCOPE_IDLE_TIMEOUT_SECONDS=2)
    publisher = await publish(server, peers)
    viewer = await watch(server, peers, publisher.session_id)
    await viewer.wait_frames(10)
    publisher.track.stop()  # the camera stops; no DELETE ever comes
    record = await asyncio.to_thread(server.closed_session, publisher.session_id, 10)
    assert record["close_reason"] == "IDLE_TIMEOUT"
    await server.wait_until_async(lambda: viewer.dtls_state == "closed", 3, what="the viewer's peer closed")


async def viewer_offer() -> str:
    """A valid recvonly offer that is never answered."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc.addTransceiver("video", direction="recvonly")
    await pc.setLocalDescription(await pc.createOffer())
    sdp = pc.localDescription.sdp
    await pc.close()
    return sdp


async def test_scaled_viewers_live_on_the_publishers_worker_and_end_with_an_operator_delete(scaled_server, peers):
    server = scaled_server
    publisher = await publish(server, peers)
    viewers = [await watch(server, peers, publisher.session_id), await watch(server, peers, publisher.session_id)]
    await asyncio.gather(*(viewer.wait_frames(15) for viewer in viewers))
    assert close_to(viewers[1].frames[-1][1], INVERTED)
    ended = await asyncio.to_thread(server.api, "DELETE", f"/api/v1/webrtc/offer/{publisher.session_id}")
    returned = time.monotonic()
    assert ended.status_code == 204, ended.text
    record = server.closed_session(publisher.session_id)
    assert record["close_reason"] == "SESSION_TERMINATED" and record["viewers"] == 0
    reasons = [e["detail"]["reason"] for e in record["events"] if e["kind"] == "viewer_left"]
    assert reasons == ["SESSION_TERMINATED"] * 2
    for viewer in viewers:
        await server.wait_until_async(lambda v=viewer: v.dtls_state == "closed", 3, what="a viewer's peer closed")
        assert all(at <= returned + LATE_FRAME_BOUND for at, _ in viewer.frames)
