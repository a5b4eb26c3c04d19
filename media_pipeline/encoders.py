"""The sessions' VP8 output encoder: libvpx set for a pipeline's picture, not a camera's.

aiortc sets libvpx up for a live camera: a temporal denoiser
(``noise-sensitivity`` 4) and speed 6. A pipeline's output carries no sensor
noise worth removing, and on a CPU worker the output encoder is the largest
cost of a frame. With the denoiser off and speed 12, a moving, noisy 512×512
picture encoded in about half the time at the same PSNR, and the benches'
still picture in three quarters (bench/RESULTS.md). Rate control,
packetization, picture ids and keyframes on request stay aiortc's.

``use_pipeline_vp8_encoder()`` makes every RTCRtpSender created from then on
in this process encode VP8 so; other codecs keep aiortc's encoders.
"""

import os

import av
from aiortc import rtcrtpsender
from aiortc.codecs import get_encoder
from aiortc.codecs.base import Encoder
from aiortc.codecs.vpx import Vp8Encoder, number_of_threads
from aiortc.mediastreams import VIDEO_TIME_BASE, convert_timebase
from aiortc.rtcrtpparameters import RTCRtpCodecParameters

# aiortc's camera settings, but for the two that cost time and buy nothing on a pipeline's output.
LIBVPX_OPTIONS = {
    "cpu-used": "-12",
    "deadline": "realtime",
    "lag-in-frames": "0",
    "noise-sensitivity": "0",
    "overshoot-pct": "15",
    "partitions": "0",  # one token partition
    "static-thresh": "1",
    "undershoot-pct": "100",
}
KEYFRAME_DISTANCE = 3000  # keyframes when a receiver asks, not on a timer
QUANTIZER_RANGE = (2, 56)
# aiortc re-creates its encoder when the bandwidth estimate moves by more than this.
BITRATE_TOLERANCE = 0.1


class PipelineVp8Encoder(Vp8Encoder):
    def encode(self, frame: av.frame.Frame, force_keyframe: bool = False) -> tuple[list[bytes], int]:
        assert isinstance(frame, av.VideoFrame)
        yuv = frame.reformat(format="yuv420p")
        if self.codec is not None and (
            (yuv.width, yuv.height) != (self.codec.width, self.codec.height)
            or abs(self.target_bitrate - self.codec.bit_rate) / self.codec.bit_rate > BITRATE_TOLERANCE
        ):
            self.codec = None
        if self.codec is None:
            self.codec = self._open(yuv.width, yuv.height)  # its first frame is a keyframe
        if force_keyframe:
            yuv = marked_as_keyframe(yuv, frame)
        data = b"".join(bytes(packet) for packet in self.codec.encode(yuv))
        payloads = self._packetize(data, self.picture_id)
        self.picture_id = (self.picture_id + 1) % (1 << 15)
        return payloads, convert_timebase(frame.pts, frame.time_base, VIDEO_TIME_BASE)

    def _open(self, width: int, height: int) -> av.VideoCodecContext:
        context = av.CodecContext.create("libvpx", "w")
        context.width, context.height = width, height
        context.pix_fmt = "yuv420p"
        context.bit_rate = self.target_bitrate
        context.gop_size = KEYFRAME_DISTANCE
        context.qmin, context.qmax = QUANTIZER_RANGE
        # Constant bitrate, with a one-second buffer, as aiortc asks for.
        rate = str(self.target_bitrate)
        context.options = {**LIBVPX_OPTIONS, "bufsize": rate, "minrate": rate, "maxrate": rate}
        context.thread_count = number_of_threads(width * height, os.cpu_count() or 1)
        return context


def marked_as_keyframe(yuv: av.VideoFrame, source: av.VideoFrame) -> av.VideoFrame:
    """``yuv`` (``source`` in yuv420p) marked to be encoded whole.

    A copy when it is ``source`` itself: one processed frame goes both to the
    session's client and to its viewers' shared encoder, and a mark on it would
    make the other encoder send a keyframe too.
    """
    if yuv is source:
        yuv = av.VideoFrame.from_ndarray(source.to_ndarray(format="yuv420p"), format="yuv420p")
    yuv.pict_type = av.video.frame.PictureType.I
    return yuv


def _encoder_for(codec: RTCRtpCodecParameters) -> Encoder:
    if codec.mimeType.lower() == "video/vp8":
        return PipelineVp8Encoder()
    return get_encoder(codec)


def use_pipeline_vp8_encoder() -> None:
    """Make every RTCRtpSender created from now on in this process encode VP8 with PipelineVp8Encoder."""
    rtcrtpsender.get_encoder = _encoder_for
