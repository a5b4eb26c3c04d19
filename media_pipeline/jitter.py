"""Release each received video frame at its last packet instead of one frame later.

aiortc's jitter buffer hands a video frame to the decoder only when the first
packet of the *next* frame arrives, which adds one frame interval (33 ms at
30 fps) to every frame's trip. The sender marks a frame's last packet with the
RTP marker bit (RFC 3550; the VP8 and H.264 payload formats both use it so), so
a frame can go at its marked packet, but only if the buffer knows where the
frame began. No header field says so for every codec: a frame starts right
after the end of the one before it (the packet after a marked one, or after one
of another timestamp). Hence:

- Once a frame has gone (or been dropped), the next sequence number begins the
  next frame, which goes as soon as it is there without a gap up to its marked
  packet (or up to a packet of another timestamp, aiortc's rule).
- The first packet received is taken as a frame start, as aiortc does, and its
  frame too goes at its marked packet. Should an earlier packet arrive before
  then (reordering), the frame lacked its start and is dropped; one arriving
  after it went is dropped as aiortc drops it, and the decoder's error asks the
  sender for a keyframe. Waiting for the next frame instead would hold every
  later frame back by one whenever each fits in one packet (a still picture):
  each arriving packet would release the frame before it.
- After one of the buffer's resets (a sequence jump of MAX_MISORDER or more, a
  capacity overflow; both ask the sender for a keyframe) the origin may be
  mid-frame: packets are dropped up to the first one sure to begin a frame.
- A frame with no data (padding-only packets: Chromium pads on the media SSRC
  when it has no RTX, with the timestamp of the frame it just sent) or with the
  timestamp of the frame that went last (stale) is dropped: an empty packet puts
  PyAV's decoder at end of stream for good.

A gap holds everything behind it back, as in aiortc: a packet that is never
recovered stalls the buffer until it overflows and resets.
"""

from aiortc import rtcrtpreceiver
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.utils import uint16_gt


class MarkerReleaseJitterBuffer(JitterBuffer):
    def __init__(self, capacity: int, prefetch: int = 0, is_video: bool = False) -> None:
        super().__init__(capacity, prefetch, is_video)
        self._frame_start: int | None = None  # sequence number sure to begin a frame; None when unknown
        self._last_timestamp: int | None = None  # of the frame that went (released or dropped) last

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        if self._origin is None:
            self._frame_start = packet.sequence_number  # nothing is known of what came before
        elif self._last_timestamp is None and uint16_gt(self._origin, packet.sequence_number):
            self._frame_start = None  # the first packet received was not the first sent
        return super().add(packet)

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        # Video buffers hold no prefetch; anything else keeps aiortc's own rule.
        if not self._is_video or self._prefetch:
            return super()._remove_frame(sequence_number)
        # A reset moved the origin, or the first frame lost its start: find a frame start.
        if self._origin != self._frame_start and not self._drop_to_frame_start():
            return None
        while (length := self._frame_length()) is not None:
            packets = [self._packet(count) for count in range(length)]
            stale = packets[0].timestamp == self._last_timestamp
            self._take(length, packets[0].timestamp)
            data = b"".join(p._data for p in packets)
            if data and not stale:
                return JitterFrame(data=data, timestamp=packets[0].timestamp)
        return None

    def _frame_length(self) -> int | None:
        """How many packets from the origin make up its frame, once all are here."""
        first = self._packet(0)
        for count in range(self.capacity):
            packet = self._packet(count)
            if packet is None:
                return None  # a gap: the frame waits for the missing packet
            if packet.timestamp != first.timestamp:
                return count  # the next frame began
            if packet.marker:
                return count + 1
        return None

    def _drop_to_frame_start(self) -> bool:
        """Drop the packets before the first one sure to begin a frame; False while there is none."""
        previous = None
        for count in range(self.capacity):
            packet = self._packet(count)
            if previous is not None and packet is not None:
                if previous.marker or previous.timestamp != packet.timestamp:
                    self._take(count, previous.timestamp)
                    return True
            previous = packet
        return False

    def _take(self, count: int, timestamp: int) -> None:
        """Take out the first count packets, the last of this timestamp: the next frame begins after them."""
        self.remove(count)
        self._frame_start = self._origin
        self._last_timestamp = timestamp

    def _packet(self, count: int) -> RtpPacket | None:
        return self._packets[(self._origin + count) % self.capacity]


def release_frames_on_marker() -> None:
    """Make every RTCRtpReceiver created from now on in this process use the marker rule."""
    rtcrtpreceiver.JitterBuffer = MarkerReleaseJitterBuffer
