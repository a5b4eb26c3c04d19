"""Churn: what N connect → stream → close cycles leave behind in the embedded server.

Each cycle opens a socket, waits for ``ready``, streams 512×512 through
``invert`` until a few frames came back, and closes (socket first, as a client
that leaves does). A cycle that fails is counted and the run goes on. After the
last cycle and a settle time, it reads:

- ``peers_left``: the worker's ``peer_count`` (its heartbeat, via /api/v1/workers/)
  and ``slots_used``;
- ``sessions_not_closed``: sessions in each state other than ``closed``
  (/api/v1/sessions/?state=…), and the sessions created in all;
- the daphne process (which holds the worker in embedded mode) from /proc:
  RSS, open fds and threads, before the first cycle, after the first, at
  ``--checkpoint`` and after the last; ``rss_growth_mib`` is the last minus the
  checkpoint's;
- ``asyncio_tasks``: the tasks on the worker's event loop (daphne's, in
  embedded mode) as its heartbeat reports them, idle before the first cycle
  and idle after the last; ``asyncio_tasks_leaked`` is the difference.

Usage: .venv/bin/python -m bench.churn [--cycles 1000] [--checkpoint 100]
"""

import argparse
import asyncio
from typing import Any

from websockets.exceptions import WebSocketException

from bench.client import BenchClient, streaming
from bench.common import BareHandle, Server, emit, on_each, process_stats
from tests.harness import ScopeServer

PIPELINE = "invert"
FRAMES_PER_CYCLE = 5
SETTLE_SECONDS = 3.0  # more than one heartbeat (2 s), so peer_count is fresh
OPEN_STATES = ("waiting", "negotiating", "live", "closing")
ERRORS_KEPT = 5
FAILURE_CHARS = 500


def session_count(server: ScopeServer, state: str | None = None) -> int:
    query = {} if state is None else {"state": state}
    response = server.api("GET", "/api/v1/sessions/", params=query)
    response.raise_for_status()
    return response.json()["count"]


async def one_cycle(server: ScopeServer) -> str | None:
    """Connect, stream FRAMES_PER_CYCLE frames through PIPELINE, leave; why it failed (None: it did not)."""
    try:
        async with BenchClient() as client:
            await streaming(client, server, PIPELINE, frames=FRAMES_PER_CYCLE)
    except (AssertionError, OSError, WebSocketException) as exc:  # a finding: count it, go on
        return str(exc)
    return None


async def churn(server: ScopeServer, cycles: int, checkpoint: int) -> dict[str, Any]:
    assert server.web_process is not None
    pid = server.web_process.pid
    await asyncio.sleep(SETTLE_SECONDS)
    tasks_before = sum(w["asyncio_tasks"] for w in await asyncio.to_thread(server.workers))
    samples = {"before": process_stats(pid)}
    failures: list[str] = []
    for cycle in range(1, cycles + 1):
        if (failure := await one_cycle(server)) is not None:
            failures.append(f"cycle {cycle}: {failure}"[:FAILURE_CHARS])
        if cycle in (1, checkpoint, cycles):
            samples[f"cycle_{cycle}"] = process_stats(pid)
    await asyncio.sleep(SETTLE_SECONDS)
    workers = await asyncio.to_thread(server.workers)
    not_closed = {state: await asyncio.to_thread(session_count, server, state) for state in OPEN_STATES}
    last, at_checkpoint = samples[f"cycle_{cycles}"], samples.get(f"cycle_{checkpoint}")
    return {
        "cycles": cycles,
        "failed_cycles": len(failures),
        "failures": failures[:ERRORS_KEPT],
        "peers_left": [
            {"worker": w["id"], "pid": w["pid"], "peer_count": w["peer_count"], "slots_used": w["slots_used"]}
            for w in workers
        ],
        "sessions_created": await asyncio.to_thread(session_count, server),
        "sessions_not_closed": not_closed,
        "daphne_pid": pid,
        "process": samples,
        "rss_growth_mib": round(last["rss_mib"] - at_checkpoint["rss_mib"], 1) if at_checkpoint else None,
        "asyncio_tasks": {"before": tasks_before, "after": (tasks_after := sum(w["asyncio_tasks"] for w in workers))},
        "asyncio_tasks_leaked": tasks_after - tasks_before,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--checkpoint", type=int, default=100, help="the cycle whose RSS growth is measured from")
    args = parser.parse_args()

    async def run(server: Server) -> dict[str, Any]:
        assert not isinstance(server, BareHandle)
        return await churn(server, args.cycles, args.checkpoint)

    emit({"bench": "churn", "target": "embedded", "pipeline": PIPELINE, **on_each(["embedded"], run)["embedded"]})


if __name__ == "__main__":
    main()
