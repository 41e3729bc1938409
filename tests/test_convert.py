"""Tests for checkpoint reading, batch-norm folding and conversion."""

from __future__ import annotations

import pickle
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from checkpoint_helpers import (
    SHARED_FOLDED_WEIGHTS,
    PickleOpcodes,
    StridedTensor,
    assert_trees_equal,
    features,
    max_relative_error,
    random_torchvision_state_dict,
    require_shared,
    state_dict_pickle,
    write_safetensors,
    write_torch_zip,
    write_torch_zip_raw,
)
from tsjax.convert import convert, fold_batch_norm, main
from tsjax.state_dict_io import read_state_dict, strip_key_prefixes
from tsjax.teacher import BN_EPSILON, LAYERS, load_pretrained, load_state_dict, variables_sha256
from tsjax.torch_checkpoint import UnsafeCheckpointError

REPO_ROOT = Path(__file__).resolve().parents[1]


# --- batch-norm folding -----------------------------------------------------


def test_fold_batch_norm_preserves_activations():
    state_dict = random_torchvision_state_dict(seed=1)
    folded = fold_batch_norm(state_dict)

    assert not [key for key in folded if "running_" in key or "num_batches_tracked" in key]
    assert "layer2.0.downsample.0.bias" in folded
    # The statistics are non-trivial, so folding must change the weights.
    assert max_relative_error(folded["conv1.weight"], state_dict["conv1.weight"]) > 0.1

    expected = features(load_state_dict(state_dict))
    actual = features(load_state_dict(folded))
    for layer in LAYERS:
        # Tolerance: float32 rounding through up to 13 convolutions in
        # sequence. The fold itself is computed in float64.
        assert max_relative_error(actual[layer], expected[layer]) <= 1e-5, layer


def test_fold_batch_norm_scales_existing_conv_bias():
    rng = np.random.default_rng(0)
    state_dict = {
        "conv1.weight": rng.normal(size=(4, 3, 1, 1)).astype(np.float32),
        "conv1.bias": rng.normal(size=4).astype(np.float32),
        "bn1.weight": rng.uniform(0.5, 1.5, 4).astype(np.float32),
        "bn1.bias": rng.normal(size=4).astype(np.float32),
        "bn1.running_mean": rng.normal(size=4).astype(np.float32),
        "bn1.running_var": rng.uniform(0.5, 2.0, 4).astype(np.float32),
        "bn1.num_batches_tracked": np.array(7, np.int64),
    }
    folded = fold_batch_norm(state_dict)
    assert sorted(folded) == ["conv1.bias", "conv1.weight"]

    x = rng.normal(size=3)
    conv = state_dict["conv1.weight"][:, :, 0, 0].astype(np.float64) @ x + state_dict["conv1.bias"]
    # Expected: BatchNorm2d in inference mode, gamma * (y - mean) / sqrt(var + eps) + beta.
    expected = (
        state_dict["bn1.weight"] * (conv - state_dict["bn1.running_mean"])
        / np.sqrt(state_dict["bn1.running_var"] + BN_EPSILON)
        + state_dict["bn1.bias"]
    )
    actual = folded["conv1.weight"][:, :, 0, 0].astype(np.float64) @ x + folded["conv1.bias"]
    # Tolerance: the folded tensors are stored as float32.
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-6)


def test_fold_batch_norm_lists_every_broken_module():
    state_dict = {
        "conv1.weight": np.ones((4, 3, 1, 1), np.float32),
        "bn1.weight": np.ones(4, np.float32),
        "bn1.bias": np.zeros(4, np.float32),
        "bn1.running_mean": np.zeros(4, np.float32),
        "head.norm.running_mean": np.zeros(4, np.float32),
    }
    with pytest.raises(ValueError) as error:
        fold_batch_norm(state_dict)
    assert "'bn1' lacks ['bn1.running_var']" in str(error.value)
    assert "'head.norm' has no convolution weight" in str(error.value)


# --- torch.save zip archives --------------------------------------------------


def test_pth_converts_like_npz(tmp_path):
    state_dict = random_torchvision_state_dict(seed=2)
    pth = write_torch_zip(tmp_path / "model.pth", state_dict)
    npz = tmp_path / "model.npz"
    np.savez(npz, **state_dict)

    read = read_state_dict(pth)
    assert list(read) == list(state_dict)
    for key, value in state_dict.items():
        assert read[key].dtype == value.dtype, key
        assert np.array_equal(read[key], value), key
    assert_trees_equal(convert(pth), convert(npz))


def test_torch_zip_reads_views_dtypes_and_byte_order(tmp_path):
    base = np.arange(24, dtype=np.float32)
    bfloat16_values = np.array([1.5, -2.0, 3.140625], np.float32)
    tensors = {
        "matrix": StridedTensor(base, "0", 0, (4, 6), (6, 1)),
        "transposed": StridedTensor(base, "0", 0, (6, 4), (1, 6)),
        "tail": StridedTensor(base, "0", 6, (3, 6), (6, 1)),
        "half": np.array([0.5, -1.25], np.float16),
        "bfloat16": StridedTensor(
            (bfloat16_values.view(np.uint32) >> 16).astype(np.uint16), "2", 0, (3,), (1,), "BFloat16Storage"
        ),
        "empty": StridedTensor(base, "0", 0, (0, 3), (3, 1)),
        "count": np.array(1000, np.int64),
    }
    path = write_torch_zip(tmp_path / "views.pt", tensors)
    read = read_state_dict(path)

    # Expected values: NumPy's views of the same storage.
    matrix = base.reshape(4, 6)
    np.testing.assert_array_equal(read["matrix"], matrix)
    np.testing.assert_array_equal(read["transposed"], matrix.T)
    np.testing.assert_array_equal(read["tail"], base[6:].reshape(3, 6))
    np.testing.assert_array_equal(read["half"], np.array([0.5, -1.25], np.float16))
    np.testing.assert_array_equal(read["bfloat16"], bfloat16_values)
    assert read["bfloat16"].dtype == np.float32
    assert read["empty"].shape == (0, 3)
    assert read["count"].shape == ()
    assert read["count"] == 1000
    assert read["transposed"].flags.c_contiguous

    big = {"w": StridedTensor(base, "0", 0, (24,), (1,))}
    big_path = write_torch_zip_raw(
        tmp_path / "big.pth", state_dict_pickle(big), {"0": base.astype(">f4").tobytes()}, byteorder="big"
    )
    np.testing.assert_array_equal(read_state_dict(big_path)["w"], base)


def test_torch_zip_reads_nested_training_checkpoint(tmp_path):
    weight = np.arange(6, dtype=np.float32).reshape(2, 3)
    opcodes = PickleOpcodes()
    opcodes.data += b"}"  # EMPTY_DICT
    opcodes.mark()
    opcodes.string("epoch")
    opcodes.integer(3)
    opcodes.string("state_dict")
    opcodes.ordered_dict()
    opcodes.mark()
    opcodes.string("fc.weight")
    opcodes.tensor(StridedTensor(weight.reshape(-1), "0", 0, (2, 3), (3, 1)))
    opcodes.setitems()
    opcodes.setitems()
    path = write_torch_zip_raw(tmp_path / "train.pth", opcodes.stop(), {"0": weight.tobytes()})

    read = read_state_dict(path)
    assert list(read) == ["fc.weight"]
    np.testing.assert_array_equal(read["fc.weight"], weight)


@pytest.mark.parametrize(
    ("size", "stride", "offset"),
    [((10,), (1,), 0), ((2, 2), (3, 1), 1), ((2,), (-1,), 3), ((4,), (1,), -1), ((10**6, 10**6), (0, 0), 0)],
)
def test_torch_zip_rejects_out_of_bounds_views(tmp_path, size, stride, offset):
    storage = np.zeros(4, np.float32)
    tensors = {"w": StridedTensor(storage, "0", offset, size, stride)}
    path = write_torch_zip_raw(tmp_path / "oob.pth", state_dict_pickle(tensors), {"0": storage.tobytes()})
    with pytest.raises(ValueError, match="malformed data.pkl"):
        read_state_dict(path)


def test_legacy_and_torchscript_files_rejected(tmp_path):
    legacy = tmp_path / "legacy.pth"
    # The legacy format starts with a bare pickle (of a magic number).
    legacy.write_bytes(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))
    with pytest.raises(ValueError, match="not a zip archive"):
        read_state_dict(legacy)

    scripted = tmp_path / "scripted.pt"
    with zipfile.ZipFile(scripted, "w") as archive:
        archive.writestr("model/constants.pkl", b"")
        archive.writestr("model/code/__torch__.py", b"")
    with pytest.raises(ValueError, match="TorchScript"):
        read_state_dict(scripted)


# --- malicious pickles ----------------------------------------------------------


def _malicious_pickle(kind: str, marker: Path) -> tuple[bytes, dict[str, bytes]]:
    """Return a data.pkl whose loading with pickle.loads would create ``marker``."""
    opcodes = PickleOpcodes()
    storages: dict[str, bytes] = {}
    command = f"touch {marker}"
    if kind in ("os.system", "posix.system"):
        opcodes.global_(*kind.split("."))
        opcodes.mark()
        opcodes.string(command)
        opcodes.tuple_()
        opcodes.reduce()
    elif kind == "builtins.exec":
        opcodes.stack_global("builtins", "exec")
        opcodes.mark()
        opcodes.string(f"open({str(marker)!r}, 'w').close()")
        opcodes.tuple_()
        opcodes.reduce()
    elif kind == "subprocess.call":
        opcodes.global_("subprocess", "call")
        opcodes.mark()
        opcodes.mark()
        opcodes.string("touch")
        opcodes.string(str(marker))
        opcodes.tuple_()
        opcodes.tuple_()
        opcodes.reduce()
    elif kind == "inst os.system":
        opcodes.mark()
        opcodes.string(command)
        opcodes.inst("os", "system")
    elif kind == "inside state dict":
        # A valid tensor first, then the payload as the value of a second key.
        weight = np.ones(3, np.float32)
        storages["0"] = weight.tobytes()
        opcodes.ordered_dict()
        opcodes.mark()
        opcodes.string("conv1.bias")
        opcodes.tensor(StridedTensor(weight, "0", 0, (3,), (1,)))
        opcodes.string("conv1.weight")
        opcodes.global_("os", "system")
        opcodes.mark()
        opcodes.string(command)
        opcodes.tuple_()
        opcodes.reduce()
        opcodes.setitems()
    else:
        raise ValueError(kind)
    return opcodes.stop(), storages


MALICIOUS_KINDS = {
    "os.system": "os.system",
    "posix.system": "posix.system",
    "builtins.exec": "builtins.exec",
    "subprocess.call": "subprocess.call",
    "inst os.system": "os.system",
    "inside state dict": "os.system",
}


@pytest.mark.parametrize("kind", sorted(MALICIOUS_KINDS))
def test_malicious_pth_rejected_without_running(tmp_path, kind):
    marker = tmp_path / "marker"
    payload, storages = _malicious_pickle(kind, marker)
    path = write_torch_zip_raw(tmp_path / "evil.pth", payload, storages)

    with pytest.raises(UnsafeCheckpointError, match=re.escape(MALICIOUS_KINDS[kind])):
        read_state_dict(path)
    assert not marker.exists()


def test_malicious_pth_rejected_by_every_loader(tmp_path):
    marker = tmp_path / "marker"
    payload, storages = _malicious_pickle("os.system", marker)
    path = write_torch_zip_raw(tmp_path / "evil.pth", payload, storages)

    with pytest.raises(UnsafeCheckpointError):
        convert(path, tmp_path / "out.npz")
    with pytest.raises(UnsafeCheckpointError):
        load_pretrained(path)
    assert not marker.exists()
    assert not (tmp_path / "out.npz").exists()


def test_malicious_payload_is_live_under_plain_pickle(tmp_path):
    # Control for the rejection tests: the same bytes do run code when an
    # unrestricted unpickler loads them (exec of open() only, no shell).
    marker = tmp_path / "marker"
    payload, _ = _malicious_pickle("builtins.exec", marker)
    pickle.loads(payload)
    assert marker.exists()


# --- other formats and key handling ----------------------------------------------


def test_safetensors_and_npy_folder_convert_like_npz(tmp_path):
    state_dict = random_torchvision_state_dict(seed=3)
    npz = tmp_path / "model.npz"
    np.savez(npz, **state_dict)
    safetensors = write_safetensors(tmp_path / "model.safetensors", state_dict)
    folder = tmp_path / "npy"
    folder.mkdir()
    for key, value in state_dict.items():
        np.save(folder / f"{key}.npy", value)

    expected = convert(npz)
    assert_trees_equal(convert(safetensors), expected)
    assert_trees_equal(convert(folder), expected)


def test_safetensors_reads_bfloat16_and_rejects_bad_offsets(tmp_path):
    values = np.array([1.5, -2.0, 3.140625], np.float32)
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    path = write_safetensors(tmp_path / "bf16.safetensors", {"w": bits}, {"w": "BF16"})
    np.testing.assert_array_equal(read_state_dict(path)["w"], values)

    broken = bytearray(path.read_bytes())
    broken[8:] = broken[8:].replace(b'"data_offsets": [0, 6]', b'"data_offsets": [0, 9]')
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(broken))
    with pytest.raises(ValueError, match="data offsets"):
        read_state_dict(bad)


def test_safetensors_matches_reference_library(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    state_dict = random_torchvision_state_dict(seed=4)
    path = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(state_dict, str(path))
    read = read_state_dict(path)
    assert sorted(read) == sorted(state_dict)
    for key, value in state_dict.items():
        assert read[key].dtype == value.dtype, key
        assert np.array_equal(read[key], value), key


def test_key_errors_list_every_offending_key(tmp_path):
    state_dict = random_torchvision_state_dict(seed=5)
    del state_dict["layer1.0.conv2.weight"]
    del state_dict["bn1.running_mean"]
    state_dict["layer1.0.conv1.weight"] = state_dict["layer1.0.conv1.weight"][:, :32]
    state_dict["layer2.1.bn1.running_var"] = np.ones(64, np.float32)
    state_dict["head.weight"] = np.zeros((10, 256), np.float32)
    path = write_torch_zip(tmp_path / "bad.pth", {f"module.{key}": value for key, value in state_dict.items()})

    with pytest.raises(ValueError) as error:
        convert(path, tmp_path / "out.npz")
    message = str(error.value)
    assert "(5 problem(s))" in message
    assert "missing key 'layer1.0.conv2.weight' (expected shape (64, 64, 3, 3), OIHW)" in message
    assert "missing key 'bn1.running_mean' (expected shape (64,))" in message
    assert "key 'layer1.0.conv1.weight' has shape (64, 32, 3, 3); expected (64, 64, 3, 3) (OIHW)" in message
    assert "key 'layer2.1.bn1.running_var' has shape (64,); expected (128,)" in message
    assert "unexpected key 'head.weight' with shape (10, 256)" in message
    assert not (tmp_path / "out.npz").exists()


@pytest.mark.parametrize("prefix", ["module.", "backbone.", "model.", "module.backbone."])
def test_prefixed_keys_convert_like_plain(tmp_path, prefix):
    state_dict = random_torchvision_state_dict(seed=6)
    plain = tmp_path / "plain.npz"
    np.savez(plain, **state_dict)
    prefixed = write_torch_zip(tmp_path / "prefixed.pth", {prefix + key: value for key, value in state_dict.items()})
    out = tmp_path / "out.npz"

    assert_trees_equal(convert(prefixed, out), convert(plain))
    assert sorted(np.load(out).files) == sorted(k for k in state_dict if not k.endswith("num_batches_tracked"))


def test_prefix_collision_names_both_keys():
    weight = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=r"'conv1\.weight' and 'module\.conv1\.weight'"):
        strip_key_prefixes({"conv1.weight": weight, "module.conv1.weight": weight})


def test_layer_selection_drops_deeper_stages(tmp_path):
    state_dict = random_torchvision_state_dict(seed=7)
    extended = dict(state_dict)
    extended["layer4.0.conv1.weight"] = np.zeros((512, 256, 3, 3), np.float32)
    extended["fc.weight"] = np.zeros((1000, 512), np.float32)
    extended["fc.bias"] = np.zeros(1000, np.float32)
    npz = tmp_path / "extended.npz"
    np.savez(npz, **extended)

    out = tmp_path / "layer3.npz"
    assert_trees_equal(convert(npz, out), load_state_dict(state_dict))
    assert not [key for key in np.load(out).files if key.startswith(("layer4", "fc"))]

    out_layer2 = tmp_path / "layer2.npz"
    variables = convert(npz, out_layer2, last_layer="layer2")
    assert "layer3_0" not in variables["params"]
    assert not [key for key in np.load(out_layer2).files if key.startswith("layer3")]


@pytest.mark.parametrize("fold_bn", [False, True])
def test_convert_save_load_round_trip_bit_identical(tmp_path, fold_bn):
    path = write_torch_zip(tmp_path / "model.pth", random_torchvision_state_dict(seed=8))
    out = tmp_path / "converted.npz"
    variables = convert(path, out, fold_bn=fold_bn)
    loaded = load_pretrained(out)
    assert_trees_equal(loaded, variables)
    assert variables_sha256(loaded) == variables_sha256(variables)


def test_convert_rejects_output_without_npz_suffix(tmp_path):
    path = write_torch_zip(tmp_path / "model.pth", random_torchvision_state_dict(seed=9))
    with pytest.raises(ValueError, match=r"must end in \.npz"):
        convert(path, tmp_path / "converted.bin")


# --- command line ---------------------------------------------------------------


def test_main_writes_file_and_prints_checksums(tmp_path, capsys):
    path = write_torch_zip(tmp_path / "model.pth", random_torchvision_state_dict(seed=10))
    out = tmp_path / "converted.npz"
    assert main([str(path), "--out", str(out)]) == 0

    printed = capsys.readouterr().out
    assert f"wrote {out}" in printed
    assert variables_sha256(load_pretrained(out)) in printed


def test_module_entry_point_reports_errors(tmp_path):
    missing = tmp_path / "missing.pth"
    result = subprocess.run(
        [sys.executable, "-m", "tsjax.convert", str(missing), "--out", str(tmp_path / "out.npz")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )
    assert result.returncode == 1
    assert f"checkpoint not found: {str(missing)!r}" in result.stderr


# --- shared ImageNet weights ------------------------------------------------------


def _unfold(folded: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Invert fold_batch_norm with random statistics: torchvision's layout, same function."""
    state_dict = {}
    for key, value in folded.items():
        if not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        bn = re.sub(r"conv(\d+)$", r"bn\1", module).replace("downsample.0", "downsample.1")
        bias = folded[f"{module}.bias"].astype(np.float64)
        channels = value.shape[0]
        gamma = rng.uniform(0.5, 1.5, channels)
        var = rng.uniform(0.5, 2.0, channels)
        mean = rng.normal(0.0, 0.1, channels)
        scale = gamma / np.sqrt(var + BN_EPSILON)
        state_dict[key] = (value / scale[:, None, None, None]).astype(np.float32)
        state_dict[f"{bn}.weight"] = gamma.astype(np.float32)
        state_dict[f"{bn}.bias"] = (bias + mean * scale).astype(np.float32)
        state_dict[f"{bn}.running_mean"] = mean.astype(np.float32)
        state_dict[f"{bn}.running_var"] = var.astype(np.float32)
        state_dict[f"{bn}.num_batches_tracked"] = np.array(0, np.int64)
    return state_dict


def test_shared_folded_weights_match_torchvision_layout(tmp_path):
    folder = require_shared(SHARED_FOLDED_WEIGHTS)
    folded = read_state_dict(folder)
    unfolded = _unfold(folded, np.random.default_rng(11))
    pth = write_torch_zip(tmp_path / "resnet18.pth", unfolded)

    # Both files go through the same loader.
    expected = features(load_pretrained(folder))
    actual = features(load_pretrained(pth))
    for layer in LAYERS:
        # Tolerance: float32 rounding of the unfolded weights and of the
        # separate batch norm through up to 13 convolutions.
        assert max_relative_error(actual[layer], expected[layer]) <= 1e-5, layer

    refolded = fold_batch_norm(unfolded)
    for key, value in folded.items():
        np.testing.assert_allclose(refolded[key], value, rtol=1e-5, atol=1e-6, err_msg=key)


def test_shared_weights_checksum_documented(tmp_path):
    folder = require_shared(SHARED_FOLDED_WEIGHTS)
    digest = variables_sha256(convert(folder, tmp_path / "resnet18_imagenet.npz"))
    readme = (REPO_ROOT / "pretrained" / "README.md").read_text()
    assert digest in readme, f"pretrained/README.md does not list the converted checksum {digest}"


def test_real_torch_save_reads_identically(tmp_path):
    # Extra check against torch itself, run only where torch is installed; the
    # tests above cover the format without it.
    torch = pytest.importorskip("torch")
    state_dict = random_torchvision_state_dict(seed=12)
    tensors = {key: torch.from_numpy(value) for key, value in state_dict.items()}
    tensors["transposed"] = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    tensors["half"] = torch.tensor([0.5, -1.25], dtype=torch.float16)
    tensors["bfloat16"] = torch.tensor([1.5, -2.0], dtype=torch.bfloat16)
    path = tmp_path / "real.pth"
    torch.save(tensors, path)

    read = read_state_dict(path)
    for key, value in state_dict.items():
        assert np.array_equal(read[key], value), key
    np.testing.assert_array_equal(read["transposed"], np.arange(12, dtype=np.float32).reshape(3, 4).T)
    np.testing.assert_array_equal(read["half"], np.array([0.5, -1.25], np.float16))
    np.testing.assert_array_equal(read["bfloat16"], np.array([1.5, -2.0], np.float32))
