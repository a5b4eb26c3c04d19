"""Failed logins are throttled per username and per client address, behind a trusted proxy.

Against a real daphne that trusts 127.0.0.1 as its proxy: each test's browser
is a different client address (``X-Forwarded-For``), as the server sees it.
"""

from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.harness import PASSWORD, ScopeServer, start_embedded

PER_ADDRESS = 8  # lowered from 20, so the test needs fewer slow password checks
LOGIN = "/accounts/login/"
ADMIN_LOGIN = "/admin/login/"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScopeServer]:
    with start_embedded(
        tmp_path_factory.mktemp("login"),
        SCOPE_TRUSTED_PROXIES="127.0.0.1/32",
        SCOPE_LOGIN_FAILURES_PER_ADDRESS=PER_ADDRESS,
    ) as server:
        yield server


@pytest.fixture
def browser_at(server: ScopeServer) -> Iterator[Callable[[str], httpx.Client]]:
    """``browser_at("203.0.113.5")``: a browser whose requests reach the server from that address."""
    browsers: list[httpx.Client] = []

    def make(address: str) -> httpx.Client:
        browsers.append(
            httpx.Client(base_url=server.base_url, timeout=30.0, trust_env=False, headers={"X-Forwarded-For": address})
        )
        return browsers[-1]

    yield make
    for browser in browsers:
        browser.close()


def log_in(browser: httpx.Client, username: str, password: str, path: str = LOGIN) -> httpx.Response:
    browser.get(path)  # the form's CSRF cookie
    form = {"username": username, "password": password, "csrfmiddlewaretoken": browser.cookies["csrftoken"]}
    return browser.post(path, data=form)


def assert_refused(response: httpx.Response) -> None:
    """The login page again, saying so: a wrong password, not a throttle."""
    assert response.status_code == 200
    assert "don't match" in response.text or "correct username and password" in response.text


def assert_throttled(response: httpx.Response) -> None:
    assert response.status_code == 429
    assert "Too many attempts" in response.text
    assert int(response.headers["Retry-After"]) > 0


def test_failed_logins_for_one_username_are_throttled(browser_at) -> None:
    guesser = browser_at("203.0.113.10")
    for _ in range(5):
        assert_refused(log_in(guesser, "alice", "wrong"))
    # Now even the right password is not checked, from any address, on either login form.
    assert_throttled(log_in(guesser, "alice", PASSWORD))
    assert_throttled(log_in(browser_at("203.0.113.11"), "alice", PASSWORD))
    assert_throttled(log_in(browser_at("203.0.113.12"), "alice", PASSWORD, ADMIN_LOGIN))
    # Other accounts are unaffected, even from the guesser's address (under its own limit).
    assert log_in(guesser, "bob", PASSWORD).status_code == 302


def test_a_successful_login_clears_its_usernames_failures(browser_at) -> None:
    browser = browser_at("203.0.113.20")
    for _ in range(4):
        assert_refused(log_in(browser, "staff", "wrong"))
    assert log_in(browser, "staff", PASSWORD, ADMIN_LOGIN).status_code == 302
    browser.cookies.clear()  # logged out
    for _ in range(4):  # counted from zero again: the old four would have throttled the second of these
        assert_refused(log_in(browser, "staff", "wrong"))


def test_failed_logins_from_one_address_are_throttled(browser_at) -> None:
    guesser = browser_at("203.0.113.30")
    for attempt in range(PER_ADDRESS):
        assert_refused(log_in(guesser, f"nobody-{attempt}", "wrong"))
    assert_throttled(log_in(guesser, "bob", PASSWORD))
    # Another client behind the same proxy is another address.
    assert log_in(browser_at("203.0.113.31"), "bob", PASSWORD).status_code == 302
