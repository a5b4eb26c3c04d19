"""aiortc WHIP publishers and WHEP viewers, speaking RFC 9725 to a test server over loopback."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import httpx
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamTrack

from tests.peer import Color, MeanColor, SolidColorTrack, record_mean_colors

if TYPE_CHECKING:
    from tests.harness import ScopeServer

CLOSE_TIMEOUT = 5.0


def bearer(server: ScopeServer, user: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {server.tokens[user]}"}


async def post_sdp(server: ScopeServer, path: str, sdp: str, user: str | None) -> httpx.Response:
    headers = {"Content-Type": "application/sdp", **(bearer(server, user) if user else {})}
    return await asyncio.to_thread(server.http.post, path, content=sdp, headers=headers)


async def delete(server: ScopeServer, location: str, user: str) -> httpx.Response:
    return await asyncio.to_thread(server.http.delete, location, headers=bearer(server, user))


class WhipPeer:
    """One side of a WHIP or WHEP exchange: its peer, the resource it made, and what it received."""

    def __init__(self, server: ScopeServer, user: str) -> None:
        self.server = server
        self.user = user
        # Never None: aiortc would fall back to a public STUN server.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.location: str | None = None
        self.response: httpx.Response | None = None
        # (time.monotonic(), mean RGB) of every frame received.
        self.frames: list[tuple[float, MeanColor]] = []
        self._receiver: asyncio.Task[None] | None = None
        self.pc.on("track", self._on_track)

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video" and self._receiver is None:
            self._receiver = asyncio.create_task(record_mean_colors(track, self.frames))

    async def exchange(self, path: str) -> httpx.Response:
        """POST the offer (aiortc gathers every candidate first: no trickle) and apply a 201's answer."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        self.response = await post_sdp(self.server, path, self.pc.localDescription.sdp, self.user)
        if self.response.status_code == 201:
            self.location = self.response.headers["Location"]
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=self.response.text, type="answer"))
        return self.response

    @property
    def dtls_state(self) -> str:
        """"closed" within milliseconds of the server closing its side of the peer."""
        return self.pc.getTransceivers()[0].sender.transport.state

    async def wait_frames(self, count: int, timeout: float = 15.0) -> None:
        await self.server.wait_until_async(lambda: len(self.frames) >= count, timeout,
                                           what=f"{count} frames (got {len(self.frames)})")

    async def hang_up(self) -> httpx.Response:
        assert self.location is not None
        return await delete(self.server, self.location, self.user)

    async def close(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
        try:
            await asyncio.wait_for(self.pc.close(), CLOSE_TIMEOUT)
        except asyncio.TimeoutError:
            pass  # a peer stuck closing must not hang the test


class Publisher(WhipPeer):
    def __init__(self, server: ScopeServer, user: str, color: Color = (200, 60, 20)) -> None:
        super().__init__(server, user)
        self.track = SolidColorTrack(color)
        self.pc.addTransceiver(self.track, direction="sendonly")

    @property
    def session_id(self) -> str:
        assert self.location is not None
        return self.location.rstrip("/").rsplit("/", 1)[1]

    async def close(self) -> None:
        self.track.stop()
        await super().close()


class Viewer(WhipPeer):
    def __init__(self, server: ScopeServer, user: str) -> None:
        super().__init__(server, user)
        self.pc.addTransceiver("video", direction="recvonly")
