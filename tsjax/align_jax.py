"""``tsjax.align.align_pair`` in JAX, for one pair on a padded canvas.

The method is the NumPy version's. Four estimators (phase correlation and
plain cross-correlation, each on the raw and on the Gaussian-smoothed
images) find the correlation peak and refine it to ``1 / upsample_factor``
px with an upsampled DFT around it (Guizar-Sicairos, Thurman and Fienup,
"Efficient subpixel image registration algorithms", Optics Letters 33(2),
2008). Each estimate is verified by the Pearson correlation of the smoothed
images after a cubic-spline shift, and the best one is kept. The port runs in
float32 instead of float64, so on a near tie between two estimators it can
keep the other one (their shifts then differ by about one refinement step).

The image lies at the canvas's top-left corner with its own size, which may
be smaller than the canvas. Cross-correlation is circular over the image's
own size, so when the image is smaller than the canvas the DFTs of length
``n`` are computed with Bluestein's chirp-z algorithm (1970) on FFTs of a
fixed length. One compiled function thus serves every image size up to the
canvas, at a price: for a 480 px pair this path measured about 0.3 s on the
2-core CPU, against 0.04 s with plain FFTs (``exact=True``).

The cubic-spline shift reproduces ``scipy.ndimage.shift(order=3,
mode='nearest')`` inside the overlap: the B-spline prefilter is the
symmetric filter ``sqrt(3) * z^|k|`` with ``z = sqrt(3) - 2`` (truncated at
``_PREFILTER_RADIUS`` taps, where ``|z|^k`` falls below float32 precision)
applied to the edge-extended image, followed by 4-tap B-spline
interpolation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from tsjax.align import _ESTIMATORS, _MIN_OVERLAP_FRACTION
from tsjax.canvas import gaussian_filter_reflect, replicate_edges

__all__ = ["ESTIMATOR_NAMES", "CanvasAlignment", "align_on_canvas"]

ESTIMATOR_NAMES = tuple(name for name, _, _ in _ESTIMATORS)

# Taps on each side of the B-spline prefilter: |sqrt(3) - 2|^17 < 2e-10.
_PREFILTER_RADIUS = 16
_SPLINE_POLE = math.sqrt(3.0) - 2.0

# skimage's floor on |cross-power| in the phase normalisation (100 float64 eps).
_PHASE_FLOOR = 100 * float(np.finfo(np.float64).eps)

# Half side of the window around the peak that ``peak_sharpness`` excludes.
_SHARPNESS_EXCLUDE = 5

# A winner must beat the earlier candidates by this much, as in align_pair.
_TIE_TOLERANCE = 1e-6


class CanvasAlignment(NamedTuple):
    """Alignment of one pair, as arrays (see ``tsjax.align.Alignment``).

    Attributes:
      shift: ``[2]`` float32 ``(dy, dx)`` of the kept estimator.
      aligned_reference: ``[Hc, Wc]`` float32, the shifted reference inside
        the overlap and the inspected image elsewhere.
      estimator: ``[]`` int32 index into ``ESTIMATOR_NAMES``.
      correlation: ``[]`` verification score of the kept estimator.
      sharpness: ``[]`` peak-to-sidelobe ratio of its correlation surface.
      candidate_shifts: ``[4, 2]`` per estimator.
      candidate_correlations: ``[4]`` per estimator.
      candidate_sharpness: ``[4]`` per estimator.
    """

    shift: jax.Array
    aligned_reference: jax.Array
    estimator: jax.Array
    correlation: jax.Array
    sharpness: jax.Array
    candidate_shifts: jax.Array
    candidate_correlations: jax.Array
    candidate_sharpness: jax.Array


def _chirp(length: int, size: jax.Array, sign: float) -> jax.Array:
    # exp(sign * i * pi * j^2 / n), with j^2 reduced modulo 2n in integers
    # so that the phase stays exact for large j.
    index = jnp.arange(length, dtype=jnp.int32)
    phase = jnp.mod(index * index, 2 * size).astype(jnp.float32) / size.astype(jnp.float32)
    return jnp.exp(1j * sign * jnp.pi * phase).astype(jnp.complex64)


def _bluestein(values: jax.Array, size: jax.Array, axis: int, inverse: bool) -> jax.Array:
    # DFT of length ``size`` along ``axis`` of a buffer of static length:
    # jk = (j^2 + k^2 - (k - j)^2) / 2 turns the DFT into a convolution with
    # a chirp, which FFTs of a fixed power-of-two length compute.
    values = jnp.moveaxis(values, axis, -1)
    length = values.shape[-1]
    fft_length = 1 << (2 * length - 1).bit_length()
    chirp = _chirp(length, size, 1.0 if inverse else -1.0)
    inside = jnp.arange(length) < size
    chirp = jnp.where(inside, chirp, 0)
    kernel = jnp.zeros(fft_length, jnp.complex64)
    kernel = kernel.at[:length].set(jnp.conj(chirp))
    kernel = kernel.at[fft_length - length + 1 :].add(jnp.conj(chirp[1:][::-1]))
    signal = jnp.fft.fft(values * chirp, n=fft_length, axis=-1)
    result = jnp.fft.ifft(signal * jnp.fft.fft(kernel), axis=-1)[..., :length] * chirp
    if inverse:
        result = result / size.astype(jnp.float32)
    return jnp.moveaxis(result, -1, axis)


def _dft2(values: jax.Array, rows: jax.Array, cols: jax.Array, *, inverse: bool, exact: bool) -> jax.Array:
    # 2-D DFT over the last two axes, of length (rows, cols).
    if exact:
        return jnp.fft.ifft2(values) if inverse else jnp.fft.fft2(values)
    values = _bluestein(values.astype(jnp.complex64), rows, -2, inverse)
    return _bluestein(values, cols, -1, inverse)


def _upsampled_dft_kernel(region: int, length: int, size: jax.Array, offset: jax.Array, factor: int) -> jax.Array:
    # Rows u of exp(-2 pi i (u - offset) f_j) with f_j = fftfreq(size, factor),
    # zero past ``size``; the phase is reduced modulo factor * size in integers.
    index = jnp.arange(length, dtype=jnp.int32)
    frequency = jnp.where(index <= (size - 1) // 2, index, index - size)
    steps = jnp.arange(region, dtype=jnp.int32)[:, None] - offset
    period = factor * size
    phase = jnp.mod(steps * frequency[None, :], period).astype(jnp.float32) / period.astype(jnp.float32)
    kernel = jnp.exp(-2j * jnp.pi * phase).astype(jnp.complex64)
    return jnp.where(index[None, :] < size, kernel, 0)


def _flat_argmax(values: jax.Array, inside: jax.Array) -> tuple[jax.Array, jax.Array]:
    # jnp.argmax's value-and-index reduction ran about 1 ms per 480 px map on
    # CPU, 8 ms per pair over the estimators. A max, then the first index
    # holding it, are two plain reductions with the same result for finite
    # values (the images are checked for NaN and inf).
    masked = jnp.where(inside, values, -jnp.inf).reshape(-1)
    index = jnp.arange(masked.size)
    flat = jnp.min(jnp.where(masked == masked.max(), index, masked.size - 1))
    return flat // values.shape[1], flat % values.shape[1]


def _cross_power(src_freq: jax.Array, target_freq: jax.Array, inside: jax.Array, phase: bool) -> jax.Array:
    # skimage.registration.phase_cross_correlation's image product.
    product = src_freq * jnp.conj(target_freq)
    if phase:
        product = product / jnp.maximum(jnp.abs(product), _PHASE_FLOOR)
    return jnp.where(inside, product, 0)


def _split_real_pair(
    spectrum: jax.Array, rows: jax.Array, cols: jax.Array, exact: bool
) -> tuple[jax.Array, jax.Array]:
    # DFT(a + i b) = A + i B for real a, b; A and B are Hermitian, so
    # A[k] = (Z[k] + conj(Z[-k])) / 2 and B[k] = (Z[k] - conj(Z[-k])) / 2i.
    if exact:
        # The DFT spans the whole canvas, so Z[-k] is a flip and a shift by
        # one, which runs several times faster than the gather below.
        mirrored = jnp.conj(jnp.roll(jnp.flip(spectrum, (0, 1)), 1, (0, 1)))
    else:
        row_index = jnp.mod(-jnp.arange(spectrum.shape[0]), rows)
        col_index = jnp.mod(-jnp.arange(spectrum.shape[1]), cols)
        mirrored = jnp.conj(spectrum[row_index][:, col_index])
    return (spectrum + mirrored) / 2, (spectrum - mirrored) / 2j


def _refine_peak(
    product: jax.Array,
    surface: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    inside: jax.Array,
    upsample_factor: int,
) -> jax.Array:
    # The rest of phase_cross_correlation: the integer peak of |surface|,
    # then the peak of the upsampled DFT in a 1.5 px window around it.
    peak_row, peak_col = _flat_argmax(jnp.abs(surface), inside)
    peak_row = jnp.where(peak_row > rows // 2, peak_row - rows, peak_row)
    peak_col = jnp.where(peak_col > cols // 2, peak_col - cols, peak_col)
    region = int(math.ceil(upsample_factor * 1.5))
    centre = region // 2
    row_kernel = _upsampled_dft_kernel(region, product.shape[0], rows, centre - peak_row * upsample_factor, upsample_factor)
    col_kernel = _upsampled_dft_kernel(region, product.shape[1], cols, centre - peak_col * upsample_factor, upsample_factor)
    upsampled = jnp.conj(row_kernel @ jnp.conj(product) @ col_kernel.T)
    fine_row, fine_col = _flat_argmax(jnp.abs(upsampled), jnp.ones(upsampled.shape, bool))
    return jnp.stack(
        [
            peak_row.astype(jnp.float32) + (fine_row - centre).astype(jnp.float32) / upsample_factor,
            peak_col.astype(jnp.float32) + (fine_col - centre).astype(jnp.float32) / upsample_factor,
        ]
    )


def _peak_sharpness(surface: jax.Array, rows: jax.Array, cols: jax.Array, inside: jax.Array) -> jax.Array:
    # (peak - mean) / std of the circular surface outside a window around the peak.
    peak_row, peak_col = _flat_argmax(surface, inside)
    row_offset = jnp.mod(jnp.arange(surface.shape[0]) - peak_row + _SHARPNESS_EXCLUDE, rows)
    col_offset = jnp.mod(jnp.arange(surface.shape[1]) - peak_col + _SHARPNESS_EXCLUDE, cols)
    window = (row_offset[:, None] <= 2 * _SHARPNESS_EXCLUDE) & (col_offset[None, :] <= 2 * _SHARPNESS_EXCLUDE)
    keep = inside & ~window
    count = keep.sum()
    mean = jnp.where(keep, surface, 0).sum() / count
    spread = jnp.sqrt(jnp.where(keep, (surface - mean) ** 2, 0).sum() / count)
    peak = surface[peak_row, peak_col]
    return jnp.where(spread > 0, (peak - mean) / spread, jnp.inf)


def _spline_coefficients(image: jax.Array, extent: jax.Array) -> jax.Array:
    # Cubic B-spline coefficients of the edge-extended image, on the canvas
    # plus 2 px per side (the taps of an interpolation at the image edge).
    extended = replicate_edges(image[None], extent[None], 1)[0]
    margin = _PREFILTER_RADIUS + 2
    extended = jnp.pad(extended, margin, mode="edge")
    offsets = np.arange(-_PREFILTER_RADIUS, _PREFILTER_RADIUS + 1)
    taps = [float(tap) for tap in math.sqrt(3.0) * _SPLINE_POLE ** np.abs(offsets)]
    height = extended.shape[0] - 2 * _PREFILTER_RADIUS
    width = extended.shape[1] - 2 * _PREFILTER_RADIUS
    # Shifted slices fuse into one pass; a one-channel convolution is far
    # slower on CPU.
    rows = sum(taps[k] * extended[k : k + height, :] for k in range(len(taps)))
    return sum(taps[k] * rows[:, k : k + width] for k in range(len(taps)))


def _spline_weights(fraction: jax.Array) -> tuple[jax.Array, ...]:
    # Cubic B-spline weights of the samples at floor - 1 ... floor + 2.
    cube = fraction**3
    square = fraction**2
    return (
        (1.0 - fraction) ** 3 / 6.0,
        (3.0 * cube - 6.0 * square + 4.0) / 6.0,
        (-3.0 * cube + 3.0 * square + 3.0 * fraction + 1.0) / 6.0,
        cube / 6.0,
    )


def _spline_shift(coefficients: jax.Array, shift: jax.Array) -> jax.Array:
    # Output pixel i reads the spline at i - shift. The integer part is a
    # roll; pixels whose source lies outside the image read wrapped values,
    # which every caller masks out.
    height = coefficients.shape[0] - 4
    width = coefficients.shape[1] - 4
    result = coefficients
    for axis, length in ((0, height), (1, width)):
        source = -shift[axis]
        whole = jnp.floor(source)
        weights = _spline_weights(source - whole)
        whole = whole.astype(jnp.int32)
        acc = 0.0
        for tap, weight in enumerate(weights):
            moved = jnp.roll(result, -(whole - 1 + tap), axis=axis)
            acc = acc + weight * jax.lax.slice_in_dim(moved, 2, 2 + length, axis=axis)
        result = acc
    return result


def _overlap(shape: tuple[int, int], rows: jax.Array, cols: jax.Array, shift: jax.Array) -> jax.Array:
    # tsjax.align.overlap_mask on the canvas: the pixel and its source both
    # lie in the image.
    canvas_rows = jnp.arange(shape[0])
    canvas_cols = jnp.arange(shape[1])
    source_rows = canvas_rows - shift[0]
    source_cols = canvas_cols - shift[1]
    row_ok = (source_rows >= 0) & (source_rows <= (rows - 1).astype(jnp.float32)) & (canvas_rows < rows)
    col_ok = (source_cols >= 0) & (source_cols <= (cols - 1).astype(jnp.float32)) & (canvas_cols < cols)
    return row_ok[:, None] & col_ok[None, :]


def _agreement(
    reference_coefficients: jax.Array,
    smooth_inspected: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    shift: jax.Array,
) -> jax.Array:
    valid = _overlap(smooth_inspected.shape, rows, cols, shift)
    fraction = valid.sum() / (rows * cols).astype(jnp.float32)
    aligned = _spline_shift(reference_coefficients, shift)
    count = jnp.maximum(valid.sum(), 1)
    aligned = jnp.where(valid, aligned - jnp.where(valid, aligned, 0).sum() / count, 0)
    target = jnp.where(valid, smooth_inspected - jnp.where(valid, smooth_inspected, 0).sum() / count, 0)
    denominator = jnp.sqrt((aligned**2).sum() * (target**2).sum())
    score = (aligned * target).sum() / jnp.where(denominator > 0, denominator, 1.0)
    return jnp.where((fraction < _MIN_OVERLAP_FRACTION) | (denominator == 0), -1.0, score)


def align_on_canvas(
    reference: ArrayLike,
    inspected: ArrayLike,
    size: ArrayLike,
    *,
    upsample_factor: int = 20,
    verify_sigma: float = 2.0,
    exact: bool = False,
) -> CanvasAlignment:
    """Align one reference onto one inspected image that share a canvas.

    Call it under ``jax.jit`` (with ``jax.vmap`` or ``jax.lax.map`` for a
    batch); the keyword arguments must be static.

    Args:
      reference: ``[Hc, Wc]`` float, the reference image in the canvas's
        top-left ``size`` block (values elsewhere are ignored).
      inspected: ``[Hc, Wc]`` float, the inspected image, same layout.
      size: ``[2]`` int, the images' ``(height, width)``.
      upsample_factor: Sub-pixel precision is ``1 / upsample_factor`` px.
      verify_sigma: Gaussian sigma in px applied before verification and
        for the smoothed estimators.
      exact: True when ``size`` equals the canvas shape, which allows plain
        FFTs instead of Bluestein's algorithm.

    Returns:
      A ``CanvasAlignment``.
    """
    reference = jnp.asarray(reference, jnp.float32)
    inspected = jnp.asarray(inspected, jnp.float32)
    size = jnp.asarray(size, jnp.int32)
    rows, cols = size[0], size[1]
    extent = jnp.stack([0, 0, rows, cols]).astype(jnp.int32)
    canvas_rows = jnp.arange(reference.shape[0])
    canvas_cols = jnp.arange(reference.shape[1])
    inside = (canvas_rows[:, None] < rows) & (canvas_cols[None, :] < cols)
    count = (rows * cols).astype(jnp.float32)

    def centred(image: jax.Array) -> jax.Array:
        image = jnp.where(inside, image, 0)
        return jnp.where(inside, image - image.sum() / count, 0)

    smooth = gaussian_filter_reflect(jnp.stack([reference, inspected]), jnp.stack([extent, extent]), verify_sigma)
    smooth_reference, smooth_inspected = smooth[0], smooth[1]
    # Real images pair up as the real and imaginary part of one complex
    # DFT, which halves the transforms: one forward per smoothing level,
    # one inverse per two correlation surfaces.
    spectra = {}
    for sigma in sorted({sigma for _, _, sigma in _ESTIMATORS}):
        pair = (smooth_reference, smooth_inspected) if sigma == verify_sigma else (reference, inspected)
        if sigma not in (0.0, verify_sigma):
            pair = tuple(gaussian_filter_reflect(image[None], extent[None], sigma)[0] for image in pair)
        packed = centred(pair[0]) + 1j * centred(pair[1])
        spectra[sigma] = _split_real_pair(_dft2(packed, rows, cols, inverse=False, exact=exact), rows, cols, exact)
    products = jnp.stack(
        [
            _cross_power(spectra[sigma][1], spectra[sigma][0], inside, normalization == "phase")
            for _, normalization, sigma in _ESTIMATORS
        ]
    )
    if len(_ESTIMATORS) % 2:
        products = jnp.concatenate([products, jnp.zeros_like(products[:1])])
    both = _dft2(products[0::2] + 1j * products[1::2], rows, cols, inverse=True, exact=exact)
    surfaces = jnp.stack([jnp.real(both), jnp.imag(both)], axis=1).reshape(products.shape)
    products, surfaces = products[: len(_ESTIMATORS)], surfaces[: len(_ESTIMATORS)]

    smooth_coefficients = _spline_coefficients(smooth_reference, extent)

    def verify(estimate: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        product, surface = estimate
        shift = _refine_peak(product, surface, rows, cols, inside, upsample_factor)
        sharpness = _peak_sharpness(surface, rows, cols, inside)
        return shift, _agreement(smooth_coefficients, smooth_inspected, rows, cols, shift), sharpness

    # A loop rather than unrolled code: it compiles the refinement and the
    # verification once instead of once per estimator.
    candidate_shifts, candidate_correlations, candidate_sharpness = jax.lax.map(
        verify, (products, surfaces)
    )

    best = jnp.int32(0)
    for index in range(1, len(_ESTIMATORS)):
        improves = candidate_correlations[index] > candidate_correlations[best] + _TIE_TOLERANCE
        best = jnp.where(improves, index, best)
    shift = candidate_shifts[best]
    valid = _overlap(reference.shape, rows, cols, shift)
    aligned = _spline_shift(_spline_coefficients(reference, extent), shift)
    return CanvasAlignment(
        shift=shift,
        aligned_reference=jnp.where(valid, aligned, inspected),
        estimator=best,
        correlation=candidate_correlations[best],
        sharpness=candidate_sharpness[best],
        candidate_shifts=candidate_shifts,
        candidate_correlations=candidate_correlations,
        candidate_sharpness=candidate_sharpness,
    )
