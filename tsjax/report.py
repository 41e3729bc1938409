"""Writing a detection to disk: maps, figures and a JSON record."""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Mapping

import matplotlib

matplotlib.use("Agg")  # Figures are written to files; no display is needed.
import imageio.v3 as iio  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from skimage import measure  # noqa: E402

from tsjax.pipeline import Detection  # noqa: E402

__all__ = ["OUTPUT_FILES", "FIGURE_FILES", "check_output_dir", "write_detection"]

# Files that a run writes besides the per-layer heatmaps ``r2_<layer>.png``.
OUTPUT_FILES = ("defect_map.png", "defect_map.npy", "mask.png", "overlay.png", "detections.json")
# The files of OUTPUT_FILES that only write_detection(..., figures=True) draws.
FIGURE_FILES = ("defect_map.png", "overlay.png")


def _layer_heatmaps(output_dir: str) -> list[str]:
    """List the ``r2_<layer>.png`` files in ``output_dir``."""
    return sorted(glob.glob(os.path.join(glob.escape(output_dir), "r2_*.png")))


def _earlier_outputs(output_dir: str) -> list[str]:
    """List the files in ``output_dir`` whose names a run writes."""
    names = [os.path.join(output_dir, name) for name in OUTPUT_FILES]
    return [path for path in names if os.path.exists(path)] + _layer_heatmaps(output_dir)


def check_output_dir(output_dir: str, *, overwrite: bool) -> None:
    """Reject ``output_dir`` if it is a file or already contains files that a run writes.

    The folder itself is created by ``write_detection``, so a run that fails
    before it leaves nothing behind.

    Raises:
      FileExistsError: if ``output_dir`` is a file, or contains any output
        file name (``OUTPUT_FILES``, ``r2_<layer>.png``) and ``overwrite`` is
        false.
    """
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise FileExistsError(
            f"output folder {output_dir!r} is a file, not a folder; choose another --output_dir."
        )
    existing = _earlier_outputs(output_dir) if os.path.isdir(output_dir) else []
    if existing and not overwrite:
        listed = ", ".join(os.path.basename(path) for path in existing[:4])
        more = f" and {len(existing) - 4} more" if len(existing) > 4 else ""
        raise FileExistsError(
            f"{output_dir!r} already contains output files ({listed}{more}); "
            "choose another --output_dir or pass --overwrite to replace them."
        )


def _save_heatmap(path: str, values: np.ndarray, valid: np.ndarray, title: str, vmin: float, vmax: float) -> None:
    figure, axis = plt.subplots(figsize=(6, 6 * values.shape[0] / values.shape[1] + 0.6))
    shown = np.ma.masked_where(~valid, values)
    image = axis.imshow(shown, cmap="magma", vmin=vmin, vmax=vmax, interpolation="nearest")
    axis.set_title(title)
    axis.set_axis_off()
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def _save_overlay(path: str, inspected: np.ndarray, detection: Detection) -> None:
    figure, axis = plt.subplots(figsize=(8, 8 * inspected.shape[0] / inspected.shape[1]))
    axis.imshow(inspected, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    labels = measure.label(detection.mask, connectivity=2)
    for contour in measure.find_contours(labels > 0, 0.5):
        axis.plot(contour[:, 1], contour[:, 0], color="red", linewidth=1.2)
    for blob in detection.blobs:
        x0, y0, x1, y1 = blob["bbox"]
        axis.text(
            x1 + 2, y0, str(blob["id"]), color="yellow", fontsize=11, fontweight="bold", va="top"
        )
    invalid = np.ma.masked_where(detection.valid, np.ones(inspected.shape))
    axis.imshow(invalid, cmap="Blues", alpha=0.25, vmin=0, vmax=1)
    axis.set_title(f"{len(detection.blobs)} blob(s); shaded: not compared")
    axis.set_axis_off()
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)


def _save_figures(output_dir: str, inspected: np.ndarray, detection: Detection) -> None:
    """Draw the ``r2_<layer>.png`` heatmaps, ``defect_map.png`` and ``overlay.png``."""
    for layer, layer_map in detection.layer_maps.items():
        _save_heatmap(
            os.path.join(output_dir, f"r2_{layer}.png"),
            1.0 - layer_map,
            detection.valid,
            f"R² of the student prediction, {layer}",
            0.0,
            1.0,
        )
    _save_heatmap(
        os.path.join(output_dir, "defect_map.png"),
        detection.defect_map,
        detection.valid,
        f"defect map D (threshold {detection.threshold.value:.3f})",
        0.0,
        1.0,
    )
    _save_overlay(os.path.join(output_dir, "overlay.png"), inspected, detection)


def write_detection(
    output_dir: str,
    inspected: np.ndarray,
    detection: Detection,
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None = None,
    *,
    figures: bool = True,
) -> dict:
    """Write the maps, figures and ``detections.json`` of one run.

    Files: ``r2_<layer>.png`` (per-layer ``R^2 = 1 - D``), ``defect_map.png``
    and ``defect_map.npy`` (``[H, W]`` float32), ``mask.png``, ``overlay.png``
    (inspected image with numbered blob outlines) and ``detections.json``.
    Output files of an earlier run that this run does not write (heatmaps of
    other layers, or every figure when ``figures`` is false) are removed, so
    the folder describes one run only; call ``check_output_dir`` first to
    protect an earlier run.

    Args:
      output_dir: Output folder, created if missing.
      inspected: ``[H, W]`` inspected image in [0, 1].
      detection: The result of ``tsjax.pipeline.detect``.
      config: Every setting of the run, recorded in the JSON.
      extra: More JSON-serialisable fields to record (teacher weights,
        timings of stages outside ``detect``).
      figures: Draw the heatmaps and the overlay. For a 480 px pair they
        took about 0.5 s on 2 CPU cores, twice the pair's detection time in
        a batch, so runs over many pairs may leave them out and keep
        ``defect_map.npy``, ``mask.png`` and the JSON.

    Returns:
      The dict written to ``detections.json``.
    """
    os.makedirs(output_dir, exist_ok=True)
    written = {os.path.join(output_dir, f"r2_{layer}.png") for layer in detection.layer_maps} if figures else set()
    stale = _layer_heatmaps(output_dir) + ([] if figures else [os.path.join(output_dir, name) for name in FIGURE_FILES])
    for path in stale:
        if path not in written and os.path.exists(path):
            os.remove(path)
    np.save(os.path.join(output_dir, "defect_map.npy"), detection.defect_map)
    # An 8-bit grayscale PNG (0 or 255), which image tools read as a mask.
    iio.imwrite(os.path.join(output_dir, "mask.png"), detection.mask.astype(np.uint8) * 255)
    if figures:
        _save_figures(output_dir, inspected, detection)

    record = {
        "shift": [float(value) for value in detection.alignment.shift],
        "alignment": detection.alignment.summary(),
        # Share of the inspected image that was fitted and scored. It is
        # below alignment.valid_fraction (the overlap of the shift alone)
        # when the reference is smaller than the inspected image.
        "compared_fraction": float(detection.valid.mean()),
        "threshold": detection.threshold.summary(),
        "blobs": detection.blobs,
        "config": dict(config),
        "timings_s": dict(detection.timings_s),
    }
    for key, value in (extra or {}).items():
        if key == "timings_s":
            record["timings_s"].update(value)
        else:
            record[key] = value
    with open(os.path.join(output_dir, "detections.json"), "w") as handle:
        json.dump(record, handle, indent=2)
    return record
