"""Images placed on a larger canvas: extents, a masked teacher and edge replication.

Batches pad pairs of different sizes to one bucket shape, and tiles cut
windows out of a large image that cross its border. Both put an image of
``height x width`` px on a canvas whose pixel ``(0, 0)`` lies at image
coordinates ``(origin_y, origin_x)``; the four numbers are the image's
*extent*, an int32 array ``[..., 4]`` ordered ``(origin_y, origin_x, height,
width)``. The functions here make each JAX stage on the canvas return what
it returns on the bare image, at every canvas pixel that shows the image:

* ``canvas_features`` zeroes the input and output of every teacher submodule
  outside the image. Each convolution then reads zeros beyond the image
  border, which is exactly the zero padding it applies to a bare image.
  Max-pooling pads with ``-inf`` on a bare image, but its input is a ReLU
  output (``>= 0``) and every pooling window keeps at least one image pixel,
  so a zero outside the image never wins either.
* ``replicate_edges`` fills feature, score and pixel maps outside the image
  with the image's edge values, which is what ``extract_patches``, the
  upsampling and ``gaussian_smooth`` read beyond a bare image's border.

Both rely on the feature grids of canvas and image coinciding: origins must
be multiples of the deepest layer's stride, and canvas sides multiples of
``CANVAS_MULTIPLE`` so that every layer's shape divides exactly.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from tsjax.score import gaussian_smooth
from tsjax.teacher import LAYER_STRIDES, gray_features

__all__ = [
    "CANVAS_MULTIPLE",
    "make_extents",
    "index_ranges",
    "extent_mask",
    "replicate_edges",
    "canvas_features",
    "gaussian_filter_reflect",
    "upsample_on_canvas",
    "combine_on_canvas",
]

# Canvas sides and origins are multiples of the largest teacher stride, so
# that feature ``i`` of every layer sits on the same image pixel on the
# canvas and on the bare image.
CANVAS_MULTIPLE = max(LAYER_STRIDES.values())


def make_extents(origins: ArrayLike, sizes: ArrayLike) -> jax.Array:
    """Stack image origins and sizes into extents.

    Args:
      origins: ``[N, 2]`` ints, the image coordinates ``(y, x)`` of canvas
        pixel ``(0, 0)``. They are ``(0, 0)`` when the image starts at the
        canvas corner, and negative when the canvas starts before the image.
      sizes: ``[N, 2]`` ints, the image's ``(height, width)`` in px.

    Returns:
      ``[N, 4]`` int32 extents ``(origin_y, origin_x, height, width)``.

    Raises:
      ValueError: if an origin is not a multiple of ``CANVAS_MULTIPLE`` or a
        size is not positive.
    """
    origins = np.asarray(origins, np.int64).reshape(-1, 2)
    sizes = np.asarray(sizes, np.int64).reshape(-1, 2)
    if origins.shape != sizes.shape:
        raise ValueError(f"origins {origins.shape} and sizes {sizes.shape} must both be [N, 2].")
    if np.any(origins % CANVAS_MULTIPLE):
        raise ValueError(
            f"origins {origins.tolist()} must be multiples of {CANVAS_MULTIPLE} px so that the "
            "teacher's feature grids coincide on canvas and image; move the canvas accordingly."
        )
    if np.any(sizes <= 0):
        raise ValueError(f"image sizes {sizes.tolist()} must be positive.")
    return jnp.asarray(np.concatenate([origins, sizes], axis=1), jnp.int32)


def index_ranges(extents: ArrayLike, stride: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Return where the image lies on a stride-``stride`` grid of the canvas.

    A bare image of ``n`` px has ``ceil(n / stride)`` features per side at
    this stride (every strided layer of the teacher maps ``n`` to
    ``ceil(n / 2)``), and canvas feature ``i`` is image feature
    ``i + origin / stride``.

    Args:
      extents: ``[..., 4]`` int extents.
      stride: Grid stride in px (1 for pixels).

    Returns:
      ``(row_start, row_stop, col_start, col_stop)``, each ``[...]`` int32:
      canvas indices of the first image feature and one past the last.
      Starts are negative when the image begins before the canvas.
    """
    extents = jnp.asarray(extents, jnp.int32)
    origin_y, origin_x, height, width = (extents[..., i] for i in range(4))
    row_start = -origin_y // stride
    col_start = -origin_x // stride
    return row_start, row_start + -(-height // stride), col_start, col_start + -(-width // stride)


def extent_mask(extents: ArrayLike, shape: tuple[int, int], stride: int) -> jax.Array:
    """Mark the canvas features of a stride-``stride`` grid that show the image.

    Args:
      extents: ``[N, 4]`` int extents.
      shape: ``(h, w)`` of the grid on the canvas.
      stride: Grid stride in px.

    Returns:
      ``[N, h, w]`` bool.
    """
    rows_inside, cols_inside = _inside(extents, stride, shape)
    return rows_inside[:, :, None] & cols_inside[:, None, :]


def replicate_edges(maps: ArrayLike, extents: ArrayLike, stride: int) -> jax.Array:
    """Fill every canvas feature outside the image with the nearest image feature.

    Args:
      maps: ``[N, h, w, ...]`` maps on a stride-``stride`` canvas grid.
      extents: ``[N, 4]`` int extents.
      stride: Grid stride in px.

    Returns:
      ``[N, h, w, ...]``, equal to ``maps`` inside the image.
    """
    maps = jnp.asarray(maps)
    height, width = maps.shape[1:3]
    row_start, row_stop, col_start, col_stop = index_ranges(extents, stride)
    rows = jnp.clip(jnp.arange(height)[None], row_start[:, None], row_stop[:, None] - 1)
    cols = jnp.clip(jnp.arange(width)[None], col_start[:, None], col_stop[:, None] - 1)

    def gather(single: jax.Array, row_index: jax.Array, col_index: jax.Array) -> jax.Array:
        single = jnp.take(single, row_index, axis=0, mode="clip")
        return jnp.take(single, col_index, axis=1, mode="clip")

    return jax.vmap(gather)(maps, rows, cols)


def canvas_features(
    variables: Mapping, images: ArrayLike, extents: ArrayLike, last_layer: str, with_stem: bool = True
) -> dict[str, jax.Array]:
    """Run the teacher on canvases as if each contained only its image.

    Args:
      variables: Teacher variables.
      images: ``[N, Hc, Wc]`` grayscale canvases in [0, 1]; ``Hc`` and ``Wc``
        are multiples of ``CANVAS_MULTIPLE``.
      extents: ``[N, 4]`` int extents of the image on each canvas.
      last_layer: Deepest teacher layer to compute.
      with_stem: Also return ``'stem'``. Without it the stem is computed
        band by band (``tsjax.teacher.pooled_stem``), which is faster.

    Returns:
      Feature maps keyed by layer name up to ``last_layer``, ``[N, h, w, C]``
      with ``h = Hc / stride``. Inside the image they equal the teacher's
      features of the bare image; outside they are zero.

    Raises:
      ValueError: if a canvas side is not a multiple of ``CANVAS_MULTIPLE``.
    """
    images = jnp.asarray(images, jnp.float32)
    extents = jnp.asarray(extents, jnp.int32)
    canvas_height, canvas_width = images.shape[-2:]
    if canvas_height % CANVAS_MULTIPLE or canvas_width % CANVAS_MULTIPLE:
        raise ValueError(
            f"canvas shape {(canvas_height, canvas_width)} must be a multiple of {CANVAS_MULTIPLE} "
            "px per side; pad the canvas (see tsjax.batch.bucket_shape)."
        )

    def zero_outside(outputs: jax.Array) -> jax.Array:
        stride = canvas_height // outputs.shape[1]
        mask = extent_mask(extents, outputs.shape[1:3], stride)
        return outputs * mask[..., None].astype(outputs.dtype)

    def is_feature_map(value) -> bool:
        return isinstance(value, jax.Array) and value.ndim == 4

    def interceptor(next_fun, args, kwargs, context):
        # Zero the input and output of every submodule (convolution, batch
        # norm, residual block): a max-pool output or a residual sum can be
        # non-zero just outside the image, and a convolution must not see it.
        if context.method_name == "__call__" and args and is_feature_map(args[0]):
            args = (zero_outside(args[0]), *args[1:])
        outputs = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and is_feature_map(outputs):
            outputs = zero_outside(outputs)
        return outputs

    # The grayscale input form zeroes the image outside its extent itself
    # (``tsjax.teacher.GrayStem`` and ``pooled_stem``), so its 3-D input
    # needs no interception.
    inside = tuple(value.astype(images.dtype) for value in _inside(extents, 1, (canvas_height, canvas_width)))
    stem_shape = (-(-canvas_height // 2), -(-canvas_width // 2))
    stem_inside = tuple(value.astype(images.dtype) for value in _inside(extents, 2, stem_shape))
    with nn.intercept_methods(interceptor):
        return gray_features(
            variables, images, last_layer, with_stem=with_stem, inside=inside, stem_inside=stem_inside
        )


def _inside(extents: ArrayLike, stride: int, shape: tuple[int, int]) -> tuple[jax.Array, jax.Array]:
    # Bool row and column indicators, [N, h] and [N, w], of the grid
    # positions that show the image (extent_mask is their outer product).
    row_start, row_stop, col_start, col_stop = index_ranges(extents, stride)
    rows = jnp.arange(shape[0])
    cols = jnp.arange(shape[1])
    rows_inside = (rows >= row_start[:, None]) & (rows < row_stop[:, None])
    cols_inside = (cols >= col_start[:, None]) & (cols < col_stop[:, None])
    return rows_inside, cols_inside


def _reflect_index(index: jax.Array, start: jax.Array, stop: jax.Array) -> jax.Array:
    # scipy.ndimage's 'reflect' mode mirrors about the pixel edge: (d c b a | a b c d).
    period = 2 * (stop - start)
    offset = jnp.mod(index - start, period)
    return start + jnp.where(offset < stop - start, offset, period - 1 - offset)


def gaussian_filter_reflect(images: ArrayLike, extents: ArrayLike, sigma: float) -> jax.Array:
    """Smooth canvases like ``scipy.ndimage.gaussian_filter`` smooths the bare image.

    The kernel is scipy's (radius ``int(4 * sigma + 0.5)``, normalised to
    sum 1) and the image is mirrored at its own border, scipy's default
    ``'reflect'`` mode, wherever the kernel reaches past it. Where the image
    continues past the canvas (a tile's edge), the canvas edge is mirrored
    instead; a tile's halo absorbs that.

    Args:
      images: ``[N, Hc, Wc]`` canvases.
      extents: ``[N, 4]`` int extents.
      sigma: Standard deviation in px; 0 returns the input.

    Returns:
      ``[N, Hc, Wc]`` float32, the image's edge values outside the image.
    """
    images = jnp.asarray(images, jnp.float32)
    if sigma <= 0:
        return images
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    row_start, row_stop, col_start, col_stop = index_ranges(extents, 1)

    def filter_axis(single: jax.Array, start: jax.Array, stop: jax.Array, axis: int) -> jax.Array:
        length = single.shape[axis]
        # Pad by the radius with mirrored image pixels, then sum shifted
        # slices, which XLA fuses into one pass (a one-channel convolution
        # is far slower on CPU).
        source = _reflect_index(jnp.arange(-radius, length + radius), start, stop)
        padded = jnp.take(single, jnp.clip(source, 0, length - 1), axis=axis)
        return sum(
            float(weight) * jax.lax.slice_in_dim(padded, tap, tap + length, axis=axis)
            for tap, weight in enumerate(kernel)
        )

    def smooth(single, r0, r1, c0, c1):
        return filter_axis(filter_axis(single, r0, r1, 0), c0, c1, 1)

    smoothed = jax.vmap(smooth)(images, row_start, row_stop, col_start, col_stop)
    return replicate_edges(smoothed, extents, 1)


def _upsample_axis(values: jax.Array, stride: int, axis: int) -> jax.Array:
    # Pixel stride * i + r reads (1 - r / stride) * v[i] + (r / stride) * v[i + 1]
    # with v[i + 1] clamped at the last index. That is linear interpolation
    # at y / stride in 'nearest' mode, written without a gather.
    values = jnp.moveaxis(values, axis, -1)
    following = jnp.concatenate([values[..., 1:], values[..., -1:]], axis=-1)
    fraction = jnp.arange(stride, dtype=jnp.float32) / stride
    upsampled = values[..., None] * (1.0 - fraction) + following[..., None] * fraction
    upsampled = upsampled.reshape(*values.shape[:-1], values.shape[-1] * stride)
    return jnp.moveaxis(upsampled, -1, axis)


def upsample_on_canvas(coarse: ArrayLike, weight: ArrayLike, stride: int) -> jax.Array:
    """Upsample ``[N, h, w]`` scores to ``[N, h * stride, w * stride]`` pixels.

    Equals ``tsjax.score.upsample_to_image(coarse, stride, shape, valid=weight)``
    on a canvas whose side is ``stride`` times the map's: bilinear reading at
    ``y / stride`` clamped at the last feature, normalised by the
    interpolated weight, and 0 where that weight is below 1e-6. Separable
    interpolation replaces the gathers of ``map_coordinates``, which XLA ran
    several times slower per canvas in batches of 4 on CPU.

    Args:
      coarse: ``[N, h, w]`` scores.
      weight: ``[N, h, w]`` weights of the features (the valid mask).
      stride: Integer upsampling factor.

    Returns:
      ``[N, h * stride, w * stride]`` float32.
    """
    weight = jnp.asarray(weight, jnp.float32)
    both = jnp.stack([jnp.asarray(coarse, jnp.float32) * weight, weight])
    both = _upsample_axis(_upsample_axis(both, stride, -2), stride, -1)
    numerator, denominator = both[0], both[1]
    return jnp.where(denominator > 1e-6, numerator / jnp.maximum(denominator, 1e-6), 0.0)


def combine_on_canvas(
    coarse_maps: Mapping[str, jax.Array],
    feature_valid: Mapping[str, jax.Array],
    valid: ArrayLike,
    extents: ArrayLike,
    layers: Sequence[str],
    weights: Sequence[float],
    sigma: float,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Upsample per-layer scores to canvas pixels, combine and smooth them.

    These are the steps of ``tsjax.pipeline.layer_defect_maps`` and
    ``combine_maps`` on a bare image. Each layer's map is read bilinearly at
    ``y / stride`` from its valid features only. The weighted mean of the
    layers is smoothed with a Gaussian of ``sigma`` px normalised by the
    valid pixels and clipped to [0, 1]. Maps and masks are first extended
    past the image by their edge values, which is what the clamped
    interpolation and the edge-replicating smoothing read on a bare image.

    Args:
      coarse_maps: Per layer, ``[N, h, w]`` scores on the canvas grid.
      feature_valid: Per layer, ``[N, h, w]`` mask of the scored features.
      valid: ``[N, Hc, Wc]`` mask of the valid pixels.
      extents: ``[N, 4]`` int extents.
      layers: Layer names, in the order of ``weights``.
      weights: One weight per layer, summing to 1.
      sigma: Gaussian sigma in px; 0 disables smoothing.

    Returns:
      ``(combined, layer_maps)``: the ``[N, Hc, Wc]`` smoothed map (0 outside
      ``valid``) and, per layer, the ``[N, Hc, Wc]`` upsampled map before
      combination.
    """
    valid = jnp.asarray(valid, jnp.float32)
    layer_maps = {}
    for layer in layers:
        stride = LAYER_STRIDES[layer]
        coarse = replicate_edges(coarse_maps[layer], extents, stride)
        feature_weight = replicate_edges(jnp.asarray(feature_valid[layer], jnp.float32), extents, stride)
        layer_maps[layer] = upsample_on_canvas(coarse, feature_weight, stride)
    combined = sum(layer_weight * layer_maps[layer] for layer_weight, layer in zip(weights, layers))
    combined = replicate_edges(combined, extents, 1)
    smoothed = gaussian_smooth(combined, sigma, replicate_edges(valid, extents, 1))
    return jnp.where(valid > 0, jnp.clip(smoothed, 0.0, 1.0), 0.0), layer_maps
