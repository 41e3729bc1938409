"""Tests for the ridge moments and their rectangle shortcut (tsjax.moments)."""

import jax
import numpy as np
import pytest

from tsjax.moments import is_rectangle, patch_moments

_SHAPE = (12, 11, 3)
_rectangle_moments = jax.jit(
    lambda ref, insp, weight, patch_size, margin: patch_moments(
        ref, insp, weight, patch_size, reference_margin=margin, rectangle=True
    ),
    static_argnums=(3, 4),
)
_general_moments = jax.jit(
    lambda ref, insp, weight, patch_size, margin: patch_moments(ref, insp, weight, patch_size, reference_margin=margin),
    static_argnums=(3, 4),
)

# (top, bottom, left, right) in map pixels; None is no weight at all.
_RECTANGLES = [
    (0, 12, 0, 11),  # the whole map: every border patch reads the frame
    (3, 9, 2, 8),  # interior
    (4, 5, 0, 11),  # one row, thinner than the 2r border rows
    (4, 6, 3, 5),  # two rows and columns: no core pixel
    (11, 12, 10, 11),  # a single corner pixel
    (0, 3, 7, 11),  # touching two edges
    None,
]


def _float64_inputs(ref: np.ndarray, weight: np.ndarray, patch_size: int, margin: int) -> np.ndarray:
    """The ``[h * w, k * k * C]`` patches, gathered pixel by pixel in float64."""
    radius = patch_size // 2
    framed = ref if margin else np.pad(ref, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    framed = framed.astype(np.float64)
    height, width = weight.shape
    return np.stack(
        [
            np.concatenate([framed[y + i, x + j] for i in range(patch_size) for j in range(patch_size)])
            for y in range(height)
            for x in range(width)
        ]
    )


def _float64_scatter(ref: np.ndarray, weight: np.ndarray, patch_size: int, margin: int) -> np.ndarray:
    """``sum_p w_p (x_p - mean)(x_p - mean)^T`` with patches gathered pixel by pixel."""
    inputs = _float64_inputs(ref, weight, patch_size, margin)
    samples = weight.reshape(-1).astype(np.float64)
    mean = samples @ inputs / max(samples.sum(), 1.0)
    centred = inputs - mean
    return (samples[:, None] * centred).T @ centred


@pytest.mark.parametrize("patch_size", [1, 3, 5])
@pytest.mark.parametrize("margin", [False, True])
def test_rectangle_scatter_matches_float64_definition(patch_size, margin):
    rng = np.random.default_rng(patch_size + 10 * margin)
    reach = patch_size // 2 if margin else 0
    ref = (rng.normal(size=(_SHAPE[0] + 2 * reach, _SHAPE[1] + 2 * reach, _SHAPE[2])) + 1.5).astype(np.float32)
    insp = rng.normal(size=_SHAPE).astype(np.float32)
    for rectangle in _RECTANGLES:
        weight = np.zeros(_SHAPE[:2], np.float32)
        if rectangle is not None:
            top, bottom, left, right = rectangle
            weight[top:bottom, left:right] = 1.0

        moments = _rectangle_moments(ref, insp, weight, patch_size, reach)

        expected = _float64_scatter(ref, weight, patch_size, reach)
        # float32 sums of at most 132 samples against float64: 1e-5 of the scale.
        scale = max(np.abs(expected).max(), 1e-3)
        np.testing.assert_allclose(moments.input_scatter, expected, atol=1e-5 * scale, err_msg=str(rectangle))


def test_is_rectangle_accepts_rectangles_and_empty_masks():
    mask = np.zeros((2, 8, 9), bool)
    mask[0, 2:5, 3:9] = True
    assert is_rectangle(mask)
    assert is_rectangle(mask[0, ::4, ::4])
    assert is_rectangle(np.zeros((5, 5), bool))


@pytest.mark.parametrize("holes", ["l_shape", "two_blocks", "hole"])
def test_is_rectangle_rejects_other_shapes(holes):
    mask = np.zeros((3, 8, 8), bool)
    mask[1, 1:7, 1:7] = True
    if holes == "l_shape":
        mask[1, 1:4, 4:7] = False
    elif holes == "two_blocks":
        mask[1, 3:5, :] = False
    else:
        mask[1, 3, 3] = False
    assert not is_rectangle(mask)


@pytest.mark.parametrize("patch_size", [1, 3, 5])
@pytest.mark.parametrize("margin", [False, True])
@pytest.mark.parametrize("rectangle", [False, True])
def test_moments_match_float64_definition(patch_size, margin, rectangle):
    # Every field, with fractional weights on the general path and a 0/1
    # rectangle on the shortcut, against the weighted sums written out.
    rng = np.random.default_rng(3 * patch_size + margin + 7 * rectangle)
    reach = patch_size // 2 if margin else 0
    ref = (rng.normal(size=(_SHAPE[0] + 2 * reach, _SHAPE[1] + 2 * reach, _SHAPE[2])) + 1.5).astype(np.float32)
    insp = (rng.normal(size=(*_SHAPE[:2], 4)) - 2.0).astype(np.float32)
    if rectangle:
        weight = np.zeros(_SHAPE[:2], np.float32)
        weight[2:10, 1:9] = 1.0
    else:
        weight = rng.uniform(0.0, 2.0, size=_SHAPE[:2]).astype(np.float32)
        weight[rng.random(_SHAPE[:2]) < 0.3] = 0.0

    moments = (_rectangle_moments if rectangle else _general_moments)(ref, insp, weight, patch_size, reach)

    inputs = _float64_inputs(ref, weight, patch_size, reach)
    targets = insp.reshape(-1, insp.shape[-1]).astype(np.float64)
    samples = weight.reshape(-1).astype(np.float64)
    count = samples.sum()
    input_mean = samples @ inputs / count
    target_mean = samples @ targets / count
    centred_inputs, centred_targets = inputs - input_mean, targets - target_mean
    expected = {
        "count": count,
        "input_mean": input_mean,
        "target_mean": target_mean,
        "input_scatter": (samples[:, None] * centred_inputs).T @ centred_inputs,
        "cross_scatter": (samples[:, None] * centred_inputs).T @ centred_targets,
        "target_energy": samples @ (centred_targets**2).sum(axis=1),
    }
    for field, value in expected.items():
        scale = max(np.abs(value).max(), 1e-3)
        np.testing.assert_allclose(getattr(moments, field), value, atol=1e-5 * scale, err_msg=field)
