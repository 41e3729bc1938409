"""Tests for writing a run's outputs (tsjax.report)."""

import json

import imageio.v3 as iio
import numpy as np
import pytest

from tsjax.align import Alignment
from tsjax.pipeline import Detection
from tsjax.postprocess import Threshold
from tsjax.report import check_output_dir, write_detection


def _detection(layers=("layer1", "layer2")) -> Detection:
    """A hand-made 64 x 80 px detection whose scored area is the left half."""
    shape = (64, 80)
    overlap = np.ones(shape, bool)
    overlap[:, 76:] = False
    valid = np.zeros(shape, bool)
    valid[:, :40] = True
    defect_map = np.where(valid, 0.1, 0.0).astype(np.float32)
    return Detection(
        defect_map=defect_map,
        layer_maps={layer: defect_map.copy() for layer in layers},
        mask=np.zeros(shape, bool),
        blobs=[],
        valid=valid,
        alignment=Alignment(
            shift=(0.0, 4.0),
            aligned_reference=np.zeros(shape, np.float32),
            valid=overlap,
            estimator="phase",
            correlation=0.99,
            sharpness=10.0,
            candidates={},
        ),
        threshold=Threshold(value=0.5, otsu=0.5, robust_floor=0.2, min_score=0.0, median=0.1, mad=0.0),
        timings_s={},
    )


def test_check_output_dir_rejects_any_output_name(tmp_path):
    (tmp_path / "mask.png").write_bytes(b"mine")

    with pytest.raises(FileExistsError, match="mask.png"):
        check_output_dir(str(tmp_path), overwrite=False)
    assert (tmp_path / "mask.png").read_bytes() == b"mine"


def test_check_output_dir_creates_nothing(tmp_path):
    output_dir = tmp_path / "new"

    check_output_dir(str(output_dir), overwrite=False)

    assert not output_dir.exists()


def test_overwrite_removes_stale_layer_heatmaps(tmp_path):
    inspected = np.zeros((64, 80), np.float32)
    write_detection(str(tmp_path), inspected, _detection(("layer1", "layer2", "layer3")), {})
    (tmp_path / "notes.txt").write_text("keep me")

    check_output_dir(str(tmp_path), overwrite=True)
    write_detection(str(tmp_path), inspected, _detection(), {})

    assert (tmp_path / "r2_layer1.png").is_file()
    assert not (tmp_path / "r2_layer3.png").exists()
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_record_reports_compared_fraction(tmp_path):
    detection = _detection()

    record = write_detection(str(tmp_path), np.zeros((64, 80), np.float32), detection, {})

    written = json.loads((tmp_path / "detections.json").read_text())
    assert written["compared_fraction"] == pytest.approx(0.5)
    assert record["compared_fraction"] == written["compared_fraction"]
    assert written["alignment"]["valid_fraction"] == pytest.approx(0.95)


def test_mask_png_is_8bit_grayscale(tmp_path):
    detection = _detection()
    detection.mask[10:14, 20:25] = True

    write_detection(str(tmp_path), np.zeros((64, 80), np.float32), detection, {})

    written = iio.imread(tmp_path / "mask.png")
    assert written.shape == (64, 80)
    assert written.dtype == np.uint8
    np.testing.assert_array_equal(written > 0, detection.mask)


def test_write_without_figures_removes_old(tmp_path):
    inspected = np.zeros((64, 80), np.float32)
    write_detection(str(tmp_path), inspected, _detection(), {})
    assert (tmp_path / "overlay.png").is_file()
    assert (tmp_path / "r2_layer1.png").is_file()

    record = write_detection(str(tmp_path), inspected, _detection(), {}, figures=False)

    # The earlier run's figures are removed, so the folder describes this run only.
    assert sorted(path.name for path in tmp_path.iterdir()) == ["defect_map.npy", "detections.json", "mask.png"]
    assert record["compared_fraction"] == pytest.approx(0.5)
    np.testing.assert_array_equal(np.load(tmp_path / "defect_map.npy"), _detection().defect_map)
