"""Batches of pairs through one compiled call per stage, padded to size buckets.

``detect_batch`` runs ``tsjax.pipeline.detect`` on many pairs at once. Each
JAX stage (alignment, teacher, student fit, scoring) is one jitted call over
a batch of ``B`` pairs that vmaps the per-pair computation. On CPU it does
so in steps of ``_CPU_PAIRS_PER_STEP`` pairs (the teacher and the ridge
moments in smaller steps), and the alignment and the ridge solves loop over
single pairs. Pairs are padded to a *bucket* shape, the image size rounded up
to a multiple of ``bucket_multiple`` px, and each stage knows every pair's
true size (``tsjax.canvas``), so a stream of pairs whose sizes share a
bucket reuses the compiled stages. The NumPy steps of ``detect`` (the valid
mask and the thresholding) run per pair on the host.

Results equal ``detect``'s: the padded pixels never enter a fit, a mean or a
map (see ``tsjax.canvas`` for why the teacher, the patches, the upsampling
and the smoothing match at the image border). The JAX aligner runs in
float32 and can, on a near tie, keep another of its four estimators than
``tsjax.align.align_pair``; ``aligner='numpy'`` uses ``align_pair`` itself.

Every trace of a stage, which is a compilation, is counted per stage in
``trace_counts()``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import math
import os
import time
import warnings
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec
from jax.typing import ArrayLike

from tsjax import io, sharding
from tsjax.align import Alignment, overlap_mask
from tsjax.align_jax import ESTIMATOR_NAMES, CanvasAlignment, align_on_canvas
from tsjax.canvas import (
    CANVAS_MULTIPLE,
    canvas_features,
    combine_on_canvas,
    gaussian_filter_reflect,
    make_extents,
    replicate_edges,
)
from tsjax.config import DetectionConfig
from tsjax.moments import RidgeMoments, is_rectangle, patch_moments, solve_moments, target_moments
from tsjax.pipeline import Detection, _warn_if_underdetermined, align_and_mask, match_reference_shape, segment, valid_mask
from tsjax.score import defect_probability
from tsjax.students import RidgeStudent, Student, make_student
from tsjax.teacher import LAYER_STRIDES, gray_features

__all__ = [
    "DEFAULT_BUCKET_MULTIPLE",
    "ALIGNERS",
    "STAGES",
    "bucket_shape",
    "trace_counts",
    "PairBatch",
    "prepare_batch",
    "align_stage",
    "teacher_stage",
    "moments_stage",
    "fit_stage",
    "ScoreStatistics",
    "score_stage",
    "detect_batch",
]

# Bucket sides are multiples of this many px. 32 keeps the padding of the
# usual SEM sizes (480, 512, 1024) at zero and of any size below 7 % per side
# from 480 px on, while a stream of sizes within 32 px shares one compilation.
DEFAULT_BUCKET_MULTIPLE = 32

ALIGNERS = ("jax", "numpy")

# Stage names in the order they run, as used by ``trace_counts`` and timings.
STAGES = ("align", "teacher", "student_fit", "score", "postprocess")

# Sub-pixel step of the JAX aligner, align_pair's default.
_UPSAMPLE_FACTOR = 20

_TRACES: collections.Counter = collections.Counter()

# On CPU the per-pair stages vmap over at most this many pairs at a time
# and loop over such steps. Larger steps outgrow the caches: the teacher's
# time per 480 px pair doubled at 16 pairs.
_CPU_PAIRS_PER_STEP = 4

# The ridge moments take steps of 2 pairs. In two interleaved runs at
# B = 16, the whole fit took 78 to 80, 72 to 74, 77 to 79 and 80 to 83 ms
# per 480 px pair with steps of 1, 2, 4 and 8 pairs.
_CPU_MOMENTS_PAIRS_PER_STEP = 2

# The teacher's step is smaller: its intermediates (each layer1 map of a
# 480 px image is 3.7 MB) are allocated afresh in every call, and fewer
# pairs per step touch fewer new pages. At B = 16 it took 103 ms per pair
# with steps of one pair and 108 ms with steps of four.
_CPU_TEACHER_PAIRS_PER_STEP = 1

# Partition specs of per-pair arrays and of values every device needs whole.
_PAIRS = PartitionSpec(sharding.PAIR_AXIS)
_WHOLE = PartitionSpec()


def trace_counts() -> dict[str, int]:
    """Return how many times each jitted batch stage has been traced (compiled).

    A stage is traced once per new combination of input shapes and static
    arguments, so a count that grows while the bucket stays the same means
    a recompilation.
    """
    return dict(_TRACES)


def bucket_shape(shape: tuple[int, int], multiple: int = DEFAULT_BUCKET_MULTIPLE) -> tuple[int, int]:
    """Round an image shape up to its bucket.

    Args:
      shape: ``(H, W)`` in px.
      multiple: Bucket sides are multiples of this; it must itself be a
        multiple of ``tsjax.canvas.CANVAS_MULTIPLE``.

    Returns:
      ``(Hb, Wb)``, the smallest multiples of ``multiple`` that hold the image.

    Raises:
      ValueError: if ``multiple`` is not a positive multiple of ``CANVAS_MULTIPLE``.
    """
    if multiple <= 0 or multiple % CANVAS_MULTIPLE:
        raise ValueError(
            f"bucket multiple {multiple} must be a positive multiple of {CANVAS_MULTIPLE} px, "
            "the largest teacher stride."
        )
    return tuple(int(math.ceil(side / multiple) * multiple) for side in shape)


class PairBatch(NamedTuple):
    """Pairs of one bucket, padded on the host and ready for the JAX stages.

    Attributes:
      references: ``[B, Hb, Wb]`` float32, each reference cropped or padded
        to its inspected image's shape, at the canvas's top-left corner.
      inspected: ``[B, Hb, Wb]`` float32, the inspected images, same layout.
      sizes: ``[B, 2]`` int32, each pair's ``(H, W)``.
      covered: ``B`` ``[H, W]`` bool masks of reference pixels that came
        from the original reference (see ``pipeline.match_reference_shape``).
    """

    references: np.ndarray
    inspected: np.ndarray
    sizes: np.ndarray
    covered: list


def prepare_batch(
    references: Sequence[ArrayLike], inspected: Sequence[ArrayLike], bucket: tuple[int, int]
) -> PairBatch:
    """Validate pairs and place them on canvases of the bucket's shape.

    Args:
      references: ``B`` ``[H', W']`` float images in [0, 1].
      inspected: ``B`` ``[H, W]`` float images in [0, 1] that fit ``bucket``.
      bucket: ``(Hb, Wb)`` canvas shape.

    Returns:
      A ``PairBatch``.

    Raises:
      ImageError: for an invalid image or incompatible pair sizes.
      ValueError: if the counts differ or an image exceeds the bucket.
    """
    if len(references) != len(inspected):
        raise ValueError(
            f"got {len(references)} reference(s) and {len(inspected)} inspected image(s); give one reference per pair."
        )
    count = len(inspected)
    canvas_refs = np.zeros((count, *bucket), np.float32)
    canvas_insp = np.zeros((count, *bucket), np.float32)
    sizes = np.zeros((count, 2), np.int32)
    covered = []
    for index, (reference, target) in enumerate(zip(references, inspected)):
        reference = io.validate_image(np.asarray(reference), f"reference {index}").astype(np.float32)
        target = io.validate_image(np.asarray(target), f"inspected {index}").astype(np.float32)
        height, width = target.shape
        if height > bucket[0] or width > bucket[1]:
            raise ValueError(f"inspected image {index} is {target.shape} px, larger than the bucket {bucket}.")
        matched, pixels_covered = match_reference_shape(reference, target.shape)
        canvas_refs[index, :height, :width] = matched
        canvas_insp[index, :height, :width] = target
        sizes[index] = (height, width)
        covered.append(pixels_covered)
    return PairBatch(canvas_refs, canvas_insp, sizes, covered)


def _map_pairs(function: Callable, pairs: tuple, pairs_per_step: int = _CPU_PAIRS_PER_STEP) -> Any:
    """Apply ``function`` to every pair: vmapped, on CPU in steps of a few pairs.

    Args:
      function: Takes one pair's slices of ``pairs`` (pytrees whose leading
        axis is the pairs) and returns a pytree of arrays.
      pairs: The batched arguments.
      pairs_per_step: Largest number of pairs vmapped together on CPU.

    Returns:
      The outputs with a leading pairs axis.
    """
    count = jax.tree_util.tree_leaves(pairs)[0].shape[0]
    batched = jax.vmap(function)
    if jax.default_backend() != "cpu":
        return batched(*pairs)
    step = max(size for size in range(1, min(count, pairs_per_step) + 1) if count % size == 0)
    if step == count:
        return batched(*pairs)
    chunks = jax.tree_util.tree_map(lambda value: value.reshape(count // step, step, *value.shape[1:]), pairs)
    outputs = jax.lax.map(lambda chunk: batched(*chunk), chunks)
    return jax.tree_util.tree_map(lambda value: value.reshape(count, *value.shape[2:]), outputs)


@functools.partial(jax.jit, static_argnames=("exact", "mesh"))
def align_stage(
    references: jax.Array, inspected: jax.Array, sizes: jax.Array, *, exact: bool, mesh: Mesh | None = None
) -> CanvasAlignment:
    """Align every pair of a batch with ``tsjax.align_jax.align_on_canvas``.

    The pairs run one after the other inside the compiled call
    (``jax.lax.map``): vmapping would turn each pair's dynamic shifts into
    gathers, which measured about twice as slow on CPU.

    Args:
      references: ``[B, Hb, Wb]`` canvases.
      inspected: ``[B, Hb, Wb]`` canvases.
      sizes: ``[B, 2]`` int32 image sizes.
      exact: True when every size equals the canvas shape (plain FFTs).
      mesh: Split the pairs over this mesh's devices (``tsjax.sharding``).

    Returns:
      A batched ``CanvasAlignment`` (leading axis ``B``).
    """
    _TRACES["align"] += 1

    def align_all(references, inspected, sizes):
        return jax.lax.map(
            lambda pair: align_on_canvas(*pair, exact=exact, upsample_factor=_UPSAMPLE_FACTOR),
            (references, inspected, sizes),
        )

    return sharding.per_device(align_all, mesh, (_PAIRS,) * 3)(references, inspected, sizes)


@functools.partial(jax.jit, static_argnames=("layers", "last_layer", "denoise_sigma", "filled", "mesh"))
def teacher_stage(
    variables: Mapping,
    aligned: jax.Array,
    inspected: jax.Array,
    extents: jax.Array,
    *,
    layers: tuple[str, ...],
    last_layer: str,
    denoise_sigma: float,
    filled: bool = False,
    mesh: Mesh | None = None,
) -> dict[str, jax.Array]:
    """Extract teacher features of both images of every pair.

    Args:
      variables: Teacher variables.
      aligned: ``[B, Hc, Wc]`` aligned references on canvases.
      inspected: ``[B, Hc, Wc]`` inspected images, same layout.
      extents: ``[B, 4]`` int32 extents of the pairs on their canvases
        (``tsjax.canvas``).
      layers: Layers to return.
      last_layer: Deepest layer to compute.
      denoise_sigma: Gaussian sigma applied to both images first; 0 disables.
      filled: Every image fills its canvas (each extent is the whole
        canvas). The teacher's own zero padding is then the image's, and the
        masks on every layer of ``tsjax.canvas.canvas_features`` (about a
        tenth of the stage's time on CPU) are skipped.
      mesh: Split the pairs over this mesh's devices (``tsjax.sharding``).

    Returns:
      Per layer, ``[B, 2, h, w, C]`` features (reference first), with the
      image's edge features repeated outside each image.
    """
    _TRACES["teacher"] += 1

    def one_pair(variables: Mapping, reference: jax.Array, target: jax.Array, extent: jax.Array) -> dict[str, jax.Array]:
        extents = jnp.stack([extent, extent])
        images = gaussian_filter_reflect(jnp.stack([reference, target]), extents, denoise_sigma)
        with_stem = "stem" in layers
        if filled:
            features = gray_features(variables, images, last_layer, with_stem=with_stem)
            return {layer: features[layer] for layer in layers}
        features = canvas_features(variables, images, extents, last_layer, with_stem)
        return {layer: replicate_edges(features[layer], extents, LAYER_STRIDES[layer]) for layer in layers}

    def all_pairs(variables, aligned, inspected, extents):
        return _map_pairs(
            lambda *pair: one_pair(variables, *pair), (aligned, inspected, extents), _CPU_TEACHER_PAIRS_PER_STEP
        )

    return sharding.per_device(all_pairs, mesh, (_WHOLE, _PAIRS, _PAIRS, _PAIRS))(
        variables, aligned, inspected, extents
    )


def _layer_weight(valid: jax.Array, layer: str) -> jax.Array:
    # pipeline.feature_valid on a canvas, whose sides divide by the stride.
    stride = LAYER_STRIDES[layer]
    return valid[::stride, ::stride].astype(jnp.float32)


def _pair_moments(
    pair_features: Mapping[str, jax.Array],
    pair_valid: jax.Array,
    layers: tuple[str, ...],
    patch_size: int | None,
    window: tuple[int, int, int, int] | None = None,
    rectangles: bool = False,
) -> dict[str, RidgeMoments]:
    moments = {}
    for layer in layers:
        stride = LAYER_STRIDES[layer]
        reference, target = pair_features[layer][0], pair_features[layer][1]
        weight = _layer_weight(pair_valid, layer)
        margin = 0
        if window is not None:
            # Only features in the window can have weight, so the products
            # run over them alone, with the patch's reach of neighbours.
            top, left, bottom, right = (side // stride for side in window)
            margin = 0 if patch_size is None else patch_size // 2
            reference = reference[top - margin : bottom + margin, left - margin : right + margin]
            target = target[top:bottom, left:right]
            weight = weight[top:bottom, left:right]
        if patch_size is not None:
            moments[layer] = patch_moments(
                reference, target, weight, patch_size, reference_margin=margin, rectangle=rectangles
            )
        else:
            moments[layer] = target_moments(target, weight)
    return moments


@functools.partial(jax.jit, static_argnames=("layers", "patch_size", "window", "rectangles", "mesh"))
def moments_stage(
    features: Mapping[str, jax.Array],
    valid: jax.Array,
    *,
    layers: tuple[str, ...],
    patch_size: int | None,
    window: tuple[int, int, int, int] | None = None,
    rectangles: bool = False,
    mesh: Mesh | None = None,
) -> dict[str, RidgeMoments]:
    """Compute the ridge moments of every pair (or tile) and layer.

    Args:
      features: ``teacher_stage``'s output.
      valid: ``[B, Hc, Wc]`` bool, the pixels whose features count.
      layers: Layers to compute.
      patch_size: The ridge student's patch side, or ``None`` for the
        moments of the inspected features alone (``tsjax.moments.target_moments``).
      window: ``(top, left, bottom, right)`` canvas px, multiples of the
        deepest stride, outside which ``valid`` is False (a tile's interior);
        the moments then skip the features outside. The window must leave
        ``patch_size // 2`` features of the canvas on each side.
      rectangles: Every ``valid`` mask is one rectangle or empty
        (``tsjax.moments.is_rectangle``), which allows the faster scatter.
      mesh: Split the pairs over this mesh's devices (``tsjax.sharding``).

    Returns:
      Per layer, ``RidgeMoments`` with a leading axis ``B``.
    """
    _TRACES["moments"] += 1

    def all_pairs(features, valid):
        return _map_pairs(
            lambda pair, mask: _pair_moments(pair, mask, layers, patch_size, window, rectangles), (features, valid)
        )

    return sharding.per_device(all_pairs, mesh, (_PAIRS, _PAIRS))(features, valid)


@functools.partial(jax.jit, static_argnames=("layers", "student", "rectangles", "mesh"))
def fit_stage(
    features: Mapping[str, jax.Array],
    valid: jax.Array,
    key: jax.Array,
    *,
    layers: tuple[str, ...],
    student: Student,
    rectangles: bool = False,
    mesh: Mesh | None = None,
) -> dict[str, Any]:
    """Fit one student state per pair and layer on the pair's valid pixels.

    The ridge student is fitted from its moments (``tsjax.moments``). They
    give ``RidgeStudent.fit``'s solution without a centred copy of the patch
    matrix. Other students call their own ``fit``.

    Args:
      features: ``teacher_stage``'s output.
      valid: ``[B, Hc, Wc]`` bool, the valid pixels of each pair.
      key: PRNG key; layer ``i`` uses ``fold_in(key, i)``, as in ``detect``.
      layers: Layers to fit.
      student: The student.
      rectangles: Every ``valid`` mask is one rectangle or empty
        (``tsjax.moments.is_rectangle``), which allows the ridge student's
        faster scatter.
      mesh: Split the pairs over this mesh's devices (``tsjax.sharding``).

    Returns:
      Per layer, the student state with a leading axis ``B``.
    """
    _TRACES["student_fit"] += 1

    def solve(pair: dict[str, RidgeMoments]) -> dict[str, Any]:
        return {layer: solve_moments(pair[layer], student.alpha) for layer in layers}

    def one_pair(pair_features: Mapping[str, jax.Array], pair_valid: jax.Array, key: jax.Array) -> dict[str, Any]:
        states = {}
        for index, layer in enumerate(layers):
            reference, target = pair_features[layer][0], pair_features[layer][1]
            weight = _layer_weight(pair_valid, layer)
            states[layer] = student.fit(reference[None], target[None], weight[None], jax.random.fold_in(key, index))
        return states

    def all_pairs(features, valid, key):
        if isinstance(student, RidgeStudent):
            moments = _map_pairs(
                lambda pair, mask: _pair_moments(pair, mask, layers, student.patch_size, rectangles=rectangles),
                (features, valid),
                _CPU_MOMENTS_PAIRS_PER_STEP,
            )
            # The Cholesky solves run one pair after the other: vmapped, the
            # batched factorisation measured several times slower on CPU.
            return jax.lax.map(solve, moments)
        # One pair per step: with two pairs vmapped, the local ridge fits of
        # two layers in one program deadlocked XLA's CPU runtime (JAX 0.10.2,
        # every thread waiting, no CPU used).
        return _map_pairs(lambda pair, mask: one_pair(pair, mask, key), (features, valid), 1)

    return sharding.per_device(all_pairs, mesh, (_PAIRS, _PAIRS, _WHOLE))(features, valid, key)


class ScoreStatistics(NamedTuple):
    """Per-layer statistics of the inspected features over a whole image.

    Attributes:
      channel_mean: ``[C]`` mean feature over the valid pixels.
      mean_energy: ``[]`` mean of ``sum_c (F_c - channel_mean_c)^2`` over
        the valid pixels, the ``'global'`` normalisation's denominator.
    """

    channel_mean: jax.Array
    mean_energy: jax.Array


def _predict(student: Student, state: Any, reference: jax.Array) -> jax.Array:
    # RidgeStudent.predict multiplies the [h * w, k * k * C] patch matrix by
    # the weights. The same sum is a k x k convolution of the edge-padded
    # map, which XLA runs about three times faster on CPU for 64 channels.
    if not isinstance(student, RidgeStudent):
        return student.predict(state, reference)
    radius = student.patch_size // 2
    padded = jnp.pad(reference, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
    kernel = state.weights.reshape(student.patch_size, student.patch_size, reference.shape[-1], -1)
    outputs = jax.lax.conv_general_dilated(
        padded, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return outputs + state.bias


def _score_with_statistics(
    target: jax.Array, prediction: jax.Array, statistics: ScoreStatistics, normalization: str
) -> jax.Array:
    # tsjax.score.defect_probability with the valid-pixel statistics given
    # rather than computed from this canvas, which shows part of the image
    # when it is a tile.
    residual = ((target - prediction) ** 2).sum(-1)
    if normalization == "pixel":
        denominator = ((target - statistics.channel_mean) ** 2).sum(-1)
    else:
        denominator = statistics.mean_energy
    return jnp.clip(residual / jnp.maximum(denominator, jnp.finfo(jnp.float32).tiny), 0.0, 1.0)


@functools.partial(
    jax.jit, static_argnames=("layers", "student", "normalization", "weights", "sigma", "shared_states", "mesh")
)
def score_stage(
    features: Mapping[str, jax.Array],
    states: Mapping[str, Any],
    valid: jax.Array,
    extents: jax.Array,
    statistics: Mapping[str, ScoreStatistics] | None = None,
    *,
    layers: tuple[str, ...],
    student: Student,
    normalization: str,
    weights: tuple[float, ...],
    sigma: float,
    shared_states: bool,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Predict, score, upsample, combine and smooth every pair's maps.

    Args:
      features: ``teacher_stage``'s output.
      states: Per layer, student states with a leading axis ``B``, or one
        state for all pairs when ``shared_states``.
      valid: ``[B, Hc, Wc]`` bool.
      extents: ``[B, 4]`` int32 extents.
      statistics: Per layer, ``ScoreStatistics`` shared by all canvases (the
        tiles of one image); by default each canvas's own valid pixels give
        them, as in ``detect``.
      layers: Layers to score.
      student: The student.
      normalization: ``'global'`` or ``'pixel'`` (see ``tsjax.score``).
      weights: Per-layer weights summing to 1.
      sigma: Gaussian sigma of the combined map in px.
      shared_states: Whether ``states`` has no batch axis.
      mesh: Split the pairs over this mesh's devices (``tsjax.sharding``).

    Returns:
      ``(defect_maps, layer_maps)``: ``[B, Hc, Wc]`` maps, zero outside
      ``valid``, and per layer the ``[B, Hc, Wc]`` upsampled map.
    """
    _TRACES["score"] += 1

    def predict_all(features, states):
        references = {layer: features[layer][:, 0] for layer in layers}
        if shared_states:
            # One kernel for all canvases: a plain batched convolution.
            return _map_pairs(
                lambda pair: {layer: _predict(student, states[layer], pair[layer][None])[0] for layer in layers},
                (references,),
            )
        # A different kernel per pair would make vmap a grouped convolution,
        # which measured five times slower per pair on CPU, so the pairs
        # take turns.
        return jax.lax.map(
            lambda pair: {layer: _predict(student, pair[1][layer], pair[0][layer][None])[0] for layer in layers},
            (references, states),
        )

    def score_pair(pair_features, predictions, pair_valid, extent, statistics):
        coarse, feature_valid = {}, {}
        for layer in layers:
            target, prediction = pair_features[layer][1][None], predictions[layer][None]
            feature_valid[layer] = _layer_weight(pair_valid, layer)[None]
            if statistics is None:
                coarse[layer] = defect_probability(target, prediction, feature_valid[layer], normalization)
            else:
                coarse[layer] = _score_with_statistics(target, prediction, statistics[layer], normalization)
        combined, layer_maps = combine_on_canvas(
            coarse, feature_valid, pair_valid[None], extent[None], layers, weights, sigma
        )
        return combined[0], {layer: value[0] for layer, value in layer_maps.items()}

    def all_pairs(features, states, valid, extents, statistics):
        predictions = predict_all(features, states)
        return _map_pairs(
            lambda *pair: score_pair(*pair, statistics), (features, predictions, valid, extents)
        )

    state_spec = _WHOLE if shared_states else _PAIRS
    in_specs = (_PAIRS, state_spec, _PAIRS, _PAIRS, _WHOLE)
    return sharding.per_device(all_pairs, mesh, in_specs)(features, states, valid, extents, statistics)


def _grid_shift(shift: np.ndarray, upsample_factor: int) -> tuple[float, float]:
    # The estimate lies on a 1 / upsample_factor px grid; snapping it in
    # float64 gives the value that align_pair reports.
    return tuple(float(np.round(float(value) * upsample_factor) / upsample_factor) for value in shift)


def _align_with_jax(batch: PairBatch, margin: int, mesh: Mesh | None) -> tuple[jax.Array, list[dict], list[np.ndarray]]:
    # Returns the aligned references on the device, per pair the fields of
    # its Alignment except the aligned reference, and the valid masks.
    exact = bool(np.all(batch.sizes == np.asarray(batch.references.shape[1:])))
    arrays = (batch.references, batch.inspected, batch.sizes)
    if mesh is not None:
        arrays = sharding.shard_pairs(arrays, mesh)
    result = align_stage(*arrays, exact=exact, mesh=mesh)
    host = jax.device_get(result._replace(aligned_reference=None))
    records = []
    for index, (height, width) in enumerate(batch.sizes):
        shape = (int(height), int(width))
        shift = _grid_shift(host.shift[index], _UPSAMPLE_FACTOR)
        estimator = ESTIMATOR_NAMES[int(host.estimator[index])]
        if host.correlation[index] < 0.5:
            warnings.warn(
                f"pair {index}: alignment is uncertain: the best estimator ({estimator}) leaves a "
                f"correlation of {host.correlation[index]:.3f} between the aligned images; check that "
                "the images show the same pattern.",
                stacklevel=4,
            )
        candidates = {
            name: {
                "shift": list(_grid_shift(host.candidate_shifts[index, number], _UPSAMPLE_FACTOR)),
                "correlation": float(host.candidate_correlations[index, number]),
                "sharpness": float(host.candidate_sharpness[index, number]),
            }
            for number, name in enumerate(ESTIMATOR_NAMES)
        }
        overlap = overlap_mask(shape, shift)
        records.append(
            {
                "shift": shift,
                "valid": overlap,
                "estimator": estimator,
                "correlation": float(host.correlation[index]),
                "sharpness": float(host.sharpness[index]),
                "candidates": candidates,
            }
        )
    valids = _map_on_host(
        lambda index: valid_mask(records[index]["valid"], batch.covered[index], records[index]["shift"], margin),
        range(len(records)),
    )
    return result.aligned_reference, records, valids


def _map_on_host(function: Callable, items: Iterable) -> list:
    # One thread per item, up to one per core. The SciPy filters behind the
    # valid masks and the thresholding release the GIL, so the threads use
    # every core. On 2 cores and 480 px pairs, the valid masks took 1.9 ms
    # per pair instead of 4.2, and the thresholding 10 ms instead of 19.
    items = list(items)
    if len(items) < 2:
        return [function(item) for item in items]
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(items), os.cpu_count() or 1)) as pool:
        return list(pool.map(function, items))


def _align_with_numpy(batch: PairBatch, margin: int) -> tuple[jax.Array, list[dict], list[np.ndarray]]:
    aligned = np.array(batch.inspected)
    records, valids = [], []
    for index, (height, width) in enumerate(batch.sizes):
        reference = batch.references[index, :height, :width]
        alignment, valid = align_and_mask(reference, batch.inspected[index, :height, :width], margin)
        aligned[index, :height, :width] = alignment.aligned_reference
        record = {field.name: getattr(alignment, field.name) for field in dataclasses.fields(alignment)}
        del record["aligned_reference"]
        records.append(record)
        valids.append(valid)
    return jnp.asarray(aligned), records, valids


def _pad_to_canvas(masks: Sequence[np.ndarray], canvas_shape: tuple[int, int]) -> np.ndarray:
    padded = np.zeros((len(masks), *canvas_shape), bool)
    for index, mask in enumerate(masks):
        padded[index, : mask.shape[0], : mask.shape[1]] = mask
    return padded


def _run_bucket(
    batch: PairBatch,
    variables: Mapping,
    config: DetectionConfig,
    student: Student,
    states: Mapping[str, Any] | None,
    aligner: str,
    mesh: Mesh | None,
    pair_numbers: Sequence[int],
) -> list[Detection]:
    # ``pair_numbers``: the positions in detect_batch's lists of the batch's
    # real pairs, which come first; the rest of the batch is filler.
    real_count = len(pair_numbers)
    timings = {}

    start = time.perf_counter()
    if aligner == "jax":
        aligned, alignment_records, valids = _align_with_jax(batch, config.margin, mesh)
    else:
        aligned, alignment_records, valids = _align_with_numpy(batch, config.margin)
    valid = _pad_to_canvas(valids, batch.inspected.shape[1:])
    # Alignment overlaps minus their margins are rectangles, which allows the
    # faster ridge scatter; the check runs on the host copy, before sharding.
    rectangles = is_rectangle(valid)
    inspected = batch.inspected
    extents = make_extents(np.zeros_like(batch.sizes), batch.sizes)
    if mesh is not None:
        aligned, inspected, valid, extents = sharding.shard_pairs((aligned, inspected, valid, extents), mesh)
        variables = sharding.replicate(variables, mesh)
    jax.block_until_ready(aligned)
    timings["align"] = time.perf_counter() - start

    start = time.perf_counter()
    features = teacher_stage(
        variables,
        aligned,
        inspected,
        extents,
        layers=config.layers,
        last_layer=config.deepest_layer,
        denoise_sigma=float(config.denoise_sigma),
        filled=bool(np.all(batch.sizes == np.asarray(batch.inspected.shape[1:]))),
        mesh=mesh,
    )
    jax.block_until_ready(features)
    timings["teacher"] = time.perf_counter() - start

    start = time.perf_counter()
    shared_states = states is not None
    if states is None:
        for layer in config.layers:
            stride = LAYER_STRIDES[layer]
            channels = features[layer].shape[-1]
            for number, pair_valid in zip(pair_numbers, valids):
                samples = int(pair_valid[::stride, ::stride].sum())
                _warn_if_underdetermined(layer, samples, config.patch_size, channels, pair=f"pair {number}: ")
        key = jax.random.key(config.seed)
        states = fit_stage(
            features, valid, key, layers=config.layers, student=student, rectangles=rectangles, mesh=mesh
        )
    jax.block_until_ready(states)
    timings["student_fit"] = time.perf_counter() - start

    start = time.perf_counter()
    defect_maps, layer_maps = score_stage(
        features,
        states,
        valid,
        extents,
        layers=config.layers,
        student=student,
        normalization=config.normalization,
        weights=config.weights,
        sigma=float(config.map_sigma),
        shared_states=shared_states,
        mesh=mesh,
    )
    defect_maps, layer_maps, aligned = jax.device_get((defect_maps, layer_maps, aligned))
    timings["score"] = time.perf_counter() - start

    start = time.perf_counter()
    cropped = []
    for index in range(real_count):
        height, width = (int(side) for side in batch.sizes[index])
        cropped.append(np.ascontiguousarray(defect_maps[index, :height, :width], np.float32))
    segmented = _map_on_host(lambda pair: segment(*pair, config), zip(cropped, valids[:real_count]))
    detections = []
    for index, (defect_map, (threshold, mask, blobs)) in enumerate(zip(cropped, segmented)):
        height, width = defect_map.shape
        pair_valid = valids[index]
        detections.append(
            Detection(
                defect_map=defect_map,
                layer_maps={layer: np.array(layer_maps[layer][index, :height, :width]) for layer in config.layers},
                mask=mask,
                blobs=blobs,
                valid=pair_valid,
                alignment=Alignment(
                    aligned_reference=np.array(aligned[index, :height, :width]), **alignment_records[index]
                ),
                threshold=threshold,
                timings_s={},
            )
        )
    timings["postprocess"] = time.perf_counter() - start
    # Each pair reports its share of the batch's time per stage.
    share = {stage: seconds / real_count for stage, seconds in timings.items()}
    return [dataclasses.replace(detection, timings_s=dict(share)) for detection in detections]


def detect_batch(
    references: Sequence[ArrayLike],
    inspected: Sequence[ArrayLike],
    variables: Mapping,
    config: DetectionConfig = DetectionConfig(),
    *,
    student: Student | None = None,
    states: Mapping[str, Any] | None = None,
    batch_size: int | None = None,
    bucket_multiple: int = DEFAULT_BUCKET_MULTIPLE,
    aligner: str = "jax",
    mesh: jax.sharding.Mesh | None = None,
) -> list[Detection]:
    """Run ``tsjax.pipeline.detect`` on many pairs, a batch per compiled call.

    Pairs are grouped by bucket (``bucket_shape``) and cut into batches of
    ``batch_size``. A short last batch is filled with copies of its last
    pair, so that every call of a bucket has the same shapes.

    Args:
      references: ``N`` ``[H', W']`` float32 reference images in [0, 1].
      inspected: ``N`` ``[H, W]`` float32 inspected images in [0, 1].
      variables: Teacher variables.
      config: Pipeline settings, as for ``detect``.
      student: The student; by default the ridge student of ``config``.
      states: Student states per layer fitted elsewhere and used for every
        pair; by default one state is fitted per pair, as ``detect`` does.
      batch_size: Pairs per compiled call; by default all pairs of a bucket
        (rounded up to a multiple of the mesh's device count).
      bucket_multiple: Bucket sides are multiples of this many px.
      aligner: ``'jax'`` (``tsjax.align_jax``, in the compiled batch) or
        ``'numpy'`` (``tsjax.align.align_pair`` per pair on the host).
      mesh: Shard each batch's pairs over this mesh's devices
        (``tsjax.sharding.pair_mesh``); ``None`` runs on the default device.

    Returns:
      One ``Detection`` per pair, in input order. ``timings_s`` holds each
      stage's batch time divided by the number of real pairs in the batch.

    Raises:
      ImageError: for an invalid image, incompatible sizes or no valid pixel.
      ValueError: for an unknown ``aligner``, mismatched counts or a
        ``batch_size`` below 1.
    """
    if aligner not in ALIGNERS:
        raise ValueError(f"aligner={aligner!r} is unknown; use one of {ALIGNERS}.")
    if len(references) != len(inspected):
        raise ValueError(
            f"got {len(references)} reference(s) and {len(inspected)} inspected image(s); give one reference per pair."
        )
    if batch_size is not None and (
        isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1
    ):
        raise ValueError(f"batch_size must be an integer >= 1 or None; got {batch_size!r}.")
    if student is None:
        student = make_student("ridge", patch_size=config.patch_size, alpha=config.alpha)
    devices = 1 if mesh is None else mesh.size

    groups: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
    for index, image in enumerate(inspected):
        groups[bucket_shape(np.shape(image), bucket_multiple)].append(index)

    results: list[Detection | None] = [None] * len(inspected)
    for bucket, indices in groups.items():
        size = batch_size or len(indices)
        size = int(math.ceil(size / devices) * devices)
        for start in range(0, len(indices), size):
            chunk = indices[start : start + size]
            filled = chunk + [chunk[-1]] * (size - len(chunk))
            batch = prepare_batch([references[i] for i in filled], [inspected[i] for i in filled], bucket)
            detections = _run_bucket(batch, variables, config, student, states, aligner, mesh, chunk)
            for index, detection in zip(chunk, detections):
                results[index] = detection
    return results
