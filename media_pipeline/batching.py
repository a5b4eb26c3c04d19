"""Cross-session batching: one forward pass for the latest frames of every session running the same pipeline.

A media worker has one frame thread per device, shared by its sessions. When
several sessions run the same pipeline with the same parameters on frames of
the same size, running their frames as one batch of N costs one
forward pass instead of N. ``FrameBatcher`` (one per device, owned by the
worker) collects them: the first frame of a group opens a window of
``window_seconds``; the group runs when the window ends, when it holds
``max_batch`` frames (or the group's size limit), or as soon as every
session that shares its key has a frame in it, so a session alone on its
pipeline never waits. Each session still hands over only its newest frame
(``PipelineTrack``: latest frame wins) and awaits its own future. When the
frame thread reaches a frame, it first swaps it for a newer one from the same
session if one came while it waited: on a thread slower than the cameras a
forward starts on a fresh frame, not on one that waited behind a frame of
every other session.

Batching only pays where a forward of N costs less than N forwards of one (a
GPU). On a CPU a convolution's cost grows with the batch, and a frame in a
batch comes back only when the whole batch is done, so there it would buy
nothing and cost latency. So the batcher measures, per key, what a frame
costs in batches of each size, and a group collects no more frames than the
smallest size within ``MIN_BATCH_GAIN`` of the cheapest per frame: on a CPU
that is usually 1 (every frame runs as it comes), on a GPU the largest.
Until both a lone frame and a batch have been measured, groups batch as far
as the sessions allow. Every ``PROBE_INTERVAL_SECONDS`` one group runs alone
and, the next time, one as large as ``max_batch``, so the figures follow the
load. A key that has only ever run alone, though its groups could wait for
others, runs alone between probes from the first one on: no other frame came
within a window, so waiting again would buy nothing.

Pipelines that cannot batch (``Pipeline.batchable`` false) and passthrough run
one frame at a time, as before. A session that stops withdraws its pending
frame: its future fails at once (``FrameWithdrawn``) and the others' batch
goes on without it.
"""

import asyncio
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import NamedTuple

from av import VideoFrame
from prometheus_client import Histogram

from . import metrics
from .pipelines import FrameProcessor


# A larger batch must save this share of each frame's time to be worth the wait for its last frame.
MIN_BATCH_GAIN = 0.1
FIRST_PROBE_SECONDS = 1.0
PROBE_INTERVAL_SECONDS = 10.0
COST_SMOOTHING = 0.3  # weight of the newest measurement in each size's running cost
# Keys measured at once: a session sweeping a parameter makes a new key per value.
MAX_SIZED_KEYS = 64


class FrameWithdrawn(Exception):
    """The session stopped while its frame waited for (or ran in) a batch."""


@dataclass(eq=False)
class _Entry:
    processor: FrameProcessor
    frame: VideoFrame
    future: asyncio.Future[VideoFrame]
    # (pipeline key, height, width), or None: run on its own.
    key: Hashable | None
    submitted_at: float  # time.perf_counter()
    # Takes the session's frame that came after this one, if any; safe to call from the frame thread.
    newer: Callable[[], VideoFrame | None] | None

    def take_newest(self) -> None:
        newest = self.newer() if self.newer is not None else None
        if newest is None:
            return
        self.frame = newest
        if self.key is not None and self.key[1:] != (newest.height, newest.width):
            self.key = None  # a new size: it can no longer share its group's forward


@dataclass
class _Sizing:
    """What a frame has cost in batches of each size, for one key; so how many frames its groups collect."""

    seconds_per_frame: dict[int, float] = field(default_factory=dict)
    next_probe_at: float | None = None
    probe_alone_next: bool = True
    probed: bool = False  # the first probe has run

    def note(self, size: int, seconds: float) -> None:
        cost = seconds / size
        known = self.seconds_per_frame.get(size)
        self.seconds_per_frame[size] = cost if known is None else known + COST_SMOOTHING * (cost - known)

    def limit(self, max_batch: int, now: float) -> int:
        """The most frames a group of this key opening ``now`` may collect."""
        if self.next_probe_at is None:
            self.next_probe_at = now + FIRST_PROBE_SECONDS
        elif now >= self.next_probe_at:
            self.next_probe_at = now + PROBE_INTERVAL_SECONDS
            self.probed = True
            alone, self.probe_alone_next = self.probe_alone_next, not self.probe_alone_next
            return 1 if alone else max_batch
        costs = self.seconds_per_frame
        if self.probed and set(costs) == {1}:
            # Its groups could wait for others' frames, and none ever came within the window (a frame
            # thread busy with one session's frame at a time): between probes, the wait would only cost.
            return 1
        if 1 not in costs or len(costs) < 2:  # nothing to compare yet
            return max_batch
        cheapest = min(costs.values())
        return min(size for size, cost in costs.items() if cost * (1 - MIN_BATCH_GAIN) <= cheapest)


class _PipelineHistograms(NamedTuple):
    seconds: Histogram
    batch_frames: Histogram
    batch_wait: Histogram


@dataclass
class FrameBatcher:
    """Runs sessions' frames on the device's frame thread (``executor``), batched where their pipelines allow."""

    executor: Executor
    window_seconds: float
    max_batch: int
    # Each session's processor → the key of its last frame: who could share a batch.
    _members: dict[FrameProcessor, Hashable | None] = field(default_factory=dict)
    _pending: dict[Hashable, list[_Entry]] = field(default_factory=dict)
    _windows: dict[Hashable, asyncio.TimerHandle] = field(default_factory=dict)
    _sizing: dict[Hashable, _Sizing] = field(default_factory=dict)
    # The size limit of each open group, set when its first frame came.
    _limits: dict[Hashable, int] = field(default_factory=dict)
    _runs: set[asyncio.Task] = field(default_factory=set)
    _stopped: bool = False
    # Histogram children by pipeline name, bound once (the frame path never looks a label up).
    _histograms: dict[str, _PipelineHistograms] = field(default_factory=dict)

    # --- sessions ----------------------------------------------------------------

    def join(self, processor: FrameProcessor) -> None:
        self._members.setdefault(processor, None)

    def leave(self, processor: FrameProcessor) -> None:
        key = self._members.pop(processor, None)
        if key is not None:
            self._flush_if_complete(key)  # the others may have been waiting for this one

    def submit(self, processor: FrameProcessor, frame: VideoFrame,
               newer: Callable[[], VideoFrame | None] | None = None) -> asyncio.Future[VideoFrame]:
        """Queue one session's frame; the future resolves to the processed frame.

        ``newer`` hands over (and takes) a frame the session received since, if any; the frame
        thread calls it just before it runs ``frame``, and runs what it gives instead.
        """
        future: asyncio.Future[VideoFrame] = asyncio.get_running_loop().create_future()
        if self._stopped:
            future.set_exception(FrameWithdrawn())
            return future
        pipeline_key = processor.batch_key() if self.max_batch > 1 else None
        key = None if pipeline_key is None else (pipeline_key, frame.height, frame.width)
        entry = _Entry(processor, frame, future, key, time.perf_counter(), newer)
        if key is None:
            self._start([entry])
            return future
        self._members[processor] = key
        group = self._pending.setdefault(key, [])
        if not group:
            self._limits[key] = self._sizing_of(key).limit(self.max_batch, time.monotonic())
        group.append(entry)
        if not self._flush_if_complete(key) and key not in self._windows:
            self._windows[key] = asyncio.get_running_loop().call_later(self.window_seconds, self._flush, key)
        return future

    def withdraw(self, future: asyncio.Future[VideoFrame]) -> None:
        """The session stopped: fail its frame now, and let its batch go without it."""
        if not future.done():
            future.set_exception(FrameWithdrawn())
        for key, group in list(self._pending.items()):
            kept = [entry for entry in group if entry.future is not future]
            if len(kept) != len(group):
                self._pending[key] = kept
                if kept:
                    self._flush_if_complete(key)
                else:
                    self._drop_group(key)

    async def stop(self) -> None:
        """Fail every pending frame and cancel every run; later submissions fail at once. Idempotent."""
        self._stopped = True
        for key in list(self._pending):
            for entry in self._pending[key]:
                if not entry.future.done():
                    entry.future.set_exception(FrameWithdrawn())
            self._drop_group(key)
        runs = list(self._runs)
        for run in runs:
            run.cancel()
        await asyncio.gather(*runs, return_exceptions=True)

    # --- grouping ------------------------------------------------------------------

    def _flush_if_complete(self, key: Hashable) -> bool:
        group = self._pending.get(key)
        if not group:
            return False
        sharing = sum(1 for member_key in self._members.values() if member_key == key)
        if len(group) >= self._limits.get(key, self.max_batch) or len(group) >= sharing:
            self._flush(key)
            return True
        return False

    def _flush(self, key: Hashable) -> None:
        group = self._pending.get(key, [])
        self._drop_group(key)
        if group:
            self._start(group)

    def _drop_group(self, key: Hashable) -> None:
        self._pending.pop(key, None)
        self._limits.pop(key, None)
        window = self._windows.pop(key, None)
        if window is not None:
            window.cancel()

    def _sizing_of(self, key: Hashable) -> _Sizing:
        sizing = self._sizing.get(key)
        if sizing is None:
            if len(self._sizing) >= MAX_SIZED_KEYS:
                del self._sizing[next(iter(self._sizing))]  # the longest known
            sizing = self._sizing[key] = _Sizing()
        return sizing

    def _start(self, entries: list[_Entry]) -> None:
        started = time.perf_counter()
        for entry in entries:
            self._histograms_of(entry.processor.name).batch_wait.observe(started - entry.submitted_at)
        run = asyncio.get_running_loop().create_task(self._run(entries), name="frame-batch")
        self._runs.add(run)
        run.add_done_callback(self._runs.discard)

    async def _run(self, entries: list[_Entry]) -> None:
        try:
            outcomes, timings = await asyncio.get_running_loop().run_in_executor(self.executor, self._process, entries)
        except asyncio.CancelledError:  # stopped: nobody waits past the stop
            self._settle(entries, [FrameWithdrawn() for _ in entries])
            raise
        except RuntimeError as exc:  # the executor is shut down
            outcomes, timings = [exc for _ in entries], []
        for key, size, seconds in timings:
            self._sizing_of(key).note(size, seconds)
        self._settle(entries, outcomes)

    @staticmethod
    def _settle(entries: list[_Entry], outcomes: list[VideoFrame | BaseException]) -> None:
        for entry, outcome in zip(entries, outcomes):
            if entry.future.done():  # withdrawn, or its recv was cancelled
                continue
            if isinstance(outcome, BaseException):
                entry.future.set_exception(outcome)
            else:
                entry.future.set_result(outcome)

    # --- on the frame thread ---------------------------------------------------------

    def _process(self, entries: list[_Entry]) -> tuple[list[VideoFrame | BaseException], list[tuple[Hashable, int, float]]]:
        """Run ``entries`` (withdrawn ones skipped): one forward per group whose key still holds, else one each.

        Also (key, frames, seconds) of each group's forward, for the batch sizing.
        """
        outcomes: list[VideoFrame | BaseException] = [FrameWithdrawn() for _ in entries]
        groups: dict[Hashable, list[int]] = {}
        for index, entry in enumerate(entries):
            if entry.future.done():
                continue
            entry.take_newest()
            # Re-read here: a parameter change since submission must not run with the others' parameters.
            key = entry.processor.batch_key() if entry.key is not None else None
            if key is None or key != entry.key[0]:
                outcomes[index] = self._one(entry)
            else:
                groups.setdefault(entry.key, []).append(index)
        timings: list[tuple[Hashable, int, float]] = []
        for key, indexes in groups.items():
            batch_outcomes, seconds = self._batch([entries[i] for i in indexes])
            for index, outcome in zip(indexes, batch_outcomes):
                outcomes[index] = outcome
            timings.append((key, len(indexes), seconds))
        return outcomes, timings

    def _one(self, entry: _Entry) -> VideoFrame | BaseException:
        processor, frame = entry.processor, entry.frame
        started = time.perf_counter()
        try:
            if processor.is_passthrough:
                out = frame  # straight to the encoder: no RGB round trip
            else:
                out = _with_timing(processor.process_frames([frame])[0], frame)
        except Exception as exc:
            return exc
        self._observe(processor.name, time.perf_counter() - started, 1)
        return out

    def _batch(self, entries: list[_Entry]) -> tuple[list[VideoFrame | BaseException], float]:
        """Each entry's outcome, and the seconds the forward took."""
        # Same key: same pipeline class and parameters, so the first session's module serves them all.
        lead = entries[0].processor
        started = time.perf_counter()
        try:
            processed = lead.process_frames([entry.frame for entry in entries])
            outs: list[VideoFrame | BaseException] = [
                _with_timing(out, entry.frame) for out, entry in zip(processed, entries)
            ]
        except Exception as exc:
            return [exc for _ in entries], time.perf_counter() - started
        seconds = time.perf_counter() - started
        self._observe(lead.name, seconds, len(entries))
        return outs, seconds

    def _histograms_of(self, pipeline: str) -> _PipelineHistograms:
        histograms = self._histograms.get(pipeline)
        if histograms is None:
            histograms = self._histograms[pipeline] = _PipelineHistograms(
                metrics.PIPELINE_SECONDS.labels(pipeline=pipeline),
                metrics.BATCH_FRAMES.labels(pipeline=pipeline),
                metrics.BATCH_WAIT_SECONDS.labels(pipeline=pipeline),
            )
        return histograms

    def _observe(self, pipeline: str, seconds: float, frames: int) -> None:
        """Each frame of a batch of N observes 1/N of its time: the histogram's sum stays the thread's busy time."""
        histograms = self._histograms_of(pipeline)
        for _ in range(frames):
            histograms.seconds.observe(seconds / frames)
        histograms.batch_frames.observe(frames)


def _with_timing(out: VideoFrame, source: VideoFrame) -> VideoFrame:
    out.pts = source.pts
    out.time_base = source.time_base
    return out
