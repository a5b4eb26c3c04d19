"""Bounded waits on the channel layer, for request/response between processes."""

import asyncio
from typing import Any

from channels.layers import get_channel_layer


async def receive_within(channel: str, timeout: float) -> dict[str, Any] | None:
    """The next message on ``channel``, or None after ``timeout`` seconds."""
    try:
        return await asyncio.wait_for(get_channel_layer().receive(channel), timeout)
    except asyncio.TimeoutError:
        return None
