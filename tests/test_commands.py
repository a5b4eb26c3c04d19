"""The operators' commands: sessions, terminate, workers, drainworker.

In-process with call_command against the test database, and once against a
real embedded server: ``manage.py terminate`` from another process ends a live
session, and its client hears SESSION_TERMINATED.
"""

import asyncio
import io
from collections.abc import Iterator
from datetime import UTC, timedelta

import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.core.management import CommandError, call_command
from django.utils import timezone

from sessions_app import services
from sessions_app.management.commands import terminate
from sessions_app.models import StreamSession, Worker
from tests.harness import ScopeServer, _manage, start_embedded
from tests.peer import ScopeClient
from tests.test_lifecycle import FULL_TRAIL, connect_and_stream

in_process_db = pytest.mark.django_db(transaction=True)  # services send their messages on commit


def run(*args: str) -> tuple[str, str]:
    """``manage.py args`` in this process: its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    call_command(*args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def fails(*args: str) -> tuple[str, str, str]:
    """``manage.py args``, which must fail: the error, stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with pytest.raises(CommandError) as failure:
        call_command(*args, stdout=out, stderr=err)
    return str(failure.value), out.getvalue(), err.getvalue()


def table(stdout: str) -> list[list[str]]:
    """A command's table, one list of cells per row, the header row first."""
    return [line.split() for line in stdout.splitlines()]


def register(name: str = "w1", capacity: int = 2) -> Worker:
    return services.worker_register(channel_name=f"test!{name}", host=f"host-{name}", pid=4242, device="cpu",
                                    capacity=capacity)


def live_session(owner=None) -> StreamSession:
    session = services.session_create_placed(owner=owner)
    services.session_offer(session_id=str(session.pk), pipeline="invert", parameters={}, ignored_parameters=[],
                           sdp="v=0", sdp_type="offer", reply_channel="test!reply")
    services.session_live(session_id=str(session.pk))
    return StreamSession.objects.select_related("worker").get(pk=session.pk)


def received(channel: str) -> list[dict]:
    """Every message waiting on ``channel`` in this process's channel layer."""
    layer = get_channel_layer()

    async def drain() -> list[dict]:
        messages = []
        while True:
            try:
                messages.append(await asyncio.wait_for(layer.receive(channel), 0.05))
            except asyncio.TimeoutError:
                return messages

    return async_to_sync(drain)()


def closing_by(session: StreamSession) -> str:
    return session.events.get(kind="closing").detail["by"]


@pytest.fixture
def operator_named(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("SUDO_USER", "ops-anna")
    return "command:ops-anna"


# --- sessions ------------------------------------------------------------------------


@in_process_db
def test_sessions_lists_what_is_not_closed_unless_asked(alice, empty_channel_layer) -> None:
    worker = register()
    live = live_session(owner=alice)
    ended = live_session()
    services.session_close(session_id=str(ended.pk), reason="CLIENT_DISCONNECT", by="test")
    services.session_closed(session_id=str(ended.pk), steps=[])
    queued = services.session_create(owner=None)  # last: no slot is given past a queued session

    rows = table(run("sessions")[0])
    assert rows[0] == ["ID", "STATE", "OWNER", "PIPELINE", "WORKER", "CREATED", "REASON"]
    assert [row[:5] + row[6:] for row in rows[1:]] == [
        [str(live.pk), "live", "alice", "invert", str(worker.pk), "-"],
        [str(queued.pk), "waiting", "-", "-", "-", "-"],
    ]
    assert rows[1][5] == live.created_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    closed_rows = table(run("sessions", "--state", "closed")[0])[1:]
    assert [(row[0], row[1], row[-1]) for row in closed_rows] == [(str(ended.pk), "closed", "CLIENT_DISCONNECT")]
    both = table(run("sessions", "--state", "waiting", "--state", "closed")[0])[1:]
    assert {row[0] for row in both} == {str(queued.pk), str(ended.pk)}
    assert run("sessions", "--state", "negotiating")[0].strip() == "No sessions."
    with pytest.raises(CommandError):
        run("sessions", "--state", "bored")


# --- terminate -----------------------------------------------------------------------


@in_process_db
def test_terminate_goes_through_the_close_path(alice, empty_channel_layer, operator_named) -> None:
    register()
    live = live_session(owner=alice)
    queued = services.session_create(owner=alice)
    received(live.worker.channel_name)  # the offer

    stdout, stderr = run("terminate", str(live.pk), str(queued.pk))

    lines = stdout.splitlines()
    assert lines[:2] == [f"{live.pk}: terminated", f"{queued.pk}: terminated"]
    assert lines[2].startswith("Embedded server: its sweep tears these sessions' peers down within 4 s")
    assert stderr == ""
    live.refresh_from_db()
    queued.refresh_from_db()
    # The live one waits for its worker's teardown, which was asked for; the queued one had nothing to tear down.
    assert (live.state, live.close_reason) == ("closing", "SESSION_TERMINATED")
    assert (queued.state, queued.close_reason) == ("closed", "SESSION_TERMINATED")
    assert closing_by(live) == closing_by(queued) == operator_named
    assert received(live.worker.channel_name) == [
        {"type": "peer.close", "session_id": str(live.pk), "reason": "SESSION_TERMINATED"}
    ]

    # Idempotent, as every close is: a session that already ended keeps its reason.
    assert run("terminate", str(live.pk))[0].splitlines()[0] == f"{live.pk}: had already ended"
    assert received(live.worker.channel_name) == []


@in_process_db
def test_terminate_reports_unknown_ids_and_still_ends_the_others(empty_channel_layer) -> None:
    register()
    first, second = live_session(), live_session()
    unknown = "00000000-0000-4000-8000-000000000000"

    error, stdout, stderr = fails("terminate", str(first.pk), unknown, "not-a-session", str(second.pk))

    assert "2 of 4 sessions not found" in error and unknown in error and "not-a-session" in error
    assert stderr.splitlines() == [f"{unknown}: no such session", "not-a-session: no such session"]
    assert f"{first.pk}: terminated" in stdout and f"{second.pk}: terminated" in stdout
    assert set(StreamSession.objects.values_list("close_reason", flat=True)) == {"SESSION_TERMINATED"}


@in_process_db
def test_terminate_all_ends_every_open_session(alice, bob, empty_channel_layer, operator_named) -> None:
    register(capacity=2)
    sessions = [live_session(owner=alice), live_session(owner=bob), services.session_create(owner=None)]
    assert "No open sessions." not in run("terminate", "--all")[0]
    assert {(s.state, s.close_reason) for s in StreamSession.objects.all()} == {
        ("closing", "SESSION_TERMINATED"), ("closed", "SESSION_TERMINATED")
    }
    assert {closing_by(s) for s in sessions} == {operator_named}
    assert run("terminate", "--all")[0].strip() == "No open sessions."


@in_process_db
def test_terminate_wants_ids_or_all() -> None:
    assert "not both" in fails("terminate")[0]
    assert "not both" in fails("terminate", "--all", "00000000-0000-4000-8000-000000000000")[0]


def test_the_operator_is_the_user_behind_sudo_else_the_login_else_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "ops-anna")
    assert terminate.operator() == "ops-anna"
    monkeypatch.delenv("SUDO_USER")
    monkeypatch.setattr(terminate.getpass, "getuser", lambda: "ops-ben")
    assert terminate.operator() == "ops-ben"

    def nobody() -> str:
        raise OSError("no username for this uid")

    monkeypatch.setattr(terminate.getpass, "getuser", nobody)
    assert terminate.operator() == "cli"


# --- workers -------------------------------------------------------------------------


@in_process_db
def test_workers_shows_slots_and_heartbeat_age(empty_channel_layer) -> None:
    busy, idle, long_gone = register("w1", capacity=2), register("w2", capacity=3), register("w3")
    live_session()
    Worker.objects.filter(pk=idle.pk).update(heartbeat_at=timezone.now() - timedelta(seconds=90))
    Worker.objects.filter(pk=long_gone.pk).update(state="gone", heartbeat_at=timezone.now() - timedelta(hours=2))

    rows = table(run("workers")[0])
    assert rows[0] == ["ID", "HOST", "PID", "DEVICE", "STATE", "SLOTS", "HEARTBEAT"]
    assert [row[:6] for row in rows[1:]] == [
        [str(busy.pk), "host-w1", "4242", "cpu", "active", "1/2"],
        [str(idle.pk), "host-w2", "4242", "cpu", "active", "0/3"],
    ]
    assert float(rows[1][6].removesuffix("s")) < 5  # registered just now (the database's clock)
    assert rows[2][6].startswith("1m3")  # 90 s and the time this test took

    every = table(run("workers", "--all")[0])
    assert [row[0] for row in every[1:]] == [str(busy.pk), str(idle.pk), str(long_gone.pk)]
    assert every[3][4] == "gone" and every[3][6].startswith("2h")


@in_process_db
def test_workers_with_none() -> None:
    assert run("workers")[0].strip() == "No workers."


# --- drainworker ---------------------------------------------------------------------


@in_process_db
def test_drainworker_stops_placement_and_lets_sessions_go_on(empty_channel_layer) -> None:
    draining, other = register("w1", capacity=2), register("w2", capacity=1)
    kept = live_session()
    assert kept.worker_id == draining.pk  # least loaded, lowest id
    received(draining.channel_name)

    stdout, _ = run("drainworker", str(draining.pk))

    assert stdout.strip() == f"worker {draining.pk} is draining: no new session is placed on it; the session it holds goes on."
    draining.refresh_from_db()
    assert draining.state == "draining"
    kept.refresh_from_db()
    assert kept.state == "live" and kept.worker_id == draining.pk
    assert received(draining.channel_name) == []  # nothing told its peer to close
    # Placement passes it by, though it has a free slot: the other worker, then none.
    assert services.session_create_placed(owner=None).worker_id == other.pk
    with pytest.raises(services.ScopeError) as refused:
        services.session_create_placed(owner=None)
    assert refused.value.code == "NO_CAPACITY"
    assert table(run("workers")[0])[1][4:6] == ["draining", "1/2"]
    assert "(it already was)" in run("drainworker", str(draining.pk))[0]


@in_process_db
def test_drainworker_refuses_unknown_and_gone_workers() -> None:
    gone = register()
    services.worker_retire(worker_id=gone.pk)
    assert fails("drainworker", "999")[0] == "no worker 999"
    assert "is gone" in fails("drainworker", str(gone.pk))[0]
    assert Worker.objects.get(pk=gone.pk).state == "gone"


# --- against a real server -----------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScopeServer]:
    with start_embedded(tmp_path_factory.mktemp("commands")) as server:
        yield server


def manage(server: ScopeServer, *args: str) -> str:
    """``manage.py args`` in a process of its own, with the server's environment and an operator's name."""
    return _manage(list(args), {**server.env, "SUDO_USER": "ops-anna"}, server.logs_dir, f"manage-{args[0]}")


async def test_terminate_from_a_shell_ends_a_live_session_for_its_client(server: ScopeServer) -> None:
    async with ScopeClient() as client:
        peer = await connect_and_stream(client, server, "alice", pipeline="invert")
        listed = await asyncio.to_thread(manage, server, "sessions", "--state", "live")
        assert [row[:3] for row in table(listed)[1:]] == [[peer.session_id, "live", "alice"]]
        workers = table(await asyncio.to_thread(manage, server, "workers"))
        assert [row[4:6] for row in workers[1:]] == [["active", "1/4"]]

        output = await asyncio.to_thread(manage, server, "terminate", peer.session_id)
        assert f"{peer.session_id}: terminated" in output
        # Embedded, the command's process cannot reach the server's worker: the server's sweep re-sends the close.
        error = await client.expect("error", timeout=8, sessionId=peer.session_id)
        assert error["code"] == "SESSION_TERMINATED"
        assert await client.wait_closed(2) == 4009
        await peer.wait_server_closed(2)

    record = server.closed_session(peer.session_id)
    assert record["close_reason"] == "SESSION_TERMINATED"
    assert [event["kind"] for event in record["events"]] == FULL_TRAIL
    assert next(e for e in record["events"] if e["kind"] == "closing")["detail"]["by"] == "command:ops-anna"
    assert "No sessions." in await asyncio.to_thread(manage, server, "sessions")
