"""The processed video track a worker sends back to the client."""

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Executor

from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame
from prometheus_client import Histogram

from . import metrics
from .pipelines import FrameProcessor

logger = logging.getLogger(__name__)


class PipelineTrack(MediaStreamTrack):
    """Runs each incoming frame through a session's pipeline, latest frame wins.

    A reader task keeps only the newest decoded frame; ``recv`` processes that
    one on the pipeline thread. When the pipeline is slower than the camera,
    older frames are dropped instead of queued, so latency stays bounded.
    """

    kind = "video"

    def __init__(
        self,
        source: MediaStreamTrack,
        processor: FrameProcessor,
        executor: Executor,
        on_error: Callable[[BaseException], None],
    ) -> None:
        super().__init__()
        self._on_error = on_error
        self._source = source
        self._processor = processor
        self._executor = executor
        self._latest: VideoFrame | None = None
        self._frame_ready = asyncio.Event()
        self._source_ended = False
        self.frames_in = 0
        self.frames_out = 0
        # The pipeline-time histogram's child for the pipeline last timed, rebound only when the session switches.
        self._timed_pipeline: str | None = None
        self._pipeline_seconds: Histogram | None = None
        self._reader = asyncio.create_task(self._read_source(), name=f"pipeline-reader-{self.id}")

    async def _read_source(self) -> None:
        try:
            while True:
                frame = await self._source.recv()
                if self._latest is not None:  # the pipeline never took the previous one
                    metrics.FRAMES_DROPPED.inc()
                self._latest = frame
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
        await self._frame_ready.wait()
        frame, self._latest = self._latest, None
        self._frame_ready.clear()
        if frame is None or self.readyState != "live":  # the source ended, or we were stopped
            self.stop()
            raise MediaStreamError
        try:
            processed = await asyncio.get_running_loop().run_in_executor(self._executor, self._process, frame)
        except Exception as exc:
            if self.readyState == "live":  # a failure during teardown is expected, not reported
                self._on_error(exc)
            self.stop()
            raise MediaStreamError from exc
        self.frames_out += 1
        metrics.FRAMES_OUT.inc()
        return processed

    def _process(self, frame: VideoFrame) -> VideoFrame:
        pipeline = self._processor.name
        if pipeline != self._timed_pipeline or self._pipeline_seconds is None:
            self._timed_pipeline = pipeline
            self._pipeline_seconds = metrics.PIPELINE_SECONDS.labels(pipeline=pipeline)
        started = time.perf_counter()
        out = self._run_pipeline(frame)
        self._pipeline_seconds.observe(time.perf_counter() - started)
        return out

    def _run_pipeline(self, frame: VideoFrame) -> VideoFrame:
        if self._processor.is_passthrough:
            # The decoded frame goes straight to the encoder: no RGB round trip.
            return frame
        rgb = frame.to_ndarray(format="rgb24")
        out = VideoFrame.from_ndarray(self._processor.process(rgb), format="rgb24")
        out.pts = frame.pts
        out.time_base = frame.time_base
        return out

    def stop(self) -> None:
        super().stop()
        self._frame_ready.set()  # wake a pending recv so it ends
        self._reader.cancel()
        self._source.stop()
