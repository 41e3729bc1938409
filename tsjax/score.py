"""Per-pixel goodness of fit and the defect map built from it.

The defect probability of a pixel is ``D = 1 - R^2`` of the student's
prediction of the inspected features at that pixel:

    R^2(x, y) = 1 - sum_c (F_c - F̂_c)^2 / sum_c (F_c - mu_c)^2

where ``mu_c`` is channel ``c``'s mean over the valid pixels. On flat,
pattern-free regions ``F`` is close to ``mu``, so the exact denominator is
small and dominated by noise, and ``R^2`` swings. The ``'global'``
normalisation divides the residual by the mean denominator over the valid
pixels instead, which keeps the scale of a defect's residual independent of
the local pattern energy.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["NORMALIZATIONS", "residual_energy", "defect_probability", "upsample_to_image", "gaussian_smooth"]

NORMALIZATIONS = ("pixel", "global")


def residual_energy(insp: ArrayLike, pred: ArrayLike, valid: ArrayLike) -> tuple[jax.Array, jax.Array]:
    """Return the residual and total sums of squares per pixel.

    Args:
      insp: ``[B, h, w, C]`` inspected features.
      pred: ``[B, h, w, C]`` predicted features.
      valid: ``[B, h, w]`` mask of pixels that define the channel means.

    Returns:
      ``(residual, total)``, each ``[B, h, w]``: ``sum_c (F - F̂)^2`` and
      ``sum_c (F - mu_c)^2`` with ``mu`` the per-pair channel mean over valid
      pixels.
    """
    insp = jnp.asarray(insp, jnp.float32)
    pred = jnp.asarray(pred, jnp.float32)
    weight = jnp.asarray(valid, jnp.float32)[..., None]
    count = jnp.maximum(weight.sum(axis=(1, 2), keepdims=True), 1.0)
    mean = (insp * weight).sum(axis=(1, 2), keepdims=True) / count
    residual = ((insp - pred) ** 2).sum(-1)
    total = ((insp - mean) ** 2).sum(-1)
    return residual, total


def defect_probability(
    insp: ArrayLike, pred: ArrayLike, valid: ArrayLike, normalization: str = "pixel"
) -> jax.Array:
    """Compute ``D = 1 - R^2`` clipped to [0, 1] for one teacher layer.

    Args:
      insp: ``[B, h, w, C]`` inspected features.
      pred: ``[B, h, w, C]`` predicted features.
      valid: ``[B, h, w]`` mask of pixels used for the channel means and, for
        ``'global'``, for the mean total energy.
      normalization: ``'pixel'`` for the exact per-pixel ``R^2``, or
        ``'global'`` to divide every residual by the mean total energy.

    Returns:
      ``[B, h, w]`` float32 in [0, 1].

    Raises:
      ValueError: for an unknown ``normalization``.
    """
    if normalization not in NORMALIZATIONS:
        raise ValueError(f"normalization={normalization!r} is unknown; use one of {NORMALIZATIONS}.")
    residual, total = residual_energy(insp, pred, valid)
    tiny = jnp.finfo(jnp.float32).tiny
    if normalization == "pixel":
        ratio = residual / jnp.maximum(total, tiny)
    else:
        weight = jnp.asarray(valid, jnp.float32)
        count = jnp.maximum(weight.sum(axis=(1, 2), keepdims=True), 1.0)
        mean_total = (total * weight).sum(axis=(1, 2), keepdims=True) / count
        ratio = residual / jnp.maximum(mean_total, tiny)
    return jnp.clip(ratio, 0.0, 1.0)


def upsample_to_image(
    feature_map: ArrayLike, stride: int, shape: tuple[int, int], valid: ArrayLike | None = None
) -> jax.Array:
    """Resample ``[B, h, w]`` maps of a stride-``s`` layer to ``[B, H, W]`` image pixels.

    A ResNet feature at index ``i`` is centred on input pixel ``s * i``
    (every convolution and pool pads symmetrically), so input pixel ``y``
    reads the map at ``y / s`` with bilinear interpolation, clamped at the
    edges.

    Args:
      feature_map: ``[B, h, w]`` values per feature pixel.
      stride: The layer's stride ``s`` in image px.
      shape: ``(H, W)`` of the image.
      valid: Optional ``[B, h, w]`` mask of the feature pixels to trust. When
        given, the interpolation is normalised by the interpolated mask, so an
        image pixel reads only valid features and an invalid feature never
        leaks into its valid neighbours. Pixels with no valid feature nearby
        get 0.

    Returns:
      ``[B, H, W]`` float32.
    """
    feature_map = jnp.asarray(feature_map, jnp.float32)
    height, width = shape
    rows = jnp.arange(height, dtype=jnp.float32) / stride
    cols = jnp.arange(width, dtype=jnp.float32) / stride
    grid = jnp.meshgrid(rows, cols, indexing="ij")

    def resample(single: jax.Array) -> jax.Array:
        return jax.scipy.ndimage.map_coordinates(single, grid, order=1, mode="nearest")

    if valid is None:
        return jax.vmap(resample)(feature_map)
    weight = jnp.asarray(valid, jnp.float32)
    numerator = jax.vmap(resample)(feature_map * weight)
    denominator = jax.vmap(resample)(weight)
    return jnp.where(denominator > 1e-6, numerator / jnp.maximum(denominator, 1e-6), 0.0)


def _separable_gaussian(maps: jax.Array, sigma: float) -> jax.Array:
    radius = max(1, int(round(3 * sigma)))
    offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
    kernel = jnp.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = jnp.pad(maps, ((0, 0), (radius, radius), (radius, radius)), mode="edge")
    height, width = maps.shape[1:]
    rows = sum(kernel[i] * padded[:, i : i + height, :] for i in range(2 * radius + 1))
    return sum(kernel[j] * rows[:, :, j : j + width] for j in range(2 * radius + 1))


def gaussian_smooth(maps: ArrayLike, sigma: float, valid: ArrayLike | None = None) -> jax.Array:
    """Smooth ``[B, H, W]`` maps with a separable Gaussian of ``sigma`` px (edges replicated).

    Args:
      maps: ``[B, H, W]`` values.
      sigma: Standard deviation in px; 0 or less returns the maps unchanged.
      valid: Optional ``[B, H, W]`` mask. When given, the smoothing is
        normalised by the smoothed mask (normalised convolution), so values
        outside the mask neither enter nor dilute the result, and pixels
        outside the mask get 0.

    Returns:
      ``[B, H, W]`` float32.
    """
    maps = jnp.asarray(maps, jnp.float32)
    if sigma <= 0:
        return maps if valid is None else jnp.where(jnp.asarray(valid, bool), maps, 0.0)
    if valid is None:
        return _separable_gaussian(maps, sigma)
    weight = jnp.asarray(valid, jnp.float32)
    numerator = _separable_gaussian(maps * weight, sigma)
    denominator = _separable_gaussian(weight, sigma)
    smoothed = numerator / jnp.maximum(denominator, 1e-6)
    return jnp.where(weight > 0, smoothed, 0.0)
