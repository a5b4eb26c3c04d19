"""``bench_unet``: a small U-Net with fixed random weights, a stand-in for a real model's cost.

Three strided 3×3 encoder convolutions (512 → 64 pixels a side), two at the
bottom, and a decoder that upsamples and concatenates each encoder level back
in, ending on a 3×3 convolution to RGB at full size: about 1.7 GFLOP per
512×512 frame (``flops()``). The weights are drawn from a fixed seed, so every
session's module is the same and nothing is downloaded. The output is the frame
plus at most ±``RESIDUAL`` levels of the network's answer, so the benches' frame
index (textured or flat blocks) stays readable. ``forward`` treats each frame
of a batch on its own: it can batch. Servers started by the benches register it
through ``bench/plugins``.
"""

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from media_pipeline.pipelines import Pipeline

SEED = 0
CHANNELS = (12, 24, 48)
RESIDUAL = 16.0


def _conv(inputs: int, outputs: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1)


class UNetPipeline(Pipeline):
    name: ClassVar[str] = "bench_unet"
    label: ClassVar[str] = "Small U-Net (bench)"
    batchable = True

    def __init__(self, **parameters) -> None:
        super().__init__(**parameters)
        c1, c2, c3 = CHANNELS
        self.down = nn.ModuleList([_conv(3, c1, 2), _conv(c1, c2, 2), _conv(c2, c3, 2)])
        self.bottom = nn.ModuleList([_conv(c3, c3), _conv(c3, c3)])
        self.up = nn.ModuleList([_conv(c3 + c2, c2), _conv(c2 + c1, c1)])
        self.out = _conv(c1, 3)
        generator = torch.Generator().manual_seed(SEED)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_uniform_(module.weight, nonlinearity="relu", generator=generator)
                nn.init.zeros_(module.bias)
        # Channels-last is the frames' own layout and the faster one for these convolutions on CPU.
        self.to(memory_format=torch.channels_last)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        x = (frames.float() / 255).contiguous(memory_format=torch.channels_last)
        skips = []
        for conv in self.down:
            x = F.relu(conv(x))
            skips.append(x)
        for conv in self.bottom:
            x = F.relu(conv(x))
        for conv, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="nearest")
            x = F.relu(conv(torch.cat([x, skip], dim=1)))
        x = F.interpolate(x, size=frames.shape[-2:], mode="nearest")
        residual = torch.tanh(self.out(x)) * RESIDUAL
        return (frames.float() + residual).round_().clamp_(0, 255).to(torch.uint8)


def flops(height: int = 512, width: int = 512) -> int:
    """Multiply-adds × 2 of one frame's convolutions (what the docstring's figure comes from)."""
    total, size = 0, (height, width)
    shapes = []
    c1, c2, c3 = CHANNELS
    for inputs, outputs in ((3, c1), (c1, c2), (c2, c3)):
        size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
        shapes.append((inputs, outputs, size))
    shapes += [(c3, c3, size), (c3, c3, size)]
    shapes += [(c3 + c2, c2, shapes[1][2]), (c2 + c1, c1, shapes[0][2]), (c1, 3, (height, width))]
    for inputs, outputs, (h, w) in shapes:
        total += 2 * inputs * outputs * 9 * h * w
    return total
