"""Benchmark the local ridge stage: JAX solver, batched NumPy, scikit-learn loop.

    python -m experiments.bench_students --flagfile=experiments/case2.flags

Every solver fits each pixel's window on the same teacher features of one
aligned pair, with windows shrunk toward zero and no global prior, and
predicts the pixel. The script checks that their predictions agree and
prints a Markdown table of pixels per second. The solvers are

* ``jax``: ``tsjax.students.local_ridge_predict`` (dual form, Gram entries
  shared between windows, vmapped per-pixel Cholesky, blocks of rows),
  timed after compilation;
* ``numpy_shared``: the same algorithm written with NumPy, so that the
  ratio to ``jax`` measures the implementation and not the algorithm;
* ``numpy_gathered``: the direct batched NumPy solve, which gathers each
  window's ``n x d`` patches and forms its Gram matrix with a batched
  matmul, then solves all windows with ``numpy.linalg.solve``;
* ``numpy_primal``: the batched NumPy solve in primal form, one
  ``d x d`` system per window, on a subset of ``--subset_pixels`` pixels;
* ``sklearn``: ``sklearn.linear_model.Ridge`` fitted pixel by pixel on the
  same subset.

``--large`` also times the full ``LocalRidgeStudent`` fit on random maps of
the shapes that a 4096 x 4096 image gives and reports the peak resident
memory of the process.
"""

from __future__ import annotations

import functools
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import run as runner
from tsjax import hub, io, pipeline
from tsjax.students import LocalRidgeStudent, local_ridge_predict

flags.DEFINE_integer("window", 7, "Odd side of the local ridge window, in feature px.")
flags.DEFINE_integer("leave_out", 1, "Side of the central square left out of each window's fit.")
flags.DEFINE_float("local_alpha", 100.0, "Relative ridge penalty of each window.")
flags.DEFINE_integer(
    "repeats", 5, "Timed rounds of the full-map solvers (each round runs each once); the median is reported."
)
flags.DEFINE_integer(
    "subset_pixels", 100, "Valid pixels fitted by the primal NumPy solve and the scikit-learn loop, the slowest solvers."
)
flags.DEFINE_integer("numpy_chunk", 1024, "Pixels per batch of the gathered NumPy solve.")
flags.DEFINE_bool("large", False, "Also time the student on the feature shapes of a 4096 x 4096 image.")
flags.DEFINE_string("markdown_out", None, "Also write the Markdown table to this file.")

FLAGS = flags.FLAGS

# float32 rounding floor of the penalty, as in tsjax.students.local_ridge.
_ROUNDING_MARGIN = 4.0
_MIN_RELATIVE_PENALTY = 1e-5


def _penalty(alpha, trace, largest_norm, dim, samples):
    eps = np.finfo(np.float32).eps
    floor = np.maximum(_MIN_RELATIVE_PENALTY * trace / samples, _ROUNDING_MARGIN * samples * eps * largest_norm)
    return np.maximum(np.maximum(alpha * trace / dim, floor), np.finfo(np.float32).tiny)


def _window_layout(window: int, leave_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Return the fitted offsets ``[n, 2]``, their window indices, and the centre's index."""
    radius = window // 2
    grid = np.arange(-radius, radius + 1)
    offsets = np.stack(np.meshgrid(grid, grid, indexing="ij"), -1).reshape(-1, 2)
    keep = np.abs(offsets).max(1) > leave_out // 2 if leave_out else np.ones(len(offsets), bool)
    return offsets[keep], np.flatnonzero(keep), len(offsets) // 2


def _centre(ref: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Subtract the valid pixels' channel mean, as the JAX solver does."""
    return (ref - ref[valid].mean(0)).astype(np.float32)


def _patches(ref: np.ndarray, patch_size: int) -> np.ndarray:
    half = patch_size // 2
    height, width = ref.shape[:2]
    padded = np.pad(ref, ((half, half), (half, half), (0, 0)), mode="edge")
    parts = [padded[i : i + height, j : j + width] for i in range(patch_size) for j in range(patch_size)]
    return np.concatenate(parts, axis=-1)


def _solve_windows(gram, cross, weights, targets, alpha, dim):
    """Solve ``P`` windows at once in dual form from ``gram [P, n, n]`` and ``cross [P, n]``."""
    samples = gram.shape[-1]
    share = weights / np.maximum(weights.sum(-1, keepdims=True), 1.0)
    row_mean = np.einsum("pij,pj->pi", gram, share)
    grand_mean = np.einsum("pi,pi->p", share, row_mean)
    centred = gram - row_mean[:, :, None] - row_mean[:, None, :] + grand_mean[:, None, None]
    centred_cross = cross - row_mean - np.einsum("pi,pi->p", cross, share)[:, None] + grand_mean[:, None]
    root = np.sqrt(weights)
    system = root[:, :, None] * centred * root[:, None, :]
    trace = np.einsum("pii->p", system)
    largest_norm = (weights * np.einsum("pii->pi", gram)).max(-1)
    penalty = _penalty(alpha, trace, largest_norm, dim, samples)
    system += penalty[:, None, None] * np.eye(samples, dtype=system.dtype)
    gain = root * np.linalg.solve(system, (root * centred_cross)[..., None])[..., 0]
    beta = share + gain - share * gain.sum(-1, keepdims=True)
    return np.einsum("pn,pnc->pc", beta, targets)


def numpy_gathered(ref, insp, valid, *, patch_size, window, leave_out, alpha, chunk):
    """Predict ``[h, w, C_out]`` with a batched NumPy solve that gathers each window's patches."""
    ref = _centre(ref, valid)
    offsets, _, _ = _window_layout(window, leave_out)
    radius = window // 2
    patches = _patches(ref, patch_size)
    height, width, dim = patches.shape
    padded_patches = np.pad(patches, ((radius, radius), (radius, radius), (0, 0)))
    padded_insp = np.pad(insp, ((radius, radius), (radius, radius), (0, 0)))
    padded_valid = np.pad(valid.astype(np.float32), radius)
    rows, cols = np.divmod(np.arange(height * width), width)
    output = np.empty((height * width, insp.shape[-1]), np.float32)
    for start in range(0, height * width, chunk):
        y = rows[start : start + chunk, None] + radius + offsets[None, :, 0]
        x = cols[start : start + chunk, None] + radius + offsets[None, :, 1]
        inputs = padded_patches[y, x]
        centre = patches[rows[start : start + chunk], cols[start : start + chunk]]
        gram = inputs @ inputs.transpose(0, 2, 1)
        cross = np.einsum("pnd,pd->pn", inputs, centre)
        output[start : start + chunk] = _solve_windows(
            gram, cross, padded_valid[y, x], padded_insp[y, x], alpha, dim
        )
    return output.reshape(height, width, -1)


def numpy_shared(ref, insp, valid, *, patch_size, window, leave_out, alpha):
    """Predict ``[h, w, C_out]`` with a NumPy port of the JAX solver's shared displacement Grams."""
    ref = _centre(ref, valid)
    offsets, fit_index, centre_index = _window_layout(window, leave_out)
    radius, half = window // 2, patch_size // 2
    reach = radius + half
    height, width, channels = ref.shape

    # All (2w - 1)^2 displacement maps, without the symmetry shortcut.
    tile = np.pad(ref, ((reach, reach), (reach, reach), (0, 0)), mode="edge")
    span = 4 * radius + 1
    padded = np.pad(tile, ((2 * radius, 2 * radius), (2 * radius, 2 * radius), (0, 0)))
    products = np.empty((span, span) + tile.shape[:2], np.float32)
    for a in range(span):
        for b in range(span):
            moved = padded[a : a + tile.shape[0], b : b + tile.shape[1]]
            products[a, b] = np.einsum("yxc,yxc->yx", tile, moved)
    out_height, out_width = tile.shape[0] - 2 * half, tile.shape[1] - 2 * half
    grams = sum(
        products[:, :, i : i + out_height, j : j + out_width] for i in range(patch_size) for j in range(patch_size)
    )

    # Each pixel's Gram rows, then one batched solve over all pixels.
    gram_rows = np.stack(
        [
            grams[radius - dy : radius - dy + window, radius - dx : radius - dx + window,
                  radius + dy : radius + dy + height, radius + dx : radius + dx + width].reshape(window * window, -1)
            for dy, dx in offsets
        ],
        axis=0,
    ).transpose(2, 0, 1)
    padded_insp = np.pad(insp, ((radius, radius), (radius, radius), (0, 0)))
    padded_valid = np.pad(valid.astype(np.float32), radius)
    rows, cols = np.divmod(np.arange(height * width), width)
    y = rows[:, None] + radius + offsets[None, :, 0]
    x = cols[:, None] + radius + offsets[None, :, 1]
    dim = patch_size * patch_size * channels
    output = _solve_windows(
        gram_rows[:, :, fit_index], gram_rows[:, :, centre_index], padded_valid[y, x], padded_insp[y, x], alpha, dim
    )
    return output.reshape(height, width, -1)


def numpy_primal(ref, insp, valid, pixels, *, patch_size, window, leave_out, alpha):
    """Predict ``[P, C_out]`` at each ``(y, x)`` of ``pixels`` with a batched NumPy solve in primal form."""
    ref = _centre(ref, valid)
    offsets, _, _ = _window_layout(window, leave_out)
    radius = window // 2
    patches = _patches(ref, patch_size)
    dim = patches.shape[-1]
    padded_patches = np.pad(patches, ((radius, radius), (radius, radius), (0, 0)))
    padded_insp = np.pad(insp, ((radius, radius), (radius, radius), (0, 0)))
    padded_valid = np.pad(valid.astype(np.float32), radius)
    y = pixels[:, :1] + radius + offsets[None, :, 0]
    x = pixels[:, 1:] + radius + offsets[None, :, 1]
    inputs, targets, weights = padded_patches[y, x], padded_insp[y, x], padded_valid[y, x]
    share = weights / np.maximum(weights.sum(-1, keepdims=True), 1.0)
    input_mean = np.einsum("pn,pnd->pd", share, inputs)
    target_mean = np.einsum("pn,pnc->pc", share, targets)
    scaled = np.sqrt(weights)[..., None] * (inputs - input_mean[:, None])
    scatter = scaled.transpose(0, 2, 1) @ scaled
    trace = np.einsum("pii->p", scatter)
    largest_norm = (weights * (inputs**2).sum(-1)).max(-1)
    penalty = _penalty(alpha, trace, largest_norm, dim, len(offsets))
    scatter += penalty[:, None, None] * np.eye(dim, dtype=scatter.dtype)
    cross = scaled.transpose(0, 2, 1) @ (np.sqrt(weights)[..., None] * (targets - target_mean[:, None]))
    coefficients = np.linalg.solve(scatter, cross)
    centre = patches[pixels[:, 0], pixels[:, 1]]
    return target_mean + np.einsum("pd,pdc->pc", centre - input_mean, coefficients)


def sklearn_loop(ref, insp, valid, pixels, *, patch_size, window, leave_out, alpha):
    """Predict ``[P, C_out]`` at each ``(y, x)`` of ``pixels`` with one ``sklearn.linear_model.Ridge`` each."""
    from sklearn.linear_model import Ridge

    ref = _centre(ref, valid)
    offsets, _, _ = _window_layout(window, leave_out)
    patches = _patches(ref, patch_size)
    height, width, dim = patches.shape
    samples = len(offsets)
    output = np.empty((len(pixels), insp.shape[-1]), np.float32)
    for index, (y, x) in enumerate(pixels):
        yy, xx = y + offsets[:, 0], x + offsets[:, 1]
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        yy, xx = yy[inside], xx[inside]
        keep = valid[yy, xx]
        inputs, targets = patches[yy[keep], xx[keep]], insp[yy[keep], xx[keep]]
        trace = ((inputs - inputs.mean(0)) ** 2).sum()
        largest_norm = (inputs**2).sum(1).max()
        model = Ridge(alpha=float(_penalty(alpha, trace, largest_norm, dim, samples)), solver="cholesky")
        model.fit(inputs, targets)
        output[index] = model.predict(patches[y, x][None])[0]
    return output


def _interleaved_medians(functions: dict, repeats: int) -> dict:
    """Time each function once per round, for ``repeats`` rounds; return the median seconds of each.

    Interleaving the solvers spreads a change in the machine's load over all
    of them instead of one.
    """
    durations = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            jax.block_until_ready(function())
            durations[name].append(time.perf_counter() - start)
    return {name: float(np.median(values)) for name, values in durations.items()}


def _pair_features(config, variables) -> dict:
    """Teacher features and valid masks of the aligned pair named by --reference/--inspected."""
    reference, inspected = io.load_image(FLAGS.reference), io.load_image(FLAGS.inspected)
    alignment, valid = pipeline.align_and_mask(reference, inspected, config.margin)
    pair = jnp.asarray(np.stack([alignment.aligned_reference, inspected]).astype(np.float32))
    features = pipeline.extract_features(variables, pair, config.deepest_layer)
    maps = {}
    for layer in config.layers:
        layer_features = np.asarray(features[layer])
        layer_valid = pipeline.feature_valid(valid, layer, layer_features.shape[1:3])
        maps[layer] = (layer_features[0], layer_features[1], layer_valid)
    return maps


def _bench_layer(layer: str, ref, insp, valid, settings: dict) -> list[dict]:
    """Time every solver on one layer's maps and check they agree."""
    height, width, channels = ref.shape
    pixels = height * width
    jax_solver = jax.jit(functools.partial(local_ridge_predict, form="dual", **settings))
    arguments = (ref[None], insp[None], valid[None])
    start = time.perf_counter()
    jax_output = np.asarray(jax_solver(*arguments))[0]
    logging.info("%s: jax compiled and ran in %.1f s", layer, time.perf_counter() - start)

    numpy_settings = settings
    solvers = {
        "jax": lambda: jax_solver(*arguments),
        "numpy_shared": functools.partial(numpy_shared, ref, insp, valid, **numpy_settings),
        "numpy_gathered": functools.partial(numpy_gathered, ref, insp, valid, chunk=FLAGS.numpy_chunk, **numpy_settings),
    }
    shared_output = solvers["numpy_shared"]()
    gathered_output = solvers["numpy_gathered"]()
    seconds = _interleaved_medians(solvers, FLAGS.repeats)
    rows = [dict(layer=layer, solver=name, pixels=pixels, seconds=seconds[name]) for name in solvers]

    rng = np.random.default_rng(0)
    candidates = np.flatnonzero(valid.reshape(-1))
    chosen = rng.choice(candidates, size=min(FLAGS.subset_pixels, len(candidates)), replace=False)
    subset = np.stack(np.divmod(chosen, width), axis=-1)
    outputs = [jax_output, shared_output, gathered_output]
    for name, solver in (("numpy_primal", numpy_primal), ("sklearn", sklearn_loop)):
        start = time.perf_counter()
        outputs.append(solver(ref, insp, valid, subset, **numpy_settings))
        rows.append(dict(layer=layer, solver=name, pixels=len(subset), seconds=time.perf_counter() - start))

    # Predictions are compared on valid pixels, relative to the largest
    # inspected feature magnitude.
    scale = float(np.abs(insp).max())
    for row, output in zip(rows, outputs):
        if row["pixels"] == pixels:
            difference = np.abs(output - jax_output)[valid]
        else:
            difference = np.abs(output - jax_output[subset[:, 0], subset[:, 1]])
        row["max_rel_diff"] = float(difference.max() / scale)
    for row in rows:
        row.update(
            shape=f"{height}x{width}x{channels}",
            dim=settings["patch_size"] ** 2 * channels,
            px_per_s=row["pixels"] / row["seconds"],
        )
    return rows


def _markdown(rows: list[dict]) -> str:
    lines = [
        "| layer | map (h x w x C) | d | solver | pixels | seconds | pixels/s | JAX speed-up | max diff vs JAX |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    jax_rate = {row["layer"]: row["px_per_s"] for row in rows if row["solver"] == "jax"}
    for row in rows:
        speedup = jax_rate[row["layer"]] / row["px_per_s"]
        lines.append(
            f"| {row['layer']} | {row['shape']} | {row['dim']} | {row['solver']} | {row['pixels']} | "
            f"{row['seconds']:.3f} | {row['px_per_s']:,.0f} | {speedup:.1f}x | {row['max_rel_diff']:.1e} |"
        )
    return "\n".join(lines)


def _bench_large(settings: dict) -> str:
    """Time the full student on the feature shapes of a 4096 x 4096 image."""
    student = LocalRidgeStudent(
        patch_size=settings["patch_size"], window=settings["window"], leave_out=settings["leave_out"],
        local_alpha=settings["alpha"],
    )
    fit = jax.jit(lambda r, y, v: student.fit(r, y, v, None).prediction)
    lines = ["| layer | map (h x w x C) | seconds (compile + run) | pixels/s | peak RSS of the process (GiB) |", "|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    for layer, size, channels in (("layer2", 512, 128), ("layer1", 1024, 64)):
        ref = rng.normal(size=(1, size, size, channels)).astype(np.float32)
        insp = (0.5 * ref + rng.normal(size=ref.shape)).astype(np.float32)
        valid = np.ones((1, size, size), bool)
        start = time.perf_counter()
        jax.block_until_ready(fit(ref, insp, valid))
        seconds = time.perf_counter() - start
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        logging.info("large %s: %.1f s, peak RSS %.2f GiB", layer, seconds, peak_gib)
        lines.append(f"| {layer} | {size}x{size}x{channels} | {seconds:.1f} | {size * size / seconds:,.0f} | {peak_gib:.2f} |")
    return "\n".join(lines)


def main(argv):
    del argv
    config = runner.config_from_flags()
    variables, teacher_info = hub.resolve_teacher(FLAGS.teacher_weights, last_layer=config.deepest_layer)
    logging.info("teacher weights: %s; JAX devices: %s", teacher_info["source"], jax.devices())
    settings = dict(
        patch_size=config.patch_size, window=FLAGS.window, leave_out=FLAGS.leave_out, alpha=FLAGS.local_alpha
    )
    rows = []
    for layer, (ref, insp, valid) in _pair_features(config, variables).items():
        rows += _bench_layer(layer, ref, insp, valid, settings)
    table = _markdown(rows)
    if FLAGS.large:
        table += "\n\n" + _bench_large(settings)
    print(table)
    if FLAGS.markdown_out:
        with open(FLAGS.markdown_out, "w") as handle:
            handle.write(table + "\n")


if __name__ == "__main__":
    app.run(main)
