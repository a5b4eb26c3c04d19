"""The worker's jitter buffer: a video frame goes to the decoder at its marked last packet."""

from aiortc.jitterbuffer import JitterBuffer
from aiortc.rtp import RtpPacket

from media_pipeline.jitter import MarkerReleaseJitterBuffer

FRAME_TICKS = 3000  # 90 kHz clock, 30 fps


def packet(sequence_number: int, frame: int, *, last: bool) -> RtpPacket:
    rtp = RtpPacket(payload_type=96, marker=int(last), sequence_number=sequence_number, timestamp=frame * FRAME_TICKS)
    rtp._data = bytes([sequence_number])  # what the receiver's depayloader leaves for the buffer
    return rtp


def frames_out(buffer: JitterBuffer, packets: list[RtpPacket]) -> list[tuple[int, int, bytes] | None]:
    """For each packet added: (index of the packet, frame timestamp, data) of a frame it released, or None."""
    released: list[tuple[int, int, bytes] | None] = []
    for index, rtp in enumerate(packets):
        _, frame = buffer.add(rtp)
        released.append(None if frame is None else (index, frame.timestamp, frame.data))
    return released


def test_a_complete_frame_goes_at_its_marked_packet_not_one_frame_later():
    stream = [packet(10, 0, last=False), packet(11, 0, last=False), packet(12, 0, last=True), packet(13, 1, last=True)]
    stock = frames_out(JitterBuffer(capacity=128, is_video=True), stream)
    marker = frames_out(MarkerReleaseJitterBuffer(capacity=128, is_video=True), stream)
    assert stock == [None, None, None, (3, 0, bytes([10, 11, 12]))]
    assert marker == [None, None, (2, 0, bytes([10, 11, 12])), (3, FRAME_TICKS, bytes([13]))]


def test_a_frame_with_a_missing_packet_waits_for_it():
    buffer = MarkerReleaseJitterBuffer(capacity=128, is_video=True)
    assert frames_out(buffer, [packet(20, 0, last=False), packet(22, 0, last=True)]) == [None, None]
    # The retransmission fills the gap: the frame is whole, and goes.
    _, frame = buffer.add(packet(21, 0, last=False))
    assert frame is not None and frame.data == bytes([20, 21, 22])


def test_a_frame_whose_marked_packet_was_lost_still_goes_when_the_next_begins():
    buffer = MarkerReleaseJitterBuffer(capacity=128, is_video=True)
    released = frames_out(buffer, [packet(30, 0, last=False), packet(31, 0, last=False), packet(32, 1, last=False)])
    assert released == [None, None, (2, 0, bytes([30, 31]))]


def test_audio_keeps_the_stock_rule():
    stream = [packet(40, 0, last=True), packet(41, 1, last=True)]
    assert frames_out(MarkerReleaseJitterBuffer(capacity=16, prefetch=0), stream) == frames_out(
        JitterBuffer(capacity=16, prefetch=0), stream
    )
