"""Global ridge regression student, solved in closed form."""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from tsjax.patches import extract_patches

__all__ = ["RidgeState", "RidgeStudent", "ridge_solve"]


class RidgeState(NamedTuple):
    """Fitted linear map ``insp ≈ patch @ weights + bias``.

    Attributes:
      weights: ``[k * k * C_in, C_out]``.
      bias: ``[C_out]``.
    """

    weights: jax.Array
    bias: jax.Array


def ridge_solve(inputs: ArrayLike, targets: ArrayLike, sample_weight: ArrayLike, alpha: float) -> RidgeState:
    """Solve weighted ridge regression with an unpenalised intercept.

    Minimises ``sum_n w_n |y_n - x_n W - b|^2 + lam |W|_F^2`` with
    ``lam = alpha * trace(G) / d``, where ``G`` is the weighted scatter
    matrix of the centred inputs and ``d`` their dimension. Scaling the
    penalty by the mean input variance makes ``alpha`` dimensionless: the same
    ``alpha`` regularises equally whatever the layer's feature scale, the
    patch size or the number of pixels. ``alpha = 1e-3`` shrinks directions
    whose variance is below 0.1 % of the average one.

    Args:
      inputs: ``[N, d]`` samples.
      targets: ``[N, C]`` targets.
      sample_weight: ``[N]`` non-negative weights (0 excludes a sample).
      alpha: Relative ridge penalty, ``>= 0``.

    Returns:
      The ``RidgeState``.
    """
    inputs = jnp.asarray(inputs, jnp.float32)
    targets = jnp.asarray(targets, jnp.float32)
    weight = jnp.asarray(sample_weight, jnp.float32)
    total = jnp.maximum(weight.sum(), 1.0)
    input_mean = (weight[:, None] * inputs).sum(0) / total
    target_mean = (weight[:, None] * targets).sum(0) / total
    centred = inputs - input_mean
    weighted = centred * weight[:, None]
    scatter = weighted.T @ centred
    cross = weighted.T @ (targets - target_mean)
    dim = inputs.shape[1]
    penalty = alpha * jnp.trace(scatter) / dim
    # A tiny absolute floor keeps the system positive definite when alpha is
    # 0 and the features are rank-deficient (for example a dead ReLU channel).
    penalty = jnp.maximum(penalty, 1e-6 * jnp.trace(scatter) / dim + 1e-12)
    system = scatter + penalty * jnp.eye(dim, dtype=scatter.dtype)
    factor = jax.scipy.linalg.cho_factor(system)
    weights = jax.scipy.linalg.cho_solve(factor, cross)
    bias = target_mean - input_mean @ weights
    return RidgeState(weights=weights, bias=bias)


@dataclasses.dataclass(frozen=True)
class RidgeStudent:
    """One linear map from a reference patch to the inspected feature vector.

    The map is shared by every pixel (and every pair in the batch), so it
    learns the pattern-wide relation between the two images: contrast,
    brightness, residual misalignment and blur. A defect is local and rare,
    so it barely moves the fit and stands out in the residual.

    Attributes:
      patch_size: Odd side ``k`` of the reference neighbourhood, in feature px.
      alpha: Relative ridge penalty (see ``ridge_solve``).
    """

    patch_size: int = 3
    alpha: float = 1e-3
    name: str = "ridge"

    def fit(self, ref: ArrayLike, insp: ArrayLike, valid: ArrayLike, key: jax.Array) -> RidgeState:
        """Fit on all valid pixels of the batch. ``key`` is unused (closed form)."""
        del key
        patches = extract_patches(ref, self.patch_size)
        dim = patches.shape[-1]
        channels = insp.shape[-1]
        return ridge_solve(
            patches.reshape(-1, dim),
            jnp.asarray(insp).reshape(-1, channels),
            jnp.asarray(valid, jnp.float32).reshape(-1),
            self.alpha,
        )

    def predict(self, state: RidgeState, ref: ArrayLike) -> jax.Array:
        """Return ``[B, h, w, C]`` predictions for the reference features."""
        patches = extract_patches(ref, self.patch_size)
        return patches @ state.weights + state.bias
