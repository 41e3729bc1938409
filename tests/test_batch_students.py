"""detect_batch with students other than ridge, run in a child process so that a hang fails the test."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Two 192 x 224 px crops of synthetic pairs in one batch, each compared with
# pipeline.detect on the same pair and student. The crops fill their bucket,
# because padding would change the MLP's random draws (see docs/scaling.md).
_SCRIPT = """
import json, sys
import numpy as np
import tsjax
from tsjax import batch, pipeline, synth
from tsjax.config import DetectionConfig
from tsjax.students import make_student

variables = tsjax.load_pretrained(sys.argv[1])
config = DetectionConfig()
student = make_student(sys.argv[2], patch_size=config.patch_size, alpha=config.alpha, options={})
pairs = []
for seed in (3, 4):
    pair = synth.make_pair(seed)
    pairs.append((pair.reference[:192, :224], pair.inspected[:192, :224]))
results = batch.detect_batch(
    [r for r, _ in pairs], [i for _, i in pairs], variables, config, student=student, batch_size=2
)
differences = []
for (reference, inspected), result in zip(pairs, results):
    expected = pipeline.detect(reference, inspected, variables, config, student=student)
    differences.append(float(np.abs(result.defect_map - expected.defect_map).max()))
print(json.dumps({"differences": differences}))
"""


@pytest.mark.parametrize("student", ["local_ridge", "mlp"])
def test_batch_of_two_matches_detect(shared_dir, student):
    weights = shared_dir / "weights" / "resnet18_imagenet_bnfolded"

    # Two local ridge pairs vmapped together once deadlocked XLA's CPU
    # runtime, so a timeout here means a hang.
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(weights), student],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr[-3000:]
    differences = json.loads(result.stdout.strip().splitlines()[-1])["differences"]
    assert len(differences) == 2
    assert max(differences) < 1e-4
