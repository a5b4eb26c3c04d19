"""A media worker's own figures (frames, pipeline time, GPU memory) and its metrics endpoint.

The metric objects live in prometheus_client's default registry, so they are
served by whichever endpoint the process has: ``GET /metrics`` of the web
process when the worker is embedded in it, the worker's own endpoint
(``SCOPE_METRICS_PORT``) when it runs as ``manage.py mediaworker``.

The frame path calls into these once per frame, so everything it touches is
bound here once: a labelled child, never a label lookup per frame.
"""

import ipaddress
import json
import logging
import socket
import sys
import threading
from collections.abc import Iterable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from django.conf import settings
from prometheus_client import (
    CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, Histogram, disable_created_metrics, generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

logger = logging.getLogger(__name__)

# No ``*_created`` series beside each counter and histogram: Prometheus finds resets without them.
disable_created_metrics()

FRAMES = Counter("scope_frames", "Video frames through the pipelines: in (decoded from clients), out (sent back).",
                 ["direction"])
FRAMES_IN = FRAMES.labels(direction="in")
FRAMES_OUT = FRAMES.labels(direction="out")
FRAMES_DROPPED = Counter(
    "scope_frames_dropped", "Received frames replaced by a newer one before the pipeline took them (latest frame wins)."
)
# One frame's pass through its session's pipeline, conversions included: sub-millisecond (passthrough)
# to a frame interval and beyond (a slow model).
# A frame run in a batch of N observes 1/N of the batch's time, so the sum stays the frame thread's busy time.
PIPELINE_SECONDS = Histogram(
    "scope_pipeline_seconds",
    "Time to run one frame through its pipeline (on the worker's frame thread; its share of a batch's).",
    ["pipeline"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.033, 0.05, 0.1, 0.25, 0.5, 1.0),
)
BATCH_FRAMES = Histogram(
    "scope_pipeline_batch_frames", "Frames run in one forward pass (sessions batched together; 1: alone).",
    ["pipeline"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16),
)
# What batching adds to a frame's trip before its forward: at most a window (SCOPE_BATCH_WINDOW_MS).
BATCH_WAIT_SECONDS = Histogram(
    "scope_pipeline_batch_wait_seconds",
    "Time a frame waited for other sessions' frames to share its forward pass (0: it went on at once).",
    ["pipeline"],
    buckets=(0.0001, 0.0005, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, 0.1),
)
# Every session's frames wait while Python's collector runs (it holds the GIL); media_pipeline.collector times it.
_GC_PAUSE = Histogram(
    "scope_gc_pause_seconds", "Time Python's garbage collector held the worker's threads, per collection.",
    ["generation"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5),
)
GC_PAUSE_SECONDS = tuple(_GC_PAUSE.labels(generation=str(generation)) for generation in range(3))

# WHEP: each processed frame is encoded once per codec its session's viewers use, whatever their number.
VIEWER_FRAMES_ENCODED = Counter(
    "scope_viewer_frames_encoded", "Processed frames encoded for a session's WHEP viewers (once for all of them).",
    ["codec"],
)
VIEWERS = Gauge("scope_viewers", "WHEP viewers' peers held by this process.")


class GpuMemoryCollector(Collector):
    """``scope_gpu_memory_bytes{device}``: torch's allocated CUDA memory, read at scrape time.

    Only once this process has initialized CUDA (a worker that ran a pipeline
    there): asking earlier would create a CUDA context just to report zero, in
    a web process that never uses the GPU. On a CPU-only host the family has no
    samples.
    """

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return [self._family()]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = self._family()
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_initialized():
            for index in range(torch.cuda.device_count()):
                family.add_metric([f"cuda:{index}"], torch.cuda.memory_allocated(index))
        yield family

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("scope_gpu_memory_bytes", "CUDA memory torch holds allocated, per device.",
                                 labels=["device"])


REGISTRY.register(GpuMemoryCollector())


# --- who may read -----------------------------------------------------------------


def client_allowed(address: str) -> bool:
    """Whether a client address lies inside ``SCOPE_METRICS_ALLOW`` (those may read metrics without logging in)."""
    try:
        client = ipaddress.ip_address(address.strip())
    except ValueError:
        return False
    if isinstance(client, ipaddress.IPv6Address) and client.ipv4_mapped:  # a dual-stack listener's IPv4 peer
        client = client.ipv4_mapped
    return any(client in ipaddress.ip_network(cidr) for cidr in settings.SCOPE_METRICS_ALLOW)


REFUSED_DETAIL = "Metrics are for staff users and the addresses in SCOPE_METRICS_ALLOW."


# --- a media worker's own endpoint ------------------------------------------------------


class _MetricsHandler(BaseHTTPRequestHandler):
    server_version = "scope-metrics"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        if self.path.split("?", 1)[0] not in ("/metrics", "/metrics/"):
            self._send(404, "text/plain; charset=utf-8", b"Not found: metrics are at /metrics.\n", body)
        elif not client_allowed(self.client_address[0]):
            refusal = {"code": "UNAUTHORIZED", "detail": REFUSED_DETAIL}
            self._send(403, "application/json", json.dumps(refusal).encode(), body)
        else:
            self._send(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY), body)

    def _send(self, status: int, content_type: str, payload: bytes, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if body:
            self.wfile.write(payload)

    def log_message(self, format: str, *args) -> None:  # scrapes every few seconds: not worth a line each
        logger.debug("metrics %s: " + format, self.client_address[0], *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, handler)


class MetricsServer:
    """The worker's ``/metrics`` on its own port, served from a thread of its own (never the event loop)."""

    def __init__(self, bind: str, port: int) -> None:
        self._httpd = _Server((bind, port), _MetricsHandler)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)

    def start(self) -> "MetricsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
