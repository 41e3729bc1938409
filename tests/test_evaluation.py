"""Tests for the evaluation harness: dataset reading, methods, pooled metrics, reports.

The end-to-end tests run on a 3-pair dataset of 128x128 synthetic images
written into tmp_path, so that each method compiles once for one shape.
"""

import dataclasses
import json
import math
import os

import imageio.v3 as iio
import numpy as np
import pytest
from absl import flags

from tsjax import aggregate, baselines, evaluation, evaluation_report, metrics, pipeline, plots, synth
from tsjax.config import DetectionConfig
from tsjax.evaluation import MethodOutcome, PairOutcome
from tsjax.methods import PairContext, teacher_student_method
from tsjax.students import make_student

SMALL = synth.SynthConfig(
    height_range=(128, 128),
    width_range=(128, 128),
    shift_range_px=(2.0, 6.0),
    defect_size_range_px=(4.0, 10.0),
    defect_contrast_range=(0.2, 0.5),
    defect_free_fraction=0.4,
    max_defects=2,
)


def _mixed_seed(num_pairs=3):
    """Return the first dataset seed whose pairs include defective and defect-free ones."""
    for seed in range(50):
        counts = [len(synth.make_pair(synth.pair_seed(seed, index), SMALL).defects) for index in range(num_pairs)]
        if 0 in counts and any(counts):
            return seed
    raise AssertionError("no seed in 50 gives a mixed dataset")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dataset")
    synth.write_dataset(directory, 3, _mixed_seed(), SMALL)
    return directory


@pytest.fixture(scope="module")
def pairs(dataset_dir):
    return evaluation.read_dataset(dataset_dir)


@pytest.fixture(scope="module")
def methods():
    config = DetectionConfig()
    ridge = make_student("ridge", patch_size=config.patch_size, alpha=config.alpha)
    return [
        baselines.absolute_difference_method(config),
        baselines.feature_distance_method(config),
        teacher_student_method("ridge", ridge, config),
    ]


@pytest.fixture(scope="module")
def outcomes(pairs, methods, teacher_variables):
    return [evaluation.evaluate_pair(pair, methods, teacher_variables, last_layer="layer2") for pair in pairs]


# Dataset reading.


def test_read_dataset_matches_index(dataset_dir, pairs):
    index = json.loads((dataset_dir / "defects.json").read_text())
    assert [pair.name for pair in pairs] == sorted(index["cases"])
    for pair in pairs:
        case = index["cases"][pair.name]
        expected = np.array([(d["x"], d["y"]) for d in case["defects"]], float).reshape(-1, 2)
        np.testing.assert_array_equal(pair.points, expected)
        assert pair.mask.dtype == bool
        assert pair.mask.shape == pair.inspected.shape
        assert [d["kind"] for d in pair.defects] == case["kinds"]
        assert [d["size_px"] for d in pair.defects] == case["size_px"]


def test_read_dataset_real_wafer_pairs(shared_dir):
    real = evaluation.read_dataset(shared_dir / "data" / "wafer")
    assert [pair.name for pair in real] == ["case2", "case3"]
    assert real[0].points.shape == (3, 2)
    assert real[1].points.shape == (0, 2)
    assert real[0].mask is None


def test_read_dataset_missing_index(tmp_path):
    with pytest.raises(FileNotFoundError, match="defects.json"):
        evaluation.read_dataset(tmp_path)


def _rewrite_case(dataset_dir, tmp_path, change):
    """Copy the dataset to tmp_path with its first case changed by `change(case)`."""
    for name in os.listdir(dataset_dir):
        (tmp_path / name).write_bytes((dataset_dir / name).read_bytes())
    index = json.loads((tmp_path / "defects.json").read_text())
    first = sorted(index["cases"])[0]
    change(index["cases"][first])
    (tmp_path / "defects.json").write_text(json.dumps(index))
    return tmp_path


def test_read_dataset_rejects_attribute_count(dataset_dir, tmp_path):
    directory = _rewrite_case(dataset_dir, tmp_path, lambda case: case.update(kinds=case["kinds"] + ["extra"]))
    with pytest.raises(ValueError, match="one value per defect"):
        evaluation.read_dataset(directory)


def test_read_dataset_rejects_missing_mask(dataset_dir, tmp_path):
    directory = _rewrite_case(dataset_dir, tmp_path, lambda case: case.update(mask="absent.png"))
    with pytest.raises(FileNotFoundError, match="absent.png"):
        evaluation.read_dataset(directory)


def test_read_dataset_rejects_mask_shape(dataset_dir, tmp_path):
    directory = _rewrite_case(dataset_dir, tmp_path, lambda case: case.update(mask="small.png"))
    iio.imwrite(directory / "small.png", np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError, match="pixel for pixel"):
        evaluation.read_dataset(directory)


# Methods and per-pair outcomes.


# 128 px images leave the layer2 ridge few samples per input, which the
# pipeline warns about; the comparison below does not depend on it.
@pytest.mark.filterwarnings("ignore:layer2. only")
def test_teacher_student_method_equals_detect(pairs, teacher_variables):
    config = DetectionConfig()
    student = make_student("ridge", patch_size=config.patch_size, alpha=config.alpha)
    pair = pairs[0]
    detection = pipeline.detect(pair.reference, pair.inspected, teacher_variables, config, student=student)
    context = PairContext(pair.reference, pair.inspected, teacher_variables, last_layer="layer2")
    defect_map, valid = teacher_student_method("ridge", student, config).compute(pair.reference, pair.inspected, context)
    np.testing.assert_array_equal(valid, detection.valid)
    # Same stages on the same inputs: only float32 reordering may differ.
    np.testing.assert_allclose(defect_map, detection.defect_map, atol=1e-6)


def test_pair_context_computes_teacher_once(pairs, teacher_variables):
    context = PairContext(pairs[0].reference, pairs[0].inspected, teacher_variables, last_layer="layer2")
    first = context.features()
    assert context.features() is first
    assert context.timings_s["teacher"] > 0


def test_evaluate_pair_region_and_maps(pairs, outcomes, methods):
    for pair, outcome in zip(pairs, outcomes):
        y0, x0, y1, x1 = outcome.region
        assert set(outcome.methods) == {method.name for method in methods}
        np.testing.assert_array_equal(outcome.mask, pair.mask[y0:y1, x0:x1])
        for result in outcome.methods.values():
            assert result.defect_map.shape == (y1 - y0, x1 - x0)
            assert result.match["found"] + result.match["missed"] == len(pair.points)
            assert result.match["num_blobs"] == len(result.blobs)
            assert result.seconds >= 0


def test_evaluate_pair_rejects_repeated_names(pairs, methods, teacher_variables):
    with pytest.raises(ValueError, match="repeat"):
        evaluation.evaluate_pair(pairs[0], [methods[0], methods[0]], teacher_variables)


def test_outcome_save_load_roundtrip(outcomes, tmp_path):
    path = tmp_path / "pair.npz"
    evaluation.save_outcome(path, outcomes[0])
    loaded = evaluation.load_outcome(path)
    assert loaded.name == outcomes[0].name
    assert loaded.region == outcomes[0].region
    np.testing.assert_array_equal(loaded.points, outcomes[0].points)
    np.testing.assert_array_equal(loaded.mask, outcomes[0].mask)
    for name, result in outcomes[0].methods.items():
        np.testing.assert_array_equal(loaded.methods[name].defect_map, result.defect_map)
        assert loaded.methods[name].match["found"] == result.match["found"]
        assert loaded.methods[name].image_score == result.image_score


# Pooled metrics on hand-computed examples.


def test_pooled_pro_curve_hand_example():
    # Map A has one region scored 0.9; map B, of another shape, one region
    # scored 0.7. The five normal pixels score 0.8, 0.5, 0.3, 0.2 and 0.1.
    maps = [np.array([[0.9, 0.5, 0.1]]), np.array([[0.8, 0.7], [0.3, 0.2]])]
    masks = [np.array([[1, 0, 0]], bool), np.array([[0, 1], [0, 0]], bool)]
    fpr, pro = aggregate.pooled_pro_curve(maps, masks)
    np.testing.assert_allclose(fpr, [0, 0, 0.2, 0.2, 0.4, 0.6, 0.8, 1.0], atol=1e-12)
    np.testing.assert_allclose(pro, [0, 0.5, 0.5, 1, 1, 1, 1, 1], atol=1e-12)
    # Area to FPR 0.3: 0.2 * 0.5 + 0.1 * 1 = 0.2, normalised by 0.3.
    assert aggregate.area_up_to(fpr, pro, 0.3) == pytest.approx(2 / 3, abs=1e-12)


def test_pooled_pro_curve_equals_stacked_curve():
    rng = np.random.default_rng(0)
    # Scores rounded to one decimal, so that ties span maps.
    maps = [np.round(rng.uniform(size=(12, 15)), 1) for _ in range(3)]
    masks = [np.zeros((12, 15), bool) for _ in range(3)]
    masks[0][2:5, 3:6] = True
    masks[1][8:10, 1:3] = True
    masks[1][0:2, 10:14] = True
    fpr, pro = aggregate.pooled_pro_curve(maps, masks)
    expected_fpr, expected_pro, _ = metrics.pro_curve(np.stack(maps), np.stack(masks))
    np.testing.assert_allclose(fpr, expected_fpr, atol=1e-12)
    np.testing.assert_allclose(pro, expected_pro, atol=1e-12)
    assert aggregate.area_up_to(fpr, pro, 0.3) == pytest.approx(metrics.aupro(np.stack(maps), np.stack(masks)), abs=1e-12)


def test_pooled_pro_curve_without_regions_is_nan():
    fpr, pro = aggregate.pooled_pro_curve([np.ones((3, 3)) * 0.5], [np.zeros((3, 3), bool)])
    assert np.isnan(pro).all()
    assert math.isnan(aggregate.area_up_to(fpr, pro, 0.3))


def test_area_up_to_hand_example():
    fpr = np.array([0.0, 0.5, 1.0])
    values = np.array([0.0, 1.0, 1.0])
    # Under y = 2x up to 0.25: 0.0625, divided by 0.25.
    assert aggregate.area_up_to(fpr, values, 0.25) == pytest.approx(0.25, abs=1e-12)
    assert aggregate.area_up_to(fpr, values, 1.0) == pytest.approx(0.75, abs=1e-12)
    with pytest.raises(ValueError, match="fpr_limit"):
        aggregate.area_up_to(fpr, values, 0.0)


def test_thin_curve_keeps_top_of_rise():
    fpr = np.array([0.0, 0.0, 0.0, 0.5, 1.0])
    values = np.array([0.0, 0.4, 0.8, 0.9, 1.0])
    thin_fpr, thin_values = aggregate.thin_curve(fpr, values, num_points=20)
    assert thin_fpr[0] == 0.0
    assert thin_values[0] == pytest.approx(0.8, abs=1e-12)
    assert thin_values[-1] == pytest.approx(1.0, abs=1e-12)
    assert len(thin_fpr) <= 22
    empty_fpr, _ = aggregate.thin_curve(np.array([np.nan, np.nan]), np.array([0.0, 1.0]))
    assert empty_fpr.size == 0


def _outcome(name, points, defects, found, image_score, defect_map=None, mask=None, blobs=0):
    """Build a PairOutcome of one method "m" by hand."""
    points = np.asarray(points, float).reshape(-1, 2)
    match = {
        "num_points": len(points),
        "num_blobs": blobs,
        "found": int(sum(found)),
        "missed": len(points) - int(sum(found)),
        "false_positives": blobs - int(sum(found)),
        "point_found": list(found),
        "localisation_errors_px": [1.0 if hit else float("nan") for hit in found],
    }
    defect_map = np.zeros((4, 4), np.float32) if defect_map is None else defect_map
    result = MethodOutcome(defect_map, match, [], 0.5, image_score, {}, 0.1)
    return PairOutcome(name, points, tuple(defects), (0, 0, 4, 4), mask, {"shift": [0.0, 0.0]}, 0.2, {"m": result})


def test_recall_by_bins_hand_example():
    outcomes = [
        _outcome("a", [(1, 1), (2, 2)], [{"contrast": -0.05}, {"contrast": 0.12}], [True, False], 0.9, blobs=1),
        _outcome("b", [(1, 1), (2, 2)], [{"contrast": 0.3}, {"contrast": 0.3}], [True, False], 0.8, blobs=1),
    ]
    bins = aggregate.recall_by_bins(outcomes, "m", "contrast", [0.0, 0.1, 0.2, 0.25, 0.3])
    # |-0.05| falls in the first bin, and 0.3 in the last, which includes its upper edge.
    assert [(b["found"], b["total"]) for b in bins] == [(1, 1), (0, 1), (0, 0), (1, 2)]
    assert np.isnan(bins[2]["recall"])
    assert bins[3]["recall"] == 0.5


def test_recall_by_kind_counts():
    outcomes = [_outcome("a", [(1, 1), (2, 2), (3, 3)], [{"kind": "pit"}, {"kind": "bridge"}, {"kind": "pit"}], [True, True, False], 0.9, blobs=2)]
    assert aggregate.recall_by_kind(outcomes, "m") == {
        "bridge": {"found": 1, "total": 1, "recall": 1.0},
        "pit": {"found": 1, "total": 2, "recall": 0.5},
    }


def test_summarize_method_hand_example():
    mask = np.zeros((4, 4), bool)
    mask[1, 1] = True
    defect_map = np.zeros((4, 4), np.float32)
    defect_map[1, 1] = 0.9
    defect_map[3, 3] = 0.5
    clean_map = np.full((4, 4), 0.1, np.float32)
    clean_map[0, 0] = 0.95
    outcomes = [
        _outcome("defective", [(1, 1)], [{}], [True], 0.9, defect_map, mask, blobs=1),
        _outcome("clean", [], [], [], 0.95, clean_map, np.zeros((4, 4), bool), blobs=1),
    ]
    summary = aggregate.summarize_method(outcomes, "m")
    assert summary["found"] == 1
    assert summary["false_positives"] == 1
    assert summary["defect_free_pairs"] == 1
    assert summary["defect_free_pairs_with_fp"] == 1
    # The clean pair scores higher (0.95) than the defective one (0.9).
    assert summary["image_auroc"] == 0.0
    stacked_maps, stacked_masks = np.stack([defect_map, clean_map]), np.stack([mask, np.zeros((4, 4), bool)])
    # One defect pixel at 0.9 against 31 normal pixels, one of them (0.95) above it.
    assert summary["pixel_auroc"] == pytest.approx(30 / 31, abs=1e-12)
    assert summary["pixel_auroc"] == pytest.approx(metrics.pixel_auroc(stacked_maps, stacked_masks), abs=1e-12)
    assert summary["aupro"] == pytest.approx(metrics.aupro(stacked_maps, stacked_masks), abs=1e-12)
    assert summary["f1_max"] == pytest.approx(metrics.f1_max(stacked_maps, stacked_masks), abs=1e-12)


def test_summarize_method_without_masks_is_nan():
    outcomes = [_outcome("a", [(1, 1)], [{}], [True], 0.9, blobs=1)]
    summary = aggregate.summarize_method(outcomes, "m")
    assert np.isnan(summary["pixel_auroc"])
    assert np.isnan(summary["aupro"])
    assert np.isnan(summary["image_auroc"])  # One class of pairs only.
    assert summary["roc"] == {"fpr": [], "value": []}
    with pytest.raises(ValueError, match="no pair outcome"):
        aggregate.summarize_method(outcomes, "other")


# Dataset results, files and figures.


def test_summarize_dataset_adds_subset(outcomes, methods):
    trimmed = [dataclasses.replace(outcome, methods=dict(outcome.methods)) for outcome in outcomes]
    del trimmed[-1].methods["ridge"]
    results = aggregate.summarize_dataset(trimmed, methods, contrast_edges=[0, 0.3, 1], size_edges=[1, 8, 31])
    assert results["num_pairs"] == 3
    assert results["num_points"] == sum(len(outcome.points) for outcome in outcomes)
    by_name = {entry["name"]: entry["summary"] for entry in results["methods"]}
    assert by_name["ridge"]["num_pairs"] == 2
    assert by_name["abs_diff"]["num_pairs"] == 3
    assert len(results["subsets"]) == 1
    assert results["subsets"][0]["pairs"] == [outcome.name for outcome in outcomes[:2]]
    assert set(results["subsets"][0]["methods"]) == {"abs_diff", "feature_l2", "ridge"}
    assert 0.0 <= by_name["abs_diff"]["image_auroc"] <= 1.0
    assert len(results["pair_rows"]) == 3 * 3 - 1


def test_write_results_and_figures(outcomes, methods, tmp_path):
    results = aggregate.summarize_dataset(outcomes, methods, contrast_edges=[0, 0.3, 1], size_edges=[1, 8, 31])
    results["dataset"] = "tiny"
    written = evaluation_report.write_results(tmp_path, results)
    assert sorted(os.path.basename(path) for path in written) == ["pairs.csv", "results.json", "summary.csv", "summary.md"]
    table = (tmp_path / "summary.md").read_text()
    for method in methods:
        assert f"| `{method.name}` |" in table
    reloaded = json.loads((tmp_path / "results.json").read_text())
    assert reloaded["methods"][0]["summary"]["num_pairs"] == 3
    figures = plots.write_figures(results, tmp_path, prefix="tiny_")
    assert set(figures) == {"roc", "pro", "recall_contrast", "recall_size"}
    for path in figures.values():
        assert os.path.getsize(path) > 1000


def test_plot_pair_maps_writes_png(pairs, outcomes, methods, tmp_path):
    path = plots.plot_pair_maps(pairs[0].inspected, outcomes[0], [m.name for m in methods], str(tmp_path / "maps.png"))
    assert os.path.getsize(path) > 1000


def test_results_page_keeps_analysis(outcomes, methods, tmp_path):
    results = aggregate.summarize_dataset(outcomes, methods)
    results["dataset"] = "tiny"
    page = tmp_path / "results.md"
    evaluation_report.write_results_page(page, [results], {})
    text = page.read_text()
    assert "`feature_l2`" in text
    page.write_text(text.replace("## Analysis\n", "## Analysis\n\nHand-written finding.\n").replace("tiny", "old name", 1))
    evaluation_report.write_results_page(page, [results], {})
    rewritten = page.read_text()
    assert "Hand-written finding." in rewritten
    assert "old name" not in rewritten


def test_results_page_rejects_missing_markers(tmp_path):
    page = tmp_path / "results.md"
    page.write_text("# Results\n")
    with pytest.raises(ValueError, match="markers"):
        evaluation_report.write_results_page(page, [], {})


def test_format_value_cells():
    assert evaluation_report.format_value(float("nan")) == "–"
    assert evaluation_report.format_value(None) == "–"
    assert evaluation_report.format_value(3) == "3"
    assert evaluation_report.format_value(0.12345) == "0.123"


# The experiment script.


@pytest.fixture(scope="module")
def evaluate_script():
    from experiments import evaluate

    if "synthetic_pairs" not in flags.FLAGS:
        evaluate.define_flags()
    yield evaluate
    flags.FLAGS.unparse_flags()


def test_student_settings_read_flagfile(evaluate_script, tmp_path, monkeypatch):
    (tmp_path / "base.flags").write_text("--reference=x.tif\n--patch_size=7\n--z_floor=6\n")
    (tmp_path / "case2_fancy.flags").write_text(
        "--flagfile=base.flags\n--layers=layer2,layer3\n--patch_size=5\n"
        "--student_options=window=9,progress=true\n--unknown_flag=1\n"
    )
    monkeypatch.setattr(evaluate_script, "_EXPERIMENTS_DIR", str(tmp_path))
    monkeypatch.setattr(evaluate_script, "_REPO_ROOT", str(tmp_path))
    config, options, path = evaluate_script.student_settings("fancy", DetectionConfig())
    assert config.layers == ("layer2", "layer3")
    assert config.patch_size == 5  # The outer file comes after the nested one.
    assert config.z_floor == 6.0
    assert options == {"window": "9", "progress": "false"}
    assert path.endswith("case2_fancy.flags")
    assert evaluate_script.student_settings("absent", DetectionConfig())[2] is None


def test_evaluate_script_end_to_end(evaluate_script, dataset_dir, tmp_path, shared_dir):
    flags.FLAGS.unparse_flags()
    flags.FLAGS(
        [
            "evaluate",
            f"--dataset={dataset_dir}",
            f"--output_dir={tmp_path / 'out'}",
            f"--teacher_weights={shared_dir / 'weights' / 'resnet18_imagenet_bnfolded'}",
            "--methods=abs_diff,feature_l2",
            "--method_pairs=feature_l2=2",
            f"--results_page={tmp_path / 'results.md'}",
            f"--figures_dir={tmp_path / 'figures'}",
        ]
    )
    evaluate_script.main(["evaluate"])
    label = os.path.basename(os.path.normpath(dataset_dir))
    results = json.loads((tmp_path / "out" / label / "results.json").read_text())
    by_name = {entry["name"]: entry["summary"] for entry in results["methods"]}
    assert by_name["abs_diff"]["num_pairs"] == 3
    assert by_name["feature_l2"]["num_pairs"] == 2
    assert len(os.listdir(tmp_path / "out" / label / "outcomes")) == 3
    page = (tmp_path / "results.md").read_text()
    assert f"{label}_roc.png" in page
    assert (tmp_path / "figures" / f"{label}_roc.png").is_file()
    first_pair = sorted(json.loads((dataset_dir / "defects.json").read_text())["cases"])[0]
    assert f"{label}_maps_{first_pair}.png" in page
    assert (tmp_path / "figures" / f"{label}_maps_{first_pair}.png").is_file()
