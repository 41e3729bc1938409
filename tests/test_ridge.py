"""Tests for the ridge student and the patch extraction it relies on."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.patches import extract_patches
from tsjax.students.ridge import RidgeStudent, ridge_solve

# One feature shape for the student tests, so that JAX compiles each eager
# operation once for the whole file.
FEATURE_SHAPE = (1, 16, 18, 4)


def _lstsq_ridge(inputs, targets, weight, alpha):
    """Solve the same weighted ridge problem with ``numpy.linalg.lstsq`` in float64.

    The weighted, centred rows are scaled by ``sqrt(w)`` and ``sqrt(lam) * I``
    rows with zero targets are appended, so the least-squares solution of the
    augmented system minimises ``sum_n w_n |y_n - x_n W - b|^2 + lam |W|^2``.
    """
    inputs = np.asarray(inputs, np.float64)
    targets = np.asarray(targets, np.float64)
    weight = np.asarray(weight, np.float64)
    input_mean = weight @ inputs / weight.sum()
    target_mean = weight @ targets / weight.sum()
    centred = inputs - input_mean
    scatter = centred.T @ (weight[:, None] * centred)
    dim = inputs.shape[1]
    lam = alpha * np.trace(scatter) / dim

    root = np.sqrt(weight)[:, None]
    design = np.vstack([root * centred, np.sqrt(lam) * np.eye(dim)])
    rhs = np.vstack([root * (targets - target_mean), np.zeros((dim, targets.shape[1]))])
    weights, *_ = np.linalg.lstsq(design, rhs, rcond=None)
    return weights, target_mean - input_mean @ weights


def _regression_problem(seed, count=300, dim=12, channels=3):
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.5, 3.0, dim)
    inputs = rng.normal(size=(count, dim)) * scales + rng.normal(size=dim)
    targets = inputs @ rng.normal(size=(dim, channels)) + rng.normal(size=channels)
    targets += 0.3 * rng.normal(size=(count, channels))
    weight = rng.uniform(0.0, 2.0, count)
    return inputs.astype(np.float32), targets.astype(np.float32), weight.astype(np.float32)


@pytest.mark.parametrize("alpha", [1e-3, 0.1, 2.0])
def test_ridge_matches_lstsq(alpha):
    inputs, targets, weight = _regression_problem(0)

    state = ridge_solve(inputs, targets, weight, alpha)
    expected_weights, expected_bias = _lstsq_ridge(inputs, targets, weight, alpha)

    # ridge_solve works in float32 on a scatter matrix whose condition number
    # is 35 here. The measured difference from float64 lstsq is below 1e-6.
    np.testing.assert_allclose(state.weights, expected_weights, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(state.bias, expected_bias, rtol=1e-4, atol=1e-4)


def test_ridge_penalty_shrinks_weights():
    inputs, targets, weight = _regression_problem(1)

    weak = ridge_solve(inputs, targets, weight, 1e-3)
    strong = ridge_solve(inputs, targets, weight, 10.0)

    assert float(jnp.linalg.norm(strong.weights)) < float(jnp.linalg.norm(weak.weights))


def test_ridge_ignores_zero_weight_samples():
    inputs, targets, weight = _regression_problem(2)
    weight[::3] = 0.0
    changed_inputs = inputs.copy()
    changed_targets = targets.copy()
    changed_inputs[::3] = 1e3
    changed_targets[::3] = -1e3

    state = ridge_solve(inputs, targets, weight, 1e-2)
    changed = ridge_solve(changed_inputs, changed_targets, weight, 1e-2)

    # A zero weight multiplies the sample's every contribution by exactly 0,
    # so only float32 rounding of the unchanged terms can differ.
    np.testing.assert_allclose(changed.weights, state.weights, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(changed.bias, state.bias, rtol=1e-6, atol=1e-6)


def test_ridge_zero_weights_match_dropped_rows():
    inputs, targets, weight = _regression_problem(3)
    weight[:100] = 0.0

    state = ridge_solve(inputs, targets, weight, 1e-2)
    dropped = ridge_solve(inputs[100:], targets[100:], weight[100:], 1e-2)

    np.testing.assert_allclose(state.weights, dropped.weights, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.bias, dropped.bias, rtol=1e-5, atol=1e-5)


def _planted_map(seed):
    """Return reference features ``[1, 16, 18, 4]`` and a planted map onto 5 channels."""
    rng = np.random.default_rng(seed)
    reference = rng.normal(size=FEATURE_SHAPE).astype(np.float32)
    planted_weights = rng.normal(size=(9 * FEATURE_SHAPE[-1], 5)).astype(np.float32)
    planted_bias = rng.normal(size=5).astype(np.float32)
    return reference, planted_weights, planted_bias


def test_student_recovers_planted_map():
    reference, planted_weights, planted_bias = _planted_map(4)
    inspected = extract_patches(reference, 3) @ planted_weights + planted_bias
    valid = np.ones(FEATURE_SHAPE[:3], bool)
    student = RidgeStudent(patch_size=3, alpha=1e-9)

    state = student.fit(reference, inspected, valid, jax.random.key(0))
    prediction = student.predict(state, reference)

    # With alpha 1e-9 the 1e-6 relative floor in ridge_solve sets the penalty,
    # and 288 samples over 36 inputs leave float32 rounding as the main error.
    # The measured maximum error is 3e-5 for the prediction, 5e-6 for weights.
    np.testing.assert_allclose(state.weights, planted_weights, rtol=0, atol=1e-4)
    np.testing.assert_allclose(state.bias, planted_bias, rtol=0, atol=1e-4)
    np.testing.assert_allclose(prediction, inspected, rtol=0, atol=1e-4)


def test_student_fits_only_valid_pixels():
    reference, planted_weights, planted_bias = _planted_map(5)
    inspected = np.array(extract_patches(reference, 3) @ planted_weights + planted_bias)
    inspected[0, :4] = 50.0
    valid = np.ones(FEATURE_SHAPE[:3], bool)
    valid[0, :4] = False

    state = RidgeStudent(patch_size=3, alpha=1e-9).fit(reference, inspected, valid, jax.random.key(0))

    # The corrupted rows are masked out, so the planted map is still found.
    np.testing.assert_allclose(state.weights, planted_weights, rtol=0, atol=1e-4)
    np.testing.assert_allclose(state.bias, planted_bias, rtol=0, atol=1e-4)


def _patches_by_loop(features, patch_size):
    """Build patches pixel by pixel, following the extract_patches docstring."""
    batch, height, width, channels = features.shape
    radius = patch_size // 2
    out = np.zeros((batch, height, width, patch_size * patch_size * channels), features.dtype)
    for b in range(batch):
        for y in range(height):
            for x in range(width):
                for i in range(patch_size):
                    for j in range(patch_size):
                        row = min(max(y + i - radius, 0), height - 1)
                        col = min(max(x + j - radius, 0), width - 1)
                        start = (i * patch_size + j) * channels
                        out[b, y, x, start : start + channels] = features[b, row, col]
    return out


@pytest.mark.parametrize("patch_size", [1, 3, 5])
def test_extract_patches_matches_loop(patch_size):
    features = np.random.default_rng(6).normal(size=(2, 5, 7, 3)).astype(np.float32)

    patches = extract_patches(features, patch_size)

    np.testing.assert_array_equal(np.asarray(patches), _patches_by_loop(features, patch_size))


@pytest.mark.parametrize("patch_size", [0, 2, -3, 3.0])
def test_extract_patches_rejects_size(patch_size):
    features = np.zeros((1, 4, 4, 2), np.float32)

    with pytest.raises(ValueError, match=f"patch_size must be a positive odd integer; got {patch_size!r}"):
        extract_patches(features, patch_size)


def test_extract_patches_rejects_3d_input():
    with pytest.raises(ValueError, match=r"features must be \[B, h, w, C\]; got shape \(4, 4, 2\)"):
        extract_patches(np.zeros((4, 4, 2), np.float32), 3)


def test_predict_traces_once_per_shape():
    rng = np.random.default_rng(7)
    student = RidgeStudent(patch_size=3)
    first = rng.normal(size=FEATURE_SHAPE).astype(np.float32)
    second = rng.normal(size=FEATURE_SHAPE).astype(np.float32)
    state = student.fit(first, first, np.ones(FEATURE_SHAPE[:3], bool), jax.random.key(0))
    traces = []

    @jax.jit
    def predict(state, reference):
        traces.append(reference.shape)
        return student.predict(state, reference)

    predict(state, first)
    predict(state, second)
    assert len(traces) == 1

    predict(state, np.concatenate([first, second]))
    assert len(traces) == 2


def test_equal_students_share_compilation():
    # The pipeline passes the student as a static jit argument, so two equal
    # students must hash alike for a second pair to reuse the compilation.
    rng = np.random.default_rng(8)
    reference = rng.normal(size=FEATURE_SHAPE).astype(np.float32)
    valid = np.ones(FEATURE_SHAPE[:3], bool)
    traces = []

    def fit(student, reference, inspected, valid):
        traces.append(student)
        return student.fit(reference, inspected, valid, None)

    fit = jax.jit(fit, static_argnums=0)
    fit(RidgeStudent(patch_size=3, alpha=1e-3), reference, reference, valid)
    fit(RidgeStudent(patch_size=3, alpha=1e-3), reference + 1.0, reference, valid)
    assert len(traces) == 1

    fit(RidgeStudent(patch_size=3, alpha=1e-2), reference, reference, valid)
    assert len(traces) == 2
