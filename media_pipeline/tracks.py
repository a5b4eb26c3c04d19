"""The processed video track a worker sends back to the client."""

import asyncio
import threading
from collections.abc import Callable

from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from . import metrics
from .batching import FrameBatcher
from .pipelines import FrameProcessor


class PipelineTrack(MediaStreamTrack):
    """Runs each incoming frame through a session's pipeline, latest frame wins.

    A reader task keeps only the newest decoded frame; ``recv`` hands that one
    to the device's ``FrameBatcher``, which runs it on the frame thread (with
    other sessions' frames where their pipeline and parameters match). When the
    frame thread reaches it, it takes a newer one from the slot instead if one
    came meanwhile. When the pipeline is slower than the camera, older frames
    are dropped instead of queued, so latency stays bounded.
    """

    kind = "video"

    def __init__(
        self,
        source: MediaStreamTrack,
        processor: FrameProcessor,
        batcher: FrameBatcher,
        on_error: Callable[[BaseException], None],
        on_processed: Callable[[VideoFrame], None] | None = None,
    ) -> None:
        super().__init__()
        self._on_error = on_error
        # Each processed frame also goes here (the session's WHEP viewers).
        self._on_processed = on_processed
        self._source = source
        self._processor = processor
        self._batcher = batcher
        self._latest: VideoFrame | None = None
        # The slot is read by the frame thread too (_take_newer).
        self._latest_lock = threading.Lock()
        self._frame_ready = asyncio.Event()
        self._source_ended = False
        # The frame handed to the batcher and not yet back: withdrawn if the track stops.
        self._in_batcher: asyncio.Future[VideoFrame] | None = None
        self.frames_in = 0
        self.frames_out = 0
        batcher.join(processor)
        self._reader = asyncio.create_task(self._read_source(), name=f"pipeline-reader-{self.id}")

    async def _read_source(self) -> None:
        try:
            while True:
                frame = await self._source.recv()
                with self._latest_lock:
                    replaced, self._latest = self._latest, frame
                if replaced is not None:  # the pipeline never took it
                    metrics.FRAMES_DROPPED.inc()
                self.frames_in += 1
                metrics.FRAMES_IN.inc()
                self._frame_ready.set()
        except MediaStreamError:
            pass
        finally:
            self._source_ended = True
            self._frame_ready.set()

    async def recv(self) -> VideoFrame:
        if self.readyState != "live":
            raise MediaStreamError
        while True:
            await self._frame_ready.wait()
            self._frame_ready.clear()
            frame = self._take_latest()
            # None with the source still on: the frame thread took that frame as a newer one.
            if frame is not None or self._source_ended or self.readyState != "live":
                break
        if frame is None or self.readyState != "live":  # the source ended, or we were stopped
            self.stop()
            raise MediaStreamError
        self._in_batcher = self._batcher.submit(self._processor, frame, newer=self._take_newer)
        try:
            processed = await self._in_batcher
        except Exception as exc:
            if self.readyState == "live":  # a failure during teardown (withdrawn included) is expected
                self._on_error(exc)
            self.stop()
            raise MediaStreamError from exc
        finally:
            self._in_batcher = None
        self.frames_out += 1
        metrics.FRAMES_OUT.inc()
        if self._on_processed is not None:
            self._on_processed(processed)
        return processed

    def _take_latest(self) -> VideoFrame | None:
        """Empty the one-frame slot; what was in it."""
        with self._latest_lock:
            frame, self._latest = self._latest, None
        return frame

    def _take_newer(self) -> VideoFrame | None:
        """The frame that came after the one in the batcher, taken (on the frame thread): it runs instead."""
        frame = self._take_latest()
        if frame is not None:
            metrics.FRAMES_DROPPED.inc()  # the one it replaces
        return frame

    def stop(self) -> None:
        super().stop()
        self._frame_ready.set()  # wake a pending recv so it ends
        if self._in_batcher is not None:
            self._batcher.withdraw(self._in_batcher)  # its teardown does not wait for the batch
        self._batcher.leave(self._processor)
        self._reader.cancel()
        self._source.stop()
