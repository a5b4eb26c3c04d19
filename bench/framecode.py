"""A frame index written into the pixels, readable after VP8 and every built-in pipeline.

Glass-to-glass latency needs to know which source frame a received frame came
from. The index is drawn in the luma plane as a grid of 64×64 blocks: a block
carrying a 1 holds vertical stripes (8 px dark, 8 px light), a 0 is flat mid
gray. What the decoder reads is whether a block is *textured* (the spread of
its inner pixels), which all built-ins keep: invert swaps dark and light,
grayscale keeps luma, blur (radius ≤ 4) softens the stripes, edges turns them
into lines and flat blocks into black. Two reference blocks (always textured,
always flat) set the threshold per frame, and every bit is followed by its
complement, so a garbled frame decodes as None rather than a wrong index.
"""

from __future__ import annotations

import time

import av
import numpy as np
from aiortc import VideoStreamTrack

SIZE = 512
BLOCK = 64
BITS = 16
STRIPE = 8
MARGIN = 8  # block border left out of the reading: blur and edges bleed across it
DARK, LIGHT, FLAT = 30, 225, 128

GRID = SIZE // BLOCK
REFERENCE_TEXTURED, REFERENCE_FLAT = 0, 1
FIRST_BIT = 2
FIRST_COMPLEMENT = FIRST_BIT + BITS
MODULO = 1 << BITS


def _block_slice(block: int) -> tuple[slice, slice]:
    row, column = divmod(block, GRID)
    return slice(row * BLOCK, (row + 1) * BLOCK), slice(column * BLOCK, (column + 1) * BLOCK)


def _stripes() -> np.ndarray:
    columns = (np.arange(BLOCK) // STRIPE) % 2
    return np.broadcast_to(np.where(columns == 0, DARK, LIGHT).astype(np.uint8), (BLOCK, BLOCK))


def encode(index: int) -> np.ndarray:
    """The yuv420p picture (shape ``(SIZE * 3 // 2, SIZE)``) showing ``index`` modulo 2**16."""
    picture = np.full((SIZE * 3 // 2, SIZE), FLAT, dtype=np.uint8)  # gray, chroma neutral
    stripes = _stripes()
    value = index % MODULO
    textured = [REFERENCE_TEXTURED]
    for bit in range(BITS):
        textured.append((FIRST_BIT if value >> bit & 1 else FIRST_COMPLEMENT) + bit)
    for block in textured:
        picture[_block_slice(block)] = stripes
    return picture


def _texture(luma: np.ndarray) -> np.ndarray:
    """Spread of each block's inner pixels, over a few rows (the stripes run vertically)."""
    blocks = luma[:SIZE, :SIZE].reshape(GRID, BLOCK, GRID, BLOCK)
    inner = blocks[:, MARGIN : BLOCK - MARGIN : 4, :, MARGIN : BLOCK - MARGIN].astype(np.float32)
    return inner.std(axis=(1, 3)).reshape(-1)


def decode(luma: np.ndarray) -> int | None:
    """The index (modulo 2**16) shown in a ``SIZE × SIZE`` luma plane, or None if unreadable."""
    if luma.shape[0] < SIZE or luma.shape[1] < SIZE:
        return None
    texture = _texture(luma)
    threshold = texture[REFERENCE_TEXTURED] / 2
    if texture[REFERENCE_FLAT] >= threshold:
        return None
    value = 0
    for bit in range(BITS):
        one = texture[FIRST_BIT + bit] > threshold
        if one == (texture[FIRST_COMPLEMENT + bit] > threshold):
            return None
        value |= int(one) << bit
    return value


def luma_plane(frame: av.VideoFrame) -> np.ndarray:
    """The Y plane of a decoded (yuv420p) frame, without copying."""
    plane = frame.planes[0]
    return np.frombuffer(plane, dtype=np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]


class FrameIndexTrack(VideoStreamTrack):
    """A 30 fps 512×512 camera whose frames show their own index; notes when each was captured."""

    def __init__(self) -> None:
        super().__init__()
        self.sent_at: list[float] = []  # time.monotonic() per index

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(encode(len(self.sent_at)), format="yuv420p")
        frame.pts = pts
        frame.time_base = time_base
        self.sent_at.append(time.monotonic())
        return frame

    def capture_time(self, decoded: int) -> float | None:
        """When the most recent frame with this (wrapped) index was captured."""
        last = len(self.sent_at) - 1
        if last < 0:
            return None
        index = last - (last - decoded) % MODULO
        return self.sent_at[index] if index >= 0 else None
