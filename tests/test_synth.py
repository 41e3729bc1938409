"""Tests for tsjax.synth: determinism, planted ground truth and dataset files."""

import dataclasses
import json

import imageio.v3 as iio
import numpy as np
import pytest
import scipy.ndimage
import tifffile
from skimage.filters import window
from skimage.registration import phase_cross_correlation

from tsjax import synth

# Small images keep the whole file to a few seconds on 2 CPU cores.
SMALL = synth.SynthConfig(
    height_range=(128, 192),
    width_range=(128, 192),
    shift_range_px=(2.0, 12.0),
    defect_size_range_px=(2.0, 16.0),
)
NOISE_FREE = dataclasses.replace(
    SMALL,
    photons_per_unit=None,
    gaussian_noise_std=0.0,
    gain_range=(1.0, 1.0),
    offset_range=(0.0, 0.0),
)


def _with_defects(config, seed_start=0):
    """Return the first pair from `seed_start` on that has at least one defect."""
    for seed in range(seed_start, seed_start + 50):
        pair = synth.make_pair(seed, config)
        if pair.defects:
            return seed, pair
    raise AssertionError("no pair with defects in 50 seeds")


def test_make_pair_types_and_ranges():
    pair = synth.make_pair(3, SMALL)
    height, width = pair.reference.shape
    assert 128 <= height <= 192
    assert 128 <= width <= 192
    assert pair.inspected.shape == (height, width)
    assert pair.defect_mask.shape == (height, width)
    assert pair.reference.dtype == np.float32
    assert pair.inspected.dtype == np.float32
    assert pair.defect_mask.dtype == bool
    for image in (pair.reference, pair.inspected):
        assert image.min() >= 0.0
        assert image.max() <= 1.0
    for component in pair.shift:
        assert 2.0 <= abs(component) <= 12.0


def test_make_pair_same_seed_identical():
    first = synth.make_pair(11, SMALL)
    second = synth.make_pair(11, SMALL)
    np.testing.assert_array_equal(first.reference, second.reference)
    np.testing.assert_array_equal(first.inspected, second.inspected)
    np.testing.assert_array_equal(first.defect_mask, second.defect_mask)
    assert first.defects == second.defects
    assert first.shift == second.shift


def test_make_pair_different_seed_differs():
    first = synth.make_pair(11, SMALL)
    second = synth.make_pair(12, SMALL)
    assert first.shift != second.shift
    if first.reference.shape == second.reference.shape:
        assert not np.array_equal(first.reference, second.reference)


def test_make_pair_ignores_global_random_state():
    np.random.seed(0)
    first = synth.make_pair(5, SMALL)
    np.random.seed(1)
    second = synth.make_pair(5, SMALL)
    np.testing.assert_array_equal(first.inspected, second.inspected)


def test_sizes_are_drawn_independently():
    shapes = {synth.make_pair(seed, SMALL).reference.shape for seed in range(10)}
    assert any(height != width for height, width in shapes)


def test_defect_records_match_mask():
    for seed in range(20):
        pair = synth.make_pair(seed, SMALL)
        assert pair.defect_mask.any() == bool(pair.defects)
        rows, cols = np.nonzero(pair.defect_mask)
        for defect in pair.defects:
            assert defect["kind"] in synth.DEFECT_KINDS
            assert 2 <= defect["size_px"] <= 16
            # The recorded centre is the centroid of that defect's mask, so
            # some mask pixel lies within the defect's size of it.
            distance = np.hypot(rows - defect["y"], cols - defect["x"]).min()
            assert distance <= defect["size_px"] + 2.0


def test_defects_inside_shared_view():
    # Inspected row y shows reference row y - dy, so both images show rows
    # max(0, dy) .. min(H, H + dy) - 1. Defects keep a 3 px margin inside.
    for seed in range(20):
        pair = synth.make_pair(seed, SMALL)
        height, width = pair.inspected.shape
        dy, dx = pair.shift
        for defect in pair.defects:
            assert max(0.0, dy) <= defect["y"] <= min(height, height + dy) - 1
            assert max(0.0, dx) <= defect["x"] <= min(width, width + dx) - 1


def test_mask_covers_where_defects_change_image():
    # With noise and blur off, the same seed with max_defects=0 renders the
    # identical inspected image without defects, because layout, shift and
    # gain come from a random stream that the defects do not touch.
    config = dataclasses.replace(NOISE_FREE, blur_sigma_px=(0.0, 0.0))
    for seed_start in (0, 10, 20):
        seed, pair = _with_defects(config, seed_start)
        clean = synth.make_pair(seed, dataclasses.replace(config, max_defects=0))
        assert not clean.defects
        np.testing.assert_array_equal(clean.reference, pair.reference)
        change = np.abs(pair.inspected.astype(np.float64) - clean.inspected)

        # Tolerance 1e-6 covers float32 rounding of the stored images.
        largest = max(abs(d["contrast"]) for d in pair.defects)
        outside = change[~pair.defect_mask]
        assert outside.max() <= config.mask_fraction * largest + 1e-6
        assert change[pair.defect_mask].max() == pytest.approx(largest, abs=1e-6)
        smallest = min(abs(d["contrast"]) for d in pair.defects)
        assert np.mean(change[pair.defect_mask] >= config.mask_fraction * smallest - 1e-6) > 0.95


def test_noisy_difference_larger_inside_mask():
    config = dataclasses.replace(SMALL, gain_range=(1.0, 1.0), offset_range=(0.0, 0.0))
    checked = 0
    for seed in range(10):
        pair = synth.make_pair(seed, config)
        if not pair.defects:
            continue
        checked += 1
        aligned = scipy.ndimage.shift(pair.reference.astype(np.float64), pair.shift, order=3)
        difference = np.abs(pair.inspected - aligned)
        margin = int(np.ceil(max(abs(v) for v in pair.shift))) + 3
        valid = np.zeros_like(pair.defect_mask)
        valid[margin:-margin, margin:-margin] = True
        inside = difference[valid & pair.defect_mask].mean()
        outside = difference[valid & ~pair.defect_mask].mean()
        # Noise alone gives a mean |difference| of about 0.032 everywhere.
        # The faintest defects of these seeds raise it by about 0.01 inside
        # their masks (measured), so 0.005 leaves a margin.
        assert inside > outside + 0.005
    assert checked >= 5


def test_recorded_shift_by_phase_correlation():
    # Phase correlation assumes periodic images, so a Hann window suppresses
    # the wrap-around edges. It fails on layouts that repeat along one axis,
    # so these seeds were checked to hold a 2-D pattern.
    for seed in range(6):
        pair = synth.make_pair(seed, NOISE_FREE)
        taper = window("hann", pair.reference.shape)
        estimate, _, _ = phase_cross_correlation(
            pair.reference * taper, pair.inspected * taper, upsample_factor=10
        )
        # skimage returns the shift that moves the inspected image back onto
        # the reference, which is minus the recorded shift.
        np.testing.assert_allclose(-np.asarray(estimate), pair.shift, atol=0.2)


def test_recorded_shift_aligns_reference():
    config = dataclasses.replace(NOISE_FREE, max_defects=0)
    for seed in range(4):
        pair = synth.make_pair(seed, config)
        margin = int(np.ceil(max(abs(v) for v in pair.shift))) + 3
        inner = (slice(margin, -margin), slice(margin, -margin))

        def residual(shift):
            # scipy's shift gives output(y, x) = input(y - dy, x - dx).
            aligned = scipy.ndimage.shift(pair.reference.astype(np.float64), shift, order=3)
            return np.abs(aligned - pair.inspected)[inner]

        correct = residual(pair.shift)
        wrong = residual((pair.shift[0] + 0.5, pair.shift[1]))
        # Cubic-spline interpolation of the blurred edges stays within 0.04
        # (measured on these seeds). Half a pixel off at least doubles it.
        assert correct.max() < 0.04
        assert wrong.mean() > 2 * correct.mean()


def test_defect_free_fraction_about_one_fifth():
    count = sum(not synth.make_pair(synth.pair_seed(7, index), SMALL).defects for index in range(50))
    # Binomial(50, 0.2) has mean 10 and standard deviation 2.8. The bounds
    # are about 2.5 standard deviations either side.
    assert 3 <= count <= 17


def test_defect_count_at_most_max():
    config = dataclasses.replace(SMALL, max_defects=2, defect_free_fraction=0.0)
    for seed in range(10):
        assert 1 <= len(synth.make_pair(seed, config).defects) <= 2


def test_noise_matches_configured_level():
    config = dataclasses.replace(SMALL, defect_free_fraction=1.0)
    clean_config = dataclasses.replace(config, photons_per_unit=None, gaussian_noise_std=0.0)
    noisy = synth.make_pair(4, config).reference.astype(np.float64)
    clean = synth.make_pair(4, clean_config).reference
    # 0.03 is the flat-region noise level that the SynthConfig docstring
    # states for the default noise. Over the whole image the shot-noise part
    # varies with intensity, hence the 0.006 tolerance.
    assert np.std(noisy - clean) == pytest.approx(0.03, abs=0.006)


@pytest.mark.parametrize(
    "field, value",
    [
        ("height_range", (300, 200)),
        ("shift_range_px", (-1.0, 5.0)),
        ("defect_free_fraction", 1.5),
        ("defect_kinds", ("scratch",)),
        ("mask_fraction", 0.0),
        ("photons_per_unit", 0.0),
    ],
)
def test_config_rejects_invalid(field, value):
    with pytest.raises(ValueError, match=field):
        dataclasses.replace(SMALL, **{field: value})


def test_config_rejects_images_too_small_for_defects():
    with pytest.raises(ValueError, match="too small"):
        synth.SynthConfig(height_range=(40, 64), width_range=(40, 64))


def test_make_pair_rejects_bad_seed():
    with pytest.raises(ValueError, match="seed"):
        synth.make_pair(-1, SMALL)
    with pytest.raises(TypeError, match="seed"):
        synth.make_pair(1.5, SMALL)


def test_write_dataset_files_readable(tmp_path):
    output = tmp_path / "synthetic"
    index = synth.write_dataset(output, num_pairs=3, seed=2, config=SMALL)
    on_disk = json.loads((output / "defects.json").read_text())
    assert on_disk == index
    assert "coordinate_system" in on_disk
    assert sorted(on_disk["cases"]) == ["synth0000", "synth0001", "synth0002"]

    for index_in_dataset, (name, case) in enumerate(sorted(on_disk["cases"].items())):
        reference = tifffile.imread(output / case["reference"])
        inspected = tifffile.imread(output / case["inspected"])
        mask = iio.imread(output / case["mask"])
        assert reference.dtype == np.uint8
        assert inspected.dtype == np.uint8
        assert reference.shape == inspected.shape == mask.shape
        assert set(np.unique(mask)) <= {0, 255}

        # The stored seed regenerates the pair. 8-bit rounding is within 0.5/255.
        assert case["seed"] == synth.pair_seed(2, index_in_dataset)
        pair = synth.make_pair(case["seed"], SMALL)
        np.testing.assert_allclose(inspected / 255.0, pair.inspected, atol=0.5 / 255 + 1e-6)
        np.testing.assert_array_equal(mask == 255, pair.defect_mask)
        assert case["shift"] == pytest.approx(list(pair.shift), abs=1e-4)

        count = len(case["defects"])
        assert len(case["kinds"]) == len(case["contrast"]) == len(case["size_px"]) == count
        for point, defect in zip(case["defects"], pair.defects):
            assert set(point) == {"x", "y"}
            assert point["x"] == round(defect["x"])
            assert point["y"] == round(defect["y"])


def test_write_dataset_rejects_non_empty_dir(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        synth.write_dataset(tmp_path, num_pairs=1, seed=0, config=SMALL)


def test_write_dataset_overwrite_removes_stale_pairs(tmp_path):
    synth.write_dataset(tmp_path, num_pairs=3, seed=0, config=SMALL)
    (tmp_path / "notes.txt").write_text("keep me")
    names = []
    synth.write_dataset(
        tmp_path, num_pairs=2, seed=1, config=SMALL, overwrite=True, on_pair_written=names.append
    )
    assert names == ["synth0000", "synth0001"]
    assert not (tmp_path / "synth0002_inspected_image.tif").exists()
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert sorted(json.loads((tmp_path / "defects.json").read_text())["cases"]) == names


def test_write_dataset_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_pairs"):
        synth.write_dataset(tmp_path / "a", num_pairs=0, seed=0, config=SMALL)
    with pytest.raises(ValueError, match="name_prefix"):
        synth.write_dataset(tmp_path / "b", num_pairs=1, seed=0, config=SMALL, name_prefix="../x")
