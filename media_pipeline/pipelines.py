"""Torch video pipelines, their registry, and the per-session frame processor.

A pipeline is a ``torch.nn.Module`` mapping uint8 RGB frames ``(N, 3, H, W)``
to frames of the same dtype and shape. Built-ins live here; more come from the
``scope.pipelines`` entry point group.
"""

import functools
import logging
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, ClassVar, Final, Literal

import numpy as np
import torch
import torch.nn.functional as F


logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP: Final = "scope.pipelines"


@dataclass(frozen=True)
class ParameterSpec:
    """One tunable parameter of a pipeline, as a client may set it."""

    name: str
    kind: Literal["int", "float", "bool", "choice"]
    default: Any
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    label: str = ""

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON-ready data, for clients that build controls from it."""
        return {
            "name": self.name,
            "kind": self.kind,
            "default": self.default,
            "minimum": self.minimum,
            "maximum": self.maximum,
            "choices": list(self.choices),
            "label": self.label,
        }


class Pipeline(torch.nn.Module):
    """Base of all pipelines; ``values`` holds the current parameter values."""

    name: ClassVar[str]
    label: ClassVar[str]
    parameter_specs: ClassVar[tuple[ParameterSpec, ...]] = ()
    # True when forward() treats the N frames of a batch independently, so sessions
    # with the same parameters may share one call (media_pipeline/batching.py).
    # Off by default: a plugin's forward may assume one frame.
    batchable: ClassVar[bool] = False

    def __init__(self, **parameters: Any) -> None:
        super().__init__()
        # Not ``self.parameters``: that name is nn.Module's tensor iterator.
        self.values: dict[str, Any] = {spec.name: spec.default for spec in self.parameter_specs}
        self.update(**parameters)

    def update(self, **parameters: Any) -> None:
        """Change parameters live; values are expected to be validated already."""
        unknown = parameters.keys() - self.values.keys()
        if unknown:
            raise TypeError(f"pipeline {self.name!r} has no parameters {sorted(unknown)}")
        self.values.update(parameters)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """Transform uint8 ``(N, 3, H, W)`` RGB frames into frames of the same dtype and shape."""
        raise NotImplementedError


def _to_uint8(frames: torch.Tensor) -> torch.Tensor:
    return frames.round_().clamp_(0, 255).to(torch.uint8)


def _luma(frames: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of uint8 RGB frames, as float ``(N, 1, H, W)`` in 0..255."""
    x = frames.float()
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


class PassthroughPipeline(Pipeline):
    """Returns frames unchanged."""

    name = "passthrough"
    label = "Passthrough"
    batchable = True

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return frames


class InvertPipeline(Pipeline):
    """Photographic negative."""

    name = "invert"
    label = "Invert colors"
    batchable = True

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return 255 - frames


class GrayscalePipeline(Pipeline):
    """BT.601 luma on all three channels."""

    name = "grayscale"
    label = "Grayscale"
    batchable = True

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        # expand() is a view; whoever needs dense memory materializes it once.
        return _to_uint8(_luma(frames)).expand(-1, 3, -1, -1)


class EdgesPipeline(Pipeline):
    """Sobel gradient magnitude of the luma, in gray."""

    name = "edges"
    label = "Edge detection"
    batchable = True
    parameter_specs = (
        ParameterSpec("strength", "float", 1.0, minimum=0.1, maximum=10.0, label="Edge strength"),
    )

    def __init__(self, **parameters: Any) -> None:
        super().__init__(**parameters)
        gx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        # Divided by 4 so that a full black-to-white step reads 255 at strength 1.
        self.register_buffer("sobel", torch.stack([gx, gx.T]).unsqueeze(1) / 4, persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        # Replicated borders keep the frame edge itself from reading as an edge.
        luma = F.pad(_luma(frames), (1, 1, 1, 1), mode="replicate")
        gradient = F.conv2d(luma, self.sobel)
        magnitude = torch.hypot(gradient[:, 0:1], gradient[:, 1:2]) * self.values["strength"]
        return _to_uint8(magnitude).expand(-1, 3, -1, -1)


def _gaussian_row(radius: int) -> torch.Tensor:
    """Normalized Gaussian taps over ``-radius..radius``, shaped ``(3, 1, 1, 2r+1)`` for conv2d."""
    offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
    # sigma = radius/2 puts the kernel's ends at two sigma; radius 0 yields the single tap [1].
    sigma = max(radius, 1) / 2
    taps = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return (taps / taps.sum()).view(1, 1, 1, -1).repeat(3, 1, 1, 1)


class BlurPipeline(Pipeline):
    """Separable Gaussian blur."""

    name = "blur"
    label = "Blur"
    batchable = True
    parameter_specs = (
        ParameterSpec("radius", "int", 2, minimum=0, maximum=15, label="Blur radius (pixels)"),
    )

    def update(self, **parameters: Any) -> None:
        super().update(**parameters)
        # Rebuild on the device the module already lives on (CPU during __init__).
        current = getattr(self, "kernel", None)
        device = current.device if current is not None else torch.device("cpu")
        self.register_buffer("kernel", _gaussian_row(self.values["radius"]).to(device), persistent=False)

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        radius = self.values["radius"]
        if radius == 0:
            return frames
        # Replicate, not reflect: reflect fails on frames smaller than the kernel.
        x = F.pad(frames.float(), (radius, radius, radius, radius), mode="replicate")
        # pad() returns NCHW; channels-last is the frames' own layout and ~3x faster for these convs on CPU.
        x = x.contiguous(memory_format=torch.channels_last)
        x = F.conv2d(x, self.kernel, groups=3)
        x = F.conv2d(x, self.kernel.transpose(2, 3), groups=3)
        return _to_uint8(x)


_BUILTINS: Final[tuple[type[Pipeline], ...]] = (
    PassthroughPipeline,
    InvertPipeline,
    GrayscalePipeline,
    EdgesPipeline,
    BlurPipeline,
)


@functools.cache
def _registry() -> dict[str, type[Pipeline]]:
    registry = {cls.name: cls for cls in _BUILTINS}
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        # A broken plugin must not take the worker down with it.
        try:
            loaded = entry_point.load()
        except Exception:
            logger.exception("Skipping pipeline entry point %r: it failed to load", entry_point.name)
            continue
        if not (
            isinstance(loaded, type)
            and issubclass(loaded, Pipeline)
            and isinstance(getattr(loaded, "name", None), str)
        ):
            logger.error("Skipping pipeline entry point %r: not a named Pipeline subclass", entry_point.name)
            continue
        if loaded.name in registry:
            logger.error("Skipping pipeline entry point %r: name %r is taken", entry_point.name, loaded.name)
            continue
        registry[loaded.name] = loaded
    return registry


_registry_lock = threading.Lock()


def available_pipelines() -> dict[str, type[Pipeline]]:
    """Registered pipelines by name: built-ins, then entry points (loaded once)."""
    # The lock keeps two threads' first calls from loading every plugin twice.
    with _registry_lock:
        return dict(_registry())


class ParameterError(ValueError):
    """A client's pipeline choice or parameters that no pipeline here accepts; the message says why."""


def _invalid(message: str) -> ParameterError:
    return ParameterError(message)


def _checked(spec: ParameterSpec, value: Any) -> Any:
    """``value`` as the spec's kind, or ParameterError naming the parameter."""
    key = repr(spec.name)
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise _invalid(f"{key} must be true or false, not {type(value).__name__}")
        return value
    if spec.kind == "choice":
        if not isinstance(value, str) or value not in spec.choices:
            raise _invalid(f"{key} must be one of: {', '.join(spec.choices)}")
        return value
    # bool is an int subclass, but true/false for a number is a client bug.
    numeric, wanted = ((int,), "an integer") if spec.kind == "int" else ((int, float), "a number")
    if isinstance(value, bool) or not isinstance(value, numeric):
        raise _invalid(f"{key} must be {wanted}, not {type(value).__name__}")
    if spec.kind == "float":
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float
            value = math.inf
        if not math.isfinite(value):
            raise _invalid(f"{key} must be a finite number")
    if spec.minimum is not None and value < spec.minimum:
        raise _invalid(f"{key} must be at least {spec.minimum}, got {value}")
    if spec.maximum is not None and value > spec.maximum:
        raise _invalid(f"{key} must be at most {spec.maximum}, got {value}")
    return value


def validate_parameters(raw: Any, *, default_pipeline: str) -> tuple[str, dict[str, Any]]:
    """Check a client's parameters; return the pipeline name and its full parameter dict.

    Keys the pipeline does not know are left out, not refused (``ignored_parameters``
    names them): real clients, Scope's among them, send more than a pipeline uses.
    """
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise _invalid("parameters must be an object")
    pipelines = available_pipelines()
    name = _chosen_pipeline(raw, pipelines, default_pipeline)
    specs = {spec.name: spec for spec in pipelines[name].parameter_specs}
    values = {spec_name: spec.default for spec_name, spec in specs.items()}
    for key, value in raw.items():
        if key in specs:
            values[key] = _checked(specs[key], value)
    return name, values


def _chosen_pipeline(raw: dict[str, Any], pipelines: dict[str, type[Pipeline]], default_pipeline: str) -> str:
    """``pipeline`` if given (it must exist); else the first of Scope's ``pipeline_ids`` this server has; else the default.

    An unknown ``pipeline_ids`` entry is not an error: a Scope client may list
    pipelines (preprocessors, its own models) that this server does not run.
    """
    if "pipeline" in raw:
        name = raw["pipeline"]
    else:
        pipeline_ids = raw.get("pipeline_ids")
        known = [pid for pid in pipeline_ids if isinstance(pid, str) and pid in pipelines] if isinstance(
            pipeline_ids, list) else []
        name = known[0] if known else default_pipeline
    # Membership is tested only on str so an unhashable value cannot raise TypeError.
    if not isinstance(name, str) or name not in pipelines:
        raise _invalid(f"'pipeline' must be one of: {', '.join(sorted(pipelines))}")
    return name


def parameters_from_text(raw: Mapping[str, str], *, default_pipeline: str) -> dict[str, Any]:
    """Parameters given as text (a WHIP URL's query), each one the chosen pipeline knows read as its kind.

    The result goes through ``validate_parameters`` like any client's; keys no
    pipeline uses stay text, to be ignored and recorded.
    """
    typed: dict[str, Any] = dict(raw)
    specs = available_pipelines()[_chosen_pipeline(typed, available_pipelines(), default_pipeline)].parameter_specs
    for spec in specs:
        if spec.name in raw:
            typed[spec.name] = _from_text(spec, raw[spec.name])
    return typed


def _from_text(spec: ParameterSpec, text: str) -> Any:
    if spec.kind == "choice":
        return text
    if spec.kind == "bool":
        words = {"true": True, "1": True, "on": True, "yes": True, "false": False, "0": False, "off": False,
                 "no": False}
        if text.lower() not in words:
            raise _invalid(f"{spec.name!r} must be true or false, not {text!r}")
        return words[text.lower()]
    try:
        return int(text) if spec.kind == "int" else float(text)
    except ValueError:
        raise _invalid(f"{spec.name!r} must be {'an integer' if spec.kind == 'int' else 'a number'}, "
                       f"not {text!r}") from None


def ignored_parameters(raw: Any, *, pipeline: str) -> list[str]:
    """The keys of a client's parameters that ``pipeline`` does not use (recorded, never refused)."""
    if not isinstance(raw, dict):
        return []
    used = {"pipeline", *(spec.name for spec in available_pipelines()[pipeline].parameter_specs)}
    return sorted(key for key in raw if key not in used)


def pick_device() -> torch.device:
    """The first GPU when there is one, else the CPU."""
    return torch.device("cuda:0") if torch.cuda.is_available() else torch.device("cpu")


def _check_frame(rgb: np.ndarray) -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 uint8 array, got {rgb.dtype} {rgb.shape}")


class FrameProcessor:
    """Runs one session's pipeline on one device. Called from a worker thread, never the event loop."""

    def __init__(self, pipeline: str, parameters: dict[str, Any], device: torch.device) -> None:
        self._device = device
        self._lock = threading.Lock()
        self._name = pipeline
        self._pipeline: Pipeline | None = self._build(pipeline, parameters)
        # Pinned host copy of the last frame's shape, reused so each frame is not a fresh pinned allocation.
        self._staging: torch.Tensor | None = None

    def _build(self, name: str, parameters: dict[str, Any]) -> Pipeline:
        cls = available_pipelines().get(name)
        if cls is None:
            raise ValueError(f"unknown pipeline {name!r}")
        return cls(**parameters).to(self._device).eval()

    def _open_pipeline(self) -> Pipeline:
        if self._pipeline is None:
            raise RuntimeError("frame processor is closed")
        return self._pipeline

    def _upload(self, rgbs: np.ndarray) -> torch.Tensor:
        """``N x H x W x 3`` uint8 frames as an ``(N, 3, H, W)`` tensor on the device."""
        host = torch.from_numpy(rgbs)
        if self._device.type == "cuda":
            if self._staging is None or self._staging.shape != host.shape:
                self._staging = torch.empty(host.shape, dtype=torch.uint8, pin_memory=True)
            self._staging.copy_(host)
            # Safe to overwrite next frame: process_batch() ends with a blocking copy back on the same stream.
            host = self._staging.to(self._device, non_blocking=True)
        return host.permute(0, 3, 1, 2)

    @property
    def name(self) -> str:
        """The name of the session's current pipeline."""
        return self._name

    @property
    def is_passthrough(self) -> bool:
        """True while the session's pipeline leaves frames as they are."""
        return isinstance(self._pipeline, PassthroughPipeline)

    def batch_key(self) -> tuple[Any, ...] | None:
        """What another session's processor must match to share a forward pass; None when it cannot batch.

        Read without the lock (on the event loop, where the frame thread may hold it):
        the pipeline and its values are each read once, and the frame thread checks
        the key again before it runs a batch.
        """
        pipeline = self._pipeline
        if pipeline is None or not pipeline.batchable or isinstance(pipeline, PassthroughPipeline):
            return None
        return (pipeline.name, tuple(sorted(dict(pipeline.values).items())))

    def process(self, rgb: np.ndarray) -> np.ndarray:
        """Run the pipeline on one ``H x W x 3`` uint8 RGB frame; returns a C-contiguous frame."""
        _check_frame(rgb)
        with self._lock:
            if isinstance(self._open_pipeline(), PassthroughPipeline):
                # Copies only when the decoder padded its rows.
                return np.ascontiguousarray(rgb)
        return self.process_batch([rgb])[0]

    def process_batch(self, rgbs: list[np.ndarray]) -> list[np.ndarray]:
        """Run this processor's pipeline once over same-sized ``H x W x 3`` uint8 frames; C-contiguous frames back."""
        for rgb in rgbs:
            _check_frame(rgb)
        # One frame needs no stacking copy, only a leading axis.
        stacked = rgbs[0][np.newaxis] if len(rgbs) == 1 else np.stack(rgbs)
        with self._lock:
            pipeline = self._open_pipeline()
            with torch.inference_mode():
                out = pipeline(self._upload(stacked))
                # Made dense on the device, so the copy back is one contiguous transfer.
                frames = out.permute(0, 2, 3, 1).contiguous().cpu().numpy()
        return list(frames)

    def set_parameters(self, pipeline: str, parameters: dict[str, Any]) -> None:
        """Switch to ``pipeline`` or, when it is the current one, update it in place.

        A new pipeline is built before the lock is taken: frames keep going
        through the old one until the new one is ready.
        """
        with self._lock:
            if pipeline == self._name:
                self._open_pipeline().update(**parameters)
                return
        built = self._build(pipeline, parameters)
        with self._lock:
            self._open_pipeline()
            self._pipeline, self._name = built, pipeline

    def close(self) -> None:
        """Drop the pipeline and buffers; later calls to process() raise RuntimeError."""
        with self._lock:
            if self._pipeline is None:
                return
            self._pipeline = None
            self._staging = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()
