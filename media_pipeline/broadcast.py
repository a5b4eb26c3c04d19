"""One session's processed video for its WHEP viewers: encoded once per codec, sent to every viewer.

A session's ``PipelineTrack`` hands each processed frame to its
``SessionBroadcast``. While the session has viewers, the broadcast encodes the
latest frame (latest wins, as in the pipeline) once for each codec its viewers
negotiated, off the event loop, and gives every viewer the same packets. Each
viewer's aiortc sender only packetizes them (``Encoder.pack``): adding a viewer
costs SRTP and sockets, not another encoder. A viewer's picture-loss request
asks the shared encoder for a keyframe, at most one per ``KEYFRAME_MIN_INTERVAL``
whatever the viewers send.
"""

import asyncio
import fractions
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import av
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCRtpSender, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.sdp import SessionDescription
from django.conf import settings

from sessions_app import errors
from sessions_app.errors import ScopeError
from sessions_app.turn import ice_servers_for

from . import metrics
from .dtls import as_dtls_server
from .encoders import marked_as_keyframe
from .ice import add_remote_candidate
from .owned_tasks import OwnedTasks

logger = logging.getLogger(__name__)

VIEWER_CLOSE_TIMEOUT_SECONDS = 1.0
# Packets a viewer may fall behind (about a second at 30 fps) before it skips to the next keyframe.
VIEWER_QUEUE_PACKETS = 30
KEYFRAME_MIN_INTERVAL = 0.5
BITRATE = 1_500_000
# Codecs offered to viewers, best first: every browser decodes VP8.
VIEWER_CODECS = ("video/VP8", "video/H264")
ENCODER_BY_MIME = {"video/vp8": "libvpx", "video/h264": "libx264"}


class SharedEncoder:
    """One codec's encoder for every viewer of a session that negotiated it; runs on one thread at a time."""

    def __init__(self, mime_type: str) -> None:
        self.mime_type = mime_type
        self._context: av.VideoCodecContext | None = None
        self._keyframe_wanted = True
        self._last_keyframe_at = 0.0

    def request_keyframe(self) -> None:
        self._keyframe_wanted = True

    def encode(self, frame: av.VideoFrame) -> list[av.Packet]:
        """The frame's packets, stamped with its own time (the viewers' senders derive RTP time from it)."""
        yuv = frame.reformat(format="yuv420p")
        if self._context is None or (self._context.width, self._context.height) != (yuv.width, yuv.height):
            self._context = self._open(yuv.width, yuv.height)
            self._keyframe_wanted = True
        now = time.monotonic()
        if self._keyframe_wanted and now - self._last_keyframe_at >= KEYFRAME_MIN_INTERVAL:
            yuv = marked_as_keyframe(yuv, frame)
            self._keyframe_wanted = False
            self._last_keyframe_at = now
        time_base = frame.time_base or fractions.Fraction(1, 90_000)
        packets = self._context.encode(yuv)
        for packet in packets:
            packet.pts = frame.pts
            packet.time_base = time_base
        metrics.VIEWER_FRAMES_ENCODED.labels(codec=self.mime_type).inc()
        return packets

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        mime = self.mime_type.lower()
        context = av.CodecContext.create(ENCODER_BY_MIME[mime], "w")
        context.width, context.height = width, height
        context.pix_fmt = "yuv420p"
        context.bit_rate = BITRATE
        context.time_base = fractions.Fraction(1, 90_000)
        context.framerate = fractions.Fraction(30, 1)
        if mime == "video/vp8":
            context.gop_size = 3000  # keyframes when a viewer needs one, not on a timer
            context.options = {"deadline": "realtime", "cpu-used": "8", "lag-in-frames": "0",
                               "error-resilient": "1"}
        else:
            # Constrained baseline, as browsers expect with packetization-mode 1.
            context.profile = "Baseline"
            context.options = {"preset": "veryfast", "tune": "zerolatency", "level": "31"}
        return context


class ViewerTrack(MediaStreamTrack):
    """Encoded packets for one viewer's sender, starting at a keyframe."""

    kind = "video"

    def __init__(self, encoder: SharedEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self._packets: asyncio.Queue[av.Packet] = asyncio.Queue(maxsize=VIEWER_QUEUE_PACKETS)
        self._awaiting_keyframe = True

    def push(self, packet: av.Packet) -> None:
        if self._awaiting_keyframe:
            if not packet.is_keyframe:
                return
            self._awaiting_keyframe = False
        if self._packets.full():  # this viewer's sending fell behind: skip to a fresh picture
            while not self._packets.empty():
                self._packets.get_nowait()
            self._awaiting_keyframe = True
            self.encoder.request_keyframe()
            return
        self._packets.put_nowait(packet)

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        packet = await self._packets.get()
        if self.readyState != "live":
            raise MediaStreamError
        return packet


@dataclass
class Viewer:
    viewer_id: str
    pc: RTCPeerConnection
    track: ViewerTrack
    closing: bool = False
    close_task: asyncio.Task | None = field(default=None, repr=False)


class SessionBroadcast:
    def __init__(self, *, session_id: str, viewer_gone: Callable[[str, str], None]) -> None:
        self.session_id = session_id
        # Told when a viewer's peer ended without our asking (viewer id, why): the worker records it.
        self._viewer_gone = viewer_gone
        self._viewers: dict[str, Viewer] = {}
        self._encoders: dict[str, SharedEncoder] = {}
        self._latest: av.VideoFrame | None = None
        self._frame_ready = asyncio.Event()
        self._encoding: asyncio.Task | None = None
        self._tasks = OwnedTasks(logger)
        self.closed = False

    @property
    def viewer_count(self) -> int:
        return len(self._viewers)

    def offer_frame(self, frame: av.VideoFrame) -> None:
        """A processed frame (on the event loop); kept as the latest only while someone watches."""
        if not self._viewers or self.closed:
            return
        self._latest = frame
        self._frame_ready.set()
        if self._encoding is None:
            self._encoding = asyncio.create_task(self._encode_loop(), name=f"broadcast-{self.session_id}")

    async def add_viewer(self, *, viewer_id: str, sdp: str) -> RTCSessionDescription:
        if self.closed:
            raise ScopeError(errors.UNKNOWN_SESSION, f"Session {self.session_id} is closing.")
        pc = RTCPeerConnection(RTCConfiguration(iceServers=[RTCIceServer(**server)
                                                            for server in ice_servers_for(label="worker")]))
        try:
            return await self._answer_viewer(pc, viewer_id=viewer_id, sdp=sdp)
        except BaseException:
            await asyncio.wait_for(pc.close(), VIEWER_CLOSE_TIMEOUT_SECONDS)
            raise

    async def _answer_viewer(self, pc: RTCPeerConnection, *, viewer_id: str, sdp: str) -> RTCSessionDescription:
        offered = _offered_video_mimes(sdp)
        mime = next((mime for mime in VIEWER_CODECS if mime.lower() in offered), None)
        if mime is None:
            raise ScopeError(errors.INVALID_SDP, f"The offer accepts none of {', '.join(VIEWER_CODECS)}.")
        # Kept for the session's life once made (two at most): a viewer negotiating now shares it.
        encoder = self._encoders.setdefault(mime, SharedEncoder(mime))
        track = ViewerTrack(encoder)
        transceiver = pc.addTransceiver(track, direction="sendonly")
        # Only the shared encoder's codec (and its retransmissions): no viewer gets an encoder of its own.
        transceiver.setCodecPreferences([codec for codec in RTCRtpSender.getCapabilities("video").codecs
                                         if codec.mimeType.lower() in (mime.lower(), "video/rtx")])
        # A viewer's picture-loss request asks the shared encoder, which rate-limits them.
        transceiver.sender._send_keyframe = encoder.request_keyframe
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer"))
        except Exception as exc:
            raise ScopeError(errors.INVALID_SDP, f"The offer could not be applied: {exc}") from exc
        await pc.setLocalDescription(as_dtls_server(offer_sdp=sdp, answer=await pc.createAnswer()))
        if self.closed:
            raise ScopeError(errors.UNKNOWN_SESSION, f"Session {self.session_id} is closing.")
        viewer = Viewer(viewer_id=viewer_id, pc=pc, track=track)
        pc.on("connectionstatechange", lambda: self._connection_state(viewer))
        encoder.request_keyframe()
        self._viewers[viewer_id] = viewer
        metrics.VIEWERS.inc()
        self._tasks.spawn(self._connected_in_time(viewer), f"viewer-connect-{viewer_id}")
        return pc.localDescription

    async def _connected_in_time(self, viewer: Viewer) -> None:
        """A viewer that never connects (answer ignored, ICE that never starts) gives its place back, bounded."""
        await asyncio.sleep(settings.SCOPE_NEGOTIATION_TIMEOUT_SECONDS)
        if viewer.pc.connectionState != "connected" and not viewer.closing and not self.closed:
            self._viewer_gone(viewer.viewer_id, "connect_timeout")
            await self.remove_viewer(viewer.viewer_id)

    async def add_candidate(self, *, viewer_id: str, raw: dict[str, Any] | None) -> None:
        viewer = self._viewers.get(viewer_id)
        if viewer is not None and not viewer.closing:
            await add_remote_candidate(viewer.pc, raw, owner=f"viewer {viewer_id}")

    def _connection_state(self, viewer: Viewer) -> None:
        state = viewer.pc.connectionState
        if state in ("failed", "closed") and not viewer.closing and not self.closed:
            self._viewer_gone(viewer.viewer_id, "peer_failed" if state == "failed" else "peer_closed")
            self._tasks.spawn(self.remove_viewer(viewer.viewer_id), f"viewer-gone-{viewer.viewer_id}")

    async def remove_viewer(self, viewer_id: str) -> None:
        """Close one viewer's peer; the session and the other viewers go on. Idempotent."""
        viewer = self._viewers.pop(viewer_id, None)
        if viewer is not None:
            await self._close_viewer(viewer)

    async def close(self) -> int:
        """Close every viewer's peer and stop encoding; how many viewers there were. Idempotent."""
        self.closed = True
        viewers = list(self._viewers.values())
        self._viewers.clear()
        if self._encoding is not None:
            self._encoding.cancel()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*(self._close_viewer(viewer) for viewer in viewers))
        self._encoders.clear()
        return len(viewers)

    async def _close_viewer(self, viewer: Viewer) -> None:
        viewer.closing = True
        if viewer.close_task is None:
            metrics.VIEWERS.dec()
            viewer.track.stop()
            viewer.close_task = asyncio.ensure_future(viewer.pc.close())
        try:
            await asyncio.wait_for(asyncio.shield(viewer.close_task), VIEWER_CLOSE_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            logger.warning("session %s: viewer %s's peer did not close within %ss", self.session_id,
                           viewer.viewer_id, VIEWER_CLOSE_TIMEOUT_SECONDS)

    async def _encode_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                await self._frame_ready.wait()
                self._frame_ready.clear()
                frame, self._latest = self._latest, None
                if frame is None:
                    continue
                for encoder in list(self._encoders.values()):
                    if not any(viewer.track.encoder is encoder for viewer in self._viewers.values()):
                        continue  # its viewers left
                    try:
                        # Codec work stays off the event loop.
                        packets = await loop.run_in_executor(None, encoder.encode, frame)
                    except Exception:  # one frame lost to the viewers; the next may encode
                        logger.exception("session %s: encoding for viewers failed", self.session_id)
                        continue
                    for viewer in list(self._viewers.values()):
                        if viewer.track.encoder is encoder:
                            for packet in packets:
                                viewer.track.push(packet)
        finally:
            self._encoding = None


def _offered_video_mimes(sdp: str) -> set[str]:
    try:
        description = SessionDescription.parse(sdp)
    except Exception as exc:  # the parser raises many kinds on malformed input
        raise ScopeError(errors.INVALID_SDP, f"The SDP could not be parsed: {exc}") from exc
    return {codec.mimeType.lower() for media in description.media if media.kind == "video"
            for codec in media.rtp.codecs}
