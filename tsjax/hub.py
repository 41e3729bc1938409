"""Find, download and cache the teacher's weights.

``resolve_teacher`` turns the ``--teacher_weights`` setting into variables
and a record of where they came from. In order, it uses:

1. an explicit path (any format ``tsjax.teacher.load_pretrained`` reads), or
   ``'random'`` for random weights (tests and ablations only);
2. the same from the ``TSJAX_TEACHER_WEIGHTS`` environment variable;
3. the converted file ``resnet18_imagenet.npz`` in ``pretrained/`` at the
   repository root, then in ``$TSJAX_CACHE_DIR``;
4. torchvision's ResNet-18 IMAGENET1K_V1 checkpoint, downloaded, checked
   against the SHA-256 prefix in its file name, converted and cached as in 3.

Random weights are never a fallback: only an explicit ``'random'`` gives them.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Callable

import jax
from tqdm import tqdm

from tsjax.convert import convert
from tsjax.teacher import LAYERS, load_pretrained, random_variables, variables_sha256

__all__ = [
    "TORCHVISION_RESNET18_URL",
    "WEIGHTS_ENV_VAR",
    "CACHE_DIR_ENV_VAR",
    "CONVERTED_FILENAME",
    "PRETRAINED_DIR",
    "DOWNLOAD_TIMEOUT_S",
    "RANDOM_TEACHER_SEED",
    "WeightsDownloadError",
    "cache_dir",
    "download",
    "resolve_teacher",
]

# torchvision's ResNet18_Weights.IMAGENET1K_V1. The 8 hex digits in the file
# name are the first digits of the file's SHA-256.
TORCHVISION_RESNET18_URL = "https://download.pytorch.org/models/resnet18-f37072fd.pth"

WEIGHTS_ENV_VAR = "TSJAX_TEACHER_WEIGHTS"
CACHE_DIR_ENV_VAR = "TSJAX_CACHE_DIR"
CONVERTED_FILENAME = "resnet18_imagenet.npz"

# pretrained/ beside the tsjax package, i.e. at the repository root of a
# source checkout.
# NOTE: in a non-editable install this is site-packages/pretrained; set
# TSJAX_CACHE_DIR there.
PRETRAINED_DIR = Path(__file__).resolve().parents[1] / "pretrained"

# Seconds to wait for the server to connect or send data. Short, so that a
# machine without network fails at once instead of hanging.
DOWNLOAD_TIMEOUT_S = 10.0

# Seed of the weights that ``'random'`` gives, fixed so runs are comparable.
RANDOM_TEACHER_SEED = 0

_CHUNK_BYTES = 2**20

# The function that opens URLs, module-level so tests can replace it and no
# test touches the network.
_urlopen: Callable = urllib.request.urlopen


class WeightsDownloadError(OSError):
    """The teacher's checkpoint could not be downloaded."""


def cache_dir() -> Path:
    """Return where downloaded weights are cached: ``$TSJAX_CACHE_DIR``, else ``PRETRAINED_DIR``."""
    configured = os.environ.get(CACHE_DIR_ENV_VAR)
    return Path(configured).expanduser() if configured else PRETRAINED_DIR


def _offline_message(url: str, error: BaseException) -> str:
    filename = url.rsplit("/", 1)[-1]
    return (
        f"could not download the teacher's ImageNet weights from {url} ({error}). "
        "Without network access, use one of:\n"
        f"  1. a local torchvision checkpoint: fetch {filename} on a machine with network "
        f"access and pass --teacher_weights=/path/to/{filename} (converted on load), or "
        f"convert it once: python -m tsjax.convert /path/to/{filename} "
        f"--out {PRETRAINED_DIR / CONVERTED_FILENAME}\n"
        f"  2. an already converted file: --teacher_weights=/path/to/{CONVERTED_FILENAME} "
        f"(or set {WEIGHTS_ENV_VAR} to that path)."
    )


def _expected_sha256_prefix(url: str) -> str:
    # torchvision names files <name>-<first hex digits of SHA-256>.<ext>.
    match = re.search(r"-([0-9a-f]{8,64})\.[A-Za-z0-9]+$", url)
    if match is None:
        raise ValueError(
            f"cannot verify {url}: its file name lacks the '-<sha256 prefix>.<ext>' suffix "
            "that torchvision's weight files carry."
        )
    return match.group(1)


def download(
    url: str, dest: str | os.PathLike, *, timeout_s: float = DOWNLOAD_TIMEOUT_S, progress: bool = True
) -> Path:
    """Download ``url`` to ``dest`` and check the SHA-256 prefix in its file name.

    The file is streamed to ``dest`` with a progress bar and only kept if its
    SHA-256 starts with the hex digits after the last ``-`` of the URL's file
    name (``resnet18-f37072fd.pth`` -> ``f37072fd``).

    Args:
      url: Address of a file named ``<name>-<sha256 prefix>.<ext>``.
      dest: Path to write.
      timeout_s: Seconds to wait for the connection and for each read.
      progress: Whether to show a tqdm progress bar on stderr.

    Returns:
      ``dest`` as a Path.

    Raises:
      WeightsDownloadError: if the connection or the transfer fails; the
        message names ``url`` and the offline options.
      ValueError: if the URL carries no SHA-256 prefix or the downloaded
        bytes do not match it (``dest`` is then removed).
    """
    expected = _expected_sha256_prefix(url)
    dest = Path(dest)
    digest = hashlib.sha256()
    # URLError covers DNS and HTTP errors, and OSError covers refused
    # connections and TimeoutError.
    try:
        response = _urlopen(url, timeout=timeout_s)
    except (urllib.error.URLError, OSError) as error:
        raise WeightsDownloadError(_offline_message(url, error)) from error

    length = response.headers.get("Content-Length")
    progress_bar = tqdm(
        total=int(length) if length else None,
        unit="B",
        unit_scale=True,
        desc=url.rsplit("/", 1)[-1],
        disable=not progress,
    )
    with response, progress_bar, open(dest, "wb") as file:
        while True:
            try:
                chunk = response.read(_CHUNK_BYTES)
            except (urllib.error.URLError, OSError) as error:
                file.close()
                dest.unlink(missing_ok=True)
                raise WeightsDownloadError(_offline_message(url, error)) from error
            if not chunk:
                break
            file.write(chunk)
            digest.update(chunk)
            progress_bar.update(len(chunk))
    if not digest.hexdigest().startswith(expected):
        dest.unlink()
        raise ValueError(
            f"the file downloaded from {url} has SHA-256 {digest.hexdigest()}, which does not "
            f"start with {expected}; it was deleted. Retry, or download it by hand and pass it "
            "with --teacher_weights."
        )
    return dest


def _download_and_convert(target: Path, progress: bool) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(
            f"cannot create the weight cache folder {target.parent} ({error}); set "
            f"{CACHE_DIR_ENV_VAR} to a writable folder."
        ) from error
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        checkpoint = download(
            TORCHVISION_RESNET18_URL,
            Path(scratch) / TORCHVISION_RESNET18_URL.rsplit("/", 1)[-1],
            progress=progress,
        )
        # Cache every stage the teacher has, whatever this call needs, so one
        # file serves all settings of last_layer.
        convert(checkpoint, target, last_layer=LAYERS[-1])


def resolve_teacher(
    spec: str | os.PathLike | None = None, last_layer: str = "layer3", *, progress: bool = True
) -> tuple[dict, dict]:
    """Load the teacher's variables named by ``spec`` and report their origin.

    Args:
      spec: A checkpoint path (folder of ``.npy``, ``.npz``, ``.safetensors``
        or ``torch.save`` ``.pth``/``.pt``, converted in memory), ``'random'``,
        or None for the default chain in this module's docstring
        (``$TSJAX_TEACHER_WEIGHTS``, then the cached converted file, then a
        download).
      last_layer: Deepest teacher stage to load, one of
        ``tsjax.teacher.LAYERS``.
      progress: Whether a download shows a progress bar.

    Returns:
      ``(variables, info)``. ``variables`` is for
      ``ResNet18(last_layer).apply``. ``info`` has the keys

      * ``'source'``: absolute path of the file loaded, or ``'random'``;
      * ``'sha256'``: ``tsjax.teacher.variables_sha256(variables)``;
      * ``'kind'``: ``'local'`` (a path from ``spec`` or the environment),
        ``'cache'`` (the default converted file, already on disk),
        ``'download'`` (just downloaded, converted and cached) or
        ``'random'``.

    Raises:
      FileNotFoundError: if an explicit path does not exist.
      WeightsDownloadError: if the download is needed and fails, for example
        without network; the message names the URL and the offline options.
      ValueError: if ``last_layer`` is unknown, the weights do not match
        ResNet-18 (every offending key is listed), a ``.pth`` is unsafe, or a
        download fails its checksum.
    """
    if last_layer not in LAYERS:
        raise ValueError(f"last_layer={last_layer!r} is not a teacher layer; use one of {LAYERS}.")
    if spec is None:
        spec = os.environ.get(WEIGHTS_ENV_VAR) or None

    if spec == "random":
        warnings.warn(
            f"using random teacher weights (seed {RANDOM_TEACHER_SEED}): features carry no "
            "ImageNet knowledge; use them only for tests and ablations.",
            stacklevel=2,
        )
        variables = random_variables(jax.random.key(RANDOM_TEACHER_SEED), last_layer)
        return variables, {"source": "random", "sha256": variables_sha256(variables), "kind": "random"}

    if spec is not None:
        path = Path(spec).expanduser().resolve()
        variables = load_pretrained(path, last_layer)
        return variables, {"source": str(path), "sha256": variables_sha256(variables), "kind": "local"}

    candidates = [PRETRAINED_DIR / CONVERTED_FILENAME, cache_dir() / CONVERTED_FILENAME]
    for path in candidates:
        if path.is_file():
            variables = load_pretrained(path, last_layer)
            return variables, {"source": str(path), "sha256": variables_sha256(variables), "kind": "cache"}

    target = candidates[-1]
    _download_and_convert(target, progress)
    variables = load_pretrained(target, last_layer)
    return variables, {"source": str(target), "sha256": variables_sha256(variables), "kind": "download"}
