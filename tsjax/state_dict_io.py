"""Read and write flat ``state_dict`` archives: key -> NumPy array.

Every reader returns the tensors under their original names and dtypes. None
of them unpickles Python objects: ``.npy``/``.npz`` files are opened with
``allow_pickle=False``, ``.safetensors`` is a JSON header plus raw bytes, and
``torch.save`` archives go through the restricted reader in
``tsjax.torch_checkpoint``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np

from tsjax.torch_checkpoint import read_torch_zip

__all__ = [
    "KEY_PREFIXES",
    "TORCH_SUFFIXES",
    "read_state_dict",
    "strip_key_prefixes",
    "write_npz",
]

# Prefixes that training wrappers put in front of torchvision's keys:
# DataParallel/DistributedDataParallel ("module."), and model containers that
# name the network "backbone" or "model". They may be nested.
KEY_PREFIXES = ("module.", "backbone.", "model.")

# File suffixes read as ``torch.save`` zip archives.
TORCH_SUFFIXES = (".pth", ".pt")

# safetensors dtype names -> NumPy dtype (little-endian by the format's
# definition). BF16 has no NumPy dtype and is decoded separately.
_SAFETENSORS_DTYPES = {
    "F64": "<f8",
    "F32": "<f4",
    "F16": "<f2",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U64": "<u8",
    "U32": "<u4",
    "U16": "<u2",
    "U8": "u1",
    "BOOL": "?",
}

# A header larger than this is not a weight file's; it bounds the memory that
# a corrupt length field can request.
_MAX_SAFETENSORS_HEADER_BYTES = 100 * 2**20


def _bfloat16_to_float32(raw: np.ndarray) -> np.ndarray:
    # bfloat16 is the upper half of a float32, so widening is exact.
    return (raw.astype(np.uint32) << 16).view(np.float32)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    with open(path, "rb") as file:
        blob = file.read()
    if len(blob) < 8:
        raise ValueError(f"{path!r} is not a safetensors file: it is only {len(blob)} bytes long.")
    header_size = int.from_bytes(blob[:8], "little")
    if header_size > min(len(blob) - 8, _MAX_SAFETENSORS_HEADER_BYTES):
        raise ValueError(
            f"{path!r} is not a valid safetensors file: its header length {header_size} "
            f"exceeds the file size {len(blob)}."
        )
    try:
        header = json.loads(blob[8 : 8 + header_size])
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path!r} has an invalid safetensors JSON header: {error}") from error
    if not isinstance(header, dict):
        raise ValueError(f"{path!r} has a safetensors header that is not a JSON object.")

    data = memoryview(blob)[8 + header_size :]
    state_dict = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name = entry["dtype"]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (TypeError, KeyError, ValueError) as error:
            raise ValueError(
                f"{path!r}: safetensors entry {key!r} needs 'dtype', 'shape' and "
                f"'data_offsets'; got {entry!r}."
            ) from error
        if dtype_name == "BF16":
            dtype = np.dtype("<u2")
        elif dtype_name in _SAFETENSORS_DTYPES:
            dtype = np.dtype(_SAFETENSORS_DTYPES[dtype_name])
        else:
            raise ValueError(
                f"{path!r}: tensor {key!r} has dtype {dtype_name!r}, which tsjax cannot read; "
                f"supported: {sorted(_SAFETENSORS_DTYPES) + ['BF16']}."
            )
        expected_bytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if not 0 <= begin <= end <= len(data) or end - begin != expected_bytes:
            raise ValueError(
                f"{path!r}: tensor {key!r} ({dtype_name}, shape {shape}) has data offsets "
                f"[{begin}, {end}), which do not span {expected_bytes} bytes inside the "
                f"{len(data)}-byte data section."
            )
        array = np.frombuffer(data[begin:end], dtype=dtype).reshape(shape)
        if dtype_name == "BF16":
            array = _bfloat16_to_float32(array)
        state_dict[key] = array.astype(array.dtype.newbyteorder("="), copy=True)
    return state_dict


def _read_npy_folder(path: str) -> dict[str, np.ndarray]:
    names = sorted(name for name in os.listdir(path) if name.endswith(".npy"))
    if not names:
        raise ValueError(f"no .npy files in weight folder {path!r}.")
    return {
        name[: -len(".npy")]: np.load(os.path.join(path, name), allow_pickle=False)
        for name in names
    }


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a checkpoint into a flat dict of NumPy arrays.

    Args:
      path: One of

        * a folder of ``<key>.npy`` files, one tensor each;
        * an ``.npz`` archive;
        * a ``.safetensors`` file;
        * a ``.pth``/``.pt`` file written by ``torch.save`` (PyTorch 1.6 or
          later, zip format), read without importing torch. Its pickle may
          hold the state dict itself or a dict with a ``'state_dict'``,
          ``'model_state_dict'`` or ``'model'`` entry.

    Returns:
      Key -> array, with the keys exactly as stored (see
      ``strip_key_prefixes``) and the stored dtypes, except that bfloat16 is
      widened to float32.

    Raises:
      FileNotFoundError: if ``path`` does not exist.
      UnsafeCheckpointError: if a ``.pth`` pickle references a global other
        than those a tensor state dict needs. Nothing in it is executed.
      ValueError: if the format is unsupported or the file is malformed.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path!r}.")
    if os.path.isdir(path):
        return _read_npy_folder(path)
    suffix = Path(path).suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    if suffix == ".safetensors":
        return _read_safetensors(path)
    if suffix in TORCH_SUFFIXES:
        return read_torch_zip(path)
    raise ValueError(
        f"unsupported checkpoint format {path!r}; expected a folder of .npy files, an .npz, "
        f"a .safetensors file, or a torch.save file ending in {' or '.join(TORCH_SUFFIXES)}."
    )


def strip_key_prefixes(
    state_dict: Mapping[str, np.ndarray], prefixes: tuple[str, ...] = KEY_PREFIXES
) -> dict[str, np.ndarray]:
    """Remove wrapper prefixes such as ``module.`` from the front of every key.

    Prefixes are removed repeatedly, so ``module.backbone.conv1.weight``
    becomes ``conv1.weight``. Keys without a prefix are kept as they are.

    Args:
      state_dict: Key -> array.
      prefixes: Prefixes to remove, in any order and nesting.

    Returns:
      A new dict with the stripped keys, in the original order.

    Raises:
      ValueError: if two keys become the same after stripping (both are
        named), because one would silently replace the other.
    """
    stripped: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(prefixes):
            name = name[len(next(p for p in prefixes if name.startswith(p))) :]
        if name in stripped:
            raise ValueError(
                f"keys {origin[name]!r} and {key!r} both become {name!r} once the prefixes "
                f"{prefixes} are removed; keep only one network's tensors in the checkpoint."
            )
        stripped[name] = value
        origin[name] = key
    return stripped


def write_npz(state_dict: Mapping[str, np.ndarray], path: str | os.PathLike) -> None:
    """Write ``state_dict`` to an uncompressed ``.npz``, replacing ``path`` atomically.

    The archive is written to a temporary file in the same folder and then
    renamed, so a reader never sees a half-written file.

    Raises:
      ValueError: if ``path`` does not end in ``.npz`` (NumPy would append
        the suffix and the file would land elsewhere).
    """
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"output path {str(path)!r} must end in .npz.")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkstemp: its files are private (0600), and the cache may be
    # shared. open() applies the user's umask.
    temporary = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(temporary, "wb") as file:
            np.savez(file, **state_dict)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
