"""Time from the client closing its signaling socket to the server closing the peer.

Starts the server (embedded, or scaled with two mediaworkers over Redis), then
runs N connect → stream → close cycles with a real aiortc client. For each
cycle it prints, in milliseconds:

- ``peer_closed``: socket close (client clock) → the worker's ``peer_closed``
  event (server clock; same machine, same clock);
- ``closed``: socket close → the record reading ``closed``;
- ``dtls_seen``: socket close → the client seeing its DTLS transport closed;
- ``last_frame``: socket close → the last processed frame the client got
  (negative: it came before the close).

Usage: .venv/bin/python -m bench.teardown [--mode embedded|scaled] [--cycles 10]
"""

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

from tests.harness import ScopeServer, event_time, start_embedded, start_scaled
from tests.peer import ScopeClient

SETTLE_SECONDS = 1.0


async def one_cycle(server: ScopeServer) -> dict[str, float]:
    async with ScopeClient() as client:
        await client.connect(server, "alice")
        await client.expect("ready")
        peer = await client.start_session(pipeline="invert")
        await peer.wait_connected()
        await peer.wait_frames(10)
        closed_wall, closed_mono = time.time(), time.monotonic()
        await client.close_socket()
        await peer.wait_server_closed(5)
        dtls_seen = time.monotonic() - closed_mono
        await asyncio.sleep(SETTLE_SECONDS)
        last_frame = peer.last_frame_at - closed_mono
    record = await asyncio.to_thread(server.closed_session, peer.session_id)
    return {
        "peer_closed": (event_time(record, "peer_closed") - closed_wall) * 1000,
        "closed": (event_time(record, "closed") - closed_wall) * 1000,
        "dtls_seen": dtls_seen * 1000,
        "last_frame": last_frame * 1000,
    }


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "median": round(statistics.median(ordered), 1),
        "p90": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 1),
        "worst": round(ordered[-1], 1),
    }


async def run(server: ScopeServer, cycles: int) -> list[dict[str, float]]:
    return [await one_cycle(server) for _ in range(cycles)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["embedded", "scaled"], default="embedded")
    parser.add_argument("--cycles", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        start = start_embedded if args.mode == "embedded" else start_scaled
        with start(Path(tmp)) as server:
            results = asyncio.run(run(server, args.cycles))
    print(json.dumps({
        "mode": args.mode,
        "cycles": args.cycles,
        "ms": {key: summary([r[key] for r in results]) for key in results[0]},
    }, indent=2))


if __name__ == "__main__":
    main()
