"""Tests for the per-pixel local ridge student.

Expected values come from a float64 NumPy loop that fits every pixel's
window with ``numpy.linalg.solve`` in the primal form, written here from the
objective in ``local_ridge_predict``'s docstring.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax import pipeline
from tsjax.patches import extract_patches
from tsjax.students import STUDENTS, LocalRidgeStudent, local_ridge_predict
from tsjax.students import local_ridge as local_ridge_module


# One jitted entry point, so that tests with equal settings and shapes share
# a compiled executable.
_predict = functools.partial(
    jax.jit,
    static_argnames=(
        "patch_size", "window", "leave_out", "alpha", "prior_alpha", "form", "components", "max_block_mb"
    ),
)(local_ridge_predict)

# n = 24 samples per window (5x5 minus the centre) and d = 27 features.
_SMALL = dict(patch_size=3, window=5, leave_out=1, alpha=0.1, max_block_mb=0.01)


def _random_maps(seed, batch=2, height=9, width=11, channels=3, channels_out=2):
    rng = np.random.default_rng(seed)
    # A large channel mean checks that centring does not cost float32 digits.
    ref = rng.normal(size=(batch, height, width, channels)).astype(np.float32) + 5.0
    insp = rng.normal(size=(batch, height, width, channels_out)).astype(np.float32)
    valid = rng.random((batch, height, width)) > 0.2
    return ref, insp, valid


def _penalty(alpha, trace, dim, samples):
    return max(alpha * trace / dim, 1e-5 * trace / samples)


def _global_ridge(patches, targets, valid, alpha):
    inputs = patches[valid]
    outputs = targets[valid]
    input_mean, output_mean = inputs.mean(0), outputs.mean(0)
    centred = inputs - input_mean
    scatter = centred.T @ centred
    dim = scatter.shape[0]
    penalty = max(alpha * np.trace(scatter) / dim, 1e-6 * np.trace(scatter) / dim + 1e-12)
    weights = np.linalg.solve(scatter + penalty * np.eye(dim), centred.T @ (outputs - output_mean))
    return patches @ weights + output_mean - input_mean @ weights


def _numpy_local_ridge(ref, insp, valid, *, patch_size, window, leave_out, alpha, prior_alpha=None):
    patches = np.asarray(extract_patches(ref, patch_size), np.float64)
    targets = np.asarray(insp, np.float64)
    batch, height, width, _ = ref.shape
    radius, held = window // 2, leave_out // 2
    output = np.zeros(targets.shape)
    for b in range(batch):
        base = np.zeros(targets.shape[1:])
        if prior_alpha is not None:
            base = _global_ridge(patches[b], targets[b], valid[b], prior_alpha)
        residual = targets[b] - base
        for y in range(height):
            for x in range(width):
                inputs, outputs = [], []
                for dy in range(-radius, radius + 1):
                    for dx in range(-radius, radius + 1):
                        if leave_out and max(abs(dy), abs(dx)) <= held:
                            continue
                        yy, xx = y + dy, x + dx
                        if 0 <= yy < height and 0 <= xx < width and valid[b, yy, xx]:
                            inputs.append(patches[b, yy, xx])
                            outputs.append(residual[yy, xx])
                inputs, outputs = np.array(inputs), np.array(outputs)
                samples = (2 * radius + 1) ** 2 - leave_out**2
                input_mean, output_mean = inputs.mean(0), outputs.mean(0)
                centred = inputs - input_mean
                scatter = centred.T @ centred
                penalty = _penalty(alpha, np.trace(scatter), scatter.shape[0], samples)
                weights = np.linalg.solve(scatter + penalty * np.eye(len(scatter)), centred.T @ (outputs - output_mean))
                output[b, y, x] = base[y, x] + output_mean + (patches[b, y, x] - input_mean) @ weights
    return output


@pytest.mark.parametrize("form, leave_out", [("dual", 1), ("primal", 1), ("dual", 3), ("primal", 0)])
def test_local_ridge_matches_numpy_loop(form, leave_out):
    ref, insp, valid = _random_maps(0)
    settings = dict(_SMALL, leave_out=leave_out)
    expected = _numpy_local_ridge(ref, insp, valid, **{k: settings[k] for k in ("patch_size", "window", "leave_out", "alpha")})
    # The tiny block budget forces one row per block, so blocks are stitched.
    actual = _predict(ref, insp, valid, form=form, **settings)
    # float32 solves of systems with condition number below about 1e3.
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4, atol=1e-4)


def test_local_ridge_prior_matches_numpy_loop():
    ref, insp, valid = _random_maps(1)
    settings = dict(patch_size=3, window=5, leave_out=1, alpha=1.0, prior_alpha=1e-2)
    expected = _numpy_local_ridge(ref, insp, valid, **settings)
    actual = _predict(ref, insp, valid, max_block_mb=0.01, **settings)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4, atol=1e-4)


def test_dual_and_primal_forms_agree():
    ref, insp, valid = _random_maps(0)
    dual = _predict(ref, insp, valid, form="dual", **_SMALL)
    primal = _predict(ref, insp, valid, form="primal", **_SMALL)
    # The forms are algebraically equal (push-through identity); the
    # tolerance covers float32 rounding of two different solves.
    np.testing.assert_allclose(np.asarray(dual), np.asarray(primal), rtol=1e-5, atol=1e-5)


def test_alpha_zero_with_more_features_than_samples_raises():
    ref, insp, valid = _random_maps(3, channels=4)
    # window 5 leaving out the centre gives 24 samples for 36 features.
    with pytest.raises(ValueError, match="alpha=0 with 24 samples per window and 36 features"):
        local_ridge_predict(ref, insp, valid, patch_size=3, window=5, leave_out=1, alpha=0.0)


def test_alpha_zero_dual_form_raises():
    ref, insp, valid = _random_maps(3, channels=1)
    with pytest.raises(ValueError, match="alpha=0 makes the dual system singular"):
        local_ridge_predict(ref, insp, valid, patch_size=1, window=5, leave_out=1, alpha=0.0, form="dual")


def test_alpha_zero_with_more_samples_than_features_solves():
    # 48 samples for 9 features: the primal least-squares fit is well posed.
    ref, insp, valid = _random_maps(4, channels=1, height=12, width=12)
    valid = np.ones_like(valid)
    settings = dict(patch_size=3, window=7, leave_out=1, alpha=0.0)
    actual = _predict(ref, insp, valid, **settings)
    expected = _numpy_local_ridge(ref, insp, valid, **settings)
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-3, atol=1e-3)


def test_more_features_than_samples_is_finite_for_tiny_alpha():
    rng = np.random.default_rng(5)
    ref = rng.normal(size=(1, 10, 10, 16)).astype(np.float32)
    insp = rng.normal(size=(1, 10, 10, 4)).astype(np.float32)
    # A constant corner (zero scatter) and an all-invalid corner are the
    # windows most likely to break the solve.
    ref[0, :5, :5] = 1.0
    valid = np.ones((1, 10, 10), bool)
    valid[0, 5:, 5:] = False
    # 8 samples per window for 144 features, and a penalty far below float32
    # resolution unless the floors hold.
    actual = _predict(ref, insp, valid, patch_size=3, window=3, leave_out=1, alpha=1e-12)
    assert np.isfinite(np.asarray(actual)).all()


def test_leave_out_keeps_planted_defect_visible():
    # The inspected map is an exact linear function of the reference plus a
    # defect at one pixel. With 40 features and a 7x7 window, a fit that
    # keeps the centre has leverage near 40/49 there and absorbs most of the
    # defect; leaving the centre out recovers the exact map from the other
    # 48 samples, so the residual is the full defect.
    rng = np.random.default_rng(6)
    ref = rng.normal(size=(1, 15, 15, 40)).astype(np.float32)
    insp = ref @ rng.normal(size=(40, 2)).astype(np.float32)
    insp[0, 7, 7] += 5.0
    valid = np.ones((1, 15, 15), bool)
    settings = dict(patch_size=1, window=7, alpha=1e-6)
    kept = np.asarray(local_ridge_predict(ref, insp, valid, leave_out=0, **settings))
    left = np.asarray(local_ridge_predict(ref, insp, valid, leave_out=1, **settings))
    np.testing.assert_allclose((insp - left)[0, 7, 7], [5.0, 5.0], atol=0.05)
    assert np.abs(insp - kept)[0, 7, 7].max() < 1.0
    # Full windows (48 samples) that miss the defect fit the exact map.
    np.testing.assert_allclose(left[0, 3, 3:12], insp[0, 3, 3:12], atol=0.05)


def test_pca_with_every_component_changes_nothing():
    ref, insp, valid = _random_maps(0)
    # With every component kept, PCA is a rotation of the channels, and a
    # rotation leaves the ridge fit (penalty on |W|^2) unchanged.
    full = _predict(ref, insp, valid, form="dual", **_SMALL)
    rotated = _predict(ref, insp, valid, form="dual", components=3, **_SMALL)
    np.testing.assert_allclose(np.asarray(rotated), np.asarray(full), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="components must be an integer in \\[0, 3\\]"):
        local_ridge_predict(ref, insp, valid, components=4, **_SMALL)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(window=4), "window must be a positive odd integer"),
        (dict(leave_out=2), "leave_out must be 0 or a positive odd integer"),
        (dict(leave_out=5), "leave_out=5 leaves no sample"),
        (dict(alpha=-1.0), "alpha must be >= 0"),
        (dict(form="cholesky"), "form='cholesky' is unknown"),
    ],
)
def test_invalid_settings_raise(settings, message):
    ref, insp, valid = _random_maps(8)
    arguments = dict(patch_size=3, window=5, leave_out=1, alpha=0.1)
    arguments.update(settings)
    with pytest.raises(ValueError, match=message):
        local_ridge_predict(ref, insp, valid, **arguments)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(prior="globl"), "prior='globl' is unknown"),
        (dict(form="dul"), "form='dul' is unknown"),
        (dict(window=-3), "window must be a positive odd integer"),
        (dict(local_alpha=-1.0), r"local_alpha must be >= 0; got -1.0 \(on the command line: --student_options"),
        (dict(alpha=-1.0), r"alpha, the global prior's penalty \(--alpha\), must be >= 0"),
    ],
)
def test_student_rejects_settings_when_built(settings, message):
    with pytest.raises(ValueError, match=message):
        LocalRidgeStudent(**settings)


def test_student_names_local_alpha_when_singular():
    ref, insp, valid = _random_maps(10)
    student = LocalRidgeStudent(window=5, local_alpha=0.0)

    # 24 samples per window against 3 x 3 x 3 = 27 features.
    with pytest.raises(ValueError, match=r"local_alpha=0 leaves each window's ridge system singular \(24 samples"):
        student.fit(ref, insp, valid, None)


def test_student_fits_under_jit_once_and_checks_shapes():
    ref, insp, valid = _random_maps(9)
    student = LocalRidgeStudent(window=5)
    traces = []

    @jax.jit
    def fit(ref, insp, valid):
        traces.append(1)
        return student.fit(ref, insp, valid, None)

    fit(ref, insp, valid)
    state = fit(ref + 1.0, insp, valid)
    assert len(traces) == 1
    np.testing.assert_array_equal(np.asarray(student.predict(state, ref)), np.asarray(state.prediction))
    assert np.isfinite(np.asarray(state.prediction)).all()
    with pytest.raises(ValueError, match="only predicts the pair it was fitted on"):
        student.predict(state, ref[:, :-1])


def test_student_is_registered_and_transductive():
    assert STUDENTS["local_ridge"] is LocalRidgeStudent
    assert LocalRidgeStudent.transductive


def test_block_memory_of_a_4096_image_stays_bounded():
    # A 4096 x 4096 image gives [1, 1024, 1024, 64] maps at layer1 and
    # [1, 512, 512, 128] at layer2. Compiling (not running) the fit reports
    # XLA's temporary buffer size for these shapes.
    student = LocalRidgeStudent()
    for height, channels in ((1024, 64), (512, 128)):
        maps = jax.ShapeDtypeStruct((1, height, height, channels), jnp.float32)
        mask = jax.ShapeDtypeStruct((1, height, height), jnp.float32)
        compiled = jax.jit(lambda r, y, v: student.fit(r, y, v, None)).lower(maps, maps, mask).compile()
        temp_bytes = compiled.memory_analysis().temp_size_in_bytes
        map_bytes = height * height * channels * 4
        # Padded copies of the maps plus one block; far below 24 GiB.
        assert temp_bytes < 8 * map_bytes + 4 * student.max_block_mb * 2**20, (height, temp_bytes)


def test_block_rows_follow_the_budget():
    # Dual: the solver takes the cache-sized share of pixels, the band the rest of the budget.
    layout = local_ridge_module.block_rows("dual", 48, 7, 576, 64, True, 1024, 1, 256.0)
    solver_bytes = local_ridge_module._solver_bytes("dual", 48, 7, 576) * 1024
    band_bytes = local_ridge_module._band_bytes("dual", 7, 576, 64, True) * 1024
    assert layout.solver == 1
    assert layout.band * band_bytes + solver_bytes <= 256 * 2**20
    assert (layout.band + 1) * band_bytes + solver_bytes > 256 * 2**20
    narrow = local_ridge_module.block_rows("dual", 48, 7, 576, 64, True, 60, 1, 256.0)
    assert narrow.solver == 4
    assert narrow.band % narrow.solver == 0
    # Primal: the d x d systems set the rows, and a band is one solver call.
    primal = local_ridge_module.block_rows("primal", 48, 7, 576, 64, True, 1024, 1, 256.0)
    per_pixel = local_ridge_module._solver_bytes("primal", 48, 7, 576)
    assert primal.band == primal.solver
    assert primal.solver == max(1, 256 * 2**20 // (per_pixel * 1024))


def test_pipeline_rejects_states_fitted_elsewhere():
    image = np.zeros((64, 64), np.float32)
    student = LocalRidgeStudent()
    with pytest.raises(ValueError, match="cannot be fitted on training pairs"):
        pipeline.fit_students(student, {}, [image], [image], [image > 0], ("layer1",), jax.random.key(0))
    with pytest.raises(ValueError, match="pass states=None"):
        pipeline.detect(image, image, {}, student=student, states={"layer1": None})
