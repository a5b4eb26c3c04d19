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
        if self._is_video:
            frame = self._complete_marked_frame()
            if frame is not None:
                return frame
        return super()._remove_frame(sequence_number)

    def _complete_marked_frame(self) -> JitterFrame | None:
        packets = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None or (packets and packet.timestamp != packets[0].timestamp):
                return None
            packets.append(packet)
            if packet.marker:
                self.remove(count + 1)
                return JitterFrame(data=b"".join(p._data for p in packets), timestamp=packet.timestamp)
        return None


def release_frames_on_marker() -> None:
    """Make every RTCRtpReceiver created from now on in this process use the marker rule."""
    rtcrtpreceiver.JitterBuffer = MarkerReleaseJitterBuffer
