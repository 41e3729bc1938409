"""Teacher parity against an independent NumPy float64 ResNet-18.

The reference below follows torchvision's definition of ResNet-18: conv
7x7/2 pad 3, batch norm, ReLU, max-pool 3x3/2 pad 1 with -inf padding, then
BasicBlocks of 3x3 pad 1 convolutions with a 1x1 strided downsample. It
convolves by im2col and shares no code with tsjax.teacher.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax import canvas, teacher

EPS = 1e-5


def _conv2d(x, weight, bias, stride, pad):
    """x: [C, H, W] float64; weight: [O, C, kh, kw] (OIHW). Zero padding on every side."""
    channels, height, width = x.shape
    out_channels, _, kh, kw = weight.shape
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)))
    out_h = (height + 2 * pad - kh) // stride + 1
    out_w = (width + 2 * pad - kw) // stride + 1
    columns = np.empty((channels * kh * kw, out_h * out_w))
    row = 0
    for c in range(channels):
        for i in range(kh):
            for j in range(kw):
                window = padded[c, i : i + stride * out_h : stride, j : j + stride * out_w : stride]
                columns[row] = window.reshape(-1)
                row += 1
    out = weight.reshape(out_channels, -1) @ columns
    if bias is not None:
        out += bias[:, None]
    return out.reshape(out_channels, out_h, out_w)


def _batch_norm(x, sd, name):
    if f"{name}.running_mean" not in sd:
        return x
    scale = sd[f"{name}.weight"] / np.sqrt(sd[f"{name}.running_var"] + EPS)
    return (x - sd[f"{name}.running_mean"][:, None, None]) * scale[:, None, None] + sd[f"{name}.bias"][:, None, None]


def _max_pool(x):
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    out_h = (x.shape[1] + 2 - 3) // 2 + 1
    out_w = (x.shape[2] + 2 - 3) // 2 + 1
    out = np.full((x.shape[0], out_h, out_w), -np.inf)
    for i in range(3):
        for j in range(3):
            out = np.maximum(out, padded[:, i : i + 2 * out_h : 2, j : j + 2 * out_w : 2])
    return out


def _reference_resnet18(image_chw, sd):
    """Return torchvision-semantics features {stem, layer1, layer2, layer3} as [C, h, w]."""
    relu = lambda value: np.maximum(value, 0.0)  # noqa: E731
    sd = {key: np.asarray(value, np.float64) for key, value in sd.items()}

    def conv(x, name, stride, pad):
        return _conv2d(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"), stride, pad)

    features = {}
    x = relu(_batch_norm(conv(image_chw, "conv1", 2, 3), sd, "bn1"))
    features["stem"] = x
    x = _max_pool(x)
    for stage, stride in (("layer1", 1), ("layer2", 2), ("layer3", 2)):
        for block in (0, 1):
            name = f"{stage}.{block}"
            block_stride = stride if block == 0 else 1
            y = relu(_batch_norm(conv(x, f"{name}.conv1", block_stride, 1), sd, f"{name}.bn1"))
            y = _batch_norm(conv(y, f"{name}.conv2", 1, 1), sd, f"{name}.bn2")
            if f"{name}.downsample.0.weight" in sd:
                shortcut = _batch_norm(conv(x, f"{name}.downsample.0", block_stride, 0), sd, f"{name}.downsample.1")
            else:
                shortcut = x
            x = relu(y + shortcut)
        features[stage] = x
    return features


def _relative_error(actual, expected):
    return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def _random_unfolded_state_dict(seed):
    """torchvision-layout ResNet-18 (to layer3) with random weights and batch-norm statistics."""
    rng = np.random.default_rng(seed)
    sd = {}
    for key, path in teacher.torchvision_key_map("layer3").items():
        module = path[-2]
        is_conv = "conv" in module
        if is_conv and key.endswith(".bias"):
            continue  # torchvision convolutions before batch norm have no bias.
        if key.endswith(".weight") and is_conv:
            name = key[: -len(".weight")]
            out_c, in_c, k = _conv_shape(name)
            sd[key] = rng.normal(0, np.sqrt(2.0 / (in_c * k * k)), (out_c, in_c, k, k)).astype(np.float32)
        else:
            channels = _bn_channels(key)
            if key.endswith(".weight"):
                sd[key] = rng.uniform(0.5, 1.5, channels).astype(np.float32)
            elif key.endswith(".bias"):
                sd[key] = rng.normal(0, 0.1, channels).astype(np.float32)
            elif key.endswith("running_mean"):
                sd[key] = rng.normal(0, 0.2, channels).astype(np.float32)
            else:
                sd[key] = rng.uniform(0.5, 2.0, channels).astype(np.float32)
    return sd


def _stage_width(name):
    if name.startswith("layer2"):
        return 128
    if name.startswith("layer3"):
        return 256
    return 64


def _conv_shape(name):
    width = _stage_width(name)
    if name == "conv1":
        return 64, 3, 7
    if name.endswith("downsample.0"):
        return width, width // 2, 1
    first_conv_of_strided_block = name.endswith(".0.conv1") and not name.startswith("layer1")
    return width, (width // 2 if first_conv_of_strided_block else width), 3


def _bn_channels(key):
    return 64 if key.startswith("bn1") else _stage_width(key)


@pytest.fixture(scope="module")
def odd_image():
    # 45 x 59 px: odd sides exercise the padding of every stride-2 layer.
    rng = np.random.default_rng(7)
    return rng.uniform(0.0, 1.0, (45, 59)).astype(np.float32)


@pytest.mark.parametrize("form", ["rgb", "gray"])
def test_shared_weights_match_numpy_resnet(shared_dir, odd_image, form):
    # The gray form folds the three channels into conv1; it must still give
    # the RGB network's features.
    folder = shared_dir / "weights" / "resnet18_imagenet_bnfolded"
    variables = teacher.load_pretrained(folder)
    state_dict = {path.stem: np.load(path) for path in folder.glob("*.npy")}
    inputs = teacher.preprocess(odd_image) if form == "rgb" else odd_image[None]

    features = teacher.ResNet18().apply(variables, inputs)
    normalised = np.asarray(teacher.preprocess(odd_image))[0].transpose(2, 0, 1).astype(np.float64)
    expected = _reference_resnet18(normalised, state_dict)

    for layer in teacher.LAYERS:
        actual = np.asarray(features[layer][0]).transpose(2, 0, 1)
        assert actual.shape == expected[layer].shape, layer
        # float32 JAX against float64 NumPy: 1e-4 relative (Frobenius norm).
        assert _relative_error(actual, expected[layer]) < 1e-4, layer


def test_gray_input_on_canvas_pads_outside_image(odd_image):
    # A 45 x 59 image at rows 3-47 and columns 5-63 of a 56 x 72 canvas with
    # other values around it. Given the indicators, the stem must see zero
    # padding outside the image, as the RGB form does for a zeroed input.
    variables = teacher.random_variables(jax.random.key(1), last_layer="stem")
    canvas = np.full((1, 56, 72), 0.7, np.float32)
    canvas[0, 3:48, 5:64] = odd_image
    rows_inside = np.zeros((1, 56), np.float32)
    rows_inside[0, 3:48] = 1.0
    cols_inside = np.zeros((1, 72), np.float32)
    cols_inside[0, 5:64] = 1.0
    inside = (rows_inside[:, :, None] * cols_inside[:, None, :])[..., None]
    model = teacher.ResNet18(last_layer="stem")

    gray = model.apply(variables, canvas, (rows_inside, cols_inside))["stem"]
    rgb = model.apply(variables, teacher.preprocess(canvas) * inside)["stem"]

    assert gray.shape == rgb.shape == (1, 28, 36, 64)
    assert _relative_error(np.asarray(gray), np.asarray(rgb)) < 1e-5


@pytest.mark.parametrize("band_rows", [1, 3, 8])
@pytest.mark.parametrize("shape", [(2, 64, 64), (1, 45, 59), (1, 70, 37)])
def test_pooled_stem_matches_module(shape, band_rows):
    # Random batch-norm statistics, so that the banded bn1 is checked too.
    state_dict = _random_unfolded_state_dict(seed=5)
    variables = teacher.load_state_dict(state_dict, last_layer="layer2")
    images = np.random.default_rng(2).uniform(0.0, 1.0, shape).astype(np.float32)

    expected = teacher.ResNet18(last_layer="layer2").apply(variables, images)
    pooled = teacher.pooled_stem(variables, images, band_rows=band_rows)
    actual = teacher.ResNet18(last_layer="layer2", from_stem=True).apply(variables, pooled)

    assert set(actual) == {"layer1", "layer2"}
    for layer in ("layer1", "layer2"):
        assert actual[layer].shape == expected[layer].shape, layer
        assert _relative_error(np.asarray(actual[layer]), np.asarray(expected[layer])) < 1e-5, layer


def test_canvas_features_without_stem_match(odd_image):
    state_dict = _random_unfolded_state_dict(seed=6)
    variables = teacher.load_state_dict(state_dict, last_layer="layer2")
    images = np.zeros((2, 64, 80), np.float32)
    images[0, :45, :59] = odd_image
    images[1] = np.random.default_rng(4).uniform(0.0, 1.0, (64, 80))
    extents = canvas.make_extents(np.zeros((2, 2)), np.array([[45, 59], [64, 80]]))

    expected = canvas.canvas_features(variables, images, extents, "layer2")
    actual = canvas.canvas_features(variables, images, extents, "layer2", with_stem=False)

    assert "stem" not in actual
    for layer in ("layer1", "layer2"):
        assert _relative_error(np.asarray(actual[layer]), np.asarray(expected[layer])) < 1e-5, layer


def test_from_stem_rejects_an_image():
    variables = teacher.random_variables(jax.random.key(0), last_layer="layer1")
    with pytest.raises(ValueError, match=r"from_stem=True expects the \[B, h, w, 64\] max-pooled stem"):
        teacher.ResNet18(last_layer="layer1", from_stem=True).apply(variables, jnp.zeros((1, 32, 32, 3)))


def test_separate_batch_norm_matches_numpy(odd_image):
    state_dict = _random_unfolded_state_dict(seed=3)
    variables = teacher.load_state_dict(state_dict)

    features = teacher.ResNet18().apply(variables, teacher.preprocess(odd_image))
    normalised = np.asarray(teacher.preprocess(odd_image))[0].transpose(2, 0, 1).astype(np.float64)
    expected = _reference_resnet18(normalised, state_dict)

    for layer in teacher.LAYERS:
        actual = np.asarray(features[layer][0]).transpose(2, 0, 1)
        assert _relative_error(actual, expected[layer]) < 1e-4, layer


def test_output_shapes_per_layer(odd_image):
    variables = teacher.random_variables(jax.random.key(0))
    features = teacher.ResNet18().apply(variables, teacher.preprocess(odd_image))
    # ceil(45 / 2) = 23, ceil(59 / 2) = 30; each stride-2 stage halves again, rounding up.
    assert features["stem"].shape == (1, 23, 30, 64)
    assert features["layer1"].shape == (1, 12, 15, 64)
    assert features["layer2"].shape == (1, 6, 8, 128)
    assert features["layer3"].shape == (1, 3, 4, 256)


def test_last_layer_stops_early(odd_image):
    variables = teacher.random_variables(jax.random.key(0), last_layer="layer1")
    features = teacher.ResNet18(last_layer="layer1").apply(variables, teacher.preprocess(odd_image))
    assert set(features) == {"stem", "layer1"}
    assert "layer2_0" not in variables["params"]


def test_max_pool_pads_with_negative_infinity():
    # With all-negative input to the pool, zero padding would leak zeros into
    # the border outputs; -inf padding keeps the true window maximum.
    x = -jnp.arange(1.0, 26.0).reshape(1, 5, 5, 1)
    pooled = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    expected = _max_pool(np.asarray(x[0, :, :, 0])[None])[0]
    np.testing.assert_array_equal(np.asarray(pooled[0, :, :, 0]), expected)
    assert float(pooled[0, 0, 0, 0]) == -1.0


def test_bad_inputs_are_rejected():
    variables = teacher.random_variables(jax.random.key(0), last_layer="stem")
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\].*\[B, H, W\] grayscale; got shape \(1, 32, 32, 1\)"):
        teacher.ResNet18(last_layer="stem").apply(variables, jnp.zeros((1, 32, 32, 1)))
    with pytest.raises(ValueError, match="layer9"):
        teacher.ResNet18(last_layer="layer9").apply(variables, jnp.zeros((1, 32, 32, 3)))


def test_state_dict_errors_list_every_key():
    state_dict = _random_unfolded_state_dict(seed=1)
    del state_dict["layer1.0.conv1.weight"]
    state_dict["layer2.0.conv2.weight"] = np.zeros((128, 128, 5, 5), np.float32)
    state_dict["head.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(ValueError) as error:
        teacher.load_state_dict(state_dict)
    message = str(error.value)
    assert "missing key 'layer1.0.conv1.weight'" in message
    assert "'layer2.0.conv2.weight' has shape (128, 128, 5, 5)" in message
    assert "unexpected key 'head.weight'" in message
    assert "3 problem(s)" in message


def test_load_pretrained_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="TSJAX_TEACHER_WEIGHTS"):
        teacher.load_pretrained(tmp_path / "absent")
