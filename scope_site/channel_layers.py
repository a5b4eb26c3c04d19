"""The Redis channel layer, made to outlast a Redis restart.

Two things break when Redis restarts under channels_redis 4.3 and redis-py 8:

- ``receive()`` raises when its connection drops, and Channels then ends the
  consumer without calling ``disconnect()``: every open socket would die with
  Redis. Here ``receive()`` waits and tries again, so sockets and their
  sessions ride out the outage, and messages flow again once Redis is back.
- Every connection that sat idle in a pool while Redis went away is dead, and
  redis-py 8's pool hands it out as it is: the check that would find it closed
  is skipped while "maintenance notifications" are on, which they are by
  default ("auto", over RESP3), and a pool's connections retry nothing. So,
  after Redis is back, the next command on each such connection fails once
  with "Connection closed by server": a worker's answer to the first new
  offer, the web process's offer to a worker, a group_add. Here pools are
  built with those notifications off (they serve Redis Enterprise/Cloud
  failovers, not a self-hosted Redis), so a dead idle connection is replaced
  before use, and with one immediate retry of a command whose connection
  broke, so one that dies between that check and its use is replaced too.
"""

import asyncio
import logging
from typing import Any

import redis.exceptions
from channels_redis.core import RedisChannelLayer
from channels_redis.utils import create_pool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

try:
    from redis.maint_notifications import MaintNotificationsConfig
except ImportError:  # redis-py before 7: no such notifications, nothing to turn off
    MaintNotificationsConfig = None

logger = logging.getLogger(__name__)

RETRY_SECONDS = 0.5
# A connection attempt to a Redis that is down but whose host drops packets
# would otherwise wait the whole socket_timeout (15 s in settings).
CONNECT_TIMEOUT_SECONDS = 2.0


def _pool_defaults() -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "socket_connect_timeout": CONNECT_TIMEOUT_SECONDS,
        # Once, at once: a command whose connection turned out dead runs again on a fresh
        # one. Commands channels_redis sends are safe to repeat (ZADD of the same member,
        # EXPIRE, ZREM…). Not on timeouts: a slow Redis is not helped by more load.
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
    }
    if MaintNotificationsConfig is not None:
        defaults["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    return defaults


class ReconnectingRedisChannelLayer(RedisChannelLayer):
    def create_pool(self, index: int):
        host = self.hosts[index]
        if "master_name" in host:  # Sentinel pools take their own options; leave them as configured
            return super().create_pool(index)
        return create_pool({**_pool_defaults(), **host})

    async def receive(self, channel: str) -> dict:
        failures = 0
        while True:
            try:
                message = await super().receive(channel)
            except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError) as exc:
                failures += 1
                # One line per outage and channel, not one every half second.
                log = logger.warning if failures == 1 else logger.debug
                log("channel layer: receive on %s failed (%s); retrying every %ss", channel, exc, RETRY_SECONDS)
                await asyncio.sleep(RETRY_SECONDS)
                continue
            if failures:
                logger.info("channel layer: receive on %s works again after %s failed tries", channel, failures)
            return message
