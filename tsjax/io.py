"""Reading and validating SEM images.

Every image enters tsjax through ``load_image``: grayscale float32 in [0, 1],
checked for the defects that would otherwise surface as a cryptic failure
deep inside alignment or the teacher.
"""

from __future__ import annotations

import os
import warnings

import imageio.v3 as iio
import numpy as np
import tifffile

__all__ = [
    "MIN_SIDE",
    "ImageError",
    "load_image",
    "to_grayscale_float",
    "validate_image",
    "check_pair_sizes",
]

# The teacher downsamples by 16 at layer3 and the student needs a few feature
# pixels around each pixel, so a side below 64 px leaves nothing to compare.
MIN_SIDE = 64

# Pairs whose sides differ by more than this fraction cannot overlap enough
# for the reference to explain the inspected image.
MAX_SIZE_RATIO = 2.0


class ImageError(ValueError):
    """An input image that tsjax cannot use, with the reason and the fix."""


def to_grayscale_float(array: np.ndarray, name: str = "image") -> np.ndarray:
    """Convert an image array to grayscale float32 in [0, 1].

    Integer images are scaled by their dtype's range (8-bit by 255, 16-bit by
    65535). Float images are taken as they are and must already lie in [0, 1].
    RGB and RGBA are converted with ITU-R BT.601 luma weights; alpha is
    ignored.

    Args:
      array: ``[H, W]``, ``[H, W, 3]`` or ``[H, W, 4]`` image.
      name: What to call the image in error messages (usually its path).

    Returns:
      ``[H, W]`` float32 in [0, 1].

    Raises:
      ImageError: for an unsupported shape or dtype, or floats outside [0, 1].
    """
    array = np.asarray(array)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        red, green, blue = (to_grayscale_float(array[..., c], name) for c in range(3))
        return (0.299 * red + 0.587 * green + 0.114 * blue).astype(np.float32)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2:
        raise ImageError(
            f"{name}: expected a 2-D grayscale or an RGB/RGBA image; got shape {array.shape}. "
            "Save one frame as a single image (multi-page TIFF stacks are not supported)."
        )
    if array.dtype == np.bool_:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(array.dtype)
        if info.min < 0:
            raise ImageError(
                f"{name}: signed integer images ({array.dtype}) are not supported; "
                "save the image as unsigned 8- or 16-bit."
            )
        return (array.astype(np.float64) / info.max).astype(np.float32)
    if np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float32)
        finite = np.isfinite(array)
        if not finite.all():
            raise ImageError(
                f"{name}: contains {int((~finite).sum())} NaN or inf value(s); "
                "replace them (for example by inpainting) before detection."
            )
        low, high = float(array.min()), float(array.max())
        if low < 0.0 or high > 1.0:
            raise ImageError(
                f"{name}: float image values must lie in [0, 1]; got [{low:.4g}, {high:.4g}]. "
                "Rescale the image or save it as 8- or 16-bit integers."
            )
        return array
    raise ImageError(f"{name}: unsupported dtype {array.dtype}; use uint8, uint16 or float in [0, 1].")


def validate_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Check that a grayscale float image can go through the pipeline.

    Args:
      image: ``[H, W]`` float in [0, 1].
      name: What to call the image in error messages.

    Returns:
      The same image.

    Raises:
      ImageError: if the image is not a float array, a side is shorter than
        ``MIN_SIDE``, a value is NaN, inf or outside [0, 1], or the image is
        constant.
    """
    if image.ndim != 2:
        raise ImageError(f"{name}: expected a 2-D image; got shape {image.shape}.")
    if not np.issubdtype(image.dtype, np.floating):
        # Integer grey levels taken as they are would be 0 to 255 or 65535,
        # far from the [0, 1] range that the teacher's normalisation expects.
        raise ImageError(
            f"{name}: expected float grey levels in [0, 1]; got dtype {image.dtype}. "
            "Convert with tsjax.io.to_grayscale_float (it scales uint8 and uint16 by their range) "
            "or read the file with tsjax.load_image."
        )
    height, width = image.shape
    if min(height, width) < MIN_SIDE:
        raise ImageError(
            f"{name}: image is {height}x{width} px; both sides must be at least {MIN_SIDE} px "
            "because the teacher downsamples by 16. Use a larger field of view."
        )
    finite = np.isfinite(image)
    if not finite.all():
        raise ImageError(
            f"{name}: contains {int((~finite).sum())} NaN or inf value(s); "
            "replace them before detection."
        )
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        raise ImageError(
            f"{name}: grey levels must lie in [0, 1]; got [{low:.4g}, {high:.4g}]. "
            "Divide 8-bit values by 255 and 16-bit values by 65535, or use tsjax.io.to_grayscale_float."
        )
    spread = high - low
    if spread == 0.0:
        raise ImageError(
            f"{name}: image is constant (every pixel is {float(image.flat[0]):.4g}); "
            "it carries no pattern to compare. Check the acquisition or the file."
        )
    if spread < 4.0 / 255.0:
        warnings.warn(
            f"{name}: grey levels span only {spread:.4g} of the full range; "
            "the image may be nearly blank.",
            stacklevel=2,
        )
    return image


def load_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as validated grayscale float32 in [0, 1].

    TIFF (8- and 16-bit) is read with tifffile; PNG and JPEG with imageio.

    Args:
      path: Path to a TIFF, PNG or JPEG file.

    Returns:
      ``[H, W]`` float32 in [0, 1].

    Raises:
      FileNotFoundError: if the file does not exist.
      ImageError: if the file cannot be decoded or fails ``validate_image``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path!r}. Check the path.")
    try:
        if path.lower().endswith((".tif", ".tiff")):
            array = tifffile.imread(path)
        else:
            array = iio.imread(path)
    except Exception as error:  # Decoders raise many unrelated types.
        # For a file that no decoder recognises, imageio lists plugins to
        # install, which misleads when the file is simply not an image. So
        # that case gets no detail, and other errors only their first line.
        reason = str(error).splitlines()[0] if str(error) else ""
        detail = "" if "Could not find a backend" in reason else f" ({type(error).__name__}: {reason})"
        raise ImageError(
            f"{path}: cannot read the file as an image{detail}. "
            "Check that the file is an image, and use an 8- or 16-bit TIFF, a PNG or a JPEG."
        ) from error
    return validate_image(to_grayscale_float(array, path), path)


def check_pair_sizes(reference_shape: tuple[int, int], inspected_shape: tuple[int, int]) -> None:
    """Reject a pair whose sizes differ so much that no useful overlap exists.

    Raises:
      ImageError: if either side differs by more than a factor ``MAX_SIZE_RATIO``.
    """
    for axis, (ref_side, insp_side) in enumerate(zip(reference_shape, inspected_shape)):
        ratio = max(ref_side, insp_side) / min(ref_side, insp_side)
        if ratio > MAX_SIZE_RATIO:
            side = "height" if axis == 0 else "width"
            raise ImageError(
                f"reference is {reference_shape[0]}x{reference_shape[1]} px but inspected is "
                f"{inspected_shape[0]}x{inspected_shape[1]} px: the {side}s differ by a factor "
                f"{ratio:.2f} (more than {MAX_SIZE_RATIO}), so no overlap is possible. "
                "Crop both images to the same field of view."
            )
