"""The bench client: the tests' ScopeClient and ClientPeer, plus per-step times and a 512×512 indexed camera."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from bench.common import LOOPBACK, Server
from bench.framecode import FrameIndexTrack, decode, luma_plane
from media_pipeline.ice import enforce_ice_addresses
from tests.peer import DEFAULT_COLOR, ClientPeer, ScopeClient


class BenchClient(ScopeClient):
    """A ScopeClient that notes when it last sent, and last took, each message type (time.monotonic())."""

    def __init__(self) -> None:
        super().__init__()
        self.sent_at: dict[str, float] = {}
        self.taken_at: dict[str, float] = {}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent_at[message["type"]] = time.monotonic()
        await super().send(message)

    async def expect(self, message_type: str | tuple[str, ...], timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        message = await super().expect(message_type, timeout, **match)
        self.taken_at[message["type"]] = time.monotonic()
        return message


class BenchPeer(ClientPeer):
    """A ClientPeer that sends the 512×512 frame-index camera and reads the index back.

    ``frames`` keeps ClientPeer's meaning (arrival time, mean colour), with the
    colour read from the luma as gray; ``latencies`` holds (arrival, glass-to-glass
    seconds) of every frame whose index could be read; ``connected_at`` is
    when connectionState turned ``connected``.
    """

    def __init__(self, client: ScopeClient) -> None:
        super().__init__(client, DEFAULT_COLOR)
        # ClientPeer always adds a solid-colour camera; swap ours in before the offer is made.
        self.track.stop()
        self.source = FrameIndexTrack()
        self.pc.getSenders()[0].replaceTrack(self.source)
        self.track = self.source  # ClientPeer.close() stops it
        self.latencies: list[tuple[float, float]] = []
        self.unreadable = 0
        self.connected_at: float | None = None
        self.pc.on("connectionstatechange", self._note_connected)

    def _note_connected(self) -> None:
        if self.pc.connectionState == "connected" and self.connected_at is None:
            self.connected_at = time.monotonic()

    async def _receive(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                arrived = time.monotonic()
                luma = luma_plane(frame)
                gray = float(luma[::8, ::8].mean())
                self.frames.append((arrived, (gray, gray, gray)))
                index = decode(luma)
                captured = None if index is None else self.source.capture_time(index)
                if captured is None:
                    self.unreadable += 1
                else:
                    self.latencies.append((arrived, arrived - captured))
        except MediaStreamError:
            self.remote_ended_at = time.monotonic()

    def frame_count(self, start: float, end: float) -> int:
        return sum(1 for arrived, _ in self.frames if start <= arrived < end)

    def latencies_ms(self, start: float, end: float) -> list[float]:
        return [latency * 1000 for arrived, latency in self.latencies if start <= arrived < end]


async def open_session(
    client: ScopeClient, pipeline: str, params: dict[str, Any] | None = None, timeout: float = 15.0
) -> BenchPeer:
    """``ScopeClient.start_session`` with a BenchPeer: offer, apply the answer, ICE on loopback only."""
    enforce_ice_addresses([LOOPBACK])
    peer = BenchPeer(client)
    client.peers.append(peer)
    try:
        await peer.negotiate({"pipeline": pipeline, **(params or {})}, timeout)
    except BaseException:
        await peer.close()
        raise
    return peer


async def streaming(
    client: ScopeClient, server: Server, pipeline: str, params: dict[str, Any] | None = None, frames: int = 1
) -> BenchPeer:
    """Connect as alice, wait for ``ready``, open a session; return once ``frames`` frames came back."""
    await client.connect(server, "alice")
    await client.expect("ready")
    peer = await open_session(client, pipeline, params)
    await peer.wait_connected()
    await peer.wait_frames(frames)
    return peer


@dataclass
class Window:
    """What some sessions' clients saw over one measuring window."""

    fps: list[float]  # per session
    latency_ms: list[float]  # every readable frame, sessions pooled
    readable: float  # share of received frames whose index could be read
    # (seconds since the window opened, latency ms) of every readable frame, in order.
    timeline: list[tuple[float, float]]


async def observe(peers: list[BenchPeer], seconds: float) -> Window:
    """Let ``peers`` stream for ``seconds``; what their clients received meanwhile."""
    start = time.monotonic()
    await asyncio.sleep(seconds)
    end = time.monotonic()
    received = sum(peer.frame_count(start, end) for peer in peers)
    timeline = sorted(
        (arrived - start, latency * 1000)
        for peer in peers
        for arrived, latency in peer.latencies
        if start <= arrived < end
    )
    return Window(
        fps=[peer.frame_count(start, end) / (end - start) for peer in peers],
        latency_ms=[latency for _, latency in timeline],
        readable=round(len(timeline) / received, 3) if received else 0.0,
        timeline=timeline,
    )
