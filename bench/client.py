"""The bench client: the tests' ScopeClient and ClientPeer, plus per-step times and a 512×512 indexed camera."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from aiortc import RTCRtpSender
from aiortc.mediastreams import VIDEO_PTIME, MediaStreamError, MediaStreamTrack

from bench.common import LOOPBACK, Server
from bench.framecode import FrameIndexTrack, decode, luma_plane
from media_pipeline.broadcast import SharedEncoder, ViewerTrack
from media_pipeline.ice import enforce_ice_addresses
from media_pipeline.jitter import release_frames_on_marker
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


class SharedCamera:
    """One frame-index camera encoded once (VP8) and sent by every peer of a bench that ramps sessions.

    With a camera and an encoder per peer, the client's cost per frame equals
    the server's, so on one pinned core the client saturates as soon as the
    server does and a ramp's knee says as much about the client. Shared, each
    peer's sender only packetizes the same packets (``Encoder.pack``), and the
    server still decodes one stream per session. A peer's picture-loss request
    asks the shared encoder for a keyframe, which it rate-limits, and a new peer
    starts at one.
    """

    def __init__(self, start_at: float | None = None) -> None:
        self.source = FrameIndexTrack()
        self.encoder = SharedEncoder("video/VP8")
        # time.time() of the first frame (a later one if that has passed, whole frame intervals on); None: at once.
        self._start_at = start_at
        self._tracks: list[ViewerTrack] = []
        self._sending: asyncio.Task[None] | None = None

    def attach(self, sender: RTCRtpSender) -> ViewerTrack:
        """Make ``sender`` send the shared stream; its track, for its peer to stop."""
        track = ViewerTrack(self.encoder)
        sender.replaceTrack(track)
        sender._send_keyframe = self.encoder.request_keyframe
        self._tracks.append(track)
        self.encoder.request_keyframe()
        if self._sending is None:
            self._sending = asyncio.create_task(self._run(), name="shared-camera")
        return track

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        if self._start_at is not None:
            # The camera's clock starts at its first frame (VideoStreamTrack), so this sets its phase.
            await asyncio.sleep((self._start_at - time.time()) % VIDEO_PTIME)
        while True:
            frame = await self.source.recv()
            self._tracks = [track for track in self._tracks if track.readyState == "live"]
            if not self._tracks:
                continue
            packets = await loop.run_in_executor(None, self.encoder.encode, frame)
            for track in self._tracks:
                for packet in packets:
                    track.push(packet)

    async def close(self) -> None:
        """Stop encoding and sending. Idempotent."""
        if self._sending is not None:
            self._sending.cancel()
            await asyncio.gather(self._sending, return_exceptions=True)
        self.source.stop()


class CameraSet:
    """A few SharedCameras, handed to sessions in turn.

    With one camera every session's frame reaches the server at the same
    instant, 30 times a second, and the server's load comes in bursts no real
    set of users sends. The cameras here send at evenly spread phases (camera
    k a k/count share of a frame interval after camera 0), and sessions are
    spread over them. The phases are the same in every set, so two servers
    measured one after the other see their frames arrive in the same pattern
    (started when their first sessions joined, the phases were drawn anew for
    each, and moved a saturated server's p99 by tens of ms).
    """

    def __init__(self, count: int = 4) -> None:
        epoch = time.time()
        self._cameras = [SharedCamera(start_at=epoch + k * VIDEO_PTIME / count) for k in range(count)]
        self._handed = 0

    def next(self) -> SharedCamera:
        camera = self._cameras[self._handed % len(self._cameras)]
        self._handed += 1
        return camera

    async def close(self) -> None:
        await asyncio.gather(*(camera.close() for camera in self._cameras))


class BenchPeer(ClientPeer):
    """A ClientPeer that sends the 512×512 frame-index camera and reads the index back.

    The camera is the peer's own, or a ``SharedCamera``. ``frames`` keeps
    ClientPeer's meaning (arrival time, mean colour), with the colour read from
    the luma as gray; ``latencies`` holds (arrival, glass-to-glass seconds) of
    every frame whose index could be read; ``connected_at`` is when
    connectionState turned ``connected``.
    """

    def __init__(self, client: ScopeClient, camera: SharedCamera | None = None) -> None:
        super().__init__(client, DEFAULT_COLOR)
        # ClientPeer always adds a solid-colour camera; swap ours in before the offer is made.
        self.track.stop()
        sender = self.pc.getSenders()[0]
        if camera is None:
            self.source = FrameIndexTrack()
            sender.replaceTrack(self.source)
            self.track = self.source  # ClientPeer.close() stops it
        else:
            self.source = camera.source
            # Only the shared encoder's codec: the sender must never encode on its own.
            transceiver = next(t for t in self.pc.getTransceivers() if t.sender is sender)
            transceiver.setCodecPreferences([codec for codec in RTCRtpSender.getCapabilities("video").codecs
                                             if codec.mimeType.lower() in ("video/vp8", "video/rtx")])
            self.track = camera.attach(sender)
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
    client: ScopeClient, pipeline: str, params: dict[str, Any] | None = None, timeout: float = 15.0,
    camera: SharedCamera | None = None,
) -> BenchPeer:
    """``ScopeClient.start_session`` with a BenchPeer: offer, apply the answer, ICE on loopback only.

    The client's receivers release each frame at its last packet, as a
    browser's do: aiortc's own jitter buffer holds a frame until the next one
    starts, which would add the server's output interval to every latency
    read here (33 ms at 30 fps, and the whole gap between frames when an
    overloaded server sends a session 2 fps).
    """
    enforce_ice_addresses([LOOPBACK])
    release_frames_on_marker()
    peer = BenchPeer(client, camera)
    client.peers.append(peer)
    try:
        await peer.negotiate({"pipeline": pipeline, **(params or {})}, timeout)
    except BaseException:
        await peer.close()
        raise
    return peer


async def streaming(
    client: ScopeClient, server: Server, pipeline: str, params: dict[str, Any] | None = None, frames: int = 1,
    camera: SharedCamera | None = None,
) -> BenchPeer:
    """Connect as alice, wait for ``ready``, open a session; return once ``frames`` frames came back."""
    await client.connect(server, "alice")
    await client.expect("ready")
    peer = await open_session(client, pipeline, params, camera=camera)
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
    # The client's CPU time over the window's (1.0: its core was full, its own stalls are in the figures).
    client_busy: float


async def observe(peers: list[BenchPeer], seconds: float) -> Window:
    """Let ``peers`` stream for ``seconds``; what their clients received meanwhile."""
    start, cpu_before = time.monotonic(), time.process_time()
    await asyncio.sleep(seconds)
    end = time.monotonic()
    client_busy = round((time.process_time() - cpu_before) / seconds, 2)
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
        client_busy=client_busy,
    )
