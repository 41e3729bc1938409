"""Detection metrics for defect maps, blobs and image scores, in NumPy float64.

Three kinds of ground truth are covered:

* Points (the real wafer annotations): `match_points` matches blobs to
  annotated defect centres and `summarize_matches` adds the results of many
  pairs.
* Pixel masks (synthetic data): `pixel_auroc`, `aupro` and `f1_max`, with the
  curves `roc_curve`, `pro_curve` and `precision_recall_curve` for plots.
* Image labels: `image_auroc`.

All curves sweep every distinct score as a threshold, and a pixel counts as
positive when its score is >= the threshold. Pixels with equal scores enter
together, so a tie adds one straight segment to a curve and the area under it
gives ties half credit, as the Mann-Whitney U statistic does. Metrics that are
undefined for the input (e.g. AUROC without any defect pixel) return
float("nan") rather than raising, so that callers can average over images
with `np.nanmean` and see the gap.

Coordinates follow the rest of tsjax: x is the column and y the row, in
pixels of the inspected image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import scipy.ndimage

__all__ = [
    "aupro",
    "auroc",
    "f1_max",
    "image_auroc",
    "match_points",
    "pixel_auroc",
    "precision_recall_curve",
    "pro_curve",
    "roc_curve",
    "summarize_matches",
]

_BLOB_KEYS = ("id", "x", "y", "bbox")


def _validate_scores_labels(scores: Any, labels: Any, labels_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Return scores as float64 and labels as bool arrays of one shape, checked."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    if scores.shape != labels.shape:
        raise ValueError(
            f"scores shape {scores.shape} does not match {labels_name} shape {labels.shape}: "
            "pass one score per labelled pixel or image."
        )
    if scores.size == 0:
        raise ValueError("scores is empty: pass at least one score.")
    if not (np.issubdtype(scores.dtype, np.number) or scores.dtype == bool):
        raise TypeError(f"scores must be numeric, got dtype {scores.dtype}.")
    scores = scores.astype(np.float64)
    num_bad = int(np.count_nonzero(~np.isfinite(scores)))
    if num_bad:
        raise ValueError(
            f"scores contain {num_bad} NaN or infinite values: replace them, "
            "e.g. with np.nan_to_num, before computing metrics."
        )
    if labels.dtype != bool:
        if not np.issubdtype(labels.dtype, np.number) or not np.isin(labels, (0, 1)).all():
            raise ValueError(
                f"{labels_name} must be boolean or contain only 0 and 1, got values "
                f"{np.unique(labels)[:5]}."
            )
        labels = labels.astype(bool)
    return scores, labels


class _ThresholdSweep:
    """Scores sorted in decreasing order, cut at every distinct score.

    `cumulative(values)` sums per-pixel `values` over all pixels whose score
    is >= each distinct score. Pixels with equal scores are summed together,
    so that tied pixels cross a threshold at once.
    """

    def __init__(self, scores: np.ndarray):
        self._order = np.argsort(-scores, kind="stable")
        sorted_scores = scores[self._order]
        # The last position of each run of equal scores.
        self._last_of_tie = np.append(np.nonzero(np.diff(sorted_scores))[0], sorted_scores.size - 1)
        self.thresholds = sorted_scores[self._last_of_tie]  # [T], decreasing
        self.num_passing = (self._last_of_tie + 1).astype(np.float64)  # [T] pixels >= threshold

    def cumulative(self, values: np.ndarray) -> np.ndarray:
        """Return [T] sums of `values` ([N], one per pixel) at each threshold."""
        return np.cumsum(values[self._order], dtype=np.float64)[self._last_of_tie]


def _area(x: np.ndarray, y: np.ndarray) -> float:
    """Return the trapezoidal area under the piecewise linear curve y(x)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5))


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute the receiver operating characteristic over all thresholds.

    Args:
      scores: Array of any shape, higher means more likely defective.
      labels: Boolean (or 0/1) array of the same shape, True for defective.

    Returns:
      (fpr, tpr, thresholds), each float64 [T + 1] for T distinct scores.
      The first point is (0, 0) at threshold +inf, and thresholds then
      decrease through the distinct scores, the last point being (1, 1).
      Without negatives the fpr is all NaN, and without positives the tpr is
      all NaN. T can reach the number of pixels, so thin the curve out before
      plotting it.

    Raises:
      ValueError: If shapes differ, the input is empty, scores are not
        finite or labels are not binary.
      TypeError: If scores are not numeric.
    """
    scores, labels = _validate_scores_labels(scores, labels, "labels")
    sweep = _ThresholdSweep(scores.ravel())
    true_positives = sweep.cumulative(labels.ravel())
    false_positives = sweep.num_passing - true_positives
    with np.errstate(invalid="ignore", divide="ignore"):
        tpr = np.concatenate([[0.0], true_positives]) / true_positives[-1]
        fpr = np.concatenate([[0.0], false_positives]) / false_positives[-1]
    return fpr, tpr, np.concatenate([[np.inf], sweep.thresholds])


def auroc(scores: Any, labels: Any) -> float:
    """Compute the area under the ROC curve, with ties counted as half.

    Equals the probability that a random positive scores higher than a
    random negative, plus half the probability that they tie.

    Args:
      scores: Array of any shape.
      labels: Boolean (or 0/1) array of the same shape.

    Returns:
      AUROC in [0, 1], or NaN when all labels are one class, where it is
      undefined.

    Raises:
      ValueError, TypeError: As `roc_curve`.
    """
    fpr, tpr, _ = roc_curve(scores, labels)
    if np.isnan(fpr).any() or np.isnan(tpr).any():
        return float("nan")
    return _area(fpr, tpr)


def pixel_auroc(scores: Any, mask: Any) -> float:
    """Compute the pixel-level AUROC of defect maps against defect masks.

    All pixels of all images are pooled into one ROC curve.

    Args:
      scores: [H, W] or [N, H, W] defect map.
      mask: Boolean array of the same shape, True on defect pixels.

    Returns:
      AUROC in [0, 1], or NaN when the mask has no defect pixel or no normal
      pixel.

    Raises:
      ValueError: If shapes differ or are not 2-D or 3-D, the input is empty,
        scores are not finite or the mask is not binary.
      TypeError: If scores are not numeric.
    """
    _check_map_rank(scores)
    return auroc(scores, mask)


def image_auroc(image_scores: Any, labels: Any) -> float:
    """Compute the image-level AUROC of one score per image.

    Args:
      image_scores: [N] score per image, e.g. the maximum of its defect map.
      labels: [N] boolean (or 0/1), True for images with a defect.

    Returns:
      AUROC in [0, 1], or NaN when all images have the same label.

    Raises:
      ValueError: If the inputs are not 1-D of one length, are empty, scores
        are not finite or labels are not binary.
      TypeError: If scores are not numeric.
    """
    if np.ndim(image_scores) != 1:
        raise ValueError(
            f"image_scores must be 1-D [N], got shape {np.shape(image_scores)}: "
            "reduce each map to one score first."
        )
    return auroc(image_scores, labels)


def precision_recall_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute precision and recall at every distinct score.

    Args:
      scores: Array of any shape.
      labels: Boolean (or 0/1) array of the same shape.

    Returns:
      (precision, recall, thresholds), each float64 [T] for T distinct
      scores, thresholds decreasing. Precision is defined at every threshold
      because at least one pixel passes it. Without positives, recall is all
      NaN.

    Raises:
      ValueError, TypeError: As `roc_curve`.
    """
    scores, labels = _validate_scores_labels(scores, labels, "labels")
    sweep = _ThresholdSweep(scores.ravel())
    true_positives = sweep.cumulative(labels.ravel())
    precision = true_positives / sweep.num_passing
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = true_positives / true_positives[-1]
    return precision, recall, sweep.thresholds


def f1_max(scores: Any, mask: Any) -> float:
    """Compute the best F1 score over all thresholds.

    Args:
      scores: Array of any shape, e.g. [N, H, W] defect maps.
      mask: Boolean (or 0/1) array of the same shape, True on defect pixels.

    Returns:
      Max over thresholds of 2 TP / (2 TP + FP + FN), in [0, 1]. NaN when the
      mask has no defect pixel, because F1 is then 0 or undefined at every
      threshold.

    Raises:
      ValueError, TypeError: As `roc_curve`.
    """
    precision, recall, _ = precision_recall_curve(scores, mask)
    if np.isnan(recall).any():
        return float("nan")
    with np.errstate(invalid="ignore", divide="ignore"):
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    return float(np.max(f1))


def _check_map_rank(scores: Any) -> None:
    if np.ndim(scores) not in (2, 3):
        raise ValueError(
            f"scores must be a map [H, W] or a stack of maps [N, H, W], got shape {np.shape(scores)}."
        )


def _label_regions(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 8-connected defect regions of each image separately.

    Returns:
      (labels, count): int labels of the mask's shape, 0 on normal pixels and
      1..count on defect pixels, unique across images.
    """
    structure = np.ones((3, 3), dtype=bool)
    if mask.ndim == 2:
        return scipy.ndimage.label(mask, structure=structure)
    labels = np.zeros(mask.shape, dtype=np.int64)
    count = 0
    for index, image_mask in enumerate(mask):
        image_labels, image_count = scipy.ndimage.label(image_mask, structure=structure)
        labels[index] = np.where(image_labels > 0, image_labels + count, 0)
        count += image_count
    return labels, count


def pro_curve(scores: Any, mask: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Compute the per-region overlap (PRO) curve against the false positive rate.

    A region is an 8-connected component of one image's mask, so regions
    never span images. At each threshold, the PRO is the mean over all
    regions of the fraction of the region's pixels at or above the
    threshold, so a small defect weighs as much as a large one. The FPR is
    the fraction of normal pixels at or above the threshold. This is the
    curve under the AUPRO metric of the MVTec AD benchmark (Bergmann et al.,
    "The MVTec Anomaly Detection Dataset: A Comprehensive Real-World Dataset
    for Unsupervised Anomaly Detection", IJCV 129, 2021).

    Args:
      scores: [H, W] or [N, H, W] defect map.
      mask: Boolean (or 0/1) array of the same shape, True on defect pixels.

    Returns:
      (fpr, pro, thresholds), each float64 [T + 1] for T distinct scores,
      starting at (0, 0) with threshold +inf and ending at (1, 1). Without
      normal pixels the fpr is all NaN, and without defect regions the pro
      is all NaN. T can reach the number of pixels.

    Raises:
      ValueError: If shapes differ or are not 2-D or 3-D, the input is empty,
        scores are not finite or the mask is not binary.
      TypeError: If scores are not numeric.
    """
    _check_map_rank(scores)
    scores, mask = _validate_scores_labels(scores, mask, "mask")
    regions, num_regions = _label_regions(mask)
    regions = regions.ravel()
    region_sizes = np.bincount(regions, minlength=num_regions + 1).astype(np.float64)
    # Each defect pixel carries 1 / (region size * number of regions), so the
    # weights of all defect pixels sum to 1.
    with np.errstate(invalid="ignore", divide="ignore"):
        region_weight = np.where(regions > 0, 1.0 / (region_sizes[regions] * num_regions), 0.0)
    sweep = _ThresholdSweep(scores.ravel())
    false_positives = sweep.cumulative(regions == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = np.concatenate([[0.0], false_positives]) / false_positives[-1]
    pro = np.concatenate([[0.0], sweep.cumulative(region_weight)])
    if num_regions == 0:
        pro = np.full_like(pro, np.nan)
    return fpr, pro, np.concatenate([[np.inf], sweep.thresholds])


def aupro(scores: Any, mask: Any, fpr_limit: float = 0.3) -> float:
    """Compute the area under the PRO curve up to an FPR limit, normalised.

    The PRO curve of `pro_curve` is integrated over FPR from 0 to
    `fpr_limit` with the trapezoidal rule, interpolating linearly at the
    limit, and divided by `fpr_limit`, so a perfect detector scores 1. The
    limit of 0.3 is the one of the MVTec AD benchmark.

    Args:
      scores: [H, W] or [N, H, W] defect map.
      mask: Boolean (or 0/1) array of the same shape, True on defect pixels.
      fpr_limit: Upper FPR bound of the integral, in (0, 1].

    Returns:
      Normalised area in [0, 1]. NaN when the mask has no defect pixel or no
      normal pixel, because PRO or FPR is then undefined.

    Raises:
      ValueError: As `pro_curve`, or if `fpr_limit` is outside (0, 1].
      TypeError: If scores are not numeric.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit={fpr_limit!r} is invalid: use a value in (0, 1].")
    fpr, pro, _ = pro_curve(scores, mask)
    if np.isnan(fpr).any() or np.isnan(pro).any():
        return float("nan")
    inside = fpr <= fpr_limit
    x, y = fpr[inside], pro[inside]
    if x[-1] < fpr_limit:
        # The curve ends at fpr = 1 >= fpr_limit, so a next point exists.
        after = int(np.argmax(fpr > fpr_limit))
        before = after - 1
        fraction = (fpr_limit - fpr[before]) / (fpr[after] - fpr[before])
        y_limit = pro[before] + fraction * (pro[after] - pro[before])
        x, y = np.append(x, fpr_limit), np.append(y, y_limit)
    return _area(x, y) / fpr_limit


def _validate_blob(blob: Any, index: int) -> tuple[Any, float, float, tuple[float, float, float, float]]:
    if not isinstance(blob, Mapping):
        raise TypeError(f"blobs[{index}] must be a dict, got {type(blob).__name__}.")
    missing = [key for key in _BLOB_KEYS if key not in blob]
    if missing:
        raise ValueError(f"blobs[{index}] is missing keys {missing}: each blob needs {list(_BLOB_KEYS)}.")
    bbox = blob["bbox"]
    if len(bbox) != 4:
        raise ValueError(f"blobs[{index}]['bbox']={bbox!r} is invalid: use [x0, y0, x1, y1].")
    x0, y0, x1, y1 = (float(value) for value in bbox)
    if not (x0 < x1 and y0 < y1):
        raise ValueError(
            f"blobs[{index}]['bbox']={bbox!r} is empty: use [x0, y0, x1, y1] with x0 < x1 and y0 < y1."
        )
    return blob["id"], float(blob["x"]), float(blob["y"]), (x0, y0, x1, y1)


def match_points(points_xy: Any, blobs: Sequence[Mapping[str, Any]], match_radius: float = 10) -> dict[str, Any]:
    """Match annotated defect points of one image pair to detected blobs.

    A blob's "bbox" is [x0, y0, x1, y1] in pixel indices, with x0 and y0
    inclusive and x1 and y1 exclusive, so it covers columns x0..x1-1 and
    rows y0..y1-1. A point (x, y) matches a blob when that box, grown by
    `match_radius` px on every side, contains it:
    x0 - r <= x <= x1 - 1 + r and y0 - r <= y <= y1 - 1 + r. A point is
    found when at least one blob matches it, and its matched blob is the
    matching blob with the nearest centroid ("x", "y"), the first one on a
    tie. A blob that matches no point is a false positive. Several points
    may share one blob.

    Args:
      points_xy: [P, 2] (x, y) defect centres in the inspected image. An
        empty list or an array of shape [0] or [0, 2] means no defect.
      blobs: Detected blobs, each a dict with at least "id", "x", "y" (the
        centroid) and "bbox". Other keys, such as "area", "score_mean" and
        "score_max", are ignored.
      match_radius: Growth of each bounding box, in px, >= 0.

    Returns:
      A dict with
        "num_points", "num_blobs": int counts of the inputs.
        "found", "missed": int counts of points with and without a match.
        "false_positives": int count of blobs that match no point.
        "point_found": list of P bools.
        "matched_blob_ids": list of P blob ids, None for a missed point.
        "localisation_errors_px": list of P floats, the distance from each
          point to its matched blob's centroid, NaN for a missed point.
        "mean_localisation_error_px": float mean over found points, NaN
          when none is found.
        "false_positive_ids": list of the ids of false-positive blobs.
      With no points and no blobs every count is 0 and every list is empty.

    Raises:
      ValueError: If `points_xy` is not [P, 2] or not finite, a blob lacks
        a key or has an empty bbox, or `match_radius` < 0.
      TypeError: If a blob is not a dict.
    """
    points = np.asarray(points_xy, dtype=np.float64)
    if points.size == 0:
        points = points.reshape(0, 2)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"points_xy must have shape [P, 2] of (x, y), got {points.shape}.")
    if not np.isfinite(points).all():
        raise ValueError("points_xy contains NaN or infinite coordinates: pass pixel positions.")
    if not match_radius >= 0:
        raise ValueError(f"match_radius={match_radius!r} is invalid: use a distance >= 0 px.")

    parsed = [_validate_blob(blob, index) for index, blob in enumerate(blobs)]
    ids = [blob_id for blob_id, _, _, _ in parsed]
    centroids = np.array([(x, y) for _, x, y, _ in parsed], dtype=np.float64).reshape(-1, 2)
    boxes = np.array([box for _, _, _, box in parsed], dtype=np.float64).reshape(-1, 4)

    # contains[p, b] is True when blob b's grown box contains point p.
    px, py = points[:, 0:1], points[:, 1:2]
    contains = (
        (px >= boxes[None, :, 0] - match_radius)
        & (px <= boxes[None, :, 2] - 1 + match_radius)
        & (py >= boxes[None, :, 1] - match_radius)
        & (py <= boxes[None, :, 3] - 1 + match_radius)
    )
    distances = np.hypot(px - centroids[None, :, 0], py - centroids[None, :, 1])
    distances = np.where(contains, distances, np.inf)

    point_found = contains.any(axis=1)
    errors = np.full(len(points), np.nan)
    matched_ids: list[Any] = [None] * len(points)
    if parsed:
        # argmin returns the first blob among equally near ones.
        nearest = np.argmin(distances, axis=1)
        for point_index in np.nonzero(point_found)[0]:
            errors[point_index] = distances[point_index, nearest[point_index]]
            matched_ids[point_index] = ids[nearest[point_index]]
    false_positive = ~contains.any(axis=0)
    num_found = int(point_found.sum())

    return {
        "num_points": len(points),
        "num_blobs": len(parsed),
        "found": num_found,
        "missed": len(points) - num_found,
        "false_positives": int(false_positive.sum()),
        "point_found": point_found.tolist(),
        "matched_blob_ids": matched_ids,
        "localisation_errors_px": errors.tolist(),
        "mean_localisation_error_px": float(errors[point_found].mean()) if num_found else float("nan"),
        "false_positive_ids": [ids[b] for b in np.nonzero(false_positive)[0]],
    }


def summarize_matches(matches: Sequence[Mapping[str, Any]]) -> dict[str, float | int]:
    """Add up the `match_points` results of several image pairs.

    Args:
      matches: One `match_points` result per pair.

    Returns:
      A dict with int totals "num_pairs", "num_points", "num_blobs", "found",
      "missed" and "false_positives", and floats "recall" (found / points),
      "precision" (blobs that match a point / blobs),
      "false_positives_per_pair" and "mean_localisation_error_px" (over all
      found points). A ratio whose denominator is 0 is NaN.

    Raises:
      ValueError: If a result lacks one of the keys above.
    """
    needed = ("num_points", "num_blobs", "found", "missed", "false_positives", "localisation_errors_px")
    for index, match in enumerate(matches):
        missing = [key for key in needed if key not in match]
        if missing:
            raise ValueError(f"matches[{index}] is missing keys {missing}: pass match_points results.")

    totals = {key: int(sum(match[key] for match in matches)) for key in needed[:-1]}
    errors = np.array(
        [error for match in matches for error in match["localisation_errors_px"]], dtype=np.float64
    )
    found_errors = errors[~np.isnan(errors)]

    def ratio(numerator: float, denominator: float) -> float:
        return numerator / denominator if denominator else float("nan")

    return {
        "num_pairs": len(matches),
        **totals,
        "recall": ratio(totals["found"], totals["num_points"]),
        "precision": ratio(totals["num_blobs"] - totals["false_positives"], totals["num_blobs"]),
        "false_positives_per_pair": ratio(totals["false_positives"], len(matches)),
        "mean_localisation_error_px": float(found_errors.mean()) if found_errors.size else float("nan"),
    }
