"""The per-student flagfiles in experiments/, run as a user runs them, on the real pairs.

Each run is ``python -m experiments.run --flagfile=experiments/<case>_<student>.flags``
with the output folder moved to a temporary one. Its ``detections.json`` must
put a blob within 10 px of every listed case2 defect, and no blob on case3.
The global ridge student's flagfiles (case2.flags and case3.flags) are
checked by test_pipeline.py.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT

HIT_RADIUS_PX = 10.0


def _run(flagfile: str, output_dir) -> dict:
    command = [sys.executable, "-m", "experiments.run", f"--flagfile={flagfile}", f"--output_dir={output_dir}"]
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((output_dir / "detections.json").read_text())


@pytest.mark.parametrize("student", ["local_ridge", "mlp"])
def test_student_flagfile_finds_case2_defects(student, wafer_cases, tmp_path):
    flagfile = f"experiments/case2_{student}.flags"

    detections = _run(flagfile, tmp_path / "out")

    assert detections["student"] == student
    defects = wafer_cases["case2"]["defects"]
    assert len(defects) == 3
    for defect in defects:
        distances = [np.hypot(blob["x"] - defect["x"], blob["y"] - defect["y"]) for blob in detections["blobs"]]
        assert distances, f"{flagfile}: no blob at all"
        assert min(distances) <= HIT_RADIUS_PX, f"{flagfile}: no blob within {HIT_RADIUS_PX} px of {defect}"


@pytest.mark.parametrize("student", ["local_ridge", "mlp"])
def test_student_flagfile_finds_nothing_on_case3(student, wafer_cases, tmp_path):
    flagfile = f"experiments/case3_{student}.flags"

    detections = _run(flagfile, tmp_path / "out")

    assert detections["student"] == student
    assert detections["blobs"] == []
