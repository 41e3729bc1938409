"""Tests for the throughput benchmark script (experiments/bench.py), run as a user runs it."""

import subprocess
import sys
from pathlib import Path

from conftest import require_shared

REPOSITORY = Path(__file__).resolve().parents[1]


def test_small_run_writes_tables(tmp_path):
    # A fresh interpreter, because the script defines absl flags that other
    # scripts define too. Every flag differs from its default, so the
    # Markdown's Run line must list them all.
    weights = str(require_shared("weights/resnet18_imagenet_bnfolded"))
    out = tmp_path / "bench.md"
    out.write_text("# Benchmarks\n\n## Pipeline throughput\n\nstale table\n\n## Later section\n\nkept\n")
    flags = [
        f"--teacher_weights={weights}",
        "--batches=1",
        "--batch_image_size=128",
        "--sizes=128",
        "--untiled_max_size=128",
        "--numpy_max_size=128",
        "--tile_size=128",
        "--repeats=1",
        "--defect_size=0",
        "--equality_size=0",
        "--memory_sizes=",
        f"--markdown_out={out}",
    ]

    run = subprocess.run(
        [sys.executable, "-m", "experiments.bench", *flags], cwd=REPOSITORY, capture_output=True, text=True, timeout=600
    )

    assert run.returncode == 0, run.stderr[-2000:]
    text = out.read_text()
    expected_command = "python -m experiments.bench " + " ".join(flags)
    assert f"Run: `{expected_command}`" in text
    assert "| JAX batch | 1 |" in text
    assert "| 128 | JAX tiled |" in text
    assert "stale table" not in text
    assert "## Later section\n\nkept" in text
