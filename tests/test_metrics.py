"""Metrics: GET /metrics on the web process, a media worker's own endpoint, who may read them.

Real servers and real aiortc sessions for the figures; the access rules also
in-process, one request each.
"""

import asyncio
import socket
import time
from unittest import mock
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError
from av import VideoFrame
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import HOST, PASSWORD, ScopeServer, free_port, start_embedded, start_scaled
from tests.peer import ClientPeer, ScopeClient

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# Outside it: 127.0.0.1 is not let in without logging in.
ELSEWHERE = "10.255.255.0/24"


def parse(text: str) -> Samples:
    """Every sample of a Prometheus text page, by name and labels."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum over every sample of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, sample_labels), v in samples.items() if n == name and wanted <= sample_labels)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def scrape(server: ScopeServer, user: str | None = None) -> Samples:
    response = server.api("GET", "/metrics", user=user)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def scrape_port(port: int) -> Samples:
    response = httpx.get(f"http://{HOST}:{port}/metrics", timeout=5, trust_env=False)
    assert response.status_code == 200, response.text
    return parse(response.text)


async def stream_then_leave(server: ScopeServer, user: str | None, pipeline: str, during=None) -> str:
    """One session's whole life: live, 20 frames back, then the client closes its socket. Its id."""
    async with ScopeClient() as client:
        await client.connect(server, user)
        await client.expect("ready", timeout=15)
        peer: ClientPeer = await client.start_session(pipeline=pipeline)
        await peer.wait_connected()
        await peer.wait_frames(20)
        await server.wait_until_async(lambda: server.session(peer.session_id)["state"] == "live", 5, what="live")
        if during is not None:
            await asyncio.to_thread(during)
        await client.close_socket()
        await peer.wait_server_closed(5)
    record = await asyncio.to_thread(server.closed_session, peer.session_id)
    assert record["close_reason"] == "CLIENT_DISCONNECT"
    return peer.session_id


# --- embedded: one process, one /metrics ----------------------------------------------------


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScopeServer]:
    """Embedded, with an allow list that leaves out 127.0.0.1: only staff may read /metrics."""
    with start_embedded(tmp_path_factory.mktemp("metrics"), SCOPE_METRICS_ALLOW=ELSEWHERE) as server:
        yield server


def test_outside_the_allow_list_only_staff_reads_metrics(guarded_server: ScopeServer) -> None:
    server = guarded_server
    anonymous = server.api("GET", "/metrics", user=None)
    assert anonymous.status_code == 403
    assert anonymous.json()["code"] == "UNAUTHORIZED"
    not_staff = server.api("GET", "/metrics", user="alice")
    assert not_staff.status_code == 403 and not_staff.json()["code"] == "UNAUTHORIZED"
    bad_token = server.api("GET", "/metrics", user=None, headers={"Authorization": "Token not-a-token"})
    assert bad_token.status_code == 401 and bad_token.json()["code"] == "UNAUTHORIZED"
    assert bad_token.headers["www-authenticate"] == "Token"
    samples = scrape(server, "staff")
    assert "scope_sessions" in names(samples)


async def test_a_sessions_life_in_the_embedded_metrics(guarded_server: ScopeServer) -> None:
    server = guarded_server
    before = scrape(server, "staff")
    assert value(before, "scope_queue_length") == 0
    closes_before = value(before, "scope_session_closes_total", reason="CLIENT_DISCONNECT")
    assert closes_before is not None  # every reason is reported, at 0 before its first close
    for family in ("scope_sweep_actions_total", "scope_frames_total", "scope_frames_dropped_total"):
        assert family in names(before), family

    while_live: dict[str, Samples] = {}
    await stream_then_leave(server, "alice", "invert", during=lambda: while_live.update(s=scrape(server, "staff")))

    live = while_live["s"]
    assert value(live, "scope_sessions", state="live") == 1
    assert total(live, "scope_worker_slots", kind="used") == 1
    assert total(live, "scope_worker_slots", kind="capacity") == 4

    after = server.wait_until(
        lambda: (s := scrape(server, "staff"))
        and value(s, "scope_session_closes_total", reason="CLIENT_DISCONNECT") == closes_before + 1 and s,
        5, what="the close counted",
    )
    assert value(after, "scope_sessions", state="live") == 0
    assert value(after, "scope_sessions", state="closing") == 0
    assert total(after, "scope_worker_slots", kind="used") == 0, "the slot was given back"
    assert total(after, "scope_worker_slots", kind="capacity") == 4
    for histogram in ("scope_negotiation_seconds", "scope_setup_seconds", "scope_teardown_seconds"):
        assert value(after, f"{histogram}_count") == 1, histogram
        assert 0 < value(after, f"{histogram}_sum") < 30, histogram
    assert value(after, "scope_frames_total", direction="in") >= 20
    assert value(after, "scope_frames_total", direction="out") >= 20
    assert value(after, "scope_pipeline_seconds_count", pipeline="invert") >= 20
    assert value(after, "scope_pipeline_seconds_bucket", pipeline="invert", le="+Inf") >= 20
    assert value(after, "scope_frames_dropped_total") is not None


# --- scaled: the worker's own endpoint ------------------------------------------------------------


async def test_a_scaled_worker_serves_its_own_figures(tmp_path) -> None:
    metrics_port = free_port()
    with start_scaled(tmp_path, workers=1, worker_env={"SCOPE_METRICS_PORT": metrics_port}) as server:
        await stream_then_leave(server, "alice", "grayscale")

        # The worker recorded answered, live and the teardown: its histograms are on its endpoint.
        worker = await server.wait_until_async(
            lambda: (s := scrape_port(metrics_port)) and value(s, "scope_teardown_seconds_count") == 1 and s,
            5, what="the teardown on the worker's endpoint",
        )
        assert value(worker, "scope_negotiation_seconds_count") == 1
        assert value(worker, "scope_setup_seconds_count") == 1
        assert value(worker, "scope_frames_total", direction="in") >= 20
        assert value(worker, "scope_frames_total", direction="out") >= 20
        assert value(worker, "scope_pipeline_seconds_count", pipeline="grayscale") >= 20
        # The cluster's figures are the web process's to report, not each worker's.
        assert "scope_sessions" not in names(worker) and "scope_session_closes_total" not in names(worker)
        assert httpx.get(f"http://{HOST}:{metrics_port}/other", timeout=5, trust_env=False).status_code == 404

        # The web process (anonymous from loopback, the default allow list): the close the worker
        # recorded is counted through Redis, the slot is back, and it saw no frames of its own.
        web = server.wait_until(
            lambda: (s := scrape(server)) and value(s, "scope_session_closes_total", reason="CLIENT_DISCONNECT") == 1
            and s,
            5, what="the worker's close counted on the web process",
        )
        assert total(web, "scope_worker_slots", kind="used") == 0
        assert total(web, "scope_worker_slots", kind="capacity") == 4
        assert value(web, "scope_frames_total", direction="in") == 0
        assert value(web, "scope_sweep_actions_total", action="workers_lost") == 0


# --- access rules, in-process -------------------------------------------------------------------------


@pytest.fixture
def outside(settings) -> None:
    settings.SCOPE_METRICS_ALLOW = [ELSEWHERE]


@pytest.mark.django_db
def test_loopback_reads_metrics_by_default(client) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert "scope_session_closes_total" in response.content.decode()


@pytest.mark.django_db
@pytest.mark.parametrize("staff", [True, False])
def test_logged_in_staff_read_metrics_from_anywhere(client, django_user_model, outside, staff: bool) -> None:
    user = django_user_model.objects.create_user("carol", password=PASSWORD, is_staff=staff)
    client.force_login(user)
    response = client.get("/metrics")
    assert response.status_code == (200 if staff else 403)


@pytest.mark.django_db
def test_an_allowed_address_needs_no_login(client, settings) -> None:
    settings.SCOPE_METRICS_ALLOW = ["192.0.2.0/24"]
    assert client.get("/metrics", REMOTE_ADDR="192.0.2.7").status_code == 200
    refused = client.get("/metrics", REMOTE_ADDR="198.51.100.7")
    assert refused.status_code == 403 and refused.json()["code"] == "UNAUTHORIZED"
    assert client.get("/metrics", REMOTE_ADDR="::ffff:192.0.2.7").status_code == 200


@pytest.mark.django_db
def test_the_cluster_figures_come_from_the_database(client) -> None:
    from django.utils import timezone

    from sessions_app.models import StreamSession, Worker

    def worker(name: str, state: str, capacity: int) -> Worker:
        return Worker.objects.create(channel_name=name, host="h", pid=1, device="cpu", capacity=capacity, state=state,
                                     heartbeat_at=timezone.now())

    active, gone, long_gone = worker("a", "active", 4), worker("g", "gone", 2), worker("old", "gone", 8)
    StreamSession.objects.create(worker=active, state="live")
    StreamSession.objects.create(worker=active, state="closed")
    StreamSession.objects.create(worker=gone, state="closing")  # a gone worker still holding a slot
    StreamSession.objects.create(worker=long_gone, state="closed")
    StreamSession.objects.create(state="waiting")  # queued: no worker yet
    samples = parse(client.get("/metrics").content.decode())
    assert {state: value(samples, "scope_sessions", state=state) for state in ("waiting", "negotiating", "live", "closing")} \
        == {"waiting": 1, "negotiating": 0, "live": 1, "closing": 1}
    assert value(samples, "scope_queue_length") == 1
    slots = {(dict(labels)["worker"], dict(labels)["kind"]): v for (name, labels), v in samples.items()
             if name == "scope_worker_slots"}
    assert slots == {(str(active.pk), "used"): 1, (str(active.pk), "capacity"): 4,
                     (str(gone.pk), "used"): 1, (str(gone.pk), "capacity"): 2}


@pytest.mark.django_db
def test_the_sweeps_actions_are_counted(client) -> None:
    from sessions_app import tasks
    from sessions_app.services import SweepResult

    def actions() -> dict[str, float]:
        samples = parse(client.get("/metrics").content.decode())
        return {dict(labels)["action"]: v for (name, labels), v in samples.items() if name == "scope_sweep_actions_total"}

    before = actions()
    result = SweepResult(workers_lost=[7], closed={"WORKER_LOST": ["a", "b"], "IDLE_TIMEOUT": ["c"]}, resent=[],
                         placed=["d"], silence_judged=True)
    with mock.patch.object(tasks.services, "sweep", return_value=result):
        tasks.sweep()
    after = actions()
    assert {action: after[action] - before[action] for action in after} == \
        {"workers_lost": 1, "closed": 3, "resent": 0, "placed": 1}


# --- the worker's endpoint, in-process ------------------------------------------------------------------


@pytest.mark.parametrize("allow, status", [(["127.0.0.0/8"], 200), ([ELSEWHERE], 403)])
def test_the_worker_endpoint_applies_the_allow_list(settings, allow: list[str], status: int) -> None:
    from media_pipeline.metrics import MetricsServer

    settings.SCOPE_METRICS_ALLOW = allow
    server = MetricsServer(HOST, 0).start()
    try:
        response = httpx.get(f"http://{HOST}:{server.port}/metrics", timeout=5, trust_env=False)
        assert response.status_code == status
        if status == 200:
            assert "scope_frames_total" in response.text
        else:
            assert response.json()["code"] == "UNAUTHORIZED"
    finally:
        server.stop()


def test_a_taken_port_stops_the_worker_at_start(settings) -> None:
    from django.core.management import CommandError

    from media_pipeline.management.commands.mediaworker import Command

    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        settings.SCOPE_METRICS_BIND = HOST
        with pytest.raises(CommandError, match="cannot serve metrics"):
            Command()._start_metrics(taken.getsockname()[1])


# --- the frame path ----------------------------------------------------------------------------------------


class _Burst(MediaStreamTrack):
    """A source that hands out ``count`` frames as fast as they are asked for, then ends."""

    kind = "video"

    def __init__(self, count: int) -> None:
        super().__init__()
        self._left = count

    async def recv(self) -> VideoFrame:
        if self._left == 0:
            raise MediaStreamError
        self._left -= 1
        await asyncio.sleep(0)
        return VideoFrame(width=16, height=16, format="yuv420p")


async def test_frames_replaced_before_the_pipeline_took_them_count_as_dropped() -> None:
    from media_pipeline import metrics
    from media_pipeline.pipelines import FrameProcessor
    from media_pipeline.batching import FrameBatcher
    from media_pipeline.tracks import PipelineTrack

    dropped_before = metrics.FRAMES_DROPPED._value.get()
    in_before, out_before = metrics.FRAMES_IN._value.get(), metrics.FRAMES_OUT._value.get()
    processor = FrameProcessor("passthrough", {}, torch.device("cpu"))
    with ThreadPoolExecutor(1) as executor:
        batcher = FrameBatcher(executor, window_seconds=0.002, max_batch=8)
        track = PipelineTrack(_Burst(10), processor, batcher, on_error=lambda exc: None)
        deadline = time.monotonic() + 5
        while track.frames_in < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert track.frames_in == 10
        await track.recv()  # takes the newest: the 9 before it were replaced unseen
        track.stop()
        await batcher.stop()
    assert metrics.FRAMES_DROPPED._value.get() - dropped_before == 9
    assert metrics.FRAMES_IN._value.get() - in_before == 10
    assert metrics.FRAMES_OUT._value.get() - out_before == 1
    assert metrics.PIPELINE_SECONDS.labels(pipeline="passthrough")._sum.get() > 0


# --- the cluster's counts while Redis is away ---------------------------------------------------------------


def test_counts_wait_for_redis_and_are_not_lost(settings) -> None:
    from sessions_app.metrics import _SharedTotals

    settings.REDIS_URL = f"redis://{HOST}:{free_port()}/0"  # nothing listens there
    shared = _SharedTotals()
    item = ("scope:metrics:test", "X")
    shared._pending = {item: 5}  # as add() leaves them, without its sender thread
    assert shared.flush() is False
    assert shared._pending == {item: 5}, "kept for the next try"
    shared._pending.clear()


def test_gpu_memory_is_reported_once_cuda_is_in_use(monkeypatch) -> None:
    from media_pipeline.metrics import GpuMemoryCollector

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # a CPU host, or a web process
    assert [family.samples for family in GpuMemoryCollector().collect()] == [[]]
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda index: 1000 * (index + 1))
    (family,) = GpuMemoryCollector().collect()
    assert [(s.labels, s.value) for s in family.samples] == [({"device": "cuda:0"}, 1000), ({"device": "cuda:1"}, 2000)]


# --- the Grafana dashboard ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_dashboard_reads_only_metrics_the_server_serves(client) -> None:
    import json
    import re

    from tests.harness import REPO_ROOT

    served: set[str] = set()
    for family in text_string_to_metric_families(client.get("/metrics").content.decode()):
        served.add(family.name)
        if family.type == "counter":
            served.add(family.name + "_total")
        if family.type == "histogram":
            served.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
    dashboard = json.loads((REPO_ROOT / "deploy" / "grafana" / "scope-server.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    used = {name for expr in expressions for name in re.findall(r"\bscope_[a-z_]+", expr)}
    assert used and used <= served, used - served
    wanted = {"scope_sessions", "scope_session_closes_total", "scope_queue_length", "scope_worker_slots",
              "scope_negotiation_seconds_bucket", "scope_setup_seconds_bucket", "scope_teardown_seconds_bucket",
              "scope_pipeline_seconds_bucket", "scope_frames_total", "scope_frames_dropped_total",
              "scope_gpu_memory_bytes", "scope_sweep_actions_total"}
    assert wanted <= used, wanted - used
