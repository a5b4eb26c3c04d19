"""Media: frame rate and glass-to-glass latency at 512×512, per pipeline, and latency when the pipeline is slow.

Each client sends a 30 fps 512×512 camera whose frames carry their index in
the pixels (bench.framecode: robust to VP8 and to every built-in pipeline), and
reads the index back from each processed frame. Glass-to-glass latency is the
frame's arrival at the client minus its capture, both on the client's clock:
client encode, network, server decode, pipeline, server encode, client decode.

For each pipeline, with 1 session and with ``--sessions`` N at once (one socket
each), after a warm-up, over ``--seconds``:
- ``fps``: processed frames received per second, per session (worse = lower);
- ``latency_ms``: every readable frame's latency, all sessions pooled;
- ``readable``: the share of received frames whose index could be read.

``slow``: one session through ``bench_slow`` (bench.slow_pipeline, ``--slow-delay-ms``
per frame: slower than the camera) for ``--slow-seconds``. With latest-frame-wins
the latency stays flat; a queue would grow it by seconds per second.
``growth_ms`` is the last quarter's median latency minus the first quarter's,
``slope_ms_per_s`` a least-squares fit over the run; ``flat`` means growth <
50 ms.

The client shares the machine with the server: on a small machine its own
encoding and decoding are part of what limits N sessions.

Usage: .venv/bin/python -m bench.media [--targets embedded,scaled,bare] [--sessions 4] [--seconds 10]
       [--pipelines passthrough,invert,grayscale,edges,blur] [--slow-seconds 60] [--slow-delay-ms 100]
"""

import argparse
import asyncio
import statistics
from contextlib import AsyncExitStack
from typing import Any

from bench.client import BenchClient, Window, observe, streaming
from bench.common import TARGETS, Server, compare, emit, on_each, target_list

BUILTIN_PIPELINES = "passthrough,invert,grayscale,edges,blur"
SLOW_PIPELINE = "bench_slow"
WARMUP_SECONDS = 2.0
FLAT_GROWTH_MS = 50.0


async def measure(server: Server, pipeline: str, sessions: int, seconds: float, **params: Any) -> Window:
    async with AsyncExitStack() as stack:
        peers = [
            await streaming(await stack.enter_async_context(BenchClient()), server, pipeline, params)
            for _ in range(sessions)
        ]
        await asyncio.sleep(WARMUP_SECONDS)
        return await observe(peers, seconds)


def flatness(timeline: list[tuple[float, float]], seconds: float) -> dict[str, Any]:
    """Latency trend over a run: first vs last quarter, and the least-squares slope."""
    first = [latency for at, latency in timeline if at < seconds / 4]
    last = [latency for at, latency in timeline if at >= seconds * 3 / 4]
    if len(first) < 2 or len(last) < 2:
        return {"flat": None, "reason": "too few readable frames"}
    growth = statistics.median(last) - statistics.median(first)
    slope = statistics.linear_regression([at for at, _ in timeline], [latency for _, latency in timeline]).slope
    return {
        "first_quarter_median_ms": round(statistics.median(first), 1),
        "last_quarter_median_ms": round(statistics.median(last), 1),
        "growth_ms": round(growth, 1),
        "slope_ms_per_s": round(slope, 2),
        "flat": growth < FLAT_GROWTH_MS,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=target_list, default=list(TARGETS))
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--pipelines", default=BUILTIN_PIPELINES)
    parser.add_argument("--slow-seconds", type=float, default=60.0)
    parser.add_argument("--slow-delay-ms", type=int, default=100)
    args = parser.parse_args()
    pipelines = args.pipelines.split(",")
    counts = sorted({1, args.sessions})

    async def run(server: Server) -> dict[str, Any]:
        windows = {
            (pipeline, count): await measure(server, pipeline, count, args.seconds)
            for pipeline in pipelines for count in counts
        }
        slow = await measure(server, SLOW_PIPELINE, 1, args.slow_seconds, delay_ms=args.slow_delay_ms)
        return {"windows": windows, "slow": slow}

    by_target = on_each(args.targets, run, SCOPE_WORKER_CAPACITY=max(4, args.sessions))

    def figures_of(windows: dict[str, Window]) -> dict[str, Any]:
        return {
            "fps": compare({target: w.fps for target, w in windows.items()}, worse="lower"),
            "latency_ms": compare({target: w.latency_ms for target, w in windows.items()}),
            "readable": {target: w.readable for target, w in windows.items()},
        }

    emit({
        "bench": "media",
        "size": "512x512",
        "camera_fps": 30,
        "seconds": args.seconds,
        "pipelines": {
            pipeline: {
                f"{count}_sessions": figures_of({t: r["windows"][pipeline, count] for t, r in by_target.items()})
                for count in counts
            }
            for pipeline in pipelines
        },
        "slow": {
            "pipeline": SLOW_PIPELINE,
            "delay_ms": args.slow_delay_ms,
            "seconds": args.slow_seconds,
            **figures_of({target: r["slow"] for target, r in by_target.items()}),
            "trend": {target: flatness(r["slow"].timeline, args.slow_seconds) for target, r in by_target.items()},
        },
    })


if __name__ == "__main__":
    main()
