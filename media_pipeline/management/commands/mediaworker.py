import asyncio
import logging
import signal

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from media_pipeline.metrics import MetricsServer
from media_pipeline.worker import MediaWorker
from scope_site.process import apply_patches

logger = logging.getLogger(__name__)

# SIGTERM to exit: closing every session and retiring must fit in this.
SHUTDOWN_TIMEOUT_SECONDS = 10.0


class Command(BaseCommand):
    help = "Run a media worker: it owns WebRTC peers and their pipelines for the sessions placed on it."

    def add_arguments(self, parser) -> None:
        parser.add_argument("--capacity", type=int, default=settings.SCOPE_WORKER_CAPACITY,
                            help="concurrent sessions this worker takes (default: SCOPE_WORKER_CAPACITY)")
        parser.add_argument("--metrics-port", type=int, default=settings.SCOPE_METRICS_PORT,
                            help="serve this worker's /metrics on this port at SCOPE_METRICS_BIND; 0: none "
                                 "(default: SCOPE_METRICS_PORT)")

    def handle(self, *args, capacity: int, metrics_port: int, **options) -> None:
        apply_patches()
        metrics = self._start_metrics(metrics_port)
        try:
            asyncio.run(self._serve(capacity))
        finally:
            if metrics is not None:
                metrics.stop()

    def _start_metrics(self, port: int) -> MetricsServer | None:
        if not port:
            return None
        bind = settings.SCOPE_METRICS_BIND
        try:
            server = MetricsServer(bind, port).start()
        except (OSError, OverflowError) as exc:  # a port taken or out of range, an address not ours: see it at once
            raise CommandError(f"cannot serve metrics on {bind} port {port}: {exc}") from exc
        logger.info("metrics on http://%s:%s/metrics (allowed: %s)", bind, server.port, ",".join(settings.SCOPE_METRICS_ALLOW))
        return server

    async def _serve(self, capacity: int) -> None:
        worker = MediaWorker(capacity=capacity)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stopping.set)
        await worker.start()
        try:
            await stopping.wait()
        finally:
            try:
                await asyncio.wait_for(worker.stop(), SHUTDOWN_TIMEOUT_SECONDS)
            except asyncio.TimeoutError:
                # The sweep finds whatever this left open (WORKER_LOST) once the heartbeats stop.
                logger.error("media worker did not drain within %ss; exiting anyway", SHUTDOWN_TIMEOUT_SECONDS)
