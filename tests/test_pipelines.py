"""Built-in pipelines, parameter validation, the plugin registry and FrameProcessor."""

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import torch

from media_pipeline import pipelines
from media_pipeline.pipelines import (
    FrameProcessor,
    ParameterError,
    ParameterSpec,
    Pipeline,
    available_pipelines,
    pick_device,
    ignored_parameters,
    validate_parameters,
)

BUILTIN_NAMES = ("passthrough", "invert", "grayscale", "edges", "blur")
CPU = torch.device("cpu")


def run(name: str, image: np.ndarray, **parameters: Any) -> np.ndarray:
    """Apply a registered pipeline to one HxWx3 image through its forward()."""
    pipeline = available_pipelines()[name](**parameters)
    frames = torch.from_numpy(image).permute(2, 0, 1).unsqueeze(0)
    with torch.inference_mode():
        out = pipeline(frames)
    assert out.dtype == torch.uint8 and out.shape == frames.shape
    return out[0].permute(1, 2, 0).numpy()


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
    frames = torch.from_numpy(np.stack([random_image(seed=1), random_image(seed=2)])).permute(0, 3, 1, 2)
    with torch.inference_mode():
        out = available_pipelines()[name]()(frames)
    assert out.dtype == torch.uint8
    assert out.shape == frames.shape


def test_passthrough_returns_its_input() -> None:
    frames = torch.from_numpy(random_image()).permute(2, 0, 1).unsqueeze(0)
    assert available_pipelines()["passthrough"]()(frames) is frames


def test_invert_is_exact() -> None:
    image = random_image()
    np.testing.assert_array_equal(run("invert", image), 255 - image)


def test_grayscale_is_bt601_luma_on_every_channel() -> None:
    image = random_image()
    out = run("grayscale", image)
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 1])
    np.testing.assert_array_equal(out[:, :, 0], out[:, :, 2])
    expected = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(out[:, :, 0].astype(np.float64) - expected).max() <= 1.0


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
    image = random_image(31, 45)
    original = image.copy()
    processor = FrameProcessor(name, validate_parameters({"pipeline": name}, default_pipeline=name)[1], CPU)
    out = processor.process(image)
    assert out.dtype == np.uint8 and out.shape == image.shape
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(image, original)
    np.testing.assert_array_equal(out, run(name, image))


def test_process_passthrough_does_not_copy() -> None:
    image = random_image()
    assert FrameProcessor("passthrough", {}, CPU).process(image) is image


def test_process_accepts_padded_rows() -> None:
    # Decoders pad each row; the processor must read through the strides.
    padded = random_image(9, 16)[:, :13]
    assert not padded.flags.c_contiguous
    for name in ("passthrough", "invert"):
        out = FrameProcessor(name, {}, CPU).process(padded)
        assert out.flags.c_contiguous
        np.testing.assert_array_equal(out, padded if name == "passthrough" else 255 - padded)


def test_process_rejects_a_malformed_frame() -> None:
    processor = FrameProcessor("invert", {}, CPU)
    with pytest.raises(ValueError):
        processor.process(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError):
        processor.process(np.zeros((4, 4, 3), np.float32))


def test_set_parameters_switches_and_updates_pipelines() -> None:
    image = checkerboard(8)
    processor = FrameProcessor("passthrough", {}, CPU)
    np.testing.assert_array_equal(processor.process(image), image)
    processor.set_parameters("invert", {})
    np.testing.assert_array_equal(processor.process(image), 255 - image)
    processor.set_parameters("blur", {"radius": 0})
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
