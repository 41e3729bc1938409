"""Tests for tsjax.score on hand-computed arrays."""

import jax
import numpy as np
import pytest

from tsjax.score import defect_probability, gaussian_smooth, residual_energy, upsample_to_image

# One pair of three pixels in a row, two channels: [B=1, h=1, w=3, C=2].
INSPECTED = np.array([[[[0.0, 0.0], [2.0, 0.0], [4.0, 6.0]]]], np.float32)
PREDICTED = np.array([[[[1.0, 0.0], [2.0, 1.0], [4.0, 6.0]]]], np.float32)
ALL_VALID = np.ones((1, 1, 3), bool)

# Jitted as the pipeline calls it, with sigma static. One compilation per
# sigma is much faster than running the Python loop of small ops eagerly.
smooth = jax.jit(gaussian_smooth, static_argnums=1)


def test_residual_energy_hand_example():
    # Channel means over the three pixels: mu = (0+2+4)/3, (0+0+6)/3 = (2, 2).
    # residual = sum_c (F - F_hat)^2: (1 + 0, 0 + 1, 0 + 0) = (1, 1, 0).
    # total = sum_c (F - mu)^2: (4 + 4, 0 + 4, 4 + 16) = (8, 4, 20).
    residual, total = residual_energy(INSPECTED, PREDICTED, ALL_VALID)

    np.testing.assert_allclose(residual, [[[1.0, 1.0, 0.0]]], rtol=0, atol=1e-6)
    np.testing.assert_allclose(total, [[[8.0, 4.0, 20.0]]], rtol=0, atol=1e-6)


def test_residual_energy_valid_means():
    # Only the first two pixels define the means: mu = (1, 0).
    # total = ((0-1)^2 + 0, (2-1)^2 + 0, (4-1)^2 + 6^2) = (1, 1, 45).
    valid = np.array([[[True, True, False]]])

    _, total = residual_energy(INSPECTED, PREDICTED, valid)

    np.testing.assert_allclose(total, [[[1.0, 1.0, 45.0]]], rtol=0, atol=1e-6)


def test_defect_probability_pixel_hand_example():
    # D = residual / total = (1/8, 1/4, 0/20).
    defect = defect_probability(INSPECTED, PREDICTED, ALL_VALID, "pixel")

    np.testing.assert_allclose(defect, [[[0.125, 0.25, 0.0]]], rtol=0, atol=1e-6)


def test_defect_probability_global_hand_example():
    # The mean total over the valid pixels is (8 + 4 + 20) / 3 = 32/3, so
    # D = residual / (32/3) = (3/32, 3/32, 0).
    defect = defect_probability(INSPECTED, PREDICTED, ALL_VALID, "global")

    np.testing.assert_allclose(defect, [[[3 / 32, 3 / 32, 0.0]]], rtol=0, atol=1e-6)


def test_defect_probability_global_uses_valid():
    # With only pixel 0 valid, mu is pixel 0's features (0, 0), so the mean
    # total over the valid pixels is 0. The denominator is then clamped to
    # float32's smallest normal value, and every pixel with a residual clips to 1.
    valid = np.array([[[True, False, False]]])

    defect = defect_probability(INSPECTED, PREDICTED, valid, "global")

    np.testing.assert_allclose(defect, [[[1.0, 1.0, 0.0]]], rtol=0, atol=0)


def test_defect_probability_global_per_pair():
    # The mean total is taken per pair: doubling pair 1's features and
    # predictions scales its residual and total by 4, leaving D unchanged.
    inspected = np.concatenate([INSPECTED, 2 * INSPECTED])
    predicted = np.concatenate([PREDICTED, 2 * PREDICTED])
    valid = np.ones((2, 1, 3), bool)

    defect = defect_probability(inspected, predicted, valid, "global")

    np.testing.assert_allclose(defect[1], defect[0], rtol=1e-6, atol=0)


@pytest.mark.parametrize("normalization", ["pixel", "global"])
def test_identical_features_score_zero(normalization):
    features = np.random.default_rng(0).normal(size=(2, 6, 7, 5)).astype(np.float32)
    valid = np.ones((2, 6, 7), bool)

    defect = defect_probability(features, features, valid, normalization)

    assert float(np.max(defect)) == 0.0


@pytest.mark.parametrize("normalization", ["pixel", "global"])
def test_defect_probability_clips_to_unit(normalization):
    rng = np.random.default_rng(1)
    inspected = rng.normal(size=(1, 6, 7, 5)).astype(np.float32)
    predicted = inspected + rng.normal(scale=3.0, size=inspected.shape).astype(np.float32)
    valid = np.ones((1, 6, 7), bool)

    defect = np.asarray(defect_probability(inspected, predicted, valid, normalization))

    # Errors of three times the feature spread give ratios well above 1.
    assert defect.min() >= 0.0
    assert defect.max() == 1.0
    assert defect.dtype == np.float32


def test_defect_probability_rejects_normalization():
    with pytest.raises(ValueError, match=r"normalization='local' is unknown; use one of \('pixel', 'global'\)"):
        defect_probability(INSPECTED, PREDICTED, ALL_VALID, "local")


@pytest.mark.parametrize("stride", [2, 4, 8])
def test_upsample_peak_at_stride(stride):
    feature_map = np.zeros((1, 5, 6), np.float32)
    feature_map[0, 2, 3] = 1.0

    image = np.asarray(upsample_to_image(feature_map, stride, (5 * stride, 6 * stride)))

    assert image.shape == (1, 5 * stride, 6 * stride)
    assert np.unravel_index(np.argmax(image[0]), image.shape[1:]) == (2 * stride, 3 * stride)
    assert image[0, 2 * stride, 3 * stride] == pytest.approx(1.0, abs=1e-6)
    # Bilinear interpolation: one pixel away the weight is 1 - 1/stride.
    assert image[0, 2 * stride + 1, 3 * stride] == pytest.approx(1 - 1 / stride, abs=1e-6)
    assert image[0, 2 * stride, 3 * stride - 1] == pytest.approx(1 - 1 / stride, abs=1e-6)


def test_upsample_clamps_past_last_feature():
    # Pixels beyond stride * (w - 1) read the last feature (edge clamping).
    feature_map = np.arange(3, dtype=np.float32).reshape(1, 1, 3)

    image = np.asarray(upsample_to_image(feature_map, 4, (4, 12)))

    np.testing.assert_allclose(image[0, 0, 8:], [2.0, 2.0, 2.0, 2.0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(image[0, 0, :5], [0.0, 0.25, 0.5, 0.75, 1.0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.7, 4.0])
def test_gaussian_smooth_keeps_constant(sigma):
    maps = np.full((1, 40, 40), 0.37, np.float32)

    smoothed = smooth(maps, sigma)

    np.testing.assert_allclose(smoothed, maps, rtol=1e-6, atol=0)


@pytest.mark.parametrize("sigma", [0.7, 4.0])
def test_gaussian_smooth_keeps_sum(sigma):
    maps = np.zeros((1, 40, 40), np.float32)
    maps[0, 20, 17] = 1.0

    smoothed = np.asarray(smooth(maps, sigma))

    # The kernel is normalised and covers 3 sigma, which stays inside the map
    # here, so the sum is kept up to float32 rounding.
    assert smoothed.sum() == pytest.approx(1.0, abs=1e-5)
    assert np.unravel_index(np.argmax(smoothed[0]), (40, 40)) == (20, 17)
    assert smoothed.max() < 1.0


def test_gaussian_smooth_zero_sigma_is_identity():
    maps = np.random.default_rng(2).random((1, 8, 9)).astype(np.float32)

    smoothed = gaussian_smooth(maps, 0.0)

    np.testing.assert_array_equal(np.asarray(smoothed), maps)
