"""Built-in pipelines, parameter validation, the plugin registry and FrameProcessor."""

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch
from av import VideoFrame

from media_pipeline import pipelines
from media_pipeline.pipelines import (
    FrameProcessor,
    ParameterError,
    ParameterSpec,
    Pipeline,
    available_pipelines,
    frame_to_array,
    pick_device,
    ignored_parameters,
    validate_parameters,
)

BUILTIN_NAMES = ("passthrough", "invert", "grayscale", "edges", "blur")
CPU = torch.device("cpu")


def run(name: str, image: np.ndarray, **parameters: Any) -> np.ndarray:
    """Apply a registered RGB pipeline to one HxWx3 image through its forward()."""
    pipeline = available_pipelines()[name](**parameters)
    assert pipeline.frame_format == "rgb24"
    frames = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
    with torch.inference_mode():
        out = pipeline(frames)
    assert out.dtype == torch.uint8 and out.shape == frames.shape
    return out[0].permute(1, 2, 0).numpy()


def decoded(image: np.ndarray) -> VideoFrame:
    """``image`` as the decoder would hand it over: a yuv420p frame."""
    return VideoFrame.from_ndarray(image, format="rgb24").reformat(format="yuv420p")


def as_input(name: str, image: np.ndarray) -> np.ndarray:
    """``image`` in the format the named pipeline works in (its yuv420p packing when it works in YUV)."""
    return frame_to_array(decoded(image), available_pipelines()[name].frame_format)


def scene(height: int = 48, width: int = 64) -> np.ndarray:
    """A camera-like picture: smooth color gradients and a bright square (chroma subsampling barely touches it)."""
    rows, columns = np.mgrid[0:height, 0:width]
    image = np.stack([255 * columns / width, 255 * rows / height, 128 + 100 * np.sin(columns / 7)], axis=2)
    image[height // 4:height // 2, width // 4:width // 2] = (250, 240, 20)
    return image.round().astype(np.uint8)


def random_image(height: int = 17, width: int = 23, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def checkerboard(size: int = 16) -> np.ndarray:
    cells = (np.indices((size, size)).sum(axis=0) % 2 * 255).astype(np.uint8)
    return np.repeat(cells[:, :, None], 3, axis=2)


def vertical_step(height: int = 12, width: int = 12) -> np.ndarray:
    image = np.zeros((height, width, 3), np.uint8)
    image[:, width // 2 :] = 255
    return image


# --- built-ins -------------------------------------------------------------


def test_builtins_are_registered() -> None:
    registry = available_pipelines()
    assert set(BUILTIN_NAMES) <= registry.keys()
    for name in BUILTIN_NAMES:
        assert registry[name].name == name
        assert issubclass(registry[name], Pipeline)


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_each_builtin_keeps_dtype_and_shape_of_a_batch(name: str) -> None:
    frames = torch.from_numpy(np.stack([as_input(name, random_image(16, 22, seed)) for seed in (1, 2)]))
    if available_pipelines()[name].frame_format == "rgb24":
        frames = frames.permute(0, 3, 1, 2)
    with torch.inference_mode():
        out = available_pipelines()[name]()(frames)
    assert out.dtype == torch.uint8
    assert out.shape == frames.shape


def test_passthrough_returns_its_input() -> None:
    frames = torch.from_numpy(random_image()).permute(2, 0, 1).unsqueeze(0)
    assert available_pipelines()["passthrough"]()(frames) is frames


def planes(frame: VideoFrame) -> list[np.ndarray]:
    return [np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :plane.width]
            for plane in frame.planes]


def yuv_run(name: str, frame: VideoFrame) -> VideoFrame:
    return FrameProcessor(name, {}, CPU).process_frames([frame])[0]


def test_invert_works_in_limited_range_yuv() -> None:
    # Every value, in Y and in chroma, with the limited range's ends and beyond.
    planes = np.tile(np.arange(256, dtype=np.uint8), 6 * 16).reshape(96, 256)
    with torch.inference_mode():
        out = available_pipelines()["invert"]()(torch.from_numpy(planes)[None])[0].numpy().astype(int)
    y, chroma = planes[:64].astype(int), planes[64:].astype(int)
    np.testing.assert_array_equal(out[:64], np.clip(251 - y, 16, 235))
    np.testing.assert_array_equal(out[64:], np.clip(256 - chroma, 0, 255))


@pytest.mark.parametrize("size", [(48, 64), (17, 33)], ids=["even", "odd"])
def test_invert_in_yuv_is_the_rgb_negative(size: tuple[int, int]) -> None:
    source = decoded(scene(*size))
    out = yuv_run("invert", source)
    assert (out.format.name, out.width, out.height) == ("yuv420p", source.width, source.height)
    # Compared in RGB, as the viewer sees it: what is left is the RGB conversion's rounding.
    difference = np.abs(out.to_ndarray(format="rgb24").astype(int) - (255 - source.to_ndarray(format="rgb24")))
    assert difference.mean() <= 3 and difference.max() <= 8


@pytest.mark.parametrize("size", [(48, 64), (17, 33)], ids=["even", "odd"])
def test_grayscale_keeps_luma_and_drops_chroma(size: tuple[int, int]) -> None:
    source = decoded(scene(*size))
    out = yuv_run("grayscale", source)
    (y, u, v), (source_y, _, _) = planes(out), planes(source)
    np.testing.assert_array_equal(y, source_y)
    assert set(u.flat) == set(v.flat) == {128}
    rgb = out.to_ndarray(format="rgb24").astype(int)
    assert np.abs(rgb[:, :, 0] - rgb[:, :, 1]).max() <= 1 and np.abs(rgb[:, :, 0] - rgb[:, :, 2]).max() <= 1
    luma = source.to_ndarray(format="rgb24").astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(rgb[:, :, 0] - luma).mean() <= 2


@pytest.mark.parametrize("size", [(48, 64), (17, 33), (18, 33), (17, 34)])
def test_yuv_packing_is_pyavs_and_round_trips_any_size(size: tuple[int, int]) -> None:
    source = decoded(random_image(*size))
    packed = frame_to_array(source, "yuv420p")
    if size[0] % 2 == 0 and size[1] % 2 == 0:
        np.testing.assert_array_equal(packed, source.to_ndarray(format="yuv420p"))
    back = pipelines.array_to_frame(packed, "yuv420p", source.width, source.height)
    np.testing.assert_array_equal(back.to_ndarray(format="rgb24"), source.to_ndarray(format="rgb24"))


@pytest.mark.parametrize("name", ["invert", "grayscale", "edges"])
def test_a_batch_gives_what_single_frames_give(name: str) -> None:
    frames = [decoded(scene()), decoded(random_image(48, 64, seed=3)), decoded(255 - scene())]
    processor = FrameProcessor(name, {}, CPU)
    batched = processor.process_frames(frames)
    assert len(batched) == 3
    for frame, out in zip(frames, batched):
        np.testing.assert_array_equal(out.to_ndarray(format="rgb24"),
                                      processor.process_frames([frame])[0].to_ndarray(format="rgb24"))
    arrays = [frame_to_array(frame, processor.frame_format) for frame in frames]
    for array, out in zip(arrays, processor.process_batch(arrays)):
        np.testing.assert_array_equal(out, processor.process(array))


def test_edges_of_a_flat_image_are_black() -> None:
    image = np.full((10, 14, 3), 137, np.uint8)
    assert run("edges", image).max() <= 1


def test_edges_respond_at_a_vertical_step_only() -> None:
    out = run("edges", vertical_step(12, 12))
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])
    gray = out[:, :, 0]
    assert gray[:, 5:7].min() >= 200  # the two columns either side of the step
    assert gray[:, :4].max() == 0
    assert gray[:, 8:].max() == 0


def test_edge_strength_scales_the_response() -> None:
    image = np.zeros((8, 8, 3), np.uint8)
    image[:, 4:] = 100
    weak = run("edges", image, strength=1.0)[:, 4, 0].astype(int)
    strong = run("edges", image, strength=2.0)[:, 4, 0].astype(int)
    assert weak.min() > 0
    assert np.abs(strong - 2 * weak).max() <= 1


def test_blur_radius_zero_is_unchanged() -> None:
    image = random_image()
    np.testing.assert_array_equal(run("blur", image, radius=0), image)


@pytest.mark.parametrize("radius", [1, 2, 15])
def test_blur_smooths_a_checkerboard(radius: int) -> None:
    image = checkerboard(16)
    out = run("blur", image, radius=radius).astype(float)
    assert out.std() < image.std() / 2
    assert abs(out.mean() - image.mean()) < 8


def test_blur_keeps_a_flat_image_flat_to_the_border() -> None:
    image = np.full((5, 7, 3), 90, np.uint8)
    np.testing.assert_array_equal(run("blur", image, radius=15), image)


def test_blur_update_changes_radius_live() -> None:
    blur = available_pipelines()["blur"](radius=0)
    frames = torch.from_numpy(checkerboard(8)).permute(2, 0, 1).unsqueeze(0)
    with torch.inference_mode():
        assert torch.equal(blur(frames), frames)
        blur.update(radius=3)
        assert not torch.equal(blur(frames), frames)


# --- parameter specs and validation ----------------------------------------


def test_parameter_specs_serialize_to_json() -> None:
    for cls in available_pipelines().values():
        json.dumps([spec.to_json() for spec in cls.parameter_specs])
    (radius,) = available_pipelines()["blur"].parameter_specs
    assert radius.to_json() == {
        "name": "radius",
        "kind": "int",
        "default": 2,
        "minimum": 0,
        "maximum": 15,
        "choices": [],
        "label": radius.label,
    }


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, ("passthrough", {})),
        ({}, ("passthrough", {})),
        ({"pipeline": "invert"}, ("invert", {})),
        ({"pipeline": "blur", "radius": 3}, ("blur", {"radius": 3})),
        ({"pipeline": "blur"}, ("blur", {"radius": 2})),
        ({"pipeline": "edges", "strength": 10}, ("edges", {"strength": 10.0})),
        ({"pipeline": "edges", "strength": 0.1}, ("edges", {"strength": 0.1})),
    ],
)
def test_validate_parameters_accepts_good_input(raw: Any, expected: tuple[str, dict[str, Any]]) -> None:
    assert validate_parameters(raw, default_pipeline="passthrough") == expected


def test_validate_parameters_uses_the_default_pipeline() -> None:
    assert validate_parameters({"radius": 5}, default_pipeline="blur") == ("blur", {"radius": 5})


def test_validate_parameters_makes_float_parameters_floats() -> None:
    _, values = validate_parameters({"pipeline": "edges", "strength": 2}, default_pipeline="passthrough")
    assert type(values["strength"]) is float


def test_unknown_keys_are_left_out_and_named_as_ignored() -> None:
    raw = {"pipeline": "blur", "radius": 4, "prompts": [{"text": "a cat", "weight": 1}], "input_mode": "video"}
    assert validate_parameters(raw, default_pipeline="passthrough") == ("blur", {"radius": 4})
    assert ignored_parameters(raw, pipeline="blur") == ["input_mode", "prompts"]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"pipeline_ids": ["edges"]}, "edges"),
        ({"pipeline_ids": ["longlive", "blur"]}, "blur"),  # the first this server has
        ({"pipeline_ids": ["longlive"]}, "passthrough"),  # none it has: the default
        ({"pipeline_ids": "blur"}, "passthrough"),
        ({"pipeline": "invert", "pipeline_ids": ["blur"]}, "invert"),  # an explicit pipeline wins
    ],
)
def test_scope_pipeline_ids_pick_the_pipeline(raw: dict[str, Any], expected: str) -> None:
    assert validate_parameters(raw, default_pipeline="passthrough")[0] == expected


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        ([], "parameters"),
        ("blur", "parameters"),
        ({"pipeline": "sharpen"}, "pipeline"),
        ({"pipeline": None}, "pipeline"),
        ({"pipeline": ["blur"]}, "pipeline"),
        ({"pipeline": "blur", "radius": "3"}, "radius"),
        ({"pipeline": "blur", "radius": 3.0}, "radius"),
        ({"pipeline": "blur", "radius": None}, "radius"),
        ({"pipeline": "blur", "radius": True}, "radius"),
        ({"pipeline": "blur", "radius": 16}, "radius"),
        ({"pipeline": "blur", "radius": -1}, "radius"),
        ({"pipeline": "edges", "strength": False}, "strength"),
        ({"pipeline": "edges", "strength": 0.05}, "strength"),
        ({"pipeline": "edges", "strength": 11}, "strength"),
        ({"pipeline": "edges", "strength": 10**400}, "strength"),
        ({"pipeline": "edges", "strength": float("nan")}, "strength"),
        ({"pipeline": "edges", "strength": float("inf")}, "strength"),
        ({"pipeline": "edges", "strength": "1"}, "strength"),
    ],
)
def test_validate_parameters_rejects_bad_input(raw: Any, named: str) -> None:
    with pytest.raises(ParameterError) as caught:
        validate_parameters(raw, default_pipeline="passthrough")
    assert named in str(caught.value)


def test_validate_parameters_rejects_an_unknown_default_pipeline() -> None:
    with pytest.raises(ParameterError, match="'pipeline' must be one of"):
        validate_parameters({}, default_pipeline="sharpen")


# --- entry point plugins ---------------------------------------------------


class TintPipeline(Pipeline):
    """A plugin with bool and choice parameters: zeroes one channel when enabled."""

    name = "tint"
    label = "Tint"
    parameter_specs = (
        ParameterSpec("channel", "choice", "red", choices=("red", "green", "blue")),
        ParameterSpec("enabled", "bool", True),
    )

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        if not self.values["enabled"]:
            return frames
        out = frames.clone()
        out[:, ("red", "green", "blue").index(self.values["channel"])] = 0
        return out


class ShadowingPipeline(Pipeline):
    """A plugin that tries to take a built-in's name."""

    name = "passthrough"
    label = "Impostor"

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        return frames


@dataclass
class FakeEntryPoint:
    name: str
    load: Callable[[], Any]


def failing_load() -> Any:
    raise ImportError("plugin dependency missing")


@pytest.fixture
def plugins(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Install fake entry points and rebuild the registry around the test."""

    def install(*points: FakeEntryPoint) -> None:
        monkeypatch.setattr(pipelines, "entry_points", lambda group: points if group == "scope.pipelines" else ())
        pipelines._registry.cache_clear()

    yield install
    pipelines._registry.cache_clear()


def test_entry_point_pipelines_are_registered_and_broken_ones_skipped(plugins: Any, caplog: Any) -> None:
    plugins(
        FakeEntryPoint("broken", failing_load),
        FakeEntryPoint("not_a_pipeline", lambda: len),
        FakeEntryPoint("shadow", lambda: ShadowingPipeline),
        FakeEntryPoint("tint", lambda: TintPipeline),
    )
    with caplog.at_level(logging.ERROR, logger="media_pipeline.pipelines"):
        registry = available_pipelines()
    assert registry["tint"] is TintPipeline
    assert registry["passthrough"] is not ShadowingPipeline
    assert set(registry) == {*BUILTIN_NAMES, "tint"}
    logged = caplog.text
    assert "broken" in logged and "not_a_pipeline" in logged and "shadow" in logged


def test_entry_points_are_loaded_once(plugins: Any) -> None:
    loads = []

    def load() -> type[Pipeline]:
        loads.append(1)
        return TintPipeline

    plugins(FakeEntryPoint("tint", load))
    available_pipelines()
    available_pipelines()
    assert loads == [1]


def test_validate_parameters_checks_bool_and_choice(plugins: Any) -> None:
    plugins(FakeEntryPoint("tint", lambda: TintPipeline))
    assert validate_parameters({"pipeline": "tint", "channel": "blue"}, default_pipeline="passthrough") == (
        "tint",
        {"channel": "blue", "enabled": True},
    )
    for key, value in [("channel", "purple"), ("channel", 1), ("enabled", 1), ("enabled", "true")]:
        with pytest.raises(ParameterError) as caught:
            validate_parameters({"pipeline": "tint", key: value}, default_pipeline="passthrough")
            assert key in str(caught.value)


# --- FrameProcessor --------------------------------------------------------


def test_pick_device_matches_cuda_availability() -> None:
    assert pick_device().type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_process_returns_a_contiguous_frame_and_leaves_the_input_alone(name: str) -> None:
    image = as_input(name, random_image(31, 45))
    original = image.copy()
    processor = FrameProcessor(name, validate_parameters({"pipeline": name}, default_pipeline=name)[1], CPU)
    assert processor.frame_format == available_pipelines()[name].frame_format
    out = processor.process(image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(image, original)
    if processor.frame_format == "rgb24":
        np.testing.assert_array_equal(out, run(name, image))


def test_process_passthrough_does_not_copy() -> None:
    image = random_image()
    assert FrameProcessor("passthrough", {}, CPU).process(image) is image


def test_process_accepts_padded_rows() -> None:
    # Decoders pad each row; the processor must read through the strides.
    padded = random_image(9, 16)[:, :13]
    assert not padded.flags.c_contiguous
    for name in ("passthrough", "blur"):
        out = FrameProcessor(name, {}, CPU).process(padded)
        assert out.flags.c_contiguous
        np.testing.assert_array_equal(out, padded if name == "passthrough" else run(name, padded.copy()))
    padded_yuv = as_input("invert", random_image(8, 20))[:, :16]
    out = FrameProcessor("invert", {}, CPU).process(padded_yuv)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, FrameProcessor("invert", {}, CPU).process(padded_yuv.copy()))


def test_process_rejects_a_malformed_frame() -> None:
    for name, frame in [
        ("edges", np.zeros((4, 4), np.uint8)),
        ("edges", np.zeros((4, 4, 3), np.float32)),
        ("invert", np.zeros((4, 4, 3), np.uint8)),  # RGB to a YUV pipeline
        ("invert", np.zeros((4, 4), np.uint8)),  # not H*3/2 rows
        ("invert", np.zeros((6, 5), np.uint8)),  # odd width: frame_to_array pads those
    ]:
        with pytest.raises(ValueError):
            FrameProcessor(name, {}, CPU).process(frame)


def test_set_parameters_switches_and_updates_pipelines() -> None:
    image = checkerboard(8)
    processor = FrameProcessor("passthrough", {}, CPU)
    np.testing.assert_array_equal(processor.process(image), image)
    processor.set_parameters("invert", {})
    assert processor.frame_format == "yuv420p"
    inverted = processor.process_frames([decoded(image)])[0].to_ndarray(format="rgb24")
    assert np.abs(inverted.astype(int) - (255 - image)).max() <= 8
    processor.set_parameters("blur", {"radius": 0})
    assert processor.frame_format == "rgb24"
    np.testing.assert_array_equal(processor.process(image), image)
    processor.set_parameters("blur", {"radius": 2})
    np.testing.assert_array_equal(processor.process(image), run("blur", image, radius=2))
    processor.set_parameters("passthrough", {})
    assert processor.process(image) is image


def test_unknown_pipeline_is_refused() -> None:
    with pytest.raises(ValueError):
        FrameProcessor("sharpen", {}, CPU)


def test_close_is_idempotent_and_final() -> None:
    processor = FrameProcessor("invert", {}, CPU)
    processor.close()
    processor.close()
    with pytest.raises(RuntimeError):
        processor.process(random_image())
    with pytest.raises(RuntimeError):
        processor.set_parameters("blur", {"radius": 1})
