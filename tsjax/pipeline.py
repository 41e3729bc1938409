"""The detection pipeline: align, extract features, predict, score, threshold.

``detect`` runs the whole method on one pair. Each stage is a function of
its own so that batch and tiled runners can reuse them, and the JAX stages
are jitted at their boundary with static shapes, so that a stream of pairs of
one size compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import warnings
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from tsjax import io
from tsjax.align import Alignment, align_pair
from tsjax.config import DetectionConfig
from tsjax.postprocess import Threshold, choose_threshold, clean_mask, find_blobs
from tsjax.score import defect_probability, gaussian_smooth, upsample_to_image
from tsjax.students import Student, is_transductive, make_student
from tsjax.teacher import LAYER_STRIDES, gray_features

__all__ = [
    "Detection",
    "match_reference_shape",
    "align_and_mask",
    "valid_mask",
    "segment",
    "extract_features",
    "feature_valid",
    "fit_students",
    "layer_defect_maps",
    "combine_maps",
    "augment_brightness_contrast",
    "detect",
]


@dataclasses.dataclass(frozen=True)
class Detection:
    """Everything ``detect`` found on one pair.

    Attributes:
      defect_map: ``[H, W]`` float32 in [0, 1], zero outside ``valid``.
      layer_maps: Per layer, ``[H, W]`` float32 ``D`` before combination and
        smoothing.
      mask: ``[H, W]`` bool, the cleaned defect mask.
      blobs: One dict per connected defect (see ``postprocess.find_blobs``).
      valid: ``[H, W]`` bool, the eroded overlap of the aligned pair.
      alignment: The alignment of the reference onto the inspected image.
      threshold: The threshold applied to ``defect_map``.
      timings_s: Wall-clock seconds per stage.
    """

    defect_map: np.ndarray
    layer_maps: dict[str, np.ndarray]
    mask: np.ndarray
    blobs: list[dict]
    valid: np.ndarray
    alignment: Alignment
    threshold: Threshold
    timings_s: dict[str, float]


def match_reference_shape(reference: np.ndarray, inspected_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Crop or pad the reference to the inspected image's shape.

    Padding replicates the edge and is marked invalid, so that a slightly
    larger or smaller reference still aligns.

    Returns:
      ``(reference, covered)``: the ``[H, W]`` reference and the bool mask of
      pixels that came from the original reference.

    Raises:
      ImageError: if the sizes differ too much for any overlap.
    """
    io.check_pair_sizes(reference.shape, inspected_shape)
    height, width = inspected_shape
    cropped = reference[:height, :width]
    pad = ((0, height - cropped.shape[0]), (0, width - cropped.shape[1]))
    covered = np.pad(np.ones(cropped.shape, bool), pad, constant_values=False)
    return np.pad(cropped, pad, mode="edge"), covered


def align_and_mask(reference: np.ndarray, inspected: np.ndarray, margin: int) -> tuple[Alignment, np.ndarray]:
    """Align the reference onto the inspected image and build the eroded overlap mask.

    Args:
      reference: ``[H', W']`` float32, cropped or padded to the inspected shape.
      inspected: ``[H, W]`` float32.
      margin: Erosion of the overlap mask, in px.

    Returns:
      ``(alignment, valid)`` with ``valid`` the ``[H, W]`` bool mask.

    Raises:
      ImageError: if the sizes are incompatible or no valid pixel remains.
    """
    reference, covered = match_reference_shape(np.asarray(reference, np.float32), inspected.shape)
    alignment = align_pair(reference, inspected)
    return alignment, valid_mask(alignment.valid, covered, alignment.shift, margin)


def valid_mask(overlap: np.ndarray, covered: np.ndarray, shift: tuple[float, float], margin: int) -> np.ndarray:
    """Combine the overlap of an aligned pair with the reference's coverage and erode it.

    Args:
      overlap: ``[H, W]`` bool, pixels whose shifted source lies in the image
        (``Alignment.valid``).
      covered: ``[H, W]`` bool, reference pixels that came from the original
        reference (see ``match_reference_shape``), before the shift.
      shift: ``(dy, dx)`` applied to the reference, in px.
      margin: Erosion of the mask, in px.

    Returns:
      The ``[H, W]`` bool mask of pixels that may be fitted and scored.

    Raises:
      ImageError: if no valid pixel remains.
    """
    shifted_cover = ndimage.shift(covered.astype(np.float32), shift, order=0, cval=0.0) > 0.5
    valid = overlap & shifted_cover
    if margin > 0:
        valid = ndimage.binary_erosion(valid, iterations=margin, border_value=1)
    if not valid.any():
        raise io.ImageError(
            f"no valid pixels remain after alignment (shift {shift}) and a "
            f"{margin} px margin; the pair overlaps too little. Reduce --valid_margin "
            "or check that both images show the same field of view."
        )
    return valid


def segment(defect_map: np.ndarray, valid: np.ndarray, config: DetectionConfig) -> tuple[Threshold, np.ndarray, list[dict]]:
    """Threshold a ``[H, W]`` defect map, clean the mask and list its blobs.

    Returns:
      ``(threshold, mask, blobs)``.
    """
    threshold = choose_threshold(defect_map, valid, z_floor=config.z_floor, min_score=config.min_score)
    mask = (defect_map > threshold.value) & valid
    mask = clean_mask(
        mask, opening_radius=config.opening_radius, closing_radius=config.closing_radius, min_area=config.min_area
    )
    return threshold, mask, find_blobs(mask, defect_map)


@functools.partial(jax.jit, static_argnames=("last_layer", "with_stem"))
def extract_features(
    variables: Mapping, images: jax.Array, last_layer: str, with_stem: bool = True
) -> dict[str, jax.Array]:
    """Run the teacher on ``[B, H, W]`` grayscale images in [0, 1], compiled.

    The arguments and the result are ``tsjax.teacher.gray_features``'s.
    """
    return gray_features(variables, jnp.asarray(images, jnp.float32), last_layer, with_stem=with_stem)


def feature_valid(valid: np.ndarray, layer: str, feature_shape: tuple[int, int]) -> np.ndarray:
    """Sample an image-resolution mask at the centres of a layer's features.

    Args:
      valid: ``[..., H, W]`` bool.
      layer: Teacher layer name.
      feature_shape: ``(h, w)`` of that layer's maps.

    Returns:
      ``[..., h, w]`` bool: feature ``i`` is valid when input pixel
      ``stride * i`` is.
    """
    stride = LAYER_STRIDES[layer]
    height, width = feature_shape
    return valid[..., ::stride, ::stride][..., :height, :width]


def augment_brightness_contrast(
    images: np.ndarray, key: jax.Array, *, brightness: float = 0.1, contrast: float = 0.2
) -> np.ndarray:
    """Apply one random brightness and contrast change per image.

    ``out = clip((x - 0.5) * c + 0.5 + b, 0, 1)`` with ``c`` uniform in
    ``[1 - contrast, 1 + contrast]`` and ``b`` uniform in
    ``[-brightness, brightness]``.

    Args:
      images: ``[B, H, W]`` float in [0, 1].
      key: PRNG key.

    Returns:
      ``[B, H, W]`` float32.
    """
    contrast_key, brightness_key = jax.random.split(key)
    count = images.shape[0]
    gain = jax.random.uniform(contrast_key, (count, 1, 1), minval=1 - contrast, maxval=1 + contrast)
    offset = jax.random.uniform(brightness_key, (count, 1, 1), minval=-brightness, maxval=brightness)
    return np.asarray(jnp.clip((images - 0.5) * gain + 0.5 + offset, 0.0, 1.0), np.float32)


@functools.partial(jax.jit, static_argnames=("student",))
def _fit(student: Student, ref: jax.Array, insp: jax.Array, valid: jax.Array, key: jax.Array) -> Any:
    return student.fit(ref, insp, valid, key)


@functools.partial(jax.jit, static_argnames=("student", "normalization"))
def _predict_and_score(
    student: Student, state: Any, ref: jax.Array, insp: jax.Array, valid: jax.Array, normalization: str
) -> jax.Array:
    return defect_probability(insp, student.predict(state, ref), valid, normalization)


def fit_students(
    student: Student,
    variables: Mapping,
    references: Sequence[np.ndarray],
    inspected: Sequence[np.ndarray],
    valids: Sequence[np.ndarray],
    layers: Sequence[str],
    key: jax.Array,
) -> dict[str, Any]:
    """Fit one student state per layer on aligned pairs of one shape.

    Args:
      student: The student to fit.
      variables: Teacher variables.
      references: ``B`` aligned reference images, ``[H, W]`` each.
      inspected: ``B`` inspected images, ``[H, W]`` each.
      valids: ``B`` bool masks, ``[H, W]`` each; only these pixels are fitted.
      layers: Teacher layers to fit a state for.
      key: PRNG key; layer ``i`` uses ``fold_in(key, i)``.

    Returns:
      Student state per layer name.

    Raises:
      ValueError: if the student is transductive (it can only predict the
        pair it is fitted on, so ``detect`` must fit it).
    """
    if is_transductive(student):
        raise ValueError(
            f"student {student.name!r} only predicts the pair it was fitted on, so it cannot be "
            "fitted on training pairs; drop the training pairs and let detect fit it on each pair."
        )
    last_layer = max(layers, key=list(LAYER_STRIDES).index)
    ref_features = extract_features(variables, jnp.asarray(np.stack(references)), last_layer)
    insp_features = extract_features(variables, jnp.asarray(np.stack(inspected)), last_layer)
    valid = np.stack(valids)
    states = {}
    for index, layer in enumerate(layers):
        layer_valid = feature_valid(valid, layer, ref_features[layer].shape[1:3])
        states[layer] = _fit(
            student, ref_features[layer], insp_features[layer], jnp.asarray(layer_valid), jax.random.fold_in(key, index)
        )
    return states


def layer_defect_maps(
    student: Student,
    states: Mapping[str, Any],
    ref_features: Mapping[str, jax.Array],
    insp_features: Mapping[str, jax.Array],
    valid: np.ndarray,
    layers: Sequence[str],
    normalization: str,
    image_shape: tuple[int, int],
) -> dict[str, jax.Array]:
    """Score every layer and resample its map to image resolution.

    Returns:
      ``[B, H, W]`` defect probability per layer.
    """
    maps = {}
    for layer in layers:
        layer_valid = jnp.asarray(feature_valid(valid, layer, ref_features[layer].shape[1:3]))
        coarse = _predict_and_score(
            student, states[layer], ref_features[layer], insp_features[layer], layer_valid, normalization
        )
        maps[layer] = upsample_to_image(coarse, LAYER_STRIDES[layer], image_shape, valid=layer_valid)
    return maps


@functools.partial(jax.jit, static_argnames=("weights", "sigma"))
def combine_maps(
    maps: tuple[jax.Array, ...], weights: tuple[float, ...], sigma: float, valid: jax.Array | None = None
) -> jax.Array:
    """Weighted mean of ``[B, H, W]`` layer maps, then Gaussian smoothing of ``sigma`` px.

    With a ``[B, H, W]`` ``valid`` mask the smoothing is normalised by the
    mask, so the unscored band along the overlap's edge never raises or
    lowers the map inside it, and the map is 0 outside the mask.
    """
    combined = sum(weight * layer_map for weight, layer_map in zip(weights, maps))
    return jnp.clip(gaussian_smooth(combined, sigma, valid), 0.0, 1.0)


def _warn_if_underdetermined(layer: str, samples: int, patch_size: int, channels: int, pair: str = "") -> None:
    # ``pair`` names the pair among many, as a prefix of the message.
    inputs = patch_size * patch_size * channels
    if samples < inputs:
        warnings.warn(
            f"{pair}{layer}: only {samples} valid feature pixels for {inputs} student inputs "
            f"({patch_size}x{patch_size} patch of {channels} channels), so the student can fit "
            "defects away. Use a larger image, a smaller --patch_size or shallower --layers.",
            stacklevel=3,
        )


def detect(
    reference: np.ndarray,
    inspected: np.ndarray,
    variables: Mapping,
    config: DetectionConfig = DetectionConfig(),
    *,
    student: Student | None = None,
    states: Mapping[str, Any] | None = None,
) -> Detection:
    """Find where the inspected image breaks the reference's pattern.

    Args:
      reference: ``[H', W']`` float32 in [0, 1], the defect-free image.
      inspected: ``[H, W]`` float32 in [0, 1]. The reference is cropped or
        padded to this shape, then aligned onto it.
      variables: Teacher variables (``tsjax.teacher.load_pretrained``).
      config: Pipeline settings.
      student: The student; by default the ridge student built from
        ``config.patch_size`` and ``config.alpha``.
      states: Pre-fitted student states per layer (for example fitted on a
        separate defect-free pair). By default the student is fitted on the
        valid pixels of this pair.

    Returns:
      A ``Detection``.

    Raises:
      ImageError: for invalid images or incompatible sizes.
      ValueError: if ``states`` are given for a transductive student.
    """
    if states is not None and student is not None and is_transductive(student):
        raise ValueError(
            f"student {student.name!r} only predicts the pair it was fitted on; pass states=None "
            "so that detect fits it on this pair."
        )
    timings = {}
    start = time.perf_counter()
    io.validate_image(np.asarray(reference), "reference")
    io.validate_image(np.asarray(inspected), "inspected")
    alignment, valid = align_and_mask(reference, inspected, config.margin)
    timings["align"] = time.perf_counter() - start

    start = time.perf_counter()
    pair = np.stack([alignment.aligned_reference, inspected]).astype(np.float32)
    if config.denoise_sigma > 0:
        pair = np.stack([ndimage.gaussian_filter(image, config.denoise_sigma) for image in pair])
    features = extract_features(variables, jnp.asarray(pair), config.deepest_layer, "stem" in config.layers)
    ref_features = {layer: features[layer][:1] for layer in config.layers}
    insp_features = {layer: features[layer][1:] for layer in config.layers}
    jax.block_until_ready(ref_features)
    timings["teacher"] = time.perf_counter() - start

    start = time.perf_counter()
    if student is None:
        student = make_student("ridge", patch_size=config.patch_size, alpha=config.alpha)
    if states is None:
        key = jax.random.key(config.seed)
        states = {}
        for index, layer in enumerate(config.layers):
            layer_valid = feature_valid(valid, layer, ref_features[layer].shape[1:3])[None]
            _warn_if_underdetermined(layer, int(layer_valid.sum()), config.patch_size, ref_features[layer].shape[-1])
            states[layer] = _fit(
                student, ref_features[layer], insp_features[layer], jnp.asarray(layer_valid), jax.random.fold_in(key, index)
            )
    jax.block_until_ready(states)
    timings["student_fit"] = time.perf_counter() - start

    start = time.perf_counter()
    maps = layer_defect_maps(
        student, states, ref_features, insp_features, valid[None], config.layers, config.normalization, inspected.shape
    )
    combined = combine_maps(
        tuple(maps[layer] for layer in config.layers), config.weights, float(config.map_sigma), jnp.asarray(valid[None])
    )
    defect_map = np.where(valid, np.asarray(combined[0]), 0.0).astype(np.float32)
    timings["score"] = time.perf_counter() - start

    start = time.perf_counter()
    threshold, mask, blobs = segment(defect_map, valid, config)
    timings["postprocess"] = time.perf_counter() - start

    return Detection(
        defect_map=defect_map,
        layer_maps={layer: np.asarray(maps[layer][0]) for layer in config.layers},
        mask=mask,
        blobs=blobs,
        valid=valid,
        alignment=alignment,
        threshold=threshold,
        timings_s=timings,
    )
