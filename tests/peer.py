"""A real WebRTC client for tests: the signaling socket and an aiortc peer.

It speaks the protocol of docs/protocol.md exactly as a script user would: token in
the handshake, the server's own Origin, JSON messages, a camera-like track of
one solid colour, and a data channel named "parameters". Everything it does is
bounded in time, and everything it starts is stopped on exit.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import time
import uuid
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any

import av
import numpy as np
from aiortc import (
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from media_pipeline.ice import enforce_ice_addresses

if TYPE_CHECKING:
    from tests.harness import ScopeServer

Color = tuple[int, int, int]
MeanColor = tuple[float, float, float]

DEFAULT_COLOR: Color = (200, 60, 20)
CLOSE_TIMEOUT = 5.0
# How long close() lets the server tear peers down after the socket closed (its bound is 1 s).
SERVER_CLOSE_GRACE = 2.0


class SessionRefused(AssertionError):
    """The server answered an offer with an error instead of an answer."""

    def __init__(self, message: dict[str, Any]) -> None:
        super().__init__(f"offer refused: {message}")
        self.message = message
        self.code: str | None = message.get("code")


async def _poll(predicate: Callable[[], bool], timeout: float, describe: Callable[[], str]) -> None:
    """Wait for ``predicate``; on timeout, ``describe`` says what was awaited and what was seen then."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {describe()}")
        await asyncio.sleep(0.02)


async def _cancel(task: asyncio.Task[Any] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    try:
        await asyncio.wait_for(task, CLOSE_TIMEOUT)
    except (asyncio.CancelledError, asyncio.TimeoutError):
        pass


async def record_mean_colors(track: MediaStreamTrack, frames: list[tuple[float, MeanColor]]) -> None:
    """Append (time.monotonic(), mean RGB) of every frame ``track`` delivers, until it ends."""
    try:
        while True:
            frame = await track.recv()
            mean = frame.to_ndarray(format="rgb24").mean(axis=(0, 1))
            frames.append((time.monotonic(), (float(mean[0]), float(mean[1]), float(mean[2]))))
    except MediaStreamError:
        pass


class SolidColorTrack(VideoStreamTrack):
    """A 30 fps camera that sees one colour, so the pipeline's effect is measurable."""

    def __init__(self, color: Color = DEFAULT_COLOR, width: int = 160, height: int = 120) -> None:
        super().__init__()
        self.color = color
        self._pixels = np.full((height, width, 3), color, dtype=np.uint8)

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(self._pixels, format="rgb24")
        frame.pts = pts
        frame.time_base = time_base
        return frame


class ClientPeer:
    """One session's peer connection, as seen from the client."""

    def __init__(
        self,
        client: ScopeClient,
        color: Color,
        *,
        ice_servers: list[dict[str, Any]] | None = None,
        relay_only: bool = False,
    ) -> None:
        """``ice_servers``: RTCIceServer-shaped dicts (as the server hands them out); none by default.

        ``relay_only``: the "relay" ICE transport policy, so only TURN relay candidates are gathered and used.
        """
        self.client = client
        self.pc = RTCPeerConnection(
            RTCConfiguration(
                # Never None: aiortc would fall back to a public STUN server.
                iceServers=[RTCIceServer(**server) for server in ice_servers or []],
                iceTransportPolicy=RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL,
            )
        )
        self.track = SolidColorTrack(color)
        self.pc.addTrack(self.track)
        self.channel: RTCDataChannel = self.pc.createDataChannel("parameters")
        # (time.monotonic(), message) of every JSON message the server sent on the data channel.
        self.channel_messages: list[tuple[float, dict[str, Any]]] = []
        self.channel.on("message", self._on_channel_message)
        self.session_id: str | None = None
        # (time.monotonic(), mean RGB) of every frame the server sent back.
        self.frames: list[tuple[float, MeanColor]] = []
        self.connection_states: list[str] = [self.pc.connectionState]
        self.remote_ended_at: float | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._closed = False
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_connection_state)

    def _on_channel_message(self, data: str | bytes) -> None:
        if isinstance(data, str):
            self.channel_messages.append((time.monotonic(), json.loads(data)))

    def _on_connection_state(self) -> None:
        self.connection_states.append(self.pc.connectionState)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video" and self._receiver is None:
            self._receiver = asyncio.create_task(self._receive(track))

    async def _receive(self, track: MediaStreamTrack) -> None:
        await record_mean_colors(track, self.frames)
        # The remote track ended: the server's side of the peer is gone.
        self.remote_ended_at = time.monotonic()

    async def negotiate(self, initial_parameters: dict[str, Any], timeout: float) -> None:
        # aiortc gathers every candidate before setLocalDescription returns: no trickle needed.
        await self.pc.setLocalDescription(await self.pc.createOffer())
        request_id = uuid.uuid4().hex
        await self.client.send(
            {
                "type": "offer",
                "sdp": self.pc.localDescription.sdp,
                "sdp_type": "offer",
                "initialParameters": initial_parameters,
                "request_id": request_id,
            }
        )
        reply = await self.client.expect(("answer", "error"), timeout, request_id=request_id)
        if reply["type"] == "error":
            raise SessionRefused(reply)
        self.session_id = reply["sessionId"]
        await self.pc.setRemoteDescription(RTCSessionDescription(sdp=reply["sdp"], type=reply["sdp_type"]))

    @property
    def connection_state(self) -> str:
        return self.pc.connectionState

    @property
    def dtls_state(self) -> str:
        """The DTLS transport's state: "closed" within milliseconds of the server closing its peer.

        This is the first sign that the server let go (with ``remote_ended_at``);
        aiortc then closes this peer too, so connectionState follows as "closed".
        """
        return self.pc.getSenders()[0].transport.state

    @property
    def selected_pair(self) -> tuple[Any, Any] | None:
        """The (local, remote) aioice candidates ICE nominated for media, once connected; else None."""
        connection = self.pc.getSenders()[0].transport.transport.iceGatherer._connection
        pair = connection._nominated.get(1)
        return None if pair is None else (pair.local_candidate, pair.remote_candidate)

    @property
    def last_frame_at(self) -> float | None:
        return self.frames[-1][0] if self.frames else None

    def frames_since(self, moment: float) -> list[tuple[float, MeanColor]]:
        return [frame for frame in self.frames if frame[0] > moment]

    async def wait_connected(self, timeout: float = 15.0) -> None:
        await _poll(
            lambda: self.pc.connectionState == "connected",
            timeout,
            lambda: f"connectionState connected (states so far: {self.connection_states})",
        )

    async def wait_frames(self, count: int, timeout: float = 15.0) -> list[tuple[float, MeanColor]]:
        """Wait until ``count`` frames have come back in total; return them all."""
        await _poll(lambda: len(self.frames) >= count, timeout, lambda: f"{count} frames (got {len(self.frames)})")
        return self.frames

    async def wait_server_closed(self, timeout: float = 5.0) -> None:
        """Wait until the server's side of the peer is gone (DTLS closed or failed)."""
        await _poll(
            lambda: self.dtls_state in ("closed", "failed"), timeout, lambda: f"DTLS closed (state: {self.dtls_state})"
        )

    async def send_parameters_over_datachannel(self, parameters: dict[str, Any], timeout: float = 10.0) -> None:
        await _poll(
            lambda: self.channel.readyState == "open",
            timeout,
            lambda: f"the parameters data channel to open (state: {self.channel.readyState})",
        )
        self.channel.send(json.dumps(parameters))

    async def close(self) -> None:
        """Stop receiving and close the peer; safe to call twice, bounded."""
        if self._closed:
            return
        self._closed = True
        await _cancel(self._receiver)
        self.track.stop()
        try:
            await asyncio.wait_for(self.pc.close(), CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            pass  # a peer stuck closing must not hang the test; its loop is torn down next


class ScopeClient:
    """A signaling socket plus the peers negotiated over it.

    ``async with ScopeClient() as client: await client.connect(server, "alice")``
    """

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []  # every message, in order, for failure messages
        self.peers: list[ClientPeer] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.closed = asyncio.Event()
        self._inbox: list[dict[str, Any]] = []
        self._arrived = asyncio.Event()
        self._ws: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ScopeClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def connect(
        self,
        server: ScopeServer,
        user: str | None = "alice",
        *,
        token: str | None = None,
        origin: str | None = None,
        timeout: float = 10.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """Open the signaling socket as ``user`` (None: anonymous).

        ``token`` and ``origin`` override the user's token and the server's own
        origin, for tests of refused handshakes. ``ssl_context``: for a
        ``wss://`` server (behind a TLS proxy), the context that trusts its certificate.
        """
        key = token if token is not None else (server.tokens[user] if user is not None else None)
        headers = {} if key is None else {"Authorization": f"Token {key}"}
        self._ws = await connect(
            server.ws_url,
            additional_headers=headers,
            origin=origin or server.origin,
            proxy=None,  # never route loopback signaling through an environment proxy
            open_timeout=timeout,
            **({} if ssl_context is None else {"ssl": ssl_context}),
        )
        self._reader = asyncio.create_task(self._read(self._ws))

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                message = json.loads(raw)
                self.received.append(message)
                self._inbox.append(message)
                self._arrived.set()
        except ConnectionClosed:
            pass  # an error close code (4xxx) ends iteration this way; the code is read below
        finally:
            self.close_code = ws.close_code
            self.close_reason = ws.close_reason
            self.closed.set()
            self._arrived.set()

    async def send(self, message: dict[str, Any]) -> None:
        assert self._ws is not None, "connect() first"
        await self._ws.send(json.dumps(message))

    def _take(self, types: tuple[str, ...], match: dict[str, Any]) -> dict[str, Any] | None:
        for index, message in enumerate(self._inbox):
            if message.get("type") in types and all(message.get(k) == v for k, v in match.items()):
                return self._inbox.pop(index)
        return None

    async def expect(self, message_type: str | tuple[str, ...], timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        """The first unclaimed message of that type (and with ``match``'s fields); others stay queued."""
        types = (message_type,) if isinstance(message_type, str) else message_type

        async def first() -> dict[str, Any]:
            while True:
                message = self._take(types, match)
                if message is not None:
                    return message
                if self.closed.is_set():
                    raise AssertionError(
                        f"socket closed ({self.close_code}) before {types} {match}; received {self.received}"
                    )
                self._arrived.clear()
                await self._arrived.wait()

        try:
            return await asyncio.wait_for(first(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no {types} {match} within {timeout:g}s; received {self.received}") from None

    async def get_ice_servers(self, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The ICE servers the server hands this socket's user (``get_ice_servers``)."""
        request_id = uuid.uuid4().hex
        await self.send({"type": "get_ice_servers", "request_id": request_id})
        reply = await self.expect("ice_servers", timeout, request_id=request_id)
        return reply["data"]["iceServers"]

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        """Wait for the server to close the socket; return the close code."""
        try:
            await asyncio.wait_for(self.closed.wait(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"socket still open after {timeout:g}s; received {self.received}") from None
        return self.close_code

    async def start_session(
        self,
        pipeline: str | None = "invert",
        params: dict[str, Any] | None = None,
        color: Color = DEFAULT_COLOR,
        timeout: float = 15.0,
        *,
        ice_servers: list[dict[str, Any]] | None = None,
        relay_only: bool = False,
    ) -> ClientPeer:
        """Offer a new peer and apply the answer; raise SessionRefused on an error reply.

        ``pipeline=None`` leaves the choice to the server's default. ``ice_servers``
        and ``relay_only`` configure the peer (see ClientPeer).
        """
        # Idempotent; keeps this process's candidates (and accepted checks) on loopback.
        enforce_ice_addresses(["127.0.0.1"])
        initial = dict(params or {})
        if pipeline is not None:
            initial["pipeline"] = pipeline
        peer = ClientPeer(self, color, ice_servers=ice_servers, relay_only=relay_only)
        self.peers.append(peer)
        try:
            await peer.negotiate(initial, timeout)
        except BaseException:
            await peer.close()
            raise
        return peer

    async def close_socket(self, code: int = 1000) -> None:
        """Close only the signaling socket, as a client that goes away does; bounded."""
        if self._ws is None:
            return
        try:
            await asyncio.wait_for(self._ws.close(code), CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            pass  # the reader is cancelled on close() either way

    async def close(self) -> None:
        """Close the socket, then every peer; bounded and idempotent.

        The socket goes first, and connected peers get a moment to be closed
        by the server, so the session ends as the client leaving
        (CLIENT_DISCONNECT) rather than racing it as a failed peer.
        """
        await self.close_socket()
        connected = [peer for peer in self.peers if peer.dtls_state == "connected"]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(peer.wait_server_closed(SERVER_CLOSE_GRACE) for peer in connected)),
                SERVER_CLOSE_GRACE,
            )
        except (AssertionError, asyncio.TimeoutError):
            pass  # a server that does not let go is the test's finding, not this cleanup's
        for peer in self.peers:
            await peer.close()
        await _cancel(self._reader)
