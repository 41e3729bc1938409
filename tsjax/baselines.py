"""Baseline defect maps that the teacher–student method has to beat.

* ``absolute_difference_map``: the aligned pixel-wise difference, after the
  inspected image's brightness and contrast are matched to the reference's.
* ``feature_distance_map``: the squared distance between the teacher features
  of the aligned reference and of the inspected image, without a student.

Both use the alignment and valid mask of the pipeline and are smoothed with
the pipeline's ``map_sigma`` over valid pixels only.
``absolute_difference_method`` and ``feature_distance_method`` wrap them as
``tsjax.methods.Method``, so that they go through the same segmentation and
metrics as the teacher–student variants.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from tsjax.config import DetectionConfig
from tsjax.methods import Method, PairContext
from tsjax.pipeline import feature_valid
from tsjax.score import gaussian_smooth, upsample_to_image
from tsjax.teacher import LAYER_STRIDES

__all__ = [
    "match_intensity",
    "absolute_difference_map",
    "feature_distance_map",
    "absolute_difference_method",
    "feature_distance_method",
]


def match_intensity(image: np.ndarray, target: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Rescale ``image`` affinely so its mean and standard deviation over ``valid`` equal ``target``'s.

    SEM images of one pattern differ in brightness and contrast, and a plain
    difference would report that change everywhere.

    Args:
      image: ``[H, W]`` float.
      target: ``[H, W]`` float whose statistics ``image`` takes on.
      valid: ``[H, W]`` bool, the pixels the statistics are taken over.

    Returns:
      ``[H, W]`` float32. Where ``image`` is constant over ``valid`` only its
      mean is matched, because no gain can give it a spread.

    Raises:
      ValueError: if the shapes differ or ``valid`` selects no pixel.
    """
    if not image.shape == target.shape == valid.shape:
        raise ValueError(
            f"image {image.shape}, target {target.shape} and valid {valid.shape} must have one shape."
        )
    if not valid.any():
        raise ValueError("valid selects no pixel; intensity statistics need at least one.")
    image_values = image[valid].astype(np.float64)
    target_values = target[valid].astype(np.float64)
    image_std = image_values.std()
    gain = target_values.std() / image_std if image_std > 0 else 1.0
    matched = (image.astype(np.float64) - image_values.mean()) * gain + target_values.mean()
    return matched.astype(np.float32)


def absolute_difference_map(
    aligned_reference: np.ndarray, inspected: np.ndarray, valid: np.ndarray, sigma: float
) -> np.ndarray:
    """Compute the smoothed absolute difference of an aligned pair.

    ``D = G_sigma * |reference - match_intensity(inspected, reference)|``,
    in the reference's intensity units, zero outside ``valid``.

    Args:
      aligned_reference: ``[H, W]`` reference resampled onto the inspected
        grid (``Alignment.aligned_reference``).
      inspected: ``[H, W]`` inspected image.
      valid: ``[H, W]`` bool, the pixels to score.
      sigma: Gaussian sigma in px of the smoothing; 0 disables it.

    Returns:
      ``[H, W]`` float32, >= 0.

    Raises:
      ValueError: as ``match_intensity``.
    """
    matched = match_intensity(inspected, aligned_reference, valid)
    difference = np.abs(aligned_reference.astype(np.float32) - matched)
    # Normalised smoothing over valid pixels, as the pipeline smooths its
    # map, so that the unscored band along the overlap edge stays out.
    smoothed = np.asarray(gaussian_smooth(difference[None], float(sigma), valid[None]))[0]
    return np.where(valid, smoothed, 0.0).astype(np.float32)


def feature_distance_map(
    ref_features: Mapping[str, jax.Array],
    insp_features: Mapping[str, jax.Array],
    valid: np.ndarray,
    layers: Sequence[str],
    weights: Sequence[float],
    sigma: float,
) -> np.ndarray:
    """Compute the teacher-feature distance map of an aligned pair, without a student.

    Per layer, ``d = sum_c (F_ref - F_insp)^2`` is resampled to image pixels
    and divided by its mean over ``valid``, so that every layer contributes
    on one scale. The layers' weighted mean is smoothed and set to zero
    outside ``valid``.

    Args:
      ref_features: Per layer, ``[1, h, w, C]`` features of the aligned
        reference.
      insp_features: Per layer, ``[1, h, w, C]`` features of the inspected
        image.
      valid: ``[H, W]`` bool, the pixels to score.
      layers: Layers to combine.
      weights: One weight per layer, summing to 1.
      sigma: Gaussian sigma in px of the smoothing; 0 disables it.

    Returns:
      ``[H, W]`` float32, >= 0; its mean over ``valid`` is 1 before smoothing
      unless the features are identical there.

    Raises:
      ValueError: if ``weights`` does not give one value per layer.
    """
    if len(weights) != len(layers):
        raise ValueError(f"got {len(weights)} weight(s) for {len(layers)} layer(s) {tuple(layers)}; give one per layer.")
    combined = np.zeros(valid.shape, np.float32)
    for layer, weight in zip(layers, weights):
        distance = ((ref_features[layer] - insp_features[layer]) ** 2).sum(-1)
        # Features outside the valid mask stay out of the interpolation and
        # the smoothing, as in the pipeline's map.
        layer_valid = feature_valid(valid, layer, distance.shape[1:3])[None]
        upsampled = np.asarray(upsample_to_image(distance, LAYER_STRIDES[layer], valid.shape, valid=layer_valid))[0]
        mean = float(upsampled[valid].mean())
        if mean > 0:
            upsampled = upsampled / mean
        combined += weight * upsampled
    smoothed = np.asarray(gaussian_smooth(combined[None], float(sigma), valid[None]))[0]
    return np.where(valid, smoothed, 0.0).astype(np.float32)


def absolute_difference_method(config: DetectionConfig = DetectionConfig(), name: str = "abs_diff") -> Method:
    """Wrap ``absolute_difference_map`` as a ``Method``.

    It scores the valid mask of ``config`` (the overlap eroded by
    ``config.margin``) and smooths with ``config.map_sigma``, so it scores the
    same pixels as the teacher–student method with that config.
    """

    def compute(reference: np.ndarray, inspected: np.ndarray, context: PairContext) -> tuple[np.ndarray, np.ndarray]:
        del reference  # The context contains the aligned reference.
        valid = context.valid(config.margin)
        defect_map = absolute_difference_map(context.alignment.aligned_reference, inspected, valid, config.map_sigma)
        return defect_map, valid

    description = f"absolute difference of the aligned reference and the intensity-matched inspected image, Gaussian σ={config.map_sigma:g} px"
    return Method(name=name, compute=compute, config=config, description=description)


def feature_distance_method(config: DetectionConfig = DetectionConfig(), name: str = "feature_l2") -> Method:
    """Wrap ``feature_distance_map`` as a ``Method`` on ``config.layers``.

    It uses the teacher features of ``config.denoise_sigma``, the valid mask
    of ``config.margin``, the layer weights and ``config.map_sigma``.
    """

    def compute(reference: np.ndarray, inspected: np.ndarray, context: PairContext) -> tuple[np.ndarray, np.ndarray]:
        del reference, inspected  # The context contains the features of both.
        valid = context.valid(config.margin)
        features = context.features(config.denoise_sigma)
        defect_map = feature_distance_map(
            {layer: features[layer][0] for layer in config.layers},
            {layer: features[layer][1] for layer in config.layers},
            valid,
            config.layers,
            config.weights,
            config.map_sigma,
        )
        return defect_map, valid

    description = f"teacher features ‖F_ref − F_insp‖², layers {'+'.join(config.layers)}, no student"
    return Method(name=name, compute=compute, config=config, description=description)
