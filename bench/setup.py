"""Setup: how long each step from opening the socket to the first processed frame takes.

Each target runs N cycles of a fresh client streaming 512×512 frames through
``invert``, and times each step on the client's clock, in milliseconds:

- ``connect_ready``: opening the signaling socket → ``ready``;
- ``offer_answer``: the ``offer`` sent → the ``answer`` taken (the server's
  negotiation: placement, peer creation, SDP);
- ``answer_connected``: the answer → connectionState ``connected`` (ICE and DTLS);
- ``connected_first_frame``: connected → the first processed frame back;
- ``total``: opening the socket → the first processed frame (includes the
  client's own offer creation, between ``ready`` and ``offer``).

Usage: .venv/bin/python -m bench.setup [--targets embedded,scaled,bare] [--cycles 20]
"""

import argparse
import time

from bench.client import BenchClient, streaming
from bench.common import TARGETS, Server, emit, figures, on_each, target_list

PIPELINE = "invert"


async def one_cycle(server: Server) -> dict[str, float | None]:
    async with BenchClient() as client:
        started = time.monotonic()
        peer = await streaming(client, server, PIPELINE)
    steps = {
        "ready": client.taken_at["ready"],
        "offer": client.sent_at["offer"],
        "answer": client.taken_at["answer"],
        "connected": peer.connected_at,
        "first_frame": peer.frames[0][0],
    }
    return {
        "connect_ready": (steps["ready"] - started) * 1000,
        "offer_answer": (steps["answer"] - steps["offer"]) * 1000,
        "answer_connected": (steps["connected"] - steps["answer"]) * 1000,
        "connected_first_frame": (steps["first_frame"] - steps["connected"]) * 1000,
        "total": (steps["first_frame"] - started) * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=target_list, default=list(TARGETS))
    parser.add_argument("--cycles", type=int, default=20)
    args = parser.parse_args()

    async def cycles(server: Server) -> list[dict[str, float | None]]:
        return [await one_cycle(server) for _ in range(args.cycles)]

    emit({
        "bench": "setup",
        "unit": "ms",
        "cycles": args.cycles,
        "pipeline": PIPELINE,
        **figures(on_each(args.targets, cycles)),
    })


if __name__ == "__main__":
    main()
