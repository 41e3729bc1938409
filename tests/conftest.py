"""Shared fixtures: the real data and weights that lie beside the repository."""

from pathlib import Path

import pytest

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
