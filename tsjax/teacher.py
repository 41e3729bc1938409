"""Frozen ResNet-18 teacher with torchvision's exact semantics.

The teacher turns an image into multi-scale feature maps. Its parameter tree
mirrors torchvision's ``resnet18`` so that ImageNet weights map one to one:
``torchvision_key_map`` is the single place that states the correspondence.

Two details differ from a naive Flax port and both matter for parity with
torchvision:

* Padding is explicit and symmetric. Flax's ``'SAME'`` pads a stride-2
  convolution more at the bottom/right than at the top/left, while PyTorch
  pads ``padding`` pixels on every side.
* Max-pooling pads with ``-inf``, so a border pixel never competes with a
  zero that is not in the image.

References:
  He, Zhang, Ren and Sun, "Deep Residual Learning for Image Recognition",
  CVPR 2016.
"""

from __future__ import annotations

import hashlib
import os
from typing import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from tsjax.state_dict_io import read_state_dict, strip_key_prefixes

__all__ = [
    "LAYERS",
    "LAYER_STRIDES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "BN_EPSILON",
    "ResNet18",
    "GrayStem",
    "pooled_stem",
    "gray_features",
    "preprocess",
    "torchvision_key_map",
    "load_pretrained",
    "load_state_dict",
    "random_variables",
    "variables_sha256",
    "receptive_field",
]

# Feature maps the teacher can return, shallow to deep, with their stride in
# input pixels.
LAYERS = ("stem", "layer1", "layer2", "layer3")
LAYER_STRIDES = {"stem": 2, "layer1": 4, "layer2": 8, "layer3": 16}

# Receptive field of one output pixel, in input pixels, of torchvision's
# ResNet-18 at the end of each stage (computed from the kernel sizes and
# strides: conv1 7x7/2, max-pool 3x3/2, then 3x3 convolutions).
_RECEPTIVE_FIELD = {"stem": 7, "layer1": 43, "layer2": 99, "layer3": 211}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision's BatchNorm2d default.
BN_EPSILON = 1e-5

# ResNet-18 stages: (name, output channels, stride of the first block).
_STAGES = (("layer1", 64, 1), ("layer2", 128, 2), ("layer3", 256, 2))


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    pad = (kernel - 1) // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=True,
        name=name,
    )


def _bn(name: str) -> nn.BatchNorm:
    return nn.BatchNorm(use_running_average=True, epsilon=BN_EPSILON, name=name)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection (torchvision's BasicBlock).

    Every convolution carries a bias, which is zero for checkpoints with
    separate batch norm and holds the folded batch-norm shift otherwise.
    """

    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        residual = x
        y = _conv(self.features, 3, self.stride, "conv1")(x)
        y = nn.relu(_bn("bn1")(y))
        y = _conv(self.features, 3, 1, "conv2")(y)
        y = _bn("bn2")(y)
        if self.stride != 1 or x.shape[-1] != self.features:
            residual = _conv(self.features, 1, self.stride, "downsample_conv")(x)
            residual = _bn("downsample_bn")(residual)
        return nn.relu(y + residual)


class GrayStem(nn.Module):
    """ResNet-18's ``conv1`` applied to a grayscale image as if it were RGB.

    ``preprocess`` replicates the gray value ``g`` to three channels and
    normalises them, ``x_c = (g - m_c) / s_c``, and the convolution pads
    ``x`` with zeros. With ``1`` the indicator of the image's pixels (zero in
    the padding and outside a canvas's image),

        conv(x, W) = conv(g 1, sum_c W_c / s_c) - conv(1, sum_c W_c m_c / s_c),

    exactly. The first term is a one-channel convolution, about 0.6 of the
    three-channel one's time on CPU. The indicator is a rectangle, the outer
    product of a row and a column indicator, so the second term is two small
    contractions. The parameters are ``conv1``'s, ``kernel [7, 7, 3, 64]``
    and ``bias [64]``, under the same names.

    Call:
      gray: ``[B, H, W]`` float32 grayscale, values in [0, 1].
      rows_inside: ``[B, H]`` 0/1, the rows that show the image.
      cols_inside: ``[B, W]`` 0/1, the columns that show the image.

    Returns:
      ``[B, ceil(H/2), ceil(W/2), 64]``, ``conv1`` of the normalised RGB
      image with zeros outside the image.
    """

    @nn.compact
    def __call__(self, gray: jax.Array, rows_inside: jax.Array, cols_inside: jax.Array) -> jax.Array:
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (7, 7, 3, 64))
        bias = self.param("bias", nn.initializers.zeros_init(), (64,))
        padded = jnp.pad(gray * rows_inside[:, :, None] * cols_inside[:, None, :], ((0, 0), (3, 3), (0, 0)))
        row_taps = _stride_two_taps(jnp.pad(rows_inside, ((0, 0), (3, 3))), (gray.shape[1] + 1) // 2)
        return _folded_conv1(kernel, bias, padded, row_taps, cols_inside)


def _stride_two_taps(padded_inside: jax.Array, size: int) -> jax.Array:
    """Return ``[B, size, 7]``: the padded indicator read at ``2 * y + i``, for ``y < size``."""
    padded = jnp.pad(padded_inside, ((0, 0), (0, 1)))
    return jnp.stack([padded[:, i : i + 2 * size : 2] for i in range(7)], axis=-1)


def _folded_conv1(
    kernel: jax.Array, bias: jax.Array, rows: jax.Array, row_taps: jax.Array, cols_inside: jax.Array
) -> jax.Array:
    """Apply ``conv1`` folded for gray input (see ``GrayStem``) to rows that carry their own padding.

    Args:
      kernel: ``[7, 7, 3, 64]`` conv1 kernel.
      bias: ``[64]`` conv1 bias.
      rows: ``[B, 2 h + 5, W]`` (or more rows, which are ignored) masked gray
        rows, the vertical zero padding included.
      row_taps: ``[B, h, 7]`` indicator of the image at the 7 rows that
        each output row reads.
      cols_inside: ``[B, W]`` indicator of the image's columns.

    Returns:
      ``[B, h, ceil(W / 2), 64]``.
    """
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    gray_kernel = jnp.einsum("ijco,c->ijo", kernel, 1.0 / std)[:, :, None, :]
    mean_kernel = jnp.einsum("ijco,c->ijo", kernel, mean / std)
    main = jax.lax.conv_general_dilated(
        rows[..., None], gray_kernel, (2, 2), ((0, 0), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    main = main[:, : row_taps.shape[1]]
    col_taps = _stride_two_taps(jnp.pad(cols_inside, ((0, 0), (3, 3))), main.shape[2])
    # Contract the columns first, then the rows: each step is a small
    # matmul, where one three-operand einsum built a [B, h, w, 7, 64] product.
    col_terms = jnp.einsum("bxj,ijo->bixo", col_taps, mean_kernel)
    mean_term = jnp.einsum("byi,bixo->byxo", row_taps, col_terms)
    return main - mean_term + bias


def _max_pool_3x3_stride_2(stem: jax.Array) -> jax.Array:
    """Max-pool ``[B, 2 P + 1, W, C]`` stem rows with a 3 x 3 window and stride 2.

    The rows carry their own padding, the columns are padded by one -inf
    column on each side: ``[B, P, ceil(W / 2), C]``, equal to ``nn.max_pool``
    with ``padding=((0, 0), (1, 1))``. Written as maxima of strided slices,
    one axis at a time, because XLA's reduce-window took about twice as long
    on CPU.
    """
    out_rows = (stem.shape[1] - 1) // 2
    out_cols = (stem.shape[2] + 1) // 2
    stem = jnp.pad(stem, ((0, 0), (0, 0), (1, 1), (0, 0)), constant_values=-jnp.inf)
    cols = [stem[:, :, tap : tap + 2 * out_cols - 1 : 2] for tap in range(3)]
    stem = jnp.maximum(jnp.maximum(cols[0], cols[1]), cols[2])
    rows = [stem[:, tap : tap + 2 * out_rows - 1 : 2] for tap in range(3)]
    return jnp.maximum(jnp.maximum(rows[0], rows[1]), rows[2])


def pooled_stem(
    variables: Mapping,
    gray: ArrayLike,
    inside: tuple[ArrayLike, ArrayLike] | None = None,
    stem_inside: tuple[ArrayLike, ArrayLike] | None = None,
    *,
    band_rows: int = 8,
) -> jax.Array:
    """Compute the teacher's max-pooled stem of grayscale images, one band of rows at a time.

    This is ``conv1``, ``bn1``, ReLU and the 3 x 3 max-pool of ``ResNet18``
    (the input of ``layer1``). The ``[B, H/2, W/2, 64]`` stem output is
    never stored whole: each band of ``band_rows`` output rows computes its
    stem rows and pools them while they are in cache. On the 2-core CPU
    that took the stem of a 480 px image from about 20 to 14 ms. Pass the
    result to ``ResNet18(from_stem=True)``.

    Args:
      variables: Teacher variables.
      gray: ``[B, H, W]`` grayscale in [0, 1].
      inside: Optional ``([B, H], [B, W])`` 0/1 indicators of the image's
        rows and columns on a canvas (see ``ResNet18``); pixels outside are
        zero padding.
      stem_inside: Optional ``([B, ceil(H/2)], [B, ceil(W/2)])`` 0/1
        indicators of the stem features that show the image. Others are set
        to 0 before the ReLU, as ``tsjax.canvas.canvas_features`` does.
      band_rows: Output rows per band.

    Returns:
      ``[B, ceil(ceil(H/2)/2), ceil(ceil(W/2)/2), 64]``.
    """
    gray = jnp.asarray(gray, jnp.float32)
    batch, height, width = gray.shape
    if inside is None:
        inside = (jnp.ones((batch, height), gray.dtype), jnp.ones((batch, width), gray.dtype))
    rows_inside, cols_inside = (jnp.asarray(value, gray.dtype) for value in inside)
    stem_height, stem_width = (height + 1) // 2, (width + 1) // 2
    if stem_inside is None:
        stem_inside = (jnp.ones((batch, stem_height), gray.dtype), jnp.ones((batch, stem_width), gray.dtype))
    stem_rows_inside, stem_cols_inside = (jnp.asarray(value, gray.dtype) for value in stem_inside)
    out_height = (stem_height + 1) // 2
    bands = -(-out_height // band_rows)

    # Band b pools stem rows 2 b P - 1 to 2 b P + 2 P - 1 (P = band_rows),
    # which read input rows 4 b P - 5 to 4 b P + 4 P + 1. With 5 rows of
    # zeros on top, that is rows 4 b P to 4 b P + 4 P + 6 of the padded image.
    bottom = 4 * bands * band_rows + 2 - height
    masked = gray * rows_inside[:, :, None] * cols_inside[:, None, :]
    padded = jnp.pad(masked, ((0, 0), (5, bottom), (0, 0)))
    padded_rows_inside = jnp.pad(rows_inside, ((0, 0), (5, bottom)))
    stem_rows = jnp.pad(stem_rows_inside, ((0, 0), (1, 2 * bands * band_rows - stem_height)))
    # Stem rows outside [0, stem_height) are the max-pool's -inf padding.
    stem_exists = jnp.arange(2 * bands * band_rows + 1) - 1
    stem_exists = (stem_exists >= 0) & (stem_exists < stem_height)

    params, stats = variables["params"], variables["batch_stats"]
    scale = params["bn1"]["scale"] * jax.lax.rsqrt(stats["bn1"]["var"] + BN_EPSILON)
    shift = params["bn1"]["bias"] - stats["bn1"]["mean"] * scale
    stem_span = 2 * band_rows + 1

    def band(index: jax.Array) -> jax.Array:
        first = 4 * band_rows * index
        rows = jax.lax.dynamic_slice_in_dim(padded, first, 4 * band_rows + 7, axis=1)
        row_inside = jax.lax.dynamic_slice_in_dim(padded_rows_inside, first, 4 * band_rows + 7, axis=1)
        row_taps = _stride_two_taps(row_inside, stem_span)
        stem = _folded_conv1(params["conv1"]["kernel"], params["conv1"]["bias"], rows, row_taps, cols_inside)
        visible_rows = jax.lax.dynamic_slice_in_dim(stem_rows, 2 * band_rows * index, stem_span, axis=1)
        visible = visible_rows[:, :, None] * stem_cols_inside[:, None, :]
        stem = nn.relu((stem * scale + shift) * visible[..., None])
        exists = jax.lax.dynamic_slice_in_dim(stem_exists, 2 * band_rows * index, stem_span)
        stem = jnp.where(exists[None, :, None, None], stem, -jnp.inf)
        return _max_pool_3x3_stride_2(stem)

    pooled = jax.lax.map(band, jnp.arange(bands))  # [bands, B, P, w, 64]
    pooled = jnp.moveaxis(pooled, 0, 1).reshape(batch, bands * band_rows, *pooled.shape[3:])
    return pooled[:, :out_height]


def gray_features(
    variables: Mapping,
    gray: jax.Array,
    last_layer: str,
    *,
    with_stem: bool = True,
    inside: tuple[jax.Array, jax.Array] | None = None,
    stem_inside: tuple[jax.Array, jax.Array] | None = None,
) -> dict[str, jax.Array]:
    """Run the teacher on ``[B, H, W]`` grayscale images in [0, 1].

    Args:
      variables: Teacher variables.
      gray: ``[B, H, W]`` grayscale images.
      last_layer: Deepest layer to compute.
      with_stem: Also return ``'stem'``. Without it the stem is computed
        band by band (``pooled_stem``), which is faster.
      inside, stem_inside: Optional row and column indicators of the image
        on a canvas, as for ``pooled_stem``.

    Returns:
      Feature maps keyed by layer name up to ``last_layer``, ``[B, h, w, C]``.
    """
    if with_stem or last_layer == "stem":
        return ResNet18(last_layer=last_layer).apply(variables, gray, inside)
    pooled = pooled_stem(variables, gray, inside, stem_inside)
    return ResNet18(last_layer=last_layer, from_stem=True).apply(variables, pooled)


class ResNet18(nn.Module):
    """ResNet-18 feature extractor up to ``last_layer``.

    Attributes:
      last_layer: Deepest stage to compute, one of ``LAYERS``. Stages after it
        are neither built nor run, so checkpoints that stop early still load.
      from_stem: ``x`` is the max-pooled stem from ``pooled_stem``, and only
        the residual stages run (the returned dict has no ``'stem'``).

    Call:
      x: ``[B, H, W, 3]`` float32, ImageNet-normalised (see ``preprocess``),
        or ``[B, H, W]`` grayscale in [0, 1], which gives the same features
        faster (``GrayStem``).
      inside: With grayscale ``x`` only, optional ``([B, H], [B, W])`` 0/1
        row and column indicators of the image on a larger canvas. The
        teacher then treats every pixel outside as zero padding. By default
        the whole of ``x`` is the image.

    Returns:
      A dict of feature maps keyed by layer name, NHWC: ``'stem'`` after
      conv1/bn1/relu and before max-pool (``[B, ceil(H/2), ceil(W/2), 64]``),
      ``'layer1'`` (1/4 resolution, 64 channels), ``'layer2'`` (1/8, 128),
      ``'layer3'`` (1/16, 256), each present up to ``last_layer``.
    """

    last_layer: str = "layer3"
    from_stem: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, inside: tuple[jax.Array, jax.Array] | None = None) -> dict[str, jax.Array]:
        if self.last_layer not in LAYERS:
            raise ValueError(
                f"last_layer={self.last_layer!r} is not a teacher layer; "
                f"use one of {LAYERS}."
            )
        features = {}
        if self.from_stem:
            if self.last_layer == "stem" or x.ndim != 4 or x.shape[-1] != 64:
                raise ValueError(
                    f"from_stem=True expects the [B, h, w, 64] max-pooled stem (see tsjax.teacher.pooled_stem) "
                    f"and a last_layer after 'stem'; got shape {x.shape} and last_layer={self.last_layer!r}."
                )
        else:
            if x.ndim == 3:
                if inside is None:
                    inside = (jnp.ones(x.shape[:2], x.dtype), jnp.ones((x.shape[0], x.shape[2]), x.dtype))
                x = GrayStem(name="conv1")(x, *inside)
            elif x.ndim == 4 and x.shape[-1] == 3:
                x = _conv(64, 7, 2, "conv1")(x)
            else:
                raise ValueError(
                    f"teacher input must be [B, H, W, 3] (see tsjax.teacher.preprocess) or [B, H, W] "
                    f"grayscale; got shape {x.shape}."
                )
            x = nn.relu(_bn("bn1")(x))
            features["stem"] = x
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        depth = LAYERS.index(self.last_layer)
        for index, (stage, width, stride) in enumerate(_STAGES):
            if index + 1 > depth:
                break
            x = BasicBlock(width, stride, name=f"{stage}_0")(x)
            x = BasicBlock(width, 1, name=f"{stage}_1")(x)
            features[stage] = x
        return features


def receptive_field(layer: str) -> int:
    """Return the receptive field, in input pixels, of one pixel of ``layer``."""
    if layer not in _RECEPTIVE_FIELD:
        raise ValueError(f"unknown layer {layer!r}; use one of {LAYERS}.")
    return _RECEPTIVE_FIELD[layer]


def preprocess(images: ArrayLike) -> jax.Array:
    """Convert grayscale images in [0, 1] to ImageNet-normalised RGB.

    Args:
      images: ``[B, H, W]`` or ``[H, W]`` float images with values in [0, 1].

    Returns:
      ``[B, H, W, 3]`` float32, the gray value replicated to three channels
      and normalised with ImageNet's per-channel mean and standard deviation.
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim == 2:
        images = images[None]
    if images.ndim != 3:
        raise ValueError(f"expected [B, H, W] or [H, W] images; got shape {images.shape}.")
    mean = jnp.asarray(IMAGENET_MEAN, jnp.float32)
    std = jnp.asarray(IMAGENET_STD, jnp.float32)
    return (images[..., None] - mean) / std


def torchvision_key_map(last_layer: str = "layer3") -> dict[str, tuple[str, ...]]:
    """Map torchvision ``state_dict`` keys to paths in the Flax variables.

    Convolution weights map to ``('params', ..., 'kernel')`` and must be
    transposed from OIHW to HWIO. Batch-norm ``weight``/``bias`` map to
    ``params`` ``scale``/``bias`` and ``running_mean``/``running_var`` to
    ``batch_stats`` ``mean``/``var``. A convolution ``bias`` key exists only in
    checkpoints with batch norm folded into the convolutions.

    Args:
      last_layer: Deepest stage whose keys are listed.

    Returns:
      Ordered dict from torchvision key to a path tuple.
    """
    modules = [("conv1", "conv1"), ("bn1", "bn1")]
    depth = LAYERS.index(last_layer)
    for index, (stage, width, stride) in enumerate(_STAGES):
        if index + 1 > depth:
            break
        for block in (0, 1):
            flax_block = f"{stage}_{block}"
            torch_block = f"{stage}.{block}"
            modules += [
                (f"{torch_block}.conv1", f"{flax_block}/conv1"),
                (f"{torch_block}.bn1", f"{flax_block}/bn1"),
                (f"{torch_block}.conv2", f"{flax_block}/conv2"),
                (f"{torch_block}.bn2", f"{flax_block}/bn2"),
            ]
            if block == 0 and stride != 1:
                modules += [
                    (f"{torch_block}.downsample.0", f"{flax_block}/downsample_conv"),
                    (f"{torch_block}.downsample.1", f"{flax_block}/downsample_bn"),
                ]
    mapping = {}
    for torch_name, flax_name in modules:
        path = tuple(flax_name.split("/"))
        if path[-1].startswith("conv") or path[-1] == "downsample_conv":
            mapping[f"{torch_name}.weight"] = ("params", *path, "kernel")
            mapping[f"{torch_name}.bias"] = ("params", *path, "bias")
        else:
            mapping[f"{torch_name}.weight"] = ("params", *path, "scale")
            mapping[f"{torch_name}.bias"] = ("params", *path, "bias")
            mapping[f"{torch_name}.running_mean"] = ("batch_stats", *path, "mean")
            mapping[f"{torch_name}.running_var"] = ("batch_stats", *path, "var")
    return mapping


def _set_path(tree: dict, path: Sequence[str], value: np.ndarray) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get_path(tree: Mapping, path: Sequence[str]):
    for key in path:
        tree = tree[key]
    return tree


def _is_bn(path: Sequence[str]) -> bool:
    return path[-2].startswith("bn") or path[-2] == "downsample_bn"


def random_variables(key: jax.Array, last_layer: str = "layer3") -> dict:
    """Initialise teacher variables at random (for tests and ablations only).

    Batch-norm statistics stay at Flax's defaults (mean 0, variance 1).
    """
    model = ResNet18(last_layer=last_layer)
    return model.init(key, jnp.zeros((1, 64, 64, 3), jnp.float32))


def load_state_dict(state_dict: Mapping[str, ArrayLike], last_layer: str = "layer3") -> dict:
    """Build teacher variables from a torchvision-layout ``state_dict``.

    Both batch-norm layouts are accepted: separate batch-norm tensors, or batch
    norm folded into each convolution's bias (then each batch norm without
    tensors is set to the identity: scale 1, shift 0, mean 0, variance
    ``1 - eps``, so that ``sqrt(var + eps) == 1``). A batch norm with only some
    of its four tensors is an error in either layout.

    Args:
      state_dict: Mapping from torchvision key (``'layer1.0.conv1.weight'``) to
        an array. Convolution weights are OIHW. The prefixes in
        ``tsjax.state_dict_io.KEY_PREFIXES`` (``module.`` and the like) are
        removed first. Keys of stages after ``last_layer``, of ``fc`` and
        ``num_batches_tracked`` counters are ignored.
      last_layer: Deepest stage to load.

    Returns:
      ``{'params': ..., 'batch_stats': ...}`` for ``ResNet18(last_layer).apply``.

    Raises:
      ValueError: listing every missing, unexpected or mis-shaped key at once,
        with its shape (OIHW for convolution weights), or if two keys
        coincide once their prefixes are removed.
    """
    if last_layer not in LAYERS:
        raise ValueError(f"last_layer={last_layer!r} is not a teacher layer; use one of {LAYERS}.")
    reference = jax.eval_shape(lambda: random_variables(jax.random.key(0), last_layer))
    mapping = torchvision_key_map(last_layer)
    stage_prefixes = tuple(f"{stage}." for stage, _, _ in _STAGES[LAYERS.index(last_layer):])
    state_dict = strip_key_prefixes(state_dict)
    ignored_prefixes = stage_prefixes + ("layer4.", "fc.")

    folded = any(
        key.endswith(".bias") and (key.startswith("conv1") or ".conv" in key or "downsample.0" in key)
        for key in state_dict
    )
    problems = []
    variables: dict = {}
    for key, value in state_dict.items():
        if key.endswith("num_batches_tracked") or key.startswith(ignored_prefixes):
            continue
        if key not in mapping:
            problems.append(f"unexpected key {key!r} with shape {tuple(np.shape(value))}")
            continue
        array = np.asarray(value, dtype=np.float32)
        path = mapping[key]
        expected = tuple(_get_path(reference, path).shape)
        if path[-1] == "kernel":
            # Compare in the checkpoint's OIHW layout so the message shows the
            # shapes the user sees in torch.
            expected = (expected[3], expected[2], expected[0], expected[1])
            if array.shape != expected:
                problems.append(f"key {key!r} has shape {array.shape}; expected {expected} (OIHW)")
                continue
            array = array.transpose(2, 3, 1, 0)
        elif array.shape != expected:
            problems.append(f"key {key!r} has shape {array.shape}; expected {expected}")
            continue
        _set_path(variables, path, array)

    # Batch norms with at least one tensor in the checkpoint; they must have all four.
    present_bn = {path[:-1] for key, path in mapping.items() if key in state_dict and _is_bn(path)}
    for key, path in mapping.items():
        if key in state_dict:
            continue
        is_conv_bias = path[-1] == "bias" and not _is_bn(path)
        if is_conv_bias and not folded:
            _set_path(variables, path, np.zeros(_get_path(reference, path).shape, np.float32))
        elif _is_bn(path) and folded and path[:-1] not in present_bn:
            shape = _get_path(reference, path).shape
            identity = {"scale": 1.0, "bias": 0.0, "mean": 0.0, "var": 1.0 - BN_EPSILON}
            _set_path(variables, path, np.full(shape, identity[path[-1]], np.float32))
        else:
            expected = tuple(_get_path(reference, path).shape)
            if path[-1] == "kernel":
                expected = (expected[3], expected[2], expected[0], expected[1])
                problems.append(f"missing key {key!r} (expected shape {expected}, OIHW)")
            else:
                problems.append(f"missing key {key!r} (expected shape {expected})")
    if problems:
        raise ValueError(
            f"state_dict does not match ResNet-18 up to {last_layer} "
            f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )
    return jax.tree_util.tree_map(jnp.asarray, variables)


def load_pretrained(path: str | os.PathLike, last_layer: str = "layer3") -> dict:
    """Load teacher variables from a checkpoint of torchvision-named tensors.

    Args:
      path: A folder with one ``<torchvision key>.npy`` per tensor (the layout
        of an ONNX export with batch norm folded), an ``.npz`` or
        ``.safetensors`` file of the same keys, or a ``torch.save`` ``.pth``/
        ``.pt`` state dict (see ``tsjax.state_dict_io.read_state_dict``).
        Pickled Python objects are never executed.
      last_layer: Deepest stage to load.

    Returns:
      Variables for ``ResNet18(last_layer=last_layer).apply``.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      UnsafeCheckpointError: if a ``.pth`` pickle references a global that a
        state dict does not need (a ``ValueError`` subclass).
      ValueError: if the tensors do not match ResNet-18 (every offending key
        is listed) or the file is not a weight archive.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"teacher weights not found at {path!r}; pass --teacher_weights=PATH "
            "or set TSJAX_TEACHER_WEIGHTS to a folder of .npy files, an .npz, a "
            ".safetensors or a torch.save .pth file."
        )
    return load_state_dict(read_state_dict(path), last_layer)


def variables_sha256(variables: Mapping) -> str:
    """Hash teacher variables (paths, shapes and float32 bytes) to a hex SHA-256."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_flatten_with_path(variables)[0]
    for key_path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        array = np.ascontiguousarray(np.asarray(leaf, np.float32))
        digest.update(jax.tree_util.keystr(key_path).encode())
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
