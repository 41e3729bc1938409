"""Tests for tsjax.postprocess: thresholds, mask cleaning and blobs."""

import json

import numpy as np
import pytest

from tsjax.postprocess import choose_threshold, clean_mask, find_blobs


def _two_squares():
    """Return a mask with a 3x3 and a 4x2 square and a map with known scores.

    Square A: rows 2-4, columns 5-7, D = 0.5 except 0.6 at (3, 6).
    Square B: rows 10-13, columns 1-2, D = 0.7 except 0.8 at (12, 2).
    """
    mask = np.zeros((16, 12), bool)
    defect_map = np.full((16, 12), 0.05, np.float32)
    mask[2:5, 5:8] = True
    defect_map[2:5, 5:8] = 0.5
    defect_map[3, 6] = 0.6
    mask[10:14, 1:3] = True
    defect_map[10:14, 1:3] = 0.7
    defect_map[12, 2] = 0.8
    return mask, defect_map


def test_blobs_two_squares():
    mask, defect_map = _two_squares()

    blobs = find_blobs(mask, defect_map)

    assert len(blobs) == 2
    assert [blob["id"] for blob in blobs] == [1, 2]


def test_blobs_sorted_by_score_max():
    mask, defect_map = _two_squares()

    first, second = find_blobs(mask, defect_map)

    # Square B has the higher maximum (0.8 against 0.6), so it comes first.
    assert first["score_max"] == pytest.approx(0.8, abs=1e-6)
    assert second["score_max"] == pytest.approx(0.6, abs=1e-6)


def test_blobs_geometry_hand_computed():
    mask, defect_map = _two_squares()

    square_b, square_a = find_blobs(mask, defect_map)

    # Square A has its centroid at the middle row 3 and column 6. Its bounding
    # box [x0, y0, x1, y1) is [5, 2, 8, 5), with x1 and y1 one past the last pixel.
    assert square_a["x"] == pytest.approx(6.0, abs=1e-12)
    assert square_a["y"] == pytest.approx(3.0, abs=1e-12)
    assert square_a["bbox"] == [5, 2, 8, 5]
    assert square_a["area"] == 9
    # Square B: rows 10-13 give y = 11.5 and columns 1-2 give x = 1.5.
    assert square_b["x"] == pytest.approx(1.5, abs=1e-12)
    assert square_b["y"] == pytest.approx(11.5, abs=1e-12)
    assert square_b["bbox"] == [1, 10, 3, 14]
    assert square_b["area"] == 8


def test_blobs_score_mean_hand_computed():
    mask, defect_map = _two_squares()

    square_b, square_a = find_blobs(mask, defect_map)

    # A: (8 * 0.5 + 0.6) / 9 = 0.51111. B: (7 * 0.7 + 0.8) / 8 = 0.7125.
    assert square_a["score_mean"] == pytest.approx(4.6 / 9, abs=1e-6)
    assert square_b["score_mean"] == pytest.approx(0.7125, abs=1e-6)


def test_blobs_diagonal_pixels_join():
    mask = np.zeros((6, 6), bool)
    mask[1, 1] = mask[2, 2] = mask[3, 3] = True

    blobs = find_blobs(mask, mask.astype(np.float32))

    # Labelling uses 8-connectivity, so a diagonal line is one blob.
    assert len(blobs) == 1
    assert blobs[0]["area"] == 3


def test_blobs_empty_mask():
    blobs = find_blobs(np.zeros((8, 8), bool), np.zeros((8, 8), np.float32))

    assert blobs == []


def test_blobs_are_json():
    mask, defect_map = _two_squares()

    blobs = find_blobs(mask, defect_map)

    assert json.loads(json.dumps(blobs)) == blobs


def _square_and_speck():
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    mask[15, 15] = True
    return mask


def test_clean_mask_removes_speck():
    cleaned = clean_mask(_square_and_speck(), opening_radius=1, closing_radius=0, min_area=0)

    assert not cleaned[15, 15]


def test_clean_mask_keeps_square():
    cleaned = clean_mask(_square_and_speck(), opening_radius=1, closing_radius=0, min_area=0)

    # A radius-1 disk is a plus sign. Erosion leaves the 3x3 core of the 5x5
    # square and dilation grows it back to 5x5 less its 4 corners: 21 px.
    expected = np.zeros((20, 20), bool)
    expected[5:10, 5:10] = True
    expected[[5, 5, 9, 9], [5, 9, 5, 9]] = False
    np.testing.assert_array_equal(cleaned, expected)


def test_clean_mask_defaults_keep_square():
    # Opening 1, closing 2 and min_area 9 are DetectionConfig's defaults.
    cleaned = clean_mask(_square_and_speck(), opening_radius=1, closing_radius=2, min_area=9)

    assert not cleaned[15, 15]
    assert cleaned[5:10, 5:10].sum() == 21
    assert cleaned.sum() == 21


def test_clean_mask_closing_fills_gap():
    mask = np.zeros((12, 12), bool)
    mask[3:9, 3:9] = True
    mask[6, 6] = False

    cleaned = clean_mask(mask, opening_radius=0, closing_radius=1, min_area=0)

    assert cleaned[6, 6]


def test_clean_mask_min_area():
    mask = np.zeros((20, 20), bool)
    mask[2:4, 2:6] = True  # 8 px
    mask[10:13, 10:13] = True  # 9 px

    cleaned = clean_mask(mask, opening_radius=0, closing_radius=0, min_area=9)

    assert not cleaned[2:4, 2:6].any()
    assert cleaned[10:13, 10:13].all()
    assert cleaned.sum() == 9


def test_clean_mask_zero_radii_is_identity():
    mask = _square_and_speck()

    cleaned = clean_mask(mask, opening_radius=0, closing_radius=0, min_area=0)

    np.testing.assert_array_equal(cleaned, mask)


def test_threshold_constant_map_is_inf():
    defect_map = np.full((32, 32), 0.3, np.float32)
    valid = np.ones((32, 32), bool)

    threshold = choose_threshold(defect_map, valid, z_floor=10.0, min_score=0.0)

    assert threshold.value == float("inf")
    assert threshold.median == pytest.approx(0.3, abs=1e-6)
    assert threshold.mad == 0.0
    assert find_blobs(defect_map > threshold.value, defect_map) == []


def test_threshold_constant_inside_valid():
    # Values outside the valid pixels do not count, so the map is constant.
    defect_map = np.full((32, 32), 0.3, np.float32)
    defect_map[:, :4] = 0.9
    valid = np.ones((32, 32), bool)
    valid[:, :4] = False

    threshold = choose_threshold(defect_map, valid, z_floor=10.0, min_score=0.0)

    assert threshold.value == float("inf")


def test_threshold_no_valid_pixels():
    defect_map = np.random.default_rng(0).random((16, 16)).astype(np.float32)

    threshold = choose_threshold(defect_map, np.zeros((16, 16), bool), z_floor=10.0, min_score=0.0)

    assert threshold.value == float("inf")
    assert np.isnan(threshold.median)


def test_threshold_hand_computed_floor():
    # Values 0.1 to 0.5: median 0.3, absolute deviations (0.2, 0.1, 0, 0.1,
    # 0.2) with median 0.1, so the floor at z = 2 is 0.3 + 2 * 1.4826 * 0.1.
    defect_map = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    valid = np.ones((1, 5), bool)

    threshold = choose_threshold(defect_map, valid, z_floor=2.0, min_score=0.0)

    assert threshold.median == pytest.approx(0.3, abs=1e-12)
    assert threshold.mad == pytest.approx(0.1, abs=1e-12)
    assert threshold.robust_floor == pytest.approx(0.59652, abs=1e-12)
    assert threshold.value == max(threshold.otsu, threshold.robust_floor, 0.0)


def _noise_map(seed):
    """Return a 200x200 map of Gaussian noise, mean 0.2 and std 0.02."""
    rng = np.random.default_rng(seed)
    return np.clip(rng.normal(0.2, 0.02, (200, 200)), 0.0, 1.0).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_threshold_noise_passes_nothing(seed):
    defect_map = _noise_map(seed)
    valid = np.ones(defect_map.shape, bool)

    threshold = choose_threshold(defect_map, valid, z_floor=10.0, min_score=0.0)

    # The maximum of these 40,000 normal samples is 4.0 to 4.7 std, far below
    # the floor at 10 std, while Otsu alone splits the noise in two.
    assert (defect_map > threshold.otsu).any()
    assert threshold.value == threshold.robust_floor
    assert not (defect_map > threshold.value).any()


def test_threshold_planted_peak_passes():
    defect_map = _noise_map(3)
    defect_map[100:105, 60:65] = 0.9
    valid = np.ones(defect_map.shape, bool)

    threshold = choose_threshold(defect_map, valid, z_floor=10.0, min_score=0.0)
    mask = defect_map > threshold.value

    expected = np.zeros(defect_map.shape, bool)
    expected[100:105, 60:65] = True
    np.testing.assert_array_equal(mask, expected)


def test_threshold_min_score_binds():
    defect_map = _noise_map(4)
    defect_map[100:105, 60:65] = 0.9
    valid = np.ones(defect_map.shape, bool)

    threshold = choose_threshold(defect_map, valid, z_floor=10.0, min_score=0.95)

    assert threshold.value == 0.95
    assert not (defect_map > threshold.value).any()


def test_threshold_summary_is_json():
    defect_map = _noise_map(5)

    threshold = choose_threshold(defect_map, np.ones(defect_map.shape, bool), z_floor=10.0, min_score=0.0)
    decoded = json.loads(json.dumps(threshold.summary()))

    assert set(decoded) == {"value", "otsu", "robust_floor", "min_score", "median", "mad"}
    assert decoded["value"] == threshold.value
