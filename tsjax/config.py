"""Settings of the detection pipeline, with every default in one place."""

from __future__ import annotations

import dataclasses

from tsjax.teacher import LAYER_STRIDES, LAYERS

__all__ = ["DetectionConfig"]

DEFAULT_ALPHA = 1e-3


@dataclasses.dataclass(frozen=True)
class DetectionConfig:
    """Every setting of ``tsjax.pipeline.detect``.

    The defaults were chosen on the real wafer pairs and synthetic pairs with
    planted defects; docs/scoring.md has the measurements.

    Attributes:
      layers: Teacher layers whose maps are combined, shallow to deep.
      layer_weights: One weight per layer for the combined map, or ``None``
        for the plain mean.
      patch_size: Odd side ``k`` of the reference neighbourhood that is the
        student's input, in feature pixels.
      alpha: Relative ridge penalty (the penalty is ``alpha`` times the mean
        input variance, see ``tsjax.students.ridge.ridge_solve``).
      normalization: ``'global'`` divides each pixel's residual by the mean
        feature energy of the valid pixels; ``'pixel'`` is the exact
        per-pixel ``1 - R^2``.
      denoise_sigma: Gaussian sigma in image px applied to both images before
        the teacher; 0 disables it.
      map_sigma: Gaussian sigma in image px applied to the combined defect
        map, at about the scale of the smallest defects; 0 disables it.
      valid_margin: Pixels removed from the edge of the overlap mask. ``None``
        derives it from the deepest layer: its stride times
        ``patch_size // 2 + 1``, the reach of one student patch plus one
        feature pixel, beyond which the seam of the overlap no longer enters
        a patch's centre features.
      z_floor: A pixel is defective only if its robust z-score
        ``(D - median) / (1.4826 * MAD)`` over the valid pixels exceeds this.
        It keeps Otsu, which always splits a map in two, from reporting
        noise on a defect-free pair.
      min_score: Absolute floor on ``D`` for a defective pixel, in [0, 1].
      opening_radius: Disk radius in px of the morphological opening.
      closing_radius: Disk radius in px of the morphological closing.
      min_area: Blobs smaller than this many px are dropped.
      seed: Seed of the PRNG key that stochastic students and augmentation use.
    """

    layers: tuple[str, ...] = ("layer1", "layer2")
    layer_weights: tuple[float, ...] | None = None
    patch_size: int = 3
    alpha: float = DEFAULT_ALPHA
    normalization: str = "global"
    denoise_sigma: float = 0.0
    map_sigma: float = 4.0
    valid_margin: int | None = None
    z_floor: float = 10.0
    min_score: float = 0.0
    opening_radius: int = 1
    closing_radius: int = 2
    min_area: int = 9
    seed: int = 0

    def __post_init__(self):
        if not self.layers:
            raise ValueError(f"layers is empty; select at least one of {LAYERS}.")
        unknown = [layer for layer in self.layers if layer not in LAYERS]
        if unknown:
            raise ValueError(f"unknown layer(s) {unknown}; use names from {LAYERS}.")
        if len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers {self.layers} repeat a layer; list each once.")
        if self.layer_weights is not None:
            if len(self.layer_weights) != len(self.layers):
                raise ValueError(
                    f"layer_weights has {len(self.layer_weights)} value(s) for "
                    f"{len(self.layers)} layer(s) {self.layers}; give one weight per layer."
                )
            if min(self.layer_weights) < 0 or sum(self.layer_weights) <= 0:
                raise ValueError(f"layer_weights {self.layer_weights} must be >= 0 with a positive sum.")
        if not isinstance(self.patch_size, int) or self.patch_size < 1 or self.patch_size % 2 == 0:
            raise ValueError(
                f"patch_size must be a positive odd integer; got {self.patch_size!r}. Use 1, 3 (the default) or 5."
            )
        if not self.alpha >= 0:
            raise ValueError(f"alpha must be >= 0; got {self.alpha!r}. The default is {DEFAULT_ALPHA}.")
        if self.normalization not in ("global", "pixel"):
            raise ValueError(f"normalization={self.normalization!r} is unknown; use 'global' or 'pixel'.")
        for name in ("denoise_sigma", "map_sigma", "z_floor"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}.")
        if not 0.0 <= self.min_score <= 1.0:
            raise ValueError(f"min_score must lie in [0, 1]; got {self.min_score!r}.")
        for name in ("opening_radius", "closing_radius", "min_area"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)!r}.")
        if self.valid_margin is not None and self.valid_margin < 0:
            raise ValueError(f"valid_margin must be >= 0 or None; got {self.valid_margin!r}.")

    @property
    def deepest_layer(self) -> str:
        """The deepest selected teacher layer, which sets how far the teacher runs."""
        return max(self.layers, key=LAYERS.index)

    @property
    def margin(self) -> int:
        """The overlap-mask erosion in px (``valid_margin`` or its derived default)."""
        if self.valid_margin is not None:
            return self.valid_margin
        return LAYER_STRIDES[self.deepest_layer] * (self.patch_size // 2 + 1)

    @property
    def weights(self) -> tuple[float, ...]:
        """Normalised per-layer weights that sum to 1."""
        raw = self.layer_weights or (1.0,) * len(self.layers)
        total = float(sum(raw))
        return tuple(float(w) / total for w in raw)
