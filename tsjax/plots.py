"""Figures of an evaluation: ROC and PRO curves, recall against defect contrast and size, defect maps.

The curve and recall functions read the dict of
``tsjax.aggregate.summarize_dataset`` (curves already thinned), draw one
line per method and write a PNG. ``plot_pair_maps`` shows one pair's maps
side by side.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # Figures are written to files; no display is needed.
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_roc", "plot_pro", "plot_recall", "plot_pair_maps", "write_figures"]

# Baselines are drawn dashed so that they stand apart from the
# teacher–student variants.
_BASELINE_STYLE = {"abs_diff": "--", "feature_l2": ":"}


# Panels per row of a defect-map figure, so that it fits a page's width.
_MAP_COLUMNS = 3
_MAP_DPI = 60


def _style(name: str) -> str:
    return _BASELINE_STYLE.get(name, "-")


def _save(figure: plt.Figure, path: str, dpi: int = 110) -> str:
    figure.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_roc(results: Mapping[str, Any], path: str, title: str = "") -> str:
    """Draw the pooled pixel ROC curve of every method, linear and log FPR side by side.

    Returns:
      ``path``.
    """
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.4))
    for entry in results["methods"]:
        curve = entry["summary"]["roc"]
        if not curve["fpr"]:
            continue
        label = f"{entry['name']} ({entry['summary']['pixel_auroc']:.3f})"
        for axis in axes:
            axis.plot(curve["fpr"], curve["value"], _style(entry["name"]), label=label, linewidth=1.4)
    axes[0].plot([0, 1], [0, 1], color="0.7", linewidth=0.8)
    axes[1].set_xscale("log")
    axes[1].set_xlim(1e-5, 1)
    for axis in axes:
        axis.set_xlabel("false positive rate (pixels)")
        axis.set_ylabel("true positive rate (pixels)")
        axis.set_ylim(0, 1.01)
        axis.grid(alpha=0.3)
    axes[0].legend(title="method (pixel AUROC)", fontsize=8)
    figure.suptitle(title or "Pixel ROC, pooled over pairs")
    return _save(figure, path)


def plot_pro(results: Mapping[str, Any], path: str, title: str = "") -> str:
    """Draw the pooled PRO curve of every method up to twice the AUPRO's FPR limit.

    Returns:
      ``path``.
    """
    limit = results["fpr_limit"]
    figure, axis = plt.subplots(figsize=(6.5, 4.6))
    for entry in results["methods"]:
        curve = entry["summary"]["pro"]
        if not curve["fpr"]:
            continue
        label = f"{entry['name']} ({entry['summary']['aupro']:.3f})"
        axis.plot(curve["fpr"], curve["value"], _style(entry["name"]), label=label, linewidth=1.4)
    axis.axvline(limit, color="0.5", linewidth=0.8)
    axis.set_xlim(0, min(1.0, 2 * limit))
    axis.set_ylim(0, 1.01)
    axis.set_xlabel("false positive rate (pixels)")
    axis.set_ylabel("per-region overlap")
    axis.grid(alpha=0.3)
    axis.legend(title=f"method (AUPRO, FPR ≤ {limit:g})", fontsize=8)
    axis.set_title(title or "PRO curve, pooled over pairs")
    return _save(figure, path)


def plot_recall(results: Mapping[str, Any], key: str, xlabel: str, path: str, title: str = "") -> str:
    """Draw the recall per bin of a defect attribute, one line per method.

    Args:
      results: The dataset results.
      key: ``'recall_by_contrast'`` or ``'recall_by_size'``.
      xlabel: Axis label of the attribute.
      path: PNG path.
      title: Figure title.

    Returns:
      ``path``.
    """
    figure, axis = plt.subplots(figsize=(6.5, 4.6))
    with_bins = [entry for entry in results["methods"] if entry.get(key)]
    # The defect counts shown are those of the first method; a method run on
    # fewer pairs saw fewer defects.
    bins = with_bins[0][key] if with_bins else []
    for entry in with_bins:
        # Bins are drawn as evenly spaced categories, so that an open first
        # bin (from 0) needs no position on a log axis.
        positions = np.arange(len(entry[key]))
        recall = [b["recall"] for b in entry[key]]
        axis.plot(positions, recall, _style(entry["name"]) + "o", label=entry["name"], markersize=4)
    for position, entry in enumerate(bins):
        axis.annotate(f"n={entry['total']}", (position, 0.02), ha="center", fontsize=7, color="0.4")
    axis.set_xticks(np.arange(len(bins)), [f"{b['low']:g}–{b['high']:g}" for b in bins], fontsize=8)
    axis.set_ylim(0, 1.05)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("recall (defects found)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(title or f"Recall against {xlabel}")
    return _save(figure, path)


def plot_pair_maps(inspected: np.ndarray, outcome: Any, methods: Sequence[str], path: str) -> str:
    """Draw one pair's inspected image and each method's defect map with its blobs.

    The inspected image shows the annotated defect points (red crosses) and
    the outline of the ground-truth mask where there is one. Each map panel
    shows the method's blobs as boxes, cyan where a blob matches a point and
    yellow where it is a false positive, and each panel title gives the
    counts.

    Args:
      inspected: ``[H, W]`` inspected image of the pair.
      outcome: The pair's ``tsjax.evaluation.PairOutcome``.
      methods: Names of the methods to show, in panel order.
      path: PNG path.

    Returns:
      ``path``.
    """
    y0, x0, y1, x1 = outcome.region
    panels = len(methods) + 1
    columns = min(panels, _MAP_COLUMNS)
    rows = -(-panels // columns)
    height, width = y1 - y0, x1 - x0
    figure, grid = plt.subplots(
        rows, columns, figsize=(3.4 * columns, rows * (3.4 * height / width + 0.4)), squeeze=False
    )
    axes = grid.ravel()
    axes[0].imshow(inspected[y0:y1, x0:x1], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    if outcome.mask is not None and outcome.mask.any():
        axes[0].contour(outcome.mask, levels=[0.5], colors="red", linewidths=0.6)
    for x, y in outcome.points:
        axes[0].plot(x - x0, y - y0, "+", color="red", markersize=12, markeredgewidth=1.5)
    axes[0].set_title(f"{outcome.name}: {len(outcome.points)} defect(s)", fontsize=9)
    for axis, name in zip(axes[1:], methods):
        result = outcome.methods[name]
        axis.imshow(result.defect_map, cmap="magma", interpolation="nearest")
        false_positive_ids = set(result.match["false_positive_ids"])
        for blob in result.blobs:
            bx0, by0, bx1, by1 = blob["bbox"]
            color = "yellow" if blob["id"] in false_positive_ids else "cyan"
            axis.add_patch(plt.Rectangle((bx0 - x0 - 0.5, by0 - y0 - 0.5), bx1 - bx0, by1 - by0, fill=False, edgecolor=color))
        match = result.match
        axis.set_title(f"{name}: found {match['found']}/{match['num_points']}, FP {match['false_positives']}", fontsize=9)
    for axis in axes:
        axis.set_axis_off()
    figure.tight_layout()
    # Noisy maps compress poorly, so a lower resolution keeps the PNG small.
    return _save(figure, path, dpi=_MAP_DPI)


def write_figures(results: Mapping[str, Any], directory: str | os.PathLike, prefix: str = "") -> dict[str, str]:
    """Write every figure that the results support into ``directory``.

    Curves need masks and recall bins need per-defect attributes; a figure
    without data is skipped.

    Args:
      results: The dataset results.
      directory: Existing folder.
      prefix: Prefix of each file name, e.g. the dataset name.

    Returns:
      Path per figure name (``roc``, ``pro``, ``recall_contrast``,
      ``recall_size``).
    """
    directory = os.fspath(directory)
    dataset = results.get("dataset", "")
    written = {}
    if results.get("has_masks"):
        written["roc"] = plot_roc(results, os.path.join(directory, f"{prefix}roc.png"), f"{dataset}: pixel ROC, pooled")
        written["pro"] = plot_pro(results, os.path.join(directory, f"{prefix}pro.png"), f"{dataset}: PRO curve, pooled")
    for key, name, label in (
        ("recall_by_contrast", "recall_contrast", "|defect contrast| (peak intensity change)"),
        ("recall_by_size", "recall_size", "defect size (px)"),
    ):
        if any(sum(b["total"] for b in entry.get(key) or []) for entry in results["methods"]):
            written[name] = plot_recall(results, key, label, os.path.join(directory, f"{prefix}{name}.png"), f"{dataset}: recall against {label}")
    return written
