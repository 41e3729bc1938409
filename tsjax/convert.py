"""Convert a ResNet-18 checkpoint into the teacher's weight file.

Example:
  python -m tsjax.convert resnet18-f37072fd.pth --out pretrained/resnet18_imagenet.npz

The output is an ``.npz`` of float32 tensors under torchvision's keys,
restricted to the ones ``tsjax.teacher.ResNet18(last_layer)`` uses.
``tsjax.teacher.load_pretrained`` turns it back into exactly the variables
that ``convert`` returned, bit for bit, because both go through
``tsjax.teacher.load_state_dict`` from the same float32 arrays.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from typing import Mapping, Sequence

import numpy as np

from tsjax.state_dict_io import read_state_dict, strip_key_prefixes, write_npz
from tsjax.teacher import BN_EPSILON, LAYERS, load_state_dict, torchvision_key_map, variables_sha256

__all__ = ["read_state_dict", "fold_batch_norm", "convert", "file_sha256", "main"]

_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _conv_for_bn(bn_module: str) -> str | None:
    """Return the torchvision name of the convolution that feeds ``bn_module``."""
    # torchvision's ResNets pair conv<N> with bn<N> and downsample.0 with downsample.1.
    match = re.fullmatch(r"(.*?)bn(\d+)", bn_module)
    if match:
        return f"{match.group(1)}conv{match.group(2)}"
    match = re.fullmatch(r"(.*)downsample\.1", bn_module)
    if match:
        return f"{match.group(1)}downsample.0"
    return None


def fold_batch_norm(
    state_dict: Mapping[str, np.ndarray], eps: float = BN_EPSILON
) -> dict[str, np.ndarray]:
    """Fold every inference-mode batch norm into the convolution before it.

    With ``s = gamma / sqrt(running_var + eps)`` per output channel, the
    convolution becomes ``w' = w * s`` and ``b' = beta + (b - running_mean) * s``,
    where ``b`` is the convolution's own bias (0 when it has none). Then
    ``conv'(x) == bn(conv(x))`` for batch norm in inference mode. The
    arithmetic is done in float64 and the results are stored as float32.

    Args:
      state_dict: torchvision-named tensors, prefixes already stripped or not
        (pairs are matched on the end of the key). Convolution weights are
        OIHW.
      eps: Batch-norm epsilon, torchvision's default unless the network was
        built with another.

    Returns:
      A new state dict in which each folded batch norm's tensors (and its
      ``num_batches_tracked``) are gone and its convolution has a ``bias``.
      Keys without a batch norm (``fc.*``, already folded convolutions) are
      kept as they are.

    Raises:
      ValueError: if a batch norm lacks some of its four tensors or has no
        matching convolution weight (all such modules are listed).
    """
    bn_modules = sorted(
        {key.rsplit(".", 1)[0] for key in state_dict if key.endswith((".running_mean", ".running_var"))}
    )
    folded = dict(state_dict)
    problems = []
    for bn in bn_modules:
        conv = _conv_for_bn(bn)
        missing = [f"{bn}.{name}" for name in _BN_TENSORS if f"{bn}.{name}" not in state_dict]
        if conv is None or f"{conv}.weight" not in state_dict:
            problems.append(f"batch norm {bn!r} has no convolution weight {conv!r}.weight to fold into")
            continue
        if missing:
            problems.append(f"batch norm {bn!r} lacks {missing}")
            continue

        gamma, beta, mean, var = (np.asarray(state_dict[f"{bn}.{name}"], np.float64) for name in _BN_TENSORS)
        weight = np.asarray(state_dict[f"{conv}.weight"], np.float64)
        bias = np.asarray(state_dict.get(f"{conv}.bias", np.zeros(weight.shape[0])), np.float64)
        scale = gamma / np.sqrt(var + eps)
        # Broadcast the per-output-channel scale over I, H and W of an OIHW weight.
        folded[f"{conv}.weight"] = (weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1))).astype(np.float32)
        folded[f"{conv}.bias"] = (beta + (bias - mean) * scale).astype(np.float32)
        for name in _BN_TENSORS + ("num_batches_tracked",):
            folded.pop(f"{bn}.{name}", None)
    if problems:
        raise ValueError("cannot fold batch norm:\n  " + "\n  ".join(problems))
    return folded


def file_sha256(path: str | os.PathLike) -> str:
    """Return the hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(2**20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert(
    src: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    last_layer: str = "layer3",
    fold_bn: bool = False,
) -> dict:
    """Convert a ResNet-18 checkpoint into teacher variables, optionally saving them.

    Args:
      src: Any checkpoint ``tsjax.state_dict_io.read_state_dict`` reads: a
        ``torch.save`` ``.pth``/``.pt`` (read without torch or pickle
        execution), ``.safetensors``, ``.npz`` or a folder of ``.npy`` files,
        with torchvision's keys, optionally behind ``module.``, ``backbone.``
        or ``model.`` prefixes. Batch norm may be separate or folded.
      out: Where to write the converted ``.npz``, or None to only return the
        variables.
      last_layer: Deepest teacher stage to keep, one of
        ``tsjax.teacher.LAYERS``. Tensors of deeper stages and ``fc`` are
        dropped, so checkpoints that stop after it convert.
      fold_bn: If True, fold separate batch norm into the convolutions
        (``fold_batch_norm``) before saving. The activations then match the
        unfolded network to float32 rounding, not bit for bit.

    Returns:
      ``{'params', 'batch_stats'}`` for ``ResNet18(last_layer).apply``.
      ``tsjax.teacher.load_pretrained(out, last_layer)`` returns identical
      arrays.

    Raises:
      FileNotFoundError: if ``src`` does not exist.
      UnsafeCheckpointError: if a ``.pth`` pickle references a global a state
        dict does not need.
      ValueError: if the tensors do not match ResNet-18 up to ``last_layer``
        (every missing, unexpected or mis-shaped key is listed with its
        shape), or ``out`` does not end in ``.npz``.
    """
    state_dict = strip_key_prefixes(read_state_dict(src))
    if fold_bn:
        state_dict = fold_batch_norm(state_dict)
    # Validates every key at once before anything is written.
    variables = load_state_dict(state_dict, last_layer)
    if out is not None:
        used = [key for key in torchvision_key_map(last_layer) if key in state_dict]
        write_npz({key: np.asarray(state_dict[key], np.float32) for key in used}, out)
    return variables


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tsjax.convert",
        description="Convert a ResNet-18 checkpoint (.pth/.pt from torch.save, .safetensors, "
        ".npz, or a folder of .npy) into tsjax's teacher weight file. Pickled code in "
        ".pth files is never run.",
    )
    parser.add_argument("src", help="checkpoint file or folder with torchvision's ResNet-18 keys")
    parser.add_argument("--out", required=True, help="output .npz path")
    parser.add_argument(
        "--last_layer",
        default="layer3",
        choices=LAYERS,
        help="deepest teacher stage to keep; deeper stages and fc are dropped (default: layer3)",
    )
    parser.add_argument(
        "--fold_batch_norm",
        action="store_true",
        help="fold separate batch norm into the convolution weights and biases before saving",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line: convert, write, print the checksums.

    Returns:
      0 on success. Errors in the input exit with status 1 and the message
      on stderr.
    """
    args = _parse_args(argv)
    try:
        variables = convert(args.src, args.out, last_layer=args.last_layer, fold_bn=args.fold_batch_norm)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    source_digest = file_sha256(args.src) if os.path.isfile(args.src) else "not computed for a folder"
    print(f"wrote {args.out}")
    print(f"source file sha256:        {source_digest}")
    print(f"teacher variables sha256:  {variables_sha256(variables)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
