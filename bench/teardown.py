"""Teardown: how long each way of ending a session takes to let go of the peer.

Each target runs N cycles of connect → stream (512×512, invert) → end, ended
three ways. Figures in milliseconds:

``socket_close`` (the client closes its signaling socket):
- ``peer_closed``: close → the peer closed on the worker (its ``peer_closed``
  event; bare: the server's own note), server clock vs client clock, one machine;
- ``closed``: close → the record's ``closed`` event (project only);
- ``dtls_seen``: close → the client seeing its DTLS transport closed;
- ``last_frame``: close → the last processed frame at the client (negative:
  it came before the close).

``request_close`` (the owner asks): ``ack`` is the round trip of
``DELETE /api/v1/webrtc/offer/{id}`` → 204, as curl measures it (bare: ``close`` → ``closed`` on
its socket), ``peer_closed`` the request → the peer closed.

``max_duration`` (project only, a server with SCOPE_MAX_SESSION_SECONDS small):
lateness of the ``closing``, ``peer_closed`` and ``closed`` events after the
session's ``deadline_at``.

Usage: .venv/bin/python -m bench.teardown [--targets embedded,scaled,bare] [--cycles 10] [--max-seconds 2]
"""

import argparse
import asyncio
import time
import uuid
from datetime import datetime

from bench.client import BenchClient, streaming
from bench.common import (
    PROJECT_TARGETS,
    TARGETS,
    BareHandle,
    Server,
    emit,
    figures,
    on_each,
    target_list,
)
from tests.harness import ScopeServer, event_time

Cycle = dict[str, float | None]
SETTLE_SECONDS = 1.0
PIPELINE = "invert"
DEADLINE_SLACK_SECONDS = 10.0


async def peer_closed_at(server: Server, session_id: str) -> tuple[float, float | None]:
    """When the server closed the peer, and (project) when the record read closed; Unix times."""
    if isinstance(server, BareHandle):
        return await server.peer_closed_at(session_id), None
    record = await asyncio.to_thread(server.closed_session, session_id)
    return event_time(record, "peer_closed"), event_time(record, "closed")


def ms_since(moment: float, later: float | None) -> float | None:
    return None if later is None else (later - moment) * 1000


async def socket_close_cycle(server: Server) -> Cycle:
    async with BenchClient() as client:
        peer = await streaming(client, server, PIPELINE, frames=10)
        closed_wall, closed_mono = time.time(), time.monotonic()
        await client.close_socket()
        await peer.wait_server_closed(5)
        dtls_seen = time.monotonic() - closed_mono
        await asyncio.sleep(SETTLE_SECONDS)
        last_frame = peer.last_frame_at - closed_mono
    peer_closed, closed = await peer_closed_at(server, peer.session_id)
    return {
        "peer_closed": ms_since(closed_wall, peer_closed),
        "closed": ms_since(closed_wall, closed),
        "dtls_seen": dtls_seen * 1000,
        "last_frame": last_frame * 1000,
    }


async def request_close(client: BenchClient, server: Server, session_id: str) -> float:
    """DELETE as the owner (project) or ``close`` on the socket (bare); seconds until acknowledged.

    The DELETE is sent by curl, a client of its own: from this process, whose
    loop and GIL are busy decoding video, the round trip would include tens of
    milliseconds of the bench's own waiting. curl's ``time_total`` is the HTTP
    round trip as a separate caller (an operator's script) sees it.
    """
    if isinstance(server, BareHandle):
        request_id = uuid.uuid4().hex
        started = time.monotonic()
        await client.send({"type": "close", "sessionId": session_id, "request_id": request_id})
        await client.expect("closed", request_id=request_id)
        return time.monotonic() - started
    curl = await asyncio.create_subprocess_exec(
        "curl", "--silent", "--noproxy", "*", "--output", "/dev/null", "--write-out", "%{http_code} %{time_total}",
        "--request", "DELETE", "--header", f"Authorization: Token {server.tokens['alice']}",
        f"{server.base_url}/api/v1/webrtc/offer/{session_id}",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(curl.communicate(), 10)
    code, seconds = out.decode().split()
    if code != "204":
        raise AssertionError(f"DELETE answered {code}")
    return float(seconds)


async def request_close_cycle(server: Server) -> Cycle:
    async with BenchClient() as client:
        peer = await streaming(client, server, PIPELINE, frames=10)
        sent_wall = time.time()
        ack = await request_close(client, server, peer.session_id)
        await peer.wait_server_closed(5)
    peer_closed, _ = await peer_closed_at(server, peer.session_id)
    return {"ack": ack * 1000, "peer_closed": ms_since(sent_wall, peer_closed)}


async def max_duration_cycle(server: ScopeServer, max_seconds: float) -> Cycle:
    async with BenchClient() as client:
        peer = await streaming(client, server, PIPELINE, frames=10)
        await client.wait_closed(max_seconds + DEADLINE_SLACK_SECONDS)
    record = await asyncio.to_thread(server.closed_session, peer.session_id)
    if record["close_reason"] != "MAX_DURATION_EXCEEDED":
        raise AssertionError(f"session {peer.session_id} closed as {record['close_reason']}, not by its deadline")
    deadline = datetime.fromisoformat(record["deadline_at"]).timestamp()
    return {kind: ms_since(deadline, event_time(record, kind)) for kind in ("closing", "peer_closed", "closed")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=target_list, default=list(TARGETS))
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--max-seconds", type=float, default=2.0, help="SCOPE_MAX_SESSION_SECONDS for max_duration")
    args = parser.parse_args()

    async def closes(server: Server) -> dict[str, list[Cycle]]:
        return {
            "socket_close": [await socket_close_cycle(server) for _ in range(args.cycles)],
            "request_close": [await request_close_cycle(server) for _ in range(args.cycles)],
        }

    async def deadlines(server: Server) -> list[Cycle]:
        assert isinstance(server, ScopeServer)
        return [await max_duration_cycle(server, args.max_seconds) for _ in range(args.cycles)]

    by_target = on_each(args.targets, closes)
    project = [target for target in args.targets if target in PROJECT_TARGETS]
    late = on_each(project, deadlines, SCOPE_MAX_SESSION_SECONDS=args.max_seconds)
    emit({
        "bench": "teardown",
        "unit": "ms",
        "cycles": args.cycles,
        "pipeline": PIPELINE,
        "max_session_seconds": args.max_seconds,
        **{
            section: figures({target: results[section] for target, results in by_target.items()})
            for section in ("socket_close", "request_close")
        },
        "max_duration": figures(late),
    })


if __name__ == "__main__":
    main()
