"""Tests for batched detection: canvases, the JAX aligner, ridge moments and buckets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax import align, batch, canvas, io, pipeline, score
from tsjax.align_jax import ESTIMATOR_NAMES
from tsjax.config import DetectionConfig
from tsjax.moments import merge_moments, patch_moments, solve_moments
from tsjax.patches import extract_patches

# One jitted moments function and one feature shape for all moments tests,
# so that they compile once.
_patch_moments = jax.jit(patch_moments, static_argnums=3)
_MOMENT_SHAPE = (20, 20, 4)
from tsjax.students import RidgeStudent


def _noisy_pair(render, shape, seed, shift=(2.4, -3.15), defect=None):
    """A reference and a shifted, noisier inspected image of one Manhattan layout."""
    rng = np.random.default_rng(seed)
    reference = render(shape, seed=seed) + 0.02 * rng.normal(size=shape)
    inspected = render(shape, seed=seed, shift=shift) + 0.02 * rng.normal(size=shape)
    if defect is not None:
        row, col = defect
        inspected[row - 2 : row + 3, col - 2 : col + 3] += 0.5
    return np.clip(reference, 0, 1).astype(np.float32), np.clip(inspected, 0, 1).astype(np.float32)


def test_bucket_shape_rounds_up_each_side():
    assert batch.bucket_shape((369, 480)) == (384, 480)
    assert batch.bucket_shape((480, 480)) == (480, 480)
    assert batch.bucket_shape((65, 1), multiple=64) == (128, 64)


def test_bucket_shape_rejects_multiple_off_the_stride_grid():
    with pytest.raises(ValueError, match="multiple of 16"):
        batch.bucket_shape((100, 100), multiple=24)


def test_make_extents_rejects_unaligned_origin():
    with pytest.raises(ValueError, match="multiples of 16"):
        canvas.make_extents([[-8, 0]], [[100, 100]])


def test_canvas_features_equal_bare_features(teacher_variables):
    rng = np.random.default_rng(0)
    image = rng.random((75, 101)).astype(np.float32)
    bare = pipeline.extract_features(teacher_variables, jnp.asarray(image[None]), "layer1")
    # The image sits 16 px below and 32 px right of the canvas corner, as in
    # a tile whose window starts before the image; its odd sides leave a
    # max-pool window that straddles the image's far edge.
    board = np.zeros((1, 112, 160), np.float32)
    board[0, 16:91, 32:133] = image
    extents = canvas.make_extents([[-16, -32]], [[75, 101]])

    features = jax.jit(canvas.canvas_features, static_argnums=3)(teacher_variables, board, extents, "layer1")

    for layer, stride in (("stem", 2), ("layer1", 4)):
        expected = np.asarray(bare[layer][0])
        rows = slice(16 // stride, 16 // stride + expected.shape[0])
        cols = slice(32 // stride, 32 // stride + expected.shape[1])
        # Same convolutions on the same inputs: only summation order could
        # differ, and XLA measured 0.0 here.
        np.testing.assert_allclose(np.asarray(features[layer][0])[rows, cols], expected, atol=1e-5)


def test_gaussian_filter_reflect_matches_scipy():
    from scipy import ndimage

    image = np.random.default_rng(1).random((40, 52)).astype(np.float32)
    board = np.zeros((1, 64, 64), np.float32)
    board[0, :40, :52] = image

    smooth = jax.jit(canvas.gaussian_filter_reflect, static_argnums=2)
    smoothed = smooth(board, canvas.make_extents([[0, 0]], [[40, 52]]), 1.5)

    # scipy filters in float64; float32 rounding of a 13-tap sum is ~1e-7.
    np.testing.assert_allclose(np.asarray(smoothed[0, :40, :52]), ndimage.gaussian_filter(image, 1.5), atol=1e-6)


@pytest.mark.parametrize("stride", [4, 8])
def test_upsample_on_canvas_matches_score_upsampling(stride):
    rng = np.random.default_rng(6)
    coarse = rng.random((2, 12, 15)).astype(np.float32)
    weight = (rng.random((2, 12, 15)) > 0.3).astype(np.float32)
    weight[0, :, :4] = 0.0  # a band with no valid feature, which must read 0

    result = canvas.upsample_on_canvas(coarse, weight, stride)
    expected = score.upsample_to_image(coarse, stride, (12 * stride, 15 * stride), valid=weight)

    # Same bilinear weights, summed in another order: float32 rounding.
    np.testing.assert_allclose(result, expected, atol=1e-6)


@pytest.fixture(scope="module")
def case2_pair(shared_dir, wafer_cases):
    names = wafer_cases["case2"]
    folder = shared_dir / "data" / "wafer"
    return io.load_image(folder / names["reference"]), io.load_image(folder / names["inspected"])


def test_jax_aligner_matches_align_pair_on_padded_canvas(case2_pair):
    reference, inspected = case2_pair
    expected = align.align_pair(reference, inspected)
    # 369 x 480 px on the 384 x 480 bucket takes the Bluestein path. Two
    # pairs, as in the batch test below, which then reuses this compilation.
    pairs = batch.prepare_batch([reference, inspected], [inspected, inspected], batch.bucket_shape(inspected.shape))

    result = batch.align_stage(pairs.references, pairs.inspected, pairs.sizes, exact=False)

    _assert_first_pair_matches(result, expected, inspected.shape)
    # An image aligned onto itself has shift 0 and correlation 1.
    np.testing.assert_allclose(np.asarray(result.shift[1]), (0.0, 0.0), atol=1e-6)
    np.testing.assert_allclose(float(result.correlation[1]), 1.0, atol=1e-5)


def test_jax_aligner_matches_align_pair_when_filling_canvas(case2_pair):
    # 352 x 480 px fills its bucket, so the plain-FFT path (exact=True) runs.
    reference, inspected = (image[:352] for image in case2_pair)
    expected = align.align_pair(reference, inspected)
    pairs = batch.prepare_batch([reference], [inspected], batch.bucket_shape(inspected.shape))

    result = batch.align_stage(pairs.references, pairs.inspected, pairs.sizes, exact=True)

    _assert_first_pair_matches(result, expected, inspected.shape)


def _assert_first_pair_matches(result, expected, shape):
    """Check the batch's first pair against ``align.align_pair``'s ``expected``."""
    height, width = shape
    assert ESTIMATOR_NAMES[int(result.estimator[0])] == expected.estimator
    # Both report shifts on the 1/20 px grid; float32 rounding is ~1e-6 px.
    np.testing.assert_allclose(np.asarray(result.shift[0]), expected.shift, atol=1e-5)
    for index, name in enumerate(ESTIMATOR_NAMES):
        np.testing.assert_allclose(result.candidate_shifts[0, index], expected.candidates[name]["shift"], atol=1e-5)
        # float32 against float64 sums over 1.8e5 px: measured below 1e-7.
        np.testing.assert_allclose(
            result.candidate_correlations[0, index], expected.candidates[name]["correlation"], atol=1e-5
        )
    # The truncated spline prefilter and float32 leave < 1e-6 of a [0, 1] image.
    np.testing.assert_allclose(
        np.asarray(result.aligned_reference[0])[:height, :width], expected.aligned_reference, atol=1e-5
    )


def test_moments_solve_matches_ridge_fit():
    rng = np.random.default_rng(2)
    ref = rng.normal(size=_MOMENT_SHAPE).astype(np.float32)
    insp = (0.5 * np.roll(ref, 1, axis=1) + 0.1 * rng.normal(size=ref.shape)).astype(np.float32)
    weight = (rng.random(_MOMENT_SHAPE[:2]) > 0.3).astype(np.float32)
    student = RidgeStudent(patch_size=3, alpha=1e-3)

    expected = student.fit(ref[None], insp[None], weight[None], None)
    state = solve_moments(_patch_moments(ref, insp, weight, 3), 1e-3)

    # Two float32 factorisations of one system (condition ~1e3): 1e-4.
    np.testing.assert_allclose(
        student.predict(state, ref[None]), student.predict(expected, ref[None]), rtol=1e-4, atol=1e-4
    )


@pytest.mark.parametrize("weight_scale", [1.0, 0.004])
def test_moments_match_float64_definitions(weight_scale):
    rng = np.random.default_rng(5)
    ref = (rng.normal(size=_MOMENT_SHAPE) + 2.0).astype(np.float32)
    insp = (rng.normal(size=_MOMENT_SHAPE) - 1.0).astype(np.float32)
    # The small scale makes the weights sum to about 0.8, below the floor
    # of 1 on the mean's denominator that ridge_solve applies.
    weight = (weight_scale * rng.uniform(0.0, 2.0, _MOMENT_SHAPE[:2])).astype(np.float32)

    moments = _patch_moments(ref, insp, weight, 3)

    inputs = np.asarray(extract_patches(ref[None], 3)[0], np.float64).reshape(400, -1)
    targets = insp.reshape(400, -1).astype(np.float64)
    samples = weight.reshape(-1).astype(np.float64)
    total = max(samples.sum(), 1.0)
    input_mean = samples @ inputs / total
    target_mean = samples @ targets / total
    centred = inputs - input_mean
    centred_targets = targets - target_mean
    expected = {
        "count": samples.sum(),
        "input_mean": input_mean,
        "target_mean": target_mean,
        "input_scatter": (samples[:, None] * centred).T @ centred,
        "cross_scatter": (samples[:, None] * centred).T @ centred_targets,
        "target_energy": samples @ (centred_targets**2).sum(-1),
    }
    for name, value in expected.items():
        # float32 sums of 400 weighted samples against float64: 1e-4 of the scale.
        scale = max(np.abs(value).max(), 1e-3)
        np.testing.assert_allclose(getattr(moments, name), value, atol=1e-4 * scale, err_msg=name)


def test_merged_moments_equal_moments_of_union():
    rng = np.random.default_rng(3)
    ref = rng.normal(size=_MOMENT_SHAPE).astype(np.float32)
    insp = rng.normal(size=_MOMENT_SHAPE).astype(np.float32) + 3.0
    weight = np.ones(_MOMENT_SHAPE[:2], np.float32)
    top, bottom = weight.copy(), weight.copy()
    top[10:] = 0
    bottom[:10] = 0

    whole = _patch_moments(ref, insp, weight, 3)
    merged = merge_moments(_patch_moments(ref, insp, top, 3), _patch_moments(ref, insp, bottom, 3))

    for name, value in whole._asdict().items():
        # float32 sums of 400 samples against a float64 merge: 1e-4 relative.
        np.testing.assert_allclose(getattr(merged, name), value, rtol=1e-4, atol=1e-3, err_msg=name)


def test_merge_with_empty_moments_keeps_the_other():
    rng = np.random.default_rng(4)
    ref = rng.normal(size=_MOMENT_SHAPE).astype(np.float32)
    full = _patch_moments(ref, ref, np.ones(_MOMENT_SHAPE[:2], np.float32), 3)
    empty = _patch_moments(ref, ref, np.zeros(_MOMENT_SHAPE[:2], np.float32), 3)

    merged = merge_moments(empty, full)

    np.testing.assert_allclose(merged.input_scatter, full.input_scatter, rtol=1e-6)
    np.testing.assert_allclose(merged.count, 400.0)


def test_batch_matches_detect_and_reuses_compilation(case2_pair, manhattan, teacher_variables):
    config = DetectionConfig()
    synthetic = _noisy_pair(manhattan, case2_pair[1].shape, seed=0, defect=(200, 300))
    first = [case2_pair, synthetic]
    second = [_noisy_pair(manhattan, (360, 470), seed) for seed in (5, 6)]

    results = batch.detect_batch([r for r, _ in first], [i for _, i in first], teacher_variables, config)
    counts = batch.trace_counts()
    again = batch.detect_batch([r for r, _ in second], [i for _, i in second], teacher_variables, config)

    # 369 x 480 and 360 x 470 px share the 384 x 480 bucket: no stage recompiles.
    assert batch.trace_counts() == counts
    assert [result.defect_map.shape for result in again] == [(360, 470)] * 2
    # The first batch has the real case2 shape, whose detect compilation the
    # pipeline tests share.
    for (reference, inspected), result in zip(first, results):
        expected = pipeline.detect(reference, inspected, teacher_variables, config)
        np.testing.assert_array_equal(result.valid, expected.valid)
        assert result.alignment.shift == expected.alignment.shift
        # Same stages up to float32 summation order in the ridge fit, whose
        # effect on the map was measured below 1e-5.
        np.testing.assert_allclose(result.defect_map, expected.defect_map, atol=1e-4)
        assert [blob["bbox"] for blob in result.blobs] == [blob["bbox"] for blob in expected.blobs]
    assert len(results[0].blobs) == 3
    assert any(abs(blob["y"] - 200) < 6 and abs(blob["x"] - 300) < 6 for blob in results[1].blobs)


def test_pairs_that_fill_their_canvas_match_detect(manhattan, teacher_variables):
    # 160 x 192 px is its own bucket, so the teacher runs without canvas masks.
    config = DetectionConfig()
    pairs = [_noisy_pair(manhattan, (160, 192), seed, defect=(80, 90)) for seed in (7, 8)]

    # layer2 has fewer valid pixels than student inputs, and the warning names each pair.
    with pytest.warns(UserWarning, match="pair 1: layer2: only") as caught:
        results = batch.detect_batch([r for r, _ in pairs], [i for _, i in pairs], teacher_variables, config)
    assert any(str(warning.message).startswith("pair 0: layer2") for warning in caught)

    for (reference, inspected), result in zip(pairs, results):
        expected = pipeline.detect(reference, inspected, teacher_variables, config)
        np.testing.assert_allclose(result.defect_map, expected.defect_map, atol=1e-4)
        assert [blob["bbox"] for blob in result.blobs] == [blob["bbox"] for blob in expected.blobs]


def test_detect_batch_rejects_unknown_aligner(teacher_variables):
    with pytest.raises(ValueError, match="aligner"):
        batch.detect_batch([], [], teacher_variables, aligner="scipy")


def test_detect_batch_rejects_unscaled_grey_levels(case2_pair, teacher_variables):
    # 8-bit grey levels passed without scaling would give wrong maps.
    reference, inspected = case2_pair
    unscaled = np.round(inspected * 255).astype(np.uint8)

    with pytest.raises(io.ImageError, match="inspected 0: expected float grey levels in \\[0, 1\\]; got dtype uint8"):
        batch.detect_batch([reference], [unscaled], teacher_variables)
    with pytest.raises(io.ImageError, match="inspected 0: grey levels must lie in \\[0, 1\\]"):
        batch.detect_batch([reference], [unscaled.astype(np.float32)], teacher_variables)


@pytest.mark.parametrize("batch_size", [0, -1, 1.5, True])
def test_detect_batch_rejects_invalid_batch_size(batch_size, manhattan):
    with pytest.raises(ValueError, match=f"batch_size must be an integer >= 1 or None; got {batch_size!r}"):
        batch.detect_batch([manhattan], [manhattan], {}, batch_size=batch_size)


def test_map_pairs_steps_through_large_batches():
    values = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)
    pairs = (values, {"scale": jnp.arange(8, dtype=jnp.float32)})

    # Eight pairs on CPU run as two steps of four; the result must not
    # depend on the stepping.
    result = jax.jit(lambda pairs: batch._map_pairs(lambda row, extra: row * extra["scale"], pairs))(pairs)

    np.testing.assert_array_equal(result, values * jnp.arange(8, dtype=jnp.float32)[:, None])
