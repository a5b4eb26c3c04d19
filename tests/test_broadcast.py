"""The shared encoder and a viewer's packet queue, on their own (no peers)."""

import fractions

import av
import numpy as np
import pytest

from media_pipeline import broadcast
from media_pipeline.broadcast import SharedEncoder, ViewerTrack


def frames(count: int, size: int = 64):
    for index in range(count):
        pixels = np.full((size, size, 3), index * 7 % 256, dtype=np.uint8)
        frame = av.VideoFrame.from_ndarray(pixels, format="rgb24")
        frame.pts, frame.time_base = index * 3000, fractions.Fraction(1, 90_000)
        yield frame


@pytest.mark.parametrize("mime", ["video/VP8", "video/H264"])
def test_packets_carry_the_frames_time_and_start_with_a_keyframe(mime):
    encoder = SharedEncoder(mime)
    packets = [packet for frame in frames(10) for packet in encoder.encode(frame)]
    assert packets[0].is_keyframe
    assert [packet.pts for packet in packets] == [index * 3000 for index in range(10)]
    assert all(packet.time_base == fractions.Fraction(1, 90_000) for packet in packets)
    assert sum(packet.is_keyframe for packet in packets) == 1


def test_a_flood_of_keyframe_requests_gets_at_most_one_per_interval(monkeypatch):
    clock = iter(i * 0.033 for i in range(1000))  # 30 fps, whatever this machine's speed
    monkeypatch.setattr(broadcast.time, "monotonic", lambda: next(clock))
    encoder = SharedEncoder("video/VP8")
    keyframes = 0
    for frame in frames(60):  # two seconds of video
        for _ in range(1000):
            encoder.request_keyframe()
        keyframes += sum(packet.is_keyframe for packet in encoder.encode(frame))
    assert keyframes <= 2 / broadcast.KEYFRAME_MIN_INTERVAL + 1, keyframes


async def test_a_viewer_starts_at_a_keyframe_and_one_far_behind_waits_for_the_next():
    encoder = SharedEncoder("video/VP8")
    track = ViewerTrack(encoder)
    packets = [packet for frame in frames(3) for packet in encoder.encode(frame)]
    track.push(packets[1])  # joined mid-stream: a delta frame is useless to it
    track.push(packets[0])
    assert (await track.recv()) is packets[0]
    for _ in range(broadcast.VIEWER_QUEUE_PACKETS + 1):
        track.push(packets[2])  # never read: the sender fell behind
    assert encoder._keyframe_wanted
    track.push(packets[2])  # dropped until a keyframe comes
    track.push(packets[0])
    assert (await track.recv()) is packets[0]


def test_a_forced_keyframe_never_marks_the_frame_the_client_may_be_encoding():
    yuv = next(frames(1)).reformat(format="yuv420p")
    untouched = yuv.pict_type
    packets = SharedEncoder("video/VP8").encode(yuv)  # the first frame is always a keyframe
    assert packets[0].is_keyframe
    assert yuv.pict_type == untouched
