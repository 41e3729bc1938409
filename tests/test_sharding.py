"""Tests for sharding batches of pairs over several (simulated) devices."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tsjax import sharding

TESTS_DIR = Path(__file__).resolve().parent

# Runs in a fresh interpreter, because XLA reads the simulated device count
# once, when JAX starts. Prints one JSON line with what the test checks.
_SHARDED_RUN = r"""
import json, sys
import numpy as np
import jax
sys.path.insert(0, sys.argv[1])
from conftest import render_manhattan
from tsjax import batch, sharding, teacher
from tsjax.config import DetectionConfig

variables = teacher.load_pretrained(sys.argv[2], last_layer="layer1")
config = DetectionConfig(layers=("layer1",))
references, inspected = [], []
for seed in range(4):
    rng = np.random.default_rng(seed)
    shape = (128, 160)
    reference = render_manhattan(shape, seed=seed) + 0.02 * rng.normal(size=shape)
    target = render_manhattan(shape, seed=seed, shift=(1.5, -2.2)) + 0.02 * rng.normal(size=shape)
    target[58:64, 78:84] = 1.0
    references.append(np.clip(reference, 0, 1).astype(np.float32))
    inspected.append(np.clip(target, 0, 1).astype(np.float32))

mesh = sharding.pair_mesh()
single = batch.detect_batch(references, inspected, variables, config)
sharded = batch.detect_batch(references, inspected, variables, config, mesh=mesh)

pairs = batch.prepare_batch(references, inspected, (128, 160))
arrays = sharding.shard_pairs((pairs.references, pairs.inspected, pairs.sizes), mesh)
alignment = batch.align_stage(*arrays, exact=True, mesh=mesh)
print(json.dumps({
    "devices": len(jax.devices()),
    "map_difference": max(float(np.abs(a.defect_map - b.defect_map).max()) for a, b in zip(single, sharded)),
    "same_shifts": all(a.alignment.shift == b.alignment.shift for a, b in zip(single, sharded)),
    "same_blobs": all(
        [x["bbox"] for x in a.blobs] == [x["bbox"] for x in b.blobs] for a, b in zip(single, sharded)
    ),
    "blob_counts": [len(b.blobs) for b in sharded],
    "shift_devices": len(alignment.shift.sharding.device_set),
    "shift_split_over_pairs": alignment.shift.sharding.spec == jax.sharding.PartitionSpec("pairs"),
}))
"""


def test_sharded_batch_equals_single_device(shared_dir):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    weights = shared_dir / "weights" / "resnet18_imagenet_bnfolded"

    completed = subprocess.run(
        [sys.executable, "-c", _SHARDED_RUN, str(TESTS_DIR), str(weights)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    # Each device computes whole pairs with the single-device code; XLA may
    # order sums differently, which moved the maps by ~2e-6 when measured.
    assert result["map_difference"] < 1e-4
    assert result["same_shifts"]
    assert result["same_blobs"]
    # The planted defect is found in some pairs, so the compared blob lists
    # are not all empty.
    assert sum(result["blob_counts"]) >= 1
    # The alignment stays split over the four devices rather than gathered.
    assert result["shift_devices"] == 4
    assert result["shift_split_over_pairs"]


def test_shard_pairs_rejects_indivisible_batch():
    class TwoDeviceMesh:
        # shard_pairs checks the batch against mesh.size before placing anything.
        size = 2

    with pytest.raises(ValueError, match="3 pairs does not split over 2 devices"):
        sharding.shard_pairs([np.zeros((3, 2))], TwoDeviceMesh())


def test_pair_mesh_rejects_empty_device_list():
    with pytest.raises(ValueError, match="empty"):
        sharding.pair_mesh([])
