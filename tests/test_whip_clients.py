"""WHIP and WHEP clients nobody here wrote: Meetecho's simple-whip-client publishes, Eyevinn's player watches.

The publisher is Debian's ``whip-client`` (GStreamer's webrtcbin, libnice) sending
a test pattern (tests/gst_whip.py says what it does on the wire and why it
needs a shim on bookworm). The viewers are ``@eyevinn/webrtc-player`` (its
WHEP adapter) in Chromium, bundled from tests/whep_player/ and run in
tests/pages/whep_viewer.html, which counts the frames it presents and watches
the player's peer connections.

Everything runs in a private network namespace with only ``lo``
(tests/browser.py), as tests/test_real_clients.py does; whip-client is
started from inside it too.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, BrowserContext, Page
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from tests.browser import video_mean
from tests.gst_whip import CONNECTED, WhipClient, build_shim, publishing
from tests.harness import ScopeServer, event_time, start_embedded

PAGE_FILE = Path(__file__).parent / "pages" / "whep_viewer.html"
# Where the viewer page appears on the server's origin (the server answers 404 there).
PAGE_PATH = "/__tests__/whep_viewer.html"
PLAYER_DIR = Path(__file__).parent / "whep_player"

IDLE_TIMEOUT_SECONDS = 2
LIVE_TIMEOUT_S = 15
PLAY_TIMEOUT_MS = 20_000
SAMPLE_SECONDS = 2.0
# The contract: no frame reaches a viewer later than this after the DELETE that ended its session returned.
LAST_FRAME_BOUND_MS = 200
# A closed page says nothing to the server: its viewer is found gone by ICE consent (RFC 7675, ~30 s).
VIEWER_GONE_BOUND_S = 40


# --- fixtures ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def player_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eyevinn's player and tests/whep_player/player.js as one script, window.whepPlayer."""
    esbuild = PLAYER_DIR / "node_modules" / ".bin" / "esbuild"
    if not esbuild.exists():
        raise FileNotFoundError(f"{esbuild} is missing: run `npm ci --prefix tests/whep_player` (.ci/run does)")
    bundle = tmp_path_factory.mktemp("whep-player") / "whep_player.js"
    subprocess.run(
        [str(esbuild), str(PLAYER_DIR / "player.js"), "--bundle", "--format=iife", "--global-name=whepPlayer",
         f"--outfile={bundle}", "--log-level=warning"],
        check=True, capture_output=True, text=True,
    )
    return bundle


@pytest.fixture(scope="session")
def whip_shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory.mktemp("whip-shim"))


@pytest.fixture(scope="module")
def server(namespace: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScopeServer]:
    # A heartbeat within every 2 s sample: frames_in moves between samples. Not every second: with Chromium,
    # GStreamer and the server sharing two cores, a 3 s silence bound once had the embedded worker declared
    # lost. A short idle timeout: a killed publisher's session ends in seconds (the others never stop sending).
    settings = {"SCOPE_HEARTBEAT_SECONDS": 1.5, "SCOPE_IDLE_TIMEOUT_SECONDS": IDLE_TIMEOUT_SECONDS}
    with start_embedded(tmp_path_factory.mktemp("whip-clients"), **settings) as server:
        yield server


@pytest.fixture
def publish(server: ScopeServer, whip_shim: Path) -> Iterator[Callable[..., WhipClient]]:
    """``publish(pipeline="invert")``: a whip-client publishing as alice, connected; all stopped after the test.

    Its log sits with the server's, so a failing test's report shows it.
    """
    with ExitStack() as stack:

        def start(**query: str) -> WhipClient:
            log_path = server.logs_dir / f"whip-client-{time.monotonic_ns()}.log"
            url = f"{server.base_url}/api/v1/whip?{'&'.join(f'{k}={v}' for k, v in query.items())}"
            client = stack.enter_context(publishing(url, server.tokens["alice"], log_path, whip_shim))
            client.wait_for(CONNECTED, LIVE_TIMEOUT_S)
            return client

        yield start


def open_viewer(
    browser: Browser, contexts: list[BrowserContext], server: ScopeServer, bundle: Path, session_id: str, user: str
) -> Page:
    """The viewer page on the server's origin, its player started on the session as ``user``."""
    context = browser.new_context(base_url=server.base_url)
    contexts.append(context)
    page = context.new_page()
    # A document the server itself sent (its 404 for this path), then the page written into it, as
    # tests/test_real_clients.py does: Chromium's Local Network Access checks would block the player's
    # requests to 127.0.0.1 from a page that has no network address.
    page.goto(PAGE_PATH)
    page.set_content(PAGE_FILE.read_text())
    page.add_script_tag(path=str(bundle))
    page.evaluate(
        "([url, token]) => window.whepViewer.start(url, token)",
        [f"/api/v1/whep/{session_id}", server.tokens[user]],
    )
    return page


def viewer_state(page: Page) -> dict[str, Any]:
    return page.evaluate("window.whepViewer.state")


def wait_playing(page: Page, frames: int = 10) -> None:
    try:
        page.wait_for_function(f"window.whepViewer.state.frames >= {frames}", timeout=PLAY_TIMEOUT_MS)
    except PlaywrightTimeoutError as exc:
        raise AssertionError(f"the viewer presented fewer than {frames} frames: {viewer_state(page)}") from exc


def wait_live(server: ScopeServer, session_id: str) -> dict[str, Any]:
    return server.wait_until(
        lambda: (record := server.session(session_id))["state"] == "live" and record,
        LIVE_TIMEOUT_S, what=f"session {session_id} live",
    )


def event_kinds(record: dict[str, Any]) -> list[str]:
    return [event["kind"] for event in record["events"]]


def assert_in_order(kinds: list[str], expected: list[str]) -> None:
    """``expected`` appears in ``kinds`` in this order (other events may come between)."""
    remaining = iter(kinds)
    missing = [kind for kind in expected if kind not in remaining]
    assert not missing, f"events {expected} not all in order (missing from {missing[0]!r} on): {kinds}"


def assert_streams(
    server: ScopeServer, session_id: str, pages: list[Page], seconds: float,
    until: tuple[str, Callable[[], bool]] | None = None,
) -> str:
    """Every ~2 s: the server's frames_in and every page's presented and decoded frames rose; a summary.

    For ``seconds``; or, given ``until=(what, predicate)``, until the predicate holds, failing
    if it does not within ``seconds``.
    """
    def sample() -> dict[str, Any]:
        record = server.session(session_id)
        return {
            "t": round(time.monotonic() - began, 2),
            "state": record["state"],
            "frames_in": record["frames_in"],
            "presented": [page.evaluate("window.whepViewer.state.frames") for page in pages],
            "decoded": [page.evaluate("window.whepViewer.framesDecoded()") for page in pages],
        }

    def done() -> bool:
        elapsed = time.monotonic() - began
        if until is None:
            return elapsed >= seconds
        what, predicate = until
        if predicate():
            return True
        assert elapsed < seconds, f"no {what} within {seconds:g}s; the session: {server.session(session_id)}"
        return False

    began = time.monotonic()
    samples = [sample()]
    while not done():
        time.sleep(SAMPLE_SECONDS)
        samples.append(sample())
        before, after = samples[-2:]
        shown = "\n".join(json.dumps(s) for s in samples)
        assert after["state"] == "live", f"the session left 'live':\n{shown}"
        assert after["frames_in"] > before["frames_in"], f"frames_in stopped rising:\n{shown}"
        for key in ("presented", "decoded"):
            for index, (old, new) in enumerate(zip(before[key], after[key])):
                assert new > old, f"viewer {index}'s {key} frames stopped rising:\n{shown}"
    first, last = samples[0], samples[-1]
    keys = ("frames_in", "presented", "decoded") if pages else ("frames_in",)
    return f"over {last['t']:.0f}s: " + ", ".join(f"{key} {first[key]}->{last[key]}" for key in keys)


def events_of(server: ScopeServer, session_id: str, kind: str) -> list[dict[str, Any]]:
    return [event for event in server.session(session_id)["events"] if event["kind"] == kind]


def viewer_peer_ended(page: Page) -> dict[str, Any] | None:
    """The player's first peer once its DTLS transport closed or its connection closed or failed."""
    peer = viewer_state(page)["peers"][0]
    ended = peer["dtlsState"] in ("closed", "failed") or peer["connectionState"] in ("closed", "failed")
    return peer if ended else None


def live_publisher(server: ScopeServer, publish):
    """whip-client publishing through invert, once its session is live: (publisher, session id)."""
    publisher = publish(pipeline="invert")
    wait_live(server, publisher.session_id)
    return publisher, publisher.session_id


# --- a: publish, watch, hang up -------------------------------------------------------


def test_gstreamer_publisher_is_watched_and_its_hang_up_ends_the_session(
    browser, contexts, server, publish, player_bundle
):
    publisher, session_id = live_publisher(server, publish)

    page = open_viewer(browser, contexts, server, player_bundle, session_id, "alice")
    wait_playing(page)
    print(f"publisher and viewer {assert_streams(server, session_id, [page], 4)}")
    # The test pattern is a white ball on black; the viewer sees the pipeline's inverted picture.
    mean = video_mean(page, "#video")
    print(f"the viewer's picture: mean RGB {mean}")
    assert mean is not None and min(mean) > 200, f"the viewer's picture is not the inverted pattern: mean RGB {mean}"

    # The player's own way out (its WHEP DELETE): the viewer leaves, the publisher goes on.
    page.evaluate("window.whepViewer.leave()")
    left = server.wait_until(lambda: events_of(server, session_id, "viewer_left"), 3, what="viewer_left")
    assert left[0]["detail"]["reason"] == "left", left
    print(f"publisher alone {assert_streams(server, session_id, [], SAMPLE_SECONDS)}")

    hung_up_at = time.time()
    assert publisher.hang_up() == 0, f"whip-client did not exit cleanly:\n{publisher.log_text()}"
    record = server.closed_session(session_id)
    assert record["close_reason"] == "SESSION_TERMINATED", record
    assert_in_order(event_kinds(record), ["live", "closing", "peer_closed", "pipeline_stopped", "cleaned_up", "closed"])
    print(f"closed {event_time(record, 'closed') - hung_up_at:+.3f}s after the hang-up signal")
    # The client logs every PATCH (its trickled candidates) and DELETE the server did not accept.
    assert publisher.http_failures() == [], publisher.log_text()


# --- b: two viewers, one closes its page, then an operator ends it all --------------------


def test_a_closed_viewer_leaves_the_other_playing_and_an_operator_delete_stops_every_frame(
    browser, contexts, server, publish, player_bundle
):
    publisher, session_id = live_publisher(server, publish)
    # The owner and an operator watch.
    closing = open_viewer(browser, contexts, server, player_bundle, session_id, "alice")
    staying = open_viewer(browser, contexts, server, player_bundle, session_id, "staff")
    wait_playing(closing)
    wait_playing(staying)
    server.wait_until(lambda: len(events_of(server, session_id, "viewer_joined")) == 2, 5, what="2 viewer_joined")

    closed_at = time.monotonic()
    closing.close()
    # The other plays on while the server finds the closed one gone (the page said nothing).
    gone = ("viewer_left", lambda: bool(events_of(server, session_id, "viewer_left")))
    print(f"the staying viewer {assert_streams(server, session_id, [staying], VIEWER_GONE_BOUND_S, until=gone)}")
    left = events_of(server, session_id, "viewer_left")
    print(f"viewer_left {time.monotonic() - closed_at:.1f}s after the page closed: {left}")
    assert server.session(session_id)["viewers"] == 1
    print(f"then {assert_streams(server, session_id, [staying], 4)}")

    # The operator's DELETE, sent from the staying page, so its return and the frames share one clock.
    deleted = staying.evaluate(
        "([path, auth]) => window.whepViewer.timedRequest('DELETE', path, auth)",
        [f"/api/v1/webrtc/offer/{session_id}", f"Token {server.tokens['staff']}"],
    )
    assert deleted["status"] == 204, deleted
    record = server.closed_session(session_id)
    assert record["close_reason"] == "SESSION_TERMINATED", record
    # A frame still on its way would arrive well within this.
    staying.wait_for_timeout(1500)
    last = viewer_state(staying)["lastFrame"]
    arrived = last["receivedAt"] if last["receivedAt"] is not None else last["presentedAt"]
    print(f"the last frame arrived {arrived - deleted['returnedAt']:+.0f} ms and was presented "
          f"{last['presentedAt'] - deleted['returnedAt']:+.0f} ms after the DELETE returned "
          f"(it took {deleted['returnedAt'] - deleted['sentAt']:.0f} ms)")
    assert arrived - deleted["returnedAt"] <= LAST_FRAME_BOUND_MS, (
        f"a frame arrived {arrived - deleted['returnedAt']:.0f} ms after the DELETE returned"
    )
    peer = server.wait_until(lambda: viewer_peer_ended(staying), 5, what="the staying viewer's peer closed")
    assert peer["dtlsState"] == "closed", peer
    # The publisher learns it from its DTLS transport, and leaves on its own.
    try:
        publisher.process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"whip-client still runs 10 s after the operator's DELETE:\n{publisher.log_text()}")


# --- c: a publisher that vanishes -------------------------------------------------------


def test_a_killed_publisher_ends_idle_and_its_viewer_peer_closes(browser, contexts, server, publish, player_bundle):
    publisher, session_id = live_publisher(server, publish)
    page = open_viewer(browser, contexts, server, player_bundle, session_id, "alice")
    wait_playing(page)

    killed_at = time.time()
    publisher.kill()
    assert publisher.process.returncode == -signal.SIGKILL
    # The idle timeout, one idle check, the close path's 2 s, and room for a loaded machine.
    record = server.closed_session(session_id, timeout=IDLE_TIMEOUT_SECONDS + 8)
    assert record["close_reason"] == "IDLE_TIMEOUT", record
    closing_after = event_time(record, "closing") - killed_at
    print(f"closing {closing_after:.2f}s after SIGKILL (idle timeout {IDLE_TIMEOUT_SECONDS}s)")
    assert closing_after >= IDLE_TIMEOUT_SECONDS - 0.5, f"closed {closing_after:.2f}s after the kill: not for idleness"

    peer = server.wait_until(lambda: viewer_peer_ended(page), 5, what="the viewer's peer closed")
    print(f"the viewer's peer: {peer}")
    frames = viewer_state(page)["frames"]
    page.wait_for_timeout(1000)
    assert viewer_state(page)["frames"] == frames, "the viewer still presents frames after its session closed"
