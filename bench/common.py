"""What every bench shares: the servers under test, percentiles, ratios to the bare server.

A bench runs the same client code against each *target* in one run:
``embedded`` (one daphne process), ``scaled`` (daphne + two mediaworkers over
Redis and PostgreSQL) and ``bare`` (``bench.bare_server``), so that every
project figure can be read next to, and as a ratio of, what aiortc and torch
cost alone. Everything binds to 127.0.0.1, and every peer's ICE is restricted
to it on both ends.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

from websockets.asyncio.client import connect

from tests.harness import (
    HOST,
    PYTHON,
    REPO_ROOT,
    ScopeServer,
    free_port,
    start_embedded,
    start_scaled,
)

T = TypeVar("T")
Target = Literal["embedded", "scaled", "bare"]
TARGETS: tuple[Target, ...] = ("embedded", "scaled", "bare")
PROJECT_TARGETS: tuple[Target, ...] = ("embedded", "scaled")
LOOPBACK = "127.0.0.1"
# Holds the dist-info that registers the ``bench_slow`` pipeline (bench.slow_pipeline) by entry point.
PLUGINS_DIR = Path(__file__).resolve().parent / "plugins"
BARE_START_TIMEOUT = 60.0
# With pinning, servers (every process of a target) run on one core and the bench's client on
# another, so neither's load moves the other's figure (they shared both cores before).
SERVER_CPUS = frozenset({0})
CLIENT_CPUS = frozenset({1})


# --- figures --------------------------------------------------------------------


def summary(values: list[float], *, worse: Literal["higher", "lower"] = "higher") -> dict[str, float] | None:
    """median, p90, p99 (nearest rank) and worst of ``values``; None when there are none.

    ``worse="lower"`` is for rates such as fps: p90 is then the value that 90 %
    of samples reach or beat, and worst is the lowest.
    """
    if not values:
        return None
    ordered = sorted(values, reverse=worse == "lower")
    return {
        "n": len(ordered),
        "median": round(statistics.median(ordered), 1),
        "p90": round(nearest_rank(ordered, 0.90), 1),
        "p99": round(nearest_rank(ordered, 0.99), 1),
        "worst": round(ordered[-1], 1),
    }


def nearest_rank(ordered: list[float], q: float) -> float:
    """The ``q`` quantile (0–1) of ``ordered`` (sorted, worst last), by nearest rank."""
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def ratio(project: dict[str, float] | None, bare: dict[str, float] | None) -> dict[str, float | None] | None:
    """project / bare for each statistic; None where either side is missing or the bare one is not > 0."""
    if project is None or bare is None:
        return None
    return {
        key: round(project[key] / bare[key], 2) if bare[key] > 0 else None
        for key in ("median", "p90", "p99", "worst")
    }


def compare(per_target: dict[str, list[float]], *, worse: Literal["higher", "lower"] = "higher") -> dict[str, Any]:
    """One figure: a summary per target, and each project target's ratio to bare."""
    figure: dict[str, Any] = {target: summary(values, worse=worse) for target, values in per_target.items()}
    if "bare" in figure:
        figure["ratio_to_bare"] = {
            target: ratio(figure[target], figure["bare"]) for target in PROJECT_TARGETS if target in figure
        }
    return figure


def figures(results: dict[str, list[dict[str, float | None]]], **options: Any) -> dict[str, Any]:
    """``{target: [cycle {figure: value}]}`` → ``{figure: compare(...)}``; None values are left out."""
    keys = list(dict.fromkeys(key for cycles in results.values() for cycle in cycles for key in cycle))
    return {
        key: compare(
            {
                target: [value for cycle in cycles if (value := cycle.get(key)) is not None]
                for target, cycles in results.items()
            },
            **options,
        )
        for key in keys
    }


def spread(values: list[float | None]) -> dict[str, Any]:
    """A figure repeated over runs: every value, and their min, median and max (None values left out)."""
    known = [value for value in values if value is not None]
    if not known:
        return {"values": values}
    return {"values": values, "min": min(known), "median": statistics.median(known), "max": max(known)}


def emit(result: dict[str, Any]) -> None:
    """The benches' interface: one JSON document on stdout."""
    print(json.dumps(result, indent=2))


def target_list(text: str) -> list[Target]:
    targets = [name.strip() for name in text.split(",") if name.strip()]
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown targets {sorted(unknown)}; choose from {', '.join(TARGETS)}")
    return targets  # type: ignore[return-value]


# --- processes ------------------------------------------------------------------


def process_stats(pid: int) -> dict[str, float]:
    """RSS (MiB), open file descriptors and threads of a process on this machine, from /proc."""
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_mib": round(int(fields["VmRSS"].split()[0]) / 1024, 1),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "threads": int(fields["Threads"]),
    }


# --- servers --------------------------------------------------------------------


@dataclass
class BareHandle:
    """A running ``bench.bare_server``, shaped like ScopeServer where the client looks."""

    port: int
    process: subprocess.Popen[bytes]
    # ScopeClient.connect sends a user's token; the bare server ignores it.
    tokens: dict[str, str] = field(default_factory=lambda: {"alice": "bare"})

    @property
    def ws_url(self) -> str:
        return f"ws://{HOST}:{self.port}/"

    @property
    def origin(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def query(self, message: dict[str, Any]) -> dict[str, Any]:
        """One request on a control socket of its own; returns the reply."""
        async with connect(self.ws_url, proxy=None) as ws:
            json.loads(await ws.recv())  # ready
            await ws.send(json.dumps(message))
            return json.loads(await ws.recv())

    async def peer_closed_at(self, session_id: str, timeout: float = 5.0) -> float:
        """When the bare server closed this peer (Unix time), waiting up to ``timeout`` for it."""
        deadline = time.monotonic() + timeout
        while (at := (await self.query({"type": "peer_closed_at", "sessionId": session_id}))["peer_closed_at"]) is None:
            if time.monotonic() > deadline:
                raise AssertionError(f"bare server never closed peer {session_id}")
            await asyncio.sleep(0.02)
        return at


Server = ScopeServer | BareHandle


def _bench_env() -> dict[str, str]:
    """Servers also load the bench's own pipelines (entry points found on PYTHONPATH)."""
    paths = [str(PLUGINS_DIR), str(REPO_ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {"PYTHONPATH": os.pathsep.join(paths)}


def _ready(handle: BareHandle) -> bool:
    if handle.process.poll() is not None:
        raise RuntimeError(f"bench.bare_server exited {handle.process.returncode} during start-up")
    try:
        asyncio.run(handle.query({"type": "stats"}))
    except OSError:
        return False
    return True


@contextmanager
def start_bare(tmp_path: Path) -> Iterator[BareHandle]:
    """``bench.bare_server`` on a free loopback port; its output goes to ``tmp_path/bare.log``."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **_bench_env()}
    with open(tmp_path / "bare.log", "ab") as log:
        process = subprocess.Popen(
            [PYTHON, "-m", "bench.bare_server", "--port", str(port)],
            cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
    handle = BareHandle(port, process)
    try:
        deadline = time.monotonic() + BARE_START_TIMEOUT
        while not _ready(handle):
            if time.monotonic() > deadline:
                raise RuntimeError(f"bench.bare_server did not listen within {BARE_START_TIMEOUT:g}s")
            time.sleep(0.2)
        yield handle
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def serve(target: Target, tmp_path: Path, *, scaled_workers: int = 2, **env: Any) -> Iterator[Server]:
    """Start ``target`` with ``env`` as extra settings (project targets only); scaled with ``scaled_workers``."""
    if target == "bare":
        with start_bare(tmp_path / target) as handle:
            yield handle
        return
    started = (start_embedded(tmp_path / target, **_bench_env(), **env) if target == "embedded"
               else start_scaled(tmp_path / target, workers=scaled_workers, **_bench_env(), **env))
    with started as server:
        enforced = server.env.get("SCOPE_ICE_ENFORCE_LIST")
        if enforced != LOOPBACK:
            raise RuntimeError(f"refusing to bench a server whose ICE is not loopback-only: {enforced!r}")
        yield server


@contextmanager
def _started_on(cpus: frozenset[int] | None) -> Iterator[None]:
    """Processes started meanwhile inherit ``cpus`` (as under ``taskset -c``), and so do the processes they start."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def server_pid(server: Server) -> int:
    return server.process.pid if isinstance(server, BareHandle) else server.web_process.pid


def pin_client() -> dict[str, list[int]]:
    """Pin this process, every thread it has (some start at import) and those it starts later, to CLIENT_CPUS."""
    for thread in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(thread), CLIENT_CPUS)
    return {"server_cpus": sorted(SERVER_CPUS), "client_cpus": sorted(CLIENT_CPUS)}


def on_each(targets: list[Target], run: Callable[[Server], Awaitable[T]], *, pin: bool = False,
            scaled_workers: int = 2, **env: Any) -> dict[str, T]:
    """Start each target in turn, run ``run`` against it, stop it; results by target.

    ``pin``: the target's processes are started on SERVER_CPUS (checked on the running
    server); the caller pins the client with ``pin_client()``.
    """
    results: dict[str, T] = {}
    for target in targets:
        with ExitStack() as stack:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=f"bench-{target}-"))
            with _started_on(SERVER_CPUS if pin else None):
                server = stack.enter_context(serve(target, Path(tmp), scaled_workers=scaled_workers, **env))
            if pin and os.sched_getaffinity(server_pid(server)) != SERVER_CPUS:
                raise RuntimeError(f"{target} runs on cores {sorted(os.sched_getaffinity(server_pid(server)))}")
            results[target] = asyncio.run(run(server))
    return results
