"""The pages in a real browser: Debian's Chromium, its fake camera, real WebRTC to the server.

Everything here runs inside a private network namespace with only ``lo``
(tests/browser.py), so the browser's ICE can only use 127.0.0.1. Screenshots
of each page in a live state go to ``test-artifacts/`` (``SCOPE_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    Page,
    expect,
)

from tests.browser import video_mean
from tests.harness import ARTIFACTS, PASSWORD, ScopeServer, start_embedded

LIVE_TIMEOUT_MS = 30_000
SHORT_MAX_SECONDS = 5


@pytest.fixture(scope="module")
def server(namespace: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScopeServer]:
    with start_embedded(tmp_path_factory.mktemp("pages")) as server:
        yield server


@pytest.fixture(scope="module")
def short_server(namespace: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScopeServer]:
    """Sessions end after a few seconds; anonymous streaming is off."""
    with start_embedded(
        tmp_path_factory.mktemp("pages-short"),
        SCOPE_MAX_SESSION_SECONDS=SHORT_MAX_SECONDS,
        SCOPE_ALLOW_ANONYMOUS=False,
    ) as server:
        yield server


def open_page(browser: Browser, contexts: list[BrowserContext], server: ScopeServer, user: str | None) -> Page:
    """A fresh browser profile, logged in as ``user`` through the login page (None: anonymous)."""
    context = browser.new_context(base_url=server.base_url, viewport={"width": 1360, "height": 860})
    contexts.append(context)
    page = context.new_page()
    if user is not None:
        page.goto("/accounts/login/")
        page.get_by_label("Username").fill(user)
        page.get_by_label("Password").fill(PASSWORD)
        page.get_by_role("button", name="Log in").click()
        expect(page.locator(".who")).to_have_text(user)
    return page


def start_streaming(page: Page, pipeline_label: str) -> str:
    """On ``/``: pick a pipeline, press Start, wait until live with frames coming back; the session id."""
    if not page.url.endswith("/"):
        page.goto("/")
    expect(page.get_by_role("button", name="Start")).to_be_enabled()
    page.get_by_label("Pipeline").select_option(label=pipeline_label)
    page.get_by_role("button", name="Start").click()
    page.wait_for_function("window.scopeStream.state === 'live'", timeout=LIVE_TIMEOUT_MS)
    expect(page.locator("#state")).to_have_text("Live")
    wait_output_advancing(page)
    return page.evaluate("window.scopeStream.sessionId")


def output_frames(page: Page) -> int:
    return page.evaluate("window.scopeStream.outputFrames")


def wait_output_advancing(page: Page, frames: int = 10) -> None:
    before = output_frames(page)
    page.wait_for_function(f"window.scopeStream.outputFrames >= {before + frames}", timeout=LIVE_TIMEOUT_MS)


def assert_output_stopped(page: Page) -> None:
    """The processed video shows no new frame over a second."""
    before = output_frames(page)
    page.wait_for_timeout(1000)
    assert output_frames(page) == before, "the processed video kept advancing after the session ended"


def wait_mean(page: Page, selector: str, accept, what: str, timeout: float = 10.0) -> tuple[float, float, float]:
    """The video's mean colour once ``accept(mean)`` holds; fails naming the last one seen."""
    deadline = time.monotonic() + timeout
    mean = None
    while time.monotonic() < deadline:
        mean = video_mean(page, selector)
        if mean is not None and accept(mean):
            return mean
        page.wait_for_timeout(200)
    raise AssertionError(f"{what}: last mean colour of {selector} was {mean}")


def luma(mean: tuple[float, float, float]) -> float:
    """Rec. 601 luma of a mean RGB colour."""
    red, green, blue = mean
    return 0.299 * red + 0.587 * green + 0.114 * blue


def set_slider(page: Page, name: str, value: float) -> None:
    # Playwright cannot fill a range input; set it as a drag would, then fire 'input'.
    page.locator(f"input[data-parameter='{name}']").evaluate(
        "(input, value) => { input.value = value; input.dispatchEvent(new Event('input', { bubbles: true })); }",
        value,
    )


def screenshot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def test_invert_then_a_live_parameter_change(browser, contexts, server):
    page = open_page(browser, contexts, server, "alice")
    start_streaming(page, "Invert colors")

    def inverted(out):
        camera = video_mean(page, "#camera")
        return camera is not None and all(abs(o - (255 - c)) < 40 for o, c in zip(out, camera, strict=True))

    out = wait_mean(page, "#output", inverted, "the output is the camera's negative")
    camera = video_mean(page, "#camera")
    assert camera is not None and max(abs(o - c) for o, c in zip(out, camera, strict=True)) > 40, (camera, out)
    expect(page.locator("#time-left")).to_contain_text("left")
    expect(page.locator("#fps-out")).to_contain_text("fps")
    screenshot(page, "stream-live")
    page.set_viewport_size({"width": 390, "height": 844})
    screenshot(page, "stream-live-phone")
    page.set_viewport_size({"width": 1360, "height": 860})

    # Thin gray edges of the fake camera's picture (mostly black), then ten times as strong.
    page.get_by_label("Pipeline").select_option(label="Edge detection")
    wait_mean(page, "#output", lambda m: max(m) - min(m) < 4 and max(m) < 30, "gray edges on black")
    page.wait_for_timeout(1000)  # let the encoder settle on the new picture
    faint = video_mean(page, "#output")
    assert faint is not None
    set_slider(page, "strength", 10)
    # In luma, against twice the faint picture's: on a picture this dark the encoder's chroma drifts (red
    # and blue read 2.4 where green read 1.6), and a bar set on red stood above what strength 10 showed
    # (4-6x the luma) in one run of four.
    wait_mean(page, "#output", lambda m: luma(m) > 2 * luma(faint) + 1, f"edges brighter than {faint} at strength 10")
    expect(page.locator("#notice")).to_be_hidden()

    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#ended-reason")).to_have_text("You stopped the session.")


def test_dashboard_shows_the_session_live_and_terminate_ends_it(browser, contexts, server):
    dashboard = open_page(browser, contexts, server, "staff")
    dashboard.goto("/dashboard/")
    expect(dashboard.locator("#connection")).to_have_text("Live")
    expect(dashboard.locator("#workers tbody tr")).to_have_count(1)

    stream = open_page(browser, contexts, server, "alice")
    session_id = start_streaming(stream, "Grayscale")
    live_seen = time.monotonic()
    row = dashboard.locator(f"#live-sessions tr[data-session-id='{session_id}']")
    expect(row.locator(".state")).to_have_text("live", timeout=2000)
    assert time.monotonic() - live_seen <= 2.0
    expect(row).to_contain_text("alice")
    expect(row).to_contain_text("grayscale")
    expect(dashboard.locator("#workers tbody tr").first).to_contain_text("1 / ")
    # Frame counts arrive with the worker's heartbeats, pushed like everything else.
    expect(row.locator("td").nth(8)).not_to_have_text("0", timeout=10_000)
    screenshot(dashboard, "dashboard-live")

    row.get_by_role("button", name="Terminate").click()
    # The DELETE's answer (204) is shown; the row itself may already have moved to closed.
    expect(dashboard.locator("#notice")).to_have_text(f"Session {session_id[:8]}: terminated", timeout=5000)
    expect(stream.locator("#ended-reason")).to_have_text("Session ended by an operator.")
    assert stream.evaluate("window.scopeStream.endedCode") == "SESSION_TERMINATED"
    expect(stream.locator("#state")).to_have_text("Ended")
    assert_output_stopped(stream)

    closed_row = dashboard.locator(f"#closed-sessions tr[data-session-id='{session_id}']")
    expect(closed_row).to_contain_text("SESSION_TERMINATED")
    expect(row).to_have_count(0)
    record = server.session(session_id)
    assert record["state"] == "closed" and record["close_reason"] == "SESSION_TERMINATED"


def test_time_limit_shows_its_reason_and_stops(browser, contexts, short_server):
    page = open_page(browser, contexts, short_server, "alice")
    session_id = start_streaming(page, "Passthrough")
    expect(page.locator("#ended-reason")).to_have_text(
        f"Time limit of {SHORT_MAX_SECONDS} seconds reached.", timeout=(SHORT_MAX_SECONDS + 5) * 1000
    )
    assert page.evaluate("window.scopeStream.endedCode") == "MAX_DURATION_EXCEEDED"
    assert_output_stopped(page)
    assert short_server.closed_session(session_id)["close_reason"] == "MAX_DURATION_EXCEEDED"


def test_stop_then_start_again_gives_a_new_live_session(browser, contexts, server):
    page = open_page(browser, contexts, server, None)  # anonymous streaming is on in this server
    first = start_streaming(page, "Blur")
    page.get_by_role("button", name="Stop").click()
    expect(page.locator("#ended-reason")).to_have_text("You stopped the session.")
    assert_output_stopped(page)

    second = start_streaming(page, "Blur")
    assert second != first
    closed = server.closed_session(first)
    assert closed["close_reason"] == "CLIENT_DISCONNECT"
    assert server.session(second)["state"] == "live"
    page.get_by_role("button", name="Stop").click()
    assert server.closed_session(second)["close_reason"] == "CLIENT_DISCONNECT"


def test_only_staff_get_the_dashboard(browser, contexts, short_server):
    anonymous = open_page(browser, contexts, short_server, None)
    anonymous.goto("/dashboard/")
    expect(anonymous).to_have_url(f"{short_server.base_url}/accounts/login/?next=/dashboard/")
    # Anonymous streaming is off on this server: the streaming page asks for a login too.
    anonymous.goto("/")
    expect(anonymous).to_have_url(f"{short_server.base_url}/accounts/login/?next=/")

    alice = open_page(browser, contexts, short_server, "alice")
    response = alice.goto("/dashboard/")
    assert response is not None and response.status == 403
    expect(alice.get_by_role("heading", name="Not allowed")).to_be_visible()
    expect(alice.get_by_role("link", name="Dashboard")).to_have_count(0)
    alice.goto("/admin/")
    expect(alice).to_have_url(f"{short_server.base_url}/admin/login/?next=/admin/")

    staff = open_page(browser, contexts, short_server, "staff")
    staff.get_by_role("link", name="Dashboard").click()
    expect(staff.get_by_role("heading", name="Live sessions")).to_be_visible()
    expect(staff.locator("#connection")).to_have_text("Live")
    # The stylesheet came from the server itself (nothing else is reachable here).
    assert staff.evaluate("getComputedStyle(document.body).backgroundColor") == "rgb(15, 19, 24)"
