"""Faults, injected into real processes: nothing keeps streaming, and every session ends on record.

Short heartbeats and sweeps keep the bounds short: a silent worker or web
process is noticed within 3 heartbeats + 1 sweep. Each test ends with the
invariant check: every session ever created is ``closed`` with a reason and a
complete trail, no worker holds a peer, no slot is held.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ARTIFACTS, PYTHON, REPO_ROOT, ScopeServer, event_time
from tests.peer import ScopeClient
from tests.test_lifecycle import FULL_TRAIL, connect_and_stream

HEARTBEAT = 1.0
SWEEP = 1.0
SILENCE_BOUND = 3 * HEARTBEAT + SWEEP
IDLE = 3.0
FAST_NETS = {"SCOPE_HEARTBEAT_SECONDS": HEARTBEAT, "SCOPE_SWEEP_SECONDS": SWEEP, "SCOPE_IDLE_TIMEOUT_SECONDS": IDLE}
# Scheduling slack on a small, busy machine: the bound is the documented one, the slack is the test's.
SLACK = 3.0
# The trail of a session whose worker died: nobody was left to record the teardown steps.
LOST_TRAIL = ["created", "placed", "offered", "answered", "live", "closing", "closed"]
TEARDOWN = FULL_TRAIL[FULL_TRAIL.index("closing"):]


def all_sessions(server: ScopeServer) -> list[dict[str, Any]]:
    records, page = [], "/api/v1/sessions/"
    while page:
        body = server.api("GET", page).json()
        records.extend(server.session(r["id"]) for r in body["results"])
        page = body["next"]
    return records


def assert_nothing_left(server: ScopeServer, *, but: frozenset[str] = frozenset()) -> None:
    """Every session closed with a reason and a trail that ends ``closing, closed``; no peer, no slot held.

    ``but``: sessions a test closed in the database behind the server's back (no teardown on record).
    """
    for record in all_sessions(server):
        if record["id"] in but:
            continue
        kinds = [event["kind"] for event in record["events"]]
        assert record["state"] == "closed" and record["close_reason"], record
        assert kinds[0] == "created", kinds
        # A session with a peer has its whole teardown on record, unless its worker died with it;
        # one that never got an offer goes straight from closing to closed.
        had_peer = "answered" in kinds and record["close_reason"] != "WORKER_LOST"
        if had_peer:
            # The teardown's steps in order (a failed cleanup is followed by its retry's).
            teardown = [kind for kind in kinds[kinds.index("closing"):] if kind in TEARDOWN]
            assert list(dict.fromkeys(teardown)) == TEARDOWN and kinds[-1] == "closed", kinds
        else:
            assert kinds[-2:] == ["closing", "closed"], kinds
    for worker in server.workers():
        assert worker["slots_used"] == 0, worker
        if worker["state"] != "gone":
            assert worker["peer_count"] == 0, worker


def worker_process_of(server: ScopeServer, worker_id: int) -> subprocess.Popen[bytes]:
    pid = next(w["pid"] for w in server.workers() if w["id"] == worker_id)
    return next(p for p in server.worker_processes if p.pid == pid)


def closing_by(record: dict[str, Any]) -> str:
    return next(e["detail"]["by"] for e in record["events"] if e["kind"] == "closing")


def elapsed(record: dict[str, Any], since: float) -> float:
    """Seconds from ``since`` (a wall-clock time) to the record's ``closed`` event; kept for the run's report."""
    seconds = event_time(record, "closed") - since
    report_time(f"{record['close_reason']}: fault → closed", seconds)
    return seconds


def report_time(what: str, seconds: float) -> None:
    """Measured fault-to-outcome times, appended to test-artifacts/fault-times.jsonl."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with open(ARTIFACTS / "fault-times.jsonl", "a") as out:
        out.write(json.dumps({"what": what, "seconds": round(seconds, 3)}) + "\n")


@pytest.fixture
def fast_scaled(server_factory) -> ScopeServer:
    return server_factory("scaled", workers=2, **FAST_NETS)


async def test_killed_worker_ends_its_sessions_worker_lost(fast_scaled: ScopeServer) -> None:
    server = fast_scaled
    async with ScopeClient() as doomed, ScopeClient() as spared:
        doomed_peer = await connect_and_stream(doomed, server, "alice", pipeline="invert")
        spared_peer = await connect_and_stream(spared, server, "bob", pipeline="invert")
        dead_worker = server.session(doomed_peer.session_id)["worker"]
        survivor = server.session(spared_peer.session_id)["worker"]
        assert dead_worker != survivor

        killed_at = time.time()
        worker_process_of(server, dead_worker).kill()
        error = await doomed.expect("error", timeout=SILENCE_BOUND + SLACK, sessionId=doomed_peer.session_id)
        assert error["code"] == "WORKER_LOST"
        assert await doomed.wait_closed(2) == 4011
        record = server.session(doomed_peer.session_id)
        assert record["close_reason"] == "WORKER_LOST"
        assert [e["kind"] for e in record["events"]] == LOST_TRAIL
        assert closing_by(record).startswith("sweep")
        assert elapsed(record, killed_at) <= SILENCE_BOUND + SLACK
        assert {w["id"]: w["state"] for w in server.workers()}[dead_worker] == "gone"

        # The other session never noticed; new sessions go to the survivor.
        assert server.session(spared_peer.session_id)["state"] == "live"
        async with ScopeClient() as newcomer:
            new_peer = await connect_and_stream(newcomer, server, "alice", pipeline="passthrough")
            assert server.session(new_peer.session_id)["worker"] == survivor
    await server.wait_until_async(lambda: all(s["state"] == "closed" for s in all_sessions(server)), 5)
    assert_nothing_left(server)


async def test_killed_web_process_ends_its_sessions_signaling_lost(fast_scaled: ScopeServer) -> None:
    server = fast_scaled
    async with ScopeClient() as client:
        peer = await connect_and_stream(client, server, "alice", pipeline="invert")
        assert server.web_process is not None
        killed_at = time.time()
        server.web_process.kill()
        server.web_process.wait()
        await peer.wait_server_closed(SILENCE_BOUND + SLACK)
        media_stopped = time.time() - killed_at
        report_time("SIGNALING_LOST: web process killed → client sees DTLS closed", media_stopped)
        await asyncio.sleep(1)
        assert not peer.frames_since(time.monotonic() - 0.5), "media kept flowing after the worker closed the peer"

    # A new web process serves the records (and new sessions) again.
    await asyncio.to_thread(server.restart_web)
    record = server.closed_session(peer.session_id)
    assert record["close_reason"] == "SIGNALING_LOST"
    assert [e["kind"] for e in record["events"]] == FULL_TRAIL
    assert media_stopped <= SILENCE_BOUND + SLACK
    assert elapsed(record, killed_at) <= SILENCE_BOUND + SLACK
    assert_nothing_left(server)


def start_client_process(server: ScopeServer) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [PYTHON, "-m", "tests.client_process", server.ws_url, server.origin, server.tokens["alice"]],
        cwd=REPO_ROOT, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    assert line, f"the client process exited {process.poll()} before streaming"
    return process, json.loads(line)["session_id"]


@pytest.mark.parametrize(
    ("fault", "reason"),
    [(signal.SIGSTOP, "IDLE_TIMEOUT"), (signal.SIGKILL, "CLIENT_DISCONNECT")],
    ids=["frozen-client-idle-timeout", "killed-client-socket-closed"],
)
def test_a_client_that_vanishes_is_noticed(server_factory, fault, reason) -> None:
    """Frozen, it sends nothing (no close frame, no DTLS close, no media): only the idle timeout can tell.

    Killed, its kernel still closes the TCP connection, so the socket's close says so at once.
    """
    server = server_factory("embedded", **FAST_NETS)
    process, session_id = start_client_process(server)
    try:
        vanished_at = time.time()
        process.send_signal(fault)
        record = server.closed_session(session_id, timeout=IDLE + 1 + SLACK)
    finally:
        process.kill()
        process.wait()
    assert record["close_reason"] == reason
    assert [e["kind"] for e in record["events"]] == FULL_TRAIL
    assert elapsed(record, vanished_at) <= (IDLE + 1 if fault == signal.SIGSTOP else 1) + SLACK
    assert_nothing_left(server)


async def test_sigterm_drains_a_worker(fast_scaled: ScopeServer) -> None:
    server = fast_scaled
    async with ScopeClient() as client:
        peer = await connect_and_stream(client, server, "alice", pipeline="invert")
        worker_id = server.session(peer.session_id)["worker"]
        process = worker_process_of(server, worker_id)
        signalled_at, signalled_wall = time.monotonic(), time.time()
        process.send_signal(signal.SIGTERM)
        error = await client.expect("error", timeout=5, sessionId=peer.session_id)
        assert error["code"] == "SERVER_SHUTDOWN"
        assert await client.wait_closed(2) == 4012
        await asyncio.to_thread(process.wait, 10)
        exited_after = time.monotonic() - signalled_at
    report_time("worker SIGTERM → worker exited", exited_after)
    record = server.closed_session(peer.session_id)
    assert record["close_reason"] == "SERVER_SHUTDOWN"
    assert [e["kind"] for e in record["events"]] == FULL_TRAIL
    assert elapsed(record, signalled_wall) < 2
    assert exited_after < 10
    assert {w["id"]: w["state"] for w in server.workers()}[worker_id] == "gone"
    assert_nothing_left(server)


async def test_redis_restart_is_survived(fast_scaled: ScopeServer) -> None:
    server = fast_scaled
    async with ScopeClient() as before:
        old_peer = await connect_and_stream(before, server, "alice", pipeline="invert")
        server.restart_redis()
        await asyncio.sleep(3 * HEARTBEAT + SWEEP)
        # Media never needed Redis; the session is still live and still streaming.
        assert server.session(old_peer.session_id)["state"] == "live"
        assert len(old_peer.frames_since(time.monotonic() - 1)) > 5
        # New sessions work once the processes have reconnected by themselves.
        async with ScopeClient() as after:
            new_peer = await connect_and_stream(after, server, "bob", pipeline="grayscale")
        # Leaving still tears down over the restarted channel layer.
        await before.close_socket()
        await old_peer.wait_server_closed(5)
    assert server.closed_session(old_peer.session_id)["close_reason"] == "CLIENT_DISCONNECT"
    assert server.closed_session(new_peer.session_id)["close_reason"] == "CLIENT_DISCONNECT"
    assert_nothing_left(server)


async def test_sigterm_drains_the_web_process(fast_scaled: ScopeServer) -> None:
    server = fast_scaled
    async with ScopeClient() as client:
        peer = await connect_and_stream(client, server, "alice", pipeline="invert")
        assert server.web_process is not None
        signalled_at, signalled_wall = time.monotonic(), time.time()
        server.web_process.send_signal(signal.SIGTERM)
        error = await client.expect("error", timeout=5, sessionId=peer.session_id)
        assert error["code"] == "SERVER_SHUTDOWN"
        assert await client.wait_closed(2) == 4012
        await peer.wait_server_closed(2)
        await asyncio.to_thread(server.web_process.wait, 10)
        exited_after = time.monotonic() - signalled_at
    report_time("web SIGTERM → web process exited", exited_after)
    assert exited_after < 10
    await asyncio.to_thread(server.restart_web)
    record = server.closed_session(peer.session_id)
    assert record["close_reason"] == "SERVER_SHUTDOWN"
    assert [e["kind"] for e in record["events"]] == FULL_TRAIL
    assert elapsed(record, signalled_wall) < 2
    assert_nothing_left(server)


def set_immutable(path: Path, immutable: bool) -> None:
    """chattr ±i: not even root may delete the file while it is set (ext4, as under /tmp here)."""
    subprocess.run(["chattr", "+i" if immutable else "-i", str(path)], check=True)


@pytest.mark.parametrize("mode", ["embedded", "scaled"])
async def test_files_that_cannot_be_removed_hold_the_slot_until_a_retry_removes_them(
    server_factory, mode, tmp_path: Path
) -> None:
    """The worker that holds the files retries with backoff (1, 2, 4, 8 s…), embedded and scaled alike.

    Scaled, the files are on a path only the media worker sees, as on a host of its own.
    """
    files_dir = tmp_path / "worker-only-files"
    worker_env = {"SCOPE_SESSION_FILES_DIR": files_dir} if mode == "scaled" else None
    server = server_factory(mode, workers=1, worker_env=worker_env, SCOPE_WORKER_CAPACITY=1, **FAST_NETS)
    files_dir = files_dir if mode == "scaled" else Path(server.env["SCOPE_SESSION_FILES_DIR"])
    async with ScopeClient() as client:
        peer = await connect_and_stream(client, server, "alice", pipeline="invert")
        stuck = files_dir / peer.session_id / "offer.sdp"
        set_immutable(stuck, True)
        try:
            await client.close_socket()
            await peer.wait_server_closed(2)  # the peer and pipeline go at once, files or not
            await asyncio.sleep(3 * SWEEP)
            record = server.session(peer.session_id)
            assert record["state"] == "closing", record
            cleanup = next(e for e in record["events"] if e["kind"] == "cleaned_up")
            assert "failed" in cleanup["detail"], cleanup
            assert server.workers()[0]["slots_used"] == 1  # no new session may take the slot yet
        finally:
            set_immutable(stuck, False)
    record = server.closed_session(peer.session_id, timeout=16 + SLACK)
    kinds = [e["kind"] for e in record["events"]]
    assert kinds == [*FULL_TRAIL[:-1], "cleaned_up", "closed"], kinds
    assert record["events"][-2]["detail"] == {"files_removed": 2, "retried": True}
    assert not stuck.parent.exists()
    assert_nothing_left(server)


async def test_files_that_stay_unremovable_are_given_up_loudly(server_factory) -> None:
    server = server_factory("embedded", workers=1, SCOPE_WORKER_CAPACITY=1, SCOPE_CLEANUP_GIVE_UP_SECONDS=3,
                            **FAST_NETS)
    async with ScopeClient() as client:
        peer = await connect_and_stream(client, server, "alice", pipeline="invert")
        stuck = Path(server.env["SCOPE_SESSION_FILES_DIR"]) / peer.session_id / "offer.sdp"
        set_immutable(stuck, True)
        try:
            await client.close_socket()
            record = server.closed_session(peer.session_id, timeout=3 + 2 * SLACK)
        finally:
            set_immutable(stuck, False)
    cleanups = [e["detail"] for e in record["events"] if e["kind"] == "cleaned_up"]
    assert "failed" in cleanups[0] and cleanups[-1]["gave_up"] is True, cleanups
    assert "gave up removing its files" in server.log_text()
    assert server.workers()[0]["slots_used"] == 0
