"""Tests for tsjax.io: every supported format and every rejected input."""

import re

import imageio.v3 as iio
import numpy as np
import pytest
import tifffile

from tsjax import io

SHAPE = (64, 80)

# ITU-R BT.601 luma weights, which to_grayscale_float uses for RGB and RGBA.
LUMA = np.array([0.299, 0.587, 0.114])


def _ramp(dtype, high):
    """Return a ``SHAPE`` image whose values step through ``[0, high]``."""
    values = np.linspace(0, high, SHAPE[0] * SHAPE[1]).reshape(SHAPE)
    return np.round(values).astype(dtype)


def _colour(channels):
    """Return a random ``[64, 80, channels]`` uint8 image."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, SHAPE + (channels,), dtype=np.uint8)


def _path_pattern(path):
    return re.escape(str(path))


def test_load_tiff_8bit(tmp_path):
    path = tmp_path / "gray8.tif"
    array = _ramp(np.uint8, 255)
    tifffile.imwrite(path, array)

    image = io.load_image(path)

    assert image.dtype == np.float32
    assert image.shape == SHAPE
    # Expected values: the uint8 ramp divided by 255 in float64.
    np.testing.assert_allclose(image, array / 255.0, rtol=0, atol=1e-7)


def test_load_tiff_16bit(tmp_path):
    path = tmp_path / "gray16.tif"
    array = _ramp(np.uint16, 65535)
    tifffile.imwrite(path, array)

    image = io.load_image(path)

    assert image.dtype == np.float32
    # Expected values: the uint16 ramp divided by 65535, not by 255.
    np.testing.assert_allclose(image, array / 65535.0, rtol=0, atol=1e-7)
    assert image.max() == 1.0


def test_load_png_8bit(tmp_path):
    path = tmp_path / "gray8.png"
    array = _ramp(np.uint8, 255)
    iio.imwrite(path, array)

    image = io.load_image(path)

    assert image.dtype == np.float32
    np.testing.assert_allclose(image, array / 255.0, rtol=0, atol=1e-7)


def test_load_png_16bit(tmp_path):
    path = tmp_path / "gray16.png"
    array = _ramp(np.uint16, 65535)
    iio.imwrite(path, array)

    image = io.load_image(path)

    np.testing.assert_allclose(image, array / 65535.0, rtol=0, atol=1e-7)


def test_load_jpeg_gray(tmp_path):
    path = tmp_path / "gray.jpg"
    array = _ramp(np.uint8, 255)
    iio.imwrite(path, array)

    image = io.load_image(path)

    assert image.dtype == np.float32
    assert image.shape == SHAPE
    assert image.min() >= 0.0
    assert image.max() <= 1.0
    # JPEG is lossy. On this smooth ramp the decoded grey levels stay within
    # 8/255 of the originals (measured error: at most 2 levels).
    np.testing.assert_allclose(image, array / 255.0, rtol=0, atol=8 / 255)


@pytest.mark.parametrize("suffix", ["png", "tif"])
def test_load_rgb_as_luma(tmp_path, suffix):
    path = tmp_path / f"rgb.{suffix}"
    array = _colour(3)
    if suffix == "png":
        iio.imwrite(path, array)
    else:
        tifffile.imwrite(path, array, photometric="rgb")

    image = io.load_image(path)

    assert image.shape == SHAPE
    assert image.dtype == np.float32
    # Expected values: BT.601 luma of the channels scaled by 255, in float64.
    np.testing.assert_allclose(image, (array / 255.0) @ LUMA, rtol=0, atol=1e-6)


def test_load_rgba_ignores_alpha(tmp_path):
    path = tmp_path / "rgba.png"
    array = _colour(4)
    iio.imwrite(path, array)

    image = io.load_image(path)

    np.testing.assert_allclose(image, (array[..., :3] / 255.0) @ LUMA, rtol=0, atol=1e-6)


def test_load_rgb_16bit_tiff(tmp_path):
    path = tmp_path / "rgb16.tif"
    array = _colour(3).astype(np.uint16) * 257
    tifffile.imwrite(path, array, photometric="rgb")

    image = io.load_image(path)

    np.testing.assert_allclose(image, (array / 65535.0) @ LUMA, rtol=0, atol=1e-6)


def test_load_float_tiff_in_range(tmp_path):
    path = tmp_path / "float.tif"
    array = _ramp(np.float64, 1000) / 1000
    tifffile.imwrite(path, array.astype(np.float32))

    image = io.load_image(path)

    np.testing.assert_allclose(image, array, rtol=0, atol=1e-7)


def test_load_missing_file(tmp_path):
    path = tmp_path / "absent.tif"

    with pytest.raises(FileNotFoundError, match=f"not found: '{_path_pattern(path)}'. Check the path"):
        io.load_image(path)


@pytest.mark.parametrize("suffix", ["tif", "png", "jpg"])
def test_load_unreadable_file(tmp_path, suffix):
    path = tmp_path / f"corrupt.{suffix}"
    path.write_bytes(b"this is not an image\n" * 10)

    with pytest.raises(io.ImageError, match=f"{_path_pattern(path)}: cannot read the file as an image") as caught:
        io.load_image(path)

    assert "use an 8- or 16-bit TIFF, a PNG or a JPEG" in str(caught.value)
    # Plugin install hints would mislead: the file is not an image at all.
    assert "pip install" not in str(caught.value)
    assert "backend" not in str(caught.value)


@pytest.mark.parametrize("shape", [(63, 100), (100, 63)])
def test_load_rejects_short_side(tmp_path, shape):
    path = tmp_path / "small.tif"
    tifffile.imwrite(path, np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))

    pattern = f"{_path_pattern(path)}: image is {shape[0]}x{shape[1]} px; both sides must be at least 64 px"
    with pytest.raises(io.ImageError, match=pattern) as caught:
        io.load_image(path)

    assert "Use a larger field of view" in str(caught.value)


def test_load_accepts_64px_side(tmp_path):
    path = tmp_path / "edge.tif"
    tifffile.imwrite(path, _ramp(np.uint8, 255)[:64, :64])

    image = io.load_image(path)

    assert image.shape == (64, 64)


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_load_rejects_non_finite(tmp_path, bad_value):
    path = tmp_path / "bad.tif"
    array = _ramp(np.float64, 1000).astype(np.float32) / 1000
    array[3, 4] = bad_value
    array[10, 20] = bad_value
    tifffile.imwrite(path, array)

    with pytest.raises(io.ImageError, match=f"{_path_pattern(path)}: contains 2 NaN or inf value") as caught:
        io.load_image(path)

    assert "replace them" in str(caught.value)


def test_validate_rejects_non_finite():
    image = np.full(SHAPE, 0.5, np.float32)
    image[0, 0] = np.nan

    with pytest.raises(io.ImageError, match="inspected: contains 1 NaN or inf value.*replace them"):
        io.validate_image(image, "inspected")


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int64])
def test_validate_rejects_integer_grey_levels(dtype):
    # 0 to 255 read as they are would be far outside the teacher's input range.
    image = _ramp(dtype, 255)

    with pytest.raises(io.ImageError, match=f"reference: expected float grey levels in \\[0, 1\\]; got dtype {np.dtype(dtype)}"):
        io.validate_image(image, "reference")


@pytest.mark.parametrize("low, high", [(0.0, 255.0), (-0.25, 0.5)])
def test_validate_rejects_floats_outside_unit_range(low, high):
    image = np.linspace(low, high, SHAPE[0] * SHAPE[1], dtype=np.float32).reshape(SHAPE)

    with pytest.raises(io.ImageError, match=r"inspected: grey levels must lie in \[0, 1\]; got \[.*Divide 8-bit values by 255"):
        io.validate_image(image, "inspected")


def test_load_rejects_constant(tmp_path):
    path = tmp_path / "flat.png"
    iio.imwrite(path, np.full(SHAPE, 128, np.uint8))

    pattern = f"{_path_pattern(path)}: image is constant \\(every pixel is 0.502\\)"
    with pytest.raises(io.ImageError, match=pattern) as caught:
        io.load_image(path)

    assert "Check the acquisition or the file" in str(caught.value)


def test_load_warns_nearly_blank(tmp_path):
    path = tmp_path / "faint.png"
    array = np.full(SHAPE, 100, np.uint8)
    array[:, :40] = 102
    iio.imwrite(path, array)

    with pytest.warns(UserWarning, match=f"{_path_pattern(path)}: grey levels span only 0.007843"):
        io.load_image(path)


def test_load_rejects_float_out_of_range(tmp_path):
    path = tmp_path / "float.tif"
    array = _ramp(np.float32, 300)
    tifffile.imwrite(path, array)

    pattern = f"{_path_pattern(path)}: float image values must lie in \\[0, 1\\]; got \\[0, 300\\]"
    with pytest.raises(io.ImageError, match=pattern) as caught:
        io.load_image(path)

    assert "Rescale the image" in str(caught.value)


def test_load_rejects_signed_integers(tmp_path):
    path = tmp_path / "signed.tif"
    tifffile.imwrite(path, _ramp(np.int16, 1000))

    with pytest.raises(io.ImageError, match=f"{_path_pattern(path)}: signed integer images \\(int16\\)") as caught:
        io.load_image(path)

    assert "unsigned 8- or 16-bit" in str(caught.value)


def test_load_rejects_tiff_stack(tmp_path):
    path = tmp_path / "stack.tif"
    tifffile.imwrite(path, np.zeros((5,) + SHAPE, np.uint8))

    pattern = f"{_path_pattern(path)}: expected a 2-D grayscale or an RGB/RGBA image; got shape \\(5, 64, 80\\)"
    with pytest.raises(io.ImageError, match=pattern) as caught:
        io.load_image(path)

    assert "multi-page TIFF stacks are not supported" in str(caught.value)


def test_grayscale_rejects_complex_dtype():
    array = np.zeros(SHAPE, np.complex64)

    with pytest.raises(io.ImageError, match="frame: unsupported dtype complex64; use uint8, uint16 or float"):
        io.to_grayscale_float(array, "frame")


def test_grayscale_accepts_bool():
    array = np.zeros(SHAPE, bool)
    array[:, :10] = True

    image = io.to_grayscale_float(array)

    assert image.dtype == np.float32
    assert image.sum() == SHAPE[0] * 10


def test_grayscale_squeezes_one_channel():
    array = _ramp(np.uint8, 255)[..., None]

    image = io.to_grayscale_float(array)

    assert image.shape == SHAPE


def test_validate_rejects_3d_array():
    with pytest.raises(io.ImageError, match=r"reference: expected a 2-D image; got shape \(64, 80, 3\)"):
        io.validate_image(np.zeros(SHAPE + (3,), np.float32), "reference")


@pytest.mark.parametrize(
    "reference_shape, inspected_shape, side, ratio",
    [((100, 100), (250, 100), "heights", "2.50"), ((300, 90), (300, 200), "widths", "2.22")],
)
def test_pair_sizes_without_overlap(reference_shape, inspected_shape, side, ratio):
    pattern = f"the {side} differ by a factor {ratio} \\(more than 2.0\\), so no overlap is possible"
    with pytest.raises(io.ImageError, match=pattern) as caught:
        io.check_pair_sizes(reference_shape, inspected_shape)

    message = str(caught.value)
    assert f"reference is {reference_shape[0]}x{reference_shape[1]} px" in message
    assert f"inspected is {inspected_shape[0]}x{inspected_shape[1]} px" in message
    assert "Crop both images to the same field of view" in message


def test_pair_sizes_within_ratio():
    # The heights differ by exactly 2.0, which is allowed because only a larger ratio is rejected.
    io.check_pair_sizes((100, 120), (200, 121))
