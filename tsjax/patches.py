"""Neighbourhood patches of feature maps, the student's input."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = ["extract_patches"]


def extract_patches(features: ArrayLike, patch_size: int) -> jax.Array:
    """Stack the ``k x k`` neighbourhood of every pixel into its channel axis.

    Border pixels see edge-replicated neighbours, so every pixel gets a patch
    and the output keeps the input's spatial shape.

    Args:
      features: ``[B, h, w, C]`` feature maps.
      patch_size: Odd side ``k`` of the square neighbourhood, in feature pixels.

    Returns:
      ``[B, h, w, k * k * C]``. Channel ``(i * k + j) * C + c`` contains channel
      ``c`` of the neighbour at row offset ``i - k // 2`` and column offset
      ``j - k // 2``.

    Raises:
      ValueError: if ``patch_size`` is not a positive odd integer or the input
        is not 4-D.
    """
    if not isinstance(patch_size, int) or patch_size < 1 or patch_size % 2 == 0:
        raise ValueError(f"patch_size must be a positive odd integer; got {patch_size!r}.")
    features = jnp.asarray(features)
    if features.ndim != 4:
        raise ValueError(f"features must be [B, h, w, C]; got shape {features.shape}.")
    if patch_size == 1:
        return features
    radius = patch_size // 2
    height, width = features.shape[1:3]
    padded = jnp.pad(features, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    shifted = [
        padded[:, i : i + height, j : j + width, :]
        for i in range(patch_size)
        for j in range(patch_size)
    ]
    return jnp.concatenate(shifted, axis=-1)
