"""End-to-end tests of detect() and the runner with the ImageNet teacher."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tsjax import io
from tsjax.config import DetectionConfig
from tsjax.pipeline import detect

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = (128, 160)
SHIFT = (3.4, -2.2)

# A blob counts as finding a defect when its centroid lies this close to the
# defect's marked centre. The blobs found on the real defects span 13 to 22 px.
HIT_RADIUS_PX = 10.0


def _noisy(image, seed):
    rng = np.random.default_rng(seed)
    return np.clip(image + rng.normal(0.0, 0.02, image.shape), 0.0, 1.0).astype(np.float32)


def _distance_to_nearest_blob(blobs, x, y):
    return min(np.hypot(blob["x"] - x, blob["y"] - y) for blob in blobs)


def _load_case(shared_dir, case):
    folder = shared_dir / "data" / "wafer"
    return io.load_image(folder / case["reference"]), io.load_image(folder / case["inspected"])


def test_detect_identical_pair_scores_zero(manhattan, teacher_variables):
    image = _noisy(manhattan(SHAPE), 0)

    detection = detect(image, image.copy(), teacher_variables)

    # The student maps identical features onto themselves up to the ridge
    # shrinkage, so D is tiny. The measured maximum is 3e-5, while the
    # planted defect below scores 0.6.
    assert detection.alignment.shift == (0.0, 0.0)
    assert float(detection.defect_map.max()) < 1e-3
    assert detection.blobs == []
    assert not detection.mask.any()


def test_detect_finds_pasted_defect(manhattan, teacher_variables):
    reference = _noisy(manhattan(SHAPE), 1)
    inspected = manhattan(SHAPE, shift=SHIFT)
    inspected[60:65, 90:95] = 1.0
    inspected = _noisy(inspected, 2)
    # A 128x160 pair has only 16x20 layer2 features, fewer than the
    # 3 * 3 * 128 inputs of the default 3x3 patch. That student can fit the
    # defect too, and it extrapolates badly next to the invalid border, so a
    # 1x1 patch (128 inputs at layer2) is used here.
    config = DetectionConfig(patch_size=1)

    detection = detect(reference, inspected, teacher_variables, config)

    assert abs(detection.alignment.shift[0] - SHIFT[0]) <= 0.25
    assert abs(detection.alignment.shift[1] - SHIFT[1]) <= 0.25
    assert len(detection.blobs) == 1
    # The square covers rows 60-64 and columns 90-94, so its centre is x = 92, y = 62.
    assert _distance_to_nearest_blob(detection.blobs, 92.0, 62.0) <= HIT_RADIUS_PX


def test_detect_real_case2_finds_defects(shared_dir, wafer_cases, teacher_variables):
    case = wafer_cases["case2"]
    reference, inspected = _load_case(shared_dir, case)

    detection = detect(reference, inspected, teacher_variables)

    assert len(case["defects"]) == 3
    for defect in case["defects"]:
        distance = _distance_to_nearest_blob(detection.blobs, defect["x"], defect["y"])
        assert distance <= HIT_RADIUS_PX, f"no blob within {HIT_RADIUS_PX} px of {defect}"


def test_detect_real_case3_finds_nothing(shared_dir, wafer_cases, teacher_variables):
    reference, inspected = _load_case(shared_dir, wafer_cases["case3"])

    detection = detect(reference, inspected, teacher_variables)

    assert detection.blobs == []
    # The pair is shifted by about 20 px, which alignment must recover.
    assert np.hypot(*detection.alignment.shift) > 10.0


def test_detect_rejects_sizes_without_overlap():
    reference = _noisy(np.full((64, 64), 0.5), 3)
    inspected = _noisy(np.full((160, 160), 0.5), 4)

    # The sizes are checked before the teacher runs, so no weights are needed.
    with pytest.raises(io.ImageError, match="heights differ by a factor 2.50.*no overlap is possible"):
        detect(reference, inspected, variables={})


def test_detect_rejects_nan_reference():
    reference = _noisy(np.full(SHAPE, 0.5), 5)
    reference[10, 10] = np.nan
    inspected = _noisy(np.full(SHAPE, 0.5), 6)

    with pytest.raises(io.ImageError, match="reference: contains 1 NaN or inf value"):
        detect(reference, inspected, variables={})


def test_detect_rejects_constant_inspected():
    reference = _noisy(np.full(SHAPE, 0.5), 7)
    inspected = np.full(SHAPE, 0.5, np.float32)

    with pytest.raises(io.ImageError, match="inspected: image is constant"):
        detect(reference, inspected, variables={})


def _run_case3(output_dir, *extra_flags):
    command = [
        sys.executable,
        "-m",
        "experiments.run",
        "--flagfile=experiments/case3.flags",
        f"--output_dir={output_dir}",
        *extra_flags,
    ]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def test_runner_writes_every_output(shared_dir, tmp_path):
    output_dir = tmp_path / "case3"

    result = _run_case3(output_dir)

    assert result.returncode == 0, result.stderr[-3000:]
    expected = [
        "r2_layer1.png",
        "r2_layer2.png",
        "defect_map.png",
        "defect_map.npy",
        "mask.png",
        "overlay.png",
        "detections.json",
    ]
    for name in expected:
        assert (output_dir / name).is_file(), f"{name} missing from {output_dir}"
    record = json.loads((output_dir / "detections.json").read_text())
    for key in ("shift", "alignment", "blobs", "config", "timings_s"):
        assert key in record, f"detections.json has no {key!r}"
    assert record["blobs"] == []
    defect_map = np.load(output_dir / "defect_map.npy")
    assert defect_map.shape == (480, 480)
    assert defect_map.dtype == np.float32

    second = _run_case3(output_dir)

    assert second.returncode != 0
    assert "--overwrite" in second.stderr


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--student=local_ridge", "--student_options=window"], "--student_options entries must be key=value; got 'window'"),
        (["--student=local_ridge", "--student_options=local_alpha=-1"], "local_alpha must be >= 0; got -1.0"),
        (["--student=mean_shift"], "--student must be one of local_ridge, mlp, ridge"),
    ],
)
def test_runner_rejects_student_settings_before_loading(shared_dir, tmp_path, flags, message):
    output_dir = tmp_path / "out"

    result = _run_case3(output_dir, *flags)

    assert result.returncode != 0
    assert message in result.stderr
    # Rejected before the images load, and without printing the flag help.
    assert "load: reference" not in result.stderr
    assert "Student-specific settings as key=value" not in result.stderr
    assert not output_dir.exists()
