"""A plain NumPy/SciPy implementation of ``tsjax.pipeline.detect``, the benchmark's baseline.

Each stage is written the straightforward way with the usual tools, not
tuned: the teacher convolves by im2col and one BLAS matrix product per
convolution (float32), the ridge student forms its patch matrix and solves
the normal equations with ``scipy.linalg.cho_solve``, and the maps are
resampled and smoothed with ``scipy.ndimage``. Alignment and thresholding
are the project's own NumPy/SciPy stages (``tsjax.align.align_pair``,
``tsjax.pipeline.valid_mask`` and ``segment``), so both pipelines spend the
same time there and differ only where JAX runs.
"""

from __future__ import annotations

import time
from typing import Mapping

import numpy as np
import scipy.linalg
from numpy.lib.stride_tricks import sliding_window_view
from scipy import ndimage

from tsjax.align import align_pair
from tsjax.config import DetectionConfig
from tsjax.pipeline import match_reference_shape, segment, valid_mask
from tsjax.teacher import BN_EPSILON, IMAGENET_MEAN, IMAGENET_STD, LAYER_STRIDES, LAYERS

__all__ = ["ReferenceResult", "teacher_features", "detect_numpy"]


def _conv(inputs: np.ndarray, kernel: np.ndarray, bias: np.ndarray, stride: int) -> np.ndarray:
    # inputs [H, W, C]; kernel [kh, kw, C, O] (Flax HWIO), symmetric zero padding.
    size = kernel.shape[0]
    pad = (size - 1) // 2
    padded = np.pad(inputs, ((pad, pad), (pad, pad), (0, 0)))
    windows = sliding_window_view(padded, (size, size), axis=(0, 1))[::stride, ::stride]
    # windows [h, w, C, kh, kw] -> im2col rows ordered (kh, kw, C) like the kernel.
    columns = windows.transpose(0, 1, 3, 4, 2).reshape(windows.shape[0] * windows.shape[1], -1)
    outputs = columns @ kernel.reshape(-1, kernel.shape[-1]) + bias
    return outputs.reshape(windows.shape[0], windows.shape[1], -1)


def _batch_norm(inputs: np.ndarray, stats: Mapping, params: Mapping) -> np.ndarray:
    scale = params["scale"] / np.sqrt(stats["var"] + BN_EPSILON)
    return (inputs - stats["mean"]) * scale + params["bias"]


def _max_pool(inputs: np.ndarray) -> np.ndarray:
    padded = np.pad(inputs, ((1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    return sliding_window_view(padded, (3, 3), axis=(0, 1))[::2, ::2].max(axis=(3, 4))


def _block(inputs: np.ndarray, params: Mapping, stats: Mapping, stride: int) -> np.ndarray:
    def conv_bn(values, name, conv_stride, bn_name):
        conv = params[name]
        values = _conv(values, conv["kernel"], conv["bias"], conv_stride)
        return _batch_norm(values, stats[bn_name], params[bn_name])

    hidden = np.maximum(conv_bn(inputs, "conv1", stride, "bn1"), 0.0)
    hidden = conv_bn(hidden, "conv2", 1, "bn2")
    shortcut = inputs
    if "downsample_conv" in params:
        shortcut = conv_bn(inputs, "downsample_conv", stride, "downsample_bn")
    return np.maximum(hidden + shortcut, 0.0)


def teacher_features(variables: Mapping, image: np.ndarray, last_layer: str) -> dict[str, np.ndarray]:
    """Compute ResNet-18 features of one ``[H, W]`` image in [0, 1], ``{layer: [h, w, C]}``."""
    params = _to_numpy(variables["params"])
    stats = _to_numpy(variables["batch_stats"])
    rgb = (image[..., None].astype(np.float32) - np.float32(IMAGENET_MEAN)) / np.float32(IMAGENET_STD)
    stem = np.maximum(
        _batch_norm(_conv(rgb, params["conv1"]["kernel"], params["conv1"]["bias"], 2), stats["bn1"], params["bn1"]), 0.0
    )
    features = {"stem": stem}
    values = _max_pool(stem)
    for stage, stride in (("layer1", 1), ("layer2", 2), ("layer3", 2)):
        if LAYERS.index(stage) > LAYERS.index(last_layer):
            break
        values = _block(values, params[f"{stage}_0"], stats[f"{stage}_0"], stride)
        values = _block(values, params[f"{stage}_1"], stats[f"{stage}_1"], 1)
        features[stage] = values
    return features


def _to_numpy(tree: Mapping) -> dict:
    return {key: _to_numpy(value) if isinstance(value, Mapping) else np.asarray(value, np.float32) for key, value in tree.items()}


def _patches(features: np.ndarray, size: int) -> np.ndarray:
    radius = size // 2
    padded = np.pad(features, ((radius, radius), (radius, radius), (0, 0)), mode="edge")
    height, width = features.shape[:2]
    shifted = [padded[i : i + height, j : j + width] for i in range(size) for j in range(size)]
    return np.concatenate(shifted, axis=-1)


def _ridge(reference: np.ndarray, inspected: np.ndarray, weight: np.ndarray, size: int, alpha: float) -> np.ndarray:
    # Fit on the valid pixels, then predict every pixel: [h, w, C].
    inputs = _patches(reference, size).reshape(-1, size * size * reference.shape[-1])
    targets = inspected.reshape(-1, inspected.shape[-1])
    weight = weight.reshape(-1).astype(np.float32)
    total = max(float(weight.sum()), 1.0)
    input_mean = weight @ inputs / total
    target_mean = weight @ targets / total
    centred = inputs - input_mean
    scatter = (centred * weight[:, None]).T @ centred
    cross = (centred * weight[:, None]).T @ (targets - target_mean)
    dim = scatter.shape[0]
    mean_variance = np.trace(scatter) / dim
    penalty = max(alpha * mean_variance, 1e-6 * mean_variance + 1e-12)
    factor = scipy.linalg.cho_factor(scatter + penalty * np.eye(dim, dtype=np.float32))
    weights = scipy.linalg.cho_solve(factor, cross)
    prediction = inputs @ weights + (target_mean - input_mean @ weights)
    return prediction.reshape(inspected.shape)


def _score(inspected: np.ndarray, prediction: np.ndarray, weight: np.ndarray, normalization: str) -> np.ndarray:
    count = max(float(weight.sum()), 1.0)
    mean = (inspected * weight[..., None]).sum(axis=(0, 1)) / count
    residual = ((inspected - prediction) ** 2).sum(-1)
    total = ((inspected - mean) ** 2).sum(-1)
    tiny = np.finfo(np.float32).tiny
    if normalization == "pixel":
        return np.clip(residual / np.maximum(total, tiny), 0.0, 1.0)
    return np.clip(residual / max(float((total * weight).sum()) / count, tiny), 0.0, 1.0)


def _upsample(coarse: np.ndarray, weight: np.ndarray, stride: int, shape: tuple[int, int]) -> np.ndarray:
    grid = np.meshgrid(np.arange(shape[0]) / stride, np.arange(shape[1]) / stride, indexing="ij")
    numerator = ndimage.map_coordinates(coarse * weight, grid, order=1, mode="nearest")
    denominator = ndimage.map_coordinates(weight.astype(np.float32), grid, order=1, mode="nearest")
    return np.where(denominator > 1e-6, numerator / np.maximum(denominator, 1e-6), 0.0)


def _smooth(values: np.ndarray, valid: np.ndarray, sigma: float) -> np.ndarray:
    weight = valid.astype(np.float32)
    if sigma <= 0:
        return np.where(valid, values, 0.0)
    radius = max(1, int(round(3 * sigma)))
    # gaussian_filter's radius is int(truncate * sigma + 0.5).
    truncate = (radius + 0.25) / sigma
    numerator = ndimage.gaussian_filter(values * weight, sigma, mode="nearest", truncate=truncate)
    denominator = ndimage.gaussian_filter(weight, sigma, mode="nearest", truncate=truncate)
    return np.where(valid, numerator / np.maximum(denominator, 1e-6), 0.0)


class ReferenceResult(dict):
    """``defect_map``, ``valid``, ``shift``, ``blobs`` and per-stage ``timings_s`` of one pair."""


def detect_numpy(
    reference: np.ndarray, inspected: np.ndarray, variables: Mapping, config: DetectionConfig = DetectionConfig()
) -> ReferenceResult:
    """Run the whole pipeline on one pair in NumPy/SciPy.

    Args:
      reference: ``[H', W']`` float32 in [0, 1].
      inspected: ``[H, W]`` float32 in [0, 1].
      variables: Teacher variables (``tsjax.teacher.load_pretrained``).
      config: Pipeline settings; ``denoise_sigma`` must be 0.

    Returns:
      A ``ReferenceResult``.

    Raises:
      ValueError: if ``config.denoise_sigma`` is not 0 (not implemented here).
    """
    if config.denoise_sigma > 0:
        raise ValueError("the NumPy reference has no denoising; use denoise_sigma=0.")
    timings = {}
    start = time.perf_counter()
    matched, covered = match_reference_shape(np.asarray(reference, np.float32), inspected.shape)
    alignment = align_pair(matched, inspected)
    valid = valid_mask(alignment.valid, covered, alignment.shift, config.margin)
    timings["align"] = time.perf_counter() - start

    start = time.perf_counter()
    reference_features = teacher_features(variables, alignment.aligned_reference, config.deepest_layer)
    inspected_features = teacher_features(variables, inspected, config.deepest_layer)
    timings["teacher"] = time.perf_counter() - start

    timings["student_fit"] = 0.0
    timings["score"] = 0.0
    maps = []
    for layer in config.layers:
        stride = LAYER_STRIDES[layer]
        target = inspected_features[layer]
        weight = valid[::stride, ::stride][: target.shape[0], : target.shape[1]].astype(np.float32)
        start = time.perf_counter()
        prediction = _ridge(reference_features[layer], target, weight, config.patch_size, config.alpha)
        timings["student_fit"] += time.perf_counter() - start
        start = time.perf_counter()
        coarse = _score(target, prediction, weight, config.normalization)
        maps.append(_upsample(coarse, weight, stride, inspected.shape))
        timings["score"] += time.perf_counter() - start

    start = time.perf_counter()
    combined = sum(weight * layer_map for weight, layer_map in zip(config.weights, maps))
    defect_map = np.clip(_smooth(combined, valid, float(config.map_sigma)), 0.0, 1.0).astype(np.float32)
    timings["score"] += time.perf_counter() - start

    start = time.perf_counter()
    threshold, mask, blobs = segment(defect_map, valid, config)
    timings["postprocess"] = time.perf_counter() - start
    return ReferenceResult(
        defect_map=defect_map, valid=valid, shift=alignment.shift, blobs=blobs, mask=mask, timings_s=timings
    )
