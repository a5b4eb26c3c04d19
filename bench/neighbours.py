"""Neighbours: what streaming sessions see while other sessions come and go on the same worker.

Against the embedded server: ``--steady`` 512×512 ``invert`` sessions stream
the 30 fps indexed camera while, beside them, one client after another
connects, streams a few frames through its own session and leaves (as in
``bench.churn``), for ``--seconds``. A session's setup and teardown should cost
its neighbours nothing they see. Reported for the steady sessions, over the
window: glass-to-glass latency (p50, p99, p99.9 and the worst frame, pooled)
and the longest gap between two frames any one of them received; the cycles
done and failed; and from the server's metrics, how often Python's garbage
collector ran a full collection (generation 2) meanwhile and the longest one,
as the upper bound of its histogram bucket (``scope_gc_pause_seconds``): while
it runs, every session's frames wait. ``--runs`` repeats it on a fresh
server each time; ``--pin`` puts the server on core 0 and the client on core 1.

The worst frame and the longest gap include the client's own stalls: one
event loop runs the steady sessions' receivers and the churning sessions'
setups and teardowns (aiortc joins a closing receiver's decoder thread on the
loop), and held it for up to ~100 ms at a time on the bench machine. The
collections are the server's own figures.

Usage: .venv/bin/python -m bench.neighbours [--steady 3] [--seconds 120] [--runs 2] [--pin]
"""

import argparse
import asyncio
import math
import time
from contextlib import AsyncExitStack
from typing import Any

from bench.churn import ERRORS_KEPT, FAILURE_CHARS, PIPELINE, one_cycle
from bench.client import BenchClient, streaming
from bench.common import Server, emit, nearest_rank, on_each, pin_client, spread, summary
from tests.test_metrics import Samples, scrape, value

WARMUP_SECONDS = 2.0
FULL_COLLECTION = "2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steady", type=int, default=3, help="sessions streaming throughout")
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--pin", action="store_true", help="the server on core 0, the client on core 1")
    args = parser.parse_args()
    pinning = pin_client() if args.pin else None

    async def measure(server: Server) -> dict[str, Any]:
        async with AsyncExitStack() as stack:
            steady = [
                await streaming(await stack.enter_async_context(BenchClient()), server, PIPELINE)
                for _ in range(args.steady)
            ]
            await asyncio.sleep(WARMUP_SECONDS)
            before = await asyncio.to_thread(scrape, server, "staff")
            start = time.monotonic()
            cycles, failures = 0, []
            while time.monotonic() - start < args.seconds:
                if (failure := await one_cycle(server)) is None:
                    cycles += 1
                else:
                    failures.append(f"cycle {cycles + len(failures) + 1}: {failure}"[:FAILURE_CHARS])
            end = time.monotonic()
            after = await asyncio.to_thread(scrape, server, "staff")
        latencies = [latency for peer in steady for latency in peer.latencies_ms(start, end)]
        return {
            "cycles": cycles,
            "failed_cycles": len(failures),
            "failures": failures[:ERRORS_KEPT],
            "steady_latency_ms": summary(latencies),
            "steady_latency_p999_ms": round(nearest_rank(sorted(latencies), 0.999), 1) if latencies else None,
            "steady_longest_gap_ms": max(_longest_gap_ms(peer.latencies, start, end) for peer in steady),
            "full_collections": _full_collections(before, after),
        }

    runs = [on_each(["embedded"], measure, pin=args.pin, SCOPE_WORKER_CAPACITY=args.steady + 1)["embedded"]
            for _ in range(args.runs)]
    emit({
        "bench": "neighbours",
        "target": "embedded",
        "size": "512x512",
        "camera_fps": 30,
        "pipeline": PIPELINE,
        "steady_sessions": args.steady,
        "seconds": args.seconds,
        "pinned": pinning,
        "runs": runs,
        "spread": {
            "steady_p99_ms": spread([run["steady_latency_ms"]["p99"] for run in runs if run["steady_latency_ms"]]),
            "steady_p999_ms": spread([run["steady_latency_p999_ms"] for run in runs]),
            "steady_longest_gap_ms": spread([run["steady_longest_gap_ms"] for run in runs]),
        },
    })


def _longest_gap_ms(arrivals: list[tuple[float, float]], start: float, end: float) -> float:
    times = [arrived for arrived, _ in arrivals if start <= arrived < end]
    return round(max((later - earlier for earlier, later in zip(times, times[1:])), default=end - start) * 1000, 1)


def _full_collections(before: Samples, after: Samples) -> dict[str, Any]:
    """Full collections run between two scrapes: how many, their total, and the bucket bound of the longest."""
    def counted(samples: Samples, name: str, **labels: str) -> float:
        return value(samples, name, generation=FULL_COLLECTION, **labels) or 0.0

    count = counted(after, "scope_gc_pause_seconds_count") - counted(before, "scope_gc_pause_seconds_count")
    bounds = sorted(
        (float(dict(labels)["le"]), dict(labels)["le"]) for name, labels in after
        if name == "scope_gc_pause_seconds_bucket" and dict(labels).get("generation") == FULL_COLLECTION
    )
    longest = next(
        (bound for bound, le in bounds
         if counted(after, "scope_gc_pause_seconds_bucket", le=le) - counted(before, "scope_gc_pause_seconds_bucket", le=le)
         == count),
        None,
    )
    total = counted(after, "scope_gc_pause_seconds_sum") - counted(before, "scope_gc_pause_seconds_sum")
    return {"count": int(count), "total_ms": round(total * 1000, 1), "longest_at_most_ms": _ms(longest) if count else 0}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None or math.isinf(seconds) else round(seconds * 1000, 1)


if __name__ == "__main__":
    main()
