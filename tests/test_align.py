"""Tests for tsjax.align: planted sub-pixel shifts, estimator choice and masks."""

import json
import warnings

import numpy as np
import pytest
from skimage.registration import phase_cross_correlation

from tsjax.align import align_pair, overlap_mask

SHAPE = (128, 160)

# The returned shift lies on a 1/20 px grid (upsample_factor=20). Over 12
# noise seeds the largest error measured with these patterns was 0.1 px, so
# 0.25 px leaves a margin while still failing on a one-pixel mistake.
SHIFT_TOLERANCE_PX = 0.25


def _noisy_pair(manhattan, shift, seed, *, white_std, fixed_std=0.0):
    """Return a (reference, inspected) pair whose layouts differ by ``shift``.

    Each image gets its own white noise of ``white_std``. Both images also get
    the same fixed speckle of ``fixed_std``, which is not shifted, as a
    detector's fixed-pattern noise would be.
    """
    rng = np.random.default_rng(seed)
    fixed = rng.normal(0.0, fixed_std, SHAPE)
    reference = manhattan(SHAPE) + fixed + rng.normal(0.0, white_std, SHAPE)
    inspected = manhattan(SHAPE, shift=shift) + fixed + rng.normal(0.0, white_std, SHAPE)
    return reference, inspected


@pytest.mark.parametrize("shift", [(3.4, -2.2), (-6.65, 9.25), (0.35, 0.8)])
@pytest.mark.parametrize("seed", [0, 1])
def test_align_recovers_subpixel_shift(manhattan, shift, seed):
    # White noise of std 0.05 on a pattern whose grey levels span about 0.65.
    reference, inspected = _noisy_pair(manhattan, shift, seed, white_std=0.05)

    alignment = align_pair(reference, inspected)

    assert abs(alignment.shift[0] - shift[0]) <= SHIFT_TOLERANCE_PX
    assert abs(alignment.shift[1] - shift[1]) <= SHIFT_TOLERANCE_PX
    assert alignment.correlation > 0.9


def test_align_noise_free_resamples_reference(manhattan):
    shift = (3.4, -2.2)
    reference = manhattan(SHAPE)
    inspected = manhattan(SHAPE, shift=shift)

    alignment = align_pair(reference, inspected)

    # Grey levels span about 0.65. The measured mean absolute error over the
    # overlap is 0.008, from a 0.05 px shift error and cubic-spline resampling
    # of sharp edges. A 1 px offset gives 0.04 and the opposite sign 0.16.
    error = np.abs(alignment.aligned_reference - inspected)[alignment.valid]
    assert error.mean() < 0.02
    assert alignment.aligned_reference.dtype == np.float32


def test_align_fills_outside_overlap(manhattan):
    reference, inspected = _noisy_pair(manhattan, (3.4, -2.2), 0, white_std=0.05)

    alignment = align_pair(reference, inspected)

    outside = ~alignment.valid
    assert outside.any()
    np.testing.assert_allclose(
        alignment.aligned_reference[outside], inspected[outside].astype(np.float32), rtol=0, atol=0
    )


def test_align_survives_fixed_speckle(manhattan):
    # A fixed speckle identical in both images (std 0.1) plus independent
    # white noise (std 0.1). Phase normalisation gives every frequency the
    # same weight, and the speckle's flat spectrum then dominates the
    # pattern's, so the phase estimate locks onto the speckle at (0, 0). The
    # shift is several px because the speckle's peak at (0, 0) pulls on a true
    # peak that lies within about 4 px of it.
    shift = (7.4, -5.3)
    reference, inspected = _noisy_pair(manhattan, shift, 0, white_std=0.1, fixed_std=0.1)

    phase_shift, _, _ = phase_cross_correlation(inspected, reference, upsample_factor=20, normalization="phase")
    alignment = align_pair(reference, inspected)

    assert np.max(np.abs(phase_shift)) < 0.5
    phase_candidate = alignment.candidates["phase"]["shift"]
    assert np.max(np.abs(phase_candidate)) < 0.5
    assert alignment.estimator != "phase"
    assert alignment.candidates[alignment.estimator]["shift"] == list(alignment.shift)
    assert alignment.candidates[alignment.estimator]["correlation"] > alignment.candidates["phase"]["correlation"]
    assert abs(alignment.shift[0] - shift[0]) <= SHIFT_TOLERANCE_PX
    assert abs(alignment.shift[1] - shift[1]) <= SHIFT_TOLERANCE_PX


def test_align_records_every_candidate(manhattan):
    reference, inspected = _noisy_pair(manhattan, (3.4, -2.2), 0, white_std=0.05)

    alignment = align_pair(reference, inspected)

    expected = {"phase", "phase_smoothed", "cross_correlation", "cross_correlation_smoothed"}
    assert set(alignment.candidates) == expected
    for candidate in alignment.candidates.values():
        assert set(candidate) == {"shift", "correlation", "sharpness"}
    # The best-verified candidate wins, and a later one must beat an earlier
    # one by more than 1e-6 to replace it.
    best = max(candidate["correlation"] for candidate in alignment.candidates.values())
    assert alignment.correlation >= best - 1e-6
    assert alignment.correlation == alignment.candidates[alignment.estimator]["correlation"]


def test_overlap_mask_hand_computed():
    # Shape (6, 8), shift (2.5, -1): pixel (y, x) reads the reference at
    # (y - 2.5, x + 1), which is inside [0, 5] x [0, 7] for rows y >= 3 and
    # columns x <= 6.
    mask = overlap_mask((6, 8), (2.5, -1.0))

    expected = np.zeros((6, 8), bool)
    expected[3:, :7] = True
    np.testing.assert_array_equal(mask, expected)


def test_overlap_mask_zero_shift_is_full():
    mask = overlap_mask((5, 7), (0.0, 0.0))

    assert mask.all()


def test_align_valid_matches_overlap_mask(manhattan):
    reference, inspected = _noisy_pair(manhattan, (3.4, -2.2), 0, white_std=0.05)

    alignment = align_pair(reference, inspected)

    np.testing.assert_array_equal(alignment.valid, overlap_mask(SHAPE, alignment.shift))


def test_align_rejects_different_shapes():
    reference = np.zeros((64, 80))
    inspected = np.zeros((64, 81))

    with pytest.raises(ValueError, match=r"reference shape \(64, 80\) differs from inspected shape \(64, 81\).*crop"):
        align_pair(reference, inspected)


def test_align_warns_on_unrelated_images():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(96, 96))
    inspected = rng.normal(size=(96, 96))

    with pytest.warns(UserWarning, match="alignment is uncertain.*same pattern"):
        align_pair(reference, inspected)


def test_align_summary_is_json(manhattan):
    reference, inspected = _noisy_pair(manhattan, (3.4, -2.2), 0, white_std=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        alignment = align_pair(reference, inspected)

    summary = alignment.summary()
    decoded = json.loads(json.dumps(summary))

    assert set(decoded) == {"shift", "estimator", "correlation", "sharpness", "valid_fraction", "candidates"}
    assert decoded["shift"] == list(alignment.shift)
    assert decoded["valid_fraction"] == pytest.approx(alignment.valid.mean(), abs=1e-12)
