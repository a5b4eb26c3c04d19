"""The bare baseline: an aiortc server running the project's pipelines and nothing else.

No Django, no channel layer, no database, no signaling consumer: a WebSocket
on 127.0.0.1 that answers offers, and the project's own ``FrameProcessor`` and
``PipelineTrack`` (same torch op, latest frame wins, one pipeline thread per
device, sessions batched by the same ``FrameBatcher`` and settings), with
aiortc as shipped: its jitter buffer and its VP8 encoder settings, none of the
server's patches (``scope_site.process.apply_patches``). What the benches
measure here is what aiortc and torch cost by themselves, so each project
figure can be given as a ratio to it.

It speaks the subset of the signaling protocol the bench client uses
(``ready``, ``offer`` → ``answer``, ``error``), plus:

- ``close {sessionId}`` → ``closed {sessionId, peer_closed_at}`` once the peer
  is closed (the bare counterpart of ``DELETE webrtc/offer/{id}``);
- ``peer_closed_at {sessionId}`` → the same reply, ``peer_closed_at`` null
  while the peer is open (how a bench learns when a socket close ended a peer);
- ``stats`` → ``{peers, tasks, threads}``.

Closing the socket closes every peer it opened, as in the project. Times are
``time.time()``, taken when ``RTCPeerConnection.close()`` returned — where the
project's worker records ``peer_closed``.

Usage: .venv/bin/python -m bench.bare_server --port 8765
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from media_pipeline.batching import FrameBatcher
from media_pipeline.ice import enforce_ice_addresses
from media_pipeline.pipelines import FrameProcessor, pick_device, validate_parameters
from media_pipeline.tracks import PipelineTrack
from sessions_app.errors import ScopeError

HOST = "127.0.0.1"
PEER_CLOSE_TIMEOUT_SECONDS = 1.0  # the worker's bound


@dataclass
class BarePeer:
    pc: RTCPeerConnection
    processor: FrameProcessor
    track: PipelineTrack | None = None


@dataclass
class BareServer:
    """Every open peer, and when each closed one closed."""

    device: torch.device = field(default_factory=pick_device)
    peers: dict[str, BarePeer] = field(default_factory=dict)
    closed_at: dict[str, float] = field(default_factory=dict)
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline")
    )
    # Batched as the worker does, from the same settings (read from the environment: no Django here).
    batcher: FrameBatcher = field(init=False)

    def __post_init__(self) -> None:
        self.batcher = FrameBatcher(self.executor, window_seconds=float(os.environ.get("SCOPE_BATCH_WINDOW_MS", "2")) / 1000,
                                    max_batch=int(os.environ.get("SCOPE_MAX_BATCH", "8")))

    async def open_peer(self, offer: dict[str, Any]) -> tuple[str, RTCSessionDescription]:
        pipeline, parameters = validate_parameters(offer.get("initialParameters"), default_pipeline="passthrough")
        loop = asyncio.get_running_loop()
        processor = await loop.run_in_executor(self.executor, FrameProcessor, pipeline, parameters, self.device)
        session_id = str(uuid.uuid4())
        peer = BarePeer(RTCPeerConnection(RTCConfiguration(iceServers=[])), processor)
        self.peers[session_id] = peer

        @peer.pc.on("track")
        def on_track(track: MediaStreamTrack) -> None:
            if track.kind == "video" and peer.track is None:
                peer.track = PipelineTrack(
                    track, processor, self.batcher, on_error=lambda _exc: self._close_soon(session_id)
                )
                peer.pc.addTrack(peer.track)

        @peer.pc.on("connectionstatechange")
        def on_state() -> None:
            if peer.pc.connectionState in ("failed", "closed"):
                self._close_soon(session_id)

        try:
            await peer.pc.setRemoteDescription(RTCSessionDescription(sdp=offer["sdp"], type="offer"))
            await peer.pc.setLocalDescription(await peer.pc.createAnswer())
        except Exception:
            await self.close_peer(session_id)
            raise
        return session_id, peer.pc.localDescription

    def _close_soon(self, session_id: str) -> None:
        asyncio.get_running_loop().create_task(self.close_peer(session_id))

    async def close_peer(self, session_id: str) -> None:
        """The worker's order: stop the track, close the peer (noted), stop the pipeline."""
        peer = self.peers.pop(session_id, None)
        if peer is None:
            return
        if peer.track is not None:
            peer.track.stop()
        try:
            await asyncio.wait_for(peer.pc.close(), PEER_CLOSE_TIMEOUT_SECONDS)
        finally:
            self.closed_at[session_id] = time.time()
            await asyncio.get_running_loop().run_in_executor(self.executor, peer.processor.close)

    def stats(self) -> dict[str, int]:
        return {"peers": len(self.peers), "tasks": len(asyncio.all_tasks()), "threads": threading.active_count()}

    async def handle(self, ws: ServerConnection) -> None:
        """One signaling socket: its peers close with it."""
        opened: list[str] = []
        try:
            await ws.send(json.dumps({"type": "ready", "connection_id": uuid.uuid4().hex}))
            async for raw in ws:
                message = json.loads(raw)
                reply = await self.reply(message, opened)
                reply["request_id"] = message.get("request_id")
                await ws.send(json.dumps(reply))
        except ConnectionClosed:
            pass
        finally:
            await asyncio.gather(*(self.close_peer(session_id) for session_id in opened))

    async def reply(self, message: dict[str, Any], opened: list[str]) -> dict[str, Any]:
        kind = message.get("type")
        session_id = message.get("sessionId", "")
        if kind == "offer":
            try:
                session_id, answer = await self.open_peer(message)
            except ScopeError as exc:
                return {"type": "error", "code": exc.code, "error": exc.message}
            opened.append(session_id)
            return {"type": "answer", "sdp": answer.sdp, "sdp_type": answer.type, "sessionId": session_id}
        if kind == "close":
            await self.close_peer(session_id)
        if kind in ("close", "peer_closed_at"):
            return {"type": "closed", "sessionId": session_id, "peer_closed_at": self.closed_at.get(session_id)}
        if kind == "stats":
            return {"type": "stats", **self.stats()}
        return {"type": "error", "code": "INVALID_MESSAGE", "error": f"unknown type {kind!r}"}


async def main(port: int) -> None:
    enforce_ice_addresses([HOST])
    # As the project's CPU worker does (SCOPE_TORCH_THREADS), so both run the op alike.
    torch.set_num_threads(int(os.environ.get("SCOPE_TORCH_THREADS", "1")))
    server = BareServer()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with serve(server.handle, HOST, port):
        await stop.wait()
    await asyncio.gather(*(server.close_peer(session_id) for session_id in list(server.peers)))
    await server.batcher.stop()
    server.executor.shutdown(wait=False, cancel_futures=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    asyncio.run(main(parser.parse_args().port))
