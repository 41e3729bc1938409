"""Dataset-level metrics from the per-pair outcomes of ``tsjax.evaluation``.

Pixel metrics pool every pixel of every pair's evaluation region into one
curve, as the MVTec AD benchmark and anomalib report them, rather than
averaging per-pair values. A pair with a single small defect then weighs by
its pixels and its regions, not as much as a whole other pair. Pairs differ
in size, so the PRO curve is pooled from per-pair curves
(``pooled_pro_curve``). Point metrics add up ``tsjax.metrics.match_points``
results, and the image-level AUROC ranks pairs by the maximum of their map.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.ndimage

from tsjax import metrics
from tsjax.evaluation import PairOutcome

__all__ = [
    "pooled_pro_curve",
    "area_up_to",
    "thin_curve",
    "recall_by_bins",
    "recall_by_kind",
    "summarize_method",
    "summarize_dataset",
]

# Points kept of a thinned ROC or PRO curve: enough for a smooth plot and
# small enough for a JSON file per dataset.
_CURVE_POINTS = 400


def pooled_pro_curve(maps: Sequence[np.ndarray], masks: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Compute the PRO curve of several ``[H_i, W_i]`` maps of different shapes as one dataset.

    The result equals ``tsjax.metrics.pro_curve`` of the maps stacked, had
    they one shape: the FPR counts false-positive pixels over all normal
    pixels of all maps, and the PRO averages the overlap of every region of
    every map. Each map's own curve gives, at each of its thresholds, how
    many normal pixels and how much region overlap enter. Merging these
    steps over all maps in order of decreasing threshold gives the pooled
    curve.

    Args:
      maps: ``[H_i, W_i]`` defect maps.
      masks: ``[H_i, W_i]`` bool masks, True on defect pixels.

    Returns:
      ``(fpr, pro)``, float64 ``[T + 1]`` for ``T`` distinct scores, from
      ``(0, 0)`` to ``(1, 1)``. Without normal pixels the fpr is NaN, and
      without defect regions the pro is NaN.

    Raises:
      ValueError: if the counts of maps and masks differ or there are none,
        or as ``tsjax.metrics.pro_curve``.
    """
    if len(maps) != len(masks) or not maps:
        raise ValueError(f"got {len(maps)} map(s) and {len(masks)} mask(s); pass one mask per map, at least one.")
    thresholds, normal_steps, overlap_steps = [], [], []
    total_normal, total_regions = 0, 0
    for scores, mask in zip(maps, masks):
        fpr, pro, curve_thresholds = metrics.pro_curve(scores, mask)
        mask = np.asarray(mask, bool)
        num_normal = int(np.count_nonzero(~mask))
        # The same 8-connected regions as tsjax.metrics.pro_curve labels.
        num_regions = scipy.ndimage.label(mask, structure=np.ones((3, 3), bool))[1]
        normal_count = np.rint(np.nan_to_num(fpr) * num_normal)
        overlap_sum = np.nan_to_num(pro) * num_regions
        thresholds.append(curve_thresholds[1:])
        normal_steps.append(np.diff(normal_count))
        overlap_steps.append(np.diff(overlap_sum))
        total_normal += num_normal
        total_regions += num_regions

    thresholds = np.concatenate(thresholds)
    order = np.argsort(-thresholds, kind="stable")
    sorted_thresholds = thresholds[order]
    # Steps at one threshold value, from several maps, enter together.
    last_of_tie = np.append(np.flatnonzero(np.diff(sorted_thresholds)), sorted_thresholds.size - 1)
    normal_cumulative = np.cumsum(np.concatenate(normal_steps)[order])[last_of_tie]
    overlap_cumulative = np.cumsum(np.concatenate(overlap_steps)[order])[last_of_tie]
    with np.errstate(invalid="ignore", divide="ignore"):
        fpr = np.concatenate([[0.0], normal_cumulative]) / total_normal
        pro = np.concatenate([[0.0], overlap_cumulative]) / total_regions
    return fpr, pro


def area_up_to(fpr: np.ndarray, values: np.ndarray, fpr_limit: float) -> float:
    """Integrate a curve over FPR from 0 to ``fpr_limit``, divided by ``fpr_limit``.

    Trapezoidal rule, with the curve interpolated linearly at the limit, as
    ``tsjax.metrics.aupro`` integrates a single curve.

    Args:
      fpr: ``[T]`` non-decreasing FPR from 0 to 1.
      values: ``[T]`` curve values (PRO or TPR).
      fpr_limit: Upper bound, in (0, 1].

    Returns:
      The normalised area, or NaN when either curve contains NaN.

    Raises:
      ValueError: if ``fpr_limit`` is outside (0, 1].
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit={fpr_limit!r} is invalid: use a value in (0, 1].")
    if np.isnan(fpr).any() or np.isnan(values).any():
        return float("nan")
    inside = int(np.searchsorted(fpr, fpr_limit, side="right"))
    x, y = fpr[:inside], values[:inside]
    if x[-1] < fpr_limit:
        segment = slice(inside - 1, inside + 1)
        x = np.append(x, fpr_limit)
        y = np.append(y, np.interp(fpr_limit, fpr[segment], values[segment]))
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) * 0.5) / fpr_limit)


def thin_curve(fpr: np.ndarray, values: np.ndarray, num_points: int = _CURVE_POINTS) -> tuple[np.ndarray, np.ndarray]:
    """Sample a piecewise-linear curve at a few hundred FPR values for plotting and storage.

    The FPR values are spaced evenly on a log scale from 1e-6 and on a
    linear scale, so that both plot scales keep their detail. Where the curve
    rises at one FPR value (only defect pixels pass a threshold), it takes
    the top of the rise.

    Args:
      fpr: ``[T]`` non-decreasing FPR.
      values: ``[T]`` curve values.
      num_points: About how many points to keep.

    Returns:
      ``(fpr, values)``, float64, at most ``num_points + 2`` points; empty
      when the curve contains NaN.
    """
    if np.isnan(fpr).any() or np.isnan(values).any():
        return np.zeros(0), np.zeros(0)
    # The last point of each run of equal FPR is the top of a vertical rise.
    last_of_run = np.append(np.flatnonzero(np.diff(fpr)), fpr.size - 1)
    unique_fpr, top_values = fpr[last_of_run], values[last_of_run]
    grid = np.unique(np.concatenate([[0.0, 1.0], np.logspace(-6, 0, num_points // 2), np.linspace(0, 1, num_points // 2)]))
    grid = grid[(grid >= unique_fpr[0]) & (grid <= unique_fpr[-1])]
    return grid, np.interp(grid, unique_fpr, top_values)


def _point_records(outcomes: Sequence[PairOutcome], method: str) -> list[tuple[dict[str, Any], bool]]:
    records = []
    for outcome in outcomes:
        if method not in outcome.methods:
            continue
        found = outcome.methods[method].match["point_found"]
        records.extend(zip(outcome.defects, found))
    return records


def recall_by_bins(
    outcomes: Sequence[PairOutcome], method: str, attribute: str, edges: Sequence[float]
) -> list[dict[str, float]]:
    """Compute the recall of points binned by a numeric defect attribute.

    Args:
      outcomes: Pair outcomes; those without ``method`` are skipped.
      method: Method name.
      attribute: Defect attribute, such as ``'contrast'`` (binned by its
        absolute value) or ``'size_px'``.
      edges: ``[B + 1]`` increasing bin edges; bin ``i`` is
        ``[edges[i], edges[i + 1])``, and the last bin also includes its upper edge.

    Returns:
      One dict per bin: ``low``, ``high``, ``found``, ``total`` and
      ``recall`` (NaN for an empty bin). Points without the attribute are
      left out.
    """
    edges = np.asarray(edges, np.float64)
    bins = [{"low": float(low), "high": float(high), "found": 0, "total": 0} for low, high in zip(edges[:-1], edges[1:])]
    for defect, found in _point_records(outcomes, method):
        if defect.get(attribute) is None:
            continue
        value = abs(float(defect[attribute]))
        index = int(np.searchsorted(edges, value, side="right")) - 1
        if value == edges[-1]:
            index = len(bins) - 1
        if 0 <= index < len(bins):
            bins[index]["total"] += 1
            bins[index]["found"] += int(found)
    for entry in bins:
        entry["recall"] = entry["found"] / entry["total"] if entry["total"] else float("nan")
    return bins


def recall_by_kind(outcomes: Sequence[PairOutcome], method: str) -> dict[str, dict[str, float]]:
    """Compute the recall of points per defect ``kind``.

    Returns:
      Per kind, sorted by name: ``found``, ``total`` and ``recall``. Points
      without a kind are left out.
    """
    counts: dict[str, list[int]] = {}
    for defect, found in _point_records(outcomes, method):
        if "kind" in defect:
            entry = counts.setdefault(str(defect["kind"]), [0, 0])
            entry[0] += int(found)
            entry[1] += 1
    return {kind: {"found": found, "total": total, "recall": found / total} for kind, (found, total) in sorted(counts.items())}


def _pixel_summary(outcomes: Sequence[PairOutcome], method: str, fpr_limit: float) -> dict[str, Any]:
    with_mask = [outcome for outcome in outcomes if outcome.mask is not None]
    if not with_mask:
        nan = float("nan")
        return {"pixel_auroc": nan, "aupro": nan, "f1_max": nan, "roc": ([], []), "pro": ([], [])}
    scores = np.concatenate([outcome.methods[method].defect_map.ravel() for outcome in with_mask])
    labels = np.concatenate([outcome.mask.ravel() for outcome in with_mask])
    fpr, tpr, _ = metrics.roc_curve(scores, labels)
    pro_fpr, pro = pooled_pro_curve([outcome.methods[method].defect_map for outcome in with_mask], [outcome.mask for outcome in with_mask])
    return {
        # The area of the ROC curve already at hand equals metrics.auroc.
        "pixel_auroc": area_up_to(fpr, tpr, 1.0),
        "aupro": area_up_to(pro_fpr, pro, fpr_limit),
        "f1_max": metrics.f1_max(scores, labels),
        "roc": thin_curve(fpr, tpr),
        "pro": thin_curve(pro_fpr, pro),
    }


def summarize_method(outcomes: Sequence[PairOutcome], method: str, *, fpr_limit: float = 0.3) -> dict[str, Any]:
    """Aggregate one method's results over the pairs it ran on.

    Args:
      outcomes: Pair outcomes; those without ``method`` are skipped.
      method: Method name.
      fpr_limit: FPR limit of the AUPRO.

    Returns:
      A JSON-serialisable dict with these keys:

      * the totals of ``tsjax.metrics.summarize_matches`` (``num_pairs``,
        ``found``, ``missed``, ``false_positives``, ``recall``,
        ``precision``, ...);
      * ``defect_free_pairs`` and ``defect_free_pairs_with_fp`` (defect-free
        pairs with at least one blob);
      * the pooled ``pixel_auroc``, ``aupro`` and ``f1_max``, NaN without
        masks;
      * ``image_auroc``, NaN unless both defective and defect-free pairs
        are present;
      * ``seconds_per_pair``, the mean without shared work, and ``pairs``,
        the names;
      * thinned curves ``roc`` and ``pro`` as
        ``{"fpr": [...], "value": [...]}``.

    Raises:
      ValueError: if no outcome includes ``method``.
    """
    ran = [outcome for outcome in outcomes if method in outcome.methods]
    if not ran:
        raise ValueError(f"no pair outcome includes method {method!r}; run it first.")
    summary: dict[str, Any] = dict(metrics.summarize_matches([outcome.methods[method].match for outcome in ran]))
    defect_free = [outcome for outcome in ran if not outcome.is_defective]
    summary["defect_free_pairs"] = len(defect_free)
    summary["defect_free_pairs_with_fp"] = sum(outcome.methods[method].match["num_blobs"] > 0 for outcome in defect_free)
    pixel = _pixel_summary(ran, method, fpr_limit)
    summary.update({key: pixel[key] for key in ("pixel_auroc", "aupro", "f1_max")})
    image_scores = np.array([outcome.methods[method].image_score for outcome in ran])
    image_labels = np.array([outcome.is_defective for outcome in ran])
    summary["image_auroc"] = metrics.image_auroc(image_scores, image_labels)
    summary["seconds_per_pair"] = float(np.mean([outcome.methods[method].seconds for outcome in ran]))
    summary["pairs"] = [outcome.name for outcome in ran]
    for curve in ("roc", "pro"):
        curve_fpr, values = pixel[curve]
        summary[curve] = {"fpr": [float(v) for v in curve_fpr], "value": [float(v) for v in values]}
    return summary


def _pair_rows(outcomes: Sequence[PairOutcome]) -> list[dict[str, Any]]:
    rows = []
    for outcome in outcomes:
        for method, result in outcome.methods.items():
            rows.append(
                {
                    "pair": outcome.name,
                    "method": method,
                    "points": len(outcome.points),
                    "found": result.match["found"],
                    "missed": result.match["missed"],
                    "false_positives": result.match["false_positives"],
                    "blobs": result.match["num_blobs"],
                    "localisation_error_px": result.match["mean_localisation_error_px"],
                    "image_score": result.image_score,
                    "threshold": result.threshold,
                    **result.pixel_metrics,
                    "seconds": result.seconds,
                    "shared_seconds": outcome.shared_seconds,
                    "shift_dy": outcome.alignment["shift"][0],
                    "shift_dx": outcome.alignment["shift"][1],
                }
            )
    return rows


def summarize_dataset(
    outcomes: Sequence[PairOutcome],
    methods: Sequence[Any],
    *,
    fpr_limit: float = 0.3,
    contrast_edges: Sequence[float] = (),
    size_edges: Sequence[float] = (),
) -> dict[str, Any]:
    """Aggregate every method over a dataset, plus the pairs that slower methods ran on.

    Args:
      outcomes: All pair outcomes of the dataset.
      methods: The ``tsjax.methods.Method`` objects, in table order.
      fpr_limit: FPR limit of the AUPRO.
      contrast_edges: Bin edges of the recall against absolute contrast;
        empty skips it.
      size_edges: Bin edges of the recall against size in px; empty skips it.

    Returns:
      A JSON-serialisable dict with these keys:

      * ``num_pairs``, ``num_points``, ``defect_free_pairs``, ``has_masks``
        and ``fpr_limit``;
      * ``methods``: per method, ``name``, ``description``, ``summary`` (from
        ``summarize_method``), ``recall_by_contrast``, ``recall_by_size`` and
        ``recall_by_kind``;
      * ``subsets``: for each smaller set of pairs that a method ran on, the
        ``pairs`` and every method's summary on them, so that slow methods
        are compared on equal terms;
      * ``pair_rows``: one row per pair and method.
    """
    entries = []
    for method in methods:
        entry = {
            "name": method.name,
            "description": method.description,
            "summary": summarize_method(outcomes, method.name, fpr_limit=fpr_limit),
        }
        if contrast_edges:
            entry["recall_by_contrast"] = recall_by_bins(outcomes, method.name, "contrast", contrast_edges)
        if size_edges:
            entry["recall_by_size"] = recall_by_bins(outcomes, method.name, "size_px", size_edges)
        entry["recall_by_kind"] = recall_by_kind(outcomes, method.name)
        entries.append(entry)

    subsets = []
    all_names = [outcome.name for outcome in outcomes]
    for names in sorted({tuple(entry["summary"]["pairs"]) for entry in entries}, key=len):
        if list(names) == all_names:
            continue
        chosen = [outcome for outcome in outcomes if outcome.name in set(names)]
        ran_on_all = [method.name for method in methods if all(method.name in outcome.methods for outcome in chosen)]
        subsets.append(
            {
                "pairs": list(names),
                "methods": {name: summarize_method(chosen, name, fpr_limit=fpr_limit) for name in ran_on_all},
            }
        )
    return {
        "num_pairs": len(outcomes),
        "num_points": int(sum(len(outcome.points) for outcome in outcomes)),
        "defect_free_pairs": sum(not outcome.is_defective for outcome in outcomes),
        "has_masks": any(outcome.mask is not None for outcome in outcomes),
        "fpr_limit": fpr_limit,
        "methods": entries,
        "subsets": subsets,
        "pair_rows": _pair_rows(outcomes),
    }
