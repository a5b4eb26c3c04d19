"""GPU check: the pipelines on CUDA at 512×512, and GPU memory back to baseline after sessions close.

Self-contained (no server, no network): it drives the project's own objects
the way the media worker does.

- ``throughput``: frames per second of ``FrameProcessor.process`` per pipeline,
  back to back on one 512×512 frame (upload, op, copy back: what a session's
  frame costs on the pipeline thread).
- ``sessions``: per pipeline, ``--sessions`` sessions at once, each a
  ``FrameProcessor`` inside a ``PipelineTrack`` fed by a 30 fps camera, all on
  one pipeline thread as in the worker; after ``--frames`` frames each, the
  worker's teardown order: ``track.stop()``, then ``processor.close()`` on the
  pipeline thread. GPU memory (``torch.cuda.memory_allocated`` / ``memory_reserved``)
  is read before the sessions open, while they run, and after they closed;
  ``returned_to_baseline`` means both are back to their values before.

- ``batching``: frames per second of ``FrameProcessor.process_batch`` on
  ``bench_unet`` (bench/unet_pipeline.py, a small U-Net), one frame per call
  against ``--max-batch`` frames per call: what batching sessions buys on this
  device.

Without CUDA it prints ``{"skipped": "no CUDA", "why": ...}`` and exits 0; ``--device cpu``
runs the same code on the CPU (no memory figures) to check the script itself.
Exits 1 when memory did not return to baseline.

Usage: .venv/bin/python -m bench.gpu_check [--sessions 4] [--frames 60] [--device cuda:0]
"""

import argparse
import asyncio
import json
import sys
from pathlib import Path
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import av
import numpy as np
import torch
from aiortc import VideoStreamTrack

# bench_unet is registered by the benches' own entry point, found on the path (bench/plugins).
sys.path.insert(0, str(Path(__file__).resolve().parent / "plugins"))

from media_pipeline.batching import FrameBatcher  # noqa: E402
from media_pipeline.pipelines import FrameProcessor, available_pipelines, frame_to_array  # noqa: E402
from media_pipeline.tracks import PipelineTrack  # noqa: E402

SIZE = 512
BUILTINS = ("passthrough", "invert", "grayscale", "edges", "blur")
WARMUP_FRAMES = 10
THROUGHPUT_FRAMES = 200
MIB = 1 << 20
BATCH_WINDOW_SECONDS = 0.002  # the worker's default
MODEL = "bench_unet"


class Camera(VideoStreamTrack):
    """30 fps of one noisy 512×512 frame."""

    def __init__(self, pixels: np.ndarray) -> None:
        super().__init__()
        self._pixels = pixels

    async def recv(self) -> av.VideoFrame:
        pts, time_base = await self.next_timestamp()
        frame = av.VideoFrame.from_ndarray(self._pixels, format="rgb24")
        frame.pts, frame.time_base = pts, time_base
        return frame


def memory(device: torch.device) -> dict[str, float] | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return {
        "allocated_mib": round(torch.cuda.memory_allocated(device) / MIB, 3),
        "reserved_mib": round(torch.cuda.memory_reserved(device) / MIB, 3),
    }


def throughput(name: str, device: torch.device, rgb: np.ndarray) -> dict[str, float]:
    processor = FrameProcessor(name, {}, device)
    # In the pixel format the pipeline works in (yuv420p for invert and grayscale).
    pixels = frame_to_array(av.VideoFrame.from_ndarray(rgb, format="rgb24"), processor.frame_format)
    try:
        for _ in range(WARMUP_FRAMES):
            processor.process(pixels)
        start = time.perf_counter()
        for _ in range(THROUGHPUT_FRAMES):
            processor.process(pixels)  # ends with a blocking copy back: the device work is done
        elapsed = time.perf_counter() - start
    finally:
        processor.close()
    return {"fps": round(THROUGHPUT_FRAMES / elapsed, 1), "ms_per_frame": round(elapsed / THROUGHPUT_FRAMES * 1000, 3)}


def batch_throughput(name: str, device: torch.device, rgb: np.ndarray, max_batch: int) -> dict[str, Any]:
    """Frames per second through ``name`` one frame per forward, and ``max_batch`` frames per forward."""
    processor = FrameProcessor(name, {}, device)
    pixels = frame_to_array(av.VideoFrame.from_ndarray(rgb, format="rgb24"), processor.frame_format)
    by_batch: dict[str, Any] = {}
    try:
        for batch in (1, max_batch):
            frames = [pixels] * batch
            calls = max(1, THROUGHPUT_FRAMES // 10 // batch)  # a model is slower than the built-ins
            for _ in range(2):
                processor.process_batch(frames)
            start = time.perf_counter()
            for _ in range(calls):
                processor.process_batch(frames)  # ends with a blocking copy back
            elapsed = time.perf_counter() - start
            by_batch[str(batch)] = {"fps": round(calls * batch / elapsed, 1),
                                    "ms_per_forward": round(elapsed / calls * 1000, 2)}
    finally:
        processor.close()
    by_batch["gain"] = round(by_batch[str(max_batch)]["fps"] / by_batch["1"]["fps"], 2)
    return by_batch


async def sessions(name: str, device: torch.device, pixels: np.ndarray, count: int, frames: int,
                   max_batch: int) -> dict[str, Any]:
    """``count`` sessions of ``name`` at once, closed the worker's way; memory before, during, after."""
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"pipeline-{device}")
    baseline = memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    processors = [await loop.run_in_executor(executor, FrameProcessor, name, {}, device) for _ in range(count)]
    failures: list[BaseException] = []
    batcher = FrameBatcher(executor, window_seconds=BATCH_WINDOW_SECONDS, max_batch=max_batch)
    tracks = [PipelineTrack(Camera(pixels), processor, batcher, on_error=failures.append) for processor in processors]

    async def pull(track: PipelineTrack) -> float:
        start = time.perf_counter()
        for _ in range(frames):
            await track.recv()
        return frames / (time.perf_counter() - start)

    fps = await asyncio.gather(*(pull(track) for track in tracks))
    running = memory(device)
    for track in tracks:
        track.stop()
    for processor in processors:
        await loop.run_in_executor(executor, processor.close)
    await batcher.stop()
    executor.shutdown(wait=True)
    after = memory(device)
    result: dict[str, Any] = {
        "sessions": count,
        "frames_per_session": frames,
        "fps_per_session": [round(value, 1) for value in fps],
        "pipeline_errors": [repr(exc) for exc in failures],
        "memory": {"before": baseline, "running": running, "after_close": after},
    }
    if device.type == "cuda":
        result["memory"]["peak_allocated_mib"] = round(torch.cuda.max_memory_allocated(device) / MIB, 3)
        result["returned_to_baseline"] = (
            after["allocated_mib"] <= baseline["allocated_mib"] and after["reserved_mib"] <= baseline["reserved_mib"]
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=4)
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--max-batch", type=int, default=8, help="the worker's SCOPE_MAX_BATCH (1: no batching)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        reason = "no CUDA: torch.cuda.is_available() is false (a CPU build of torch, or no GPU/driver); --device cpu checks the script"
        print(json.dumps({"bench": "gpu_check", "skipped": "no CUDA", "why": reason}))
        return 0
    pixels = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    names = [name for name in BUILTINS if name in available_pipelines()]
    cold = memory(device)
    result: dict[str, Any] = {
        "bench": "gpu_check",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "size": f"{SIZE}x{SIZE}",
        "max_batch": args.max_batch,
        "memory_cold": cold,
        "throughput": {name: throughput(name, device, pixels) for name in names},
        "sessions": {name: asyncio.run(sessions(name, device, pixels, args.sessions, args.frames, args.max_batch)) for name in names},
        "batching": {MODEL: batch_throughput(MODEL, device, pixels, args.max_batch)},
    }
    returned = [session.get("returned_to_baseline", True) for session in result["sessions"].values()]
    result["memory_final"] = memory(device)
    result["all_returned_to_baseline"] = all(returned) if device.type == "cuda" else None
    print(json.dumps(result, indent=2))
    return 0 if all(returned) else 1


if __name__ == "__main__":
    sys.exit(main())
