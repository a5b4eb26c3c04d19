"""Real-process test servers: daphne, media workers, a private Redis, a fresh database.

Tests drive the server the way users and operators do — over HTTP, the
signaling WebSocket and WebRTC — so every process here is a real one, bound to
127.0.0.1 only, with its output in a log file that failing tests attach.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psycopg
import redis

T = TypeVar("T")

REPO_ROOT = Path(__file__).resolve().parent.parent
# The interpreter running the tests is the project's venv; its scripts sit beside it.
PYTHON = sys.executable
DAPHNE = str(Path(sys.executable).parent / "daphne")
CELERY = str(Path(sys.executable).parent / "celery")
HOST = "127.0.0.1"
# What tests leave for people to look at: screenshots, measured fault times.
ARTIFACTS = Path(os.environ.get("SCOPE_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))

USERS = ("staff", "alice", "bob")
# One password for every test user, so browser tests can log in through /admin/.
PASSWORD = "scope-test-password"

PG_USER = os.environ.get("SCOPE_TEST_PG_USER", "postgres")
PG_PORT = 5432

READY_TIMEOUT = 90.0  # importing torch alone takes seconds on a small machine
SETUP_TIMEOUT = 180.0
STOP_GRACE = 10.0
LOG_TAIL_CHARS = 20_000

_USERS_SCRIPT = f"""
import json
from django.contrib.auth import get_user_model
from rest_framework.authtoken.models import Token

User = get_user_model()
tokens = {{}}
for name in {USERS!r}:
    staff = name == "staff"
    user = User.objects.create_user(name, password={PASSWORD!r}, is_staff=staff, is_superuser=staff)
    tokens[name] = Token.objects.create(user=user).key
print(json.dumps(tokens))
"""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def wait_until(predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "") -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises AssertionError after ``timeout`` seconds, naming what was awaited and
    the last value seen, so a failing test says what never happened.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or predicate!r}; last value: {value!r}")
        time.sleep(interval)


async def wait_until_async(predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "") -> T:
    """``wait_until`` for async tests: the (blocking) predicate runs in a thread.

    A blocking HTTP call on the event loop would also freeze the test's own
    aiortc peer, so async tests poll the server through this.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = await asyncio.to_thread(predicate)
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what or predicate!r}; last value: {value!r}")
        await asyncio.sleep(interval)


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return str(value)


def server_env(tmp_path: Path, overrides: dict[str, Any]) -> dict[str, str]:
    """The environment every server process gets: loopback-only ICE, private files.

    REDIS_URL and DATABASE_URL from the outer environment are dropped, so a
    developer's own settings never point a test at a shared Redis or database.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "scope_site.settings",
            "PYTHONUNBUFFERED": "1",  # logs reach the file before a crash or kill
            "SCOPE_ICE_ENFORCE_LIST": HOST,
            "SCOPE_SESSION_FILES_DIR": str(tmp_path / "sessions"),
            "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "SECRET_KEY": "test",
            "LOG_LEVEL": "INFO",
        }
    )
    env.update({key: _env_value(value) for key, value in overrides.items()})
    return env


@dataclass
class ScopeServer:
    """A running server, as its clients see it."""

    port: int
    logs_dir: Path
    env: dict[str, str]
    tokens: dict[str, str] = field(default_factory=dict)
    web_process: subprocess.Popen[bytes] | None = None
    worker_processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # Scaled mode's private Redis, the one running now; every one started is stopped with the server.
    redis_process: subprocess.Popen[bytes] | None = None
    redis_processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # Scaled mode's Celery worker with beat (the safety-net sweep).
    celery_process: subprocess.Popen[bytes] | None = None
    # Every process started for this server (restarts included): all are stopped with it.
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    http: httpx.Client = field(init=False)

    def __post_init__(self) -> None:
        # trust_env=False: a proxy from the environment must never see loopback traffic.
        self.http = httpx.Client(base_url=self.base_url, timeout=10.0, trust_env=False)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}/ws/webrtc/"

    @property
    def origin(self) -> str:
        return self.base_url

    def auth_headers(self, user: str | None) -> dict[str, str]:
        return {} if user is None else {"Authorization": f"Token {self.tokens[user]}"}

    def api(self, method: str, path: str, *, user: str | None = "staff", **kwargs: Any) -> httpx.Response:
        """One HTTP request as ``user`` (None: anonymous); ``kwargs`` go to httpx."""
        headers = {**self.auth_headers(user), **kwargs.pop("headers", {})}
        return self.http.request(method, path, headers=headers, **kwargs)

    def session(self, session_id: str) -> dict[str, Any]:
        return _json_ok(self.api("GET", f"/api/v1/sessions/{session_id}/"))

    def closed_session(self, session_id: str, timeout: float = 5) -> dict[str, Any]:
        """The session's record once it reads ``closed``; fails after ``timeout`` seconds."""
        return self.wait_until(
            lambda: (record := self.session(session_id))["state"] == "closed" and record,
            timeout, what=f"session {session_id} closed",
        )

    def workers(self) -> list[dict[str, Any]]:
        body = _json_ok(self.api("GET", "/api/v1/workers/"))
        # Paginated or not, depending on the view: accept both shapes.
        return body["results"] if isinstance(body, dict) else body

    def wait_until(self, predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = "") -> T:
        return wait_until(predicate, timeout, interval, what)

    async def wait_until_async(
        self, predicate: Callable[[], T], timeout: float, interval: float = 0.05, what: str = ""
    ) -> T:
        return await wait_until_async(predicate, timeout, interval, what)

    def restart_redis(self) -> None:
        """Kill Redis (every channel, group and queued message is lost) and start it again on its port."""
        old = self.redis_process
        assert old is not None, "only a scaled server has a Redis of its own"
        old.kill()
        old.wait()
        self.redis_process = _spawn("redis-restarted", list(old.args), dict(os.environ), self.logs_dir)
        self.redis_processes.append(self.redis_process)

    def restart_web(self) -> None:
        """Start a new web process in place of one that died; wait until it serves."""
        assert self.web_process is not None and self.web_process.poll() is not None, "the web process still runs"
        _start_web(self)
        wait_until(lambda: _ready(self), READY_TIMEOUT, interval=0.2, what="/readyz after the web process restarted")

    def log_text(self) -> str:
        """Every process log of this server, one after another."""
        return read_logs(self.logs_dir)

    def stop_worker(self, index: int) -> None:
        """SIGSTOP media worker ``index``: frozen, it neither beats nor answers; ``cont_worker`` resumes it."""
        self.worker_processes[index].send_signal(signal.SIGSTOP)

    def cont_worker(self, index: int) -> None:
        self.worker_processes[index].send_signal(signal.SIGCONT)

    def start_extra_worker(self) -> subprocess.Popen[bytes]:
        """One more ``manage.py mediaworker`` with this server's environment (scaled); stopped with the server."""
        index = len(self.worker_processes)
        worker = _spawn(f"mediaworker-{index}", [PYTHON, "manage.py", "mediaworker"], self.env, self.logs_dir)
        self.worker_processes.append(worker)
        self.processes.append(worker)
        return worker

    def db_execute(self, sql: str, params: tuple[Any, ...] = ()) -> int:
        """Run one statement on the server's database behind its back (``%s`` placeholders); the rows it touched.

        For tests that change what no message announces: a user deactivated by
        another tool, a record changed by an operator's SQL.
        """
        url = self.env["DATABASE_URL"]
        if url.startswith("sqlite:///"):
            with closing(sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30)) as connection:
                with connection:
                    return connection.execute(sql.replace("%s", "?"), params).rowcount
        with psycopg.connect(url, autocommit=True) as connection:
            return connection.execute(sql, params).rowcount

    def db_query(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        """Read the server's database behind its back (``%s`` placeholders): the rows, as dicts by column name."""
        url = self.env["DATABASE_URL"]
        if url.startswith("sqlite:///"):
            with closing(sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30)) as connection:
                cursor = connection.execute(sql.replace("%s", "?"), params)
                names = [column[0] for column in cursor.description]
                return [dict(zip(names, row)) for row in cursor.fetchall()]
        with psycopg.connect(url, autocommit=True) as connection:
            cursor = connection.execute(sql, params)
            names = [column.name for column in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

    def add_webhook(self, url: str, events: list[str] | None = None) -> dict[str, Any]:
        """Add an active webhook endpoint as an operator would (the model's defaults apply); its ``id`` and ``secret``."""
        script = (
            "import json\nfrom sessions_app.models import WebhookEndpoint\n"
            f"fields = {{'url': {url!r}}} if {events!r} is None else {{'url': {url!r}, 'events': {events!r}}}\n"
            "endpoint = WebhookEndpoint(**fields)\nendpoint.full_clean()\nendpoint.save()\n"
            "print(json.dumps({'id': endpoint.pk, 'secret': endpoint.secret}))\n"
        )
        stdout = _manage(["shell", "-c", script], self.env, self.logs_dir, "webhooks")
        return json.loads(stdout.strip().splitlines()[-1])

    def set_user_flags(self, username: str, **flags: bool) -> None:
        """Set ``is_active`` / ``is_staff`` of a test user directly in the database, as an admin would."""
        assert flags and set(flags) <= {"is_active", "is_staff"}, flags
        columns = ", ".join(f"{name} = %s" for name in flags)
        touched = self.db_execute(f"UPDATE auth_user SET {columns} WHERE username = %s", (*flags.values(), username))
        assert touched == 1, f"no user {username!r}"


def event_time(record: dict[str, Any], kind: str) -> float:
    """When a session's first event of ``kind`` happened, as a Unix timestamp."""
    return next(datetime.fromisoformat(e["at"]).timestamp() for e in record["events"] if e["kind"] == kind)


def read_logs(logs_dir: Path) -> str:
    parts = []
    for path in sorted(logs_dir.glob("*.log")):
        parts.append(f"===== {path.name} =====\n{path.read_text(errors='replace')}")
    return "\n".join(parts)


def _json_ok(response: httpx.Response) -> Any:
    assert response.status_code == 200, (
        f"{response.request.method} {response.request.url} -> {response.status_code}: {response.text[:2000]}"
    )
    return response.json()


# --- processes ------------------------------------------------------------------


def _spawn(name: str, argv: list[str], env: dict[str, str], logs_dir: Path) -> subprocess.Popen[bytes]:
    with open(logs_dir / f"{name}.log", "ab") as log:
        return subprocess.Popen(
            argv, cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM all at once (a graceful drain), then SIGKILL whatever outlives the grace period."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def _running(processes: list[subprocess.Popen[bytes]]) -> Iterator[None]:
    try:
        yield
    finally:
        _stop(processes)


def _manage(args: list[str], env: dict[str, str], logs_dir: Path, log_name: str) -> str:
    """Run ``manage.py args`` to completion; return its stdout, its stderr going to the log."""
    log_path = logs_dir / f"{log_name}.log"
    with open(log_path, "ab") as log:
        result = subprocess.run(
            [PYTHON, "manage.py", *args],
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=log,
            timeout=SETUP_TIMEOUT,
        )
        log.write(result.stdout)
    if result.returncode != 0:
        raise RuntimeError(f"manage.py {args[0]} exited {result.returncode}; its output is in {log_path}")
    return result.stdout.decode(errors="replace")


def _prepare_database(env: dict[str, str], logs_dir: Path) -> dict[str, str]:
    """Migrate and create the test users; return their token keys."""
    _manage(["migrate", "--noinput"], env, logs_dir, "migrate")
    stdout = _manage(["shell", "-c", _USERS_SCRIPT], env, logs_dir, "users")
    # The JSON line is the script's last output; anything before it is noise.
    last_line = stdout.strip().splitlines()[-1]
    return json.loads(last_line)


def _assert_alive(server: ScopeServer) -> None:
    for process in [server.web_process, *server.worker_processes]:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"process {process.args!r} exited {process.returncode} during start-up")


def _ready(server: ScopeServer) -> bool:
    _assert_alive(server)
    try:
        return server.http.get("/readyz").status_code == 200
    except httpx.TransportError:
        return False  # daphne is not listening yet


def _active_workers(server: ScopeServer) -> int:
    return sum(1 for worker in server.workers() if worker["state"] == "active")


def _start_web(server: ScopeServer) -> None:
    server.web_process = _spawn(
        "daphne",
        [DAPHNE, "-b", HOST, "-p", str(server.port), "scope_site.asgi:application"],
        server.env,
        server.logs_dir,
    )
    server.processes.append(server.web_process)


@contextmanager
def _failure_points_at_logs(logs_dir: Path) -> Iterator[None]:
    """A failure while the server runs (start-up included) carries the logs' place and their tail."""
    try:
        yield
    except Exception as exc:
        exc.add_note(f"server logs: {logs_dir}\n{read_logs(logs_dir)[-LOG_TAIL_CHARS:]}")
        raise


def _new_logs_dir(tmp_path: Path) -> Path:
    logs_dir = tmp_path / "logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    return logs_dir


@contextmanager
def start_embedded(tmp_path: Path, **env: Any) -> Iterator[ScopeServer]:
    """One daphne process holding the whole system, on SQLite in ``tmp_path``."""
    logs_dir = _new_logs_dir(tmp_path)
    server_environment = server_env(tmp_path, {"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", **env})
    server = ScopeServer(port=free_port(), logs_dir=logs_dir, env=server_environment)
    with _failure_points_at_logs(logs_dir), ExitStack() as stack:
        stack.callback(server.http.close)
        server.tokens = _prepare_database(server.env, logs_dir)
        stack.enter_context(_running(server.processes))
        _start_web(server)
        wait_until(lambda: _ready(server), READY_TIMEOUT, interval=0.2, what="/readyz to answer 200")
        yield server


@contextmanager
def _private_redis(tmp_path: Path, logs_dir: Path) -> Iterator[tuple[str, list[subprocess.Popen[bytes]]]]:
    """A redis-server of our own on a free loopback port, so tests may kill it freely."""
    port = free_port()
    data_dir = tmp_path / "redis"
    data_dir.mkdir(exist_ok=True)
    process = _spawn(
        "redis",
        ["redis-server", "--port", str(port), "--bind", HOST, "--save", "", "--appendonly", "no", "--dir", str(data_dir)],
        dict(os.environ),
        logs_dir,
    )
    processes = [process]  # a restart adds to it; all are stopped on exit
    with _running(processes):
        with closing(redis.Redis(host=HOST, port=port, socket_connect_timeout=1)) as client:

            def pong() -> bool:
                if process.poll() is not None:
                    raise AssertionError(f"redis-server exited {process.returncode}; see {logs_dir}/redis.log")
                try:
                    return bool(client.ping())
                except redis.ConnectionError:
                    return False

            wait_until(pong, 10, interval=0.05, what="the private redis-server to answer PING")
        yield f"redis://{HOST}:{port}/0", processes


def _postgres_admin() -> psycopg.Connection:
    return psycopg.connect(host=HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True)


@contextmanager
def _fresh_postgres_database() -> Iterator[str]:
    """A database of its own for one server, dropped afterwards (even if clients linger)."""
    name = f"scope_test_{uuid.uuid4().hex[:12]}"
    with _postgres_admin() as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgres://{PG_USER}@{HOST}:{PG_PORT}/{name}"
    finally:
        with _postgres_admin() as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def start_scaled(
    tmp_path: Path, workers: int = 2, worker_env: dict[str, Any] | None = None, **env: Any
) -> Iterator[ScopeServer]:
    """Redis channel layer, PostgreSQL, one daphne, ``workers`` mediaworker processes and Celery (worker + beat).

    ``worker_env``: settings only the media workers get (as on a host of their own).
    """
    logs_dir = _new_logs_dir(tmp_path)
    with _failure_points_at_logs(logs_dir), ExitStack() as stack:
        redis_url, redis_processes = stack.enter_context(_private_redis(tmp_path, logs_dir))
        database_url = stack.enter_context(_fresh_postgres_database())
        server_environment = server_env(tmp_path, {"REDIS_URL": redis_url, "DATABASE_URL": database_url, **env})
        server = ScopeServer(
            port=free_port(), logs_dir=logs_dir, env=server_environment,
            redis_process=redis_processes[0], redis_processes=redis_processes,
        )
        stack.callback(server.http.close)
        server.tokens = _prepare_database(server.env, logs_dir)
        # Processes stop before the database is dropped and Redis goes (ExitStack unwinds in reverse).
        stack.enter_context(_running(server.processes))
        for index in range(workers):
            worker_environment = {**server.env, **{k: _env_value(v) for k, v in (worker_env or {}).items()}}
            worker = _spawn(f"mediaworker-{index}", [PYTHON, "manage.py", "mediaworker"], worker_environment, logs_dir)
            server.worker_processes.append(worker)
            server.processes.append(worker)
        server.celery_process = _spawn(
            "celery",
            [CELERY, "-A", "scope_site", "worker", "--beat", "--pool", "solo", "--loglevel", "INFO",
             "--schedule", str(tmp_path / "celerybeat-schedule")],
            server.env,
            logs_dir,
        )
        server.processes.append(server.celery_process)
        _start_web(server)
        wait_until(lambda: _ready(server), READY_TIMEOUT, interval=0.2, what="/readyz to answer 200")
        wait_until(
            lambda: _active_workers(server) == workers, READY_TIMEOUT, interval=0.2, what=f"{workers} active workers"
        )
        yield server
