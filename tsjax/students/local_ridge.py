"""Per-pixel local ridge student: one ridge fit per window, solved in bulk.

Each pixel ``q`` gets its own ridge map from reference patches to inspected
features, fitted on the samples of the ``w x w`` window around ``q`` and
evaluated at ``q`` itself. The fit absorbs what varies slowly over the image
(local contrast, blur, residual misalignment) that one global map cannot.
The centre and its nearest neighbours can be left out of their own fit
(``leave_out``), so that a small defect is not explained by the very samples
that contain it. Each window's map can be shrunk toward one global ridge map
instead of toward zero (the prior), so that a window with little evidence
falls back to the global prediction.

With ``n`` fitted samples and ``d = k * k * C`` features, the primal form
solves a ``d x d`` system per pixel, ``O(n d^2 + d^3)``, and the dual
(kernel) form an ``n x n`` one, ``O(n^2 d + n^3)``. For the teacher's layers
``d`` is in the hundreds or thousands and ``n`` in the tens, so the dual is
the default. Its Gram matrices are not formed window by window. For every
displacement ``delta`` between two window samples, the map of channel dot
products ``<f(p), f(p + delta)>`` is computed once per band of rows and
box-summed over the ``k x k`` patch. Each window then reads its
``n x w^2`` Gram entries from these ``(2w - 1)^2`` maps, which costs
``O((2w - 1)^2 C)`` per pixel in place of ``O(n w^2 k^2 C)``.

The map is processed in bands of rows (``lax.map``), so the working memory
is set by ``max_block_mb`` and not by the image size. Each band computes its
displacement maps once, then hands a few rows at a time (about 256 px) to
the vmapped per-pixel solver, so that the Gram rows it reads and the
solver's temporaries stay in cache.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

__all__ = [
    "FORMS",
    "PRIORS",
    "LocalRidgeState",
    "LocalRidgeStudent",
    "local_ridge_predict",
    "BlockRows",
    "block_rows",
]

FORMS = ("auto", "dual", "primal")
PRIORS = ("global", "none")

# The penalty never falls below this fraction of the mean diagonal entry of
# the window's centred scatter (or Gram) matrix, which bounds the condition
# number of the system near 1e5 * n.
_MIN_RELATIVE_PENALTY = 1e-5

# Centring a float32 Gram matrix leaves rounding errors of about
# eps * max_i |x_i|^2 per entry, so a window whose samples are nearly equal
# can have a centred matrix with negative eigenvalues down to about
# -n * eps * max_i |x_i|^2. The penalty stays above this many times that
# bound so that Cholesky never meets a negative pivot.
_ROUNDING_MARGIN = 4.0

_BYTES_PER_FLOAT = 4


def _window_offsets(window: int) -> np.ndarray:
    """Row-major ``[w * w, 2]`` (dy, dx) offsets of a ``w x w`` window."""
    radius = window // 2
    grid = np.arange(-radius, radius + 1)
    return np.stack(np.meshgrid(grid, grid, indexing="ij"), axis=-1).reshape(-1, 2)


def _fit_samples(window: int, leave_out: int) -> tuple[np.ndarray, int]:
    """Indices of the window samples a pixel is fitted on, and of the centre."""
    offsets = _window_offsets(window)
    held_radius = leave_out // 2
    if leave_out == 0:
        keep = np.ones(len(offsets), bool)
    else:
        keep = np.abs(offsets).max(axis=1) > held_radius
    centre = len(offsets) // 2
    return np.flatnonzero(keep), centre


def _penalty(alpha: float, trace: jax.Array, largest_norm: jax.Array, dim: int, samples: int) -> jax.Array:
    """Return the ridge penalty ``alpha * trace / dim`` with stability floors.

    Args:
      alpha: Relative ridge penalty.
      trace: Trace of the window's weighted, centred scatter matrix, which
        equals that of its centred Gram matrix, so both forms get one penalty.
      largest_norm: Largest weighted squared norm ``v_i |x_i|^2`` of an
        uncentred sample.
      dim: Feature dimension ``d``.
      samples: Fitted samples per window ``n``.
    """
    scaled = alpha * trace / dim
    floor = _MIN_RELATIVE_PENALTY * trace / samples
    rounding = _ROUNDING_MARGIN * samples * jnp.finfo(trace.dtype).eps * largest_norm
    return jnp.maximum(jnp.maximum(scaled, floor), jnp.maximum(rounding, jnp.finfo(trace.dtype).tiny))


def _cholesky_solve(matrix: jax.Array, vector: jax.Array) -> jax.Array:
    """Solve ``matrix @ x = vector`` for a symmetric positive definite matrix.

    Only the lower triangle is read, so the input is not symmetrised first
    (``jnp.linalg.cholesky`` would spend one more pass over every matrix).
    """
    lower = jax.lax.linalg.cholesky(matrix, symmetrize_input=False)
    half = jax.lax.linalg.triangular_solve(lower, vector[:, None], left_side=True, lower=True)
    return jax.lax.linalg.triangular_solve(lower, half, left_side=True, lower=True, transpose_a=True)[:, 0]


def _combination(weights: jax.Array, gain: jax.Array) -> jax.Array:
    """Turn the fitted gains into weights on the window's targets.

    The prediction is ``y_bar + sum_i gain_i (y_i - y_bar)`` with ``y_bar``
    the weighted target mean, which is ``sum_i beta_i y_i`` with the
    ``beta`` returned here.
    """
    share = weights / jnp.maximum(weights.sum(), 1.0)
    return share + gain - share * gain.sum()


def _dual_coefficients(gram_rows: jax.Array, weights: jax.Array, alpha: float, dim: int) -> jax.Array:
    """Solve one window in kernel form.

    Args:
      gram_rows: ``[n, n + 1]`` inner products of the fitted samples' patches
        with the fitted samples' patches, then with the centre's patch.
      weights: ``[n]`` 0/1 sample weights (0 for invalid pixels).
      alpha: Relative ridge penalty.
      dim: Feature dimension ``d`` (sets the penalty's scale).

    Returns:
      ``[n]`` weights ``beta`` with prediction ``sum_i beta_i y_i``.
    """
    samples = gram_rows.shape[0]
    share = weights / jnp.maximum(weights.sum(), 1.0)
    # Centre the Gram matrix on the weighted mean patch, which is the dual
    # counterpart of fitting an unpenalised intercept. The same formula
    # turns the centre's column into the right-hand side, so the whole
    # [n, n + 1] block is centred at once. Slicing the Gram part out first
    # made XLA copy every pixel's Gram matrix once more.
    row_mean = gram_rows @ jnp.append(share, 0.0)
    column_mean = jnp.append(row_mean, share @ gram_rows[:, samples])
    grand_mean = share @ row_mean
    centred = gram_rows - row_mean[:, None] - column_mean[None, :] + grand_mean
    root = jnp.sqrt(weights)
    system_and_rhs = root[:, None] * centred * jnp.append(root, 1.0)[None, :]
    # The trace and the largest norm read only the diagonal, so that XLA
    # does not materialise the centred system for them.
    diagonal = jnp.diagonal(gram_rows[:, :samples])
    trace = jnp.sum(weights * (diagonal - 2.0 * row_mean + grand_mean))
    largest_norm = jnp.max(weights * diagonal)
    penalty = _penalty(alpha, trace, largest_norm, dim, samples)
    solution = _bordered_cholesky_solve(system_and_rhs, penalty)
    return _combination(weights, root * solution)


def _bordered_cholesky_solve(system_and_rhs: jax.Array, penalty: jax.Array) -> jax.Array:
    """Solve ``(S + penalty * I) x = b`` with one Cholesky factorisation and one triangular solve.

    The Cholesky factor of the bordered matrix ``[[A, b], [b^T, t]]`` has
    ``L^{-1} b`` in its last row, where ``L`` is the factor of ``A``, so the
    forward substitution comes with the factorisation and only
    ``L^T x = L^{-1} b`` is left. Each is one LAPACK call per pixel, and for
    48 x 48 systems the per-call overhead dominates their cost.

    Args:
      system_and_rhs: ``[n, n + 1]``: the positive semi-definite ``S``, of
        which only the lower triangle is read, then the right-hand side ``b``.
      penalty: Positive ridge penalty, so ``A = S + penalty * I`` has no
        eigenvalue below it. The corner ``t = 2 |b|^2 / penalty + 1`` then
        exceeds ``b^T A^{-1} b``, which keeps the bordered matrix positive
        definite.
    """
    size = system_and_rhs.shape[0]
    rhs = system_and_rhs[:, size]
    corner = 2.0 * jnp.sum(rhs * rhs) / penalty + 1.0
    # The top rows keep b as their last column. Cholesky reads only the
    # lower triangle, so that copy of b is never used.
    top = system_and_rhs + penalty * jnp.eye(size, size + 1, dtype=system_and_rhs.dtype)
    bordered = jnp.concatenate([top, jnp.append(rhs, corner)[None, :]], axis=0)
    lower = jax.lax.linalg.cholesky(bordered, symmetrize_input=False)
    return jax.lax.linalg.triangular_solve(
        lower[:size, :size], lower[size, :size, None], left_side=True, lower=True, transpose_a=True
    )[:, 0]


def _primal_coefficients(inputs: jax.Array, centre_input: jax.Array, weights: jax.Array, alpha: float) -> jax.Array:
    """Solve one window in primal form.

    Args:
      inputs: ``[n, d]`` patches of the fitted samples.
      centre_input: ``[d]`` patch of the pixel being predicted.
      weights: ``[n]`` 0/1 sample weights.
      alpha: Relative ridge penalty.

    Returns:
      ``[n]`` weights ``beta`` with prediction ``sum_i beta_i y_i``.
    """
    share = weights / jnp.maximum(weights.sum(), 1.0)
    mean = share @ inputs
    root = jnp.sqrt(weights)
    scaled = root[:, None] * (inputs - mean)
    scatter = scaled.T @ scaled
    samples, dim = inputs.shape
    largest_norm = jnp.max(weights * jnp.sum(inputs * inputs, axis=1))
    penalty = _penalty(alpha, jnp.trace(scatter), largest_norm, dim, samples)
    direction = _cholesky_solve(scatter + penalty * jnp.eye(dim, dtype=scatter.dtype), centre_input - mean)
    return _combination(weights, root * (scaled @ direction))


def _shifted_grams(tile: jax.Array, window: int, patch_size: int) -> jax.Array:
    """Patch inner products for every displacement within a window.

    Args:
      tile: ``[T + 2R, W + 2R, C]`` reference features, ``R = w // 2 + k // 2``.

    Returns:
      ``[2w - 1, 2w - 1, T + 2r, W + 2r]`` with ``r = w // 2``. Entry
      ``[a, b, y, x]`` is the inner product of the ``k x k`` patches centred
      at tile pixels ``(y + k // 2, x + k // 2)`` and that pixel displaced by
      ``(a - 2r, b - 2r)``. Entries whose displaced patch leaves the tile are
      meaningless and never read.
    """
    double_radius = 2 * (window // 2)
    height, width = tile.shape[:2]
    span = 2 * double_radius + 1
    # Only the upper half of the displacement grid (row-major index from the
    # centre's on) is computed. The others follow from the symmetry
    # S_{-delta}(p) = S_delta(p - delta), a shifted copy.
    middle = span * span // 2
    upper = np.stack(np.unravel_index(np.arange(middle, span * span), (span, span)), axis=-1)
    padded = jnp.pad(tile, ((double_radius, double_radius), (double_radius, double_radius), (0, 0)))

    def channel_dot(displacement: jax.Array) -> jax.Array:
        moved = jax.lax.dynamic_slice(padded, (displacement[0], displacement[1], 0), tile.shape)
        return jnp.einsum("yxc,yxc->yx", tile, moved)

    products = jax.lax.map(channel_dot, jnp.asarray(upper))
    half = patch_size // 2
    out_height, out_width = height - 2 * half, width - 2 * half
    boxed = sum(
        products[:, i : i + out_height, j : j + out_width] for i in range(patch_size) for j in range(patch_size)
    )

    # Lower displacement t is the negative of upper displacement
    # span^2 - 1 - t; read that map at p - delta through a zero border.
    boxed_padded = jnp.pad(boxed, ((0, 0), (double_radius, double_radius), (double_radius, double_radius)))
    lower_sources = np.arange(span * span - 1, middle, -1) - middle
    lower_starts = 2 * double_radius - upper[lower_sources]

    # NOTE: with jax 0.10.2, reading the plane with dynamic_index_in_dim and
    # then slicing it made XLA's CPU compiler fail ("Failed to translate
    # module to LLVM IR") on [1, 47, 60, 128] maps; one 3-D slice compiles.
    def mirror(index: jax.Array) -> jax.Array:
        return jax.lax.dynamic_slice(boxed_padded, (index[0], index[1], index[2]), (1, out_height, out_width))[0]

    lower = jax.lax.map(mirror, jnp.asarray(np.concatenate([lower_sources[:, None], lower_starts], axis=1)))
    return jnp.concatenate([lower, boxed], axis=0).reshape(span, span, out_height, out_width)


def _window_gram_rows(grams: jax.Array, offsets: np.ndarray, columns: np.ndarray, rows: int, cols: int) -> jax.Array:
    """Read each pixel's Gram rows from the displacement maps of ``_shifted_grams``.

    Row ``i`` of pixel ``q``'s Gram holds ``<x(q + u_i), x(q + v)>`` for the
    window offsets ``v``: displacement ``v - u_i`` read at ``q + u_i``. For a
    fixed ``u_i`` that is one contiguous slab of ``grams``.

    Args:
      grams: Output of ``_shifted_grams``.
      offsets: ``[n, 2]`` static (dy, dx) offsets ``u_i`` of the rows.
      columns: Static window indices of the columns ``v`` to keep.
      rows, cols: Block size in pixels.

    Returns:
      ``[rows, cols, n, len(columns)]``.
    """
    window = (grams.shape[0] + 1) // 2
    radius = window // 2
    starts = jnp.asarray(np.concatenate([radius - offsets, radius + offsets], axis=1))

    # A loop of dynamic slices compiles faster than n unrolled slices.
    def copy_row(index: int, buffer: jax.Array) -> jax.Array:
        start = starts[index]
        slab = jax.lax.dynamic_slice(grams, tuple(start), (window, window, rows, cols))
        slab = jnp.take(slab.reshape(window * window, rows, cols), columns, axis=0)
        # Each row is written straight into the pixel-major layout that the
        # per-pixel solver reads. Filling a sample-major buffer and
        # transposing it afterwards cost one more pass over all Gram rows.
        return jax.lax.dynamic_update_slice(buffer, jnp.transpose(slab, (1, 2, 0))[:, :, None], (0, 0, index, 0))

    buffer = jnp.zeros((rows, cols, len(offsets), len(columns)), grams.dtype)
    return jax.lax.fori_loop(0, len(offsets), copy_row, buffer)


def _valid_patches(tile: jax.Array, patch_size: int) -> jax.Array:
    """Stack ``k x k`` neighbourhoods of the tile's interior, ``[T', W', k * k * C]``."""
    if patch_size == 1:
        return tile
    height, width = tile.shape[:2]
    out_height, out_width = height - patch_size + 1, width - patch_size + 1
    return jnp.concatenate(
        [tile[i : i + out_height, j : j + out_width] for i in range(patch_size) for j in range(patch_size)], axis=-1
    )


def _window_stack(maps: jax.Array, offsets: np.ndarray, rows: int, cols: int, radius: int) -> jax.Array:
    """Read ``maps`` at ``pixel + offset`` for every pixel of a block.

    Args:
      maps: ``[rows + 2 * radius, cols + 2 * radius, ...]``.
      offsets: ``[n, 2]`` static (dy, dx) offsets within ``radius``.

    Returns:
      ``[rows, cols, n, ...]``.
    """
    trailing = maps.shape[2:]
    starts = jnp.asarray(radius + offsets)

    # A loop of dynamic slices compiles in a fraction of the time that n
    # unrolled static slices take, and runs as fast.
    def copy_sample(index: int, buffer: jax.Array) -> jax.Array:
        start = (starts[index, 0], starts[index, 1]) + (0,) * len(trailing)
        sample = jax.lax.dynamic_slice(maps, start, (rows, cols) + trailing)
        return jax.lax.dynamic_update_slice(buffer, sample[None], (index, 0, 0) + (0,) * len(trailing))

    buffer = jnp.zeros((len(offsets), rows, cols) + trailing, maps.dtype)
    buffer = jax.lax.fori_loop(0, len(offsets), copy_sample, buffer)
    return jnp.moveaxis(buffer, 0, 2)


# Pixels that one call of the vmapped per-pixel solver handles in dual form:
# enough to amortise the loop step, few enough that the Gram rows and the
# solver's temporaries (about 40 KB a pixel for n = 48) stay in cache. On
# the teacher's layer1 and layer2 maps, blocks of 240 to 480 px ran fastest,
# about 1.3x and 1.5x faster than one solver call per budget-sized band.
_SOLVER_PIXELS = 256


def _solver_bytes(form: str, samples: int, window: int, dim: int) -> int:
    """Estimate the per-pixel working memory of the per-pixel solver, in bytes.

    Dual: the ``n x w^2`` Gram rows and four ``n x n`` solver temporaries.
    Primal: the ``n x d`` window patches and three ``d x d`` temporaries.
    """
    if form == "dual":
        floats = samples * window * window + 4 * samples * samples
    else:
        floats = samples * dim + 3 * dim * dim + 2 * dim
    return floats * _BYTES_PER_FLOAT


def _band_bytes(form: str, window: int, dim: int, channels_out: int, prior: bool) -> int:
    """Estimate the per-pixel memory of a band of rows around the solver, in bytes.

    Dual: two ``(2w - 1)^2`` displacement maps. Both forms: the predictions,
    and with the prior the pixel's patch and its prior prediction.
    """
    floats = channels_out
    if form == "dual":
        floats += 2 * (2 * window - 1) ** 2
    if prior:
        floats += dim + channels_out
    return floats * _BYTES_PER_FLOAT


class BlockRows(NamedTuple):
    """Split of a map's rows into bands and solver calls.

    Attributes:
      band: Rows per band; each band's displacement maps (and prior
        prediction) are computed once. A multiple of ``solver``.
      solver: Rows per call of the vmapped per-pixel solver.
    """

    band: int
    solver: int


def block_rows(
    form: str,
    samples: int,
    window: int,
    dim: int,
    channels_out: int,
    prior: bool,
    width: int,
    batch: int,
    max_block_mb: float,
) -> BlockRows:
    """Choose the band and solver rows so that a band fits ``max_block_mb``.

    The solver rows come first: as many as ``max_block_mb`` allows, and in
    dual form at most the ``_SOLVER_PIXELS`` that keep its work in cache.
    The band then takes as many whole solver blocks as the rest of the
    budget holds.

    Args:
      form: ``'dual'`` or ``'primal'``.
      samples: Fitted samples per window ``n``.
      window: Window side ``w``.
      dim: Patch features ``d``.
      channels_out: Inspected channels.
      prior: Whether the global prior is fitted.
      width: Map width in feature px.
      batch: Maps solved side by side (the batch is vmapped).
      max_block_mb: Memory budget of one band, in MiB.

    Returns:
      At least 1 solver row and 1 band row, so one very wide row can exceed
      the budget.
    """
    budget = max_block_mb * 2**20
    solver_row = _solver_bytes(form, samples, window, dim) * width * batch
    solver = max(1, int(budget // solver_row))
    if form == "dual":
        solver = min(solver, max(1, _SOLVER_PIXELS // (width * batch)))
    band_row = _band_bytes(form, window, dim, channels_out, prior) * width * batch
    band = max(1, int((budget - solver * solver_row) // band_row)) if form == "dual" else solver
    return BlockRows(band=max(solver, band // solver * solver), solver=solver)


def _pca_basis(ref: jax.Array, valid: jax.Array, components: int) -> jax.Array:
    """Top principal directions of one map's valid reference features, ``[C, p]``."""
    channels = ref.shape[-1]
    flat = ref.reshape(-1, channels)
    weight = valid.reshape(-1).astype(flat.dtype)
    share = weight / jnp.maximum(weight.sum(), 1.0)
    mean = share @ flat
    centred = flat - mean
    covariance = (centred * share[:, None]).T @ centred
    _, vectors = jnp.linalg.eigh(covariance)
    return vectors[:, ::-1][:, :components]


class _Prior(NamedTuple):
    """Global linear map ``prediction = patch @ weights + bias``."""

    weights: jax.Array
    bias: jax.Array


class _Tiles(NamedTuple):
    """One band of rows with the halo that its windows and patches reach."""

    ref: jax.Array
    local_ref: jax.Array
    insp: jax.Array
    valid: jax.Array


def _fit_prior(tile_at: callable, blocks: int, rows: int, width: int, radius: int, patch_size: int, alpha: float) -> _Prior:
    """Fit one ridge map on every valid pixel of a map, one band at a time.

    The penalty is the one of ``tsjax.students.ridge.ridge_solve``:
    ``alpha * trace(S) / d`` with a floor of ``1e-6 * trace(S) / d + 1e-12``.
    Accumulating the moments band by band keeps the ``[h, w, d]`` patch
    array from being materialised; the inputs are centred beforehand, so
    ``sum(x x^T) - N mean mean^T`` loses no float32 digits to cancellation.
    """

    def moments(index: jax.Array) -> tuple[jax.Array, ...]:
        tiles = tile_at(index)
        patches = _valid_patches(tiles.ref, patch_size)[radius : radius + rows, radius : radius + width]
        inputs = patches.reshape(rows * width, -1)
        targets = tiles.insp[radius : radius + rows, radius : radius + width].reshape(rows * width, -1)
        weight = tiles.valid[radius : radius + rows, radius : radius + width].reshape(-1, 1)
        weighted = inputs * weight
        return weight.sum(), weighted.sum(0), (targets * weight).sum(0), weighted.T @ inputs, weighted.T @ targets

    def accumulate(total: tuple[jax.Array, ...], index: jax.Array) -> tuple[tuple[jax.Array, ...], None]:
        return tuple(a + b for a, b in zip(total, moments(index))), None

    zeros = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), jax.eval_shape(moments, jnp.int32(0)))
    (count, sum_x, sum_y, sum_xx, sum_xy), _ = jax.lax.scan(accumulate, zeros, jnp.arange(blocks))
    count = jnp.maximum(count, 1.0)
    mean_x, mean_y = sum_x / count, sum_y / count
    scatter = sum_xx - count * jnp.outer(mean_x, mean_x)
    cross = sum_xy - count * jnp.outer(mean_x, mean_y)
    dim = scatter.shape[0]
    trace = jnp.trace(scatter)
    penalty = jnp.maximum(alpha * trace / dim, 1e-6 * trace / dim + 1e-12)
    factor = jax.scipy.linalg.cho_factor(scatter + penalty * jnp.eye(dim, dtype=scatter.dtype))
    weights = jax.scipy.linalg.cho_solve(factor, cross)
    return _Prior(weights=weights, bias=mean_y - mean_x @ weights)


def _predict_one(
    ref: jax.Array,
    local_ref: jax.Array,
    insp: jax.Array,
    valid: jax.Array,
    *,
    patch_size: int,
    window: int,
    leave_out: int,
    alpha: float,
    prior_alpha: float | None,
    form: str,
    rows: int,
    solver_rows: int,
) -> jax.Array:
    """Local ridge predictions for one map, ``[h, w, C_out]``; see ``local_ridge_predict``.

    ``ref`` feeds the prior and ``local_ref`` (``ref`` or its PCA projection)
    the window fits. The map is processed in bands of ``rows`` rows, each
    split into calls of the per-pixel solver on ``solver_rows`` rows (see
    ``BlockRows``).
    """
    height, width, _ = ref.shape
    radius = window // 2
    reach = radius + patch_size // 2
    fit_index, centre = _fit_samples(window, leave_out)
    fit_offsets = _window_offsets(window)[fit_index]
    dim = patch_size * patch_size * local_ref.shape[-1]

    blocks = math.ceil(height / rows)
    extra = blocks * rows - height
    # Edge padding reproduces ``extract_patches`` for patches that cross the
    # border. Window samples outside the map get weight 0, so their padded
    # values never enter a fit.
    ref_pad = ((reach, reach + extra), (reach, reach), (0, 0))
    ref_padded = jnp.pad(ref, ref_pad, mode="edge")
    local_padded = ref_padded if local_ref is ref else jnp.pad(local_ref, ref_pad, mode="edge")
    insp_padded = jnp.pad(insp, ((radius, radius + extra), (radius, radius), (0, 0)), mode="edge")
    valid_padded = jnp.pad(valid, ((radius, radius + extra), (radius, radius)))

    def tile_at(index: jax.Array) -> _Tiles:
        start = index * rows
        ref_size = (rows + 2 * reach, width + 2 * reach)
        window_size = (rows + 2 * radius, width + 2 * radius)
        return _Tiles(
            ref=jax.lax.dynamic_slice(ref_padded, (start, 0, 0), ref_size + ref.shape[-1:]),
            local_ref=jax.lax.dynamic_slice(local_padded, (start, 0, 0), ref_size + local_ref.shape[-1:]),
            insp=jax.lax.dynamic_slice(insp_padded, (start, 0, 0), window_size + insp.shape[-1:]),
            valid=jax.lax.dynamic_slice(valid_padded, (start, 0), window_size),
        )

    prior = None
    if prior_alpha is not None:
        prior = _fit_prior(tile_at, blocks, rows, width, radius, patch_size, prior_alpha)

    def solve_band(index: jax.Array) -> jax.Array:
        tiles = tile_at(index)
        targets = tiles.insp
        if prior is not None:
            prior_tile = _valid_patches(tiles.ref, patch_size) @ prior.weights + prior.bias
            targets = targets - prior_tile
        if form == "dual":
            grams = _shifted_grams(tiles.local_ref, window, patch_size)
            columns = np.append(fit_index, centre)
            solver = jax.vmap(jax.vmap(lambda g, v: _dual_coefficients(g, v, alpha, dim)))
        else:
            patches = _valid_patches(tiles.local_ref, patch_size)
            solver = jax.vmap(jax.vmap(lambda x, x0, v: _primal_coefficients(x, x0, v, alpha)))

        def solve_rows(part: jax.Array) -> jax.Array:
            # Solver rows [start, start + solver_rows) of the band, with the
            # window's halo of ``radius`` rows on each side.
            start = part * solver_rows
            halo_rows = solver_rows + 2 * radius
            valid_rows = jax.lax.dynamic_slice_in_dim(tiles.valid, start, halo_rows)
            weights = _window_stack(valid_rows, fit_offsets, solver_rows, width, radius)
            if form == "dual":
                gram_band = jax.lax.dynamic_slice_in_dim(grams, start, halo_rows, axis=2)
                beta = solver(_window_gram_rows(gram_band, fit_offsets, columns, solver_rows, width), weights)
            else:
                patch_rows = jax.lax.dynamic_slice_in_dim(patches, start, halo_rows)
                inputs = _window_stack(patch_rows, fit_offsets, solver_rows, width, radius)
                centre_inputs = patch_rows[radius : radius + solver_rows, radius : radius + width]
                beta = solver(inputs, centre_inputs, weights)
            target_rows = jax.lax.dynamic_slice_in_dim(targets, start, halo_rows)
            # Sum the weighted targets one window offset at a time so that the
            # [rows, width, n, C] stack of window targets is never materialised.
            prediction = jnp.zeros((solver_rows, width, insp.shape[-1]), insp.dtype)
            for sample, (dy, dx) in enumerate(fit_offsets):
                shifted = target_rows[radius + dy : radius + dy + solver_rows, radius + dx : radius + dx + width]
                prediction = prediction + beta[..., sample, None] * shifted
            return prediction

        fitted = jax.lax.map(solve_rows, jnp.arange(rows // solver_rows)).reshape(rows, width, -1)
        if prior is not None:
            fitted = fitted + prior_tile[radius : radius + rows, radius : radius + width]
        return fitted

    predictions = jax.lax.map(solve_band, jnp.arange(blocks))
    return predictions.reshape(blocks * rows, width, -1)[:height]


def _resolve_form(form: str, samples: int, dim: int, alpha: float) -> str:
    """Pick the form and reject settings whose system is singular."""
    if form not in FORMS:
        raise ValueError(f"form={form!r} is unknown; use one of {FORMS}.")
    if alpha == 0 and samples <= dim:
        raise ValueError(
            f"alpha=0 with {samples} samples per window and {dim} features (patch_size**2 * channels) "
            "leaves each window's ridge system singular; set alpha > 0 (for example 1e-3), or enlarge "
            "the window or reduce the features (patch_size, components) until samples > features."
        )
    if alpha == 0 and form == "dual":
        raise ValueError(
            "alpha=0 makes the dual system singular (its centred Gram matrix has rank below the "
            "sample count); set alpha > 0 or form='primal'."
        )
    if form == "auto":
        return "dual" if samples < dim else "primal"
    return form


def local_ridge_predict(
    ref: ArrayLike,
    insp: ArrayLike,
    valid: ArrayLike,
    *,
    patch_size: int,
    window: int,
    leave_out: int,
    alpha: float,
    prior_alpha: float | None = None,
    form: str = "auto",
    components: int = 0,
    max_block_mb: float = 256.0,
) -> jax.Array:
    """Predict every pixel's inspected features from its own local ridge fit.

    For pixel ``q``, the fit minimises
    ``sum_i v_i |y_i - x_i W_q - b_q|^2 + lam_q |W_q - W_0|_F^2`` over the
    window samples ``i`` around ``q`` (all ``w x w`` minus the central
    ``leave_out x leave_out`` square), where ``x_i`` is the reference patch,
    ``y_i`` the inspected feature vector and ``v_i`` the validity of sample
    ``i``. ``W_0`` is zero, or with ``prior_alpha`` the global ridge map of
    the whole map (fitted with penalty ``prior_alpha``), in which case the
    window fits the residual of the global prediction. The penalty
    ``lam_q = alpha * trace(S_q) / d`` is relative to the window's centred
    scatter ``S_q``, as in the global ridge. It never falls below
    ``1e-5 * trace(S_q) / n``, nor below the float32 rounding error of the
    centred system (``4 n eps max_i v_i |x_i|^2``), so Cholesky stays finite. The
    output at ``q`` is ``x_q W_q + b_q``.

    Args:
      ref: ``[B, h, w, C]`` reference features.
      insp: ``[B, h, w, C_out]`` inspected features.
      valid: ``[B, h, w]`` bool or 0/1 mask of pixels that may be fitted on.
      patch_size: Odd side ``k`` of the reference patch, in feature px.
      window: Odd side ``w`` of the fitting window, in feature px.
      leave_out: Side of the central square left out of each pixel's own
        fit: 0 keeps every window sample, 1 leaves out the pixel itself, 3
        also its 8 neighbours. 0 or odd, smaller than ``window``.
      alpha: Relative ridge penalty of each window, ``>= 0``; 0 needs more
        samples than features and the primal form.
      prior_alpha: ``None`` to shrink each window's map toward zero, or the
        relative penalty of the global map it is shrunk toward.
      form: ``'dual'``, ``'primal'`` or ``'auto'``, which takes the dual when
        samples < features (its system is then the smaller one).
      components: If positive, project the reference channels that the
        windows see onto this many principal components of the map's valid
        reference features, which shrinks ``d`` to ``k * k * components``.
        The prior always sees every channel.
      max_block_mb: Estimated working memory of one band of rows, in MiB.

    Returns:
      ``[B, h, w, C_out]`` float32 predictions.

    Raises:
      ValueError: for shapes that disagree, invalid window settings, an
        unknown ``form``, or ``alpha = 0`` where the system is singular.
    """
    ref = jnp.asarray(ref, jnp.float32)
    insp = jnp.asarray(insp, jnp.float32)
    valid = jnp.asarray(valid).astype(jnp.float32)
    if ref.ndim != 4 or insp.ndim != 4:
        raise ValueError(f"ref and insp must be [B, h, w, C]; got shapes {ref.shape} and {insp.shape}.")
    if ref.shape[:3] != insp.shape[:3] or valid.shape != ref.shape[:3]:
        raise ValueError(f"ref {ref.shape}, insp {insp.shape} and valid {valid.shape} must share [B, h, w].")
    _check_window(patch_size, window, leave_out, alpha, prior_alpha, components, ref.shape[-1])
    # Subtracting the map's mean leaves every fit unchanged (each has its own
    # intercept) but keeps float32 Gram and scatter entries from being
    # dominated by the mean, whose removal would otherwise cancel digits.
    share = valid / jnp.maximum(valid.sum(axis=(1, 2), keepdims=True), 1.0)
    ref = ref - jnp.einsum("byx,byxc->bc", share, ref)[:, None, None, :]
    local_ref = ref
    if components:
        basis = jax.vmap(_pca_basis, in_axes=(0, 0, None))(ref, valid, components)
        local_ref = jnp.einsum("byxc,bcp->byxp", ref, basis)

    samples = len(_fit_samples(window, leave_out)[0])
    dim = patch_size * patch_size * local_ref.shape[-1]
    form = _resolve_form(form, samples, dim, alpha)
    prior = prior_alpha is not None
    batch, height, width = ref.shape[:3]
    layout = block_rows(form, samples, window, dim, insp.shape[-1], prior, width, batch, max_block_mb)
    solver_rows = min(layout.solver, height)
    # Split the rows into equal bands so the last one is not mostly padding.
    rows = math.ceil(height / math.ceil(height / max(layout.band, solver_rows)))
    rows = math.ceil(rows / solver_rows) * solver_rows

    def predict(one_ref: jax.Array, one_local: jax.Array, one_insp: jax.Array, one_valid: jax.Array) -> jax.Array:
        return _predict_one(
            one_ref,
            one_ref if local_ref is ref else one_local,
            one_insp,
            one_valid,
            patch_size=patch_size,
            window=window,
            leave_out=leave_out,
            alpha=alpha,
            prior_alpha=prior_alpha,
            form=form,
            rows=rows,
            solver_rows=solver_rows,
        )

    return jax.vmap(predict)(ref, local_ref, insp, valid)


def _check_window(
    patch_size: int, window: int, leave_out: int, alpha: float, prior_alpha: float | None, components: int, channels: int
) -> None:
    """Raise ValueError for window settings that cannot be fitted."""
    _check_geometry(patch_size, window, leave_out)
    if not alpha >= 0:
        raise ValueError(f"alpha must be >= 0; got {alpha!r}.")
    if prior_alpha is not None and not prior_alpha >= 0:
        raise ValueError(f"prior_alpha must be >= 0 or None; got {prior_alpha!r}.")
    if not isinstance(components, int) or not 0 <= components <= channels:
        raise ValueError(
            f"components must be an integer in [0, {channels}] (the channel count; 0 disables PCA); got {components!r}."
        )


def _check_geometry(patch_size: int, window: int, leave_out: int) -> None:
    """Raise ValueError for a patch, window or left-out square of invalid size."""
    for name, value in (("patch_size", patch_size), ("window", window)):
        if not isinstance(value, int) or value < 1 or value % 2 == 0:
            raise ValueError(f"{name} must be a positive odd integer; got {value!r}.")
    if not isinstance(leave_out, int) or leave_out < 0 or (leave_out and leave_out % 2 == 0):
        raise ValueError(f"leave_out must be 0 or a positive odd integer; got {leave_out!r}.")
    if leave_out >= window:
        raise ValueError(
            f"leave_out={leave_out} leaves no sample of a {window}x{window} window; use a window larger than leave_out."
        )


class LocalRidgeState(NamedTuple):
    """Per-pixel predictions of the pair the local ridge was fitted on.

    Attributes:
      prediction: ``[B, h, w, C]`` inspected features predicted by each
        pixel's own local fit.
    """

    prediction: jax.Array


@dataclasses.dataclass(frozen=True)
class LocalRidgeStudent:
    """A ridge map per pixel, fitted on the window around it.

    With ``prior='global'`` each window's map is shrunk toward one global
    ridge map (fitted on all valid pixels with ``alpha``) instead of toward
    zero: the window fits the global fit's residual. A window's few samples
    then only adjust the map where the evidence is strong, and a pixel whose
    reference patch is unlike any other in its window (a line end, a corner)
    falls back to the global prediction instead of an extrapolation. With
    ``prior='none'`` the windows are plain ridge fits.

    The fit needs the inspected features of the pair it scores, so ``fit``
    does all the work and returns the predictions as the state, and
    ``predict`` returns them after checking that ``ref`` has their shape.
    The state cannot be reused on another pair: ``transductive`` tells the
    pipeline to reject pre-fitted states for this student.

    Attributes:
      patch_size: Odd side ``k`` of the reference patch, in feature px.
      alpha: Relative ridge penalty of the global prior map (see
        ``tsjax.students.ridge.ridge_solve``); unused with ``prior='none'``.
      window: Odd side of the fitting window, in feature px.
      leave_out: Side of the central square left out of each pixel's fit
        (see ``local_ridge_predict``).
      local_alpha: Relative ridge penalty of each window's fit, which pulls
        the window's map toward the prior. It must be positive when the
        window has fewer samples than features.
      prior: ``'global'`` or ``'none'``.
      components: Principal components of the reference channels that the
        window fits see (0 keeps all channels).
      form: ``'auto'``, ``'dual'`` or ``'primal'``.
      max_block_mb: Estimated working memory of one band of rows, in MiB.
    """

    patch_size: int = 3
    alpha: float = 1e-3
    window: int = 7
    leave_out: int = 1
    local_alpha: float = 100.0
    prior: str = "global"
    components: int = 0
    form: str = "auto"
    max_block_mb: float = 256.0
    name: str = "local_ridge"
    transductive: ClassVar[bool] = True

    def __post_init__(self) -> None:
        # Checked when the student is built, so that a command-line run
        # rejects bad --student_options before it loads images and weights.
        if self.prior not in PRIORS:
            raise ValueError(f"prior={self.prior!r} is unknown; use one of {PRIORS}.")
        if self.form not in FORMS:
            raise ValueError(f"form={self.form!r} is unknown; use one of {FORMS}.")
        _check_geometry(self.patch_size, self.window, self.leave_out)
        if not self.local_alpha >= 0:
            raise ValueError(
                f"local_alpha must be >= 0; got {self.local_alpha!r} (on the command line: "
                "--student_options=local_alpha=100, the default)."
            )
        if not self.alpha >= 0:
            raise ValueError(f"alpha, the global prior's penalty (--alpha), must be >= 0; got {self.alpha!r}.")
        if not isinstance(self.components, int) or self.components < 0:
            raise ValueError(f"components must be a non-negative integer (0 disables PCA); got {self.components!r}.")

    def _check_local_alpha(self, channels: int) -> None:
        # local_ridge_predict would reject local_alpha = 0 too, but naming
        # its own argument, alpha, which on the command line is another flag.
        if self.local_alpha != 0:
            return
        samples = len(_fit_samples(self.window, self.leave_out)[0])
        dim = self.patch_size * self.patch_size * (self.components or channels)
        if samples <= dim or self.form == "dual":
            raise ValueError(
                f"local_alpha=0 leaves each window's ridge system singular ({samples} samples per window, "
                f"{dim} features, form {self.form!r}); set local_alpha > 0 (on the command line: "
                "--student_options=local_alpha=100, the default)."
            )

    def fit(self, ref: ArrayLike, insp: ArrayLike, valid: ArrayLike, key: jax.Array) -> LocalRidgeState:
        """Fit every pixel on its window and store its prediction.

        Args:
          ref: ``[B, h, w, C]`` reference features.
          insp: ``[B, h, w, C_out]`` inspected features.
          valid: ``[B, h, w]`` mask of pixels that may be fitted on.
          key: Unused (closed form).

        Returns:
          The ``LocalRidgeState``.

        Raises:
          ValueError: for ``local_alpha = 0`` where each window's system is
            singular, or the cases listed by ``local_ridge_predict``.
        """
        del key
        self._check_local_alpha(jnp.shape(ref)[-1])
        prediction = local_ridge_predict(
            ref,
            insp,
            valid,
            patch_size=self.patch_size,
            window=self.window,
            leave_out=self.leave_out,
            alpha=self.local_alpha,
            prior_alpha=self.alpha if self.prior == "global" else None,
            form=self.form,
            components=self.components,
            max_block_mb=self.max_block_mb,
        )
        return LocalRidgeState(prediction=prediction)

    def predict(self, state: LocalRidgeState, ref: ArrayLike) -> jax.Array:
        """Return the fitted pair's predictions, ``[B, h, w, C]``.

        Raises:
          ValueError: if ``ref`` is not ``[B, h, w, ...]`` of the fitted pair.
        """
        ref_shape = jnp.shape(ref)
        if tuple(ref_shape[:3]) != tuple(state.prediction.shape[:3]):
            raise ValueError(
                f"local ridge state holds predictions for maps of shape {state.prediction.shape[:3]} but ref "
                f"is {tuple(ref_shape[:3])}; local ridge only predicts the pair it was fitted on, so fit it on this pair."
            )
        return state.prediction
