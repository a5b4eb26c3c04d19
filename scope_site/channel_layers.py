"""The Redis channel layer, made to outlast a Redis restart.

channels_redis raises from ``receive()`` when its connection drops, and
Channels then ends the consumer without calling ``disconnect()``: every open
socket would die with Redis. Here ``receive()`` waits and tries again, so
sockets and their sessions ride out the outage, and messages flow again once
Redis is back.
"""

import asyncio
import logging

import redis.exceptions
from channels_redis.core import RedisChannelLayer

logger = logging.getLogger(__name__)

RETRY_SECONDS = 0.5


class ReconnectingRedisChannelLayer(RedisChannelLayer):
    async def receive(self, channel: str) -> dict:
        while True:
            try:
                return await super().receive(channel)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                logger.warning("channel layer: receive on %s failed (%s); retrying in %ss", channel, exc, RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
