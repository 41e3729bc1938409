"""experiments/run_batch.py as a user runs it: a CSV pair list in, one folder per pair and a summary out."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run_batch(*flags):
    command = [sys.executable, "-m", "experiments.run_batch", *[str(flag) for flag in flags]]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)


def _write_pairs(path, rows, header=("reference", "inspected", "name")):
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)


def _summary(output_dir):
    with open(output_dir / "summary.csv", newline="") as handle:
        return {row["name"]: row for row in csv.DictReader(handle)}


def _listed_defects(shared_dir, case):
    with open(shared_dir / "data" / "wafer" / "defects.json") as handle:
        return [(defect["x"], defect["y"]) for defect in json.load(handle)["cases"][case]["defects"]]


def _assert_blobs_on_defects(record, defects):
    # As many blobs as listed defects, and a blob centre within 8 px of each defect.
    centres = np.array([(blob["x"], blob["y"]) for blob in record["blobs"]], float)
    assert len(centres) == len(defects), record["blobs"]
    for defect in defects:
        assert np.min(np.hypot(*(centres - np.array(defect, float)).T)) < 8.0, (defect, centres)


def _case_row(shared_dir, case, name=None):
    folder = shared_dir / "data" / "wafer"
    return [folder / f"{case}_reference_image.tif", folder / f"{case}_inspected_image.tif", name or case]


def test_batch_run_failures_and_resume(shared_dir, tmp_path):
    pairs = tmp_path / "pairs.csv"
    # The broken pair's paths are relative, so they are read from the CSV's folder.
    # Column names match without regard to case.
    _write_pairs(
        pairs,
        [_case_row(shared_dir, "case2"), _case_row(shared_dir, "case3"), ["gone.tif", "gone2.tif", "broken"]],
        header=("Reference", "Inspected", "Name"),
    )
    output_dir = tmp_path / "out"
    weights = f"--teacher_weights={shared_dir / 'weights' / 'resnet18_imagenet_bnfolded'}"

    result = _run_batch(f"--pairs={pairs}", f"--output_dir={output_dir}", weights, "--batch_size=2")

    assert result.returncode == 1, result.stderr[-3000:]
    assert "3 pair(s): 2 ok (1 with blobs), 1 failed" in result.stderr
    rows = _summary(output_dir)
    assert list(rows) == ["case2", "case3", "broken"]
    assert rows["case2"]["status"] == "ok"
    assert int(rows["case2"]["blobs"]) == 3
    assert rows["case3"]["status"] == "ok"
    assert int(rows["case3"]["blobs"]) == 0
    assert rows["broken"]["status"] == "failed"
    assert str(tmp_path / "gone.tif") in rows["broken"]["error"]
    case2 = json.loads((output_dir / "pairs" / "case2" / "detections.json").read_text())
    _assert_blobs_on_defects(case2, _listed_defects(shared_dir, "case2"))
    assert case2["tiled"] is False
    assert float(rows["case2"]["max_score"]) == pytest.approx(case2["max_score"], abs=1e-4)
    # --figures=flagged (the default) draws figures only for the pair with blobs.
    assert (output_dir / "pairs" / "case2" / "overlay.png").is_file()
    assert not (output_dir / "pairs" / "case3" / "overlay.png").exists()
    assert (output_dir / "pairs" / "case3" / "defect_map.npy").is_file()
    assert not (output_dir / "pairs" / "broken").exists()

    summary_before = (output_dir / "summary.csv").read_bytes()
    json_mtime = os.stat(output_dir / "pairs" / "case2" / "detections.json").st_mtime_ns
    rejected = _run_batch(f"--pairs={pairs}", f"--output_dir={output_dir}", weights)
    assert rejected.returncode == 1
    assert "--resume" in rejected.stderr
    assert "--overwrite" in rejected.stderr
    assert (output_dir / "summary.csv").read_bytes() == summary_before

    resumed = _run_batch(f"--pairs={pairs}", f"--output_dir={output_dir}", weights, "--resume")
    assert resumed.returncode == 1, resumed.stderr[-3000:]
    assert "resume: 2 pair(s) finished earlier, 1 to run" in resumed.stderr
    assert os.stat(output_dir / "pairs" / "case2" / "detections.json").st_mtime_ns == json_mtime
    assert _summary(output_dir) == rows


def test_large_pair_is_tiled(shared_dir, tmp_path):
    pairs = tmp_path / "pairs.csv"
    _write_pairs(pairs, [_case_row(shared_dir, "case2")])
    output_dir = tmp_path / "out"

    result = _run_batch(
        f"--pairs={pairs}",
        f"--output_dir={output_dir}",
        f"--teacher_weights={shared_dir / 'weights' / 'resnet18_imagenet_bnfolded'}",
        "--tile_above=400",
        "--tile_size=256",
        "--figures=none",
    )

    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((output_dir / "pairs" / "case2" / "detections.json").read_text())
    assert record["tiled"] is True
    _assert_blobs_on_defects(record, _listed_defects(shared_dir, "case2"))
    assert sorted(os.listdir(output_dir / "pairs" / "case2")) == ["defect_map.npy", "detections.json", "mask.png"]


@pytest.mark.parametrize(
    "header, rows, message",
    [
        (("ref", "insp"), [["a.tif", "b.tif"]], "lacks reference, inspected"),
        (("reference", "inspected"), [["a/x.tif", "x.tif"], ["b/x.tif", "x.tif"]], "rows 2 and 3 both have the name 'x'"),
        (("reference", "inspected", "name"), [["a.tif", "b.tif", "../escape"]], "cannot be a folder name"),
        (("reference", "inspected"), [["a.tif", ""]], "row 2: reference and inspected must both be given"),
        (("reference", "inspected"), [], "lists no pairs"),
        (("reference;inspected",), [["a.tif;b.tif"]], "Columns must be separated by commas."),
    ],
)
def test_invalid_pair_list_rejected(tmp_path, header, rows, message):
    pairs = tmp_path / "pairs.csv"
    _write_pairs(pairs, rows, header)

    result = _run_batch(f"--pairs={pairs}", f"--output_dir={tmp_path / 'out'}")

    assert result.returncode == 1
    assert message in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "out").exists()
