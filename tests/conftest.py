"""Shared fixtures: the real data and weights beside the repository, and a synthetic pattern."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from tsjax import teacher

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


def require_shared(relative: str) -> Path:
    """Return ``../shared/<relative>``, failing (never skipping) when it is missing."""
    path = SHARED_DIR / relative
    if not path.exists():
        pytest.fail(
            f"required shared file not found: {path}. The tests read the real wafer pairs and "
            "teacher weights from ../shared beside the repository; restore that folder.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The ``../shared`` folder, after checking the files the tests read."""
    require_shared("weights/resnet18_imagenet_bnfolded")
    require_shared("data/wafer/defects.json")
    return SHARED_DIR


@pytest.fixture(scope="session")
def teacher_variables(shared_dir):
    """ImageNet ResNet-18 teacher variables up to layer3, loaded once per session."""
    return teacher.load_pretrained(shared_dir / "weights" / "resnet18_imagenet_bnfolded")


@pytest.fixture(scope="session")
def wafer_cases(shared_dir) -> dict:
    """The ``cases`` table of ``defects.json``: image names and defect centres per case."""
    return json.loads((shared_dir / "data" / "wafer" / "defects.json").read_text())["cases"]


def _box_coverage(count: int, start: float, stop: float) -> np.ndarray:
    """Return the length of ``[start, stop)`` inside each pixel ``[i - 0.5, i + 0.5)``."""
    centres = np.arange(count)
    return np.clip(np.minimum(centres + 0.5, stop) - np.maximum(centres - 0.5, start), 0.0, 1.0)


def render_manhattan(shape: tuple[int, int], *, seed: int = 0, shift: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """Render a random layout of thin horizontal and vertical lines as an SEM-like image.

    Each line is a rectangle box-filtered exactly onto the pixel grid, so
    ``shift = (dy, dx)`` moves the whole layout by a sub-pixel amount without
    interpolation: ``render(shift=s)(y, x) = render()(y - dy, x - dx)``. Line
    edges are brightened with a Gaussian gradient magnitude, as secondary
    electrons brighten edges in SEM images.

    Returns:
      ``[H, W]`` float64 in [0, 1].
    """
    height, width = shape
    rng = np.random.default_rng(seed)
    filled = np.zeros(shape)
    for _ in range(height * width // 600):
        top, left = rng.uniform(-10.0, height), rng.uniform(-10.0, width)
        thickness, length = rng.uniform(3.0, 7.0), rng.uniform(15.0, 60.0)
        bottom, right = (top + thickness, left + length) if rng.random() < 0.5 else (top + length, left + thickness)
        rows = _box_coverage(height, top + shift[0], bottom + shift[0])
        cols = _box_coverage(width, left + shift[1], right + shift[1])
        filled = np.maximum(filled, np.outer(rows, cols))
    edges = ndimage.gaussian_gradient_magnitude(filled, 0.8)
    return np.clip(0.15 + 0.3 * filled + 0.8 * edges, 0.0, 1.0)


@pytest.fixture
def manhattan():
    """The ``render_manhattan`` pattern generator."""
    return render_manhattan
