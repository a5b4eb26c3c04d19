"""One session's side of WebRTC on a media worker.

``SessionPeer`` holds what a session owns on the worker — its aiortc peer
connection, the processed track, the client's data channel, the pipeline and
the session's files — and the close that releases them. As aiortc keeps
``close()`` on the object that holds the resource, so does this: it is
idempotent and returns the teardown's steps, timed where they happened. The
worker (``worker.py``) keeps the registry, the timers and the service calls,
and hears from a peer only through ``PeerEvents``.
"""

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from aiortc import RTCConfiguration, RTCDataChannel, RTCIceServer, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError
from aiortc.sdp import SessionDescription
from django.conf import settings
from django.utils import timezone

from sessions_app import errors, json_limits
from sessions_app.errors import ScopeError
from sessions_app.models import SessionEvent
from sessions_app.services import FrameCounts, TeardownStep
from sessions_app.session_files import remove_session_files, write_session_files
from sessions_app.turn import ice_servers_for

from .batching import FrameBatcher
from .broadcast import SessionBroadcast
from .dtls import as_dtls_server
from .ice import add_remote_candidate
from .owned_tasks import OwnedTasks
from .parameters import apply_update
from .pipelines import FrameProcessor, ParameterError
from .tracks import PipelineTrack

logger = logging.getLogger(__name__)

PEER_CLOSE_TIMEOUT_SECONDS = 1.0
# How long the close waits for ``stream_stopped`` to leave on the data channel
# (SCTP holds it back while earlier messages await their acknowledgement).
STREAM_STOPPED_FLUSH_SECONDS = 0.1


@dataclass(frozen=True)
class PeerEvents:
    """What a peer tells its worker."""

    connection_state: Callable[[str], None]
    pipeline_failed: Callable[[BaseException], None]
    # The pipeline now runs these (pipeline, parameters), changed over the data channel: to record.
    parameters_applied: Callable[[str, dict[str, Any]], Awaitable[None]]
    # A WHEP viewer's peer ended on its side (viewer id, why): to record.
    viewer_gone: Callable[[str, str], None]


class SessionPeer:
    def __init__(self, *, session_id: str, pipeline: str, parameters: dict[str, Any], device: torch.device,
                 frame_batcher: FrameBatcher, events: PeerEvents) -> None:
        self.session_id = session_id
        # What the pipeline runs now; what the client asked for last (ahead of it while a rebuild runs).
        self.pipeline = pipeline
        self.parameters = parameters
        self.requested: tuple[str, dict[str, Any]] = (pipeline, parameters)
        self.files_dir = Path(settings.SCOPE_SESSION_FILES_DIR) / session_id
        self.track: PipelineTrack | None = None
        self.data_channel: RTCDataChannel | None = None
        # Set once the close begins: nothing more is answered, applied or reported.
        self.closing = False
        self._returns_video = True
        # When inbound media last moved (monotonic clock), and the count it moved to.
        self.media_seen_at = time.monotonic()
        self.media_frames_seen = 0
        self._device = device
        self._frame_batcher = frame_batcher
        self._events = events
        # TURN with the worker's own short-lived credentials, then the static servers (sessions_app/turn.py).
        ice_servers = [RTCIceServer(**server) for server in ice_servers_for(label="worker")]
        self._pc = RTCPeerConnection(RTCConfiguration(iceServers=ice_servers))
        self._processor: FrameProcessor | None = None
        # Parameter updates coalesce: the latest wanted one waits while another is applied.
        self._wanted_parameters: tuple[str, dict[str, Any]] | None = None
        self._applying = False
        # Recording them coalesces the same way: one write in flight, then the state as it is by then.
        self._record_wanted = False
        self._recording = False
        self._close_task: asyncio.Task[list[TeardownStep]] | None = None
        self._tasks = OwnedTasks(logger)
        # The processed video for WHEP viewers, encoded once for all of them.
        self.broadcast = SessionBroadcast(session_id=session_id, viewer_gone=events.viewer_gone)

    def frame_counts(self) -> FrameCounts:
        if self.track is None:
            return FrameCounts(frames_in=0, frames_out=0)
        return FrameCounts(frames_in=self.track.frames_in, frames_out=self.track.frames_out)

    # --- open ----------------------------------------------------------------

    async def open(self, *, sdp: str, sdp_type: str) -> RTCSessionDescription:
        """Build the pipeline, write the session's files, apply the client's offer; the answer."""
        # Built on a thread of its own: the frame thread may be busy with other sessions' frames.
        self._processor = await asyncio.to_thread(FrameProcessor, self.pipeline, self.parameters, self._device)
        await asyncio.to_thread(write_session_files, self.files_dir, {
            "offer.sdp": sdp,
            "parameters.json": json.dumps({"pipeline": self.pipeline, **self.parameters}),
        })
        # A publisher (WHIP's sendonly offer) wants no video back: its output goes to viewers only.
        self._returns_video = _wants_video_back(sdp)
        pc = self._pc
        pc.on("track", self._on_track)
        pc.on("datachannel", self._on_datachannel)
        pc.on("connectionstatechange", lambda: self._events.connection_state(pc.connectionState))
        try:
            await pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type=sdp_type))
        except Exception as exc:
            raise ScopeError(errors.INVALID_SDP, f"The offer could not be applied: {exc}") from exc
        if self.track is None:
            raise ScopeError(errors.INVALID_SDP, "The offer sends no video.")
        await pc.setLocalDescription(as_dtls_server(offer_sdp=sdp, answer=await pc.createAnswer()))
        if not self._returns_video:
            # No sender pulls the processed track: this does, so the pipeline runs for the viewers.
            self._tasks.spawn(self._pull_output(self.track), f"output-{self.session_id}")
        return pc.localDescription

    def _on_track(self, track) -> None:
        if track.kind == "video" and self.track is None and self._processor is not None:
            self.track = PipelineTrack(track, self._processor, self._frame_batcher,
                                       on_error=self._events.pipeline_failed, on_processed=self.broadcast.offer_frame)
            if self._returns_video:
                self._pc.addTrack(self.track)

    @staticmethod
    async def _pull_output(track: PipelineTrack) -> None:
        try:
            while True:
                await track.recv()
        except MediaStreamError:
            pass

    def _on_datachannel(self, channel: RTCDataChannel) -> None:
        self.data_channel = channel
        channel.on("message", lambda data: self._tasks.spawn(self._channel_parameters(channel, data),
                                                           f"datachannel-{self.session_id}"))

    # --- candidates and parameters ---------------------------------------------

    async def add_candidate(self, raw: dict[str, Any] | None) -> None:
        """A trickled remote candidate (None or an empty one: the end of candidates); a malformed one is ignored."""
        if self.closing:
            return
        await add_remote_candidate(self._pc, raw, owner=f"session {self.session_id}")

    async def apply_parameters(self, pipeline: str, parameters: dict[str, Any]) -> bool:
        """Have the pipeline run these; False if a later update will be applied in their place.

        Updates coalesce (the latest wins) and a rebuild never runs on the frame
        thread, so a flood of updates costs one rebuild at a time and never
        slows other sessions' frames.
        """
        self.requested = self._wanted_parameters = (pipeline, parameters)
        if self._applying:
            return False
        self._applying = True
        try:
            while self._wanted_parameters is not None and not self.closing and self._processor is not None:
                pipeline, parameters = self._wanted_parameters
                self._wanted_parameters = None
                await asyncio.to_thread(self._processor.set_parameters, pipeline, parameters)
                self.pipeline, self.parameters = pipeline, parameters
        finally:
            self._applying = False
        return True

    async def _channel_parameters(self, channel: RTCDataChannel, data: Any) -> None:
        """A parameter update on the data channel: acknowledged at once, applied coalesced, then recorded."""
        try:
            update = json_limits.loads(data) if isinstance(data, str) else None
            if not isinstance(update, dict):
                raise ParameterError("Parameters must be a JSON object.")
            update.pop("type", None)
            # Merged into what was asked last, not what runs yet: a switch then a tweak keeps the switch.
            pipeline, parameters = apply_update(pipeline=self.requested[0], parameters=self.requested[1], update=update)
        except ValueError as exc:  # ParameterError, or not (bounded) JSON
            self._send(channel, {"type": "error", "code": errors.INVALID_MESSAGE, "error": str(exc)})
            return
        self._send(channel, {"type": "parameters_ack", "pipeline": pipeline, **parameters})
        if await self.apply_parameters(pipeline, parameters):
            await self._record_parameters()

    async def _record_parameters(self) -> None:
        self._record_wanted = True
        if self._recording:
            return
        self._recording = True
        try:
            while self._record_wanted and not self.closing:
                self._record_wanted = False
                await self._events.parameters_applied(self.pipeline, self.parameters)
        finally:
            self._recording = False

    @staticmethod
    def _send(channel: RTCDataChannel, message: dict[str, Any]) -> None:
        if channel.readyState == "open":
            channel.send(json.dumps(message))

    # --- close -----------------------------------------------------------------

    async def close(self, reason: str) -> list[TeardownStep]:
        """Tell the client why, stop the track, close the peer, stop the pipeline, delete the files. Idempotent:
        every call returns the steps of the one teardown."""
        self.closing = True
        if self._close_task is None:
            self._close_task = asyncio.ensure_future(self._teardown(reason))
        return await asyncio.shield(self._close_task)

    async def _teardown(self, reason: str) -> list[TeardownStep]:
        steps: list[TeardownStep] = []
        await self._send_stream_stopped(reason)
        if self.track is not None:
            self.track.stop()
        for task in self._tasks:
            task.cancel()
        # The viewers' peers close beside the client's, within the same bound.
        viewers = asyncio.ensure_future(self.broadcast.close())
        detail: dict[str, Any] = {}
        try:
            await asyncio.wait_for(self._pc.close(), PEER_CLOSE_TIMEOUT_SECONDS)
        except asyncio.TimeoutError:
            logger.warning("session %s: peer did not close within %ss", self.session_id, PEER_CLOSE_TIMEOUT_SECONDS)
            detail["timed_out"] = True
        if viewer_count := await viewers:
            detail["viewers"] = viewer_count
        steps.append(TeardownStep(SessionEvent.Kind.PEER_CLOSED, timezone.now(), detail))
        # On the frame thread: a batch holding this session's frame finishes first (its result is dropped).
        freed = await asyncio.get_running_loop().run_in_executor(self._frame_batcher.executor, self._stop_pipeline)
        steps.append(TeardownStep(SessionEvent.Kind.PIPELINE_STOPPED, timezone.now(), freed))
        try:
            removed = await asyncio.to_thread(remove_session_files, self.files_dir)
            steps.append(TeardownStep(SessionEvent.Kind.CLEANED_UP, timezone.now(), {"files_removed": removed}))
        except OSError as exc:
            # The peer and pipeline are gone; the worker retries the files (see services.session_closed).
            logger.warning("session %s: could not remove %s: %s", self.session_id, self.files_dir, exc)
            steps.append(TeardownStep(SessionEvent.Kind.CLEANED_UP, timezone.now(),
                                      {"failed": str(exc), "files_dir": str(self.files_dir)}))
        return steps

    async def _send_stream_stopped(self, reason: str) -> None:
        """Scope's clients learn that the server ended a stream from this data-channel message, not the socket."""
        channel = self.data_channel
        if channel is None or channel.readyState != "open":
            return
        words = errors.close_message(reason, max_session_seconds=settings.SCOPE_MAX_SESSION_SECONDS)
        channel.send(json.dumps({"type": "stream_stopped", "reason": reason, "error_message": words}))
        # Closing the peer aborts SCTP and drops what is still queued: let the message leave first.
        flush_by = time.monotonic() + STREAM_STOPPED_FLUSH_SECONDS
        while channel.bufferedAmount > 0 and time.monotonic() < flush_by:
            await asyncio.sleep(0.005)
        await asyncio.sleep(0)

    def _stop_pipeline(self) -> dict[str, Any]:
        device = self._device
        if self._processor is None:
            return {"device": str(device)}
        before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        self._processor.close()
        if device.type != "cuda":
            return {"device": str(device)}
        return {"device": str(device), "gpu_bytes_freed": before - torch.cuda.memory_allocated(device)}


def _wants_video_back(sdp: str) -> bool:
    """False when the offer's video only sends (a WHIP publisher); the offer has been validated already."""
    try:
        description = SessionDescription.parse(sdp)
    except Exception:  # the parser raises many kinds; setRemoteDescription reports it
        return True
    return any(media.kind == "video" and media.direction in ("sendrecv", "recvonly", None)
               for media in description.media)
