"""Large images by overlapping tiles, with the statistics of the whole image.

``detect_tiled`` gives ``tsjax.pipeline.detect``'s result on images too large
for one pass of the teacher, with a working set set by the tile size. The
image is cut into interiors of ``tile_size`` px, each read with a *halo* of
context on every side, and the tiles go through the batch stages of
``tsjax.batch`` a batch at a time.

Two quantities of ``detect`` are global, so tiles cannot be scored on their
own: the ridge student is fitted on all valid pixels of the pair, and the
``'global'`` normalisation divides by the mean feature energy over all
valid pixels. The run therefore takes two passes over the tiles:

1. Teacher features of each tile, then the ridge moments (``tsjax.moments``)
   of the valid features whose centre pixel lies in the tile's interior, so
   that every feature counts exactly once. The moments of all tiles merge
   into those of the whole image, which give the ridge state and the
   normalisation statistics.
2. Teacher features again (or the cached ones, when they fit in
   ``feature_cache_bytes``), prediction and scoring with the global state
   and statistics, and the interior of each tile's map written into the
   image's map.

The halo makes a tile's interior exact. A tile's teacher zero-pads at the
tile's edge, where the image continues, so a feature differs from the
untiled one if its receptive field crosses that edge. A pixel's score
depends on the input within ``r_L + s_L * (k // 2 + 1)`` px for layer ``L``
(receptive-field radius ``r_L``, stride ``s_L``, patch side ``k``: the patch
reaches ``k // 2`` features, and the bilinear upsampling one more), and the
smoothed map on ``round(3 * map_sigma)`` px more; denoising adds
``int(4 * denoise_sigma + 0.5)`` px. ``tile_halo`` returns the largest of
these sums over the selected layers, rounded up to a multiple of
``tsjax.canvas.CANVAS_MULTIPLE``: 80 px for the default layers.
At the image's own border the tile canvas marks the image's extent
(``tsjax.canvas``), so border tiles need no special case.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import numpy as np
from jax.typing import ArrayLike

from tsjax import io, sharding
from tsjax.align import Alignment, align_pair, overlap_mask, shift_image
from tsjax.batch import ScoreStatistics, moments_stage, score_stage, teacher_stage
from tsjax.canvas import CANVAS_MULTIPLE, make_extents
from tsjax.config import DetectionConfig
from tsjax.moments import RidgeMoments, is_rectangle, merge_moments, solve_moments
from tsjax.pipeline import Detection, _warn_if_underdetermined, match_reference_shape, segment, valid_mask
from tsjax.students import RidgeStudent, Student, is_transductive, make_student
from tsjax.teacher import LAYER_STRIDES, receptive_field

__all__ = [
    "DEFAULT_TILE_SIZE",
    "DEFAULT_TILE_BATCH",
    "DEFAULT_ALIGN_WINDOW",
    "DEFAULT_FEATURE_CACHE_BYTES",
    "tile_halo",
    "TilePlan",
    "plan_tiles",
    "tile_feature_bytes",
    "align_large",
    "detect_tiled",
]

# Interior side of a tile in px. With the default 80 px halo a 512 px tile
# computes 1.7 times its interior; larger tiles waste less but need more
# memory per tile.
DEFAULT_TILE_SIZE = 512

# Tiles per compiled call.
DEFAULT_TILE_BATCH = 4

# The shift is estimated on a centred window of at most this side, since a
# global translation shows in any large part of the pair and the estimate's
# FFTs grow with the window. Images that fit are aligned whole, as detect does.
DEFAULT_ALIGN_WINDOW = 2048

# Features of all tiles are kept between the passes when they take at most
# this many bytes. Above it the teacher runs again in the second pass.
DEFAULT_FEATURE_CACHE_BYTES = 1 << 30

# Feature channels of ResNet-18 per teacher layer (torchvision's widths).
_LAYER_CHANNELS = {"stem": 64, "layer1": 64, "layer2": 128, "layer3": 256}


def tile_halo(config: DetectionConfig) -> int:
    """Return the halo in px that makes a tile's interior equal the untiled result.

    Args:
      config: Pipeline settings (layers, patch size, smoothing sigmas).

    Returns:
      ``max_L (r_L + s_L * (k // 2 + 1)) + round(3 * map_sigma)
      + int(4 * denoise_sigma + 0.5)``, rounded up to a multiple of
      ``CANVAS_MULTIPLE`` (see the module docstring).
    """
    reach = max(
        receptive_field(layer) // 2 + LAYER_STRIDES[layer] * (config.patch_size // 2 + 1) for layer in config.layers
    )
    if config.map_sigma > 0:
        reach += max(1, int(round(3 * config.map_sigma)))
    if config.denoise_sigma > 0:
        reach += int(4.0 * config.denoise_sigma + 0.5)
    return int(math.ceil(reach / CANVAS_MULTIPLE) * CANVAS_MULTIPLE)


class TilePlan(NamedTuple):
    """Layout of the tiles that cover an image.

    Attributes:
      image_shape: ``(H, W)`` of the image.
      tile_shape: ``(th, tw)``, the interior of every tile.
      halo: Context on each side of an interior, in px.
      grid: ``(rows, cols)`` of tiles.
    """

    image_shape: tuple[int, int]
    tile_shape: tuple[int, int]
    halo: int
    grid: tuple[int, int]

    @property
    def canvas_shape(self) -> tuple[int, int]:
        """Shape of one tile with its halo, ``(th + 2 halo, tw + 2 halo)``."""
        return (self.tile_shape[0] + 2 * self.halo, self.tile_shape[1] + 2 * self.halo)

    @property
    def count(self) -> int:
        """Number of tiles."""
        return self.grid[0] * self.grid[1]

    def interior(self, index: int) -> tuple[int, int, int, int]:
        """Return tile ``index``'s interior ``(top, left, bottom, right)`` in image px, clipped to the image."""
        row, col = divmod(index, self.grid[1])
        top, left = row * self.tile_shape[0], col * self.tile_shape[1]
        return (
            top,
            left,
            min(top + self.tile_shape[0], self.image_shape[0]),
            min(left + self.tile_shape[1], self.image_shape[1]),
        )

    def origin(self, index: int) -> tuple[int, int]:
        """Return the image coordinates of tile ``index``'s canvas pixel ``(0, 0)``."""
        top, left, _, _ = self.interior(index)
        return (top - self.halo, left - self.halo)


def plan_tiles(
    image_shape: tuple[int, int], config: DetectionConfig, tile_size: int = DEFAULT_TILE_SIZE, halo: int | None = None
) -> TilePlan:
    """Cut an image into tiles of ``tile_size`` px with a halo.

    A tile side is ``tile_size``, or the image side rounded up to a multiple
    of ``CANVAS_MULTIPLE`` when that is smaller, so small images get one
    tile no larger than they need.

    Args:
      image_shape: ``(H, W)`` in px.
      config: Pipeline settings, for the default halo.
      tile_size: Interior side in px, a multiple of ``CANVAS_MULTIPLE``.
      halo: Context per side in px, a multiple of ``CANVAS_MULTIPLE``;
        ``tile_halo(config)`` by default. A smaller halo than that changes
        the result near tile seams.

    Returns:
      A ``TilePlan``.

    Raises:
      ValueError: if ``tile_size`` or ``halo`` is not a positive multiple
        (for the halo, a non-negative multiple) of ``CANVAS_MULTIPLE``.
    """
    if tile_size <= 0 or tile_size % CANVAS_MULTIPLE:
        raise ValueError(f"tile_size={tile_size} must be a positive multiple of {CANVAS_MULTIPLE} px.")
    halo = tile_halo(config) if halo is None else halo
    if halo < 0 or halo % CANVAS_MULTIPLE:
        raise ValueError(f"halo={halo} must be a non-negative multiple of {CANVAS_MULTIPLE} px.")
    tile_shape = tuple(min(tile_size, int(math.ceil(side / CANVAS_MULTIPLE) * CANVAS_MULTIPLE)) for side in image_shape)
    grid = tuple(int(math.ceil(side / tile)) for side, tile in zip(image_shape, tile_shape))
    return TilePlan(tuple(int(side) for side in image_shape), tile_shape, int(halo), grid)


def tile_feature_bytes(plan: TilePlan, config: DetectionConfig) -> int:
    """Return the bytes of the teacher features of one tile (both images, selected layers, float32)."""
    total = 0
    for layer in config.layers:
        stride = LAYER_STRIDES[layer]
        height, width = (side // stride for side in plan.canvas_shape)
        total += 2 * height * width * _LAYER_CHANNELS[layer] * 4
    return total


def _window(image: np.ndarray, origin: tuple[int, int], shape: tuple[int, int]) -> np.ndarray:
    # The canvas of one tile: image pixels where the window overlaps the
    # image, zeros elsewhere (outside the extent, so never read).
    window = np.zeros(shape, image.dtype)
    top, left = origin
    rows = slice(max(top, 0), min(top + shape[0], image.shape[0]))
    cols = slice(max(left, 0), min(left + shape[1], image.shape[1]))
    window[rows.start - top : rows.stop - top, cols.start - left : cols.stop - left] = image[rows, cols]
    return window


def align_large(
    reference: np.ndarray, inspected: np.ndarray, margin: int, window: int = DEFAULT_ALIGN_WINDOW
) -> tuple[Alignment, np.ndarray]:
    """Align a large pair, estimating the shift on a centred window.

    Args:
      reference: ``[H, W]`` float32, cropped or padded to the inspected shape.
      inspected: ``[H, W]`` float32.
      margin: Erosion of the valid mask in px.
      window: Side of the centred window the shift is estimated on. An
        image that fits is aligned whole, exactly as ``detect`` aligns it.

    Returns:
      ``(alignment, valid)`` as ``pipeline.align_and_mask`` returns them.

    Raises:
      ImageError: if no valid pixel remains.
    """
    reference, covered = match_reference_shape(reference, inspected.shape)
    height, width = inspected.shape
    top, left = max(0, (height - window) // 2), max(0, (width - window) // 2)
    crop = (slice(top, top + min(window, height)), slice(left, left + min(window, width)))
    estimate = align_pair(reference[crop], inspected[crop])
    if (top, left) == (0, 0) and estimate.aligned_reference.shape == inspected.shape:
        alignment = estimate
    else:
        overlap = overlap_mask(inspected.shape, estimate.shift)
        aligned = np.where(overlap, shift_image(reference, estimate.shift), inspected).astype(np.float32)
        alignment = Alignment(
            shift=estimate.shift,
            aligned_reference=aligned,
            valid=overlap,
            estimator=estimate.estimator,
            correlation=estimate.correlation,
            sharpness=estimate.sharpness,
            candidates=estimate.candidates,
        )
    return alignment, valid_mask(alignment.valid, covered, alignment.shift, margin)


class _TileBatch(NamedTuple):
    references: np.ndarray
    inspected: np.ndarray
    valid: np.ndarray
    fit_mask: np.ndarray
    extents: jax.Array


def _cut_tiles(
    plan: TilePlan, indices: Sequence[int], aligned: np.ndarray, inspected: np.ndarray, valid: np.ndarray
) -> _TileBatch:
    shape = plan.canvas_shape
    references, targets, valids, fit_masks, origins = [], [], [], [], []
    for index in indices:
        origin = plan.origin(index)
        top, left, bottom, right = plan.interior(index)
        tile_valid = _window(valid, origin, shape)
        interior = np.zeros(shape, bool)
        interior[top - origin[0] : bottom - origin[0], left - origin[1] : right - origin[1]] = True
        references.append(_window(aligned, origin, shape))
        targets.append(_window(inspected, origin, shape))
        valids.append(tile_valid)
        fit_masks.append(tile_valid & interior)
        origins.append(origin)
    sizes = np.tile(np.asarray(plan.image_shape), (len(indices), 1))
    return _TileBatch(
        np.stack(references), np.stack(targets), np.stack(valids), np.stack(fit_masks), make_extents(origins, sizes)
    )


def _batches(plan: TilePlan, tile_batch: int) -> list[list[int]]:
    # Each batch is filled to tile_batch with copies of its last tile, whose
    # moments then count nothing and whose maps are not written.
    batches = []
    for start in range(0, plan.count, tile_batch):
        indices = list(range(start, min(start + tile_batch, plan.count)))
        batches.append(indices + [indices[-1]] * (tile_batch - len(indices)))
    return batches


def detect_tiled(
    reference: ArrayLike,
    inspected: ArrayLike,
    variables: Mapping,
    config: DetectionConfig = DetectionConfig(),
    *,
    student: Student | None = None,
    states: Mapping[str, Any] | None = None,
    tile_size: int = DEFAULT_TILE_SIZE,
    halo: int | None = None,
    tile_batch: int = DEFAULT_TILE_BATCH,
    align_window: int = DEFAULT_ALIGN_WINDOW,
    feature_cache_bytes: int = DEFAULT_FEATURE_CACHE_BYTES,
    mesh: jax.sharding.Mesh | None = None,
) -> Detection:
    """Run ``tsjax.pipeline.detect`` on a large pair, tile by tile.

    Args:
      reference: ``[H', W']`` float32 in [0, 1], the defect-free image.
      inspected: ``[H, W]`` float32 in [0, 1].
      variables: Teacher variables.
      config: Pipeline settings, as for ``detect``.
      student: The ridge student (the default, built from ``config``); other
        students need ``states``.
      states: Student states per layer fitted elsewhere; by default the
        ridge student is fitted on the whole pair from the tiles' moments.
      tile_size: Interior side of a tile in px.
      halo: Context per tile side in px; ``tile_halo(config)`` by default.
      tile_batch: Tiles per compiled call, at most the number of tiles
        (then rounded up to a multiple of the mesh's device count).
      align_window: Side of the centred window the shift is estimated on.
      feature_cache_bytes: Keep all tiles' features between the two passes
        when they take at most this many bytes (0 never keeps them).
      mesh: Shard each batch of tiles over this mesh's devices.

    Returns:
      A ``Detection`` of the whole pair. ``timings_s`` gives each stage's
      total over all tiles (``teacher`` both passes).

    Raises:
      ImageError: for invalid images, incompatible sizes or no valid pixel.
      TypeError: if ``states`` is missing and the student is not a
        ``RidgeStudent``, whose fit alone decomposes over tiles.
      ValueError: for invalid tile settings or states of a transductive student.
    """
    if student is None:
        student = make_student("ridge", patch_size=config.patch_size, alpha=config.alpha)
    if states is None and not isinstance(student, RidgeStudent):
        raise TypeError(
            f"detect_tiled fits only the ridge student across tiles; got {type(student).__name__}. "
            "Fit its states on a smaller pair (pipeline.fit_students) and pass states=..."
        )
    if states is not None and is_transductive(student):
        raise ValueError(f"student {student.name!r} only predicts the pair it was fitted on; it cannot run on tiles.")
    if tile_batch < 1:
        raise ValueError(f"tile_batch must be >= 1; got {tile_batch}.")
    inspected = io.validate_image(np.asarray(inspected), "inspected").astype(np.float32)
    reference = io.validate_image(np.asarray(reference), "reference").astype(np.float32)
    plan = plan_tiles(inspected.shape, config, tile_size, halo)
    devices = 1 if mesh is None else mesh.size
    # A batch gets no more filling copies than the mesh needs.
    tile_batch = int(math.ceil(min(tile_batch, plan.count) / devices) * devices)
    if mesh is not None:
        variables = sharding.replicate(variables, mesh)
    timings = collections.defaultdict(float)

    start = time.perf_counter()
    alignment, valid = align_large(reference, inspected, config.margin, align_window)
    timings["align"] = time.perf_counter() - start

    batches = _batches(plan, tile_batch)
    cache_features = plan.count * tile_feature_bytes(plan, config) <= feature_cache_bytes
    teacher_options = {
        "layers": config.layers,
        "last_layer": config.deepest_layer,
        "denoise_sigma": float(config.denoise_sigma),
    }

    def features_of(tiles: _TileBatch) -> dict[str, jax.Array]:
        start = time.perf_counter()
        arrays = (tiles.references, tiles.inspected, tiles.extents)
        if mesh is not None:
            arrays = sharding.shard_pairs(arrays, mesh)
        features = teacher_stage(variables, *arrays, **teacher_options, mesh=mesh)
        jax.block_until_ready(features)
        timings["teacher"] += time.perf_counter() - start
        return features

    # Every tile's interior starts halo px into its canvas (edge tiles' are
    # shorter, but their fit masks are False beyond the image). The moments
    # skip the rest of the canvas when the halo contains the patches'
    # neighbours.
    interior = (plan.halo, plan.halo, plan.halo + plan.tile_shape[0], plan.halo + plan.tile_shape[1])
    reach = max(LAYER_STRIDES[layer] for layer in config.layers) * (config.patch_size // 2)
    if plan.halo < reach:
        interior = None

    # Pass 1: features and the moments of every tile's interior.
    cached = []
    merged: dict[str, RidgeMoments] = {}
    patch_size = student.patch_size if states is None else None
    for indices in batches:
        tiles = _cut_tiles(plan, indices, alignment.aligned_reference, inspected, valid)
        features = features_of(tiles)
        if cache_features:
            cached.append(features)
        start = time.perf_counter()
        fit_mask = tiles.fit_mask
        # Filling copies must not count twice.
        fit_mask[len(set(indices)) :] = False
        if mesh is not None:
            fit_mask = sharding.shard_pairs(fit_mask, mesh)
        moments = moments_stage(
            features,
            fit_mask,
            layers=config.layers,
            patch_size=patch_size,
            window=interior,
            rectangles=is_rectangle(tiles.fit_mask),
            mesh=mesh,
        )
        moments = jax.device_get(moments)
        for layer in config.layers:
            for tile in range(len(indices)):
                tile_moments = RidgeMoments(*(value[tile] for value in moments[layer]))
                merged[layer] = tile_moments if layer not in merged else merge_moments(merged[layer], tile_moments)
        timings["student_fit"] += time.perf_counter() - start

    start = time.perf_counter()
    if states is None:
        states = {}
        for layer in config.layers:
            channels = merged[layer].target_mean.shape[0]
            _warn_if_underdetermined(layer, int(merged[layer].count), config.patch_size, channels)
            states[layer] = solve_moments(merged[layer], student.alpha)
    statistics = {
        layer: ScoreStatistics(
            channel_mean=np.asarray(merged[layer].target_mean, np.float32),
            mean_energy=np.float32(merged[layer].target_energy / max(float(merged[layer].count), 1.0)),
        )
        for layer in config.layers
    }
    jax.block_until_ready(states)
    timings["student_fit"] += time.perf_counter() - start

    # Pass 2: score every tile with the global state and statistics.
    defect_map = np.zeros(inspected.shape, np.float32)
    layer_maps = {layer: np.zeros(inspected.shape, np.float32) for layer in config.layers}
    for number, indices in enumerate(batches):
        tiles = _cut_tiles(plan, indices, alignment.aligned_reference, inspected, valid)
        features = cached[number] if cache_features else features_of(tiles)
        start = time.perf_counter()
        tile_valid, extents = tiles.valid, tiles.extents
        if mesh is not None:
            tile_valid, extents = sharding.shard_pairs((tile_valid, extents), mesh)
        maps, tile_layer_maps = score_stage(
            features,
            states,
            tile_valid,
            extents,
            statistics,
            layers=config.layers,
            student=student,
            normalization=config.normalization,
            weights=config.weights,
            sigma=float(config.map_sigma),
            shared_states=True,
            mesh=mesh,
        )
        maps, tile_layer_maps = jax.device_get((maps, tile_layer_maps))
        for tile, index in enumerate(dict.fromkeys(indices)):
            top, left, bottom, right = plan.interior(index)
            origin = plan.origin(index)
            rows = slice(top - origin[0], bottom - origin[0])
            cols = slice(left - origin[1], right - origin[1])
            defect_map[top:bottom, left:right] = maps[tile, rows, cols]
            for layer in config.layers:
                layer_maps[layer][top:bottom, left:right] = tile_layer_maps[layer][tile, rows, cols]
        timings["score"] += time.perf_counter() - start
    cached.clear()

    start = time.perf_counter()
    threshold, mask, blobs = segment(defect_map, valid, config)
    timings["postprocess"] = time.perf_counter() - start
    return Detection(
        defect_map=defect_map,
        layer_maps=layer_maps,
        mask=mask,
        blobs=blobs,
        valid=valid,
        alignment=alignment,
        threshold=threshold,
        timings_s=dict(timings),
    )
