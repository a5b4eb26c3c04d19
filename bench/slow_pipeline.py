"""``bench_slow``: a pipeline slower than the camera, for the latency flatness check.

It sleeps ``delay_ms`` per frame (the GIL released, like a GPU model's wait)
and returns the frames unchanged, so their index stays readable. Servers
started by the benches register it through the ``scope.pipelines`` entry point
in ``bench/plugins`` (on their PYTHONPATH); no other server sees it.
"""

import time
from typing import ClassVar

import torch

from media_pipeline.pipelines import ParameterSpec, Pipeline


class SlowPipeline(Pipeline):
    name: ClassVar[str] = "bench_slow"
    label: ClassVar[str] = "Slow passthrough (bench)"
    parameter_specs = (ParameterSpec("delay_ms", "int", 100, minimum=0, maximum=2000, label="Delay per frame (ms)"),)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        time.sleep(self.values["delay_ms"] / 1000)
        return frames
