"""Behind a TLS-terminating proxy, and who may open a socket: against real daphne servers.

The proxy is played by the test itself: it talks plain HTTP to daphne on
127.0.0.1 and adds what nginx would (``Host``, ``X-Forwarded-For``,
``X-Forwarded-Proto``). One server trusts 127.0.0.1 as its proxy; the other
trusts only a network the test is not in, so the same headers must be ignored.
"""

import asyncio
import json
import os
import secrets
import subprocess
import time
import uuid
from collections.abc import Iterator
from http.cookies import SimpleCookie
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from scope_site.proxies import behind_proxy, client_address, parse_networks
from tests.harness import HOST, PASSWORD, PYTHON, REPO_ROOT, ScopeServer, start_embedded

SITE = "scope.test"
SITE_ORIGIN = f"https://{SITE}"
# The README's "Production" settings.
PRODUCTION_ENV = {
    "SECRET_KEY": secrets.token_urlsafe(50),
    "DEBUG": "0",
    "ALLOWED_HOSTS": "scope.example.com",
    "SCOPE_HTTPS": "1",
    "SCOPE_TRUSTED_PROXIES": "127.0.0.1/32",
    "CSRF_TRUSTED_ORIGINS": "https://scope.example.com",
}
SCALED_ENV = {"REDIS_URL": "redis://127.0.0.1:6379/0", "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/scope"}


@pytest.fixture(scope="module")
def proxied(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScopeServer]:
    """HTTPS at a proxy on 127.0.0.1 (trusted), serving https://scope.test."""
    with start_embedded(
        tmp_path_factory.mktemp("proxied"),
        SCOPE_TRUSTED_PROXIES="127.0.0.1/32",
        SCOPE_HTTPS=True,
        CSRF_TRUSTED_ORIGINS=SITE_ORIGIN,
        ALLOWED_HOSTS=f"127.0.0.1,localhost,{SITE}",
        SCOPE_CONNECTIONS_PER_MINUTE=2,
    ) as server:
        yield server


@pytest.fixture(scope="module")
def direct(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScopeServer]:
    """The same settings, but its trusted proxies are elsewhere: 127.0.0.1 is a client like any other."""
    with start_embedded(
        tmp_path_factory.mktemp("direct"),
        SCOPE_TRUSTED_PROXIES="192.0.2.0/24",
        SCOPE_HTTPS=True,
        ALLOWED_HOSTS=f"127.0.0.1,localhost,{SITE}",
        SCOPE_CONNECTIONS_PER_MINUTE=2,
    ) as server:
        yield server


def forwarded(client: str) -> dict[str, str]:
    """What the TLS proxy adds for a client at ``client``."""
    return {"X-Forwarded-Proto": "https", "X-Forwarded-For": client}


class ProxiedBrowser:
    """A browser at https://scope.test, reaching daphne through the proxy.

    It keeps its own cookies: they are ``Secure``, and httpx (rightly) never
    sends those over the plain HTTP that the proxy speaks to daphne.
    """

    def __init__(self, server: ScopeServer, address: str) -> None:
        self.http = httpx.Client(
            base_url=server.base_url, timeout=10.0, trust_env=False, headers={"Host": SITE, **forwarded(address)}
        )
        self.cookies: dict[str, str] = {}
        self.set_cookies: SimpleCookie = SimpleCookie()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if self.cookies:
            headers["Cookie"] = self.cookie_header()
        response = self.http.request(method, path, headers=headers, **kwargs)
        for line in response.headers.get_list("set-cookie"):
            self.set_cookies.load(line)
            self.cookies.update({name: morsel.value for name, morsel in SimpleCookie(line).items()})
        return response

    def cookie_header(self) -> str:
        return "; ".join(f"{name}={value}" for name, value in self.cookies.items())

    def log_in(self, username: str) -> httpx.Response:
        assert self.request("GET", "/accounts/login/").status_code == 200
        return self.request(
            "POST", "/accounts/login/",
            data={"username": username, "password": PASSWORD, "csrfmiddlewaretoken": self.cookies["csrftoken"]},
            headers={"Origin": SITE_ORIGIN},
        )

    def close(self) -> None:
        self.http.close()


@pytest.fixture
def browser(proxied: ScopeServer) -> Iterator[ProxiedBrowser]:
    browser = ProxiedBrowser(proxied, "198.51.100.20")
    yield browser
    browser.close()


async def open_socket(
    server: ScopeServer, *, host: str | None = None, origin: str | None = None, headers: dict[str, str] | None = None
) -> ClientConnection:
    """A signaling socket to ``server``, with ``host`` in its Host header (default: the server's own address)."""
    return await connect(
        f"ws://{host or f'{HOST}:{server.port}'}/ws/webrtc/",
        host=HOST, port=server.port,  # the TCP connection goes to daphne, whatever Host says
        origin=origin, additional_headers=headers or {}, proxy=None, open_timeout=10,
    )


async def handshake(server: ScopeServer, **kwargs: Any) -> int:
    """The handshake's status: 101 if the socket opened (it is closed again), else the refusal's."""
    try:
        ws = await open_socket(server, **kwargs)
    except InvalidStatus as refused:
        return refused.response.status_code
    await ws.close()
    return 101


async def first_message(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), 10))


async def closed_with(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(ws.recv(), 10)
    return ws.close_code


def wait_for_a_fresh_rate_window() -> None:
    """Connection limits count in one-minute windows: don't let one end mid-test."""
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)


# --- HTTP behind the proxy ---------------------------------------------------------------


def test_login_and_a_csrf_checked_delete_work_behind_the_tls_proxy(
    proxied: ScopeServer, browser: ProxiedBrowser
) -> None:
    login_page = browser.request("GET", "/accounts/login/")
    # Served, not redirected to https: the proxy's X-Forwarded-Proto was believed.
    assert login_page.status_code == 200
    assert login_page.headers["Strict-Transport-Security"].startswith("max-age=31536000")
    assert browser.set_cookies["csrftoken"]["secure"]

    logged_in = browser.log_in("bob")
    assert logged_in.status_code == 302, logged_in.text[:500]
    assert browser.set_cookies["sessionid"]["secure"]

    async def reserved_session() -> tuple[ClientConnection, str]:
        cookie = {**forwarded("198.51.100.20"), "Cookie": browser.cookie_header()}
        ws = await open_socket(proxied, host=SITE, origin=SITE_ORIGIN, headers=cookie)
        ready = await first_message(ws)
        assert ready["type"] == "ready", ready
        return ws, ready["sessionId"]

    async def scenario() -> None:
        ws, session_id = await reserved_session()
        path = f"/api/v1/webrtc/offer/{session_id}"
        without_token = await asyncio.to_thread(browser.request, "DELETE", path, headers={"Origin": SITE_ORIGIN})
        assert without_token.status_code == 403, without_token.text
        with_token = {"Origin": SITE_ORIGIN, "X-CSRFToken": browser.cookies["csrftoken"]}
        deleted = await asyncio.to_thread(browser.request, "DELETE", path, headers=with_token)
        assert deleted.status_code == 204, deleted.text
        ended = await first_message(ws)
        assert (ended["type"], ended["code"], ended["sessionId"]) == ("error", "SESSION_TERMINATED", session_id)
        await ws.close()

    asyncio.run(scenario())

    unknown = browser.request(
        "DELETE", f"/api/v1/webrtc/offer/{uuid.uuid4()}",
        headers={"Origin": SITE_ORIGIN, "X-CSRFToken": browser.cookies["csrftoken"]},
    )
    assert unknown.status_code == 404 and unknown.json()["code"] == "UNKNOWN_SESSION"


def test_probes_answer_plain_http_while_everything_else_redirects_to_https(proxied: ScopeServer) -> None:
    # No proxy headers: a load balancer's or an orchestrator's probe, straight to daphne.
    assert proxied.http.get("/healthz").status_code == 200
    assert proxied.http.get("/readyz").status_code == 200
    page = proxied.http.get("/accounts/login/", headers={"Host": SITE})
    assert (page.status_code, page.headers["Location"]) == (301, f"https://{SITE}/accounts/login/")


@pytest.mark.parametrize("shape", [{}, SCALED_ENV], ids=["embedded", "scaled"])
def test_check_deploy_is_clean_with_the_production_settings(shape: dict[str, str]) -> None:
    env = {key: value for key, value in os.environ.items() if key not in ("REDIS_URL", "DATABASE_URL")}
    result = subprocess.run(
        [PYTHON, "manage.py", "check", "--deploy"], cwd=REPO_ROOT, env={**env, **PRODUCTION_ENV, **shape},
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout, result.stdout + result.stderr
    assert "WARNING" not in result.stdout + result.stderr


def test_forwarded_headers_from_an_untrusted_peer_are_ignored_over_http(direct: ScopeServer) -> None:
    # 127.0.0.1 is not this server's proxy: its claim of https is not believed, so the SSL redirect applies.
    page = direct.http.get("/accounts/login/", headers={"Host": SITE, **forwarded("203.0.113.9")})
    assert (page.status_code, page.headers["Location"]) == (301, f"https://{SITE}/accounts/login/")


# --- who may open a socket ------------------------------------------------------------------


async def test_an_origin_must_match_scheme_host_and_port(proxied: ScopeServer, direct: ScopeServer) -> None:
    through_proxy = {"host": SITE, "headers": forwarded("198.51.100.30")}
    assert await handshake(proxied, origin=SITE_ORIGIN, **through_proxy) == 101
    assert await handshake(proxied, origin=f"{SITE_ORIGIN}:8443", **through_proxy) == 403
    assert await handshake(proxied, origin=f"http://{SITE}", **through_proxy) == 403
    assert await handshake(proxied, origin="https://evil.example", **through_proxy) == 403

    # Straight to daphne on its own port, no proxy involved.
    assert await handshake(direct, origin=direct.origin) == 101
    assert await handshake(direct, origin=f"http://{HOST}:9999") == 403
    assert await handshake(direct, origin=f"https://{HOST}:{direct.port}") == 403
    # A claim of https from a peer that is not a trusted proxy does not make the https origin ours.
    assert await handshake(direct, origin=f"https://{HOST}:{direct.port}", headers=forwarded("203.0.113.9")) == 403


async def test_a_token_client_without_origin_is_served(proxied: ScopeServer) -> None:
    """Scope's own Python client sends no Origin; it authenticates with a token."""
    ws = await open_socket(proxied, headers=proxied.auth_headers("alice"))
    try:
        assert (await first_message(ws))["type"] in ("ready", "queued")
    finally:
        await ws.close()


async def test_no_origin_and_no_token_is_refused(proxied: ScopeServer) -> None:
    assert await handshake(proxied) == 403
    assert await handshake(proxied, host=SITE, headers=forwarded("198.51.100.40")) == 403


async def test_a_cookie_client_needs_its_own_sites_origin(proxied: ScopeServer, browser: ProxiedBrowser) -> None:
    assert (await asyncio.to_thread(browser.log_in, "bob")).status_code == 302
    cookie = {**forwarded("198.51.100.20"), "Cookie": browser.cookie_header()}
    assert await handshake(proxied, host=SITE, origin="https://evil.example", headers=cookie) == 403
    # A cookie alone is no credential for a client that shows no Origin.
    assert await handshake(proxied, host=SITE, headers=cookie) == 403
    assert await handshake(proxied, host=SITE, origin=SITE_ORIGIN, headers=cookie) == 101


# --- rate limits key on the real client ---------------------------------------------------


async def rate_limited_after(server: ScopeServer, clients: list[str], **kwargs: Any) -> list[str]:
    """Open one anonymous socket per forwarded client address, in turn; what each was told first."""
    told = []
    for client in clients:
        ws = await open_socket(server, headers=forwarded(client), **kwargs)
        message = await first_message(ws)
        told.append(message.get("code") or message["type"])
        if message.get("code") == "RATE_LIMITED":
            assert await closed_with(ws) == 4029
        await ws.close()
    return told


async def test_forwarded_clients_are_rate_limited_apart(proxied: ScopeServer) -> None:
    await asyncio.to_thread(wait_for_a_fresh_rate_window)
    told = await rate_limited_after(
        proxied, ["203.0.113.1", "203.0.113.1", "203.0.113.1", "203.0.113.2"], host=SITE, origin=SITE_ORIGIN
    )
    assert told == ["ready", "ready", "RATE_LIMITED", "ready"]


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(direct: ScopeServer) -> None:
    await asyncio.to_thread(wait_for_a_fresh_rate_window)
    # Three fresh addresses, had they been believed; all are 127.0.0.1 to this server (which
    # other tests' sockets may have used already this minute, so the limit may come sooner).
    told = await rate_limited_after(direct, ["203.0.113.1", "203.0.113.2", "203.0.113.3"], origin=direct.origin)
    assert "RATE_LIMITED" in told


# --- the parsing itself --------------------------------------------------------------------

PROXIES = parse_networks(["127.0.0.1/32", "10.0.0.0/8"])


@pytest.mark.parametrize(
    ("forwarded_for", "client"),
    [
        ("203.0.113.1", "203.0.113.1"),
        ("203.0.113.1, 10.1.2.3", "203.0.113.1"),  # through two proxies of ours
        ("198.51.100.66, 203.0.113.1", "203.0.113.1"),  # the client's own claim, left of it, is not believed
        ("10.9.9.9, 10.1.2.3", "10.9.9.9"),  # every hop ours: the first
        ("not-an-address", None),
    ],
)
def test_the_client_is_the_rightmost_hop_that_is_not_a_trusted_proxy(forwarded_for: str, client: str | None) -> None:
    assert client_address("127.0.0.1", forwarded_for, PROXIES) == client


def test_a_dual_stack_listeners_mapped_peer_is_recognized() -> None:
    scope = {"type": "http", "scheme": "http", "client": ["::ffff:127.0.0.1", 5000],
             "headers": [(b"x-forwarded-for", b"203.0.113.1"), (b"x-forwarded-proto", b"https")]}
    assert behind_proxy(scope, PROXIES) | {"headers": []} == {
        "type": "http", "scheme": "https", "client": ["203.0.113.1", 0], "headers": []
    }
