"""Torch video pipelines, their registry, and the per-session frame processor.

A pipeline is a ``torch.nn.Module`` mapping uint8 frames in its
``frame_format`` (RGB ``(N, 3, H, W)`` unless it says otherwise) to frames of
the same dtype and shape. Built-ins live here; more come from the
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
from av import VideoFrame


logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP: Final = "scope.pipelines"

FrameFormat = Literal["rgb24", "yuv420p"]


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
    # The pixel format forward() works in. "rgb24": uint8 (N, 3, H, W). "yuv420p": the codec's own
    # format, uint8 (N, H*3/2, W), each frame packed as PyAV packs one (H rows of Y, then U's and V's
    # values row after row; see frame_to_array). A pipeline that can work there spares the frame thread
    # the conversion to RGB and the encoder the conversion back.
    frame_format: ClassVar[FrameFormat] = "rgb24"

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
        """Transform uint8 frames in ``frame_format`` into frames of the same dtype and shape."""
        raise NotImplementedError


def _to_uint8(frames: torch.Tensor) -> torch.Tensor:
    return frames.round_().clamp_(0, 255).to(torch.uint8)


def _luma(frames: torch.Tensor) -> torch.Tensor:
    """BT.601 luma of uint8 RGB frames, as float ``(N, 1, H, W)`` in 0..255."""
    x = frames.float()
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _yuv_planes(frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of the Y rows and of the chroma rows (U, then V) of packed yuv420p frames ``(N, H*3/2, W)``."""
    height = frames.shape[1] * 2 // 3
    return frames[:, :height], frames[:, height:]


class PassthroughPipeline(Pipeline):
    """Returns frames unchanged."""

    name = "passthrough"
    label = "Passthrough"
    batchable = True

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return frames


class InvertPipeline(Pipeline):
    """Photographic negative, in the codec's limited-range BT.601 YUV.

    255 - R, G, B turns Y = 16 + 219 * luma into 251 - Y, and each chroma
    value 128 + c into 128 - c, that is 256 - U and 256 - V. Y outside
    16..235 is clamped first, as the conversion to RGB would; U or V of 0
    gives 255.
    """

    name = "invert"
    label = "Invert colors"
    batchable = True
    frame_format = "yuv420p"

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        luma, chroma = _yuv_planes(frames)
        # Stays in uint8: 251 - Y cannot wrap once Y >= 16, and -U wraps to 256 - U for U >= 1.
        return torch.cat((251 - luma.clamp(16, 235), chroma.clamp(min=1).neg()), dim=1)


class GrayscalePipeline(Pipeline):
    """BT.601 luma on all three channels: the frame's own Y, with neutral chroma."""

    name = "grayscale"
    label = "Grayscale"
    batchable = True
    frame_format = "yuv420p"

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        luma, chroma = _yuv_planes(frames)
        return torch.cat((luma, torch.full_like(chroma, 128)), dim=1)


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


def _plane_views(frame: VideoFrame) -> list[np.ndarray]:
    """A yuv420p frame's Y, U and V planes as arrays over its own memory (writable), without the rows' padding."""
    return [np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :plane.width]
            for plane in frame.planes]


def frame_to_array(frame: VideoFrame, frame_format: FrameFormat) -> np.ndarray:
    """One frame's pixels as a pipeline working in ``frame_format`` takes them (without the batch axis).

    yuv420p: ``(H*3/2, W)``, as PyAV's ``to_ndarray`` packs it, for any size: an odd
    width or height (PyAV refuses those) has Y's last column or row repeated, so Y
    is twice the chroma planes' size as it is for even sizes.
    """
    if frame_format == "rgb24":
        # One scaling thread: by default swscale starts a pool of them for every frame it converts.
        return frame.to_ndarray(format="rgb24", threads=1)
    if frame.format.name != "yuv420p":  # decoded video already is
        frame = frame.reformat(format="yuv420p", threads=1)
    y, u, v = _plane_views(frame)
    rows, width = y.shape
    packed = np.empty((3 * u.shape[0], 2 * u.shape[1]), np.uint8)
    luma, chroma = packed[:2 * u.shape[0]], packed[2 * u.shape[0]:].reshape(-1)
    luma[:rows, :width] = y
    luma[rows:] = luma[rows - 1]
    luma[:, width:] = luma[:, width - 1:width]
    chroma[:u.size].reshape(u.shape)[:] = u
    chroma[u.size:].reshape(v.shape)[:] = v
    return packed


def array_to_frame(array: np.ndarray, frame_format: FrameFormat, width: int, height: int) -> VideoFrame:
    """A pipeline's output frame (from ``frame_to_array``'s layout) as a ``width`` x ``height`` VideoFrame."""
    if frame_format == "rgb24":
        return VideoFrame.from_ndarray(array, format="rgb24")
    frame = VideoFrame(width, height, "yuv420p")
    y, u, v = _plane_views(frame)
    luma, chroma = array[:2 * u.shape[0]], array[2 * u.shape[0]:].reshape(-1)
    y[:] = luma[:height, :width]
    u[:] = chroma[:u.size].reshape(u.shape)
    v[:] = chroma[u.size:].reshape(v.shape)
    return frame


def _check_frame(array: np.ndarray, frame_format: FrameFormat) -> None:
    if frame_format == "rgb24":
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise ValueError(f"expected an H x W x 3 uint8 array, got {array.dtype} {array.shape}")
    elif array.dtype != np.uint8 or array.ndim != 2 or array.shape[0] % 3 or array.shape[1] % 2:
        raise ValueError(f"expected an H*3/2 x W uint8 yuv420p array (H, W even), got {array.dtype} {array.shape}")


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

    def _upload(self, arrays: np.ndarray) -> torch.Tensor:
        """``N`` stacked uint8 frames as a tensor on the device."""
        host = torch.from_numpy(arrays)
        if self._device.type == "cuda":
            if self._staging is None or self._staging.shape != host.shape:
                self._staging = torch.empty(host.shape, dtype=torch.uint8, pin_memory=True)
            self._staging.copy_(host)
            # Safe to overwrite next frame: _forward() ends with a blocking copy back on the same stream.
            host = self._staging.to(self._device, non_blocking=True)
        return host

    def _forward(self, pipeline: Pipeline, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """One forward pass over same-sized frames in ``pipeline``'s format; C-contiguous frames back. Under the lock."""
        for array in arrays:
            _check_frame(array, pipeline.frame_format)
        # One frame needs no stacking copy, only a leading axis.
        stacked = arrays[0][np.newaxis] if len(arrays) == 1 else np.stack(arrays)
        rgb = pipeline.frame_format == "rgb24"
        with torch.inference_mode():
            frames = self._upload(stacked)
            out = pipeline(frames.permute(0, 3, 1, 2) if rgb else frames)
            # Made dense on the device, so the copy back is one contiguous transfer.
            return list((out.permute(0, 2, 3, 1) if rgb else out).contiguous().cpu().numpy())

    @property
    def name(self) -> str:
        """The name of the session's current pipeline."""
        return self._name

    @property
    def frame_format(self) -> FrameFormat:
        """The pixel format that process() and process_batch() take and give: the current pipeline's."""
        return self._open_pipeline().frame_format

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

    def process(self, array: np.ndarray) -> np.ndarray:
        """Run the pipeline on one frame in ``frame_format`` (``frame_to_array``'s layout); returns a C-contiguous frame."""
        with self._lock:
            pipeline = self._open_pipeline()
            _check_frame(array, pipeline.frame_format)
            if isinstance(pipeline, PassthroughPipeline):
                # Copies only when the decoder padded its rows.
                return np.ascontiguousarray(array)
            return self._forward(pipeline, [array])[0]

    def process_batch(self, arrays: list[np.ndarray]) -> list[np.ndarray]:
        """Run the pipeline once over same-sized frames in ``frame_format``; C-contiguous frames back."""
        with self._lock:
            return self._forward(self._open_pipeline(), arrays)

    def process_frames(self, frames: list[VideoFrame]) -> list[VideoFrame]:
        """Run the pipeline once over same-sized decoded frames; frames back in the pipeline's format, without timestamps.

        Passthrough gives back the frames it was given. The conversions to the pipeline's format and back happen under the lock, so
        a switch to a pipeline that works in another format cannot come between.
        """
        with self._lock:
            pipeline = self._open_pipeline()
            if isinstance(pipeline, PassthroughPipeline):
                return list(frames)
            frame_format = pipeline.frame_format
            outs = self._forward(pipeline, [frame_to_array(frame, frame_format) for frame in frames])
            return [array_to_frame(out, frame_format, frame.width, frame.height) for out, frame in zip(outs, frames)]

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
