"""Release each received video frame at its last packet instead of one frame later.

aiortc's jitter buffer hands a video frame to the decoder only when the first
packet of the *next* frame arrives, which adds one frame interval (33 ms at
30 fps) to every frame's trip. The sender marks a frame's last packet with the
RTP marker bit (RFC 3550; VP8 and H.264 payload formats both use it so), so a
frame whose packets are all present, from the buffer's start up to a marked
packet with the same timestamp, is complete and can go at once.

It is as safe as the stock rule: both release only a run of consecutive
packets that starts at the buffer's origin, and a gap (a lost packet awaiting
its retransmission) holds the frame back in both.
"""

from aiortc import rtcrtpreceiver
from aiortc.jitterbuffer import JitterBuffer, JitterFrame


class MarkerReleaseJitterBuffer(JitterBuffer):
    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        # Video buffers hold no prefetch; anything else keeps aiortc's own rule.
        if not self._is_video or self._prefetch:
            return super()._remove_frame(sequence_number)
        packets = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None:
                return None  # a gap: the frame waits for the missing packet
            if packets and packet.timestamp != packets[0].timestamp:
                return self._release(packets, count)  # aiortc's rule: the next frame began
            packets.append(packet)
            if packet.marker:
                return self._release(packets, count + 1)  # the frame's last packet
        return None

    def _release(self, packets: list, count: int) -> JitterFrame:
        self.remove(count)
        return JitterFrame(data=b"".join(p._data for p in packets), timestamp=packets[0].timestamp)


def release_frames_on_marker() -> None:
    """Make every RTCRtpReceiver created from now on in this process use the marker rule."""
    rtcrtpreceiver.JitterBuffer = MarkerReleaseJitterBuffer
