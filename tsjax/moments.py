"""Sufficient statistics of the ridge student, accumulated over pixels, pairs and tiles.

``RidgeStudent.fit`` solves one weighted least-squares problem over all valid
pixels at once. The same solution follows from a few moments of the data:
the weighted count, the means, the centred scatter of the patch inputs and
their centred cross-products with the targets. Moments of disjoint pixel
sets combine exactly with the pairwise update of Chan, Golub and LeVeque
(1983), so a large image can be fitted tile by tile and give the fit of the
whole image.

The same moments give the ``'global'`` score normalisation: the mean of
``sum_c (F_c - mu_c)^2`` over the valid pixels is ``target_energy / count``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from tsjax.patches import extract_patches
from tsjax.students.ridge import RidgeState

__all__ = ["RidgeMoments", "patch_moments", "target_moments", "merge_moments", "solve_moments"]


class RidgeMoments(NamedTuple):
    """Weighted moments of reference patches ``x`` and inspected features ``y``.

    Attributes:
      count: ``[]`` sum of the sample weights.
      input_mean: ``[d]`` weighted mean of ``x`` (``d = k * k * C_in``).
      target_mean: ``[C]`` weighted mean of ``y``.
      input_scatter: ``[d, d]`` ``sum_n w_n (x_n - input_mean)(x_n - input_mean)^T``.
      cross_scatter: ``[d, C]`` ``sum_n w_n (x_n - input_mean)(y_n - target_mean)^T``.
      target_energy: ``[]`` ``sum_n w_n |y_n - target_mean|^2``.
    """

    count: jax.Array
    input_mean: jax.Array
    target_mean: jax.Array
    input_scatter: jax.Array
    cross_scatter: jax.Array
    target_energy: jax.Array


def patch_moments(
    ref: ArrayLike, insp: ArrayLike, weight: ArrayLike, patch_size: int, *, reference_margin: int = 0
) -> RidgeMoments:
    """Compute the ridge moments of one feature map pair.

    The samples are the pixels of the maps: the input is the ``k x k``
    neighbourhood of the reference features (``tsjax.patches.extract_patches``,
    edges replicated), the target the inspected feature vector.

    Args:
      ref: ``[h + 2m, w + 2m, C_in]`` reference features, with
        ``m = reference_margin``.
      insp: ``[h, w, C]`` inspected features.
      weight: ``[h, w]`` non-negative sample weights (0 excludes a pixel).
      patch_size: Odd side ``k`` of the neighbourhood.
      reference_margin: ``0``, or ``k // 2`` when ``ref`` carries the
        neighbours of the border samples (a window cut from a larger map),
        which then replace the replicated edges.

    Returns:
      The ``RidgeMoments``. With no weight at all, the means are 0 and the
      scatters empty sums.
    """
    ref = jnp.asarray(ref, jnp.float32)
    insp = jnp.asarray(insp, jnp.float32)
    weight = jnp.asarray(weight, jnp.float32)
    if reference_margin not in (0, patch_size // 2):
        raise ValueError(f"reference_margin must be 0 or patch_size // 2 = {patch_size // 2}; got {reference_margin}.")
    count = weight.sum()
    total = jnp.maximum(count, 1.0)
    margin = reference_margin
    inner = ref[margin : ref.shape[0] - margin, margin : ref.shape[1] - margin]

    # Centre both maps by their weighted channel means first. The patches of
    # the centred map are then nearly centred too, because their exact mean
    # differs only through replicated edges and the weights' shifts. So the
    # scatter is the raw product minus a small correction, which loses no
    # float32 precision and needs no centred copy of the [N, d] patch matrix.
    ref_mean = jnp.einsum("hw,hwc->c", weight, inner) / total
    target_mean = jnp.einsum("hw,hwc->c", weight, insp) / total
    root = jnp.sqrt(weight).reshape(-1, 1)
    patches = extract_patches((ref - ref_mean)[None], patch_size)[0]
    patches = patches[margin : patches.shape[0] - margin, margin : patches.shape[1] - margin]
    rows = patches.reshape(root.shape[0], -1) * root
    targets = (insp - target_mean).reshape(root.shape[0], -1) * root

    # The means of the centred samples, sum_n w_n x_n / total with rows =
    # sqrt(w) x. Expanding sum_n w_n (x_n - o)(x_n - o)^T with this o gives
    # the raw product minus (2 total - count) o o^T, and the same for the
    # cross-products and the energy (total = count unless count < 1).
    offset = (root[:, 0] @ rows) / total
    target_offset = (root[:, 0] @ targets) / total
    correction = 2.0 * total - count
    return RidgeMoments(
        count=count,
        input_mean=jnp.tile(ref_mean, patch_size * patch_size) + offset,
        target_mean=target_mean + target_offset,
        input_scatter=rows.T @ rows - correction * jnp.outer(offset, offset),
        cross_scatter=rows.T @ targets - correction * jnp.outer(offset, target_offset),
        target_energy=(targets**2).sum() - correction * (target_offset @ target_offset),
    )


def target_moments(insp: ArrayLike, weight: ArrayLike) -> RidgeMoments:
    """Compute only the target part of the moments (for a student fitted elsewhere).

    Args:
      insp: ``[h, w, C]`` inspected features.
      weight: ``[h, w]`` non-negative sample weights.

    Returns:
      ``RidgeMoments`` whose input fields are empty (``d = 0``).
    """
    insp = jnp.asarray(insp, jnp.float32)
    weight = jnp.asarray(weight, jnp.float32).reshape(-1)
    targets = insp.reshape(weight.size, -1)
    count = weight.sum()
    target_mean = weight @ targets / jnp.maximum(count, 1.0)
    centred_targets = targets - target_mean
    return RidgeMoments(
        count=count,
        input_mean=jnp.zeros((0,), jnp.float32),
        target_mean=target_mean,
        input_scatter=jnp.zeros((0, 0), jnp.float32),
        cross_scatter=jnp.zeros((0, targets.shape[1]), jnp.float32),
        target_energy=(weight * (centred_targets**2).sum(-1)).sum(),
    )


def merge_moments(first: RidgeMoments, second: RidgeMoments) -> RidgeMoments:
    """Combine the moments of two disjoint sample sets in float64 NumPy.

    Args:
      first: Moments of one set (JAX or NumPy arrays).
      second: Moments of the other set.

    Returns:
      ``RidgeMoments`` of NumPy float64 arrays, as if computed on the union.
    """
    first = RidgeMoments(*(np.asarray(value, np.float64) for value in first))
    second = RidgeMoments(*(np.asarray(value, np.float64) for value in second))
    count = first.count + second.count
    if count == 0:
        return first
    share = second.count / count
    input_delta = second.input_mean - first.input_mean
    target_delta = second.target_mean - first.target_mean
    # n_a n_b / n: how much the gap between the two means adds to the scatter.
    coupling = first.count * share
    return RidgeMoments(
        count=count,
        input_mean=first.input_mean + share * input_delta,
        target_mean=first.target_mean + share * target_delta,
        input_scatter=first.input_scatter + second.input_scatter + coupling * np.outer(input_delta, input_delta),
        cross_scatter=first.cross_scatter + second.cross_scatter + coupling * np.outer(input_delta, target_delta),
        target_energy=first.target_energy + second.target_energy + coupling * float(target_delta @ target_delta),
    )


@jax.jit
def solve_moments(moments: RidgeMoments, alpha: float) -> RidgeState:
    """Solve the ridge problem of ``tsjax.students.ridge.ridge_solve`` from its moments.

    The penalty is the same: ``alpha * trace(scatter) / d``, floored at
    ``1e-6 * trace(scatter) / d + 1e-12``, on the unpenalised-intercept
    problem, solved by a Cholesky factorisation in float32.

    Args:
      moments: Moments of all samples.
      alpha: Relative ridge penalty, ``>= 0``.

    Returns:
      The ``RidgeState`` that ``ridge_solve`` returns on the same samples.
    """
    scatter = jnp.asarray(moments.input_scatter, jnp.float32)
    dim = scatter.shape[0]
    mean_variance = jnp.trace(scatter) / dim
    penalty = jnp.maximum(alpha * mean_variance, 1e-6 * mean_variance + 1e-12)
    system = scatter + penalty * jnp.eye(dim, dtype=scatter.dtype)
    factor = jax.scipy.linalg.cho_factor(system)
    weights = jax.scipy.linalg.cho_solve(factor, jnp.asarray(moments.cross_scatter, jnp.float32))
    input_mean = jnp.asarray(moments.input_mean, jnp.float32)
    bias = jnp.asarray(moments.target_mean, jnp.float32) - input_mean @ weights
    return RidgeState(weights=weights, bias=bias)
