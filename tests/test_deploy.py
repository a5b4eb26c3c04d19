"""The scaled shape as an operator runs it: ``honcho start`` with the repository's Procfile, behind nginx with
the site in deploy/nginx/scope.conf terminating TLS, and the systemd units' stop bounds.

It needs Debian's ``nginx`` package (``/usr/sbin/nginx``), besides what every scaled test needs
(``redis-server``, PostgreSQL on 127.0.0.1:5432) and honcho from requirements.txt. A missing one fails the
test, naming it. The certificate is made here (``cryptography``, which aiortc already requires).
"""

from __future__ import annotations

import asyncio
import configparser
import ipaddress
import os
import re
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from media_pipeline.management.commands.mediaworker import SHUTDOWN_TIMEOUT_SECONDS
from scope_site.process import DRAIN_TIMEOUT_SECONDS
from tests.harness import (
    HOST,
    READY_TIMEOUT,
    REPO_ROOT,
    ScopeServer,
    _failure_points_at_logs,
    _fresh_postgres_database,
    _manage,
    _new_logs_dir,
    _prepare_database,
    _private_redis,
    _running,
    free_port,
    wait_until,
)
from tests.peer import ScopeClient
from tests.test_lifecycle import FULL_TRAIL, live_peer

DEPLOY = REPO_ROOT / "deploy"
HONCHO = Path(sys.executable).parent / "honcho"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
# Marks every process honcho starts (through the env file), so the test can tell none outlived it.
MARKER_NAME = "SCOPE_DEPLOY_TEST_RUN"
# SIGTERM to honcho → every process gone. The drains are bounded at 5 s (web) and 10 s (worker);
# honcho itself SIGKILLs what is left 5 s after the first process exits.
STOP_BOUND = 12.0


def require_tools() -> None:
    """Fail, naming what is missing, rather than skip: this test is the only check of deploy/ and the Procfile."""
    missing = []
    if not Path(NGINX).exists():
        missing.append("nginx: install Debian's `nginx` package (apt-get install -y nginx)")
    if not shutil.which("redis-server"):
        missing.append("redis-server: install Debian's `redis-server` package")
    if not HONCHO.exists():
        missing.append(f"honcho ({HONCHO}): install requirements.txt into this venv")
    if not (REPO_ROOT / ".venv" / "bin" / "daphne").exists():
        missing.append("the Procfile runs .venv/bin/…: the venv must be .venv at the repository root")
    if missing:
        pytest.fail("tests/test_deploy.py needs:\n  " + "\n  ".join(missing), pytrace=False)


# --- TLS and nginx -----------------------------------------------------------------------


def self_signed_certificate(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files; clients trust it as their only CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(HOST))]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "scope.crt", directory / "scope.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    key_path.chmod(0o600)
    return cert_path, key_path


@dataclass(frozen=True)
class Ports:
    tls: int
    http: int
    web: int


def nginx_site(directory: Path, ports: Ports, cert: Path, key: Path) -> str:
    """deploy/nginx/scope.conf with only its addresses, ports and paths changed for this test."""
    site = (DEPLOY / "nginx" / "scope.conf").read_text()
    for old, new in [
        ("listen 443 ssl;", f"listen {HOST}:{ports.tls} ssl;"),
        ("listen [::]:443 ssl;", ""),
        ("listen 80;", f"listen {HOST}:{ports.http};"),
        ("listen [::]:80;", ""),
        ("server 127.0.0.1:8000;", f"server {HOST}:{ports.web};"),
        ("/etc/letsencrypt/live/scope.example.com/fullchain.pem", str(cert)),
        ("/etc/letsencrypt/live/scope.example.com/privkey.pem", str(key)),
        ("/var/www/letsencrypt", str(directory / "acme")),
    ]:
        assert old in site, f"deploy/nginx/scope.conf has no {old!r} any more: update {__file__}"
        site = site.replace(old, new)
    return site


def nginx_main_conf(directory: Path, logs_dir: Path, site: str) -> Path:
    """A whole nginx.conf around the site: nginx writes only in ``directory``, and its logs beside the server's."""
    (directory / "site.conf").write_text(site)
    temp_paths = "\n".join(
        f"    {kind}_temp_path {directory / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    # As root, nginx's workers would run as nobody, who cannot enter the test's private directory.
    user = "user root;" if os.geteuid() == 0 else ""
    conf = directory / "nginx.conf"
    conf.write_text(f"""
{user}
worker_processes 1;
pid {directory / "nginx.pid"};
error_log {logs_dir / "nginx-error.log"} info;
events {{ worker_connections 256; }}
http {{
    access_log {logs_dir / "nginx-access.log"};
{temp_paths}
    include {directory / "site.conf"};
}}
""")
    return conf


@contextmanager
def running_nginx(directory: Path, logs_dir: Path, ports: Ports, cert: Path, key: Path) -> Iterator[None]:
    directory.mkdir()
    conf = nginx_main_conf(directory, logs_dir, nginx_site(directory, ports, cert, key))
    argv = [NGINX, "-p", f"{directory}/", "-e", str(logs_dir / "nginx-error.log"), "-c", str(conf)]
    checked = subprocess.run([*argv, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, f"nginx -t refused the generated configuration:\n{checked.stderr}\n{conf.read_text()}"
    with open(logs_dir / "nginx.log", "ab") as log:
        nginx = subprocess.Popen([*argv, "-g", "daemon off;"], stdin=subprocess.DEVNULL, stdout=log,
                                 stderr=subprocess.STDOUT)
    with _running([nginx]):
        yield


@dataclass
class BehindNginx(ScopeServer):
    """The server as clients reach it: https:// and wss:// on nginx's port, trusting the test's certificate."""

    ssl_context: ssl.SSLContext = field(default_factory=ssl.create_default_context)

    def __post_init__(self) -> None:
        self.http = httpx.Client(base_url=self.base_url, timeout=10.0, trust_env=False, verify=self.ssl_context)

    @property
    def base_url(self) -> str:
        return f"https://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"wss://{HOST}:{self.port}/ws/webrtc/"


# --- honcho --------------------------------------------------------------------------------


def env_file_text(settings: dict[str, str]) -> str:
    """An env file as deploy/env.example describes it: KEY=value, single quotes around anything unusual."""
    return "".join(
        f"{key}='{value}'\n" if re.search(r"[^A-Za-z0-9_./:,@-]", value) or not value else f"{key}={value}\n"
        for key, value in settings.items()
    )


def marked_processes(marker: str) -> list[int]:
    """Every process whose environment carries this run's marker: whatever honcho started, and their children."""
    needle = f"{MARKER_NAME}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_leftovers(marker: str) -> None:
    for pid in marked_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@contextmanager
def running_honcho(env_file: Path, logs_dir: Path, marker: str) -> Iterator[subprocess.Popen[bytes]]:
    """``honcho start`` in the repository root, as an operator types it, with this test's env file."""
    environment = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL", "PORT")}
    with open(logs_dir / "honcho.log", "ab") as log:
        honcho = subprocess.Popen(
            [str(HONCHO), "start", "--no-colour", "-e", str(env_file)],
            cwd=REPO_ROOT, env=environment, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        yield honcho
    finally:
        if honcho.poll() is None:
            honcho.send_signal(signal.SIGTERM)
            try:
                honcho.wait(15)
            except subprocess.TimeoutExpired:
                honcho.kill()
                honcho.wait()
        kill_leftovers(marker)  # a honcho that died hard leaves its children running


def honcho_alive(honcho: subprocess.Popen[bytes], logs_dir: Path) -> None:
    if honcho.poll() is not None:
        raise AssertionError(f"honcho exited {honcho.returncode} during start-up; see {logs_dir}/honcho.log")


# --- the database, read behind the (stopped) server's back --------------------------------


def records(database_url: str) -> tuple[dict[str, tuple[str, str]], dict[str, list[str]], dict[int, str]]:
    """Sessions (id → state, close reason), their trails (id → event kinds) and workers (id → state)."""
    with psycopg.connect(database_url) as connection:
        sessions = {
            str(row[0]): (row[1], row[2])
            for row in connection.execute("SELECT id, state, close_reason FROM sessions_app_streamsession")
        }
        trails: dict[str, list[str]] = {}
        for session_id, kind in connection.execute(
            "SELECT session_id, kind FROM sessions_app_sessionevent ORDER BY at, id"
        ):
            trails.setdefault(str(session_id), []).append(kind)
        workers = dict(connection.execute("SELECT id, state FROM sessions_app_worker").fetchall())
    return sessions, trails, workers


def table(stdout: str) -> list[list[str]]:
    return [line.split() for line in stdout.splitlines()]


# --- the tests -----------------------------------------------------------------------------


async def test_honcho_behind_nginx_streams_and_drains_on_sigterm(tmp_path: Path) -> None:
    require_tools()
    logs_dir = _new_logs_dir(tmp_path)
    ports = Ports(tls=free_port(), http=free_port(), web=free_port())
    marker = uuid.uuid4().hex
    cert, key = self_signed_certificate(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))

    with _failure_points_at_logs(logs_dir), ExitStack() as stack:
        redis_url, _ = stack.enter_context(_private_redis(tmp_path, logs_dir))
        database_url = stack.enter_context(_fresh_postgres_database())
        settings = {
            "PORT": str(ports.web),
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "SECRET_KEY": secrets.token_urlsafe(40) + "#$ x",  # quoted in the file: all of it must arrive
            "DEBUG": "0",
            "ALLOWED_HOSTS": f"{HOST},localhost",
            "SCOPE_HTTPS": "1",
            "SCOPE_TRUSTED_PROXIES": f"{HOST}/32",
            "CSRF_TRUSTED_ORIGINS": f"https://{HOST}:{ports.tls}",
            "SCOPE_ICE_ENFORCE_LIST": HOST,
            "SCOPE_SESSION_FILES_DIR": str(tmp_path / "sessions"),
            "CELERY_BEAT_SCHEDULE": str(tmp_path / "celerybeat-schedule"),
            "CELERY_CONCURRENCY": "1",
            "PYTHONUNBUFFERED": "1",
            "LOG_LEVEL": "INFO",
            MARKER_NAME: marker,
        }
        env_file = tmp_path / "scope.env"
        env_file.write_text(env_file_text(settings))
        # The operator's steps before `honcho start`: migrate (and, here, users with tokens).
        manage_env = {**{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}, **settings}
        tokens = _prepare_database(manage_env, logs_dir)
        stack.enter_context(running_nginx(tmp_path / "nginx", logs_dir, ports, cert, key))
        honcho = stack.enter_context(running_honcho(env_file, logs_dir, marker))
        server = BehindNginx(port=ports.tls, logs_dir=logs_dir, env=manage_env, tokens=tokens, ssl_context=trust)
        stack.callback(server.http.close)

        def ready() -> bool:
            honcho_alive(honcho, logs_dir)
            try:
                return server.http.get("/readyz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, READY_TIMEOUT, interval=0.2, what="/readyz through nginx")
        wait_until(lambda: [w["state"] for w in server.workers()] == ["active", "active"], READY_TIMEOUT,
                   interval=0.2, what="both media workers of the Procfile active")
        started = marked_processes(marker)
        assert len(started) >= 4, f"expected web, two workers and Celery, found pids {started}"
        # The env file's quoting carried the whole secret, '#' and space included.
        environ = Path(f"/proc/{started[0]}/environ").read_bytes().split(b"\0")
        assert f"SECRET_KEY={settings['SECRET_KEY']}".encode() in environ

        # The proxy's headers are believed, and only from it: HTTPS through nginx, a redirect to it without.
        through_tls = server.api("GET", "/api/v1/pipelines/", user="alice")
        assert through_tls.status_code == 200, through_tls.text
        assert "max-age=31536000" in through_tls.headers["strict-transport-security"]
        with httpx.Client(trust_env=False, timeout=10) as plain:
            redirected = plain.get(f"http://{HOST}:{ports.http}/api/v1/pipelines/")
            assert (redirected.status_code, redirected.headers["location"]) == (
                301, f"https://{HOST}/api/v1/pipelines/"
            )
            direct = plain.get(f"http://{HOST}:{ports.web}/api/v1/pipelines/")
            assert direct.status_code == 301 and direct.headers["location"].startswith("https://")
            assert plain.get(f"http://{HOST}:{ports.web}/healthz").status_code == 200  # probes are not redirected

        async with ScopeClient() as alice, ScopeClient() as bob:
            peers = []
            for client, user, pipeline in ((alice, "alice", "invert"), (bob, "bob", "grayscale")):
                await client.connect(server, user, ssl_context=trust)
                await client.expect("ready", timeout=15)
                peers.append(await live_peer(client, server, pipeline=pipeline))
            session_ids = [peer.session_id for peer in peers]
            records_now = [await asyncio.to_thread(server.session, session_id) for session_id in session_ids]
            placed_on = {record["worker"] for record in records_now}
            assert len(placed_on) == 2, "both sessions on one worker: the Procfile's second worker took none"

            # The operators' commands see the same shape (PostgreSQL, the database's clock).
            workers = table(await asyncio.to_thread(_manage, ["workers"], manage_env, logs_dir, "manage-workers"))
            assert sorted(row[4:6] for row in workers[1:]) == [["active", "1/4"], ["active", "1/4"]]
            assert all(float(row[6].removesuffix("s")) < 10 for row in workers[1:]), workers
            listed = table(await asyncio.to_thread(_manage, ["sessions", "--state", "live"], manage_env, logs_dir,
                                                   "manage-sessions"))
            assert sorted(row[0] for row in listed[1:]) == sorted(session_ids)

            for peer in peers:
                before = len(peer.frames)
                await peer.wait_frames(before + 10)  # still flowing

            signalled_at = time.monotonic()
            honcho.send_signal(signal.SIGTERM)
            for client, peer in zip((alice, bob), peers):
                error = await client.expect("error", timeout=DRAIN_TIMEOUT_SECONDS, sessionId=peer.session_id)
                assert error["code"] == "SERVER_SHUTDOWN"
                assert await client.wait_closed(2) == 4012  # through nginx
                await peer.wait_server_closed(2)
            await asyncio.to_thread(honcho.wait, STOP_BOUND + 5)
            stopped_after = time.monotonic() - signalled_at

        assert stopped_after < STOP_BOUND, f"honcho took {stopped_after:.1f}s to stop"
        wait_until(lambda: not marked_processes(marker), 2, what="every process honcho started to be gone")
        honcho_log = (logs_dir / "honcho.log").read_text(errors="replace")
        assert "sending SIGKILL" not in honcho_log, "honcho had to kill a process that did not drain in time"

        # Every record says how it ended, straight from the database: no web process is left to ask.
        sessions, trails, workers_left = records(database_url)
        assert {session_id: sessions[session_id] for session_id in session_ids} == {
            session_id: ("closed", "SERVER_SHUTDOWN") for session_id in session_ids
        }
        for session_id in session_ids:
            assert trails[session_id] == FULL_TRAIL, (session_id, trails[session_id])
        assert {state for state, _ in sessions.values()} == {"closed"}, sessions
        assert set(workers_left.values()) == {"gone"}, workers_left


# --- systemd: the stop bounds match the drains ---------------------------------------------


def unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # keys are case-sensitive
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


@pytest.mark.parametrize(
    ("name", "drain", "command"),
    [
        ("scope-web.service", DRAIN_TIMEOUT_SECONDS, "daphne -b 127.0.0.1 -p ${PORT} scope_site.asgi:application"),
        ("scope-mediaworker@.service", SHUTDOWN_TIMEOUT_SECONDS, "python manage.py mediaworker"),
        ("scope-celery.service", 0.0, "celery -A scope_site worker -B"),
    ],
)
def test_systemd_units_stop_gracefully_within_their_drain(name: str, drain: float, command: str) -> None:
    service = unit(name)["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"  # SIGTERM to the main process; SIGKILL to all only at the timeout
    timeout = float(service["TimeoutStopSec"])
    assert drain < timeout <= drain + 30, f"{name}: TimeoutStopSec={timeout:g} for a {drain:g} s drain"
    assert command in service["ExecStart"]
    assert service["EnvironmentFile"] == "/srv/scope/.env"
    assert unit(name)["Install"]["WantedBy"] == "scope.target"
