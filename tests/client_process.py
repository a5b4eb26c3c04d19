"""A streaming client in a process of its own, so that a test can freeze or kill it.

``python -m tests.client_process <ws_url> <origin> <token>`` connects, streams
``invert``, prints one JSON line ``{"session_id": ...}`` once frames come
back, and then keeps streaming until it is stopped (or frozen, or killed).
"""

import asyncio
import json
import sys

from tests.peer import ScopeClient


class _Server:
    """The little of a ScopeServer that ScopeClient.connect reads."""

    def __init__(self, ws_url: str, origin: str) -> None:
        self.ws_url, self.origin = ws_url, origin


async def main(ws_url: str, origin: str, token: str) -> None:
    async with ScopeClient() as client:
        await client.connect(_Server(ws_url, origin), None, token=token)  # type: ignore[arg-type]
        await client.expect("ready")
        peer = await client.start_session(pipeline="invert")
        await peer.wait_connected()
        await peer.wait_frames(5)
        print(json.dumps({"session_id": peer.session_id}), flush=True)
        await client.closed.wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
