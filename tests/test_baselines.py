"""Tests for tsjax.baselines on planted ground truth: identical pairs, pasted squares, known gains."""

import numpy as np
import pytest

from tsjax import baselines, pipeline
from tsjax.config import DetectionConfig
from tsjax.methods import PairContext
from tsjax.teacher import LAYER_STRIDES


def _pattern(shape=(96, 96), seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(0.2, 0.8, shape).astype(np.float32)


def test_match_intensity_undoes_gain_and_offset():
    target = _pattern()
    image = 0.6 * target + 0.15
    valid = np.ones(target.shape, bool)
    matched = baselines.match_intensity(image, target, valid)
    # The fit runs in float64 and the result is float32, whose rounding is about
    # 6e-8 near 1, so 1e-5 leaves a wide margin.
    np.testing.assert_allclose(matched, target, atol=1e-5)


def test_match_intensity_uses_valid_pixels_only():
    target = _pattern()
    image = 2.0 * target - 0.3
    valid = np.zeros(target.shape, bool)
    valid[10:50, 10:50] = True
    image[~valid] = 5.0  # Outliers outside valid must not change the fit.
    matched = baselines.match_intensity(image, target, valid)
    np.testing.assert_allclose(matched[valid], target[valid], atol=1e-5)


def test_match_intensity_constant_image_matches_mean():
    target = _pattern()
    image = np.full(target.shape, 0.9, np.float32)
    matched = baselines.match_intensity(image, target, np.ones(target.shape, bool))
    np.testing.assert_allclose(matched, np.full(target.shape, target.mean()), atol=1e-5)


def test_match_intensity_rejects_bad_input():
    target = _pattern()
    with pytest.raises(ValueError, match="one shape"):
        baselines.match_intensity(target[:10], target, np.ones(target.shape, bool))
    with pytest.raises(ValueError, match="no pixel"):
        baselines.match_intensity(target, target, np.zeros(target.shape, bool))


def test_absolute_difference_zero_for_gain_change():
    reference = _pattern()
    inspected = 0.8 * reference + 0.1
    valid = np.ones(reference.shape, bool)
    defect_map = baselines.absolute_difference_map(reference, inspected, valid, sigma=2.0)
    # A pure brightness and contrast change leaves nothing after matching.
    assert np.abs(defect_map).max() < 1e-5


def test_absolute_difference_peaks_on_pasted_square():
    reference = _pattern()
    inspected = reference.copy()
    inspected[40:46, 60:66] += 0.5
    valid = np.ones(reference.shape, bool)
    valid[:, :8] = False
    defect_map = baselines.absolute_difference_map(reference, inspected, valid, sigma=2.0)
    row, col = np.unravel_index(np.argmax(defect_map), defect_map.shape)
    assert 40 <= row < 46
    assert 60 <= col < 66
    assert np.all(defect_map[~valid] == 0)


def _features(shape, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(1, *shape, 8)).astype(np.float32)


def test_feature_distance_identical_features_zero():
    features = {"layer1": _features((24, 24), 0)}
    valid = np.ones((96, 96), bool)
    defect_map = baselines.feature_distance_map(features, features, valid, ("layer1",), (1.0,), sigma=4.0)
    assert np.abs(defect_map).max() == 0.0


def test_feature_distance_mean_is_one_unsmoothed():
    ref = {"layer1": _features((24, 24), 0), "layer2": _features((12, 12), 1)}
    insp = {"layer1": _features((24, 24), 2), "layer2": _features((12, 12), 3)}
    valid = np.zeros((96, 96), bool)
    valid[8:88, 8:88] = True
    defect_map = baselines.feature_distance_map(ref, insp, valid, ("layer1", "layer2"), (0.5, 0.5), sigma=0.0)
    # Each layer is divided by its own mean over valid, and the weights sum to 1.
    assert defect_map[valid].mean() == pytest.approx(1.0, rel=1e-5)


def test_feature_distance_peaks_at_changed_feature():
    ref = {"layer2": _features((12, 12), 0)}
    insp = {"layer2": ref["layer2"].copy()}
    insp["layer2"][0, 6, 4] += 3.0
    insp["layer2"] = insp["layer2"] + 0.01 * _features((12, 12), 1)
    valid = np.ones((96, 96), bool)
    defect_map = baselines.feature_distance_map(ref, insp, valid, ("layer2",), (1.0,), sigma=2.0)
    row, col = np.unravel_index(np.argmax(defect_map), defect_map.shape)
    stride = LAYER_STRIDES["layer2"]
    # Feature (6, 4) is centred on input pixel (48, 32); bilinear upsampling
    # and the smoothing keep the peak within one stride of it.
    assert abs(row - 6 * stride) <= stride
    assert abs(col - 4 * stride) <= stride


def test_feature_distance_rejects_weight_count():
    features = {"layer1": _features((24, 24), 0)}
    with pytest.raises(ValueError, match="one per layer"):
        baselines.feature_distance_map(features, features, np.ones((96, 96), bool), ("layer1",), (0.5, 0.5), 0.0)


def test_absolute_difference_method_uses_pipeline_valid(manhattan):
    reference = manhattan((128, 128), seed=3).astype(np.float32)
    inspected = manhattan((128, 128), seed=3, shift=(3.0, -4.0)).astype(np.float32)
    inspected[60:66, 70:76] = 1.0
    config = DetectionConfig()
    context = PairContext(reference, inspected, variables=None)
    defect_map, valid = baselines.absolute_difference_method(config).compute(reference, inspected, context)

    _, expected_valid = pipeline.align_and_mask(reference, inspected, config.margin)
    np.testing.assert_array_equal(valid, expected_valid)
    row, col = np.unravel_index(np.argmax(defect_map), defect_map.shape)
    # Gaussian smoothing (sigma 4 px) may move the peak to the square's rim.
    assert 58 <= row < 68
    assert 68 <= col < 78
