"""Capacity: the most concurrent 512×512 sessions one worker holds at ≥ 15 fps each.

Against each target (default: the embedded server, one worker in one process,
and the bare server), sessions are added one at a time (one socket each, the
30 fps indexed camera, ``--pipeline``); after each addition and a warm-up, every
session's received frame rate is measured over ``--seconds``. The ramp stops
at the first step where any session falls below ``--min-fps``; the capacity is
the step before. The client runs on the same machine and its own encoding and
decoding count against the same CPUs, so on a small machine this is the
capacity of server and client together: compare the ratio, not the count.

Usage: .venv/bin/python -m bench.capacity [--targets embedded,bare] [--pipeline invert] [--max-sessions 16]
       [--seconds 5] [--min-fps 15]
"""

import argparse
import asyncio
import statistics
from contextlib import AsyncExitStack
from typing import Any

from bench.client import BenchClient, BenchPeer, observe, streaming
from bench.common import Server, emit, on_each, target_list

WARMUP_SECONDS = 2.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=target_list, default=["embedded", "bare"])
    parser.add_argument("--pipeline", default="invert")
    parser.add_argument("--max-sessions", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--min-fps", type=float, default=15.0)
    args = parser.parse_args()

    async def ramp(server: Server) -> list[dict[str, Any]]:
        steps: list[dict[str, Any]] = []
        peers: list[BenchPeer] = []
        async with AsyncExitStack() as stack:
            while len(peers) < args.max_sessions:
                client = await stack.enter_async_context(BenchClient())
                peers.append(await streaming(client, server, args.pipeline))
                await asyncio.sleep(WARMUP_SECONDS)
                window = await observe(peers, args.seconds)
                steps.append({
                    "sessions": len(peers),
                    "min_fps": round(min(window.fps), 1),
                    "median_fps": round(statistics.median(window.fps), 1),
                    "latency_median_ms": round(statistics.median(window.latency_ms), 1) if window.latency_ms else None,
                })
                if min(window.fps) < args.min_fps:
                    break
        return steps

    by_target = on_each(args.targets, ramp, SCOPE_WORKER_CAPACITY=args.max_sessions)
    capacity = {
        target: max((step["sessions"] for step in steps if step["min_fps"] >= args.min_fps), default=0)
        for target, steps in by_target.items()
    }
    emit({
        "bench": "capacity",
        "size": "512x512",
        "camera_fps": 30,
        "pipeline": args.pipeline,
        "min_fps": args.min_fps,
        "max_sessions": args.max_sessions,
        "capacity": capacity,
        # True: every step held, so the capacity is at least --max-sessions.
        "reached_max_sessions": {target: steps[-1]["min_fps"] >= args.min_fps for target, steps in by_target.items()},
        "ratio_to_bare": {
            target: round(count / capacity["bare"], 2) if capacity.get("bare") else None
            for target, count in capacity.items() if target != "bare"
        },
        "steps": by_target,
    })


if __name__ == "__main__":
    main()
