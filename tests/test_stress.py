"""Under stress: nothing stays dead, nobody hogs (docs/design.md), against real processes.

A worker frozen past the silence bound comes back and is used again, and a
whole embedded process frozen as long streams on, since nothing in it watched
the silence; a socket that never offers gives its slot up; a queued socket
hears of every freed slot, whether a close, a new worker or only the sweep
found it; hundreds of queued sockets are served first come, first served,
without starving liveness; a deactivated user or demoted staff member loses
their sockets within a heartbeat.

Short heartbeats and sweeps keep the bounds short. Every measured time is
printed and appended to test-artifacts/stress-times.jsonl. Each test ends with
the fault tests' invariant: every session closed with a reason and a complete
trail, no peer and no slot held.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections import Counter
from collections.abc import Awaitable, Iterator
from datetime import datetime, timezone
from typing import Any, TypeVar

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.harness import ARTIFACTS, READY_TIMEOUT, ScopeServer, start_embedded, start_scaled
from tests.peer import ScopeClient
from tests.test_faults import LOST_TRAIL, assert_nothing_left
from tests.test_lifecycle import FULL_TRAIL, connect_and_stream, live_peer

T = TypeVar("T")

HEARTBEAT = 1.0
SWEEP = 1.0
SILENCE_BOUND = 3 * HEARTBEAT + SWEEP
LIVENESS = {"SCOPE_HEARTBEAT_SECONDS": HEARTBEAT, "SCOPE_SWEEP_SECONDS": SWEEP}
# The media idle timeout where a test sets it: under FROZEN_FOR.
IDLE_AFTER = 4.0
# How long a frozen process stays frozen: well past the silence bound (and the idle timeout, where set).
FROZEN_FOR = SILENCE_BOUND + 2.0
OFFER_TIMEOUT = 3.0
MAX_QUEUE = 200
# Scheduling slack on a small, busy machine: the bound is the documented one, the slack is the test's.
SLACK = 3.0
# For "within one heartbeat": tighter, or a miss by several heartbeats would pass unnoticed.
BEAT_SLACK = 1.5
# The trail of a session closed before any offer (offer timeout, a socket that left while ready).
NO_OFFER_TRAIL = ["created", "placed", "closing", "closed"]


# --- reporting -------------------------------------------------------------------

def report_time(what: str, seconds: float) -> float:
    """Print a measured time and append it to test-artifacts/stress-times.jsonl; return it."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    print(f"{what}: {seconds:.2f}s")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with open(ARTIFACTS / "stress-times.jsonl", "a") as out:
        out.write(json.dumps({"test": test, "what": what, "seconds": round(seconds, 3)}) + "\n")
    return seconds


async def arrival(awaitable: Awaitable[T]) -> tuple[float, T]:
    """The awaited value and the moment (time.monotonic) it came; run as a task, so it is the arrival time."""
    value = await awaitable
    return time.monotonic(), value


# --- servers and helpers ---------------------------------------------------------

@pytest.fixture(scope="class")
def one_worker_scaled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScopeServer]:
    """Scaled, one media worker of one slot: whatever frees or adds a slot decides who streams."""
    with start_scaled(tmp_path_factory.mktemp("stress-scaled"), workers=1, SCOPE_WORKER_CAPACITY=1,
                      **LIVENESS) as server:
        yield server


@pytest.fixture(scope="class")
def one_slot_embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScopeServer]:
    """Embedded, one slot, a 3 s offer timeout, a queue of 200 and no connection limits in the way."""
    with start_embedded(
        tmp_path_factory.mktemp("stress-embedded"),
        SCOPE_WORKER_CAPACITY=1,
        SCOPE_OFFER_TIMEOUT_SECONDS=OFFER_TIMEOUT,
        SCOPE_MAX_QUEUE=MAX_QUEUE,
        SCOPE_CONNECTIONS_PER_MINUTE=100_000,
        SCOPE_MAX_SESSIONS_PER_USER=1_000,
        **LIVENESS,
    ) as server:
        yield server


def assert_idle(server: ScopeServer, active_workers: int) -> None:
    """A shared server's state at a test's start: what an earlier test did must not leak into this one."""
    workers = server.workers()
    assert [w["state"] for w in workers].count("active") == active_workers, workers
    assert all(w["slots_used"] == 0 and w["peer_count"] == 0 for w in workers if w["state"] == "active"), workers
    open_sessions = [s for s in server.api("GET", "/api/v1/sessions/").json()["results"] if s["state"] != "closed"]
    assert not open_sessions, open_sessions


def worker_state(server: ScopeServer, worker_id: int) -> str:
    return {w["id"]: w["state"] for w in server.workers()}[worker_id]


def worker_timeline(server: ScopeServer, worker_id: int, seconds: float) -> list[tuple[float, str]]:
    """(time.monotonic(), state) each time the worker's row reads a new state, watched for ``seconds``."""
    timeline: list[tuple[float, str]] = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        state = worker_state(server, worker_id)
        if not timeline or timeline[-1][1] != state:
            timeline.append((time.monotonic(), state))
        time.sleep(0.02)
    return timeline


async def all_closed(server: ScopeServer, timeout: float = 10) -> None:
    await server.wait_until_async(
        lambda: all(s["state"] == "closed" for s in list_sessions(server)), timeout, interval=0.2,
        what="every session closed",
    )


def list_sessions(server: ScopeServer) -> list[dict[str, Any]]:
    """Every session as the paginated list shows it (no events: cheap for hundreds)."""
    records, page = [], "/api/v1/sessions/"
    while page:
        response = server.api("GET", page)
        assert response.status_code == 200, response.text
        body = response.json()
        records.extend(body["results"])
        page = body["next"]
    return records


class QueueSocket:
    """A bare signaling socket that waits its turn and leaves as soon as it is ``ready``, never offering."""

    def __init__(self, index: int, ready_order: list[int]) -> None:
        self.index = index
        self.messages: list[tuple[float, dict[str, Any]]] = []  # (time.monotonic(), message)
        self.first_message = asyncio.Event()
        self.done = asyncio.Event()
        self.close_code: int | None = None
        self._ready_order = ready_order
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None

    async def open(self, server: ScopeServer, user: str) -> None:
        self._ws = await connect(
            server.ws_url, additional_headers={"Authorization": f"Token {server.tokens[user]}"},
            origin=server.origin, proxy=None, open_timeout=30,
        )
        self._reader = asyncio.create_task(self._read(self._ws))

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                message = json.loads(raw)
                self.messages.append((time.monotonic(), message))
                self.first_message.set()
                if message.get("type") == "ready" and self.index not in self._ready_order:
                    self._ready_order.append(self.index)
                    await ws.close()
        except ConnectionClosed:
            pass
        finally:
            self.close_code = ws.close_code
            self.first_message.set()
            self.done.set()

    def of_type(self, message_type: str) -> list[tuple[float, dict[str, Any]]]:
        return [(at, message) for at, message in self.messages if message.get("type") == message_type]

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            await asyncio.wait_for(self._reader, 5)


# --- 1. a worker that comes back is used again: the whole embedded process frozen --

async def test_a_frozen_embedded_server_goes_on_streaming_when_it_comes_back(server_factory) -> None:
    """SIGSTOP the whole embedded process (web, worker and sweeper in one) past the silence bound and
    the idle timeout; SIGCONT: its session streams on, nothing was declared silent, new sessions stream.

    Nothing in the process ran during the freeze, the sweep and the idle check
    included, so nothing may judge the freeze's silence against the worker, the
    socket or the media: they were not watching.
    """
    server = server_factory("embedded", SCOPE_IDLE_TIMEOUT_SECONDS=IDLE_AFTER, **LIVENESS)
    [worker] = server.workers()
    worker_id = worker["id"]
    assert server.web_process is not None
    async with ScopeClient() as old:
        old_peer = await connect_and_stream(old, server, "alice", pipeline="invert")
        await asyncio.sleep(2 * SWEEP)  # the sweep has been watching: a first sweep judges no silence anyway
        server.web_process.send_signal(signal.SIGSTOP)
        try:
            await asyncio.sleep(FROZEN_FOR)
        finally:
            server.web_process.send_signal(signal.SIGCONT)
        continued_at = time.monotonic()
        frames_before = len(old_peer.frames)

        await old_peer.wait_frames(frames_before + 30, timeout=SLACK)
        report_time("embedded SIGCONT → the old session's 30th frame since", time.monotonic() - continued_at)
        # Watch the row through more than a sweep and a heartbeat: it never reads gone.
        states = await asyncio.to_thread(worker_timeline, server, worker_id, SWEEP + HEARTBEAT + SLACK)
        assert [state for _, state in states] == ["active"], states
        assert server.session(old_peer.session_id)["state"] == "live"
        recent = old_peer.frames_since(time.monotonic() - 1)
        assert len(recent) > 5, f"the old session is live but only {len(recent)} frames came in the last second"
        assert not [m for m in old.received if m.get("type") == "error"], old.received
        assert "silence is judged from the next one" in server.log_text()

        async with ScopeClient() as new:
            connecting_at = time.monotonic()
            new_peer = await connect_and_stream(new, server, "bob", pipeline="grayscale")
            report_time("embedded, after the freeze: new socket → its session streams",
                        time.monotonic() - connecting_at)
            assert server.session(new_peer.session_id)["worker"] == worker_id
            await new_peer.wait_frames(len(new_peer.frames) + 10)

    await all_closed(server)
    assert server.closed_session(old_peer.session_id)["close_reason"] == "CLIENT_DISCONNECT"
    assert worker_state(server, worker_id) == "active"
    assert_nothing_left(server)


# --- scaled, one worker of one slot: 1. a frozen worker, 3. a new worker, a lost message --

class TestOneWorkerScaled:
    """One server for both: each test starts by checking that the last left nothing behind."""

    async def test_a_frozen_worker_comes_back_and_streams_again(self, one_worker_scaled: ScopeServer) -> None:
        """SIGSTOP the only media worker past the bound: its session ends WORKER_LOST; SIGCONT: it serves again."""
        server = one_worker_scaled
        assert_idle(server, active_workers=1)
        [worker] = server.workers()
        worker_id = worker["id"]
        async with ScopeClient() as old:
            old_peer = await connect_and_stream(old, server, "alice", pipeline="invert")
            assert server.session(old_peer.session_id)["worker"] == worker_id
            stopped_at = time.monotonic()
            server.stop_worker(0)
            try:
                error = await old.expect("error", timeout=SILENCE_BOUND + SLACK, sessionId=old_peer.session_id)
                lost_after = report_time("worker SIGSTOP → client told WORKER_LOST", time.monotonic() - stopped_at)
                close_code = await old.wait_closed(2)
                assert worker_state(server, worker_id) == "gone"
                await asyncio.sleep(max(0.0, stopped_at + FROZEN_FOR - time.monotonic()))
            finally:
                server.cont_worker(0)
            continued_at = time.monotonic()
            assert error["code"] == "WORKER_LOST"
            assert close_code == 4011
            assert lost_after <= SILENCE_BOUND + SLACK

            # Back within one heartbeat, under the same id; it drops the peer of the session that ended meanwhile.
            await server.wait_until_async(lambda: worker_state(server, worker_id) == "active", HEARTBEAT + SLACK,
                                          interval=0.02, what=f"worker {worker_id} active again")
            back_after = report_time("worker SIGCONT → row reads active", time.monotonic() - continued_at)
            await old_peer.wait_server_closed(HEARTBEAT + SLACK)
            dropped_after = report_time("worker SIGCONT → old peer closed by the server",
                                        time.monotonic() - continued_at)
            assert [w["id"] for w in server.workers()] == [worker_id], "the worker came back under a new id"

            async with ScopeClient() as new:
                new_peer = await connect_and_stream(new, server, "bob", pipeline="grayscale")
                streaming_after = report_time("worker SIGCONT → new session streams on it",
                                              time.monotonic() - continued_at)
                assert server.session(new_peer.session_id)["worker"] == worker_id
                await new_peer.wait_frames(len(new_peer.frames) + 10)

        assert back_after <= HEARTBEAT + BEAT_SLACK
        assert dropped_after <= HEARTBEAT + BEAT_SLACK
        assert streaming_after < 15
        record = server.closed_session(old_peer.session_id)
        assert record["close_reason"] == "WORKER_LOST"
        assert [e["kind"] for e in record["events"]] == LOST_TRAIL
        assert server.closed_session(new_peer.session_id)["close_reason"] == "CLIENT_DISCONNECT"
        assert worker_state(server, worker_id) == "active"
        assert_nothing_left(server)

    async def test_a_new_worker_and_a_silently_freed_slot_both_reach_the_queue(
        self, one_worker_scaled: ScopeServer
    ) -> None:
        server = one_worker_scaled
        assert_idle(server, active_workers=1)
        [first_worker] = [w["id"] for w in server.workers() if w["state"] == "active"]
        async with ScopeClient() as a, ScopeClient() as b, ScopeClient() as c:
            a_peer = await connect_and_stream(a, server, "alice", pipeline="invert")
            await b.connect(server, "bob")
            assert (await b.expect("queued"))["position"] == 1
            b_ready = asyncio.create_task(arrival(b.expect("ready", timeout=READY_TIMEOUT)))

            # A new worker: B is placed on it within one sweep of its row reading active.
            spawned_at = time.monotonic()
            server.start_extra_worker()
            [second_worker] = await server.wait_until_async(
                lambda: [w["id"] for w in server.workers() if w["state"] == "active" and w["id"] != first_worker],
                READY_TIMEOUT, interval=0.02, what="the new worker's row to read active",
            )
            active_at = time.monotonic()
            report_time("mediaworker spawned → its row reads active", active_at - spawned_at)
            b_ready_at, _ = await b_ready
            new_worker_wait = report_time("new worker's row active → queued socket ready", b_ready_at - active_at)
            b_peer = await live_peer(b, server, pipeline="grayscale")
            assert server.session(b_peer.session_id)["worker"] == second_worker

            # A slot freed with no message at all: A's record closed in the database. Only the sweep can notice.
            await c.connect(server, "alice")
            assert (await c.expect("queued"))["position"] == 1
            c_ready = asyncio.create_task(arrival(c.expect("ready", timeout=SWEEP + 2 * SLACK)))
            now = datetime.now(timezone.utc)
            touched = await asyncio.to_thread(
                server.db_execute,
                "UPDATE sessions_app_streamsession SET state = 'closed', close_reason = 'SESSION_TERMINATED', "
                "closing_at = %s, closed_at = %s WHERE id = %s AND state = 'live'",
                (now, now, a_peer.session_id),
            )
            assert touched == 1
            freed_at = time.monotonic()
            c_ready_at, c_ready_message = await c_ready
            lost_message_wait = report_time("slot freed in the database → queued socket ready (sweep)",
                                            c_ready_at - freed_at)
            # The worker still held A's peer: it drops it at its next heartbeat, telling the client why.
            await a_peer.wait_server_closed(HEARTBEAT + SLACK)
            dropped_after = report_time("slot freed in the database → its peer closed by the worker",
                                        time.monotonic() - freed_at)
            stopped = [message for _, message in a_peer.channel_messages if message.get("type") == "stream_stopped"]
            c_peer = await live_peer(c, server, pipeline="passthrough")
            assert server.session(c_peer.session_id)["worker"] == first_worker
            await c_peer.wait_frames(len(c_peer.frames) + 10)
            # B on the other worker streamed through all of it.
            assert server.session(b_peer.session_id)["state"] == "live"
            assert len(b_peer.frames_since(time.monotonic() - 1)) > 5

        assert new_worker_wait <= SWEEP + SLACK
        assert lost_message_wait <= SWEEP + SLACK
        # Nothing but the sweep could have placed it: no close ran, no worker came.
        sweep_lines = [line for line in server.log_text().splitlines() if "sweep:" in line and "placed" in line]
        assert any(c_ready_message["sessionId"] in line for line in sweep_lines), sweep_lines[-5:]
        assert dropped_after <= HEARTBEAT + BEAT_SLACK
        assert [m["reason"] for m in stopped] == ["SESSION_TERMINATED"], a_peer.channel_messages
        for peer in (b_peer, c_peer):
            assert server.closed_session(peer.session_id)["close_reason"] == "CLIENT_DISCONNECT"
        await all_closed(server)
        assert_nothing_left(server, but=frozenset({a_peer.session_id}))


# --- embedded, one slot: 2. no slot without an offer, 4. hundreds queue, 5. identity --

class TestOneSlotEmbedded:
    """One server for these: each test starts by checking that the last left nothing behind."""

    async def test_a_socket_that_never_offers_gives_its_slot_to_the_queue(self, one_slot_embedded: ScopeServer) -> None:
        server = one_slot_embedded
        assert_idle(server, active_workers=1)
        async with ScopeClient() as silent, ScopeClient() as waiting:
            await silent.connect(server, "alice")
            ready_at, ready = await arrival(silent.expect("ready"))
            await waiting.connect(server, "bob")
            queued = await waiting.expect("queued")
            waiting_ready = asyncio.create_task(
                arrival(waiting.expect("ready", timeout=OFFER_TIMEOUT + SWEEP + 2 * SLACK))
            )

            error_at, error = await arrival(
                silent.expect("error", timeout=OFFER_TIMEOUT + SWEEP + SLACK, sessionId=ready["sessionId"])
            )
            close_code = await silent.wait_closed(2)
            timed_out_after = report_time("ready → IDLE_TIMEOUT error (no offer)", error_at - ready_at)
            placed_at, _ = await waiting_ready
            handed_on_after = report_time("IDLE_TIMEOUT error → next socket ready", placed_at - error_at)
            assert server.session(ready["sessionId"])["state"] == "closed"  # the slot went on only once it was free
            peer = await live_peer(waiting, server, pipeline="grayscale")
            await peer.wait_frames(len(peer.frames) + 10)

        assert queued["position"] == 1
        assert error["code"] == "IDLE_TIMEOUT"
        assert close_code == 4013
        assert OFFER_TIMEOUT - 0.2 <= timed_out_after <= OFFER_TIMEOUT + SWEEP + SLACK
        assert handed_on_after <= SWEEP + SLACK
        record = server.closed_session(ready["sessionId"])
        assert record["close_reason"] == "IDLE_TIMEOUT"
        assert [e["kind"] for e in record["events"]] == NO_OFFER_TRAIL
        assert server.closed_session(peer.session_id)["close_reason"] == "CLIENT_DISCONNECT"
        assert_nothing_left(server)

    async def test_two_hundred_queued_sockets_are_served_in_order(self, one_slot_embedded: ScopeServer) -> None:
        """200 sockets wait for one slot; the 201st is refused; each served in turn leaves at once, never offering."""
        server = one_slot_embedded
        assert_idle(server, active_workers=1)
        ready_order: list[int] = []
        sockets = [QueueSocket(index, ready_order) for index in range(MAX_QUEUE)]
        async with ScopeClient() as holder:
            holder_peer = await connect_and_stream(holder, server, "staff", pipeline="invert")
            try:
                # One after another, so connect order is well defined: each is told its place at once.
                filling_from = time.monotonic()
                for queue_socket in sockets:
                    await queue_socket.open(server, ("alice", "bob")[queue_socket.index % 2])
                    await asyncio.wait_for(queue_socket.first_message.wait(), 10)
                    first = queue_socket.messages[0][1] if queue_socket.messages else None
                    assert first == {"type": "queued", "position": queue_socket.index + 1}, (queue_socket.index, first)
                report_time(f"{MAX_QUEUE} sockets connected one by one, each queued", time.monotonic() - filling_from)

                async with ScopeClient() as refused:
                    await refused.connect(server, "alice")
                    error = await refused.expect("error", timeout=10)
                    refused_code = await refused.wait_closed(5)
                assert error["code"] == "NO_CAPACITY", error
                assert refused_code == 4503

                # Liveness kept up with the burst: the holder still streams.
                assert server.session(holder_peer.session_id)["state"] == "live"
                assert len(holder_peer.frames_since(time.monotonic() - 1)) > 5

                # Free the slot: each socket that gets it leaves at once, handing it to the next.
                released_at, released_wall = time.monotonic(), time.time()
                await holder.close_socket()
                await asyncio.wait_for(asyncio.gather(*(s.done.wait() for s in sockets)), 150)
                drained_after = report_time(f"holder left → all {MAX_QUEUE} queued sockets served",
                                            time.monotonic() - released_at)
            finally:
                await asyncio.gather(*(s.close() for s in sockets), return_exceptions=True)

        # What each client saw, measured before anything is judged.
        readies = {s.index: s.of_type("ready") for s in sockets}
        first_ready = {index: messages[0][0] for index, messages in readies.items() if messages}
        served = [first_ready[index] for index in ready_order]
        handoffs = [later - earlier for earlier, later in zip([released_at, *served], served)]
        report_time("queue hand-off (previous socket ready → next ready), median", sorted(handoffs)[len(handoffs) // 2])
        worst = max(range(len(handoffs)), key=handoffs.__getitem__)
        report_time(f"queue hand-off, worst (to socket {ready_order[worst]})", handoffs[worst])
        print(f"per socket served: {drained_after / MAX_QUEUE * 1000:.0f} ms")
        updates = Counter(len(s.of_type("queued")) for s in sockets)
        print(f"queued messages per socket: {dict(sorted(updates.items()))}")
        await all_closed(server, timeout=20)
        records = {record["id"]: record for record in await asyncio.to_thread(list_sessions, server)}
        reasons = Counter(record["close_reason"] for record in records.values())
        print(f"close reasons: {dict(reasons)}")
        socket_sessions = {s.index: messages[0][1]["sessionId"] for s in sockets if (messages := readies[s.index])}
        # The record's close → the next socket's ready: the server's own hand-off, from the slot being free.
        slot_waits = []
        for previous, following in zip(ready_order, ready_order[1:]):
            closed_at = datetime.fromisoformat(records[socket_sessions[previous]]["closed_at"]).timestamp()
            slot_waits.append(released_wall + (first_ready[following] - released_at) - closed_at)
        report_time("slot free on record → next socket ready, worst", max(slot_waits))

        # Every broken promise is named at once: a run this long should tell all it found.
        problems: list[str] = []
        doubled = {index: len(messages) for index, messages in readies.items() if len(messages) != 1}
        if doubled:
            problems.append(f"sockets that got `ready` other than once (index: count): {doubled}")
        if ready_order != list(range(MAX_QUEUE)):
            problems.append(f"served out of connect order: {ready_order}")
        errors = {s.index: [m for _, m in s.of_type("error")] for s in sockets if s.of_type("error")}
        if errors:
            problems.append(f"queued sockets that got an error: {errors}")
        for queue_socket in sockets:
            index, queued = queue_socket.index, queue_socket.of_type("queued")
            places = [message["position"] for _, message in queued]
            gaps = [round(later - earlier, 2) for (earlier, _), (later, _) in zip(queued, queued[1:])]
            waited = first_ready[index] - queued[0][0] if index in first_ready else float("nan")
            if places != sorted(set(places), reverse=True):
                problems.append(f"socket {index}: places not strictly falling: {places}")
            # At most one update a second (0.3 s of delivery jitter allowed on a gap)...
            if any(gap < 0.7 for gap in gaps) or len(queued) - 1 > waited + 1:
                problems.append(f"socket {index}: {len(queued)} `queued` in {waited:.1f}s, gaps {gaps}")
            # ...but they do go out while the place moves.
            if waited > 3 and places[0] > 3 and len(queued) < 2:
                problems.append(f"socket {index}: no place update in {waited:.1f}s queued from place {places[0]}")
            if queue_socket.close_code != 1000:
                problems.append(f"socket {index}: closed {queue_socket.close_code}, not by itself (1000)")
        if reasons.keys() & {"SIGNALING_LOST", "WORKER_LOST"}:
            problems.append(f"liveness starved: {dict(reasons)}")
        if "is back after being declared gone" in server.log_text():
            problems.append("the worker was declared gone during the burst")
        # Every queued socket left on its own, long before any offer timeout: that is what the record must say.
        wrong = {index: records[session_id]["close_reason"] for index, session_id in socket_sessions.items()
                 if records[session_id]["close_reason"] != "CLIENT_DISCONNECT"}
        if wrong:
            problems.append(f"sockets that left at once, their sessions recorded otherwise (index: reason): {wrong}")
        if max(handoffs) > SWEEP + SLACK:
            problems.append(f"socket {ready_order[worst]} got `ready` {handoffs[worst]:.2f}s after the one before")
        if max(slot_waits) > SWEEP + SLACK:
            problems.append(f"a slot free on record waited {max(slot_waits):.2f}s for the next socket's `ready`")
        assert not problems, f"{len(problems)} problems:\n" + "\n".join(
            problems if len(problems) <= 12 else [*problems[:12], f"... and {len(problems) - 12} more"]
        )
        assert_idle(server, active_workers=1)
        await asyncio.to_thread(assert_nothing_left, server)

    async def test_a_deactivated_user_loses_their_session_within_a_heartbeat(
        self, one_slot_embedded: ScopeServer
    ) -> None:
        server = one_slot_embedded
        assert_idle(server, active_workers=1)
        async with ScopeClient() as client:
            peer = await connect_and_stream(client, server, "alice", pipeline="invert")
            try:
                await asyncio.to_thread(server.set_user_flags, "alice", is_active=False)
                deactivated_at = time.monotonic()
                close_code = await client.wait_closed(HEARTBEAT + SLACK)
                closed_after = report_time("user deactivated → socket closed", time.monotonic() - deactivated_at)
                await peer.wait_server_closed(2)
                report_time("user deactivated → peer closed by the server", time.monotonic() - deactivated_at)
                # Nor may the account come back in while deactivated.
                async with ScopeClient() as again:
                    await again.connect(server, "alice")
                    refusal = await again.expect("error")
                    refused_code = await again.wait_closed(5)
            finally:
                await asyncio.to_thread(server.set_user_flags, "alice", is_active=True)

        errors = [message for message in client.received if message.get("type") == "error"]
        assert close_code == 4009
        assert closed_after <= HEARTBEAT + BEAT_SLACK
        assert [(e["code"], e.get("sessionId")) for e in errors] == [("SESSION_TERMINATED", peer.session_id)], (
            f"the socket closed {close_code} having received {[m['type'] for m in client.received]}"
        )
        assert refusal["code"] == "UNAUTHORIZED" and refused_code == 4003
        record = server.closed_session(peer.session_id)
        assert record["close_reason"] == "SESSION_TERMINATED"
        assert [e["kind"] for e in record["events"]] == FULL_TRAIL
        assert_nothing_left(server)

    async def test_a_demoted_staff_member_loses_the_dashboard_within_a_heartbeat(
        self, one_slot_embedded: ScopeServer
    ) -> None:
        server = one_slot_embedded
        dashboard = await connect(
            f"ws://127.0.0.1:{server.port}/ws/dashboard/", additional_headers=server.auth_headers("staff"),
            origin=server.origin, proxy=None, open_timeout=10,
        )
        try:
            snapshot = json.loads(await asyncio.wait_for(dashboard.recv(), 10))
            assert snapshot.get("type") != "error", snapshot
            await asyncio.to_thread(server.set_user_flags, "staff", is_staff=False)
            demoted_at = time.monotonic()
            try:
                await asyncio.wait_for(dashboard.wait_closed(), HEARTBEAT + SLACK)
            finally:
                await asyncio.to_thread(server.set_user_flags, "staff", is_staff=True)
            closed_after = report_time("staff demoted → dashboard socket closed", time.monotonic() - demoted_at)
        finally:
            await dashboard.close()
        assert dashboard.close_code == 4003
        assert closed_after <= HEARTBEAT + BEAT_SLACK
        assert_nothing_left(server)
