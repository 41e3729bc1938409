"""Tests for resolving, downloading and caching the teacher's weights.

No test reaches the network: an autouse fixture replaces ``hub._urlopen``
with a stub that fails the test if it is called, and tests that exercise the
download install their own stub.
"""

from __future__ import annotations

import hashlib
import io
import urllib.error

import jax
import pytest

from checkpoint_helpers import random_torchvision_state_dict, write_torch_zip
from tsjax import hub
from tsjax.convert import convert
from tsjax.teacher import random_variables, variables_sha256


class _FakeResponse:
    """Stand-in for the object urllib.request.urlopen returns."""

    def __init__(self, payload: bytes, fail_after_bytes: int | None = None):
        self._stream = io.BytesIO(payload)
        self._fail_after_bytes = fail_after_bytes
        self.headers = {"Content-Length": str(len(payload))}

    def read(self, size: int) -> bytes:
        if self._fail_after_bytes is not None and self._stream.tell() >= self._fail_after_bytes:
            raise TimeoutError("The read operation timed out")
        return self._stream.read(size)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False


def _unexpected_network_call(url, timeout):
    raise AssertionError(f"test tried to open {url}")


@pytest.fixture(autouse=True)
def isolated_hub(monkeypatch, tmp_path):
    monkeypatch.setattr(hub, "_urlopen", _unexpected_network_call)
    monkeypatch.setattr(hub, "PRETRAINED_DIR", tmp_path / "pretrained")
    monkeypatch.delenv(hub.WEIGHTS_ENV_VAR, raising=False)
    monkeypatch.delenv(hub.CACHE_DIR_ENV_VAR, raising=False)


@pytest.fixture
def checkpoint(tmp_path):
    """A torchvision-layout .pth, its bytes and the SHA-256 of its converted variables."""
    path = write_torch_zip(tmp_path / "source.pth", random_torchvision_state_dict(seed=20))
    return path, path.read_bytes(), variables_sha256(convert(path))


def _serve(monkeypatch, payload: bytes, fail_after_bytes: int | None = None) -> list:
    calls = []

    def fake_urlopen(url, timeout):
        calls.append((url, timeout))
        return _FakeResponse(payload, fail_after_bytes)

    monkeypatch.setattr(hub, "_urlopen", fake_urlopen)
    return calls


def test_random_needs_explicit_spec_and_warns():
    with pytest.warns(UserWarning, match="random teacher weights"):
        variables, info = hub.resolve_teacher("random")
    # Expected: the documented seed through the teacher's own initialiser.
    expected = variables_sha256(random_variables(jax.random.key(hub.RANDOM_TEACHER_SEED)))
    assert info == {"source": "random", "sha256": expected, "kind": "random"}
    assert variables_sha256(variables) == expected


def test_explicit_path_is_loaded_as_local(checkpoint):
    path, _, digest = checkpoint
    _, info = hub.resolve_teacher(str(path))
    assert info == {"source": str(path.resolve()), "sha256": digest, "kind": "local"}


def test_environment_variable_names_the_weights(monkeypatch, checkpoint, tmp_path):
    path, _, digest = checkpoint
    converted = tmp_path / "converted.npz"
    convert(path, converted)
    monkeypatch.setenv(hub.WEIGHTS_ENV_VAR, str(converted))
    _, info = hub.resolve_teacher()
    assert info == {"source": str(converted), "sha256": digest, "kind": "local"}


def test_default_file_in_pretrained_is_used(checkpoint):
    path, _, digest = checkpoint
    default = hub.PRETRAINED_DIR / hub.CONVERTED_FILENAME
    convert(path, default)
    _, info = hub.resolve_teacher()
    assert info == {"source": str(default), "sha256": digest, "kind": "cache"}


def test_cache_dir_variable_is_searched(monkeypatch, checkpoint, tmp_path):
    path, _, digest = checkpoint
    cached = tmp_path / "cache" / hub.CONVERTED_FILENAME
    convert(path, cached)
    monkeypatch.setenv(hub.CACHE_DIR_ENV_VAR, str(cached.parent))
    _, info = hub.resolve_teacher()
    assert info == {"source": str(cached), "sha256": digest, "kind": "cache"}


def test_offline_fails_fast_naming_url_and_options(monkeypatch):
    calls = []

    def no_network(url, timeout):
        calls.append((url, timeout))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(hub, "_urlopen", no_network)
    with pytest.raises(hub.WeightsDownloadError) as error:
        hub.resolve_teacher()

    message = str(error.value)
    assert hub.TORCHVISION_RESNET18_URL in message
    assert "Temporary failure in name resolution" in message
    assert "--teacher_weights=/path/to/resnet18-f37072fd.pth" in message
    assert "python -m tsjax.convert /path/to/resnet18-f37072fd.pth" in message
    assert f"--teacher_weights=/path/to/{hub.CONVERTED_FILENAME}" in message
    assert hub.WEIGHTS_ENV_VAR in message
    assert calls == [(hub.TORCHVISION_RESNET18_URL, hub.DOWNLOAD_TIMEOUT_S)]
    assert not list(hub.PRETRAINED_DIR.iterdir())


@pytest.mark.parametrize("use_cache_dir", [False, True])
def test_download_verifies_converts_and_caches(monkeypatch, checkpoint, tmp_path, use_cache_dir):
    _, payload, digest = checkpoint
    file_digest = hashlib.sha256(payload).hexdigest()
    url = f"https://example.invalid/models/resnet18-{file_digest[:8]}.pth"
    monkeypatch.setattr(hub, "TORCHVISION_RESNET18_URL", url)
    target_dir = tmp_path / "cache" if use_cache_dir else hub.PRETRAINED_DIR
    if use_cache_dir:
        monkeypatch.setenv(hub.CACHE_DIR_ENV_VAR, str(target_dir))
    calls = _serve(monkeypatch, payload)

    _, info = hub.resolve_teacher(progress=False)
    target = target_dir / hub.CONVERTED_FILENAME
    assert info == {"source": str(target), "sha256": digest, "kind": "download"}
    assert calls == [(url, hub.DOWNLOAD_TIMEOUT_S)]
    assert [p.name for p in target_dir.iterdir()] == [hub.CONVERTED_FILENAME]

    monkeypatch.setattr(hub, "_urlopen", _unexpected_network_call)
    _, again = hub.resolve_teacher()
    assert again == {"source": str(target), "sha256": digest, "kind": "cache"}


def test_download_with_wrong_checksum_is_deleted(monkeypatch, checkpoint):
    _, payload, _ = checkpoint
    monkeypatch.setattr(hub, "TORCHVISION_RESNET18_URL", "https://example.invalid/resnet18-00000000.pth")
    _serve(monkeypatch, payload)
    with pytest.raises(ValueError, match="does not start with 00000000"):
        hub.resolve_teacher(progress=False)
    assert not list(hub.PRETRAINED_DIR.iterdir())


def test_interrupted_download_leaves_nothing(monkeypatch, checkpoint, tmp_path):
    _, payload, _ = checkpoint
    _serve(monkeypatch, payload, fail_after_bytes=2**20)
    dest = tmp_path / "resnet18-f37072fd.pth"
    with pytest.raises(hub.WeightsDownloadError, match="timed out"):
        hub.download(hub.TORCHVISION_RESNET18_URL, dest, progress=False)
    assert not dest.exists()


def test_download_needs_checksum_in_file_name(tmp_path):
    with pytest.raises(ValueError, match="sha256 prefix"):
        hub.download("https://example.invalid/resnet18.pth", tmp_path / "x.pth")
