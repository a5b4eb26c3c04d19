"""Clients nobody here wrote: a Scope-like page in Chromium, and our own page held to Scope's bounds.

Daydream Scope's frontend negotiates differently from our own page
(static/scope/stream.js): it prefers VP8 with no RTX (so a lost packet is never
retransmitted and the receiver must cope with padding and gaps on the media
stream itself), opens its data channel before adding the camera, trickles
every ICE candidate, learns that the server ended its stream only from a
``stream_stopped`` message on that data channel, and its Stop button closes
the peer connection but keeps the signaling socket for the next Play.
``tests/pages/scope_like.html`` does exactly that; it is written into a
document the server itself served (see ``open_scope_like``), so its socket
passes the Origin check like any page of the server's.

Everything runs in a private network namespace with only ``lo``
(tests/browser.py), as tests/test_pages.py does.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from tests.harness import ScopeServer, start_embedded

PAGE_FILE = Path(__file__).parent / "pages" / "scope_like.html"
# Where the Scope-like page appears on the server's origin (the server answers 404 there).
PAGE_PATH = "/__tests__/scope_like.html"

LIVE_TIMEOUT_MS = 30_000
SAMPLE_SECONDS = 2.0
LONG_RUN_SECONDS = 20.0
END_BOUND_SECONDS = 1.0
OPERATOR_ENDED_TEXT = "Session ended by an operator."


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(namespace: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScopeServer]:
    # Heartbeats every second: the sessions' frames_in (sampled every 2 s) moves each sample.
    with start_embedded(tmp_path_factory.mktemp("real-clients"), SCOPE_HEARTBEAT_SECONDS=1) as server:
        yield server


def open_scope_like(
    browser: Browser, contexts: list[BrowserContext], server: ScopeServer, *, codecs: str, pipeline: str = "invert"
) -> Page:
    """The Scope-like page on the server's origin, its socket open and ``ready``."""
    context = browser.new_context(base_url=server.base_url)
    contexts.append(context)
    page = context.new_page()
    # A document the server itself sent (its 404 for this path), then the page written into it:
    # a page fulfilled by page.route has no network address, and Chromium's Local Network
    # Access checks then block its socket to 127.0.0.1 (ERR_BLOCKED_BY_LOCAL_NETWORK_ACCESS_CHECKS).
    page.goto(f"{PAGE_PATH}?{urlencode({'codecs': codecs, 'pipeline': pipeline})}")
    page.set_content(PAGE_FILE.read_text())
    page.wait_for_function("window.scopeLike.state.readyCount >= 1", timeout=LIVE_TIMEOUT_MS)
    return page


def page_state(page: Page) -> dict[str, Any]:
    return page.evaluate("window.scopeLike.state")


def wait_answered(page: Page, index: int) -> str:
    """The id of the page's ``index``-th session once answered; fails with what the page saw if it failed."""
    try:
        page.wait_for_function(
            """(i) => { const s = window.scopeLike.state;
                        return (s.sessions[i] && s.sessions[i].sessionId) || s.failures.length > 0; }""",
            arg=index,
            timeout=LIVE_TIMEOUT_MS,
        )
    except PlaywrightTimeoutError as exc:
        raise AssertionError(f"session {index} never answered; the page saw {describe(page)}") from exc
    state = page_state(page)
    assert not state["failures"], f"the Scope-like page failed: {state['failures']}; it saw {describe(page)}"
    return state["sessions"][index]["sessionId"]


def describe(page: Page) -> str:
    """What the page saw of its socket, for failure messages (SDP left out)."""
    state = page_state(page)
    messages = [{k: v for k, v in m.items() if k != "sdp"} for m in state["socket"]["messages"]]
    return f"status {state['status']!r}, socket closed {state['socket']['closed']}, messages {messages}"


def play(page: Page) -> str:
    """Press Play on the Scope-like page; the new session's id once its peer connection is connected."""
    index = len(page_state(page)["sessions"])
    page.evaluate("() => { window.scopeLike.play(); }")
    session_id = wait_answered(page, index)
    wait_streaming(page)
    return session_id


def wait_streaming(page: Page) -> None:
    try:
        page.wait_for_function("window.scopeLike.state.status === 'streaming'", timeout=LIVE_TIMEOUT_MS)
    except PlaywrightTimeoutError as exc:
        raise AssertionError(f"the page never connected; it saw {describe(page)}") from exc


def wait_live(server: ScopeServer, session_id: str) -> None:
    server.wait_until(lambda: server.session(session_id)["state"] == "live", 10, what=f"session {session_id} live")


def video_codecs(sdp: str) -> set[str]:
    """The codec names (rtpmap) of an SDP's video section."""
    section = sdp.split("m=video", 1)[1].split("\r\nm=", 1)[0]
    return {name.upper() for name in re.findall(r"a=rtpmap:\d+ ([\w-]+)/", section)}


def assert_streams(page: Page, server: ScopeServer, session_id: str, seconds: float) -> list[dict[str, Any]]:
    """Every ~2 s over ``seconds``: the page's presented and decoded frames and the server's frames_in all rose."""
    def sample() -> dict[str, Any]:
        record = server.session(session_id)
        return {
            "t": round(time.monotonic() - began, 2),
            "presented": page.evaluate("window.scopeLike.state.presentedFrames"),
            "decoded": page.evaluate("window.scopeLike.framesDecoded()"),
            "frames_in": record["frames_in"],
            "state": record["state"],
        }

    began = time.monotonic()
    samples = [sample()]
    while time.monotonic() - began < seconds:
        page.wait_for_timeout(SAMPLE_SECONDS * 1000)
        samples.append(sample())
        before, after = samples[-2:]
        shown = "\n".join(json.dumps(s) for s in samples)
        for key in ("presented", "decoded", "frames_in"):
            assert after[key] is not None and after[key] > before[key], (
                f"{key} stopped rising between t={before['t']} and t={after['t']}:\n{shown}"
            )
        assert after["state"] == "live", f"the session left 'live':\n{shown}"
    first, last = samples[0], samples[-1]
    print(f"session {session_id} over {last['t']:.0f}s: " + ", ".join(
        f"{key} {first[key]}->{last[key]}" for key in ("presented", "decoded", "frames_in")))
    return samples


def new_log(server: ScopeServer, since: int) -> str:
    return server.log_text()[since:]


# --- 1, 2: Scope's codec choices, streamed for a while -----------------------------------


def test_vp8_without_rtx_streams_for_twenty_seconds(browser, contexts, server):
    log_mark = len(server.log_text())
    page = open_scope_like(browser, contexts, server, codecs="video/VP8")
    session_id = play(page)
    wait_live(server, session_id)

    state = page_state(page)
    offer, answer = state["offers"][0], state["answers"][0]
    assert video_codecs(offer) == {"VP8"}, f"the offer's video codecs: {video_codecs(offer)}"
    assert not re.search(r"rtx|red/|ulpfec|flexfec", offer, re.IGNORECASE), "the offer negotiates a repair stream"
    assert video_codecs(answer) == {"VP8"}, f"the answer's video codecs: {video_codecs(answer)}"
    assert "a=ssrc-group:FID" not in offer

    assert_streams(page, server, session_id, LONG_RUN_SECONDS)
    log = new_log(server, log_mark)
    assert "failed to decode" not in log, "the server failed to decode some of the browser's VP8 frames"


def test_h264_only_streams(browser, contexts, server):
    """Only H.264 offered: aiortc decodes it with PyAV's h264 and answers with H.264 (libx264)."""
    log_mark = len(server.log_text())
    page = open_scope_like(browser, contexts, server, codecs="video/H264")
    if not page.evaluate(
        "RTCRtpSender.getCapabilities('video').codecs.some((c) => c.mimeType.toLowerCase() === 'video/h264')"
    ):
        pytest.skip("this Chromium cannot send H.264")
    session_id = play(page)
    wait_live(server, session_id)

    state = page_state(page)
    assert video_codecs(state["offers"][0]) == {"H264"}, video_codecs(state["offers"][0])
    assert video_codecs(state["answers"][0]) == {"H264"}, video_codecs(state["answers"][0])
    assert_streams(page, server, session_id, LONG_RUN_SECONDS)
    assert "failed to decode" not in new_log(server, log_mark)


# --- 3: the end of a stream, as each client learns it ------------------------------------


def test_scope_like_page_learns_an_operator_end_from_the_data_channel(browser, contexts, server):
    page = open_scope_like(browser, contexts, server, codecs="video/VP8")
    session_id = play(page)
    wait_live(server, session_id)
    before = page.evaluate("window.scopeLike.state.presentedFrames")
    page.wait_for_function(f"window.scopeLike.state.presentedFrames > {before + 5}", timeout=LIVE_TIMEOUT_MS)

    response = server.api("DELETE", f"/api/v1/webrtc/offer/{session_id}")
    deleted_at = time.time()
    assert response.status_code == 204, response.text

    # Generous wait, exact bound: a late message fails naming its delay, a missing one naming what came.
    try:
        page.wait_for_function("window.scopeLike.state.streamStopped !== null", timeout=5000)
    except PlaywrightTimeoutError as exc:
        channel = page_state(page)["channelMessages"]
        raise AssertionError(f"no stream_stopped on the data channel (it got {channel}); {describe(page)}") from exc
    state = page_state(page)
    stopped = state["streamStopped"]
    delay = stopped["at"] / 1000 - deleted_at
    print(f"stream_stopped reached the page {delay:+.3f}s after the DELETE returned")
    assert delay <= END_BOUND_SECONDS, f"stream_stopped came {delay:.2f}s after the DELETE returned"
    assert stopped["reason"] == "SESSION_TERMINATED", stopped
    assert isinstance(stopped.get("error_message"), str) and stopped["error_message"], stopped
    expect(page.locator("#status")).to_contain_text("SESSION_TERMINATED", timeout=1)
    expect(page.locator("#stream-error")).to_have_text(stopped["error_message"], timeout=1)
    assert server.closed_session(session_id)["close_reason"] == "SESSION_TERMINATED"


def test_our_page_shows_an_operator_end_within_a_second(browser, contexts, server):
    # tests/test_pages.py ends a session from the dashboard but does not time the page; this does.
    context = browser.new_context(base_url=server.base_url)
    contexts.append(context)
    page = context.new_page()
    page.goto("/")
    expect(page.get_by_role("button", name="Start")).to_be_enabled()
    page.get_by_label("Pipeline").select_option(label="Invert colors")
    page.get_by_role("button", name="Start").click()
    page.wait_for_function("window.scopeStream.state === 'live'", timeout=LIVE_TIMEOUT_MS)
    page.wait_for_function("window.scopeStream.outputFrames >= 10", timeout=LIVE_TIMEOUT_MS)
    session_id = page.evaluate("window.scopeStream.sessionId")

    response = server.api("DELETE", f"/api/v1/webrtc/offer/{session_id}")
    deleted_at = time.monotonic()
    assert response.status_code == 204, response.text
    page.wait_for_function(
        "(text) => document.getElementById('ended-reason').textContent === text",
        arg=OPERATOR_ENDED_TEXT,
        timeout=5000,
    )
    delay = time.monotonic() - deleted_at
    print(f"the page showed the operator's end {delay:.3f}s after the DELETE returned")
    assert delay <= END_BOUND_SECONDS, f"the page showed the operator's end {delay:.2f}s after the DELETE returned"
    assert page.evaluate("window.scopeStream.endedCode") == "SESSION_TERMINATED"


# --- 4: Scope's Stop, then Play, on one socket -------------------------------------------


def test_stop_then_play_a_moment_later_on_the_same_socket(browser, contexts, server):
    page = open_scope_like(browser, contexts, server, codecs="video/VP8")
    first = play(page)
    wait_live(server, first)
    before = page.evaluate("window.scopeLike.state.presentedFrames")
    page.wait_for_function(f"window.scopeLike.state.presentedFrames > {before + 5}", timeout=LIVE_TIMEOUT_MS)

    # Stop closes the peer connection only; Play 0.3 s later waits for the server's next `ready`.
    page.evaluate("() => { window.scopeLike.stopThenPlay(300); }")
    second = wait_answered(page, 1)
    assert second != first
    wait_streaming(page)
    wait_live(server, second)
    assert_streams(page, server, second, 6)

    assert server.closed_session(first)["close_reason"] == "PEER_CLOSED"
    state = page_state(page)
    assert state["socket"]["closed"] is None, f"the socket closed: {state['socket']['closed']}"
    messages = state["socket"]["messages"]
    ended = next(
        (i for i, m in enumerate(messages) if m["type"] == "error" and m.get("sessionId") == first), None
    )
    assert ended is not None and messages[ended]["code"] == "PEER_CLOSED", messages
    assert any(m["type"] == "ready" for m in messages[ended + 1:]), f"no `ready` after the first session ended: {messages}"
