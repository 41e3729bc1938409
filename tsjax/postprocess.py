"""From a defect map to a binary mask and a list of blobs.

The threshold is Otsu's (N. Otsu, "A threshold selection method from
gray-level histograms", IEEE Trans. SMC 9(1), 1979) over the valid pixels,
raised to a robust z-score floor. Otsu always splits a map in two, even a
map of pure noise, so on its own it would report defects on every
defect-free pair. The floor lets through only pixels far outside the map's
own noise.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from skimage import filters, measure, morphology

__all__ = ["Threshold", "choose_threshold", "clean_mask", "find_blobs"]

# Scale factor that makes the median absolute deviation a consistent
# estimator of the standard deviation for normally distributed values.
_MAD_TO_SIGMA = 1.4826


@dataclasses.dataclass(frozen=True)
class Threshold:
    """The threshold applied to a defect map and where it came from.

    Attributes:
      value: Final threshold on ``D``: the maximum of the three below.
      otsu: Otsu's threshold over the valid pixels.
      robust_floor: ``median + z_floor * 1.4826 * MAD`` over the valid pixels.
      min_score: The absolute floor from the config.
      median: Median of ``D`` over the valid pixels.
      mad: Median absolute deviation of ``D`` over the valid pixels.
    """

    value: float
    otsu: float
    robust_floor: float
    min_score: float
    median: float
    mad: float

    def summary(self) -> dict:
        """Return the fields as a JSON-serialisable dict."""
        return {key: float(value) for key, value in dataclasses.asdict(self).items()}


def choose_threshold(defect_map: np.ndarray, valid: np.ndarray, *, z_floor: float, min_score: float) -> Threshold:
    """Compute the threshold on ``D`` for one map.

    Args:
      defect_map: ``[H, W]`` float in [0, 1].
      valid: ``[H, W]`` bool, the pixels that count.
      z_floor: Robust z-score a pixel must exceed.
      min_score: Absolute floor on ``D``.

    Returns:
      A ``Threshold``. With no valid pixels, or a constant map, the threshold
      is above every value (``inf``), so nothing is detected.
    """
    values = defect_map[valid].astype(np.float64)
    if values.size == 0 or values.max() == values.min():
        inf = float("inf")
        median = float(np.median(values)) if values.size else float("nan")
        return Threshold(inf, inf, inf, float(min_score), median, 0.0)
    otsu = float(filters.threshold_otsu(values))
    median = float(np.median(values))
    mad = float(np.median(np.abs(values - median)))
    robust_floor = median + z_floor * _MAD_TO_SIGMA * mad
    value = max(otsu, robust_floor, float(min_score))
    return Threshold(value, otsu, robust_floor, float(min_score), median, mad)


def clean_mask(mask: np.ndarray, *, opening_radius: int, closing_radius: int, min_area: int) -> np.ndarray:
    """Remove speckle (opening), fill small gaps (closing) and drop tiny blobs.

    Args:
      mask: ``[H, W]`` bool.
      opening_radius: Disk radius in px; 0 skips the opening.
      closing_radius: Disk radius in px; 0 skips the closing.
      min_area: Connected components smaller than this (px) are removed.

    Returns:
      ``[H, W]`` bool.
    """
    mask = np.asarray(mask, bool)
    if opening_radius > 0:
        mask = morphology.opening(mask, morphology.disk(opening_radius))
    if closing_radius > 0:
        mask = morphology.closing(mask, morphology.disk(closing_radius))
    if min_area > 1:
        # remove_small_objects changed its keyword between scikit-image
        # releases, so the area filter is done on the labels directly.
        labels = measure.label(mask, connectivity=2)
        areas = np.bincount(labels.ravel())
        keep = areas >= min_area
        keep[0] = False
        mask = keep[labels]
    return mask


def find_blobs(mask: np.ndarray, defect_map: np.ndarray) -> list[dict]:
    """Label 8-connected components of ``mask`` and describe each.

    Args:
      mask: ``[H, W]`` bool.
      defect_map: ``[H, W]`` float, used for the score statistics.

    Returns:
      One dict per blob, sorted by ``score_max`` (highest first), with ``id``
      counting from 1 in that order. Keys: ``x`` and ``y`` (centroid column
      and row, px), ``bbox`` (``[x0, y0, x1, y1]`` with x0 and y0 inclusive,
      x1 and y1 exclusive), ``area`` (px), and ``score_mean`` and
      ``score_max`` (of ``D`` inside the blob).
    """
    labels = measure.label(mask, connectivity=2)
    blobs = []
    for region in measure.regionprops(labels, intensity_image=defect_map):
        row, col = region.centroid
        min_row, min_col, max_row, max_col = region.bbox
        scores = defect_map[region.coords[:, 0], region.coords[:, 1]]
        blobs.append(
            {
                "x": float(col),
                "y": float(row),
                "bbox": [int(min_col), int(min_row), int(max_col), int(max_row)],
                "area": int(region.area),
                "score_mean": float(scores.mean()),
                "score_max": float(scores.max()),
            }
        )
    blobs.sort(key=lambda blob: -blob["score_max"])
    return [{"id": index + 1, **blob} for index, blob in enumerate(blobs)]
