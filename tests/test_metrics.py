"""Tests for tsjax.metrics against hand-computed values and brute-force references."""

import math

import numpy as np
import pytest
import scipy.ndimage

from tsjax import metrics


def _blob(blob_id, x, y, bbox):
    return {"id": blob_id, "x": x, "y": y, "bbox": bbox, "area": 1, "score_mean": 0.5, "score_max": 0.9}


def _pairwise_auroc(scores, labels):
    """Return P(positive > negative) + 0.5 P(tie) by comparing every pair."""
    positives = scores[labels]
    negatives = scores[~labels]
    wins = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return (wins + 0.5 * ties) / (positives.size * negatives.size)


def _threshold_loop_aupro(scores, mask, fpr_limit):
    """Return AUPRO from an explicit loop over thresholds and regions."""
    regions, count = scipy.ndimage.label(mask, structure=np.ones((3, 3)))
    points = [(0.0, 0.0)]
    for threshold in np.unique(scores)[::-1]:
        detected = scores >= threshold
        overlaps = [detected[regions == k].mean() for k in range(1, count + 1)]
        points.append((detected[~mask].mean(), np.mean(overlaps)))
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
        if x1 <= fpr_limit:
            area += (x1 - x0) * (y0 + y1) / 2
        elif x0 < fpr_limit:
            y_limit = y0 + (fpr_limit - x0) / (x1 - x0) * (y1 - y0)
            area += (fpr_limit - x0) * (y0 + y_limit) / 2
    return area / fpr_limit


# roc_curve and AUROC


def test_roc_curve_hand_example():
    # Sorted by score: 0.9 (pos), 0.7 (neg), 0.4 (pos), 0.1 (neg).
    fpr, tpr, thresholds = metrics.roc_curve([0.1, 0.4, 0.7, 0.9], [0, 1, 0, 1])
    np.testing.assert_allclose(fpr, [0.0, 0.0, 0.5, 0.5, 1.0], atol=0)
    np.testing.assert_allclose(tpr, [0.0, 0.5, 0.5, 1.0, 1.0], atol=0)
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.7, 0.4, 0.1], atol=0)


def test_auroc_hand_example():
    # Pairs (pos, neg): (0.9, 0.7) win, (0.9, 0.1) win, (0.4, 0.7) loss,
    # (0.4, 0.1) win, so AUROC = 3 / 4.
    assert metrics.auroc([0.1, 0.4, 0.7, 0.9], [0, 1, 0, 1]) == pytest.approx(0.75, abs=1e-12)


def test_auroc_ties_count_half():
    # Positives {0.5, 0.8}, negatives {0.5, 0.2}: one tie and three wins,
    # so AUROC = (3 + 0.5) / 4.
    assert metrics.auroc([0.5, 0.8, 0.5, 0.2], [1, 1, 0, 0]) == pytest.approx(0.875, abs=1e-12)


def test_auroc_all_scores_tied_is_half():
    fpr, tpr, _ = metrics.roc_curve(np.full(6, 0.3), [1, 0, 1, 0, 0, 0])
    np.testing.assert_allclose(fpr, [0.0, 1.0], atol=0)
    np.testing.assert_allclose(tpr, [0.0, 1.0], atol=0)
    assert metrics.auroc(np.full(6, 0.3), [1, 0, 1, 0, 0, 0]) == pytest.approx(0.5, abs=1e-12)


def test_auroc_matches_pairwise_count():
    rng = np.random.default_rng(0)
    for _ in range(5):
        # Rounded scores produce many ties.
        scores = np.round(rng.random(300), 1)
        labels = rng.random(300) < 0.3
        expected = _pairwise_auroc(scores, labels)
        assert metrics.auroc(scores, labels) == pytest.approx(expected, abs=1e-12)


def test_auroc_perfect_and_inverted():
    assert metrics.auroc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == pytest.approx(1.0, abs=1e-12)
    assert metrics.auroc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == pytest.approx(0.0, abs=1e-12)


def test_pixel_auroc_single_class_is_nan():
    scores = np.arange(12.0).reshape(3, 4)
    assert math.isnan(metrics.pixel_auroc(scores, np.zeros((3, 4), bool)))
    assert math.isnan(metrics.pixel_auroc(scores, np.ones((3, 4), bool)))


def test_pixel_auroc_pools_image_stack():
    scores = np.array([[[0.9, 0.1]], [[0.4, 0.7]]])  # [N=2, H=1, W=2]
    mask = np.array([[[True, False]], [[True, False]]])
    # Same pixels as test_auroc_hand_example, so AUROC = 3 / 4.
    assert metrics.pixel_auroc(scores, mask) == pytest.approx(0.75, abs=1e-12)


def test_pixel_auroc_rejects_1d_scores():
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        metrics.pixel_auroc([0.1, 0.9], [False, True])


def test_image_auroc_hand_example():
    assert metrics.image_auroc([0.2, 0.9, 0.6], [False, True, False]) == pytest.approx(1.0, abs=1e-12)
    assert metrics.image_auroc([0.2, 0.6, 0.6], [False, True, False]) == pytest.approx(0.75, abs=1e-12)


def test_image_auroc_single_label_is_nan():
    assert math.isnan(metrics.image_auroc([0.2, 0.9], [True, True]))


def test_image_auroc_rejects_maps():
    with pytest.raises(ValueError, match="1-D"):
        metrics.image_auroc(np.zeros((2, 2)), np.zeros((2, 2), bool))


@pytest.mark.parametrize(
    "scores, labels, message",
    [
        ([0.1, 0.2], [1, 0, 1], "does not match"),
        ([], [], "empty"),
        ([0.1, np.nan], [1, 0], "NaN"),
        ([0.1, 0.2], [2, 0], "only 0 and 1"),
    ],
)
def test_metrics_reject_invalid_input(scores, labels, message):
    with pytest.raises(ValueError, match=message):
        metrics.auroc(scores, labels)


def test_metrics_reject_non_numeric_scores():
    with pytest.raises(TypeError, match="numeric"):
        metrics.auroc(["a", "b"], [1, 0])


# F1


def test_f1_max_hand_example():
    # Thresholds 0.9, 0.8, 0.7, 0.6 give (TP, FP) = (1, 0), (1, 1), (2, 1),
    # (2, 2) with 2 positives, so F1 = 2/3, 1/2, 4/5, 2/3 and the max is 0.8.
    assert metrics.f1_max([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0]) == pytest.approx(0.8, abs=1e-12)


def test_f1_max_ties_cross_together():
    # The tied pair cannot be split, so only TP = 1, FP = 1 is reachable:
    # F1 = 2 / (2 + 1 + 0) = 2/3, not 1.
    assert metrics.f1_max([0.5, 0.5], [1, 0]) == pytest.approx(2 / 3, abs=1e-12)


def test_f1_max_no_defect_is_nan():
    assert math.isnan(metrics.f1_max(np.ones((2, 2)), np.zeros((2, 2), bool)))


def test_f1_max_all_defect_is_one():
    # Every pixel is a defect: threshold at the minimum gives TP = 4, FP = 0.
    assert metrics.f1_max([[0.1, 0.2], [0.3, 0.4]], np.ones((2, 2), bool)) == pytest.approx(1.0, abs=1e-12)


def test_precision_recall_curve_hand_example():
    precision, recall, thresholds = metrics.precision_recall_curve([0.9, 0.8, 0.7, 0.6], [1, 0, 1, 0])
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3, 0.5], atol=1e-12)
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0, 1.0], atol=1e-12)
    np.testing.assert_allclose(thresholds, [0.9, 0.8, 0.7, 0.6], atol=0)


# PRO and AUPRO


# One row: region A = pixels 0-1 (2 px), region B = pixel 5 (1 px), normal
# pixels 2-4. Each A pixel adds 1/4 to the PRO and the B pixel adds 1/2.
# By decreasing score: 0.9 (A), 0.8 (normal), 0.6 (B), 0.5 (A), 0.3, 0.1
# (normal), so the curve runs (0, 0) (0, 1/4) (1/3, 1/4) (1/3, 3/4)
# (1/3, 1) (2/3, 1) (1, 1).
HAND_SCORES = np.array([[0.9, 0.5, 0.8, 0.3, 0.1, 0.6]])
HAND_MASK = np.array([[True, True, False, False, False, True]])


def test_pro_curve_hand_example():
    fpr, pro, thresholds = metrics.pro_curve(HAND_SCORES, HAND_MASK)
    np.testing.assert_allclose(fpr, [0, 0, 1 / 3, 1 / 3, 1 / 3, 2 / 3, 1], atol=1e-12)
    np.testing.assert_allclose(pro, [0, 0.25, 0.25, 0.75, 1, 1, 1], atol=1e-12)
    np.testing.assert_allclose(thresholds, [np.inf, 0.9, 0.8, 0.6, 0.5, 0.3, 0.1], atol=0)


@pytest.mark.parametrize(
    "fpr_limit, expected",
    [
        # Area 0.25 * 0.3 up to FPR 0.3, divided by 0.3.
        (0.3, 0.25),
        # Area 0.25 / 3 + 1 * (0.5 - 1/3), divided by 0.5.
        (0.5, 0.5),
        # Area 0.25 / 3 + 1 * 2/3 over the full range.
        (1.0, 0.75),
    ],
)
def test_aupro_hand_example(fpr_limit, expected):
    assert metrics.aupro(HAND_SCORES, HAND_MASK, fpr_limit=fpr_limit) == pytest.approx(expected, abs=1e-12)


def test_pro_regions_use_8_connectivity():
    # The diagonal pixels (0, 0) and (1, 1) form one region of 2 px, and
    # (0, 3) a region of 1 px, so (0, 0) adds 1 / (2 * 2). With 4-connectivity
    # there would be three regions and it would add 1/3.
    scores = np.array([[0.9, 0.1, 0.1, 0.2], [0.1, 0.3, 0.1, 0.1]])
    mask = np.zeros((2, 4), bool)
    mask[0, 0] = mask[1, 1] = mask[0, 3] = True
    _, pro, thresholds = metrics.pro_curve(scores, mask)
    np.testing.assert_allclose(thresholds[:4], [np.inf, 0.9, 0.3, 0.2], atol=0)
    np.testing.assert_allclose(pro[:4], [0.0, 0.25, 0.5, 1.0], atol=1e-12)


def test_pro_regions_do_not_span_images():
    # Image 0 has a 2 px region and image 1 a 1 px region at the same place.
    # Labelled per image, the first pixel adds 1 / (2 * 2). One region
    # spanning the stack would have 3 px and give 1/3.
    scores = np.array([[[0.9, 0.05, 0.5]], [[0.8, 0.4, 0.3]]])
    mask = np.array([[[True, True, False]], [[True, False, False]]])
    _, pro, thresholds = metrics.pro_curve(scores, mask)
    np.testing.assert_allclose(thresholds[:3], [np.inf, 0.9, 0.8], atol=0)
    np.testing.assert_allclose(pro[:3], [0.0, 0.25, 0.75], atol=1e-12)


def test_aupro_small_region_weighs_as_much_as_large():
    # A 1 px region scores highest and a 9 px region lowest, below every
    # normal pixel. The PRO is 0.5 from FPR 0 up to FPR 1, while pixel
    # recall would be only 0.1.
    scores = np.full((5, 10), 0.5)
    mask = np.zeros((5, 10), bool)
    mask[0, 0] = True
    scores[0, 0] = 1.0
    mask[2:5, 6:9] = True
    scores[2:5, 6:9] = 0.0
    assert metrics.aupro(scores, mask, fpr_limit=0.3) == pytest.approx(0.5, abs=1e-12)


def test_aupro_matches_threshold_loop():
    rng = np.random.default_rng(1)
    for _ in range(3):
        mask = scipy.ndimage.binary_dilation(rng.random((24, 24)) < 0.02, iterations=1)
        scores = np.round(rng.random((24, 24)) + 0.6 * mask, 2)
        expected = _threshold_loop_aupro(scores, mask, 0.3)
        assert metrics.aupro(scores, mask, fpr_limit=0.3) == pytest.approx(expected, abs=1e-12)


def test_aupro_perfect_map_is_one():
    mask = np.zeros((6, 6), bool)
    mask[1:3, 1:3] = True
    mask[4, 5] = True
    assert metrics.aupro(mask.astype(float), mask) == pytest.approx(1.0, abs=1e-12)


def test_aupro_empty_mask_is_nan():
    assert math.isnan(metrics.aupro(np.ones((3, 3)), np.zeros((3, 3), bool)))
    _, pro, _ = metrics.pro_curve(np.ones((3, 3)), np.zeros((3, 3), bool))
    assert np.isnan(pro).all()


def test_aupro_all_defect_is_nan():
    assert math.isnan(metrics.aupro(np.ones((3, 3)), np.ones((3, 3), bool)))


def test_aupro_rejects_bad_limit():
    with pytest.raises(ValueError, match="fpr_limit"):
        metrics.aupro(HAND_SCORES, HAND_MASK, fpr_limit=0.0)


# Point matching


def test_match_points_hand_example():
    blobs = [
        _blob("a", 12.0, 11.0, [8, 8, 16, 15]),  # covers x 8..15, y 8..14
        _blob("b", 100.0, 100.0, [95, 95, 105, 105]),
    ]
    result = metrics.match_points([[10, 10], [50, 50]], blobs, match_radius=10)
    assert result["found"] == 1
    assert result["missed"] == 1
    assert result["false_positives"] == 1
    assert result["point_found"] == [True, False]
    assert result["matched_blob_ids"] == ["a", None]
    assert result["false_positive_ids"] == ["b"]
    # Distance from (10, 10) to the centroid (12, 11) is sqrt(5).
    assert result["localisation_errors_px"][0] == pytest.approx(math.sqrt(5), abs=1e-12)
    assert math.isnan(result["localisation_errors_px"][1])
    assert result["mean_localisation_error_px"] == pytest.approx(math.sqrt(5), abs=1e-12)


def test_match_points_bbox_exclusive_end():
    # bbox [10, 10, 20, 20] covers pixels 10..19. With radius 2 the grown
    # box covers 8..21 inclusive.
    blobs = [_blob(0, 15.0, 15.0, [10, 10, 20, 20])]
    assert metrics.match_points([[21, 15]], blobs, match_radius=2)["found"] == 1
    assert metrics.match_points([[22, 15]], blobs, match_radius=2)["found"] == 0
    assert metrics.match_points([[8, 15]], blobs, match_radius=2)["found"] == 1
    assert metrics.match_points([[7.5, 15]], blobs, match_radius=2)["found"] == 0
    assert metrics.match_points([[15, 21]], blobs, match_radius=2)["found"] == 1
    assert metrics.match_points([[15, 22]], blobs, match_radius=2)["found"] == 0


def test_match_points_nearest_blob_wins():
    blobs = [
        _blob("far", 30.0, 10.0, [0, 0, 40, 20]),
        _blob("near", 11.0, 10.0, [5, 5, 15, 15]),
    ]
    result = metrics.match_points([[10, 10]], blobs, match_radius=0)
    assert result["matched_blob_ids"] == ["near"]
    # Both blobs contain the point, so neither is a false positive.
    assert result["false_positives"] == 0
    assert result["localisation_errors_px"] == [pytest.approx(1.0, abs=1e-12)]


def test_match_points_shared_blob():
    blobs = [_blob(7, 10.0, 10.0, [0, 0, 20, 20])]
    result = metrics.match_points([[5, 5], [15, 15]], blobs, match_radius=0)
    assert result["found"] == 2
    assert result["matched_blob_ids"] == [7, 7]
    assert result["false_positives"] == 0


def test_match_points_no_points_no_blobs():
    result = metrics.match_points([], [])
    assert result["found"] == 0
    assert result["missed"] == 0
    assert result["false_positives"] == 0
    assert result["localisation_errors_px"] == []
    assert math.isnan(result["mean_localisation_error_px"])


def test_match_points_no_blobs():
    result = metrics.match_points(np.array([[3.0, 4.0]]), [])
    assert result["found"] == 0
    assert result["missed"] == 1
    assert result["matched_blob_ids"] == [None]


def test_match_points_no_points():
    result = metrics.match_points(np.zeros((0, 2)), [_blob(1, 5.0, 5.0, [0, 0, 10, 10])])
    assert result["missed"] == 0
    assert result["false_positives"] == 1
    assert result["false_positive_ids"] == [1]


@pytest.mark.parametrize(
    "points, blobs, radius, message",
    [
        ([[1, 2, 3]], [], 10, r"\[P, 2\]"),
        ([[1, 2]], [{"id": 0, "x": 1, "y": 1}], 10, "missing keys"),
        ([[1, 2]], [_blob(0, 1, 1, [5, 5, 5, 9])], 10, "empty"),
        ([[1, 2]], [], -1, "match_radius"),
    ],
)
def test_match_points_rejects_invalid(points, blobs, radius, message):
    with pytest.raises(ValueError, match=message):
        metrics.match_points(points, blobs, match_radius=radius)


def test_summarize_matches_totals():
    first = metrics.match_points([[10, 10]], [_blob(0, 12.0, 10.0, [5, 5, 15, 15])], match_radius=0)
    second = metrics.match_points([[50, 50]], [_blob(1, 0.0, 0.0, [0, 0, 2, 2])], match_radius=0)
    third = metrics.match_points([], [])
    summary = metrics.summarize_matches([first, second, third])
    assert summary["num_pairs"] == 3
    assert summary["num_points"] == 2
    assert summary["found"] == 1
    assert summary["missed"] == 1
    assert summary["false_positives"] == 1
    assert summary["recall"] == pytest.approx(0.5, abs=1e-12)
    assert summary["precision"] == pytest.approx(0.5, abs=1e-12)
    assert summary["false_positives_per_pair"] == pytest.approx(1 / 3, abs=1e-12)
    assert summary["mean_localisation_error_px"] == pytest.approx(2.0, abs=1e-12)


def test_summarize_matches_empty_ratios_are_nan():
    summary = metrics.summarize_matches([metrics.match_points([], [])])
    assert math.isnan(summary["recall"])
    assert math.isnan(summary["precision"])
    assert summary["false_positives_per_pair"] == 0.0
