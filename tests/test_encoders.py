"""The sessions' VP8 output encoder: what a receiver decodes, keyframes on request, and where it is used."""

import fractions

import av
import numpy as np
import pytest
from aiortc import rtcrtpsender
from aiortc.codecs import H264Encoder
from aiortc.codecs.vpx import Vp8Decoder, vp8_depayload
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

from media_pipeline.encoders import PipelineVp8Encoder, use_pipeline_vp8_encoder

SIZE = 256


def picture(index: int) -> av.VideoFrame:
    """A moving gradient with texture, in yuv420p, stamped as the index-th frame at 30 fps."""
    rows, columns = np.mgrid[0:SIZE, 0:SIZE]
    luma = ((rows + columns + 6 * index) % 256).astype(np.uint8)
    chroma = np.full((SIZE // 2, SIZE), 128, np.uint8)
    frame = av.VideoFrame.from_ndarray(np.concatenate([luma, chroma]), format="yuv420p")
    frame.pts, frame.time_base = index * 3000, fractions.Fraction(1, 90_000)
    return frame


def keyframe(payloads: list[bytes]) -> bool:
    """RFC 7741: the P bit of the first VP8 payload header byte is 0 on a key frame."""
    return vp8_depayload(payloads[0])[0] & 1 == 0


def decode(decoder: Vp8Decoder, payloads: list[bytes], timestamp: int) -> av.VideoFrame:
    data = b"".join(vp8_depayload(payload) for payload in payloads)
    (frame,) = decoder.decode(JitterFrame(data=data, timestamp=timestamp))
    return frame


def test_what_it_sends_decodes_to_the_picture_with_only_the_first_frame_a_keyframe():
    encoder, decoder = PipelineVp8Encoder(), Vp8Decoder()
    for index in range(10):
        source = picture(index)
        payloads, timestamp = encoder.encode(source)
        assert abs(timestamp - index * 3000) <= 1  # the RTP clock is 90 kHz, as the frames'
        assert keyframe(payloads) == (index == 0)
        decoded = decode(decoder, payloads, timestamp).to_ndarray(format="yuv420p")[:SIZE]
        error = np.abs(decoded.astype(int) - source.to_ndarray(format="yuv420p")[:SIZE]).mean()
        assert error < 3, f"frame {index}: mean luma error {error:.1f}"


def test_a_requested_keyframe_is_one_and_leaves_the_callers_frame_unmarked():
    """The same frame may be encoded for the session's viewers: marking it would give them a keyframe too."""
    encoder = PipelineVp8Encoder()
    encoder.encode(picture(0))
    shared = picture(1)
    payloads, _ = encoder.encode(shared, force_keyframe=True)
    assert keyframe(payloads)
    assert shared.pict_type != av.video.frame.PictureType.I
    assert not keyframe(encoder.encode(picture(2))[0])


def test_a_new_frame_size_starts_a_new_stream_at_a_keyframe():
    encoder, decoder = PipelineVp8Encoder(), Vp8Decoder()
    encoder.encode(picture(0))
    encoder.encode(picture(1))
    smaller = av.VideoFrame.from_ndarray(np.full((96 * 3 // 2, 64), 90, np.uint8), format="yuv420p")
    smaller.pts, smaller.time_base = 6000, fractions.Fraction(1, 90_000)
    payloads, timestamp = encoder.encode(smaller)
    assert keyframe(payloads)
    decoded = decode(decoder, payloads, timestamp)
    assert (decoded.width, decoded.height) == (64, 96)


def test_senders_get_it_for_vp8_and_aiortcs_encoders_for_the_rest(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(rtcrtpsender, "get_encoder", rtcrtpsender.get_encoder)  # restored after the test
    use_pipeline_vp8_encoder()
    vp8 = RTCRtpCodecParameters(mimeType="video/VP8", clockRate=90_000, payloadType=96)
    h264 = RTCRtpCodecParameters(mimeType="video/H264", clockRate=90_000, payloadType=102)
    assert isinstance(rtcrtpsender.get_encoder(vp8), PipelineVp8Encoder)
    assert type(rtcrtpsender.get_encoder(h264)) is H264Encoder
