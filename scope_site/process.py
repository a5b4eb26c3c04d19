"""How a process of this server starts and stops: patches, the embedded worker, the SIGTERM drain.

- ``apply_patches()``, once at process start (the web process's ASGI module,
  the ``mediaworker`` command): the changes this server makes to aioice
  (``SCOPE_ICE_ENFORCE_LIST``, ``SCOPE_ICE_DENY_LIST``), aiortc (the jitter
  buffer's release at the marker bit, the VP8 output encoder's settings) and daphne (the 64 KiB message cap, its
  access log sent through logging).
  Each reaches into its library's internals, so each is applied only to the
  version it was written for: another version stops the process at start,
  not mid-session.
- ``start_embedded()`` / ``stop_embedded()``: with no ``REDIS_URL`` the web
  process is the whole system, its media worker, sweep and daily prune
  running on its own event loop.
- ``install_sigterm_drain()``: daphne's own SIGTERM handling cancels every
  consumer without ``disconnect()``, which would leave their sessions
  streaming until the sweep noticed. Instead each socket of this process ends
  its sessions ``SERVER_SHUTDOWN`` (the worker tears them down) and is closed
  4012; embedded, the in-process worker drains too; then the server stops.
  The drain is bounded; whatever it leaves, the sweep finds.
"""

import asyncio
import logging
import signal
from importlib.metadata import version

from channels.layers import get_channel_layer
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured

logger = logging.getLogger(__name__)

# The library versions the patches below were written against (requirements.txt pins them).
PATCHED_VERSIONS = {"aioice": "0.13.0", "aiortc": "1.16.0", "daphne": "4.2.3"}
DRAIN_TIMEOUT_SECONDS = 5.0

_patched = False
_drain_installed = False
_drain: asyncio.Task | None = None
_worker = None
_worker_started: asyncio.Future | None = None
# The embedded stand-ins for Celery beat; they live as long as the process.
_background: list[asyncio.Task] = []


def apply_patches() -> None:
    """Patch aioice, aiortc and daphne for this process, once; refuse library versions they were not written for."""
    global _patched
    if _patched:
        return
    for package, expected in PATCHED_VERSIONS.items():
        installed = version(package)
        if installed != expected:
            raise ImproperlyConfigured(
                f"{package} {installed} is installed, but this server patches {package} {expected}: "
                "install requirements.txt"
            )
    from media_pipeline.encoders import use_pipeline_vp8_encoder
    from media_pipeline.ice import deny_remote_networks, enforce_ice_addresses
    from media_pipeline.jitter import release_frames_on_marker

    from . import daphne_limits, logs

    daphne_limits.install()
    logs.route_daphne_access_log()
    enforce_ice_addresses(settings.SCOPE_ICE_ENFORCE_LIST)
    deny_remote_networks(settings.SCOPE_ICE_DENY_LIST)
    if settings.SCOPE_RELEASE_ON_MARKER:
        release_frames_on_marker()
    if settings.SCOPE_PIPELINE_VP8:
        use_pipeline_vp8_encoder()
    _patched = True


async def start_embedded() -> None:
    """Start this process's media worker, sweeper and pruner once; every caller waits until the worker is registered."""
    global _worker, _worker_started
    if _worker_started is None:
        from media_pipeline.worker import MediaWorker
        from sessions_app.tasks import run_pruner, run_sweeper

        _worker = MediaWorker(capacity=settings.SCOPE_WORKER_CAPACITY)
        _worker_started = asyncio.ensure_future(_worker.start())
        _background.extend([
            asyncio.create_task(run_sweeper(), name="embedded-sweeper"),
            asyncio.create_task(run_pruner(), name="embedded-pruner"),
        ])
    await asyncio.shield(_worker_started)


async def stop_embedded() -> None:
    """Drain the in-process worker (its sessions end SERVER_SHUTDOWN) and stop the sweeper and pruner."""
    for task in _background:
        task.cancel()
    if _worker is not None and _worker_started is not None and _worker_started.done():
        await _worker.stop()


def install_sigterm_drain() -> None:
    """Take over SIGTERM on this process's event loop (once)."""
    global _drain_installed
    if _drain_installed:
        return
    _drain_installed = True
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
        await stop_embedded()
    from twisted.internet import reactor

    reactor.stop()


async def _drain_sockets() -> None:
    from sessions_app import liveness
    from sessions_app.messages import SignalingShutdown

    layer = get_channel_layer()
    channels = liveness.open_socket_channels()
    logger.info("SIGTERM: draining %d signaling sockets", len(channels))
    message: SignalingShutdown = {"type": "signaling.shutdown"}
    for channel in channels:
        await layer.send(channel, message)
    while liveness.open_socket_channels():
        await asyncio.sleep(0.05)
