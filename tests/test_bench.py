"""Tests for the throughput benchmark script (experiments/bench.py)."""

import pytest

from experiments import bench
from conftest import require_shared


def test_command_lists_weights_and_changed_flags():
    config = {"teacher_weights": "w", "batches": (1, 2), "repeats": 3, "memory_sizes": (), "json_out": None}

    command = bench._command(config)

    assert command == "python -m experiments.bench --teacher_weights=w --batches=1,2 --memory_sizes="


def test_load_remark_only_above_core_count():
    assert bench._load_remark(1.5, 2) == "."
    assert "other processes shared the machine" in bench._load_remark(2.5, 2)


def test_small_run_writes_tables(tmp_path):
    # One batch row and one size row of 128 px: the script runs end to end
    # and the Markdown names the command that produced it.
    weights = str(require_shared("weights/resnet18_imagenet_bnfolded"))
    out = tmp_path / "bench.md"
    out.write_text("# Benchmarks\n\n## Pipeline throughput\n\nstale table\n\n## Later section\n\nkept\n")
    config = bench.BenchConfig(
        teacher_weights=weights,
        batches=(1,),
        batch_image_size=128,
        sizes=(128,),
        untiled_max_size=128,
        numpy_max_size=128,
        tile_size=128,
        tile_batch=4,
        repeats=1,
        large_repeats=1,
        defect_size=0,
        equality_size=0,
        equality_tile_size=64,
        memory_sizes=(),
        markdown_out=str(out),
        json_out=None,
    )

    results = bench.run_benchmark(config)

    text = out.read_text()
    assert f"--teacher_weights={weights}" in text
    assert "--batches=1 --batch_image_size=128 --sizes=128" in text
    assert "| JAX batch | 1 |" in text
    assert "| 128 | JAX tiled |" in text
    assert "stale table" not in text
    assert "## Later section\n\nkept" in text
    assert results["batch_rows"][0]["pairs_per_s"] > 0
