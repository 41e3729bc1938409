"""Synthetic SEM wafer image pairs with planted defects and exact ground truth.

Each pair is one defect-free reference image and one inspected image of the
same Manhattan layout (lines, L-shapes, combs and pads). The inspected image
is taken at a random sub-pixel shift, with its own grainy noise and a global
brightness and contrast change, and carries 0 to `SynthConfig.max_defects`
planted defects with a pixel mask for each.

The layout is rendered from a signed distance field evaluated at pixel
centres, so the shift is applied to the geometry itself and needs no image
interpolation. The intensity profile follows what secondary-electron images
of etched patterns show: a gray top surface, dark trenches that are darker
where they are narrow, and a thin bright rim on the top-surface side of every
edge.

Coordinates: x is the column and y is the row, origin at the top-left pixel
centre. The reference image frame is the layout ("world") frame. The shift
(dy, dx) maps the reference onto the inspected image:
``inspected(y, x) ≈ reference(y - dy, x - dx)``. A feature at reference pixel
(y, x) therefore appears at inspected pixel (y + dy, x + dx).

Example:
  >>> from tsjax import synth
  >>> pair = synth.make_pair(seed=0, config=synth.SynthConfig())
  >>> pair.reference.shape == pair.inspected.shape == pair.defect_mask.shape
  True
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import imageio.v3 as iio
import numpy as np
import scipy.ndimage
import tifffile

__all__ = [
    "DEFECT_KINDS",
    "SynthConfig",
    "SyntheticPair",
    "make_pair",
    "pair_seed",
    "write_dataset",
]

DEFECT_KINDS = (
    "bright_particle",
    "dark_pit",
    "bridge",
    "missing_segment",
    "edge_bump",
)

# Signed distances are only evaluated this far (px) around each rectangle.
# With the default profile settings every term of the intensity profile has
# decayed below 0.002 at this distance, so truncating it changes no pixel
# visibly.
_SDF_PAD_PX = 24.0

# A defect whose largest intensity change after clipping stays below this
# is dropped, because no pixel of the noise-free image shows it.
_MIN_VISIBLE_CHANGE = 1e-3

# Gap (px) between a defect's extent and the edge of the region that both
# images show.
_DEFECT_MARGIN_PX = 3.0

# Placement attempts per defect before falling back to a particle or pit.
_MAX_PLACEMENT_TRIES = 60

_LAYOUT_PATTERNS = ("lines", "comb", "l_shapes", "pad", "flat")
_LAYOUT_PATTERN_WEIGHTS = (0.32, 0.24, 0.24, 0.08, 0.12)

_TIFF_NAMES = ("{name}_reference_image.tif", "{name}_inspected_image.tif")
_MASK_NAME = "{name}_mask.png"
_INDEX_NAME = "defects.json"
_COORDINATE_SYSTEM = (
    "pixel (x, y) in the inspected image; x is the column, y is the row, "
    "origin at the top-left"
)


def _check_range(name: str, value: Any, low: float, high: float) -> None:
    """Raise unless `value` is an ordered (min, max) pair inside [low, high]."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"SynthConfig.{name} must be a (min, max) pair, got {value!r}.")
    lo, hi = value
    if not (low <= lo <= hi <= high):
        raise ValueError(
            f"SynthConfig.{name}={value!r} is invalid: it needs "
            f"{low} <= min <= max <= {high}."
        )


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """All settings of the synthetic pair generator, with their defaults.

    Intensities are in [0, 1] image units and lengths in pixels. A (min, max)
    pair means a value drawn uniformly from that interval for each pair,
    unless the field is documented as log-uniform.

    Attributes:
      height_range: Image height H, drawn as an integer in [min, max].
      width_range: Image width W, drawn independently of H.
      shift_range_px: Magnitude of each shift component. dy and dx each get a
        random sign and a continuous (sub-pixel) value.
      min_cell_px: Smallest side of a layout cell, which contains one pattern.
      trench_width_range_px: Width of dark trenches and gaps between fingers.
      line_width_range_px: Width of gray lines between trenches and of comb
        fingers.
      edge_roughness_px: Standard deviation of the smooth edge displacement
        (line-edge roughness), shared by both images because it belongs to
        the pattern.
      gray_level_range: Intensity of the flat top surface.
      trench_level_range: Intensity at the bottom of a narrow trench.
      wide_trench_lift: Extra intensity reached deep inside wide dark areas.
      wide_trench_length_px: Distance from the edge over which that lift grows.
      rim_peak_range: Peak intensity of the bright edge rim.
      rim_width_px: Gaussian sigma of the rim profile across the edge.
      rim_offset_px: Distance of the rim maximum from the edge, on the gray side.
      edge_softness_px: Width of the logistic step from trench to surface.
      halo_amplitude: Brightening of the surface next to an edge.
      halo_length_px: Exponential decay length of that brightening.
      gain_range: Contrast factor applied to the inspected image only.
      offset_range: Brightness offset added to the inspected image only.
      photons_per_unit: Mean Poisson count per unit intensity, or None to
        disable shot noise.
      gaussian_noise_std: Standard deviation of additive Gaussian noise,
        before blurring. With the default blur, the default noise gives a
        standard deviation of about 0.03 on flat regions.
      blur_sigma_px: (row, column) Gaussian sigma of the beam blur, applied to
        signal and noise of both images. The defaults give the lag-1 noise
        correlation of the real wafer images: about 0.36 between neighbours
        in a row and 0.23 between neighbours in a column.
      defect_free_fraction: Probability that a pair has no defect.
      max_defects: Number of defects of a defective pair, drawn uniformly from
        1..max_defects.
      defect_kinds: Kinds to draw from, a subset of `DEFECT_KINDS`.
      defect_size_range_px: Defect size (diameter, or length along the
        pattern for bridges and missing segments), drawn log-uniformly and
        rounded to an integer.
      defect_contrast_range: Magnitude of the defect's intensity change,
        drawn log-uniformly: the peak change of a spot, before the gain. A
        geometric defect is blended with the defect-free pattern so that its
        peak change is at most this magnitude.
      mask_fraction: A pixel belongs to a defect's mask where the defect
        changes the noise-free image by at least this fraction of its peak
        change.
    """

    height_range: tuple[int, int] = (256, 512)
    width_range: tuple[int, int] = (256, 512)
    shift_range_px: tuple[float, float] = (2.0, 25.0)
    min_cell_px: int = 56
    trench_width_range_px: tuple[float, float] = (5.0, 14.0)
    line_width_range_px: tuple[float, float] = (8.0, 22.0)
    edge_roughness_px: float = 0.25
    gray_level_range: tuple[float, float] = (0.42, 0.50)
    trench_level_range: tuple[float, float] = (0.12, 0.19)
    wide_trench_lift: float = 0.10
    wide_trench_length_px: float = 6.0
    rim_peak_range: tuple[float, float] = (0.88, 1.0)
    rim_width_px: float = 1.1
    rim_offset_px: float = 1.0
    edge_softness_px: float = 0.6
    halo_amplitude: float = 0.1
    halo_length_px: float = 4.0
    gain_range: tuple[float, float] = (0.88, 1.12)
    offset_range: tuple[float, float] = (-0.05, 0.05)
    photons_per_unit: float | None = 800.0
    gaussian_noise_std: float = 0.042
    blur_sigma_px: tuple[float, float] = (0.48, 0.55)
    defect_free_fraction: float = 0.2
    max_defects: int = 3
    defect_kinds: tuple[str, ...] = DEFECT_KINDS
    defect_size_range_px: tuple[float, float] = (2.0, 30.0)
    defect_contrast_range: tuple[float, float] = (0.05, 0.5)
    mask_fraction: float = 0.25

    def __post_init__(self):
        _check_range("height_range", self.height_range, 16, 8192)
        _check_range("width_range", self.width_range, 16, 8192)
        _check_range("shift_range_px", self.shift_range_px, 0.0, 1024.0)
        _check_range("trench_width_range_px", self.trench_width_range_px, 1.0, 1024.0)
        _check_range("line_width_range_px", self.line_width_range_px, 1.0, 1024.0)
        _check_range("gray_level_range", self.gray_level_range, 0.0, 1.0)
        _check_range("trench_level_range", self.trench_level_range, 0.0, 1.0)
        _check_range("rim_peak_range", self.rim_peak_range, 0.0, 1.0)
        _check_range("gain_range", self.gain_range, 0.01, 100.0)
        _check_range("offset_range", self.offset_range, -1.0, 1.0)
        if len(self.blur_sigma_px) != 2 or min(self.blur_sigma_px) < 0:
            raise ValueError(
                f"SynthConfig.blur_sigma_px={self.blur_sigma_px!r} is invalid: "
                "use a (row, column) pair of sigmas >= 0."
            )
        _check_range("defect_size_range_px", self.defect_size_range_px, 1.0, 1024.0)
        _check_range("defect_contrast_range", self.defect_contrast_range, 1e-4, 1.0)
        self._check_scalars()
        self._check_defect_room()

    def _check_scalars(self) -> None:
        positive = {
            "min_cell_px": self.min_cell_px,
            "wide_trench_length_px": self.wide_trench_length_px,
            "rim_width_px": self.rim_width_px,
            "edge_softness_px": self.edge_softness_px,
            "halo_length_px": self.halo_length_px,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"SynthConfig.{name}={value!r} is invalid: it must be > 0.")
        non_negative = {
            "edge_roughness_px": self.edge_roughness_px,
            "wide_trench_lift": self.wide_trench_lift,
            "rim_offset_px": self.rim_offset_px,
            "halo_amplitude": self.halo_amplitude,
            "gaussian_noise_std": self.gaussian_noise_std,
        }
        for name, value in non_negative.items():
            if not value >= 0:
                raise ValueError(f"SynthConfig.{name}={value!r} is invalid: it must be >= 0.")
        if self.photons_per_unit is not None and not self.photons_per_unit > 0:
            raise ValueError(
                f"SynthConfig.photons_per_unit={self.photons_per_unit!r} is invalid: "
                "use a count > 0, or None to disable shot noise."
            )
        if not 0.0 <= self.defect_free_fraction <= 1.0:
            raise ValueError(
                f"SynthConfig.defect_free_fraction={self.defect_free_fraction!r} "
                "is invalid: it must lie in [0, 1]."
            )
        if not 0.0 < self.mask_fraction < 1.0:
            raise ValueError(
                f"SynthConfig.mask_fraction={self.mask_fraction!r} is invalid: "
                "it must lie in (0, 1)."
            )
        if isinstance(self.max_defects, bool) or not isinstance(self.max_defects, int):
            raise TypeError(f"SynthConfig.max_defects must be an int, got {self.max_defects!r}.")
        if self.max_defects < 0:
            raise ValueError(f"SynthConfig.max_defects={self.max_defects} is invalid: it must be >= 0.")
        unknown = [kind for kind in self.defect_kinds if kind not in DEFECT_KINDS]
        if unknown or not self.defect_kinds:
            raise ValueError(
                f"SynthConfig.defect_kinds={self.defect_kinds!r} is invalid: "
                f"use a non-empty subset of {DEFECT_KINDS}."
            )

    def _check_defect_room(self) -> None:
        # A defect must fit inside the part of the inspected image that the
        # reference also shows, with a margin on each side.
        needed = self.shift_range_px[1] + self.defect_size_range_px[1] + 2 * _DEFECT_MARGIN_PX + 8
        smallest = min(self.height_range[0], self.width_range[0])
        if self.max_defects > 0 and smallest < needed:
            raise ValueError(
                f"SynthConfig image sides from {smallest} px are too small for shifts up to "
                f"{self.shift_range_px[1]} px and defects up to {self.defect_size_range_px[1]} px: "
                f"use sides of at least {math.ceil(needed)} px, or smaller shifts or defects."
            )


class SyntheticPair(NamedTuple):
    """One synthetic reference/inspected pair with its ground truth.

    Attributes:
      reference: [H, W] float32 in [0, 1], the defect-free reference image.
      inspected: [H, W] float32 in [0, 1], the inspected image.
      defect_mask: [H, W] bool, True on defect pixels of the inspected image.
      defects: One dict per planted defect, empty for a defect-free pair.
        Keys "x" and "y" are the float column and row of the centroid of the
        defect's mask in the inspected image. "kind" is one of
        `DEFECT_KINDS` and "size_px" the int nominal size. "contrast" is the
        float signed peak intensity change in the noise-free inspected image
        after gain, offset and clipping, positive for brighter.
      shift: (dy, dx) in px: inspected(y, x) ≈ reference(y - dy, x - dx).
      gain: Contrast factor applied to the inspected image.
      offset: Brightness offset added to the inspected image after the gain.
    """

    reference: np.ndarray
    inspected: np.ndarray
    defect_mask: np.ndarray
    defects: list[dict[str, Any]]
    shift: tuple[float, float]
    gain: float
    offset: float


# An axis-aligned box in world coordinates: (y0, x0, y1, x1) in px.
_Box = tuple[float, float, float, float]

# A rectangle in world coordinates: (y0, x0, y1, x1, corner_radius), with
# y0 < y1 and x0 < x1 in px. The corner radius rounds all four corners.
_Rect = tuple[float, float, float, float, float]


class _Segment(NamedTuple):
    """A straight piece of a trench or gray line, where defects can be placed."""

    rect: _Rect
    horizontal: bool  # True when the line runs along x.


class _Layout(NamedTuple):
    """A layout as a sequence of set operations on the dark (trench) region.

    Each op is (+1, rect) to add the rectangle to the dark region or (-1, rect)
    to remove it, applied in order to an empty (all gray) field.
    """

    ops: list[tuple[int, _Rect]]
    trench_segments: list[_Segment]
    gray_segments: list[_Segment]
    dark_rects: list[_Rect]


class _Levels(NamedTuple):
    """Intensity levels of one pair's pattern."""

    gray: float
    trench: float
    rim_peak: float


# Signed distance field of the dark region.


def _rounded_box_sdf(ys: np.ndarray, xs: np.ndarray, rect: _Rect) -> np.ndarray:
    """Signed distance (px) to a rounded rectangle, negative inside.

    `ys` and `xs` broadcast against each other, e.g. [h, 1] and [1, w].
    """
    y0, x0, y1, x1, radius = rect
    half_y = 0.5 * (y1 - y0)
    half_x = 0.5 * (x1 - x0)
    radius = min(radius, half_y, half_x)
    qy = np.abs(ys - 0.5 * (y0 + y1)) - (half_y - radius)
    qx = np.abs(xs - 0.5 * (x0 + x1)) - (half_x - radius)
    outside = np.hypot(np.maximum(qy, 0.0), np.maximum(qx, 0.0))
    inside = np.minimum(np.maximum(qy, qx), 0.0)
    return outside + inside - radius


def _apply_op(
    field: np.ndarray, origin: tuple[float, float], sign: int, rect: _Rect
) -> None:
    """Apply one union (+1) or difference (-1) op to `field` in place.

    `field` is the [h, w] signed distance to the dark region, and pixel (i, j)
    sits at world point (origin[0] + i, origin[1] + j). Only a window around
    the rectangle is touched, because the op changes nothing farther out.
    """
    height, width = field.shape
    y0, x0, y1, x1, _ = rect
    row0 = max(int(math.floor(y0 - _SDF_PAD_PX - origin[0])), 0)
    row1 = min(int(math.ceil(y1 + _SDF_PAD_PX - origin[0])) + 1, height)
    col0 = max(int(math.floor(x0 - _SDF_PAD_PX - origin[1])), 0)
    col1 = min(int(math.ceil(x1 + _SDF_PAD_PX - origin[1])) + 1, width)
    if row0 >= row1 or col0 >= col1:
        return
    ys = (origin[0] + np.arange(row0, row1, dtype=np.float64))[:, None]
    xs = (origin[1] + np.arange(col0, col1, dtype=np.float64))[None, :]
    sdf = _rounded_box_sdf(ys, xs, rect)
    window = field[row0:row1, col0:col1]
    if sign > 0:
        np.minimum(window, sdf, out=window)
    else:
        np.maximum(window, -sdf, out=window)


def _render_sdf(
    ops: list[tuple[int, _Rect]], shape: tuple[int, int], origin: tuple[float, float]
) -> np.ndarray:
    """Return the [H, W] float64 signed distance to the dark region (negative inside)."""
    field = np.full(shape, _SDF_PAD_PX, dtype=np.float64)
    for sign, rect in ops:
        _apply_op(field, origin, sign, rect)
    return np.clip(field, -_SDF_PAD_PX, _SDF_PAD_PX, out=field)


def _sdf_at_point(ops: list[tuple[int, _Rect]], y: float, x: float) -> float:
    """Return the signed distance to the dark region at one world point."""
    value = _SDF_PAD_PX
    for sign, rect in ops:
        distance = float(_rounded_box_sdf(np.float64(y), np.float64(x), rect))
        value = min(value, distance) if sign > 0 else max(value, -distance)
    return value


class _Roughness(NamedTuple):
    """Smooth random edge displacement: a sum of plane waves in world coordinates."""

    amplitudes: np.ndarray  # [K] px
    wave_y: np.ndarray  # [K] rad/px
    wave_x: np.ndarray  # [K] rad/px
    phases: np.ndarray  # [K] rad


def _make_roughness(rng: np.random.Generator, amplitude_px: float) -> _Roughness:
    num_waves = 12
    wavelengths = rng.uniform(8.0, 48.0, num_waves)
    angles = rng.uniform(0.0, 2 * math.pi, num_waves)
    # Scaled so the summed displacement has standard deviation `amplitude_px`.
    amplitudes = np.full(num_waves, amplitude_px * math.sqrt(2.0 / num_waves))
    return _Roughness(
        amplitudes=amplitudes,
        wave_y=2 * math.pi / wavelengths * np.sin(angles),
        wave_x=2 * math.pi / wavelengths * np.cos(angles),
        phases=rng.uniform(0.0, 2 * math.pi, num_waves),
    )


def _roughness_field(
    roughness: _Roughness, shape: tuple[int, int], origin: tuple[float, float]
) -> np.ndarray:
    ys = origin[0] + np.arange(shape[0], dtype=np.float64)[:, None]
    xs = origin[1] + np.arange(shape[1], dtype=np.float64)[None, :]
    field = np.zeros(shape, dtype=np.float64)
    for amplitude, ky, kx, phase in zip(*roughness):
        field += amplitude * np.sin(ky * ys + kx * xs + phase)
    return field


def _intensity(sdf: np.ndarray, levels: _Levels, config: SynthConfig) -> np.ndarray:
    """Map signed distance (px, negative in trenches) to noise-free intensity."""
    surface = 0.5 * (1.0 + np.tanh(sdf / (2.0 * config.edge_softness_px)))  # logistic step
    depth = np.maximum(-sdf, 0.0)
    trench = levels.trench + config.wide_trench_lift * (
        1.0 - np.exp(-depth / config.wide_trench_length_px)
    )
    base = trench + (levels.gray - trench) * surface
    rim = (levels.rim_peak - levels.gray) * np.exp(
        -0.5 * ((sdf - config.rim_offset_px) / config.rim_width_px) ** 2
    )
    halo = config.halo_amplitude * np.exp(-np.maximum(sdf, 0.0) / config.halo_length_px) * surface
    return base + rim + halo


# Layout generation (world coordinates).


def _split_cells(rng: np.random.Generator, box: _Box, min_cell: float, depth: int) -> list[_Box]:
    """Split a box recursively (guillotine cuts) into cells of at least `min_cell` px."""
    y0, x0, y1, x1 = box
    height, width = y1 - y0, x1 - x0
    can_split_rows = height >= 2 * min_cell
    can_split_cols = width >= 2 * min_cell
    if depth >= 4 or not (can_split_rows or can_split_cols) or (depth >= 1 and rng.random() < 0.2):
        return [box]
    if can_split_rows and can_split_cols:
        split_rows = bool(rng.random() < 0.5)
    else:
        split_rows = can_split_rows
    if split_rows:
        cut = y0 + rng.uniform(min_cell, height - min_cell)
        halves = [(y0, x0, cut, x1), (cut, x0, y1, x1)]
    else:
        cut = x0 + rng.uniform(min_cell, width - min_cell)
        halves = [(y0, x0, y1, cut), (y0, cut, y1, x1)]
    return [cell for half in halves for cell in _split_cells(rng, half, min_cell, depth + 1)]


def _oriented_rect(horizontal: bool, along0: float, along1: float, across0: float, across1: float, radius: float) -> _Rect:
    """Build a rect from extents along and across a line's direction."""
    if horizontal:
        return (across0, along0, across1, along1, radius)
    return (along0, across0, along1, across1, radius)


def _cell_extents(cell: _Box, horizontal: bool) -> tuple[float, float, float, float]:
    """Return (along0, along1, across0, across1) of a cell for a line direction."""
    y0, x0, y1, x1 = cell
    return (x0, x1, y0, y1) if horizontal else (y0, y1, x0, x1)


def _add_lines(rng: np.random.Generator, cell: _Box, config: SynthConfig, layout: _Layout) -> None:
    """Add parallel trenches across the cell, some ending or broken inside it."""
    horizontal = bool(rng.random() < 0.5)
    along0, along1, across0, across1 = _cell_extents(cell, horizontal)
    trench = rng.uniform(*config.trench_width_range_px)
    line = rng.uniform(*config.line_width_range_px)
    span = along1 - along0
    position = across0 + rng.uniform(0.0, line)
    previous: tuple[float, float, float] | None = None  # (start, end, across edge)
    while position + trench <= across1:
        start, end = along0, along1
        if rng.random() < 0.5:
            start += rng.uniform(0.0, 0.4 * span)
        if rng.random() < 0.5:
            end -= rng.uniform(0.0, 0.4 * span)
        pieces = [(start, end)]
        if end - start > 6 * trench and rng.random() < 0.2:
            middle = rng.uniform(start + 2 * trench, end - 2 * trench)
            gap = rng.uniform(1.5 * trench, 3.0 * trench)
            pieces = [(start, middle - 0.5 * gap), (middle + 0.5 * gap, end)]
        for piece_start, piece_end in pieces:
            if piece_end - piece_start < 2 * trench:
                continue
            rect = _oriented_rect(horizontal, piece_start, piece_end, position, position + trench, 0.5 * trench)
            layout.ops.append((1, rect))
            layout.dark_rects.append(rect)
            layout.trench_segments.append(_Segment(rect, horizontal))
        if previous is not None:
            # The gray strip between this trench and the previous one, where
            # both run side by side.
            shared0, shared1 = max(previous[0], start), min(previous[1], end)
            if shared1 - shared0 > 4 * line:
                strip = _oriented_rect(horizontal, shared0, shared1, previous[2], position, 0.0)
                layout.gray_segments.append(_Segment(strip, horizontal))
        previous = (start, end, position + trench)
        position += trench + line


def _add_comb(rng: np.random.Generator, cell: _Box, config: SynthConfig, layout: _Layout) -> None:
    """Add a dark box with gray fingers entering from one side."""
    y0, x0, y1, x1 = cell
    box = (y0, x0, y1, x1, 4.0)
    layout.ops.append((1, box))
    layout.dark_rects.append(box)

    horizontal = bool(rng.random() < 0.5)  # fingers run along x
    from_low_side = bool(rng.random() < 0.5)
    along0, along1, across0, across1 = _cell_extents(cell, horizontal)
    finger = rng.uniform(*config.line_width_range_px)
    gap = rng.uniform(*config.trench_width_range_px)
    depth = along1 - along0
    length = rng.uniform(0.5, 0.85) * depth
    # Each finger starts just outside the box edge, so that it merges with
    # the gray surface there, and its rounded base corners stay outside the
    # box. With fingers up to 22 px wide the overhang stays inside the gray
    # gap between cells (at least 12 px), so it cannot cut a neighbouring
    # pattern.
    overhang = 0.5 * finger + 1.0

    if from_low_side:
        start, end = along0 - overhang, along0 + length
        visible = (along0, along0 + length)
    else:
        start, end = along1 - length, along1 + overhang
        visible = (along1 - length, along1)

    position = across0 + gap
    while position + finger + gap <= across1:
        rect = _oriented_rect(horizontal, start, end, position, position + finger, 0.5 * finger)
        layout.ops.append((-1, rect))
        finger_rect = _oriented_rect(horizontal, visible[0], visible[1], position, position + finger, 0.0)
        layout.gray_segments.append(_Segment(finger_rect, horizontal))
        gap_rect = _oriented_rect(
            horizontal, visible[0], visible[1], position + finger, position + finger + gap, 0.0
        )
        if position + 2 * finger + 2 * gap <= across1:
            layout.trench_segments.append(_Segment(gap_rect, horizontal))
        position += finger + gap


def _add_l_shapes(rng: np.random.Generator, cell: _Box, config: SynthConfig, layout: _Layout) -> None:
    """Add nested L-shaped trenches that share one corner direction."""
    y0, x0, y1, x1 = cell
    trench = rng.uniform(*config.trench_width_range_px)
    pitch = trench + rng.uniform(*config.line_width_range_px)
    flip_y = bool(rng.random() < 0.5)
    flip_x = bool(rng.random() < 0.5)
    count = int(rng.integers(1, 5))
    for index in range(count):
        inset = index * pitch
        arm_y = (y1 - y0) - inset - rng.uniform(0.0, 0.3) * (y1 - y0)
        arm_x = (x1 - x0) - inset - rng.uniform(0.0, 0.3) * (x1 - x0)
        if min(arm_y, arm_x) < 2 * trench + 4:
            break
        # Arms in local coordinates from the corner at (inset, inset).
        arms = [
            (inset, inset, inset + trench, inset + arm_x, True),
            (inset, inset, inset + arm_y, inset + trench, False),
        ]
        for a0, b0, a1, b1, horizontal in arms:
            ly0, ly1 = (y1 - a1, y1 - a0) if flip_y else (y0 + a0, y0 + a1)
            lx0, lx1 = (x1 - b1, x1 - b0) if flip_x else (x0 + b0, x0 + b1)
            rect = (ly0, lx0, ly1, lx1, 0.5 * trench)
            layout.ops.append((1, rect))
            layout.dark_rects.append(rect)
            layout.trench_segments.append(_Segment(rect, horizontal))


def _add_pad(rng: np.random.Generator, cell: _Box, layout: _Layout) -> None:
    """Add a large dark area with slightly rounded corners."""
    y0, x0, y1, x1 = cell
    shrink_y = rng.uniform(0.0, 0.25) * (y1 - y0)
    shrink_x = rng.uniform(0.0, 0.25) * (x1 - x0)
    rect = (y0 + shrink_y, x0 + shrink_x, y1, x1, rng.uniform(2.0, 6.0))
    layout.ops.append((1, rect))
    layout.dark_rects.append(rect)


def _make_layout(rng: np.random.Generator, world: _Box, config: SynthConfig) -> _Layout:
    layout = _Layout(ops=[], trench_segments=[], gray_segments=[], dark_rects=[])
    for cell in _split_cells(rng, world, float(config.min_cell_px), depth=0):
        # A gray margin around each cell keeps neighbouring patterns apart.
        margin = rng.uniform(6.0, 14.0)
        inner = (cell[0] + margin, cell[1] + margin, cell[2] - margin, cell[3] - margin)
        if min(inner[2] - inner[0], inner[3] - inner[1]) < 24.0:
            continue
        pattern = rng.choice(_LAYOUT_PATTERNS, p=_LAYOUT_PATTERN_WEIGHTS)
        if pattern == "lines":
            _add_lines(rng, inner, config, layout)
        elif pattern == "comb":
            _add_comb(rng, inner, config, layout)
        elif pattern == "l_shapes":
            _add_l_shapes(rng, inner, config, layout)
        elif pattern == "pad":
            _add_pad(rng, inner, layout)
    return layout


# Defects (inspected-image coordinates unless noted).


class _Scene(NamedTuple):
    """Inputs of defect planting: one inspected image and its layout."""

    layout: _Layout
    shape: tuple[int, int]
    shift: tuple[float, float]
    sdf: np.ndarray  # [H, W] clean signed distance on the inspected grid
    roughness: np.ndarray  # [H, W] edge displacement on the inspected grid
    clean: np.ndarray  # [H, W] noise-free intensity without defects
    levels: _Levels


class _Planted(NamedTuple):
    kind: str
    size_px: int
    diff: np.ndarray  # [H, W] intensity change before gain and offset
    centre: tuple[float, float]  # (y, x) in the inspected image
    radius: float  # Half the larger side of the changed area, in px.


def _log_uniform(rng: np.random.Generator, bounds: tuple[float, float]) -> float:
    return float(math.exp(rng.uniform(math.log(bounds[0]), math.log(bounds[1]))))


def _inside_shared_view(scene: _Scene, y: float, x: float, radius: float) -> bool:
    """Check that a disk around inspected pixel (y, x) lies where both images see.

    Inspected row y shows reference row y - dy, so the shared rows are
    [max(0, dy), min(H, H + dy)) and likewise for columns.
    """
    height, width = scene.shape
    dy, dx = scene.shift
    margin = radius + _DEFECT_MARGIN_PX
    return (
        max(0.0, dy) + margin <= y <= min(height, height + dy) - 1 - margin
        and max(0.0, dx) + margin <= x <= min(width, width + dx) - 1 - margin
    )


def _far_from(planted_centres: list[tuple[float, float, float]], y: float, x: float, radius: float) -> bool:
    return all(
        math.hypot(y - cy, x - cx) >= radius + other_radius + 6.0
        for cy, cx, other_radius in planted_centres
    )


def _blob_diff(
    scene: _Scene, y: float, x: float, size_px: int, amplitude: float, rng: np.random.Generator
) -> np.ndarray:
    """Return a soft elliptical spot of peak `amplitude` centred at (y, x)."""
    radius = 0.5 * size_px
    aspect = rng.uniform(0.7, 1.0)
    angle = rng.uniform(0.0, math.pi)
    rows = np.arange(scene.shape[0], dtype=np.float64)[:, None] - y
    cols = np.arange(scene.shape[1], dtype=np.float64)[None, :] - x
    along = rows * math.sin(angle) + cols * math.cos(angle)
    across = -rows * math.cos(angle) + cols * math.sin(angle)
    distance = np.hypot(along, across / aspect)
    # Logistic fall-off over about half a pixel, so a 2 px spot still peaks
    # near its full amplitude.
    profile = 0.5 * (1.0 + np.tanh(radius - distance))
    return amplitude * profile


class _Candidate(NamedTuple):
    """A proposed geometric defect: one layout op, in world coordinates."""

    sign: int  # +1 adds the rect to the dark region, -1 removes it.
    rect: _Rect
    centre_y: float
    centre_x: float
    radius: float  # Half the larger side of the changed area, in px.


def _geometric_op(
    rng: np.random.Generator, kind: str, layout: _Layout, size_px: int
) -> _Candidate | None:
    """Draw a candidate op for a geometric defect.

    Returns None when the drawn line or edge is too short for a defect of
    this size.
    """
    half = 0.5 * size_px
    if kind in ("bridge", "missing_segment"):
        segments = layout.trench_segments if kind == "bridge" else layout.gray_segments
        if not segments:
            return None
        segment = segments[int(rng.integers(len(segments)))]
        y0, x0, y1, x1, _ = segment.rect
        along0, along1, across0, across1 = _cell_extents((y0, x0, y1, x1), segment.horizontal)
        width = across1 - across0
        # Keep clear of rounded line ends, where the segment is not straight.
        low, high = along0 + half + width, along1 - half - width
        if low >= high:
            return None
        centre = rng.uniform(low, high)
        rect = _oriented_rect(
            segment.horizontal, centre - half, centre + half, across0 - 2.0, across1 + 2.0, min(half, 1.5)
        )
        sign = -1 if kind == "bridge" else 1
        middle = 0.5 * (across0 + across1)
        centre_y, centre_x = (middle, centre) if segment.horizontal else (centre, middle)
        return _Candidate(sign, rect, centre_y, centre_x, max(half, 0.5 * width + 2.0))
    if kind == "edge_bump":
        if not layout.dark_rects:
            return None
        y0, x0, y1, x1, radius = layout.dark_rects[int(rng.integers(len(layout.dark_rects)))]
        side = int(rng.integers(4))
        if side < 2:  # top or bottom edge
            low, high = x0 + radius + half, x1 - radius - half
            if low >= high:
                return None
            centre_y, centre_x = (y0 if side == 0 else y1), rng.uniform(low, high)
        else:
            low, high = y0 + radius + half, y1 - radius - half
            if low >= high:
                return None
            centre_y, centre_x = rng.uniform(low, high), (x0 if side == 2 else x1)
        # +1 grows the trench into the surface, -1 grows the surface into the trench.
        sign = 1 if rng.random() < 0.5 else -1
        rect = (centre_y - half, centre_x - half, centre_y + half, centre_x + half, half)
        return _Candidate(sign, rect, centre_y, centre_x, half)
    raise ValueError(f"Invalid geometric defect kind {kind!r}: use bridge, missing_segment or edge_bump.")


def _geometric_diff(scene: _Scene, sign: int, rect: _Rect, magnitude: float, config: SynthConfig) -> np.ndarray:
    """Return the intensity change of one layout op, blended down to `magnitude`."""
    dy, dx = scene.shift
    sdf = scene.sdf.copy()
    _apply_op(sdf, (-dy, -dx), sign, rect)
    np.clip(sdf, -_SDF_PAD_PX, _SDF_PAD_PX, out=sdf)
    full = _intensity(sdf + scene.roughness, scene.levels, config) - scene.clean
    peak = float(np.max(np.abs(full)))
    if peak == 0.0:
        return full
    # Scale the change so its peak equals `magnitude`, as for spots. A faint
    # geometric defect then looks like a partial bridge or a thin residue.
    return min(1.0, magnitude / peak) * full


def _try_plant(
    rng: np.random.Generator,
    scene: _Scene,
    kind: str,
    size_px: int,
    magnitude: float,
    planted_centres: list[tuple[float, float, float]],
    config: SynthConfig,
) -> _Planted | None:
    """Draw positions for one defect until one fits, or return None."""
    dy, dx = scene.shift
    radius = 0.5 * size_px
    for _ in range(_MAX_PLACEMENT_TRIES):
        if kind in ("bright_particle", "dark_pit"):
            y = rng.uniform(0.0, scene.shape[0] - 1.0)
            x = rng.uniform(0.0, scene.shape[1] - 1.0)
            if not (_inside_shared_view(scene, y, x, radius) and _far_from(planted_centres, y, x, radius)):
                continue
            amplitude = magnitude if kind == "bright_particle" else -magnitude
            diff = _blob_diff(scene, y, x, size_px, amplitude, rng)
            return _Planted(kind, size_px, diff, (y, x), radius)

        candidate = _geometric_op(rng, kind, scene.layout, size_px)
        if candidate is None:
            continue
        y, x = candidate.centre_y + dy, candidate.centre_x + dx
        extent = candidate.radius
        if not (_inside_shared_view(scene, y, x, extent) and _far_from(planted_centres, y, x, extent)):
            continue
        # The op must land on the feature it is meant to change, e.g. a
        # bridge on a trench that no finger or neighbour already covers.
        level = _sdf_at_point(scene.layout.ops, candidate.centre_y, candidate.centre_x)
        if (kind == "bridge" and level > -1.0) or (kind == "missing_segment" and level < 1.0):
            continue
        if kind == "edge_bump" and abs(level) > 1.0:
            continue
        diff = _geometric_diff(scene, candidate.sign, candidate.rect, magnitude, config)
        if np.max(np.abs(diff)) < 0.5 * magnitude:
            continue
        return _Planted(kind, size_px, diff, (y, x), extent)
    return None


def _plant_defects(rng: np.random.Generator, scene: _Scene, config: SynthConfig) -> list[_Planted]:
    if config.max_defects == 0 or rng.random() < config.defect_free_fraction:
        return []
    count = int(rng.integers(1, config.max_defects + 1))
    planted: list[_Planted] = []
    centres: list[tuple[float, float, float]] = []
    for _ in range(count):
        kind = str(rng.choice(config.defect_kinds))
        size_px = int(round(_log_uniform(rng, config.defect_size_range_px)))
        magnitude = _log_uniform(rng, config.defect_contrast_range)
        result = _try_plant(rng, scene, kind, size_px, magnitude, centres, config)
        if result is None and kind not in ("bright_particle", "dark_pit"):
            # The layout has no free place for this kind (e.g. a flat image
            # has no trench to bridge), so plant a spot instead.
            fallback = "bright_particle" if rng.random() < 0.5 else "dark_pit"
            result = _try_plant(rng, scene, fallback, size_px, magnitude, centres, config)
        if result is None:
            continue
        centres.append((*result.centre, result.radius))
        planted.append(result)
    return planted


# Imaging and the public API.


def _acquire(clean: np.ndarray, rng: np.random.Generator, config: SynthConfig) -> np.ndarray:
    """Add shot and read noise, blur by the beam, and clip to [0, 1]."""
    signal = np.clip(clean, 0.0, 1.0)
    if config.photons_per_unit is not None:
        signal = rng.poisson(signal * config.photons_per_unit) / config.photons_per_unit
    if config.gaussian_noise_std > 0:
        signal = signal + rng.normal(0.0, config.gaussian_noise_std, signal.shape)
    if max(config.blur_sigma_px) > 0:
        signal = scipy.ndimage.gaussian_filter(signal, sigma=config.blur_sigma_px, mode="nearest")
    return np.clip(signal, 0.0, 1.0).astype(np.float32)


def _draw_shift(rng: np.random.Generator, config: SynthConfig) -> tuple[float, float]:
    magnitudes = rng.uniform(*config.shift_range_px, size=2)
    signs = np.where(rng.random(2) < 0.5, -1.0, 1.0)
    return float(signs[0] * magnitudes[0]), float(signs[1] * magnitudes[1])


def _describe(planted: _Planted, mask: np.ndarray, change: np.ndarray) -> dict[str, Any]:
    rows, cols = np.nonzero(mask)
    peak = np.argmax(np.abs(change[rows, cols]))
    return {
        "x": float(cols.mean()),
        "y": float(rows.mean()),
        "kind": planted.kind,
        "size_px": planted.size_px,
        "contrast": float(change[rows[peak], cols[peak]]),
    }


def _validate_seed(seed: Any) -> int:
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__} {seed!r}.")
    if seed < 0:
        raise ValueError(f"seed={seed} is invalid: use a non-negative int.")
    return int(seed)


def make_pair(seed: int, config: SynthConfig = SynthConfig()) -> SyntheticPair:
    """Generate one reference/inspected pair with its defect ground truth.

    The result depends only on `seed` and `config`. Layout, defects and the
    noise of each image come from separate random streams of one
    `numpy.random.SeedSequence(seed)`, so turning noise off keeps the same
    layout, shift and defects.

    Args:
      seed: Non-negative int.
      config: Generator settings.

    Returns:
      A `SyntheticPair`. Its `shift` (dy, dx) in px is the translation that
      maps the reference onto the inspected image:
      inspected(y, x) ≈ reference(y - dy, x - dx), where y is the row and x
      the column. Defects lie only where both images show the pattern, at
      least 3 px inside that region.

    Raises:
      TypeError: If `seed` is not an int or `config` is not a `SynthConfig`.
      ValueError: If `seed` is negative.
    """
    seed = _validate_seed(seed)
    if not isinstance(config, SynthConfig):
        raise TypeError(f"config must be a SynthConfig, got {type(config).__name__}.")
    geometry_seq, defect_seq, reference_seq, inspected_seq = np.random.SeedSequence(seed).spawn(4)
    rng = np.random.default_rng(geometry_seq)

    shape = (
        int(rng.integers(config.height_range[0], config.height_range[1] + 1)),
        int(rng.integers(config.width_range[0], config.width_range[1] + 1)),
    )
    shift = _draw_shift(rng, config)
    levels = _Levels(
        gray=rng.uniform(*config.gray_level_range),
        trench=rng.uniform(*config.trench_level_range),
        rim_peak=rng.uniform(*config.rim_peak_range),
    )
    gain = float(rng.uniform(*config.gain_range))
    offset = float(rng.uniform(*config.offset_range))
    # The layout covers both views: the reference frame plus any shift.
    reach = config.shift_range_px[1] + _SDF_PAD_PX
    world = (-reach, -reach, shape[0] + reach, shape[1] + reach)
    layout = _make_layout(rng, world, config)
    roughness = _make_roughness(rng, config.edge_roughness_px)

    reference_origin = (0.0, 0.0)
    reference_sdf = _render_sdf(layout.ops, shape, reference_origin)
    reference_clean = _intensity(
        reference_sdf + _roughness_field(roughness, shape, reference_origin), levels, config
    )

    # Inspected pixel (y, x) shows world point (y - dy, x - dx).
    inspected_origin = (-shift[0], -shift[1])
    inspected_sdf = _render_sdf(layout.ops, shape, inspected_origin)
    inspected_roughness = _roughness_field(roughness, shape, inspected_origin)
    inspected_clean = _intensity(inspected_sdf + inspected_roughness, levels, config)
    scene = _Scene(layout, shape, shift, inspected_sdf, inspected_roughness, inspected_clean, levels)
    planted = _plant_defects(np.random.default_rng(defect_seq), scene, config)

    observed_clean = np.clip(gain * inspected_clean + offset, 0.0, 1.0)
    observed = observed_clean.copy()
    defect_mask = np.zeros(shape, dtype=bool)
    defects = []
    for item in planted:
        # Measure each defect after gain and clipping, because a spot on a
        # saturated rim changes fewer pixels than it was drawn on.
        change = np.clip(gain * (inspected_clean + item.diff) + offset, 0.0, 1.0) - observed_clean
        magnitude = np.abs(change)
        if magnitude.max() < _MIN_VISIBLE_CHANGE:
            continue
        mask = magnitude >= config.mask_fraction * magnitude.max()
        # Defects are planted at least 6 px apart, so their changes barely
        # overlap and can be summed.
        observed += change
        defect_mask |= mask
        defects.append(_describe(item, mask, change))

    return SyntheticPair(
        reference=_acquire(reference_clean, np.random.default_rng(reference_seq), config),
        inspected=_acquire(np.clip(observed, 0.0, 1.0), np.random.default_rng(inspected_seq), config),
        defect_mask=defect_mask,
        defects=defects,
        shift=shift,
        gain=gain,
        offset=offset,
    )


def pair_seed(seed: int, index: int) -> int:
    """Derive the seed of pair `index` of a dataset generated with `seed`.

    `make_pair(pair_seed(seed, index), config)` reproduces that pair.

    Args:
      seed: Non-negative int, the dataset seed.
      index: Non-negative int, the pair's position in the dataset.

    Returns:
      A non-negative int below 2**32.

    Raises:
      TypeError: If `seed` or `index` is not an int.
      ValueError: If either is negative.
    """
    seed = _validate_seed(seed)
    index = _validate_seed(index)
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _to_uint8(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _is_generated_file(filename: str) -> bool:
    suffixes = ("_reference_image.tif", "_inspected_image.tif", "_mask.png")
    return filename == _INDEX_NAME or filename.endswith(suffixes)


def _prepare_output_dir(output_dir: str | os.PathLike, overwrite: bool) -> str:
    path = os.fspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(
            f"Output path {path!r} exists and is not a directory: choose another output_dir."
        )
    if os.path.isdir(path) and os.listdir(path):
        if not overwrite:
            raise FileExistsError(
                f"Output directory {path!r} is not empty: pass overwrite=True "
                "(--overwrite in experiments.make_synthetic) to replace its dataset, "
                "or choose another output_dir."
            )
        # Remove only files this module writes, so that a smaller dataset
        # leaves no stale pairs behind and unrelated files survive.
        for filename in os.listdir(path):
            if _is_generated_file(filename) and os.path.isfile(os.path.join(path, filename)):
                os.remove(os.path.join(path, filename))
    os.makedirs(path, exist_ok=True)
    return path


def _config_as_json(config: SynthConfig) -> dict[str, Any]:
    """Return the config as JSON types, tuples as lists, as json.load returns them."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in dataclasses.asdict(config).items()
    }


def _case_entry(name: str, pair: SyntheticPair, seed: int) -> dict[str, Any]:
    reference_name, inspected_name = (template.format(name=name) for template in _TIFF_NAMES)
    return {
        "reference": reference_name,
        "inspected": inspected_name,
        # Points are rounded to whole pixels as in the real annotations.
        "defects": [{"x": int(round(d["x"])), "y": int(round(d["y"]))} for d in pair.defects],
        "mask": _MASK_NAME.format(name=name),
        "shift": [round(pair.shift[0], 4), round(pair.shift[1], 4)],
        "kinds": [d["kind"] for d in pair.defects],
        "contrast": [round(d["contrast"], 4) for d in pair.defects],
        "size_px": [d["size_px"] for d in pair.defects],
        "seed": seed,
    }


def write_dataset(
    output_dir: str | os.PathLike,
    num_pairs: int,
    seed: int,
    config: SynthConfig = SynthConfig(),
    *,
    overwrite: bool = False,
    name_prefix: str = "synth",
    on_pair_written: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write `num_pairs` synthetic pairs in the layout of the real wafer data.

    For each case `<name>` (`name_prefix` plus a zero-padded index) it writes
    `<name>_reference_image.tif` and `<name>_inspected_image.tif` (8-bit
    grayscale TIFF) and `<name>_mask.png` (0 or 255, in inspected-image
    coordinates), then one `defects.json` for all cases. Each case entry has
    "reference", "inspected" and "defects" (a list of {"x", "y"} integer
    pixels, x the column and y the row in the inspected image) as in the real
    data, plus "mask", "shift" ([dy, dx] px, with
    inspected(y, x) ≈ reference(y - dy, x - dx)), "kinds", "contrast",
    "size_px" (one value per defect, in the order of "defects") and "seed"
    (for `make_pair`).

    Args:
      output_dir: Directory to create or fill.
      num_pairs: Number of pairs, >= 1.
      seed: Non-negative int. Pair i uses `pair_seed(seed, i)`.
      config: Generator settings.
      overwrite: Replace an existing dataset in a non-empty `output_dir`.
        Only files with the names above are removed first, and other files
        stay.
      name_prefix: Prefix of each case name, made of letters, digits, "-"
        and "_".
      on_pair_written: Called with the case name after each pair is written,
        e.g. to advance a progress bar.

    Returns:
      The dictionary written to `defects.json`.

    Raises:
      FileExistsError: If `output_dir` is not empty and `overwrite` is False,
        or if it is an existing file.
      TypeError: If `num_pairs` or `seed` is not an int.
      ValueError: If `num_pairs` < 1, `seed` < 0 or `name_prefix` contains
        other characters.
    """
    if isinstance(num_pairs, bool) or not isinstance(num_pairs, (int, np.integer)):
        raise TypeError(f"num_pairs must be an int, got {type(num_pairs).__name__} {num_pairs!r}.")
    if num_pairs < 1:
        raise ValueError(f"num_pairs={num_pairs} is invalid: use at least 1.")
    seed = _validate_seed(seed)
    if not name_prefix or not all(ch.isalnum() or ch in "-_" for ch in name_prefix):
        raise ValueError(
            f"name_prefix={name_prefix!r} is invalid: use letters, digits, '-' and '_' only."
        )
    path = _prepare_output_dir(output_dir, overwrite)

    digits = max(4, len(str(num_pairs - 1)))
    cases: dict[str, Any] = {}
    for index in range(num_pairs):
        name = f"{name_prefix}{index:0{digits}d}"
        this_seed = pair_seed(seed, index)
        pair = make_pair(this_seed, config)
        entry = _case_entry(name, pair, this_seed)
        tifffile.imwrite(os.path.join(path, entry["reference"]), _to_uint8(pair.reference))
        tifffile.imwrite(os.path.join(path, entry["inspected"]), _to_uint8(pair.inspected))
        iio.imwrite(os.path.join(path, entry["mask"]), pair.defect_mask.astype(np.uint8) * 255)
        cases[name] = entry
        if on_pair_written is not None:
            on_pair_written(name)

    index_data = {
        "coordinate_system": _COORDINATE_SYSTEM,
        "shift_convention": "shift = [dy, dx] px; inspected(y, x) = reference(y - dy, x - dx)",
        "generator": {"module": __name__, "seed": seed, "config": _config_as_json(config)},
        "cases": cases,
    }
    with open(os.path.join(path, _INDEX_NAME), "w", encoding="utf-8") as handle:
        json.dump(index_data, handle, indent=2)
        handle.write("\n")
    return index_data
