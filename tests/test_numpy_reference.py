"""The benchmark's NumPy/SciPy pipeline must compute what detect computes."""

import numpy as np

from experiments import numpy_reference
from tsjax import pipeline


def test_numpy_reference_matches_detect(manhattan, teacher_variables):
    rng = np.random.default_rng(0)
    # detect's compilation for this shape is shared with the pipeline tests.
    reference = np.clip(manhattan((128, 160)) + 0.02 * rng.normal(size=(128, 160)), 0, 1).astype(np.float32)
    inspected = np.clip(manhattan((128, 160), shift=(3.4, -2.2)) + 0.02 * rng.normal(size=(128, 160)), 0, 1)
    inspected = inspected.astype(np.float32)
    inspected[60:65, 70:75] = 1.0

    expected = pipeline.detect(reference, inspected, teacher_variables)
    result = numpy_reference.detect_numpy(reference, inspected, teacher_variables)

    np.testing.assert_array_equal(result["valid"], expected.valid)
    # float32 convolutions by im2col against XLA's, and two float32 ridge
    # solves: the maps differed by 5e-6 on the real pairs.
    np.testing.assert_allclose(result["defect_map"], expected.defect_map, atol=1e-4)
    assert [blob["bbox"] for blob in result["blobs"]] == [blob["bbox"] for blob in expected.blobs]
