"""Sub-pixel alignment of a reference image onto an inspected image.

Phase cross-correlation (Kuglin and Hines, 1975; sub-pixel refinement by
Guizar-Sicairos, Thurman and Fienup, "Efficient subpixel image registration
algorithms", Optics Letters 33(2), 2008) is the first choice. On noisy SEM
pairs the phase normalisation whitens the noise as much as the pattern, and
the estimate can collapse to (0, 0) even for a 20 px shift. So several
estimators are run and each estimate is verified by how well the aligned
images agree; the winner and every candidate's quality are recorded.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np
from scipy import ndimage
from skimage.registration import phase_cross_correlation

__all__ = ["Alignment", "align_pair", "shift_image", "overlap_mask", "peak_sharpness"]

# Candidate estimators: (name, normalisation passed to skimage, Gaussian
# pre-smoothing sigma in px). Smoothing at ~2 px suppresses SEM shot noise
# while keeping the pattern edges that carry the shift.
_ESTIMATORS = (
    ("phase", "phase", 0.0),
    ("phase_smoothed", "phase", 2.0),
    ("cross_correlation", None, 0.0),
    ("cross_correlation_smoothed", None, 2.0),
)

# An estimate must leave at least this fraction of the inspected image
# covered by the reference; smaller overlaps can correlate by chance.
_MIN_OVERLAP_FRACTION = 0.25


@dataclasses.dataclass(frozen=True)
class Alignment:
    """Result of aligning a reference image onto an inspected image.

    Attributes:
      shift: ``(dy, dx)`` in px. ``aligned(y, x) = reference(y - dy, x - dx)``.
      aligned_reference: ``[H, W]`` float32, the reference resampled onto the
        inspected image's grid. Outside the overlap it is filled with the
        inspected image so that the teacher sees no artificial edge there.
      valid: ``[H, W]`` bool, pixels covered by both images.
      estimator: Name of the estimator whose shift was kept.
      correlation: Pearson correlation of the smoothed images over the
        overlap after alignment, in [-1, 1] (the verification score).
      sharpness: Peak-to-sidelobe ratio of the winning correlation surface.
      candidates: Per estimator: shift, correlation and sharpness.
    """

    shift: tuple[float, float]
    aligned_reference: np.ndarray
    valid: np.ndarray
    estimator: str
    correlation: float
    sharpness: float
    candidates: dict

    def summary(self) -> dict:
        """Return the JSON-serialisable fields (no arrays)."""
        return {
            "shift": [float(self.shift[0]), float(self.shift[1])],
            "estimator": self.estimator,
            "correlation": float(self.correlation),
            "sharpness": float(self.sharpness),
            "valid_fraction": float(self.valid.mean()),
            "candidates": self.candidates,
        }


def shift_image(image: np.ndarray, shift: tuple[float, float]) -> np.ndarray:
    """Translate ``image`` by ``shift = (dy, dx)`` px with cubic-spline interpolation.

    Pixels whose source lies outside the image take the nearest edge value;
    use ``overlap_mask`` to know which ones.
    """
    return ndimage.shift(image.astype(np.float64), shift, order=3, mode="nearest").astype(np.float32)


def overlap_mask(shape: tuple[int, int], shift: tuple[float, float]) -> np.ndarray:
    """Return the ``[H, W]`` bool mask of pixels whose shifted source lies inside the image."""
    height, width = shape
    rows = np.arange(height) - shift[0]
    cols = np.arange(width) - shift[1]
    row_ok = (rows >= 0) & (rows <= height - 1)
    col_ok = (cols >= 0) & (cols <= width - 1)
    return row_ok[:, None] & col_ok[None, :]


def _cross_power_surface(reference: np.ndarray, inspected: np.ndarray, normalization) -> np.ndarray:
    product = np.fft.fft2(inspected) * np.conj(np.fft.fft2(reference))
    if normalization == "phase":
        product /= np.maximum(np.abs(product), np.finfo(np.float64).tiny)
    return np.real(np.fft.ifft2(product))


def peak_sharpness(surface: np.ndarray, exclude_radius: int = 5) -> float:
    """Peak-to-sidelobe ratio of a correlation surface.

    ``(peak - mean) / std`` of the surface outside a ``(2r+1)^2`` window
    around the peak (wrapping around the edges, as the surface is circular).
    Values above about 10 mean one clear peak; values near 3-5 mean noise.
    """
    peak_index = np.unravel_index(np.argmax(surface), surface.shape)
    rolled = np.roll(surface, (-peak_index[0] + exclude_radius, -peak_index[1] + exclude_radius), (0, 1))
    keep = np.ones(surface.shape, bool)
    keep[: 2 * exclude_radius + 1, : 2 * exclude_radius + 1] = False
    sidelobe = rolled[keep]
    spread = float(sidelobe.std())
    if spread == 0.0:
        return float("inf")
    return float((surface[peak_index] - sidelobe.mean()) / spread)


def _agreement(reference: np.ndarray, inspected: np.ndarray, shift: tuple[float, float]) -> float:
    valid = overlap_mask(inspected.shape, shift)
    if valid.mean() < _MIN_OVERLAP_FRACTION:
        return -1.0
    aligned = shift_image(reference, shift)[valid].astype(np.float64)
    target = inspected[valid].astype(np.float64)
    aligned -= aligned.mean()
    target -= target.mean()
    denominator = np.sqrt((aligned**2).sum() * (target**2).sum())
    if denominator == 0.0:
        return -1.0
    return float((aligned * target).sum() / denominator)


def align_pair(
    reference_image: np.ndarray,
    inspected_image: np.ndarray,
    *,
    upsample_factor: int = 20,
    verify_sigma: float = 2.0,
) -> Alignment:
    """Estimate the shift of the reference onto the inspected image and resample it.

    Every estimator in ``_ESTIMATORS`` proposes a shift. Each proposal is
    verified by the Pearson correlation between the Gaussian-smoothed
    inspected image and the shifted, smoothed reference over their overlap.
    The best-verified proposal wins, and ties go to the earlier estimator, so
    phase correlation wins when all agree.

    Args:
      reference_image: ``[H, W]`` float, the defect-free image.
      inspected_image: ``[H, W]`` float, the image to inspect (same shape).
      upsample_factor: Sub-pixel precision is ``1 / upsample_factor`` px.
      verify_sigma: Gaussian sigma in px applied before verification.

    Returns:
      An ``Alignment``.

    Raises:
      ValueError: if the shapes differ.
    """
    if reference_image.shape != inspected_image.shape:
        raise ValueError(
            f"reference shape {reference_image.shape} differs from inspected shape "
            f"{inspected_image.shape}; pad or crop to a common shape before alignment."
        )
    reference = reference_image.astype(np.float64)
    inspected = inspected_image.astype(np.float64)
    smooth_reference = ndimage.gaussian_filter(reference, verify_sigma)
    smooth_inspected = ndimage.gaussian_filter(inspected, verify_sigma)

    candidates = {}
    best = None
    for name, normalization, sigma in _ESTIMATORS:
        ref_in = ndimage.gaussian_filter(reference, sigma) if sigma else reference
        insp_in = ndimage.gaussian_filter(inspected, sigma) if sigma else inspected
        ref_in = ref_in - ref_in.mean()
        insp_in = insp_in - insp_in.mean()
        with warnings.catch_warnings():
            # skimage warns about low-contrast input that we centred on purpose.
            warnings.simplefilter("ignore")
            shift, _, _ = phase_cross_correlation(
                insp_in, ref_in, upsample_factor=upsample_factor, normalization=normalization
            )
        shift = (float(shift[0]), float(shift[1]))
        sharpness = peak_sharpness(_cross_power_surface(ref_in, insp_in, normalization))
        correlation = _agreement(smooth_reference, smooth_inspected, shift)
        candidates[name] = {
            "shift": [shift[0], shift[1]],
            "correlation": correlation,
            "sharpness": sharpness,
        }
        if best is None or correlation > candidates[best]["correlation"] + 1e-6:
            best = name

    chosen = candidates[best]
    shift = (chosen["shift"][0], chosen["shift"][1])
    if chosen["correlation"] < 0.5:
        warnings.warn(
            f"alignment is uncertain: the best estimator ({best}) leaves a correlation of "
            f"{chosen['correlation']:.3f} between the aligned images; check that the images "
            "show the same pattern.",
            stacklevel=2,
        )
    valid = overlap_mask(inspected.shape, shift)
    aligned = shift_image(reference_image, shift)
    aligned = np.where(valid, aligned, inspected_image).astype(np.float32)
    return Alignment(
        shift=shift,
        aligned_reference=aligned,
        valid=valid,
        estimator=best,
        correlation=chosen["correlation"],
        sharpness=chosen["sharpness"],
        candidates=candidates,
    )
