"""Tests for tiled detection: the halo, the tile plan and equality with detect."""

import numpy as np
import pytest

from tsjax import batch, pipeline, tiling
from tsjax.config import DetectionConfig


def _noisy_pair(render, shape, seed, defect):
    """A reference and a shifted, noisier inspected image with a bright 3 x 3 px defect."""
    rng = np.random.default_rng(seed)
    reference = render(shape, seed=seed) + 0.02 * rng.normal(size=shape)
    inspected = render(shape, seed=seed, shift=(1.6, -2.35)) + 0.02 * rng.normal(size=shape)
    row, col = defect
    inspected[row - 1 : row + 2, col - 1 : col + 2] = 1.0
    return np.clip(reference, 0, 1).astype(np.float32), np.clip(inspected, 0, 1).astype(np.float32)


def test_halo_covers_receptive_field_patch_and_smoothing():
    # layer2: receptive field 99 px (radius 49) + 8 px * (3 // 2 + 1) + 12 px
    # of smoothing = 77, rounded up to 80.
    assert tiling.tile_halo(DetectionConfig()) == 80
    # layer1: 21 + 4 * 2 + 12 = 41, rounded up to 48.
    assert tiling.tile_halo(DetectionConfig(layers=("layer1",))) == 48
    # Denoising reads int(4 * 1.0 + 0.5) = 4 px more: 81, rounded up to 96.
    assert tiling.tile_halo(DetectionConfig(denoise_sigma=1.0)) == 96


def test_tile_interiors_cover_image_once():
    plan = tiling.plan_tiles((700, 530), DetectionConfig(), tile_size=256)
    coverage = np.zeros((700, 530), int)

    for index in range(plan.count):
        top, left, bottom, right = plan.interior(index)
        coverage[top:bottom, left:right] += 1

    assert plan.grid == (3, 3)
    np.testing.assert_array_equal(coverage, 1)


def test_small_image_gets_one_tile_of_its_own_size():
    plan = tiling.plan_tiles((200, 300), DetectionConfig(), tile_size=512)

    assert plan.grid == (1, 1)
    assert plan.tile_shape == (208, 304)


def test_tile_memory_depends_on_tile_size_only():
    config = DetectionConfig()
    small = tiling.plan_tiles((1024, 1024), config, tile_size=512)
    large = tiling.plan_tiles((8192, 8192), config, tile_size=512)

    # One 672 x 672 px tile: layer1 168^2 x 64 and layer2 84^2 x 128 float32
    # features for two images.
    expected = 2 * 4 * (168 * 168 * 64 + 84 * 84 * 128)
    assert tiling.tile_feature_bytes(small, config) == expected
    assert tiling.tile_feature_bytes(large, config) == expected
    assert large.count == 64 * small.count


def test_plan_rejects_tile_off_the_stride_grid():
    with pytest.raises(ValueError, match="multiple of 16"):
        tiling.plan_tiles((512, 512), DetectionConfig(), tile_size=250)


def test_tiled_rejects_other_students_without_states(teacher_variables):
    with pytest.raises(TypeError, match="states"):
        tiling.detect_tiled(np.zeros((64, 64)), np.zeros((64, 64)), teacher_variables, student=object())


def test_tiled_equals_untiled_and_reuses_compilation(manhattan, teacher_variables):
    config = DetectionConfig()
    # 480 x 480 px, the shape of the real case3 pair, whose untiled
    # compilation the pipeline tests share.
    reference, inspected = _noisy_pair(manhattan, (480, 480), seed=1, defect=(300, 140))

    expected = pipeline.detect(reference, inspected, teacher_variables, config)
    tiled = tiling.detect_tiled(reference, inspected, teacher_variables, config, tile_size=256)

    np.testing.assert_array_equal(tiled.valid, expected.valid)
    # Four 256 px tiles against one pass, including the image border. The
    # features match exactly, and float32 ridge moments merged over tiles
    # moved the map by less than 1e-5 when measured.
    np.testing.assert_allclose(tiled.defect_map, expected.defect_map, atol=1e-4)
    assert [blob["bbox"] for blob in tiled.blobs] == [blob["bbox"] for blob in expected.blobs]
    assert any(abs(blob["y"] - 300) < 4 and abs(blob["x"] - 140) < 4 for blob in tiled.blobs)

    # Another image size with the same tiles runs the same compiled stages.
    counts = batch.trace_counts()
    reference, inspected = _noisy_pair(manhattan, (384, 640), seed=2, defect=(200, 500))
    other = tiling.detect_tiled(reference, inspected, teacher_variables, config, tile_size=256)

    assert batch.trace_counts() == counts
    assert any(abs(blob["y"] - 200) < 4 and abs(blob["x"] - 500) < 4 for blob in other.blobs)
