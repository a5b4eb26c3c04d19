"""One client's flood of parameter updates must not slow another client's session.

Updates are coalesced per session (the latest wins) and a pipeline rebuild
never runs on the thread that serves every session's frames.
"""

import asyncio
import time

from tests.harness import ScopeServer
from tests.peer import ClientPeer, ScopeClient
from tests.test_lifecycle import connect_and_stream

WINDOW_SECONDS = 6.0
UPDATES_PER_SECOND = 100


async def frames_per_second(peer: ClientPeer, seconds: float) -> float:
    start = time.monotonic()
    await asyncio.sleep(seconds)
    return len(peer.frames_since(start)) / seconds


def update_number(n: int) -> dict:
    """Every update switches pipeline: the costliest kind, a rebuild each time."""
    return {"pipeline": "blur", "radius": 1 + n % 5} if n % 2 else {"pipeline": "edges", "strength": 2.0}


async def flood(peer: ClientPeer, seconds: float) -> int:
    """Parameter updates on the data channel at UPDATES_PER_SECOND; how many were sent."""
    sent = 0
    stop_at = time.monotonic() + seconds
    while time.monotonic() < stop_at:
        await peer.send_parameters_over_datachannel(update_number(sent))
        sent += 1
        await asyncio.sleep(1 / UPDATES_PER_SECOND)
    return sent


async def test_a_flood_of_parameter_updates_leaves_another_session_its_frame_rate(
    embedded_server: ScopeServer,
) -> None:
    async with ScopeClient() as victim_client, ScopeClient() as flooder_client:
        victim = await connect_and_stream(victim_client, embedded_server, "alice", pipeline="invert")
        flooder = await connect_and_stream(flooder_client, embedded_server, "bob", pipeline="blur")
        alone = await frames_per_second(victim, WINDOW_SECONDS)
        sent, flooded = await asyncio.gather(
            flood(flooder, WINDOW_SECONDS), frames_per_second(victim, WINDOW_SECONDS)
        )
        # The flooder's session still streams, and runs its last update (coalescing drops only the ones between).
        await flooder.wait_frames(len(flooder.frames) + 5)
        last = update_number(sent - 1)
        await embedded_server.wait_until_async(
            lambda: {"pipeline": (record := embedded_server.session(flooder.session_id))["pipeline"],
                     **record["parameters"]} == last,
            10, what="the flooder's last update recorded",
        )

    print(f"victim fps alone {alone:.1f}, during {sent} updates {flooded:.1f} ({flooded / alone:.2f}x)")
    assert sent >= UPDATES_PER_SECOND * WINDOW_SECONDS * 0.5
    assert alone > 10
    assert flooded >= 0.9 * alone
