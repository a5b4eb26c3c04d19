"""Bounded input: body size, JSON depth, ICE candidates per session, media sections.

No client can make the server parse without bound, crash, or send STUN
wherever it names. Each limit answers with a code (docs/protocol.md, "Limits")
and changes nothing.
"""

import asyncio
import io
import json
import os
import time
import uuid

import pytest
from django.core.exceptions import ImproperlyConfigured

from scope_site.settings import env_networks
from sessions_app import services
from sessions_app.json_limits import MAX_JSON_DEPTH, json_depth_exceeds
from sessions_app.models import StreamSession
from sessions_app.parsers import BodyTooLarge, BoundedJSONParser
from tests.harness import ScopeServer
from tests.peer import ScopeClient
from tests.test_api import OFFER_SDP, assert_error, client_for, live_worker, worker_messages

THREE_MB = 3 * 1024 * 1024
CAP = 32  # SCOPE_MAX_CANDIDATES_PER_SESSION's default


def nested(levels: int, inner: object = 1) -> object:
    """``levels`` arrays, one inside the next."""
    for _ in range(levels):
        inner = [inner]
    return inner


def candidate(n: int) -> dict:
    # TEST-NET-1 addresses: outside the test servers' enforce list, so nothing is ever contacted.
    return {"candidate": f"candidate:{n} 1 udp 2122260223 192.0.2.{n % 250 + 1} {40000 + n} typ host",
            "sdpMid": "0", "sdpMLineIndex": 0}


def offer_with(*, media_sections: int = 1, candidates: int = 0) -> str:
    """``OFFER_SDP`` with its video section repeated and ``candidates`` host candidates in the first."""
    session, video = OFFER_SDP.split("m=video", 1)
    sections = [f"m=video{video}".replace("a=mid:0", f"a=mid:{i}") for i in range(media_sections)]
    lines = [candidate(n)["candidate"] for n in range(candidates)]
    sections[0] += "".join(f"a={line}\r\n" for line in lines)
    return session + "".join(sections)


# --- the depth measure ------------------------------------------------------------


def test_depth_counts_every_level_of_the_whole_document():
    assert not json_depth_exceeds(json.dumps(nested(MAX_JSON_DEPTH)))
    assert json_depth_exceeds(json.dumps(nested(MAX_JSON_DEPTH + 1)))
    assert json_depth_exceeds(json.dumps({"type": "ping", "ignored": {"deeper": nested(MAX_JSON_DEPTH)}}))
    # A repeated key's first value is dropped by the parser but still counted.
    assert json_depth_exceeds('{"a": ' + json.dumps(nested(40)) + ', "a": 1}')
    assert json_depth_exceeds("[" * 60_000)  # deep enough to crash json.loads


def test_depth_skips_brackets_inside_strings():
    assert not json_depth_exceeds(json.dumps({"text": "[" * 100, "quoted": '\\"[[[[' * 50, "end": "\\"}))


def test_the_parser_stops_reading_past_64_kib_whatever_the_declared_length():
    parser = BoundedJSONParser()
    assert parser.parse(io.BytesIO(b'{"a": [1]}')) == {"a": [1]}
    with pytest.raises(BodyTooLarge):
        parser.parse(io.BytesIO(b"[" + b" " * 64 * 1024 + b"]"))


def test_deny_list_setting_takes_cidrs_and_refuses_anything_else(monkeypatch):
    monkeypatch.setenv("SCOPE_ICE_DENY_LIST", "169.254.0.0/16, 10.1.2.3")
    assert env_networks("SCOPE_ICE_DENY_LIST", []) == ["169.254.0.0/16", "10.1.2.3/32"]
    monkeypatch.setenv("SCOPE_ICE_DENY_LIST", "169.254.0.0/16,metadata")
    with pytest.raises(ImproperlyConfigured):
        env_networks("SCOPE_ICE_DENY_LIST", [])


# --- REST: body size and depth ---------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", "/api/v1/webrtc/offer"),
        ("patch", "/api/v1/webrtc/offer/00000000-0000-4000-8000-000000000000"),
        ("post", "/api/v1/sessions/"),
    ],
)
@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("empty_channel_layer")
def test_a_body_over_64_kib_is_413_on_every_rest_route(alice, method, path):
    body = json.dumps({"sdp": "v=0", "type": "offer", "padding": "x" * THREE_MB})
    response = getattr(client_for(alice), method)(path, body, content_type="application/json")
    assert_error(response, 413, "INVALID_MESSAGE")
    assert not StreamSession.objects.exists()


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("empty_channel_layer")
def test_json_deeper_than_32_levels_is_400_even_in_an_ignored_field(alice):
    live_worker()
    client = client_for(alice)

    def offer(prompts: object):
        body = {"sdp": "not an sdp", "type": "offer", "initialParameters": {"prompts": prompts}}
        return client.post("/api/v1/webrtc/offer", body, format="json")

    # The document's object, initialParameters, then the arrays: 32 levels in all.
    assert_error(offer(nested(MAX_JSON_DEPTH - 2)), 400, "INVALID_SDP")  # read, then refused for its SDP
    response = offer(nested(MAX_JSON_DEPTH - 1))
    assert_error(response, 400, "INVALID_MESSAGE")
    assert "32 levels" in response.json()["detail"]
    assert not StreamSession.objects.exists()


# --- offers: media sections and candidates ------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("empty_channel_layer")
def test_an_offer_with_more_than_4_media_sections_is_invalid_sdp(alice):
    live_worker()
    response = client_for(alice).post(
        "/api/v1/webrtc/offer", {"sdp": offer_with(media_sections=5), "type": "offer"}, format="json"
    )
    assert_error(response, 400, "INVALID_SDP")
    assert "5 media sections" in response.json()["detail"]
    assert not StreamSession.objects.exists()
    assert worker_messages() == []


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("empty_channel_layer")
def test_an_offer_naming_more_candidates_than_the_cap_is_rate_limited(alice):
    live_worker()
    response = client_for(alice).post(
        "/api/v1/webrtc/offer", {"sdp": offer_with(candidates=CAP + 1), "type": "offer"}, format="json"
    )
    assert_error(response, 429, "RATE_LIMITED")
    assert not StreamSession.objects.exists()
    assert worker_messages() == []


# --- REST: trickled candidates ----------------------------------------------------------


def offered(owner, *, candidates: int) -> StreamSession:
    """A session on the stand-in worker, handed an offer naming ``candidates`` candidates."""
    live_worker()
    session = services.session_create_placed(owner=owner)
    services.session_offer(session_id=str(session.pk), pipeline="passthrough", parameters={}, ignored_parameters=[],
                           sdp=offer_with(candidates=candidates), sdp_type="offer", reply_channel="test!reply")
    worker_messages()  # the offer
    return session


def patch_candidates(client, session: StreamSession, candidates: list):
    return client.patch(f"/api/v1/webrtc/offer/{session.pk}", {"candidates": candidates}, format="json")


def forwarded_candidates() -> list:
    return [message["candidate"] for message in worker_messages() if message["type"] == "peer.candidate"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("empty_channel_layer")
def test_a_patch_past_the_cap_is_refused_whole(alice):
    session = offered(alice, candidates=0)
    client = client_for(alice)

    assert_error(patch_candidates(client, session, [candidate(n) for n in range(CAP + 1)]), 429, "RATE_LIMITED")
    assert forwarded_candidates() == []

    batch = [candidate(n) for n in range(CAP)]
    assert patch_candidates(client, session, batch).status_code == 204
    assert forwarded_candidates() == batch

    assert_error(patch_candidates(client, session, [candidate(CAP)]), 429, "RATE_LIMITED")
    assert forwarded_candidates() == []
    # End-of-candidates names no candidate: still accepted.
    assert patch_candidates(client, session, [None]).status_code == 204
    assert forwarded_candidates() == [None]


@pytest.mark.django_db(transaction=True)
@pytest.mark.usefixtures("empty_channel_layer")
def test_the_offers_candidates_count_toward_the_cap(alice):
    session = offered(alice, candidates=CAP - 2)
    client = client_for(alice)

    assert_error(patch_candidates(client, session, [candidate(100), candidate(101), candidate(102)]), 429,
                 "RATE_LIMITED")
    assert patch_candidates(client, session, [candidate(100), candidate(101)]).status_code == 204
    assert len(forwarded_candidates()) == 2


# --- a real server: what a client on the wire sees -----------------------------------------


def test_real_server_refuses_a_3_mb_body_and_deep_json(embedded_server: ScopeServer):
    big = embedded_server.api("POST", "/api/v1/webrtc/offer", user="alice",
                              content=b'{"padding": "' + b"x" * THREE_MB + b'"}',
                              headers={"Content-Type": "application/json"})
    assert big.status_code == 413, big.text
    assert big.json()["code"] == "INVALID_MESSAGE"

    deep = embedded_server.api("POST", "/api/v1/webrtc/offer", user="alice",
                               json={"sdp": "v=0", "type": "offer", "initialParameters": {"x": nested(100)}})
    assert deep.status_code == 400, deep.text
    assert deep.json()["code"] == "INVALID_MESSAGE"


async def test_deep_json_on_the_socket_is_an_error_and_the_socket_stays_usable(embedded_server: ScopeServer):
    async with ScopeClient() as client:
        await client.connect(embedded_server, "alice")
        await client.expect("ready")
        for raw in (json.dumps({"type": "ping", "extra": nested(100)}), "[" * 60_000):
            await client._ws.send(raw)
            error = await client.expect("error", timeout=5)
            assert error["code"] == "INVALID_MESSAGE", error
        await client.send({"type": "ping", "request_id": "still-here"})
        assert (await client.expect("pong"))["request_id"] == "still-here"
        assert not client.closed.is_set()


async def test_trickling_past_the_cap_over_the_socket_is_rate_limited(embedded_server: ScopeServer):
    async with ScopeClient() as client:
        await client.connect(embedded_server, "alice")
        await client.expect("ready")
        peer = await client.start_session(pipeline="passthrough")
        in_offer = sum(line.startswith("a=candidate:") for line in peer.pc.localDescription.sdp.splitlines())
        assert in_offer >= 1

        replies = []
        for n in range(CAP):
            request_id = uuid.uuid4().hex
            await client.send({"type": "icecandidate", "candidate": candidate(n), "sessionId": peer.session_id,
                               "request_id": request_id})
            replies.append(await client.expect(("icecandidate_ack", "error"), timeout=5, request_id=request_id))

        accepted = CAP - in_offer
        assert [r["type"] for r in replies] == ["icecandidate_ack"] * accepted + ["error"] * in_offer
        assert {r["code"] for r in replies[accepted:]} == {"RATE_LIMITED"}
        await peer.wait_frames(3)  # the session itself goes on


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def test_a_candidate_flood_never_reaches_the_worker(scaled_server: ScopeServer):
    """2,000 candidates on one session: refused past the cap at the web process; the worker's CPU stays flat."""
    flood = 2000
    async with ScopeClient() as client:
        await client.connect(scaled_server, "alice")
        await client.expect("ready")
        peer = await client.start_session(pipeline="passthrough")
        await peer.wait_frames(10)
        worker_id = scaled_server.session(peer.session_id)["worker"]
        pid = next(w["pid"] for w in scaled_server.workers() if w["id"] == worker_id)

        quiet_from, quiet_cpu = time.monotonic(), cpu_seconds(pid)
        await asyncio.sleep(3)
        quiet = (cpu_seconds(pid) - quiet_cpu) / (time.monotonic() - quiet_from)

        flood_from, flood_cpu = time.monotonic(), cpu_seconds(pid)
        for n in range(flood):
            await client.send({"type": "icecandidate", "candidate": candidate(n), "sessionId": peer.session_id,
                               "request_id": n})
        replies = [await client.expect(("icecandidate_ack", "error"), timeout=30, request_id=n) for n in range(flood)]
        await asyncio.sleep(max(0.0, 3 - (time.monotonic() - flood_from)))
        flooded = (cpu_seconds(pid) - flood_cpu) / (time.monotonic() - flood_from)
        await peer.wait_frames(len(peer.frames) + 10)  # the session itself goes on

    refused = [reply for reply in replies if reply["type"] == "error"]
    print(f"worker CPU: {quiet:.3f} s/s streaming, {flooded:.3f} s/s during {flood} candidates ({len(refused)} refused)")
    assert len(refused) >= flood - CAP and {reply["code"] for reply in refused} == {"RATE_LIMITED"}
    assert flooded <= quiet * 1.5 + 0.05
