"""SIGTERM to a web process: drain its signaling sockets before the server stops.

Daphne's own SIGTERM handling cancels every connection's consumer without
calling ``disconnect()``, which would leave their sessions streaming until
the sweep noticed. Instead: each socket of this process ends its sessions
``SERVER_SHUTDOWN`` (the worker tears them down) and is closed 4012; in
embedded mode the in-process media worker drains too; then the server stops.
The drain is bounded; whatever it leaves, the sweep finds.
"""

import asyncio
import logging
import signal

from channels.layers import get_channel_layer
from django.conf import settings

from . import liveness
from .messages import SignalingShutdown

logger = logging.getLogger(__name__)

DRAIN_TIMEOUT_SECONDS = 5.0
_installed = False
_drain: asyncio.Task | None = None


def install_sigterm_drain() -> None:
    """Take over SIGTERM on this process's event loop (once)."""
    global _installed
    if _installed:
        return
    _installed = True
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, _on_sigterm)


def _on_sigterm() -> None:
    global _drain
    if _drain is None:
        _drain = asyncio.ensure_future(_drain_then_stop())


async def _drain_then_stop() -> None:
    try:
        await asyncio.wait_for(_drain_sockets(), DRAIN_TIMEOUT_SECONDS)
    except asyncio.TimeoutError:
        logger.warning("drain: sockets still open after %ss; stopping anyway", DRAIN_TIMEOUT_SECONDS)
    except Exception:
        logger.exception("drain failed; stopping anyway")
    if settings.SCOPE_EMBEDDED:
        from media_pipeline import embedded

        await embedded.stop()
    from twisted.internet import reactor

    reactor.stop()


async def _drain_sockets() -> None:
    layer = get_channel_layer()
    channels = liveness.open_socket_channels()
    logger.info("SIGTERM: draining %d signaling sockets", len(channels))
    message: SignalingShutdown = {"type": "signaling.shutdown"}
    for channel in channels:
        await layer.send(channel, message)
    while liveness.open_socket_channels():
        await asyncio.sleep(0.05)
