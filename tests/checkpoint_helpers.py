"""Build torchvision-layout state dicts and torch.save-style files without torch.

The pickle writer emits protocol-2 opcodes by hand in the layout that
``torch.save`` produces for a state dict: an ``OrderedDict`` whose values are
``torch._utils._rebuild_tensor_v2`` calls on persistent storage ids. Writing
opcodes directly lets tests reference ``torch`` globals (and malicious ones)
without importing anything.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import zipfile
from pathlib import Path
from typing import Mapping

import jax
import numpy as np

from tsjax.teacher import ResNet18, random_variables, torchvision_key_map

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
SHARED_FOLDED_WEIGHTS = SHARED_DIR / "weights" / "resnet18_imagenet_bnfolded"

_STORAGE_NAMES = {
    np.dtype(np.float64): "DoubleStorage",
    np.dtype(np.float32): "FloatStorage",
    np.dtype(np.float16): "HalfStorage",
    np.dtype(np.int64): "LongStorage",
    np.dtype(np.int32): "IntStorage",
    np.dtype(np.uint8): "ByteStorage",
    np.dtype(np.bool_): "BoolStorage",
}


def require_shared(path: Path) -> Path:
    """Return ``path``, failing the test with its name when it is missing."""
    if not path.exists():
        raise FileNotFoundError(
            f"shared test data not found at {path}; the tests read it in place from the "
            "folder beside the repository."
        )
    return path


@dataclasses.dataclass(frozen=True)
class StridedTensor:
    """A tensor as torch stores it: a view of a 1-D storage.

    ``offset`` and ``stride`` count elements. ``storage_type`` overrides the
    storage class derived from the storage's dtype (for example
    ``'BFloat16Storage'`` for a uint16 storage of bfloat16 bits).
    """

    storage: np.ndarray
    storage_key: str
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    storage_type: str | None = None


class PickleOpcodes:
    """Append pickle protocol-2 opcodes to a byte buffer."""

    def __init__(self) -> None:
        self.data = bytearray(b"\x80\x02")  # PROTO 2

    def global_(self, module: str, name: str) -> None:
        self.data += b"c" + f"{module}\n{name}\n".encode()

    def stack_global(self, module: str, name: str) -> None:
        # Protocol 4's form of a global: two strings then STACK_GLOBAL.
        self.string(module)
        self.string(name)
        self.data += b"\x93"

    def string(self, text: str) -> None:
        encoded = text.encode()
        self.data += b"X" + struct.pack("<I", len(encoded)) + encoded

    def integer(self, value: int) -> None:
        self.data += b"J" + struct.pack("<i", value)

    def false(self) -> None:
        self.data += b"\x89"

    def mark(self) -> None:
        self.data += b"("

    def tuple_(self) -> None:
        self.data += b"t"

    def empty_tuple(self) -> None:
        self.data += b")"

    def reduce(self) -> None:
        self.data += b"R"

    def setitems(self) -> None:
        self.data += b"u"

    def persistent_id(self) -> None:
        self.data += b"Q"  # BINPERSID

    def inst(self, module: str, name: str) -> None:
        self.data += b"i" + f"{module}\n{name}\n".encode()

    def stop(self) -> bytes:
        self.data += b"."
        return bytes(self.data)

    def ordered_dict(self) -> None:
        self.global_("collections", "OrderedDict")
        self.empty_tuple()
        self.reduce()

    def tensor(self, tensor: StridedTensor) -> None:
        storage_type = tensor.storage_type or _STORAGE_NAMES[tensor.storage.dtype]
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.mark()
        self.mark()
        self.string("storage")
        self.global_("torch", storage_type)
        self.string(tensor.storage_key)
        self.string("cpu")
        self.integer(tensor.storage.size)
        self.tuple_()
        self.persistent_id()
        self.integer(tensor.offset)
        for values in (tensor.size, tensor.stride):
            self.mark()
            for value in values:
                self.integer(value)
            self.tuple_()
        self.false()  # requires_grad
        self.ordered_dict()  # backward_hooks
        self.tuple_()
        self.reduce()


def _as_strided_tensor(array: np.ndarray, key: str) -> StridedTensor:
    array = np.array(array, order="C")  # ascontiguousarray would turn 0-d into 1-d
    stride = tuple(s // array.itemsize for s in array.strides)
    return StridedTensor(array.reshape(-1), key, 0, array.shape, stride)


def state_dict_pickle(tensors: Mapping[str, StridedTensor]) -> bytes:
    """Return the ``data.pkl`` bytes of an ``OrderedDict`` of ``tensors``."""
    opcodes = PickleOpcodes()
    opcodes.ordered_dict()
    opcodes.mark()
    for name, tensor in tensors.items():
        opcodes.string(name)
        opcodes.tensor(tensor)
    opcodes.setitems()
    return opcodes.stop()


def write_torch_zip_raw(
    path: Path,
    pickle_bytes: bytes,
    storages: Mapping[str, bytes] | None = None,
    folder: str = "archive",
    byteorder: str = "little",
) -> Path:
    """Write a zip archive in torch.save's layout around given pickle bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{folder}/data.pkl", pickle_bytes)
        archive.writestr(f"{folder}/byteorder", byteorder)
        for key, data in (storages or {}).items():
            archive.writestr(f"{folder}/data/{key}", data)
        archive.writestr(f"{folder}/version", "3\n")
    return path


def write_torch_zip(
    path: Path, state_dict: Mapping[str, np.ndarray | StridedTensor], folder: str = "archive"
) -> Path:
    """Write ``state_dict`` the way ``torch.save(state_dict, path)`` lays it out."""
    tensors = {}
    for index, (name, value) in enumerate(state_dict.items()):
        if isinstance(value, StridedTensor):
            tensors[name] = value
        else:
            tensors[name] = _as_strided_tensor(np.asarray(value), str(index))
    storages = {
        tensor.storage_key: tensor.storage.astype(tensor.storage.dtype.newbyteorder("<")).tobytes()
        for tensor in tensors.values()
    }
    return write_torch_zip_raw(path, state_dict_pickle(tensors), storages, folder)


def _reference_shapes(last_layer: str) -> dict:
    return jax.eval_shape(lambda: random_variables(jax.random.key(0), last_layer))


def _leaf(tree: Mapping, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def random_torchvision_state_dict(seed: int, last_layer: str = "layer3") -> dict[str, np.ndarray]:
    """Return a random ResNet-18 state dict in torchvision's layout.

    Convolutions have He-normal OIHW weights and no bias. Every batch norm has
    non-trivial statistics (scale in [0.5, 1.5], shift and mean ~ N(0, 0.1),
    variance in [0.5, 2]) and an int64 ``num_batches_tracked`` as torch saves.
    """
    rng = np.random.default_rng(seed)
    reference = _reference_shapes(last_layer)
    state_dict = {}
    for key, path in torchvision_key_map(last_layer).items():
        shape = _leaf(reference, path).shape
        module, leaf = path[-2], path[-1]
        is_bn = module.startswith("bn") or module == "downsample_bn"
        if leaf == "kernel":
            height, width, inputs, outputs = shape
            std = np.sqrt(2.0 / (height * width * inputs))
            state_dict[key] = rng.normal(0.0, std, (outputs, inputs, height, width)).astype(np.float32)
        elif not is_bn:
            continue  # torchvision's convolutions have no bias
        elif leaf == "scale":
            state_dict[key] = rng.uniform(0.5, 1.5, shape).astype(np.float32)
        elif leaf in ("bias", "mean"):
            state_dict[key] = rng.normal(0.0, 0.1, shape).astype(np.float32)
        else:
            state_dict[key] = rng.uniform(0.5, 2.0, shape).astype(np.float32)
        if key.endswith(".running_var"):
            state_dict[key.replace("running_var", "num_batches_tracked")] = np.array(1000, np.int64)
    return state_dict


def features(variables: Mapping, last_layer: str = "layer3", seed: int = 0) -> dict[str, np.ndarray]:
    """Run the teacher on one fixed random 37 x 45 RGB image and return every feature map."""
    image = jax.random.normal(jax.random.key(seed), (1, 37, 45, 3))
    outputs = ResNet18(last_layer=last_layer).apply(variables, image)
    return {name: np.asarray(value) for name, value in outputs.items()}


def max_relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """Return max |actual - expected| / max |expected|."""
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def write_safetensors(path: Path, state_dict: Mapping[str, np.ndarray], dtype_names: Mapping[str, str] | None = None) -> Path:
    """Write ``state_dict`` in the safetensors layout: u64 header size, JSON header, data.

    ``dtype_names`` overrides the dtype name of some keys (``'BF16'`` for a
    uint16 array of bfloat16 bits).
    """
    names = {"<f8": "F64", "<f4": "F32", "<f2": "F16", "<i8": "I64", "<i4": "I32", "|u1": "U8", "|b1": "BOOL"}
    header, chunks, offset = {}, [], 0
    for key, value in state_dict.items():
        array = np.array(value, order="C")
        data = array.astype(array.dtype.newbyteorder("<")).tobytes()
        name = (dtype_names or {}).get(key) or names[array.dtype.newbyteorder("<").str]
        header[key] = {"dtype": name, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(chunks))
    return path


def assert_trees_equal(actual: Mapping, expected: Mapping) -> None:
    """Assert two variable trees have the same structure, dtypes and bits."""
    actual_leaves, actual_tree = jax.tree_util.tree_flatten_with_path(actual)
    expected_leaves, expected_tree = jax.tree_util.tree_flatten_with_path(expected)
    assert actual_tree == expected_tree
    for (path, left), (_, right) in zip(actual_leaves, expected_leaves):
        left, right = np.asarray(left), np.asarray(right)
        assert left.dtype == right.dtype, jax.tree_util.keystr(path)
        assert np.array_equal(left, right), jax.tree_util.keystr(path)
