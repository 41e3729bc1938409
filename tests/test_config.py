"""Tests for DetectionConfig: rejected values and derived settings."""

import dataclasses

import pytest

from tsjax.config import DetectionConfig


def test_config_defaults_are_valid():
    config = DetectionConfig()

    assert config.layers == ("layer1", "layer2")
    assert config.deepest_layer == "layer2"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"layers": ()}, r"layers is empty; select at least one of \('stem', 'layer1', 'layer2', 'layer3'\)"),
        ({"layers": ("layer1", "layer4")}, r"unknown layer\(s\) \['layer4'\]; use names from"),
        ({"layers": ("layer2", "layer2")}, r"layers \('layer2', 'layer2'\) repeat a layer; list each once"),
        (
            {"layer_weights": (1.0,)},
            r"layer_weights has 1 value\(s\) for 2 layer\(s\) \('layer1', 'layer2'\); give one weight per layer",
        ),
        ({"layer_weights": (1.0, -0.5)}, r"layer_weights \(1.0, -0.5\) must be >= 0 with a positive sum"),
        ({"layer_weights": (0.0, 0.0)}, r"layer_weights \(0.0, 0.0\) must be >= 0 with a positive sum"),
        ({"patch_size": 4}, "patch_size must be a positive odd integer; got 4"),
        ({"patch_size": 0}, "patch_size must be a positive odd integer; got 0"),
        ({"patch_size": 3.0}, "patch_size must be a positive odd integer; got 3.0"),
        ({"alpha": -1e-3}, "alpha must be >= 0; got -0.001"),
        ({"alpha": float("nan")}, "alpha must be >= 0; got nan"),
        ({"normalization": "local"}, "normalization='local' is unknown; use 'global' or 'pixel'"),
        ({"denoise_sigma": -1.0}, "denoise_sigma must be >= 0; got -1.0"),
        ({"map_sigma": -0.5}, "map_sigma must be >= 0; got -0.5"),
        ({"z_floor": -2.0}, "z_floor must be >= 0; got -2.0"),
        ({"min_score": 1.5}, r"min_score must lie in \[0, 1\]; got 1.5"),
        ({"min_score": -0.1}, r"min_score must lie in \[0, 1\]; got -0.1"),
        ({"opening_radius": -1}, "opening_radius must be >= 0; got -1"),
        ({"closing_radius": -2}, "closing_radius must be >= 0; got -2"),
        ({"min_area": -9}, "min_area must be >= 0; got -9"),
        ({"valid_margin": -4}, "valid_margin must be >= 0 or None; got -4"),
    ],
)
def test_config_rejects_invalid(changes, message):
    with pytest.raises(ValueError, match=message):
        DetectionConfig(**changes)


def test_config_replace_is_validated():
    with pytest.raises(ValueError, match="patch_size must be a positive odd integer; got 2"):
        dataclasses.replace(DetectionConfig(), patch_size=2)


@pytest.mark.parametrize(
    "changes, margin",
    [
        # stride of the deepest layer * (patch_size // 2 + 1)
        ({}, 8 * 2),
        ({"layers": ("layer1",)}, 4 * 2),
        ({"layers": ("stem", "layer3"), "patch_size": 5}, 16 * 3),
        ({"layers": ("layer2",), "patch_size": 1}, 8 * 1),
        ({"valid_margin": 5}, 5),
        ({"valid_margin": 0}, 0),
    ],
)
def test_config_margin(changes, margin):
    assert DetectionConfig(**changes).margin == margin


def test_config_deepest_layer_ignores_order():
    config = DetectionConfig(layers=("layer2", "stem"))

    assert config.deepest_layer == "layer2"


def test_config_weights_normalised():
    config = DetectionConfig(layers=("layer1", "layer2", "layer3"), layer_weights=(1.0, 3.0, 0.0))

    assert config.weights == pytest.approx((0.25, 0.75, 0.0), abs=1e-12)


def test_config_weights_default_to_mean():
    config = DetectionConfig(layers=("layer1", "layer2", "layer3"))

    assert config.weights == pytest.approx((1 / 3, 1 / 3, 1 / 3), abs=1e-12)


def test_config_is_frozen():
    config = DetectionConfig()

    with pytest.raises(dataclasses.FrozenInstanceError):
        config.alpha = 1.0
