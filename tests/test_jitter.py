"""The worker's jitter buffer: a video frame goes to the decoder at its marked last packet.

Whatever packets arrive, each frame it releases is one the sender sent, whole, in order and
never empty: one empty frame puts PyAV's VP8 decoder at end of stream for good.
"""

from struct import pack

import pytest
from aiortc.jitterbuffer import MAX_MISORDER, JitterBuffer
from aiortc.rtp import RtpPacket, unwrap_rtx
from hypothesis import given, settings
from hypothesis import strategies as st

from media_pipeline.jitter import MarkerReleaseJitterBuffer

FRAME_TICKS = 3000  # 90 kHz clock, 30 fps
VIDEO, RTX = 96, 97
MEDIA_SSRC, RTX_SSRC = 1111, 2222


def received(sent: RtpPacket) -> RtpPacket:
    """The packet as the receiver hands it to the buffer: parsed off the wire, its payload as _data."""
    packet = RtpPacket.parse(sent.serialize())
    packet._data = packet.payload  # the receiver sets b"" where the payload is empty
    return packet


def media(sequence_number: int, timestamp: int, data: bytes, *, last: bool = False) -> RtpPacket:
    return received(RtpPacket(VIDEO, int(last), sequence_number % 2**16, timestamp % 2**32, MEDIA_SSRC, data))


def padding(sequence_number: int, timestamp: int) -> RtpPacket:
    """A padding-only packet, as Chromium sends on the media SSRC when it has no RTX."""
    sent = RtpPacket(VIDEO, 0, sequence_number % 2**16, timestamp % 2**32, MEDIA_SSRC)
    sent.padding_size = 255
    return received(sent)


def over_rtx(original: RtpPacket) -> RtpPacket:
    """The packet retransmitted on the RTX stream (RFC 4588), unwrapped as the receiver does."""
    rtx = RtpPacket(RTX, original.marker, 7, original.timestamp, RTX_SSRC,
                    pack("!H", original.sequence_number) + original.payload)
    packet = unwrap_rtx(RtpPacket.parse(rtx.serialize()), payload_type=VIDEO, ssrc=MEDIA_SSRC)
    packet._data = packet.payload
    return packet


def released(buffer: JitterBuffer, packets: list[RtpPacket]) -> list[tuple[int, int, bytes]]:
    """(index of the packet whose arrival released it, timestamp, data) of each frame released."""
    frames = []
    for index, packet in enumerate(packets):
        _, frame = buffer.add(packet)
        if frame is not None:
            frames.append((index, frame.timestamp, frame.data))
    return frames


def frames_out(buffer: JitterBuffer, packets: list[RtpPacket]) -> list[tuple[int, bytes]]:
    return [(timestamp, data) for _, timestamp, data in released(buffer, packets)]


def video_buffer(capacity: int = 512) -> MarkerReleaseJitterBuffer:
    return MarkerReleaseJitterBuffer(capacity=capacity, is_video=True)


def stock_buffer(capacity: int = 512) -> JitterBuffer:
    return JitterBuffer(capacity=capacity, is_video=True)


def test_the_issue_padding_after_a_frame_is_no_frame_of_its_own():
    # Chromium without RTX: padding with the timestamp of the frame just sent, after its marker.
    stream = [media(100, 1000, b"A1"), media(101, 1000, b"A2", last=True), padding(102, 1000),
              media(103, 4000, b"B1"), media(104, 4000, b"B2", last=True)]
    assert stream[2].payload == b""
    next_frame = [media(105, 7000, b"C1")]
    assert frames_out(stock_buffer(), stream + next_frame) == [(1000, b"A1A2"), (4000, b"B1B2")]
    assert frames_out(video_buffer(), stream) == [(1000, b"A1A2"), (4000, b"B1B2")]
    assert frames_out(video_buffer(), stream + next_frame) == [(1000, b"A1A2"), (4000, b"B1B2")]


def test_a_complete_frame_goes_at_its_marked_packet_not_one_frame_later():
    stream = [media(9, 0, b"\x09", last=True), media(10, 3000, b"\x0a"), media(11, 3000, b"\x0b"),
              media(12, 3000, b"\x0c", last=True), media(13, 6000, b"\x0d", last=True)]
    stock = released(stock_buffer(), stream)
    marker = released(video_buffer(), stream)
    # aiortc sends a frame when the next begins; here each goes at its marker, the first included.
    assert stock == [(1, 0, b"\x09"), (4, 3000, b"\x0a\x0b\x0c")]
    assert marker == [(0, 0, b"\x09"), (3, 3000, b"\x0a\x0b\x0c"), (4, 6000, b"\x0d")]


def test_frames_of_one_packet_each_go_at_their_own_packet():
    # A still picture: every frame fits in one packet. None may wait for the packet after it.
    stream = [media(70 + index, 3000 * index, bytes([index]), last=True) for index in range(6)]
    assert released(video_buffer(), stream) == [(index, 3000 * index, bytes([index])) for index in range(6)]


def test_a_first_frame_whose_first_packet_comes_after_it_went_goes_without_it_as_in_aiortc():
    packets = arrivals("A1 A2 A3* B1 B2* C1", "A2 A3* ^A1 B1 B2* C1", first_seq=100)
    ours, stock = released(video_buffer(), packets), released(stock_buffer(), packets)
    # The decoder cannot use it and asks for a keyframe (aiortc's PLI on a decoder error).
    assert [frame[1:] for frame in ours] == [frame[1:] for frame in stock] == [(1000, b"A2A3"), (4000, b"B1B2")]


def test_a_frame_with_a_missing_packet_waits_for_it():
    buffer = video_buffer()
    stream = [media(19, 0, b"\x13", last=True), media(20, 3000, b"\x14"), media(22, 3000, b"\x16", last=True)]
    assert frames_out(buffer, stream) == [(0, b"\x13")]
    # The retransmission fills the gap: the frame is whole, and goes.
    _, frame = buffer.add(media(21, 3000, b"\x15"))
    assert frame is not None and frame.data == b"\x14\x15\x16"


def test_a_frame_without_a_marked_packet_goes_when_the_next_begins():
    stream = [media(29, 0, b"\x1d", last=True), media(30, 3000, b"\x1e"), media(31, 3000, b"\x1f"),
              media(32, 6000, b"\x20")]
    assert frames_out(video_buffer(), stream) == [(0, b"\x1d"), (3000, b"\x1e\x1f")]


def test_a_packet_with_the_timestamp_of_a_frame_gone_is_no_frame():
    # Stale: sent after that frame's marked packet, by a sender that marked too early, say.
    stream = [media(50, 0, b"A", last=True), media(51, 3000, b"B1"), media(52, 3000, b"B2", last=True),
              media(53, 3000, b"stale"), media(54, 6000, b"C1", last=True)]
    assert frames_out(video_buffer(), stream) == [(0, b"A"), (3000, b"B1B2"), (6000, b"C1")]


def test_audio_keeps_the_stock_rule():
    stream = [media(40, 0, b"\x28", last=True), media(41, 160, b"\x29", last=True)]
    assert frames_out(MarkerReleaseJitterBuffer(capacity=16, prefetch=0), stream) == frames_out(
        JitterBuffer(capacity=16, prefetch=0), stream
    )


# --- packet sequences written out --------------------------------------------------------------
#
# What a sender sent is written as names in sending order, numbered from first_seq: "B2" is frame
# B's second packet (its data b"B2"), "B3*" its last (marker bit set), "b1" a padding-only packet
# with frame B's timestamp. Frame A's timestamp is 1000, B's 4000, C's 7000, and so on. What
# arrived uses the same names: a name missing was lost, one twice a duplicate, and "^B2" is B2
# retransmitted over RTX. The expected frames are named by letter, each with all its data.


def timestamp_of(frame: str) -> int:
    return 1000 + FRAME_TICKS * (ord(frame.upper()) - ord("A"))


def sent_packets(sent: str, first_seq: int) -> dict[str, RtpPacket]:
    packets = {}
    for offset, name in enumerate(sent.split()):
        name, last = name.rstrip("*"), name.endswith("*")
        if name.islower():
            packets[name] = padding(first_seq + offset, timestamp_of(name[0]))
        else:
            packets[name] = media(first_seq + offset, timestamp_of(name[0]), name.encode(), last=last)
    return packets


def arrivals(sent: str, arrived: str, first_seq: int) -> list[RtpPacket]:
    packets = sent_packets(sent, first_seq)
    return [over_rtx(packets[name.strip("^*")]) if name.startswith("^") else packets[name.rstrip("*")]
            for name in arrived.split()]


def whole_frames(sent: str, frames: str) -> list[tuple[int, bytes]]:
    names = sent.replace("*", "").split()
    return [(timestamp_of(frame), "".join(name for name in names if name[0] == frame).encode())
            for frame in frames.split()]


def case(id, sent, *, arrived=None, expected, stock_agrees=False, first_seq=100, capacity=512):
    return pytest.param(sent, arrived or sent, expected, stock_agrees, first_seq, capacity, id=id)


CASES = [
    # Padding-only packets.
    case("padding-after-the-first-frame (the issue)", "A1 A2* a1 B1 B2* C1", expected="A B", stock_agrees=True),
    case("padding-after-a-frame", "A1* B1 B2* b1 b2 C1 C2* D1", expected="A B C", stock_agrees=True),
    case("padding-with-the-next-frame's-timestamp", "A1* B1 B2* c1 c2 C1 C2* D1", expected="A B C",
         stock_agrees=True),
    case("padding-before-the-first-frame", "a1 A1 A2* B1 B2* C1", expected="A B", stock_agrees=True),
    case("padding-before-the-first-frame-from-one-never-received", "a1 a2 B1 B2* C1 C2* D1", expected="B C"),
    case("padding-arrives-after-the-next-frame", "A1* B1 B2* b1 C1 C2* D1",
         arrived="A1* B1 B2* C1 C2* b1 D1", expected="A B C", stock_agrees=True),
    case("padding-arrives-amid-the-frame-before-it", "A1* B1 B2 B3* b1 C1",
         arrived="A1* B1 b1 B2 B3* C1", expected="A B", stock_agrees=True),
    # Duplicates.
    case("duplicates-before-release", "A1* B1 B2* C1 C2* D1",
         arrived="A1* B1 B1 B2* C1 C1 C2* D1", expected="A B C", stock_agrees=True),
    case("duplicates-after-release", "A1* B1 B2* C1 C2* D1",
         arrived="A1* B1 B2* B2 B1 C1 C2* C2 D1", expected="A B C", stock_agrees=True),
    case("duplicate-padding", "A1* B1 B2* b1 C1 C2* D1",
         arrived="A1* B1 B2* b1 b1 C1 b1 C2* D1", expected="A B C", stock_agrees=True),
    case("duplicate-of-the-first-packet", "A1 A2* B1 B2* C1",
         arrived="A1 A2* A1 B1 B2* C1", expected="A B", stock_agrees=True),
    # Retransmissions, answering NACKs: with RTX they come on their own stream, unwrapped.
    case("retransmission-fills-a-gap", "A1* B1 B2 B3* C1 C2* D1",
         arrived="A1* B1 B3* C1 C2* B2 D1", expected="A B C", stock_agrees=True),
    case("retransmission-over-rtx-fills-a-gap", "A1* B1 B2 B3* C1 C2* D1",
         arrived="A1* B1 B3* C1 C2* ^B2 D1", expected="A B C", stock_agrees=True),
    case("retransmission-over-rtx-of-a-lost-marker", "A1* B1 B2 B3* C1 C2* D1",
         arrived="A1* B1 B2 C1 C2* ^B3 D1", expected="A B C", stock_agrees=True),
    case("retransmission-of-a-released-frame", "A1* B1 B2* C1 C2* D1",
         arrived="A1* B1 B2* C1 B1 C2* ^B2 D1", expected="A B C", stock_agrees=True),
    # Reordering.
    case("next-frame-before-this-frame's-marker", "A1* B1 B2* C1 C2* D1",
         arrived="A1* B1 C1 C2* B2* D1", expected="A B C", stock_agrees=True),
    case("packets-of-a-frame-out-of-order", "A1* B1 B2 B3* C1",
         arrived="A1* B2 B1 B3* C1", expected="A B", stock_agrees=True),
    case("marker-first", "A1* B1 B2 B3* C1", arrived="A1* B3* B2 B1 C1", expected="A B", stock_agrees=True),
    case("first-frame-out-of-order", "A1 A2 A3* B1 B2* C1", arrived="A2 A1 A3* B1 B2* C1", expected="B"),
    case("padding-after-the-first-frame-arrives-first", "A1 A2* a1 B1 B2* C1",
         arrived="a1 A2* A1 B1 B2* C1", expected="B"),
    # Loss. A gap holds what follows back, as in aiortc, until the buffer overflows.
    case("a-middle-packet-never-recovered", "A1* B1 B2 B3* C1 C2* D1 D2*",
         arrived="A1* B1 B3* C1 C2* D1 D2*", expected="A", stock_agrees=True),
    case("a-marker-packet-lost", "A1* B1 B2 B3* C1 C2* D1 D2*",
         arrived="A1* B1 B2 C1 C2* D1 D2*", expected="A", stock_agrees=True),
    case("a-first-packet-lost", "A1* B1* C1 C2 C3* D1 D2* E1", arrived="A1* B1* C2 C3* D1 D2* E1",
         expected="A B"),
    case("a-padding-packet-lost", "A1* B1 B2* b1 C1 C2* D1", arrived="A1* B1 B2* C1 C2* D1", expected="A B"),
    case("a-lost-first-packet-until-the-buffer-overflows",
         "A1* B1 B2 B3* C1 C2 C3* D1 D2 D3* E1 E2 E3* F1 F2 F3*",
         arrived="A1* B1 B2 B3* C2 C3* D1 D2 D3* E1 E2 E3* F1 F2 F3*", expected="A B D E F", capacity=8),
    # Sequence numbers wrap around at 65535.
    case("sequence-numbers-wrap-inside-a-frame", "A1* B1 B2 B3* b1 C1 C2* D1",
         arrived="A1* B1 B3* B2 b1 C2* C1 D1", expected="A B C", stock_agrees=True, first_seq=65533),
]


@pytest.mark.parametrize("sent, arrived, expected, stock_agrees, first_seq, capacity", CASES)
def test_only_whole_frames_go_in_order(sent, arrived, expected, stock_agrees, first_seq, capacity):
    packets = arrivals(sent, arrived, first_seq)
    ours = released(video_buffer(capacity), packets)
    assert [(timestamp, data) for _, timestamp, data in ours] == whole_frames(sent, expected)
    if stock_agrees:
        stock = released(stock_buffer(capacity), packets)
        assert [frame[1:] for frame in stock] == [frame[1:] for frame in ours]
        # The same frames, none later than aiortc's rule sends it.
        assert all(index <= stock_index for (index, *_), (stock_index, *_) in zip(ours, stock))


# --- the buffer's resets on a sequence jump of MAX_MISORDER or more ------------------------------


def frame_packets(first_seq: int, frame: int, count: int) -> list[RtpPacket]:
    timestamp = 1000 + FRAME_TICKS * frame
    return [media(first_seq + index, timestamp, f"F{frame}.{index};".encode(), last=index == count - 1)
            for index in range(count)]


def whole(frame: int, count: int) -> tuple[int, bytes]:
    return 1000 + FRAME_TICKS * frame, b"".join(p.payload for p in frame_packets(0, frame, count))


def late_retransmission() -> tuple[list[RtpPacket], list[tuple[int, bytes]]]:
    """A packet released long ago comes again, MAX_MISORDER or more behind: the buffer resets."""
    released_frames = MAX_MISORDER // 2 + 10
    stream = [packet for frame in range(released_frames) for packet in frame_packets(100 + 2 * frame, frame, 2)]
    stream.append(over_rtx(stream[0]))
    first_seq = stream[-2].sequence_number + 1
    stream += [packet for frame in range(4)
               for packet in frame_packets(first_seq + 3 * frame, released_frames + frame, 3)]
    # The frame under way at the reset may lack its start as far as the buffer knows: dropped.
    expected = [whole(frame, 2) for frame in range(released_frames)]
    return stream, expected + [whole(released_frames + frame, 3) for frame in range(1, 4)]


def sender_restart_losing_its_first_packet() -> tuple[list[RtpPacket], list[tuple[int, bytes]]]:
    """The sender starts its sequence again, MAX_MISORDER or more lower, and its first packet is lost."""
    stream = [packet for frame in range(3) for packet in frame_packets(1000 + 2 * frame, frame, 2)]
    stream += [packet for frame in range(3) for packet in frame_packets(500 + 2 * frame, 3 + frame, 2)][1:]
    return stream, [whole(frame, 2) for frame in (0, 1, 2, 4, 5)]


@pytest.mark.parametrize("scenario", [late_retransmission, sender_restart_losing_its_first_packet],
                         ids=["late-retransmission", "sender-restart-losing-its-first-packet"])
def test_after_a_reset_only_whole_frames_go(scenario):
    stream, expected = scenario()
    assert frames_out(video_buffer(), stream) == expected


# --- any stream, perturbed -------------------------------------------------------------------------

REORDER_WINDOW = 3  # packets
TAIL_FRAMES = 16  # single-packet frames sent after the stream, so that every whole frame can go


@st.composite
def sender_streams(draw) -> tuple[list[RtpPacket], list[tuple[int, bytes]]]:
    """Frames of 1-4 packets, with padding-only packets before, between and after them."""
    first_seq = draw(st.integers(0, 2**16 - 1) | st.integers(2**16 - 24, 2**16 - 1))
    first_timestamp = draw(st.integers(0, 2**32 - 1))
    sizes = draw(st.lists(st.integers(1, 4), min_size=1, max_size=10)) + [1] * TAIL_FRAMES
    stream: list[RtpPacket] = []
    frames = []
    for frame, size in enumerate(sizes):
        timestamp = first_timestamp + FRAME_TICKS * frame
        if frame < len(sizes) - TAIL_FRAMES:
            # Chromium pads with the timestamp of the frame just sent; other senders may use the next one's.
            padding_timestamp = draw(st.sampled_from([timestamp - FRAME_TICKS, timestamp]))
            for _ in range(draw(st.integers(0, 2))):
                stream.append(padding(first_seq + len(stream), padding_timestamp))
        data = []
        for index in range(size):
            data.append(f"{frame}.{index};".encode())
            stream.append(media(first_seq + len(stream), timestamp, data[-1], last=index == size - 1))
        frames.append((timestamp % 2**32, b"".join(data)))
    return stream, frames


def perturbed(draw, stream: list[RtpPacket], *, losses: bool) -> list[RtpPacket]:
    """Each packet arrives 0-2 times (1-2 without losses), each copy up to REORDER_WINDOW late."""
    copies = st.lists(st.integers(0, REORDER_WINDOW), min_size=0 if losses else 1, max_size=2)
    arriving = [(position + delay, position, packet)
                for position, packet in enumerate(stream) for delay in draw(copies)]
    return [packet for _, _, packet in sorted(arriving, key=lambda arrival: arrival[:2])]


def check_whole_and_in_order(released: list[tuple[int, bytes]], stream: list[RtpPacket],
                              frames_sent: list[tuple[int, bytes]], first_received: RtpPacket) -> None:
    position_of = {timestamp: position for position, (timestamp, _) in enumerate(frames_sent)}
    # Nothing tells a receiver of packets sent before the first it got: the first frame may lack them,
    # as in aiortc (with no keyframe decoded yet, the decoder rejects it and a PLI follows).
    unseen = stream[: stream.index(first_received)]
    positions = []
    for timestamp, data in released:
        positions.append(position_of[timestamp])
        seen_data = b"".join(p.payload for p in stream if p.timestamp == timestamp and p not in unseen)
        assert data and (data == frames_sent[positions[-1]][1] or len(positions) == 1 and data == seen_data)
    assert positions == sorted(set(positions))


@settings(max_examples=300, deadline=None, database=None)
@given(sender_streams(), st.data(), st.sampled_from([16, 512]))
def test_every_frame_released_is_one_sent_whole_and_in_order(sender, data, capacity):
    stream, frames_sent = sender
    arrived = perturbed(data.draw, stream, losses=True)
    first_received = arrived[0] if arrived else stream[0]
    check_whole_and_in_order(frames_out(video_buffer(capacity), arrived), stream, frames_sent, first_received)


@settings(max_examples=150, deadline=None, database=None)
@given(sender_streams(), st.data())
def test_without_losses_every_frame_goes(sender, data):
    stream, frames_sent = sender
    arrived = [stream[0]] + perturbed(data.draw, stream[1:], losses=False)
    frames_released = frames_out(video_buffer(), arrived)
    check_whole_and_in_order(frames_released, stream, frames_sent, stream[0])
    # Each packet releases one frame at most: a few whole ones may still wait at the end.
    all_but_the_last = len(frames_sent) - TAIL_FRAMES // 2
    assert frames_released[:all_but_the_last] == frames_sent[:all_but_the_last]
