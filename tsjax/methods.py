"""Defect-map methods that an evaluation runs side by side on the same pairs.

A ``Method`` is a name plus a function ``(reference, inspected, context) ->
(defect_map, valid)``. Every method's map then goes through the same
segmentation (``tsjax.pipeline.segment``) and the same metrics, so that a
comparison measures the map alone. The ``PairContext`` computes what methods
share for one pair (the alignment, the overlap mask and the teacher
features) once, and hands the cached results to every method.

``teacher_student_method`` wraps the pipeline's own stages, so its map is the
one ``tsjax.pipeline.detect`` returns for the same config and student. The
baselines are in ``tsjax.baselines``.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from tsjax import io, pipeline
from tsjax.align import Alignment, align_pair
from tsjax.config import DetectionConfig
from tsjax.students import Student
from tsjax.teacher import LAYERS

__all__ = ["MapFunction", "Method", "PairContext", "teacher_student_method"]

MapFunction = Callable[[np.ndarray, np.ndarray, "PairContext"], tuple[np.ndarray, np.ndarray]]


class PairContext:
    """Per-pair results that several methods share, each computed on first use.

    The alignment runs once. The valid mask of a given margin is built by
    ``pipeline.valid_mask``, as ``pipeline.align_and_mask`` builds it, and
    the teacher runs once per input denoising sigma up to
    ``last_layer``. ``timings_s`` adds up the seconds spent on this shared
    work, so that a caller can charge it to no single method.

    Args:
      reference: ``[H', W']`` float32 in [0, 1].
      inspected: ``[H, W]`` float32 in [0, 1].
      variables: Teacher variables that reach at least ``last_layer``.
      last_layer: Deepest teacher layer any method of the run reads.

    Raises:
      ImageError: if either image is unusable.
      ValueError: if ``last_layer`` is not a teacher layer.
    """

    def __init__(self, reference: np.ndarray, inspected: np.ndarray, variables: Mapping, last_layer: str = "layer3"):
        if last_layer not in LAYERS:
            raise ValueError(f"last_layer={last_layer!r} is not a teacher layer; use one of {LAYERS}.")
        self.reference = io.validate_image(np.asarray(reference), "reference")
        self.inspected = io.validate_image(np.asarray(inspected), "inspected")
        self.variables = variables
        self.last_layer = last_layer
        self.timings_s = {"align": 0.0, "teacher": 0.0}
        self._valid: dict[int, np.ndarray] = {}
        self._features: dict[float, dict[str, tuple[jax.Array, jax.Array]]] = {}

    @functools.cached_property
    def _aligned(self) -> tuple[Alignment, np.ndarray]:
        start = time.perf_counter()
        reference, covered = pipeline.match_reference_shape(
            np.asarray(self.reference, np.float32), self.inspected.shape
        )
        alignment = align_pair(reference, self.inspected)
        self.timings_s["align"] += time.perf_counter() - start
        return alignment, covered

    @property
    def shared_seconds(self) -> float:
        """Seconds spent so far on the alignment, the masks and the teacher."""
        return sum(self.timings_s.values())

    @property
    def alignment(self) -> Alignment:
        """The alignment of the reference onto the inspected image."""
        return self._aligned[0]

    @property
    def overlap(self) -> np.ndarray:
        """``[H, W]`` bool: pixels that both images cover after alignment (no margin)."""
        return self.valid(0)

    def valid(self, margin: int) -> np.ndarray:
        """Return the ``[H, W]`` bool overlap mask eroded by ``margin`` px.

        Raises:
          ImageError: if no pixel remains after the erosion.
        """
        if margin not in self._valid:
            alignment, covered = self._aligned
            start = time.perf_counter()
            self._valid[margin] = pipeline.valid_mask(alignment.valid, covered, alignment.shift, margin)
            self.timings_s["align"] += time.perf_counter() - start
        return self._valid[margin]

    def features(self, denoise_sigma: float = 0.0) -> dict[str, tuple[jax.Array, jax.Array]]:
        """Return the teacher features of the aligned reference and the inspected image.

        Args:
          denoise_sigma: Gaussian sigma in px applied to both images first,
            as ``DetectionConfig.denoise_sigma``; 0 disables it.

        Returns:
          Per layer up to ``last_layer``: ``(reference, inspected)`` feature
          maps, each ``[1, h, w, C]``.
        """
        if denoise_sigma not in self._features:
            alignment = self.alignment
            start = time.perf_counter()
            pair = np.stack([alignment.aligned_reference, self.inspected]).astype(np.float32)
            if denoise_sigma > 0:
                pair = np.stack([ndimage.gaussian_filter(image, denoise_sigma) for image in pair])
            maps = pipeline.extract_features(self.variables, jnp.asarray(pair), self.last_layer)
            jax.block_until_ready(maps)
            self._features[denoise_sigma] = {layer: (value[:1], value[1:]) for layer, value in maps.items()}
            self.timings_s["teacher"] += time.perf_counter() - start
        return self._features[denoise_sigma]


@dataclasses.dataclass(frozen=True)
class Method:
    """A named way to turn a pair into a defect map.

    Attributes:
      name: Short identifier, used in tables, file names and flags.
      compute: ``(reference, inspected, context) -> (defect_map, valid)``,
        both ``[H, W]``: a float32 map that is zero outside ``valid``, and
        the bool mask of pixels the method scores.
      config: Settings of the map, where the method reads any, and of the
        segmentation that turns the map into blobs.
      description: One line for the legend of a results table.
    """

    name: str
    compute: MapFunction
    config: DetectionConfig
    description: str


@functools.partial(jax.jit, static_argnames=("student",))
def _fit_layer(student: Student, ref: jax.Array, insp: jax.Array, valid: jax.Array, key: jax.Array) -> Any:
    return student.fit(ref, insp, valid, key)


def teacher_student_method(name: str, student: Student, config: DetectionConfig, description: str = "") -> Method:
    """Build the method that runs the teacher–student pipeline on the cached features.

    The map equals ``pipeline.detect(reference, inspected, variables, config,
    student=student).defect_map``: the student is fitted on the pair's own
    valid pixels with the key ``fold_in(key(config.seed), layer_index)``,
    as ``detect`` does.

    Args:
      name: Method name.
      student: The student to fit per layer.
      config: Layers, patch size, normalisation, smoothing and the
        segmentation settings.
      description: Legend text; by default it names the student and layers.

    Returns:
      A ``Method``.
    """

    def compute(reference: np.ndarray, inspected: np.ndarray, context: PairContext) -> tuple[np.ndarray, np.ndarray]:
        del reference  # The context contains the aligned reference.
        valid = context.valid(config.margin)
        features = context.features(config.denoise_sigma)
        ref_features = {layer: features[layer][0] for layer in config.layers}
        insp_features = {layer: features[layer][1] for layer in config.layers}
        key = jax.random.key(config.seed)
        states = {}
        for index, layer in enumerate(config.layers):
            layer_valid = pipeline.feature_valid(valid, layer, ref_features[layer].shape[1:3])[None]
            states[layer] = _fit_layer(
                student, ref_features[layer], insp_features[layer], jnp.asarray(layer_valid), jax.random.fold_in(key, index)
            )
        maps = pipeline.layer_defect_maps(
            student, states, ref_features, insp_features, valid[None], config.layers, config.normalization, inspected.shape
        )
        combined = pipeline.combine_maps(
            tuple(maps[layer] for layer in config.layers), config.weights, float(config.map_sigma), jnp.asarray(valid[None])
        )
        return np.where(valid, np.asarray(combined[0]), 0.0).astype(np.float32), valid

    if not description:
        description = f"teacher–student, {student.name} student, layers {'+'.join(config.layers)}"
    return Method(name=name, compute=compute, config=config, description=description)
