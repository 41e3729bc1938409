"""End-to-end test of experiments.train followed by experiments.run --student_checkpoint.

Both scripts run as subprocesses on the real case3 pair, which has no
defects, and the ImageNet teacher weights read in place beside the
repository. The ridge student fits in a fraction of a second, so the whole
file took about 30 s on a 2-core CPU machine.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import require_shared
from tsjax import teacher

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "data/wafer/case3_reference_image.tif"
INSPECTED = "data/wafer/case3_inspected_image.tif"
WEIGHTS = "weights/resnet18_imagenet_bnfolded"


def _run_module(module: str, *flags: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *flags]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)


def _pair_flags() -> list[str]:
    return [f"--reference={require_shared(REFERENCE)}", f"--inspected={require_shared(INSPECTED)}"]


def _training_flags() -> list[str]:
    return [
        f"--train_reference={require_shared(REFERENCE)}",
        f"--train_inspected={require_shared(INSPECTED)}",
        f"--teacher_weights={require_shared(WEIGHTS)}",
        "--student=ridge",
    ]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory) -> Path:
    """A ridge student trained by experiments.train on the case3 pair."""
    directory = tmp_path_factory.mktemp("checkpoint")
    result = _run_module("experiments.train", *_training_flags(), f"--checkpoint_dir={directory}")
    assert result.returncode == 0, result.stderr[-3000:]
    return directory


def test_train_writes_teacher_hash_and_settings(checkpoint_dir, teacher_variables):
    metadata = json.loads((checkpoint_dir / "student.json").read_text())

    assert (checkpoint_dir / "states").is_dir()
    assert metadata["teacher_sha256"] == teacher.variables_sha256(teacher_variables)
    assert metadata["student"] == "ridge"
    assert metadata["hyperparameters"]["name"] == "ridge"
    assert metadata["layers"] == ["layer1", "layer2"]
    assert metadata["patch_size"] == 3
    assert metadata["training"]["train_reference"] == [str(require_shared(REFERENCE))]
    # case3 is 480 x 480 px: layer1 has stride 4 and 64 channels.
    assert metadata["fit_shapes"]["layer1"]["ref"] == [1, 120, 120, 64]


def test_checkpoint_run_matches_fitted_run(checkpoint_dir, tmp_path):
    loaded_dir = tmp_path / "loaded"
    fitted_dir = tmp_path / "fitted"

    loaded = _run_module(
        "experiments.run",
        *_pair_flags(),
        f"--teacher_weights={require_shared(WEIGHTS)}",
        f"--student_checkpoint={checkpoint_dir}",
        f"--output_dir={loaded_dir}",
    )
    fitted = _run_module("experiments.run", *_pair_flags(), *_training_flags(), f"--output_dir={fitted_dir}")

    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert fitted.returncode == 0, fitted.stderr[-3000:]
    assert f"student: loaded ridge from {checkpoint_dir}" in loaded.stderr
    record = json.loads((loaded_dir / "detections.json").read_text())
    metadata = json.loads((checkpoint_dir / "student.json").read_text())
    assert record["student_checkpoint"] == str(checkpoint_dir)
    assert record["student"] == "ridge"
    assert record["teacher"]["sha256"] == metadata["teacher_sha256"]
    # case3 is defect-free, so a well-fitted student leaves no blob.
    assert record["blobs"] == []
    # The saved states are the ones experiments.run fits from the same pair
    # and seed, so the two defect maps agree.
    loaded_map = np.load(loaded_dir / "defect_map.npy")
    fitted_map = np.load(fitted_dir / "defect_map.npy")
    assert loaded_map.shape == (480, 480)
    np.testing.assert_allclose(loaded_map, fitted_map, rtol=0, atol=1e-6)


def test_run_rejects_other_patch_size(checkpoint_dir, tmp_path):
    output_dir = tmp_path / "rejected"

    result = _run_module(
        "experiments.run",
        *_pair_flags(),
        f"--teacher_weights={require_shared(WEIGHTS)}",
        f"--student_checkpoint={checkpoint_dir}",
        f"--output_dir={output_dir}",
        "--patch_size=5",
    )

    assert result.returncode != 0
    assert "patch_size: checkpoint 3, this run 5" in result.stderr
    assert not (output_dir / "detections.json").exists()
