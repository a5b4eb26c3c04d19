"""Logs an operator's log system can parse: JSON lines, one per lifecycle step, a session followed by its id."""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured

from scope_site.logs import TextFormatter, log_format
from sessions_app import lifecycle, lifecycle_log
from tests.harness import PYTHON, REPO_ROOT, ScopeServer, start_embedded, start_scaled
from tests.peer import ScopeClient
from tests.test_lifecycle import FULL_TRAIL, connect_and_stream

# Every JSON line has these, whoever wrote it.
BASE_KEYS = {"timestamp", "level", "logger", "pid", "message"}
# What Celery prints itself, past logging, on SIGTERM (celery.apps.worker's safe_say to stdout):
# a blank line, then this one. Nothing else in any server log may be other than JSON.
CELERY_SHUTDOWN_LINE = re.compile(r"worker: (Warm|Cold) shutdown \(MainProcess\)")


# --- reading logs ---------------------------------------------------------------------


def json_records(path: Path, *, allowed: re.Pattern[str] | None = None) -> list[dict[str, Any]]:
    """Every line of ``path`` as a JSON object with the base fields; fails naming the first line that is not.

    ``allowed``: lines (and blank lines) that may stand outside the JSON, for
    output that never passes through logging.
    """
    records = []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if allowed is not None and (not line.strip() or allowed.fullmatch(line)):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"{path.name}:{number} is not a JSON line: {line!r}") from None
        assert isinstance(record, dict), f"{path.name}:{number}: {line!r}"
        missing = BASE_KEYS - record.keys()
        assert not missing, f"{path.name}:{number} lacks {missing}: {line!r}"
        stamp = datetime.fromisoformat(record["timestamp"])
        assert stamp.utcoffset() == timedelta(0), f"{path.name}:{number}: timestamp not in UTC: {record['timestamp']}"
        record["_file"], record["_stamp"] = path.name, stamp
        records.append(record)
    assert records, f"{path.name} is empty"
    return records


def session_trail(records: list[dict[str, Any]], session_id: str) -> list[dict[str, Any]]:
    """The session's lifecycle lines, in time order."""
    lines = [r for r in records if r["logger"] == "scope.lifecycle" and r.get("session_id") == session_id]
    return sorted(lines, key=lambda r: r["_stamp"])


def assert_whole_life(trail: list[dict[str, Any]], *, session_id: str, connection_id: str, worker_id: int) -> None:
    """created … closed in order; each names the session, its socket, its worker once placed, its reason if closing."""
    assert [line["step"] for line in trail] == FULL_TRAIL, [(line["step"], line["_file"]) for line in trail]
    reason = None
    for line in trail:
        step = line["step"]
        assert line["event"] == f"session.{step}"
        assert line["level"] == "INFO", line
        assert line["session_id"] == session_id and session_id in line["message"]
        assert line["connection_id"] == connection_id, line
        assert line["worker_id"] == (None if step == "created" else worker_id), line
        if step == "closing":
            reason = "CLIENT_DISCONNECT"
            assert line["detail"]["reason"] == reason and line["detail"]["by"].startswith("socket"), line
            assert reason in line["message"]
        assert line["reason"] == reason, line
        assert line["owner"] == "alice"
        datetime.fromisoformat(line["at"])
    assert trail[2]["pipeline"] == "invert" and trail[2]["detail"]["pipeline"] == "invert"  # offered
    assert trail[-1]["state"] == "closed" and trail[-1]["frames_in"] > 0 and trail[-1]["frames_out"] > 0


async def stream_then_leave(server: ScopeServer) -> tuple[str, str, int]:
    """alice streams until live, then closes her socket; the session's id, connection id and worker."""
    async with ScopeClient() as client:
        peer = await connect_and_stream(client, server, "alice", pipeline="invert")
        await peer.wait_frames(10)
        await client.close_socket()
        await peer.wait_server_closed(5)
    record = await server.wait_until_async(
        lambda: (r := server.session(peer.session_id))["state"] == "closed" and r, 10, what="the session closed"
    )
    assert [event["kind"] for event in record["events"]] == FULL_TRAIL
    connection_id = record["events"][0]["detail"]["connection_id"]
    assert connection_id
    return peer.session_id, connection_id, record["worker"]


# --- real servers ---------------------------------------------------------------------------


async def test_embedded_json_log_follows_a_session_by_its_id(tmp_path: Path) -> None:
    with start_embedded(tmp_path, SCOPE_LOG_FORMAT="json") as server:
        session_id, connection_id, worker_id = await stream_then_leave(server)
        logs_dir = server.logs_dir
    # The server has stopped (SIGTERM, drained): its shutdown lines are in the log too.
    records = json_records(logs_dir / "daphne.log")

    trail = session_trail(records, session_id)
    assert_whole_life(trail, session_id=session_id, connection_id=connection_id, worker_id=worker_id)
    assert [line["step"] for line in records if line["logger"] == "scope.lifecycle"
            and line.get("session_id") == session_id] == FULL_TRAIL, "out of order in the file"
    assert len({line["pid"] for line in trail}) == 1

    workers = [r for r in records if r["logger"] == "scope.lifecycle" and r.get("event", "").startswith("worker.")]
    assert [(r["step"], r["worker_id"]) for r in workers][:1] == [("registered", worker_id)], workers
    assert workers[0]["host"] and workers[0]["detail"]["capacity"] >= 1
    # daphne's access log, through logging, with its fields.
    access = [r for r in records if r["logger"] == "daphne.access"]
    assert any(r["method"] == "WSCONNECT" and r["path"] == "/ws/webrtc/" for r in access), access[:5]
    assert any(r["method"] == "GET" and r["path"] == "/readyz" and r["status"] == 200 for r in access), access[:5]
    # Log calls that know nothing of JSON still come out as JSON, their text in "message".
    assert any(r["logger"] == "scope_site.process" for r in records), "the drain's lines at SIGTERM"


async def test_scaled_logs_merged_by_time_give_the_whole_life(tmp_path: Path) -> None:
    with start_scaled(tmp_path, workers=1, SCOPE_LOG_FORMAT="json") as server:
        session_id, connection_id, worker_id = await stream_then_leave(server)
        logs_dir = server.logs_dir
    web = json_records(logs_dir / "daphne.log")
    worker = json_records(logs_dir / "mediaworker-0.log")
    celery = json_records(logs_dir / "celery.log", allowed=CELERY_SHUTDOWN_LINE)

    # Each process has part of the life; merged by timestamp, the whole of it.
    web_steps = [r["step"] for r in session_trail(web, session_id)]
    worker_steps = [r["step"] for r in session_trail(worker, session_id)]
    assert "created" in web_steps and "closing" in web_steps, web_steps
    assert "live" in worker_steps and "closed" in worker_steps, worker_steps
    trail = session_trail(web + worker + celery, session_id)
    assert_whole_life(trail, session_id=session_id, connection_id=connection_id, worker_id=worker_id)
    assert len({(line["_file"], line["pid"]) for line in trail}) == 2

    assert any(r.get("event") == "worker.registered" and r["worker_id"] == worker_id for r in worker)
    # Celery logs through settings.LOGGING: its own lines are JSON, its banner one of them.
    assert any(r["logger"] == "celery.worker" and "banner" in r for r in celery), [r["message"] for r in celery][:10]
    assert any(r["logger"].startswith("celery") and "ready" in r["message"] for r in celery)


# --- the format's default, and the text format --------------------------------------------


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        if self.closed:
            raise ValueError("I/O operation on closed file")  # as a real stream's
        return self._tty


def test_format_defaults_to_json_unless_stderr_is_a_terminal() -> None:
    assert log_format({}, _Stream(tty=False)) == "json"
    assert log_format({}, _Stream(tty=True)) == "text"
    closed = _Stream(tty=True)
    closed.close()
    assert log_format({}, closed) == "json"
    assert log_format({"SCOPE_LOG_FORMAT": "text"}, _Stream(tty=False)) == "text"
    assert log_format({"SCOPE_LOG_FORMAT": " JSON "}, _Stream(tty=True)) == "json"
    assert log_format({"SCOPE_LOG_FORMAT": ""}, _Stream(tty=False)) == "json"
    with pytest.raises(ImproperlyConfigured, match="SCOPE_LOG_FORMAT"):
        log_format({"SCOPE_LOG_FORMAT": "xml"}, _Stream(tty=False))


_EMIT = """
import django, logging
django.setup()
logging.getLogger("scope.lifecycle").info(
    "session s-1: closing (CLIENT_DISCONNECT)",
    extra={"session_id": "s-1", "worker_id": 3, "connection_id": None, "reason": "CLIENT_DISCONNECT",
           "detail": {"by": "socket:gone away"}},
)
logging.getLogger("plain").warning("an old-style line with %s", "args")
"""


def _emit(stderr: int) -> subprocess.CompletedProcess[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("SCOPE_LOG_FORMAT", "REDIS_URL", "DATABASE_URL")}
    env["DJANGO_SETTINGS_MODULE"] = "scope_site.settings"
    return subprocess.run([PYTHON, "-c", _EMIT], cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=stderr, timeout=120, check=True)


def test_a_process_whose_stderr_is_a_pipe_logs_json() -> None:
    lines = _emit(subprocess.PIPE).stderr.decode().splitlines()
    assert len(lines) == 2, lines
    step, plain = (json.loads(line) for line in lines)
    assert step["logger"] == "scope.lifecycle" and step["level"] == "INFO"
    assert step["session_id"] == "s-1" and step["worker_id"] == 3 and step["reason"] == "CLIENT_DISCONNECT"
    assert step["connection_id"] is None and step["detail"] == {"by": "socket:gone away"}
    assert datetime.fromisoformat(step["timestamp"]).tzinfo == timezone.utc
    assert plain["message"] == "an old-style line with args" and plain["level"] == "WARNING"
    assert isinstance(plain["pid"], int) and plain["pid"] == step["pid"]


def test_a_process_on_a_terminal_logs_readable_text() -> None:
    controller, terminal = pty.openpty()
    try:
        _emit(terminal)
        os.close(terminal)
        terminal = -1
        output = b""
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal side is closed and drained
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(controller)
        if terminal >= 0:
            os.close(terminal)
    lines = output.decode().replace("\r\n", "\n").splitlines()
    assert len(lines) == 2, lines
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"
    assert re.fullmatch(
        stamp + r' INFO scope\.lifecycle \d+: session s-1: closing \(CLIENT_DISCONNECT\) '
        r'session_id=s-1 worker_id=3 reason=CLIENT_DISCONNECT detail=\{"by":"socket:gone away"\}',
        lines[0],
    ), lines[0]
    assert re.fullmatch(stamp + r" WARNING plain \d+: an old-style line with args", lines[1]), lines[1]


def test_text_fields_quote_what_has_spaces() -> None:
    record = logging.LogRecord("scope.lifecycle", logging.INFO, __file__, 1, "worker %s: lost", (7,), None)
    record.__dict__.update(worker_id=7, host="gpu host", session_id=None, ok=True, path='/a"b')
    line = TextFormatter("%(levelname)s %(message)s").format(record)
    assert line == 'INFO worker 7: lost worker_id=7 host="gpu host" ok=True path="/a\\"b"'


# --- the receivers, in process ----------------------------------------------------------------


def _session_step(kind: str, **changes: Any) -> lifecycle.SessionStep:
    now = datetime.now(timezone.utc)
    fields: dict[str, Any] = dict(
        kind=kind, at=now, detail={}, session_id="5e55", state="live", owner="alice", connection_id="c-1",
        worker_id=2, pipeline="invert", close_reason="", created_at=now, live_at=now, closing_at=None,
        closed_at=None, frames_in=10, frames_out=9,
    )
    fields.update(changes)
    return lifecycle.SessionStep(**fields)


def _connected(signal: Any, dispatch_uid: str) -> bool:
    return any(entry[0][0] == dispatch_uid for entry in signal.receivers)


def test_each_step_is_one_line_with_its_fields(caplog: pytest.LogCaptureFixture) -> None:
    # Connected once the app is ready; called directly here, so no other watcher (webhooks) runs.
    assert _connected(lifecycle.session_step, "scope.lifecycle.session_log")
    assert _connected(lifecycle.worker_step, "scope.lifecycle.worker_log")
    caplog.set_level(logging.INFO, logger="scope.lifecycle")
    lifecycle_log.log_session_step(lifecycle.SessionStep, step=_session_step("created", worker_id=None))
    lifecycle_log.log_session_step(
        lifecycle.SessionStep,
        step=_session_step("closed", state="closed", close_reason="IDLE_TIMEOUT", connection_id=""),
    )
    lifecycle_log.log_worker_step(lifecycle.WorkerStep, step=lifecycle.WorkerStep(
        kind="lost", at=datetime.now(timezone.utc), worker_id=2, host="h", detail={"by": "sweep"}))
    lifecycle_log.log_worker_step(lifecycle.WorkerStep, step=lifecycle.WorkerStep(
        kind="registered", at=datetime.now(timezone.utc), worker_id=3, host="h"))

    records = [r for r in caplog.records if r.name == "scope.lifecycle"]
    assert [(r.event, r.levelname) for r in records] == [
        ("session.created", "INFO"), ("session.closed", "INFO"), ("worker.lost", "WARNING"),
        ("worker.registered", "INFO"),
    ]
    created, closed, lost, _ = records
    assert (created.session_id, created.worker_id, created.connection_id, created.reason) == ("5e55", None, "c-1", None)
    assert (closed.reason, closed.connection_id, closed.frames_in, closed.frames_out) == ("IDLE_TIMEOUT", None, 10, 9)
    assert closed.getMessage() == "session 5e55: closed (IDLE_TIMEOUT) on worker 2"
    assert (lost.worker_id, lost.session_id, lost.host, lost.detail) == (2, None, "h", {"by": "sweep"})
