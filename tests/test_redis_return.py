"""Redis comes back, so does the service (docs/operations.md).

Sessions in flight keep streaming through a Redis restart, and the first new
session after Redis answers again streams within 5 s. Redis is stopped, left
down for a while (as a real restart is), and started again on its port; the
clock starts when it answers PING again.
"""

from __future__ import annotations

import asyncio
import os
import time
from contextlib import closing
from urllib.parse import urlsplit

import redis

from tests.harness import HOST, ScopeServer, _spawn
from tests.peer import ScopeClient
from tests.test_faults import all_sessions, assert_nothing_left, report_time
from tests.test_lifecycle import connect_and_stream

OUTAGE_SECONDS = 2.0
# The contract: Redis back → the first new session's first processed frame.
BACK_TO_FRAMES_BOUND = 5.0
# How long each step may take before the test gives up: long enough that a slow
# return is measured (and printed) rather than cut short.
GENEROUS = 30.0


def stop_redis(server: ScopeServer) -> None:
    """Kill Redis: every channel, group and queued message is lost."""
    assert server.redis_process is not None, "only a scaled server has a Redis of its own"
    server.redis_process.kill()
    server.redis_process.wait()


def start_redis(server: ScopeServer) -> float:
    """Start Redis again on its port; return the moment (monotonic) it answers PING."""
    old = server.redis_process
    assert old is not None and old.poll() is not None, "Redis still runs"
    server.redis_process = _spawn("redis-restarted", list(old.args), dict(os.environ), server.logs_dir)
    server.redis_processes.append(server.redis_process)
    port = urlsplit(server.env["REDIS_URL"]).port
    deadline = time.monotonic() + 10
    with closing(redis.Redis(host=HOST, port=port, socket_connect_timeout=0.5, socket_timeout=0.5)) as client:
        while True:
            try:
                if client.ping():
                    return time.monotonic()
            except redis.ConnectionError:
                pass
            assert server.redis_process.poll() is None, "redis-server exited on restart"
            assert time.monotonic() < deadline, "Redis did not answer PING within 10 s of its restart"
            time.sleep(0.01)


def longest_gap(moments: list[float]) -> float:
    return max((b - a for a, b in zip(moments, moments[1:])), default=float("inf"))


async def test_first_new_session_after_redis_returns_streams_within_5s(server_factory) -> None:
    # One worker: the new session lands on the worker already serving one, whose
    # connection pool holds connections that died with Redis.
    server = server_factory("scaled", workers=1)
    async with ScopeClient() as before:
        old_peer = await connect_and_stream(before, server, "bob", pipeline="invert")

        stopped_at = time.monotonic()
        await asyncio.to_thread(stop_redis, server)
        await asyncio.sleep(OUTAGE_SECONDS)
        back_at = await asyncio.to_thread(start_redis, server)

        # At once, as a user who pressed Start while Redis was coming back would.
        async with ScopeClient() as after:
            steps: dict[str, float] = {}
            await after.connect(server, "alice", timeout=GENEROUS)
            steps["socket open"] = time.monotonic() - back_at
            await after.expect("ready", timeout=GENEROUS)
            steps["ready"] = time.monotonic() - back_at
            new_peer = await after.start_session(pipeline="grayscale", timeout=GENEROUS)
            steps["answer"] = time.monotonic() - back_at
            await new_peer.wait_connected(GENEROUS)
            steps["connected"] = time.monotonic() - back_at
            await new_peer.wait_frames(1, GENEROUS)
            to_frames = new_peer.frames[0][0] - back_at
            steps["first frame"] = to_frames
            print("Redis back → " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in steps.items()))
            report_time("Redis back → first new session's first frame", to_frames)
            await new_peer.wait_frames(10, 5)
            await server.wait_until_async(
                lambda: server.session(new_peer.session_id)["state"] == "live", 5, what="the new session live"
            )

            # The session in flight never stopped: media does not go through Redis.
            now = time.monotonic()
            outage_frames = [t for t, _ in old_peer.frames if stopped_at - 1 <= t <= now]
            assert longest_gap(outage_frames) < 1.0, f"the session in flight stalled {longest_gap(outage_frames):.2f} s"
            assert server.session(old_peer.session_id)["state"] == "live"

            assert to_frames < BACK_TO_FRAMES_BOUND, (
                f"the first new session streamed {to_frames:.2f} s after Redis was back "
                f"(bound {BACK_TO_FRAMES_BOUND} s); steps: {steps}"
            )

        # Leaving still tears both down over the restarted channel layer.
        await before.close_socket()
        await old_peer.wait_server_closed(5)
    assert server.closed_session(old_peer.session_id)["close_reason"] == "CLIENT_DISCONNECT"
    assert server.closed_session(new_peer.session_id)["close_reason"] == "CLIENT_DISCONNECT"
    await server.wait_until_async(lambda: all(s["state"] == "closed" for s in all_sessions(server)), 5)
    assert_nothing_left(server)
