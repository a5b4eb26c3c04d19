"""Cross-session batching (media_pipeline/batching.py): unit tests of FrameBatcher, and two real sessions sharing passes."""

import asyncio
import fractions
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame

from media_pipeline import batching
from media_pipeline.batching import FrameBatcher, FrameWithdrawn
from media_pipeline.pipelines import FrameProcessor, InvertPipeline, ParameterSpec, Pipeline
from media_pipeline.tracks import PipelineTrack
from tests.harness import start_embedded
from tests.peer import ScopeClient
from tests.test_lifecycle import close_to, connect_and_stream
from tests.test_metrics import scrape, value

WINDOW = 0.05  # long enough that a test sees what waits in it


class SpyPipeline(Pipeline):
    """Inverts, and records the batch size of every forward call (and can be held mid-call)."""

    name = "spy"
    label = "Spy"
    batchable = True
    parameter_specs = (ParameterSpec("level", "int", 0, minimum=0, maximum=10),)
    calls: list[int] = []
    gate: threading.Event | None = None

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        SpyPipeline.calls.append(frames.shape[0])
        if SpyPipeline.gate is not None:
            SpyPipeline.gate.wait(5)
        return 255 - frames


class SpyUnbatchable(SpyPipeline):
    name = "spy_single"
    batchable = False


@pytest.fixture(autouse=True)
def spies() -> Iterator[None]:
    registry = {"spy": SpyPipeline, "spy_single": SpyUnbatchable, "invert": InvertPipeline}
    SpyPipeline.calls = []
    SpyPipeline.gate = None
    with mock.patch("media_pipeline.pipelines.available_pipelines", return_value=registry):
        yield


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1, thread_name_prefix="pipeline-test") as pool:
        yield pool


def processor(name: str = "spy", **parameters: Any) -> FrameProcessor:
    return FrameProcessor(name, parameters, torch.device("cpu"))


def frame(value: int, size: int = 32) -> VideoFrame:
    out = VideoFrame.from_ndarray(np.full((size, size, 3), value, dtype=np.uint8), format="rgb24")
    out.pts, out.time_base = value, fractions.Fraction(1, 90000)
    return out


def level(out: VideoFrame) -> int:
    return int(out.to_ndarray(format="rgb24")[0, 0, 0])


class Burst(MediaStreamTrack):
    """A source that hands out ``count`` 16×16 frames (pts 0, 1, …) as fast as they are asked for, then ends."""

    kind = "video"

    def __init__(self, count: int) -> None:
        super().__init__()
        self._sent = 0
        self._count = count

    async def recv(self) -> VideoFrame:
        if self._sent == self._count:
            raise MediaStreamError
        self._sent += 1
        await asyncio.sleep(0)
        return frame(self._sent - 1, size=16)


def sharing(batcher: FrameBatcher, *members: FrameProcessor, size: int = 32) -> None:
    """Join ``members`` as if each had already sent a ``size``² frame of spy at level 0 (a session's
    first frame is what tells the batcher whom it may wait for)."""
    for member in members:
        batcher.join(member)
        batcher._members[member] = (("spy", (("level", 0),)), size, size)


async def test_two_sessions_frames_run_as_one_forward(executor: ThreadPoolExecutor) -> None:
    batcher = FrameBatcher(executor, window_seconds=WINDOW, max_batch=8)
    a, b = processor(), processor()
    sharing(batcher, a, b)
    results = await asyncio.gather(batcher.submit(a, frame(10)), batcher.submit(b, frame(20)))
    assert SpyPipeline.calls == [2]
    assert [level(out) for out in results] == [245, 235], "each session gets its own frame back"
    assert [out.pts for out in results] == [10, 20]
    await batcher.stop()


async def test_a_yuv_pipelines_batch_stays_in_yuv(executor: ThreadPoolExecutor) -> None:
    batcher = FrameBatcher(executor, window_seconds=WINDOW, max_batch=8)
    a, b, odd = processor("invert"), processor("invert"), processor("invert")
    for member in (a, b, odd):
        batcher.join(member)
    batcher._members[a] = batcher._members[b] = (a.batch_key(), 32, 32)  # as after a first frame each
    with mock.patch.object(InvertPipeline, "forward", autospec=True, side_effect=InvertPipeline.forward) as forward:
        shared = await asyncio.gather(batcher.submit(a, frame(10)), batcher.submit(b, frame(20)))
        assert [call.args[1].shape for call in forward.call_args_list] == [(2, 48, 32)], "one forward, packed yuv420p"
        alone = await batcher.submit(odd, frame(30, size=17))  # odd sizes are padded for the pipeline, not refused
    for out, value in zip([*shared, alone], [10, 20, 30]):
        assert out.format.name == "yuv420p", "straight to the encoder, no conversion back to RGB"
        assert abs(level(out) - (255 - value)) <= 3
        assert out.pts == value
    assert (alone.width, alone.height) == (17, 17)
    await batcher.stop()


async def test_a_full_group_runs_before_its_window_ends(executor: ThreadPoolExecutor) -> None:
    batcher = FrameBatcher(executor, window_seconds=5.0, max_batch=8)
    a, b = processor(), processor()
    sharing(batcher, a, b)
    started = time.monotonic()
    await asyncio.gather(batcher.submit(a, frame(1)), batcher.submit(b, frame(2)))
    assert time.monotonic() - started < 1.0, "both sharing sessions were in: no reason to wait"
    assert SpyPipeline.calls == [2]
    await batcher.stop()


async def test_a_session_alone_on_its_pipeline_does_not_wait(executor: ThreadPoolExecutor) -> None:
    batcher = FrameBatcher(executor, window_seconds=5.0, max_batch=8)
    a, other = processor(), processor("invert")
    batcher.join(a), batcher.join(other)
    started = time.monotonic()
    await batcher.submit(a, frame(1))
    assert time.monotonic() - started < 1.0
    await batcher.stop()


async def test_the_window_bounds_the_wait_for_a_session_that_sends_nothing(executor: ThreadPoolExecutor) -> None:
    batcher = FrameBatcher(executor, window_seconds=WINDOW, max_batch=8)
    a, b, silent = processor(), processor(), processor()
    sharing(batcher, a, b, silent)
    started = time.monotonic()
    await asyncio.gather(batcher.submit(a, frame(3)), batcher.submit(b, frame(4)))
    waited = time.monotonic() - started
    assert WINDOW * 0.8 <= waited < WINDOW + 0.5, f"waited {waited:.3f}s for a window of {WINDOW}s"
    assert SpyPipeline.calls == [2]
    await batcher.stop()


async def test_max_batch_caps_a_forward(executor: ThreadPoolExecutor) -> None:
    batcher = FrameBatcher(executor, window_seconds=WINDOW, max_batch=2)
    members = [processor() for _ in range(3)]
    sharing(batcher, *members)
    await asyncio.gather(*(batcher.submit(member, frame(i)) for i, member in enumerate(members)))
    assert sorted(SpyPipeline.calls) == [1, 2]
    await batcher.stop()


async def test_different_parameters_pipelines_or_sizes_are_not_batched(executor: ThreadPoolExecutor) -> None:
    batcher = FrameBatcher(executor, window_seconds=WINDOW, max_batch=8)
    base, other_level, small = processor(level=0), processor(level=3), processor(level=0)
    single_a, single_b = processor("spy_single"), processor("spy_single")
    for member in (base, other_level, small, single_a, single_b):
        batcher.join(member)
    await asyncio.gather(
        batcher.submit(base, frame(1)), batcher.submit(other_level, frame(2)), batcher.submit(small, frame(3, size=16)),
        batcher.submit(single_a, frame(4)), batcher.submit(single_b, frame(5)),
    )
    assert SpyPipeline.calls == [1, 1, 1, 1, 1]
    await batcher.stop()


async def test_a_parameter_change_after_submission_leaves_the_batch(executor: ThreadPoolExecutor) -> None:
    batcher = FrameBatcher(executor, window_seconds=WINDOW, max_batch=8)
    a, b, c = processor(), processor(), processor()
    sharing(batcher, a, b, c)  # c sends nothing: a and b wait out the window
    pending = [batcher.submit(a, frame(1)), batcher.submit(b, frame(2))]
    b.set_parameters("spy", {"level": 5})
    await asyncio.gather(*pending)
    assert sorted(SpyPipeline.calls) == [1, 1]
    await batcher.stop()


async def test_a_closed_sessions_pending_frame_is_dropped_without_holding_the_others(
    executor: ThreadPoolExecutor,
) -> None:
    batcher = FrameBatcher(executor, window_seconds=5.0, max_batch=8)
    a, b, c = processor(), processor(), processor()
    sharing(batcher, a, b, c)
    kept = [batcher.submit(a, frame(1)), batcher.submit(b, frame(2))]
    await asyncio.sleep(0.01)
    assert not any(future.done() for future in kept), "waiting for c, the third sharing session"
    batcher.leave(c)  # c's session closes before sending: a and b no longer wait for it
    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*kept), 1.0)
    assert time.monotonic() - started < 1.0
    assert SpyPipeline.calls == [2]

    withdrawn = batcher.submit(a, frame(3))
    other = batcher.submit(b, frame(4))
    # Both were in, so they run; withdraw one before the frame thread reaches it.
    batcher.withdraw(withdrawn)
    with pytest.raises(FrameWithdrawn):
        await withdrawn
    await asyncio.wait_for(other, 1.0)
    assert SpyPipeline.calls == [2, 1], "the withdrawn frame never reached the pipeline"
    await batcher.stop()


async def test_a_withdrawn_frame_in_a_running_batch_fails_at_once(executor: ThreadPoolExecutor) -> None:
    batcher = FrameBatcher(executor, window_seconds=WINDOW, max_batch=8)
    a, b = processor(), processor()
    sharing(batcher, a, b)
    SpyPipeline.gate = threading.Event()
    futures = [batcher.submit(a, frame(1)), batcher.submit(b, frame(2))]
    while not SpyPipeline.calls:  # the batch is in the forward, held there
        await asyncio.sleep(0.005)
    batcher.withdraw(futures[0])
    with pytest.raises(FrameWithdrawn):
        await asyncio.wait_for(futures[0], 0.5)  # teardown is not held by the running forward
    SpyPipeline.gate.set()
    assert level(await asyncio.wait_for(futures[1], 5)) == 253
    await batcher.stop()


async def test_latest_frame_wins_per_session_while_a_batch_runs(executor: ThreadPoolExecutor) -> None:
    batcher = FrameBatcher(executor, window_seconds=WINDOW, max_batch=8)
    members = [processor(), processor()]
    tracks = [PipelineTrack(Burst(10), member, batcher, on_error=pytest.fail) for member in members]
    sharing(batcher, *members, size=16)
    deadline = time.monotonic() + 5
    while any(track.frames_in < 10 for track in tracks) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    outs = await asyncio.gather(*(track.recv() for track in tracks))
    assert [out.pts for out in outs] == [9, 9], "each session's newest frame, the 9 before it dropped"
    assert SpyPipeline.calls == [2]
    assert [track.frames_out for track in tracks] == [1, 1]
    for track in tracks:
        track.stop()
    await batcher.stop()


class Fed(MediaStreamTrack):
    """A source that hands out the frames a test puts in its queue."""

    kind = "video"

    def __init__(self) -> None:
        super().__init__()
        self.queue: asyncio.Queue[VideoFrame] = asyncio.Queue()

    async def recv(self) -> VideoFrame:
        return await self.queue.get()


async def test_a_frame_waiting_for_the_busy_frame_thread_runs_as_its_sessions_newest(
    executor: ThreadPoolExecutor,
) -> None:
    batcher = FrameBatcher(executor, window_seconds=WINDOW, max_batch=8)
    sources = [Fed(), Fed(), Fed()]
    tracks = [PipelineTrack(source, processor("spy_single"), batcher, on_error=pytest.fail) for source in sources]
    SpyPipeline.gate = threading.Event()
    outs = []
    for source, track, value_sent in zip(sources, tracks, (1, 2, 3)):
        source.queue.put_nowait(frame(value_sent))
        outs.append(asyncio.create_task(track.recv()))
        await asyncio.sleep(0.02)
    # The first is held in its forward, the second and third wait for the frame thread; meanwhile the
    # third's camera sends a newer frame.
    sources[2].queue.put_nowait(frame(4))
    await asyncio.sleep(0.02)
    SpyPipeline.gate.set()
    assert [level(out) for out in await asyncio.wait_for(asyncio.gather(*outs), 5)] == [254, 253, 251]
    assert SpyPipeline.calls == [1, 1, 1], "the replaced frame never ran"
    # The newer frame was taken, so the session's next frame is the next one its camera sends.
    sources[2].queue.put_nowait(frame(5))
    assert level(await asyncio.wait_for(tracks[2].recv(), 5)) == 250
    for track in tracks:
        track.stop()
    await batcher.stop()


async def test_a_newer_frame_of_another_size_leaves_its_batch_and_runs_alone(executor: ThreadPoolExecutor) -> None:
    batcher = FrameBatcher(executor, window_seconds=WINDOW, max_batch=8)
    SpyPipeline.gate = threading.Event()
    busy = batcher.submit(processor("spy_single"), frame(9))  # holds the thread
    members = [processor(), processor()]
    sources = [Fed(), Fed()]
    tracks = [PipelineTrack(source, member, batcher, on_error=pytest.fail) for source, member in zip(sources, members)]
    sharing(batcher, *members, size=16)
    for source, value_sent in zip(sources, (1, 2)):
        source.queue.put_nowait(frame(value_sent, size=16))
    outs = [asyncio.create_task(track.recv()) for track in tracks]
    await asyncio.sleep(0.02)  # both in one group, waiting for the thread
    sources[0].queue.put_nowait(frame(3, size=32))  # the first camera changes size meanwhile
    await asyncio.sleep(0.02)
    SpyPipeline.gate.set()
    await asyncio.wait_for(busy, 5)
    first, second = await asyncio.wait_for(asyncio.gather(*outs), 5)
    assert (first.width, level(first)) == (32, 252)
    assert (second.width, level(second)) == (16, 253)
    assert SpyPipeline.calls == [1, 1, 1], "no forward mixed the two sizes"
    for track in tracks:
        track.stop()
    await batcher.stop()


class PacedSpy(SpyPipeline):
    """A spy whose forward takes ``SECONDS`` per call (``PER_CALL``, a GPU: a batch of any size costs one
    frame's time) or, as a convolution on a CPU did, more per frame the larger the batch (its
    activations no longer fit in cache): a quarter more for each other frame in it."""

    SECONDS = 0.01
    PER_CALL = False

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        size = frames.shape[0]
        time.sleep(self.SECONDS if PacedSpy.PER_CALL else self.SECONDS * size * (1 + 0.25 * (size - 1)))
        return super().forward(frames)


async def stream_for(batcher: FrameBatcher, members: list[FrameProcessor], seconds: float) -> None:
    """Each member submits a frame, awaits it and submits the next, for ``seconds``."""
    async def session(member: FrameProcessor) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await batcher.submit(member, frame(7))
    await asyncio.gather(*(session(member) for member in members))


@pytest.mark.parametrize(("per_call", "expected_size"), [(False, 1), (True, 4)], ids=["cpu-like", "gpu-like"])
async def test_groups_batch_only_as_far_as_batching_saves_time_per_frame(
    executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch, per_call: bool, expected_size: int
) -> None:
    """Once a lone frame and a batch have been timed, four sessions' frames run one by one where a batch
    costs its frames' time (waiting for the others' frames buys nothing) and together where it costs one."""
    monkeypatch.setattr(batching, "FIRST_PROBE_SECONDS", 0.2)
    PacedSpy.PER_CALL = per_call
    with mock.patch("media_pipeline.pipelines.available_pipelines", return_value={"spy": PacedSpy}):
        members = [processor() for _ in range(4)]
    batcher = FrameBatcher(executor, window_seconds=WINDOW, max_batch=8)
    sharing(batcher, *members)
    await stream_for(batcher, members, 0.6)
    assert SpyPipeline.calls[0] == 4, "before anything is measured, the sessions' frames share a forward"
    assert 1 in SpyPipeline.calls, "the first probe runs a frame alone"
    SpyPipeline.calls = []
    await stream_for(batcher, members, 0.3)  # the next probe is PROBE_INTERVAL_SECONDS away
    assert set(SpyPipeline.calls) == {expected_size}, SpyPipeline.calls
    await batcher.stop()


@pytest.mark.parametrize(
    ("seconds_per_frame", "limit"),
    [
        ({}, 8),  # nothing measured: as far as the sessions allow
        ({4: 0.010}, 8),  # no lone frame to compare with
        ({1: 0.025, 4: 0.030, 8: 0.050}, 1),  # a CPU: every batch costs more per frame
        ({1: 0.025, 4: 0.024}, 1),  # saving under MIN_BATCH_GAIN: not worth the wait
        ({1: 0.010, 2: 0.006, 4: 0.003, 8: 0.0016}, 8),
        ({1: 0.010, 4: 0.0020, 8: 0.0019}, 4),  # the smallest size within the gain of the cheapest
    ],
)
def test_a_groups_size_limit_follows_the_measured_cost_per_frame(seconds_per_frame: dict[int, float], limit: int):
    sizing = batching._Sizing(seconds_per_frame=dict(seconds_per_frame))
    assert sizing.limit(8, now=100.0) == limit


def test_the_sizes_are_probed_alone_then_full_at_intervals():
    sizing = batching._Sizing(seconds_per_frame={1: 0.025, 4: 0.030})
    start = 100.0
    assert sizing.limit(8, now=start) == 1
    probe = start + batching.FIRST_PROBE_SECONDS
    assert sizing.limit(8, now=probe) == 1, "the first probe: a frame alone"
    assert sizing.limit(8, now=probe + 0.1) == 1
    assert sizing.limit(8, now=probe + batching.PROBE_INTERVAL_SECONDS) == 8, "the next: as large as allowed"
    assert sizing.limit(8, now=probe + batching.PROBE_INTERVAL_SECONDS + 0.1) == 1


async def test_sessions_whose_frames_never_meet_stop_waiting_a_window_each(
    executor: ThreadPoolExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sessions taking turns (each frame sent once the other's came back, as on a frame thread busy with
    one frame at a time) never share a window: from the first probe on, their frames no longer wait one."""
    monkeypatch.setattr(batching, "FIRST_PROBE_SECONDS", 0.2)
    batcher = FrameBatcher(executor, window_seconds=WINDOW, max_batch=8)
    a, b = processor(), processor()
    sharing(batcher, a, b)

    async def seconds_per_turn(turns: int) -> float:
        started = time.monotonic()
        for turn in range(turns):
            await batcher.submit((a, b)[turn % 2], frame(turn))
        return (time.monotonic() - started) / turns

    assert await seconds_per_turn(4) >= WINDOW * 0.8, "before the first probe, each frame waits for the other's"
    await seconds_per_turn(2)  # the first probe
    assert await seconds_per_turn(10) < WINDOW / 2
    assert set(SpyPipeline.calls) == {1}
    await batcher.stop()


def test_a_key_that_only_ever_ran_alone_stops_waiting_for_others_after_the_first_probe():
    """Frames that never met within a window (the frame thread busy with one session at a time) would wait
    a window each for nothing; the full-size probes still give batches their chance."""
    sizing = batching._Sizing(seconds_per_frame={1: 0.050})
    start = 100.0
    assert sizing.limit(8, now=start) == 8, "before the first probe: as far as the sessions allow"
    probe = start + batching.FIRST_PROBE_SECONDS
    assert sizing.limit(8, now=probe) == 1
    assert sizing.limit(8, now=probe + 0.1) == 1, "only ever alone: no window to wait"
    assert sizing.limit(8, now=probe + batching.PROBE_INTERVAL_SECONDS) == 8, "the full-size probe"
    sizing.note(3, 0.045)  # that probe caught a batch, and it paid
    assert sizing.limit(8, now=probe + batching.PROBE_INTERVAL_SECONDS + 0.1) == 3


async def test_a_session_sweeping_a_parameter_keeps_a_bounded_number_of_sizings(executor: ThreadPoolExecutor) -> None:
    """Each parameter value is a key of its own: a thousand of them keep at most MAX_SIZED_KEYS measurements."""
    batcher = FrameBatcher(executor, window_seconds=WINDOW, max_batch=8)
    member = processor()
    for value in range(1000):
        member.set_parameters("spy", {"level": value % 11})  # with 60 sizes: hundreds of keys
        await batcher.submit(member, frame(value % 200, size=8 + value % 60))
    assert len(batcher._sizing) == batching.MAX_SIZED_KEYS
    await batcher.stop()


def test_a_sizes_cost_is_smoothed_over_its_batches():
    sizing = batching._Sizing()
    sizing.note(4, 0.040)
    sizing.note(4, 0.080)
    assert sizing.seconds_per_frame[4] == pytest.approx(0.010 + batching.COST_SMOOTHING * 0.010)


async def test_stop_fails_pending_frames_and_later_ones(executor: ThreadPoolExecutor) -> None:
    batcher = FrameBatcher(executor, window_seconds=5.0, max_batch=8)
    a, b = processor(), processor()
    sharing(batcher, a, b)
    pending = batcher.submit(a, frame(1))
    await batcher.stop()
    with pytest.raises(FrameWithdrawn):
        await pending
    with pytest.raises(FrameWithdrawn):
        await batcher.submit(a, frame(2))
    assert SpyPipeline.calls == []


# --- a real server: two clients on invert -----------------------------------------------------------


SENT = (200, 60, 20)
INVERTED = tuple(255 - c for c in SENT)


async def test_two_real_sessions_on_invert_share_passes_and_both_stream_inverted(tmp_path) -> None:
    # A window longer than a frame interval pairs the two cameras' frames, so sharing is certain.
    with start_embedded(tmp_path, SCOPE_BATCH_WINDOW_MS=40) as server:
        async with ScopeClient() as first, ScopeClient() as second:
            peers = await asyncio.gather(
                connect_and_stream(first, server, "alice", pipeline="invert", color=SENT),
                connect_and_stream(second, server, "bob", pipeline="invert", color=SENT),
            )
            for peer in peers:
                frames = await peer.wait_frames(30)
                assert close_to(frames[-1][1], INVERTED), f"expected inverted {INVERTED}, got {frames[-1][1]}"
            samples = await asyncio.to_thread(scrape, server, "staff")
        batches = value(samples, "scope_pipeline_batch_frames_count", pipeline="invert")
        frames_run = value(samples, "scope_pipeline_batch_frames_sum", pipeline="invert")
        assert batches and frames_run > batches, f"no batch held two frames ({frames_run} frames in {batches})"
        assert value(samples, "scope_pipeline_seconds_count", pipeline="invert") == frames_run
        # What batching added to each frame's trip: a wait, within the window (and the loop's timer slack).
        waits = value(samples, "scope_pipeline_batch_wait_seconds_count", pipeline="invert")
        waited = value(samples, "scope_pipeline_batch_wait_seconds_sum", pipeline="invert")
        assert waits >= frames_run and 0 < waited / waits <= 0.040 + 0.010
