"""The custom-student example of docs/students.md, run as written.

The example promises that a new student is one class: once registered,
``make_student``, ``pipeline.detect`` and ``--student`` accept it with no
change to tsjax. These tests execute the documented code block itself, so
the page and the interface cannot drift apart.
"""

import json
import re
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, render_manhattan
from tsjax import pipeline, students

DOC = REPO_ROOT / "docs" / "students.md"


def _example_source() -> str:
    """Return the first Python block under "Writing a new student"."""
    text = DOC.read_text()
    section = text[text.index("### Writing a new student") :]
    match = re.search(r"```python\n(.*?)```", section, re.DOTALL)
    assert match, f"no Python block under 'Writing a new student' in {DOC}"
    return match.group(1)


@pytest.fixture
def example(monkeypatch):
    """The example's module, registered in a copy of the student registry."""
    monkeypatch.setattr(students, "STUDENTS", dict(students.STUDENTS))
    module = types.ModuleType("my_students")
    exec(compile(_example_source(), str(DOC), "exec"), module.__dict__)
    return module


def test_example_student_registers_by_name(example):
    student = students.make_student("mean_shift", patch_size=1, alpha=0.0)

    assert isinstance(student, example.MeanShiftStudent)
    assert students.STUDENTS["mean_shift"] is example.MeanShiftStudent


def test_example_student_predicts_shifted_reference(example):
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(1, 6, 7, 3)).astype(np.float32)
    offset = np.array([0.5, -1.0, 2.0], np.float32)
    valid = np.ones((1, 6, 7), bool)
    valid[0, 0, 0] = False
    insp = ref + offset
    insp[0, 0, 0] += 100.0  # an invalid pixel must not move the offset
    student = example.MeanShiftStudent()

    state = student.fit(ref, insp, valid, jax.random.key(0))
    prediction = np.asarray(student.predict(state, ref))

    np.testing.assert_allclose(np.asarray(state.offset), offset, atol=1e-5)
    np.testing.assert_allclose(prediction, ref + offset, atol=1e-5)


def test_example_student_runs_in_detect(example, teacher_variables):
    reference = render_manhattan((160, 160), seed=3).astype(np.float32)
    inspected = reference.copy()
    inspected[40:46, 50:56] = 1.0
    config = pipeline.DetectionConfig(layers=("layer1",))

    detection = pipeline.detect(reference, inspected, teacher_variables, config, student=example.MeanShiftStudent())

    assert detection.defect_map.shape == inspected.shape
    assert np.isfinite(detection.defect_map).all()


def test_example_wrapper_script_runs_student_flag(shared_dir, tmp_path):
    (tmp_path / "my_students.py").write_text(_example_source())
    text = DOC.read_text()
    section = text[text.index("### Writing a new student") :]
    wrapper = re.findall(r"```python\n(.*?)```", section, re.DOTALL)[1]
    (tmp_path / "my_run.py").write_text(wrapper)
    output_dir = tmp_path / "out"
    command = [
        sys.executable,
        str(tmp_path / "my_run.py"),
        "--flagfile=experiments/case3.flags",
        "--student=mean_shift",
        f"--output_dir={output_dir}",
    ]
    environment = {"PYTHONPATH": f"{tmp_path}:{REPO_ROOT}", "PATH": "/usr/bin:/bin", "JAX_PLATFORMS": "cpu"}

    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=environment)

    assert result.returncode == 0, result.stderr[-3000:]
    detections = json.loads((output_dir / "detections.json").read_text())
    assert detections["student"] == "mean_shift"
