"""TURN with short-lived credentials (coturn's use-auth-secret), against a real coturn on 127.0.0.1.

Needs Debian's coturn (``apt-get install -y coturn``) for ``turnserver``: each
module run starts one of its own, listening and relaying on 127.0.0.1 only, on
a free port, and stops it afterwards.
"""

from __future__ import annotations

import asyncio
import re
import runpy
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import aioice
import pytest
from aioice import stun, turn
from django.contrib.auth.models import AnonymousUser
from django.core.exceptions import ImproperlyConfigured

from media_pipeline.ice import enforce_ice_addresses
from sessions_app.turn import ice_servers_for, turn_credentials
from tests.harness import HOST, REPO_ROOT, ScopeServer, start_embedded, wait_until
from tests.peer import ScopeClient

SECRET = "scope-turn-test-secret"
REALM = "scope.test"
INSTALL = "apt-get install -y coturn"
SENT = (200, 60, 20)
INVERTED = tuple(255 - c for c in SENT)
# A relay-only client whose TURN server refuses it has no ICE candidate at all. aioice then drops the component on
# both sides and never starts checks, so neither peer ever reports "failed": the server's idle timeout (no video
# arrived) ends the session, and that is the bound, kept short for the test's server.
IDLE_TIMEOUT_SECONDS = 4
FAIL_BOUND_SECONDS = IDLE_TIMEOUT_SECONDS + 4


def candidate_lines(sdp: str) -> list[str]:
    return [line for line in sdp.splitlines() if line.startswith("a=candidate:")]


def close_to(color, expected, tolerance: float = 12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(color, expected))


# --- credentials -------------------------------------------------------------


def test_credentials_match_a_known_vector() -> None:
    # printf '%s' '1700000600:alice' | openssl dgst -sha1 -hmac 'scope-turn-secret' -binary | base64
    assert turn_credentials("scope-turn-secret", "alice", 600, now=1_700_000_000) == (
        "1700000600:alice",
        "knc4IDZ1Xp4TglZSFhnFAXbZNmc=",
    )
    # The expiry is whole seconds: a fractional clock or TTL is truncated, never rounded up.
    assert turn_credentials("scope-turn-secret", "anonymous", 600.9, now=1_700_000_000.7) == (
        "1700000600:anonymous",
        "keAFlOO4biikGI3ECxy8djfJP3E=",
    )


def test_ice_servers_combine_static_servers_and_turn(settings) -> None:
    static = {"urls": ["stun:stun.example.org:3478"]}
    settings.SCOPE_ICE_SERVERS = [static]
    settings.SCOPE_TURN_URLS = ["turn:turn.example.org:3478?transport=udp", "turn:turn.example.org:3478?transport=tcp"]
    settings.SCOPE_TURN_SECRET = "scope-turn-secret"
    settings.SCOPE_TURN_TTL_SECONDS = 600
    alice = SimpleNamespace(is_authenticated=True, get_username=lambda: "alice")

    servers = ice_servers_for(alice, now=1_700_000_000)
    assert servers == [
        {
            "urls": ["turn:turn.example.org:3478?transport=udp", "turn:turn.example.org:3478?transport=tcp"],
            "username": "1700000600:alice",
            "credential": "knc4IDZ1Xp4TglZSFhnFAXbZNmc=",
        },
        static,
    ]
    assert ice_servers_for(AnonymousUser(), now=1_700_000_000)[0]["username"] == "1700000600:anonymous"
    assert ice_servers_for(None, now=1_700_000_000)[0]["username"] == "1700000600:anonymous"
    assert ice_servers_for(alice, label="worker", now=1_700_000_000)[0]["username"] == "1700000600:worker"
    # Fresh each call, counted from now.
    expiry = int(ice_servers_for(alice)[0]["username"].split(":")[0])
    assert abs(expiry - (time.time() + 600)) <= 2
    # A caller that changes its list changes nothing for the next one.
    ice_servers_for(alice)[1]["urls"].append("stun:elsewhere")
    assert settings.SCOPE_ICE_SERVERS == [{"urls": ["stun:stun.example.org:3478"]}]

    settings.SCOPE_TURN_URLS = []
    settings.SCOPE_TURN_SECRET = ""
    assert ice_servers_for(alice) == [static]


@pytest.mark.django_db
def test_rest_route_hands_out_credentials_for_the_caller(settings, alice) -> None:
    from rest_framework.test import APIClient

    settings.SCOPE_ICE_SERVERS = []
    settings.SCOPE_TURN_URLS = ["turn:127.0.0.1:3478?transport=udp"]
    settings.SCOPE_TURN_SECRET = "scope-turn-secret"
    settings.SCOPE_ALLOW_ANONYMOUS = True

    client = APIClient()
    [anonymous] = client.get("/api/v1/webrtc/ice-servers").json()["iceServers"]
    assert re.fullmatch(r"\d+:anonymous", anonymous["username"])
    client.force_authenticate(alice)
    [mine] = client.get("/api/v1/webrtc/ice-servers").json()["iceServers"]
    expiry, label = mine["username"].split(":")
    assert label == "alice" and mine["urls"] == ["turn:127.0.0.1:3478?transport=udp"]
    assert mine["credential"] == turn_credentials("scope-turn-secret", "alice", 0, now=int(expiry))[1]


SETTINGS_FILE = REPO_ROOT / "scope_site" / "settings.py"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SCOPE_TURN_URLS": "turn:127.0.0.1:3478"}, "go together"),
        ({"SCOPE_TURN_SECRET": "s"}, "go together"),
        ({"SCOPE_TURN_URLS": "stun:127.0.0.1:3478", "SCOPE_TURN_SECRET": "s"}, "not a turn: or turns: URL"),
        ({"SCOPE_TURN_URLS": "turn:127.0.0.1:3478?transport=sctp", "SCOPE_TURN_SECRET": "s"}, "not a turn"),
        ({"SCOPE_TURN_URLS": "turn:h:3478", "SCOPE_TURN_SECRET": "s", "SCOPE_TURN_TTL_SECONDS": "0"}, "at least 1"),
    ],
)
def test_settings_refuse_half_or_malformed_turn_configuration(monkeypatch, env, message) -> None:
    for name in ("SCOPE_TURN_URLS", "SCOPE_TURN_SECRET", "SCOPE_TURN_TTL_SECONDS", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ImproperlyConfigured, match=message):
        runpy.run_path(str(SETTINGS_FILE))


def test_settings_read_turn_configuration(monkeypatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("SCOPE_TURN_URLS", "turn:127.0.0.1:3478?transport=udp, turns:turn.example.org:5349?transport=tcp")
    monkeypatch.setenv("SCOPE_TURN_SECRET", "s")
    monkeypatch.delenv("SCOPE_TURN_TTL_SECONDS", raising=False)
    loaded = runpy.run_path(str(SETTINGS_FILE))
    assert loaded["SCOPE_TURN_URLS"] == ["turn:127.0.0.1:3478?transport=udp", "turns:turn.example.org:5349?transport=tcp"]
    assert loaded["SCOPE_TURN_TTL_SECONDS"] == 600


# --- SCOPE_ICE_ENFORCE_LIST and relay candidates ---------------------------------


@pytest.fixture
def relay_listed():
    """The enforce list of a worker whose clients relay through a TURN server at 192.0.2.50 (not on this host)."""
    enforce_ice_addresses([HOST, "192.0.2.50"])
    yield
    enforce_ice_addresses([])


def relay_candidate(foundation: str, host: str, port: int) -> aioice.Candidate:
    return aioice.Candidate(foundation, 1, "udp", 100, host, port, "relay", related_address="0.0.0.0", related_port=9)


async def test_enforce_list_admits_listed_relay_addresses_only(relay_listed) -> None:
    """A remote relay candidate is judged by its address, like any other; listing a relay address binds nothing."""
    connection = aioice.Connection(ice_controlling=True)
    try:
        await connection.gather_candidates()  # no connect(): nothing is sent anywhere
        hosts = {candidate.host for candidate in connection.local_candidates}
        if Path("/proc/sys/net/ipv4/ip_nonlocal_bind").read_text().strip() == "0":
            assert hosts == {HOST}  # 192.0.2.50 is not this host's: aioice cannot bind it and skips it
        for n, host in enumerate([HOST, "192.0.2.50", "198.51.100.7"]):
            await connection.add_remote_candidate(relay_candidate(str(n), host, 50000 + n))
        assert [candidate.host for candidate in connection.remote_candidates] == [HOST, "192.0.2.50"]
    finally:
        await connection.close()


# --- a real coturn -------------------------------------------------------------


@dataclass
class Coturn:
    port: int
    log_path: Path

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    @property
    def url(self) -> str:
        return f"turn:{HOST}:{self.port}?transport=udp"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _answers_stun(port: int) -> bool:
    request = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.REQUEST)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(0.2)
        try:
            sock.sendto(bytes(request), (HOST, port))
            data, _ = sock.recvfrom(2048)
        except OSError:
            return False
    return stun.parse_message(data).transaction_id == request.transaction_id


@contextmanager
def running_coturn(directory: Path, secret: str = SECRET) -> Iterator[Coturn]:
    """``turnserver`` with use-auth-secret, listening and relaying on 127.0.0.1 only (UDP), until exit."""
    binary = shutil.which("turnserver")
    if binary is None:
        pytest.fail(f"turnserver is not installed; these tests need Debian's coturn: {INSTALL}", pytrace=False)
    directory.mkdir(parents=True, exist_ok=True)
    coturn = Coturn(port=free_udp_port(), log_path=directory / "turnserver.log")
    argv = [
        binary,
        "-n",  # no configuration file (not /etc/turnserver.conf): everything is here
        "--verbose",  # logs each allocation with its username, which the tests read
        f"--listening-ip={HOST}",
        f"--relay-ip={HOST}",
        f"--listening-port={coturn.port}",
        "--no-tcp", "--no-tls", "--no-dtls", "--no-tcp-relay",
        "--use-auth-secret", f"--static-auth-secret={secret}", f"--realm={REALM}",
        "--allow-loopback-peers",  # the peers (server, clients) are all on 127.0.0.1
        "--no-multicast-peers",
        "--no-cli", "--no-rfc5780",
        f"--log-file={coturn.log_path}", "--simple-log", "--no-stdout-log",
        f"--pidfile={directory / 'turnserver.pid'}",
        f"--db={directory / 'turndb'}",
    ]
    with open(directory / "turnserver.stdout", "ab") as output:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT)
    try:
        def ready() -> bool:
            if process.poll() is not None:
                log = coturn.log_path.read_text(errors="replace") if coturn.log_path.exists() else ""
                raise AssertionError(f"turnserver exited {process.returncode} at start; its log:\n{log[-5000:]}")
            return _answers_stun(coturn.port)

        wait_until(ready, 10, interval=0.1, what=f"turnserver to answer STUN on {HOST}:{coturn.port}")
        yield coturn
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def coturn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Coturn]:
    with running_coturn(tmp_path_factory.mktemp("coturn")) as server:
        yield server


@pytest.fixture(scope="module")
def turn_server(tmp_path_factory: pytest.TempPathFactory, coturn: Coturn) -> Iterator[ScopeServer]:
    """An embedded server that hands out credentials for ``coturn`` and whose worker uses it too."""
    with start_embedded(
        tmp_path_factory.mktemp("embedded"),
        SCOPE_TURN_URLS=coturn.url,
        SCOPE_TURN_SECRET=SECRET,
        SCOPE_IDLE_TIMEOUT_SECONDS=IDLE_TIMEOUT_SECONDS,
    ) as server:
        yield server


class _Received(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.datagrams: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.datagrams.put_nowait((data, addr))


class _Echo(_Received):
    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(data, addr)


async def _allocate(coturn: Coturn, username: str, password: str) -> tuple[turn.TurnTransport, _Received]:
    return await asyncio.wait_for(
        turn.create_turn_endpoint(_Received, server_addr=coturn.address, username=username, password=password), 5
    )


async def test_coturn_allocates_for_fresh_credentials_only(coturn: Coturn) -> None:
    transport, _ = await _allocate(coturn, *turn_credentials(SECRET, "probe", 60))
    try:
        assert transport.get_extra_info("sockname")[0] == HOST
    finally:
        transport.close()

    for username, password in [
        turn_credentials("not-the-secret", "probe", 60),
        turn_credentials(SECRET, "probe", 60, now=time.time() - 120),  # expired a minute ago
        (turn_credentials(SECRET, "probe", 60)[0].replace("probe", "someone-else"), turn_credentials(SECRET, "probe", 60)[1]),
    ]:
        with pytest.raises(stun.TransactionFailed) as refused:
            await _allocate(coturn, username, password)
        assert refused.value.response.attributes["ERROR-CODE"][0] == 401, username


async def test_a_relay_outlives_its_credential(coturn: Coturn) -> None:
    """coturn checks the expiry when allocating only: a session's relay is not cut at the TTL."""
    loop = asyncio.get_running_loop()
    peer_transport, _ = await loop.create_datagram_endpoint(_Echo, local_addr=(HOST, 0))
    credentials = turn_credentials(SECRET, "probe", 2)
    transport, received = await _allocate(coturn, *credentials)
    try:
        await asyncio.sleep(3)  # the credential has expired
        # New permission and channel (authenticated requests, with the expired credential), then data both ways.
        transport.sendto(b"still relayed", peer_transport.get_extra_info("sockname"))
        data, _ = await asyncio.wait_for(received.datagrams.get(), 5)
        assert data == b"still relayed"
        with pytest.raises(stun.TransactionFailed):
            await _allocate(coturn, *credentials)  # but no new allocation
    finally:
        transport.close()
        peer_transport.close()


# --- a relay-only aiortc client through coturn to a real server ----------------------------


async def test_relay_only_client_streams_through_coturn(turn_server: ScopeServer, coturn: Coturn) -> None:
    async with ScopeClient() as client:
        await client.connect(turn_server, "alice")
        await client.expect("ready", timeout=15)
        servers = await client.get_ice_servers()
        assert [server["urls"] for server in servers] == [[coturn.url]]
        assert re.fullmatch(r"\d+:alice", servers[0]["username"])

        peer = await client.start_session(pipeline="invert", color=SENT, ice_servers=servers, relay_only=True)
        offered = candidate_lines(peer.pc.localDescription.sdp)
        assert offered and all(" typ relay " in line for line in offered), offered
        # The worker has a relay of its own, allocated with its own credentials.
        answered = candidate_lines(peer.pc.remoteDescription.sdp)
        assert any(" typ relay " in line for line in answered), answered

        await peer.wait_connected()
        frames = await peer.wait_frames(15)
        local, remote = peer.selected_pair
        assert (local.type, local.host) == ("relay", HOST), (local, remote)
        assert remote.host == HOST
        assert close_to(frames[-1][1], INVERTED), f"expected inverted {INVERTED}, got {frames[-1][1]}"
        await turn_server.wait_until_async(
            lambda: turn_server.session(peer.session_id)["state"] == "live", 5, what="the session to be live"
        )

    log = coturn.log_text()
    assert re.search(r"user <\d+:alice>: incoming packet ALLOCATE processed, success", log), log[-5000:]
    assert re.search(r"user <\d+:worker>: incoming packet ALLOCATE processed, success", log), log[-5000:]
    # The session's end gives the worker's relay back (a REFRESH to lifetime 0), not left to expire.
    await asyncio.to_thread(
        wait_until,
        lambda: re.search(r"username=<\d+:worker>, lifetime=0", coturn.log_text()),
        5, what="the worker to delete its TURN allocation",
    )


async def test_relay_only_client_with_a_wrong_secret_cannot_connect(turn_server: ScopeServer, coturn: Coturn) -> None:
    username, credential = turn_credentials("not-the-secret", "mallory", 600)
    servers = [{"urls": [coturn.url], "username": username, "credential": credential}]
    async with ScopeClient() as client:
        await client.connect(turn_server, "alice")
        await client.expect("ready", timeout=15)
        started = time.monotonic()
        peer = await client.start_session(pipeline="invert", ice_servers=servers, relay_only=True)
        assert candidate_lines(peer.pc.localDescription.sdp) == []  # coturn refused the allocation
        ended = await client.expect("error", FAIL_BOUND_SECONDS, sessionId=peer.session_id)
        ended_after = time.monotonic() - started
        # IDLE_TIMEOUT as things are (see above); PEER_FAILED should ICE ever report the failure itself.
        assert ended["code"] in ("IDLE_TIMEOUT", "PEER_FAILED"), ended
        assert "connected" not in peer.connection_states, peer.connection_states
        assert peer.selected_pair is None
        assert not peer.frames
        record = await asyncio.to_thread(turn_server.closed_session, peer.session_id)
    assert ended_after < FAIL_BOUND_SECONDS
    assert record["close_reason"] == ended["code"] and record["frames_in"] == 0
    assert re.search(r"user <\d+:mallory>: incoming packet message processed, error 401", coturn.log_text())
