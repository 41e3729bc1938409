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

from tsjax.students.ridge import RidgeState

__all__ = ["RidgeMoments", "is_rectangle", "patch_moments", "target_moments", "merge_moments", "solve_moments"]


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


def is_rectangle(mask: np.ndarray) -> bool:
    """Tell whether a ``[..., H, W]`` bool mask is one filled rectangle (or empty) in every image.

    Masks that pass may use ``patch_moments(..., rectangle=True)``, also
    after subsampling (``mask[::s, ::s]``) or cropping, which keep a
    rectangle a rectangle.
    """
    mask = np.asarray(mask, bool)
    for image in mask.reshape(-1, *mask.shape[-2:]):
        rows = np.flatnonzero(image.any(axis=1))
        cols = np.flatnonzero(image.any(axis=0))
        if rows.size and not image[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all():
            return False
    return True


def patch_moments(
    ref: ArrayLike,
    insp: ArrayLike,
    weight: ArrayLike,
    patch_size: int,
    *,
    reference_margin: int = 0,
    rectangle: bool = False,
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
      rectangle: The caller guarantees that ``weight`` is 1 on one
        rectangle of pixels and 0 elsewhere (or 0 everywhere). The input
        scatter then comes from shared displacement products
        (``_rectangle_scatter``), with about a fifth of the operations. With
        other weights the result is wrong.

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
    radius = patch_size // 2
    centred = ref - ref_mean
    if margin == 0:
        centred = jnp.pad(centred, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    height, width = weight.shape
    wide = width + 2 * radius

    # Samples on a "wide" grid: each row of the map carries 2r extra pixels
    # of weight 0, the row length of the padded map. In the padded map's
    # flat [(h + 2r) * wide, C] layout, patch offset (i, j) of sample p is
    # row p + i * wide + j, so every offset is one contiguous slice.
    flat = jnp.pad(centred.reshape(-1, centred.shape[-1]), ((0, 2 * radius), (0, 0)))
    samples = height * wide
    weight_wide = jnp.pad(weight, ((0, 0), (0, 2 * radius))).reshape(-1)
    targets = jnp.pad(insp - target_mean, ((0, 0), (0, 2 * radius), (0, 0))).reshape(samples, -1)
    channels = flat.shape[-1]

    # Cross-product block (i, j) is sum_q x(q + i * wide) u(q - j)^T with
    # u = [w t, w], which also yields the weighted patch sums. Shifting the
    # map by rows and u by columns gives all k * k blocks from two [n, k * C]
    # operands without the [N, k * k * C] patch matrix (measured 1.7x faster
    # for layer1 on 2 cores).
    span = samples + 2 * radius
    weighted = jnp.concatenate([targets * weight_wide[:, None], weight_wide[:, None]], axis=1)
    weighted = jnp.pad(weighted, ((2 * radius, 2 * radius), (0, 0)))
    shifted_targets = jnp.concatenate(
        [weighted[2 * radius - j : 2 * radius - j + span] for j in range(patch_size)], axis=1
    )
    shifted_maps = jnp.concatenate([flat[i * wide : i * wide + span] for i in range(patch_size)], axis=1)
    blocks = (shifted_maps.T @ shifted_targets).reshape(patch_size, channels, patch_size, -1)
    blocks = jnp.transpose(blocks, (0, 2, 1, 3)).reshape(patch_size * patch_size * channels, -1)
    cross = blocks[:, :-1]

    # The means of the centred samples, sum_n w_n x_n / total. Expanding
    # sum_n w_n (x_n - o)(x_n - o)^T with this o gives the raw product minus
    # (2 total - count) o o^T, and the same for the cross-products and the
    # energy (total = count unless count < 1).
    offset = blocks[:, -1] / total
    target_offset = (weight_wide @ targets) / total
    correction = 2.0 * total - count
    if rectangle:
        raw_scatter = _rectangle_scatter(centred, weight, patch_size)
    else:
        root = jnp.sqrt(weight_wide)[:, None]
        rows = jnp.concatenate(
            [flat[i * wide + j : i * wide + j + samples] for i in range(patch_size) for j in range(patch_size)], axis=1
        )
        rows = rows * root
        raw_scatter = rows.T @ rows
    return RidgeMoments(
        count=count,
        input_mean=jnp.tile(ref_mean, patch_size * patch_size) + offset,
        target_mean=target_mean + target_offset,
        input_scatter=raw_scatter - correction * jnp.outer(offset, offset),
        cross_scatter=cross - correction * jnp.outer(offset, target_offset),
        target_energy=weight_wide @ (targets**2).sum(axis=1) - correction * (target_offset @ target_offset),
    )


def _rectangle_scatter(padded: jax.Array, weight: jax.Array, patch_size: int) -> jax.Array:
    """Compute ``sum_p x_p x_p^T`` over the pixels ``p`` of a rectangle, ``x_p`` the ``k x k`` patch at ``p``.

    Block ``(a, b)`` of the sum (patch offsets ``a`` and ``b``) is
    ``sum_{q in R + a} g(q) g(q + b - a)^T`` for the map ``g`` and the
    rectangle ``R``: a product at displacement ``b - a`` summed over ``R``
    shifted by ``a``. The shifted rectangles share a core and differ only in
    ``2r`` rows and ``2r`` columns on each side (``r = k // 2``). So one
    matrix product per displacement over the core, plus products over those
    few border rows, columns and corners, gives every block. For ``k = 3``
    that is 15 products of ``C x C`` blocks (13 of them used) instead of the
    81 of the patch matrix's own product, about a fifth of the operations.

    Args:
      padded: ``[h + 2r, w + 2r, C]`` map, whose entry ``(y + r, x + r)`` is
        the feature at ``(y, x)``; the ``r``-wide frame contains the neighbours
        that the border patches read.
      weight: ``[h, w]``, 1 on a rectangle and 0 elsewhere, or 0 everywhere.
      patch_size: Odd side ``k`` of the patches.

    Returns:
      ``[k * k * C, k * k * C]``, ordered as ``tsjax.patches.extract_patches``.
    """
    radius = patch_size // 2
    height, width = weight.shape
    channels = padded.shape[-1]
    on_rows = weight.max(axis=1) > 0
    on_cols = weight.max(axis=0) > 0
    present = on_rows.any()
    if radius == 0:
        flat = padded.reshape(-1, channels) * weight.reshape(-1, 1)
        return flat.T @ flat
    offsets = [(i - radius, j - radius) for i in range(patch_size) for j in range(patch_size)]
    # Block (a, b) for b at or after a in raster order; the others are transposes.
    displacements = sorted({(b[0] - a[0], b[1] - a[1]) for n, a in enumerate(offsets) for b in offsets[n:]})
    index_of = {shift: n for n, shift in enumerate(displacements)}

    # A zero frame of 2r more keeps every read below in bounds; the reads
    # that reach it belong to combinations that no block uses.
    reach = 2 * radius
    origin = 3 * radius
    grid = jnp.pad(padded, ((reach, reach), (reach, reach), (0, 0)))

    def displaced(block: jax.Array, top: int, left: int, rows: int, cols: int) -> jax.Array:
        # [rows * cols, D * C]: the map at every displacement from (top, left).
        parts = [block[top + dy : top + dy + rows, left + dx : left + dx + cols] for dy, dx in displacements]
        return jnp.concatenate(parts, axis=-1).reshape(rows * cols, -1)

    # Rectangle [top, bottom) x [left, right) in map pixels, and its core:
    # the pixels that every shift by up to r keeps inside.
    top = jnp.argmax(on_rows)
    bottom = height - jnp.argmax(on_rows[::-1])
    left = jnp.argmax(on_cols)
    right = width - jnp.argmax(on_cols[::-1])
    core_rows = (jnp.arange(height) >= top + radius) & (jnp.arange(height) < bottom - radius)
    core_cols = (jnp.arange(width) >= left + radius) & (jnp.arange(width) < right - radius)

    # The core products over the flat layout of ``padded`` (row length
    # ``wide``), where displacement (dy, dx) is an offset of dy * wide + dx
    # rows. Shifting the core's samples by dx instead of the map by it
    # groups all displacements into one product of contiguous slices:
    # [(4r + 1) C, N] shifted cores times [N, (2r + 1) C] shifted maps.
    wide = width + 2 * radius
    samples = height * wide
    start = radius * wide + radius
    flat = padded.reshape(-1, channels)
    core_mask = jnp.pad(core_rows[:, None] & core_cols[None, :], ((0, 0), (0, 2 * radius))).reshape(-1, 1)
    centre = jnp.pad(flat[start : start + samples] * core_mask, ((reach, reach), (0, 0)))
    flat = jnp.pad(flat, ((0, start), (0, 0)))
    shifted_centres = jnp.concatenate([centre[2 * reach - j : 2 * reach - j + samples] for j in range(2 * reach + 1)], 1)
    shifted_maps = jnp.concatenate(
        [flat[start + dy * wide : start + dy * wide + samples] for dy in range(reach + 1)], axis=1
    )
    grouped = shifted_centres.T @ shifted_maps  # block (dx + 2r, dy)
    core = jnp.concatenate(
        [
            grouped[(dx + reach) * channels : (dx + reach + 1) * channels, dy * channels : (dy + 1) * channels]
            for dy, dx in displacements
        ],
        axis=1,
    )

    # The border rows: r on each side of each rectangle edge. On a rectangle
    # thinner than 2r the two groups overlap, and the second group then
    # counts only the rows that the first does not contain.
    span = jnp.arange(2 * radius)
    border_rows = jnp.concatenate([top - radius + span, bottom - radius + span])
    border_cols = jnp.concatenate([left - radius + span, right - radius + span])
    first_rows = jnp.concatenate([jnp.ones(2 * radius, bool), border_rows[2 * radius :] >= top + radius])
    first_cols = jnp.concatenate([jnp.ones(2 * radius, bool), border_cols[2 * radius :] >= left + radius])

    def row_product(row: jax.Array) -> jax.Array:
        strip = jax.lax.dynamic_slice(grid, (row + origin - reach, 0, 0), (2 * reach + 1, grid.shape[1], channels))
        inner = strip[reach, origin : origin + width] * core_cols[:, None]
        return inner.T @ displaced(strip, reach, origin, 1, width)

    def col_product(col: jax.Array) -> jax.Array:
        strip = jax.lax.dynamic_slice(grid, (0, col + origin - reach, 0), (grid.shape[0], 2 * reach + 1, channels))
        inner = strip[origin : origin + height, reach] * core_rows[:, None]
        return inner.T @ displaced(strip, origin, reach, height, 1)

    def corner_product(row: jax.Array, col: jax.Array) -> jax.Array:
        patch = jax.lax.dynamic_slice(
            grid, (row + origin - reach, col + origin - reach, 0), (2 * reach + 1, 2 * reach + 1, channels)
        )
        return jnp.outer(patch[reach, reach], displaced(patch, reach, reach, 1, 1)[0])

    row_products = jax.vmap(row_product)(border_rows)  # [4r, C, D * C]
    col_products = jax.vmap(col_product)(border_cols)
    corner_products = jax.vmap(jax.vmap(corner_product, (None, 0)), (0, None))(border_rows, border_cols)

    # For a patch offset a, the rectangle shifted by a contains the core plus
    # the border rows in [top + a_y, bottom + a_y) and likewise columns.
    shifts = jnp.arange(-radius, radius + 1)[:, None]
    rows_in = first_rows & (border_rows >= top + shifts) & (border_rows < bottom + shifts)  # [k, 4r]
    cols_in = first_cols & (border_cols >= left + shifts) & (border_cols < right + shifts)
    rows_in = rows_in.astype(core.dtype)
    cols_in = cols_in.astype(core.dtype)
    # The four terms summed by one matrix product, so that XLA materialises
    # the sums. Added elementwise, they were fused into the gather below and
    # recomputed for every scatter entry (20 ms of a 480 px pair's fit).
    terms = jnp.concatenate(
        [core[None], row_products, col_products, corner_products.reshape(-1, *corner_products.shape[2:])], axis=0
    )
    coefficients = jnp.concatenate(
        [
            jnp.ones((patch_size, patch_size, 1), core.dtype),
            jnp.broadcast_to(rows_in[:, None, :], (patch_size, patch_size, rows_in.shape[1])),
            jnp.broadcast_to(cols_in[None, :, :], (patch_size, patch_size, cols_in.shape[1])),
            (rows_in[:, None, :, None] * cols_in[None, :, None, :]).reshape(patch_size, patch_size, -1),
        ],
        axis=-1,
    )
    sums = jnp.einsum("yxt,tce->yxce", coefficients, terms)  # per patch offset a, every displacement's block
    sums = sums.reshape(patch_size * patch_size, channels, len(displacements), channels)

    # Block (n, m) for n <= m is sums[n, :, displacement of m - n, :]; the
    # blocks below the diagonal are transposes of those above. One gather
    # keeps the compiled program small (81 slices took about 5 s longer to compile).
    first = np.minimum.outer(np.arange(len(offsets)), np.arange(len(offsets)))
    second = np.maximum.outer(np.arange(len(offsets)), np.arange(len(offsets)))
    displacement_index = np.vectorize(
        lambda n, m: index_of[offsets[m][0] - offsets[n][0], offsets[m][1] - offsets[n][1]]
    )(first, second)
    blocks = sums[first, :, displacement_index, :]  # [k^2, k^2, C, C]
    below = (np.arange(len(offsets))[:, None] > np.arange(len(offsets))[None, :])[..., None, None]
    blocks = jnp.where(below, jnp.swapaxes(blocks, -1, -2), blocks)
    scatter = jnp.transpose(blocks, (0, 2, 1, 3)).reshape(len(offsets) * channels, len(offsets) * channels)
    return jnp.where(present, scatter, 0.0)


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
