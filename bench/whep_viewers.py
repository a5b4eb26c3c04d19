"""WHEP viewers: what each added viewer of one WHIP session costs the server, and what the newest one sees.

One embedded server, one WHIP publisher (the 30 fps 512×512 indexed camera,
``--pipeline`` invert), and WHEP viewers added up to each count of
``--viewers`` (default 1, 4, 8). At each count, after a warm-up, over a window
of ``--seconds``:

- ``server_cpu``: the server process's CPU seconds per wall second (/proc/<pid>/stat,
  every thread), and ``client_cpu`` the same for this bench process (publisher
  and viewers), so a saturated client shows;
- the last viewer to join: glass-to-glass latency (publisher's capture of a
  frame index → that viewer decoding it), its fps, and the packets and
  kbit/s its transport received;
- ``scope_viewer_frames_encoded_total`` (the server's /metrics) against the
  frames each viewer received: the output is encoded once for all viewers,
  so ``encoded_per_viewer_frame`` stays near 1 whatever the count, not N.

``--noise`` fills the frame below the code with fresh noise, so the stream
runs at the server encoder's bitrate as a camera's would (the code alone is
about one RTP packet a frame, which understates a viewer's cost);
``last_viewer_packets_per_s`` and ``last_viewer_kbit_per_s`` say which it was.

``cpu_per_added_viewer`` is the slope from the first count to each later one.
``--runs N`` repeats it on a fresh server each time and gives the spread;
``--pin`` puts the server on core 0 and this client on core 1. ``--smoke``:
1 and 2 viewers, 2 s windows, to check the script.

Usage: .venv/bin/python -m bench.whep_viewers [--viewers 1,4,8] [--seconds 10] [--warmup 3] [--runs 1] [--pin]
       [--noise] [--smoke]
"""

import argparse
import asyncio
import os
import re
import statistics
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import Any

import av
import httpx
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from bench.common import LOOPBACK, Server, emit, on_each, pin_client, server_pid, spread, summary
from bench.framecode import BLOCK, FLAT, FrameIndexTrack, decode, luma_plane
from media_pipeline.ice import enforce_ice_addresses
from tests.harness import ScopeServer
from tests.whip_peers import CLOSE_TIMEOUT, Publisher, post_sdp

USER = "alice"
# A tiny run that only checks the script: viewers, window and warm-up seconds.
SMOKE = ("1,2", 2.0, 1.0)
JOIN_TIMEOUT = 15.0
# The code's 34 blocks fill the first four rows of blocks and two of the fifth: below that is free.
NOISE_FROM_ROW = 5 * BLOCK
NOISE_AMPLITUDE = 32
ENCODED = re.compile(r"^scope_viewer_frames_encoded_total\{[^}]*\} (\S+)$", re.M)


class NoisyIndexTrack(FrameIndexTrack):
    """The indexed camera with fresh noise below the code's blocks, so its stream weighs what a camera's does.

    The code alone encodes to a few hundred bytes a frame, about one RTP packet,
    which would understate what a viewer's packets cost the server; noise of
    ±32 around mid gray brings the server's encoder to its bitrate (1.5 Mbit/s,
    about 6 kB and five packets a frame) and leaves the code readable.
    """

    def __init__(self) -> None:
        super().__init__()
        self._random = np.random.default_rng(0)

    async def recv(self) -> av.VideoFrame:
        frame = await super().recv()
        luma = luma_plane(frame)  # a view: written in place
        luma[NOISE_FROM_ROW:] = self._random.integers(FLAT - NOISE_AMPLITUDE, FLAT + NOISE_AMPLITUDE,
                                                      luma[NOISE_FROM_ROW:].shape, dtype=np.uint8)
        return frame


class IndexPublisher(Publisher):
    """A WHIP publisher whose camera is an indexed one (its capture times give the latency)."""

    def __init__(self, server: ScopeServer, camera: FrameIndexTrack) -> None:
        super().__init__(server, USER)
        # Publisher adds a solid-colour camera; swap the indexed one in before the offer is made.
        self.track.stop()
        self.track = camera
        self.pc.getTransceivers()[0].sender.replaceTrack(self.track)


class IndexViewer:
    """A WHEP viewer (a recvonly aiortc peer) that reads each frame's index back.

    Not tests.whip_peers.Viewer: that one converts every frame to RGB for its
    mean colour, work that would take the client's core from eight viewers.
    ``arrivals`` holds when each frame came, ``latencies`` (arrival, seconds
    since capture) of each whose index could be read.
    """

    def __init__(self, server: ScopeServer, camera: FrameIndexTrack) -> None:
        self.server = server
        self.camera = camera
        # Never None: aiortc would fall back to a public STUN server.
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.pc.addTransceiver("video", direction="recvonly")
        self.pc.on("track", self._on_track)
        self.arrivals: list[float] = []
        self.latencies: list[tuple[float, float]] = []
        self._receiver: asyncio.Task[None] | None = None

    def _on_track(self, track: MediaStreamTrack) -> None:
        if track.kind == "video" and self._receiver is None:
            self._receiver = asyncio.create_task(self._receive(track))

    async def _receive(self, track: MediaStreamTrack) -> None:
        try:
            while True:
                frame = await track.recv()
                arrived = time.monotonic()
                self.arrivals.append(arrived)
                index = decode(luma_plane(frame))
                captured = None if index is None else self.camera.capture_time(index)
                if captured is not None:
                    self.latencies.append((arrived, arrived - captured))
        except MediaStreamError:
            pass

    async def watch(self, session_id: str) -> httpx.Response:
        """POST the offer (every candidate gathered: no trickle); apply a 201's answer."""
        await self.pc.setLocalDescription(await self.pc.createOffer())
        response = await post_sdp(self.server, f"/api/v1/whep/{session_id}", self.pc.localDescription.sdp, USER)
        if response.status_code == 201:
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=response.text, type="answer"))
        return response

    async def close(self) -> None:
        if self._receiver is not None:
            self._receiver.cancel()
        with suppress(asyncio.TimeoutError):  # a peer stuck closing must not cost the run its figures
            await asyncio.wait_for(self.pc.close(), CLOSE_TIMEOUT)

    def frame_count(self, start: float, end: float) -> int:
        return sum(1 for arrived in self.arrivals if start <= arrived < end)

    def latencies_ms(self, start: float, end: float) -> list[float]:
        return [latency * 1000 for arrived, latency in self.latencies if start <= arrived < end]

    async def transport_received(self) -> tuple[int, int]:
        """Packets and bytes its transport has received so far: RTP, retransmissions and RTCP.

        Not aiortc's inbound-rtp figures: they give every SSRC (retransmissions' too) the same id,
        so the report keeps whichever came last.
        """
        report = await self.pc.getStats()
        transport = next(stats for stats in report.values() if stats.type == "transport")
        return transport.packetsReceived, transport.bytesReceived


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (fields 14 and 15 of /proc/<pid>/stat)."""
    # The command name (field 2) may hold spaces; the fields after its closing parenthesis do not.
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def encoded_frames(server: ScopeServer) -> float:
    """Frames encoded for viewers so far, every codec (the embedded worker shares the web's /metrics)."""
    text = server.http.get("/metrics").text
    return sum(float(value) for value in ENCODED.findall(text))


async def publish(server: ScopeServer, pipeline: str, camera: FrameIndexTrack) -> IndexPublisher:
    publisher = IndexPublisher(server, camera)
    response = await publisher.exchange(f"/api/v1/whip?pipeline={pipeline}")
    if response.status_code != 201:
        await publisher.close()
        raise RuntimeError(f"WHIP publish answered {response.status_code}: {response.text}")
    await server.wait_until_async(lambda: server.session(publisher.session_id)["state"] == "live", JOIN_TIMEOUT,
                                  what="the WHIP session live")
    return publisher


async def watch(server: ScopeServer, publisher: IndexPublisher) -> IndexViewer:
    """A new viewer of the publisher's session, returned once its first frame arrived."""
    viewer = IndexViewer(server, publisher.track)
    response = await viewer.watch(publisher.session_id)
    if response.status_code != 201:
        await viewer.close()
        raise RuntimeError(f"WHEP watch answered {response.status_code}: {response.text}")
    await server.wait_until_async(lambda: viewer.arrivals, JOIN_TIMEOUT, what="the new viewer's first frame")
    return viewer


async def window(server: ScopeServer, viewers: list[IndexViewer], seconds: float) -> dict[str, Any]:
    """What one steady window cost the server and what the viewers (the last above all) received."""
    pid = server_pid(server)
    last = viewers[-1]
    encoded_before = await asyncio.to_thread(encoded_frames, server)
    packets_before, bytes_before = await last.transport_received()
    start, server_before, client_before = time.monotonic(), cpu_seconds(pid), time.process_time()
    await asyncio.sleep(seconds)
    end, server_after, client_after = time.monotonic(), cpu_seconds(pid), time.process_time()
    encoded = await asyncio.to_thread(encoded_frames, server) - encoded_before
    packets_after, bytes_after = await last.transport_received()
    elapsed = end - start
    received = [viewer.frame_count(start, end) for viewer in viewers]
    last_received = last.frame_count(start, end)
    return {
        "server_cpu": round((server_after - server_before) / elapsed, 3),
        "client_cpu": round((client_after - client_before) / elapsed, 3),
        "last_viewer_fps": round(last_received / elapsed, 1),
        "last_viewer_latency_ms": summary(last.latencies_ms(start, end)),
        "last_viewer_readable": round(len(last.latencies_ms(start, end)) / last_received, 3) if last_received else 0.0,
        "last_viewer_packets_per_s": round((packets_after - packets_before) / elapsed, 1),
        "last_viewer_kbit_per_s": round((bytes_after - bytes_before) * 8 / 1000 / elapsed),
        "frames_received_per_viewer": received,
        "frames_encoded": int(encoded),
        "encoded_per_viewer_frame": round(encoded / statistics.median(received), 2) if any(received) else None,
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def slopes(steps: dict[int, dict[str, Any]]) -> dict[str, float]:
    """Server CPU per added viewer, from the first count to each later one (cores per viewer)."""
    first, *later = sorted(steps)
    return {
        f"{first}->{count}": round((steps[count]["server_cpu"] - steps[first]["server_cpu"]) / (count - first), 4)
        for count in later
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default="invert")
    parser.add_argument("--viewers", default="1,4,8", help="comma-separated viewer counts, ascending")
    parser.add_argument("--seconds", type=float, default=10.0, help="each count's measuring window")
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds after the last join, before the window")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--pin", action="store_true", help="the server on core 0, the client on core 1")
    parser.add_argument("--noise", action="store_true",
                        help="noise below the code: a stream at the encoder's bitrate, as a camera's")
    parser.add_argument("--smoke", action="store_true", help="1 and 2 viewers, 2 s windows, 1 s warm-up")
    args = parser.parse_args()
    if args.smoke:
        args.viewers, args.seconds, args.warmup = SMOKE
    counts = sorted(int(count) for count in args.viewers.split(","))
    pinning = pin_client() if args.pin else None

    async def measure(server: Server) -> dict[int, dict[str, Any]]:
        assert isinstance(server, ScopeServer)
        enforce_ice_addresses([LOOPBACK])
        publisher = await publish(server, args.pipeline, NoisyIndexTrack() if args.noise else FrameIndexTrack())
        viewers: list[IndexViewer] = []
        steps: dict[int, dict[str, Any]] = {}
        try:
            for count in counts:
                while len(viewers) < count:
                    viewers.append(await watch(server, publisher))
                await asyncio.sleep(args.warmup)
                steps[count] = await window(server, viewers, args.seconds)
            await publisher.hang_up()
        finally:
            await asyncio.gather(publisher.close(), *(viewer.close() for viewer in viewers))
        return steps

    runs = []
    for _ in range(args.runs):
        started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        load = round(os.getloadavg()[0], 2)
        steps = on_each(["embedded"], measure, pin=args.pin, SCOPE_MAX_VIEWERS=max(counts))["embedded"]
        runs.append({"started": started, "load_average_1m_before": load, "steps": steps,
                     "cpu_per_added_viewer": slopes(steps)})
    emit({
        "bench": "whep_viewers",
        "target": "embedded",
        "size": "512x512",
        "camera_fps": 30,
        "camera": "code + noise" if args.noise else "code only",
        "pipeline": args.pipeline,
        "viewers": counts,
        "window_seconds": args.seconds,
        "warmup_seconds": args.warmup,
        "pinned": pinning,
        "runs": runs,
        "spread": _spread(runs, counts),
    })


def _spread(runs: list[dict[str, Any]], counts: list[int]) -> dict[str, Any]:
    """The headline figures over the runs: per viewer count, then the slopes."""
    def per_count(pick: Callable[[dict[str, Any]], float | None]) -> dict[int, dict[str, Any]]:
        return {count: spread([pick(run["steps"][count]) for run in runs]) for count in counts}

    def latency(statistic: str) -> Callable[[dict[str, Any]], float | None]:
        return lambda step: (step["last_viewer_latency_ms"] or {}).get(statistic)

    return {
        "server_cpu": per_count(lambda step: step["server_cpu"]),
        "client_cpu": per_count(lambda step: step["client_cpu"]),
        "last_viewer_fps": per_count(lambda step: step["last_viewer_fps"]),
        "last_viewer_packets_per_s": per_count(lambda step: step["last_viewer_packets_per_s"]),
        "last_viewer_kbit_per_s": per_count(lambda step: step["last_viewer_kbit_per_s"]),
        "last_viewer_latency_p50_ms": per_count(latency("median")),
        "last_viewer_latency_p99_ms": per_count(latency("p99")),
        "encoded_per_viewer_frame": per_count(lambda step: step["encoded_per_viewer_frame"]),
        "cpu_per_added_viewer": {
            span: spread([run["cpu_per_added_viewer"][span] for run in runs])
            for span in runs[0]["cpu_per_added_viewer"]
        },
    }


if __name__ == "__main__":
    main()
