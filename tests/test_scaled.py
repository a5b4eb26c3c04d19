"""The scaled shape: daphne and two mediaworker processes over a real Redis channel layer."""

import asyncio
import time

from tests.harness import ScopeServer
from tests.peer import ScopeClient
from tests.test_lifecycle import FULL_TRAIL, live_peer


async def test_close_reaches_the_owning_worker_and_spares_the_other(scaled_server: ScopeServer) -> None:
    workers = scaled_server.workers()
    assert len([w for w in workers if w["state"] == "active"]) == 2

    async with ScopeClient() as leaving, ScopeClient() as staying:
        await leaving.connect(scaled_server, "alice")
        await leaving.expect("ready")
        leaving_peer = await live_peer(leaving, scaled_server, pipeline="invert")
        await staying.connect(scaled_server, "bob")
        await staying.expect("ready")
        staying_peer = await live_peer(staying, scaled_server, pipeline="grayscale")

        leaving_worker = scaled_server.session(leaving_peer.session_id)["worker"]
        staying_worker = scaled_server.session(staying_peer.session_id)["worker"]
        assert leaving_worker != staying_worker, "placement put both sessions on one worker"

        closed_at = time.monotonic()
        await leaving.close_socket()
        await leaving_peer.wait_server_closed(2)
        record = await asyncio.to_thread(scaled_server.closed_session, leaving_peer.session_id)
        await asyncio.sleep(2)

        assert record["close_reason"] == "CLIENT_DISCONNECT"
        assert [event["kind"] for event in record["events"]] == FULL_TRAIL
        assert not leaving_peer.frames_since(closed_at + 1), "the closed session kept streaming"
        # The other worker's session streams on, untouched.
        assert len(staying_peer.frames_since(closed_at + 1)) > 10
        assert scaled_server.session(staying_peer.session_id)["state"] == "live"
        peers_by_worker = {w["id"]: w["peer_count"] for w in scaled_server.workers()}
        assert peers_by_worker[leaving_worker] == 0
        assert peers_by_worker[staying_worker] == 1
