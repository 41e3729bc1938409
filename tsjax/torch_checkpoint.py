"""Read ``torch.save`` checkpoints without importing torch or running pickled code.

Since PyTorch 1.6, ``torch.save`` writes a zip archive with one top-level
folder (named after the file or ``archive``):

* ``<folder>/data.pkl``: the saved object as a pickle (protocol 2 by default).
  Each tensor appears as a call to ``torch._utils._rebuild_tensor_v2(storage,
  storage_offset, size, stride, requires_grad, backward_hooks[, metadata])``.
  Its storage is a persistent id ``('storage', <torch.*Storage class>, key,
  location, numel)``.
* ``<folder>/data/<key>``: the raw bytes of each storage.
* ``<folder>/byteorder``: ``little`` or ``big``. Files from PyTorch versions
  that did not write it are read as little-endian.

Unpickling calls whatever callables the pickle names. This reader therefore
resolves only the globals a tensor state dict needs, each to a function
defined here, and raises ``UnsafeCheckpointError`` on any other global before
the pickle can call it. The legacy format of PyTorch < 1.6 (a bare pickle
stream) and TorchScript archives are rejected.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import zipfile
from typing import Any, Mapping

import numpy as np

__all__ = ["UnsafeCheckpointError", "read_torch_zip"]

# torch storage class name -> NumPy dtype code. ``bf16`` marks bfloat16, read
# as uint16 and widened to float32.
_STORAGE_DTYPES = {
    "DoubleStorage": "f8",
    "FloatStorage": "f4",
    "HalfStorage": "f2",
    "BFloat16Storage": "bf16",
    "LongStorage": "i8",
    "IntStorage": "i4",
    "ShortStorage": "i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}

# Entries of a training checkpoint that may hold the model's state dict.
_NESTED_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")

_STORAGE_KEY = re.compile(r"^[A-Za-z0-9_]+$")


class UnsafeCheckpointError(ValueError):
    """A checkpoint's pickle references a global that a state dict never needs.

    The pickle is not executed any further, so the global is never called.
    """


class _Opaque:
    """Base of the objects this reader hands to the unpickler.

    A pickle's BUILD opcode would call ``__setstate__`` on them. Nothing in a
    torch state dict does that, so it is rejected.
    """

    __slots__ = ()

    def __setstate__(self, state: Any) -> None:
        raise UnsafeCheckpointError(
            f"the checkpoint tries to set the state of a {type(self).__name__}, which no "
            "torch.save state dict does; it was not loaded."
        )


class _StorageType(_Opaque):
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Storage(_Opaque):
    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


class _Tensor(_Opaque):
    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> _Tensor:
    """Build the array of ``size`` elements that ``stride`` picks from ``storage``.

    Strides and offsets count elements, as in torch. ``requires_grad`` and
    ``metadata`` are ignored because a state dict's arrays carry no autograd
    state.
    """
    del requires_grad, metadata
    if not isinstance(storage, _Storage):
        raise ValueError(f"a tensor's storage must be a persistent storage id; got {type(storage).__name__}.")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise ValueError(f"a tensor needs size and stride tuples of equal length; got {size!r} and {stride!r}.")
    if not (all(_is_int(n) and n >= 0 for n in size) and all(_is_int(s) and s >= 0 for s in stride)):
        raise ValueError(f"tensor size {size!r} and stride {stride!r} must be non-negative integers.")
    if not (_is_int(storage_offset) and storage_offset >= 0):
        raise ValueError(f"tensor storage offset must be a non-negative integer; got {storage_offset!r}.")
    if backward_hooks:
        raise ValueError("a tensor in the checkpoint has backward hooks; save tensors detached.")

    flat = storage.array
    if 0 in size:
        return _Tensor(np.zeros(size, flat.dtype))
    # A zero stride repeats elements, so a tiny storage could claim a huge
    # tensor and exhaust memory when copied. State dicts hold no such tensors.
    numel = int(np.prod(size, dtype=np.int64))
    if numel > flat.size:
        raise ValueError(
            f"tensor of size {size} has more elements than its storage ({flat.size}); "
            "zero-stride (expanded) tensors are not supported, save tensor.contiguous() instead."
        )
    # as_strided does no bounds checking, so the last element it would touch
    # must lie inside the storage. Without this check a crafted file could
    # read memory outside the buffer.
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= flat.size:
        raise ValueError(
            f"tensor with offset {storage_offset}, size {size} and stride {stride} reaches "
            f"element {last} of a storage with {flat.size} elements."
        )
    view = np.lib.stride_tricks.as_strided(
        flat[storage_offset:],
        shape=size,
        strides=tuple(s * flat.itemsize for s in stride),
        writeable=False,
    )
    # Copy so that tensors sharing one storage own independent, contiguous arrays.
    return _Tensor(np.array(view, copy=True, order="C"))


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals of a torch tensor state dict."""

    def __init__(self, file: io.BufferedIOBase, archive: zipfile.ZipFile, folder: str, byteorder: str):
        super().__init__(file)
        self._archive = archive
        self._folder = folder
        self._byteorder = byteorder
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise UnsafeCheckpointError(
            f"checkpoint references the global {module}.{name}, which a torch state dict never "
            "needs, so it was rejected without running anything. If you trust the file, "
            "convert it with torch: torch.load it and save the state dict with "
            "safetensors.torch.save_file(...) or numpy.savez(...)."
        )

    def persistent_load(self, pid: Any) -> _Storage:
        valid = (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and _STORAGE_KEY.match(pid[2]) is not None
            and _is_int(pid[4])
            and pid[4] >= 0
        )
        if not valid:
            raise ValueError(
                "unsupported persistent id in checkpoint; expected ('storage', "
                f"torch.<Type>Storage, key, location, numel), got {repr(pid)[:200]}."
            )
        _, storage_type, key, _, numel = pid
        if key not in self._storages:
            self._storages[key] = _Storage(self._read_storage(storage_type.name, key, numel))
        return self._storages[key]

    def _read_storage(self, type_name: str, key: str, numel: int) -> np.ndarray:
        code = _STORAGE_DTYPES[type_name]
        order = "<" if self._byteorder == "little" else ">"
        dtype = np.dtype("u2" if code == "bf16" else code).newbyteorder(order)
        entry = f"{self._folder}data/{key}"
        try:
            raw = self._archive.read(entry)
        except KeyError:
            raise ValueError(f"checkpoint archive lacks storage entry {entry!r}.") from None
        if len(raw) < numel * dtype.itemsize:
            raise ValueError(
                f"storage {entry!r} holds {len(raw)} bytes; {numel} elements of "
                f"torch.{type_name} need {numel * dtype.itemsize}."
            )
        array = np.frombuffer(raw, dtype=dtype, count=numel)
        if code == "bf16":
            # bfloat16 is the upper half of a float32, so widening is exact.
            return (array.astype(np.uint32) << 16).view(np.float32)
        return array.astype(dtype.newbyteorder("="))


def _find_folder(archive: zipfile.ZipFile, path: str) -> str:
    names = archive.namelist()
    pickles = [name for name in names if re.fullmatch(r"[^/]+/data\.pkl", name)]
    if len(pickles) != 1:
        torchscript = any(name.endswith("/constants.pkl") for name in names)
        hint = (
            " It looks like a TorchScript archive (torch.jit.save); save model.state_dict() "
            "with torch.save instead."
            if torchscript
            else ""
        )
        raise ValueError(
            f"{path!r} is a zip file but not a torch.save checkpoint: expected one "
            f"'<folder>/data.pkl' entry, found {len(pickles)}.{hint}"
        )
    return pickles[0][: -len("data.pkl")]


def _unwrap_state_dict(obj: Any, path: str, nested: bool = False) -> dict[str, np.ndarray]:
    if isinstance(obj, Mapping):
        tensor_keys = [key for key, value in obj.items() if isinstance(value, _Tensor)]
        if obj and len(tensor_keys) == len(obj) and all(isinstance(key, str) for key in obj):
            return {key: value.array for key, value in obj.items()}
        if not nested:
            for key in _NESTED_STATE_DICT_KEYS:
                if isinstance(obj.get(key), Mapping):
                    return _unwrap_state_dict(obj[key], f"{path}[{key!r}]", nested=True)
        others = [key for key, value in obj.items() if not isinstance(value, _Tensor)]
        found = f"a dict whose entries {others[:10]!r} are not tensors"
    else:
        found = f"a {type(obj).__name__}"
    raise ValueError(
        f"{path} holds {found}; expected a state dict (a dict of tensors, such as "
        "model.state_dict()) or a dict with a 'state_dict', 'model_state_dict' or 'model' entry."
    )


def read_torch_zip(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a state dict from a ``torch.save`` zip archive without torch.

    Args:
      path: A ``.pth``/``.pt`` file written by ``torch.save`` (PyTorch 1.6 or
        later). Its object must be a dict of tensors, or a dict with a
        ``'state_dict'``, ``'model_state_dict'`` or ``'model'`` entry that is one.

    Returns:
      Key -> C-contiguous array in native byte order, with the storage's dtype
      (bfloat16 widened to float32).

    Raises:
      UnsafeCheckpointError: if the pickle references any global other than
        ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and
        the ``torch.*Storage`` classes. No global is called before the check.
      ValueError: if the file is not a zip ``torch.save`` archive (for example
        the legacy format of PyTorch < 1.6 or a TorchScript archive) or is
        malformed.
    """
    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(
            f"{path!r} is not a zip archive. tsjax reads only the zip format that torch.save "
            "writes since PyTorch 1.6; re-save the state dict with a current torch.save, or "
            "convert it to .safetensors or .npz."
        )
    with zipfile.ZipFile(path) as archive:
        folder = _find_folder(archive, path)
        byteorder = "little"
        if f"{folder}byteorder" in archive.namelist():
            byteorder = archive.read(f"{folder}byteorder").decode("ascii", "replace").strip()
            if byteorder not in ("little", "big"):
                raise ValueError(f"{path!r} records an unknown byte order {byteorder!r}.")
        unpickler = _RestrictedUnpickler(
            io.BytesIO(archive.read(f"{folder}data.pkl")), archive, folder, byteorder
        )
        try:
            obj = unpickler.load()
        except UnsafeCheckpointError as error:
            raise UnsafeCheckpointError(f"{path!r}: {error}") from None
        except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError, ValueError) as error:
            raise ValueError(f"{path!r} has a malformed data.pkl: {error}") from error
    return _unwrap_state_dict(obj, repr(path))
