"""Measure pipeline throughput: per stage, end to end, against a NumPy/SciPy reference.

    python -m experiments.bench --teacher_weights=../shared/weights/resnet18_imagenet_bnfolded

Every row runs on synthetic line-pattern pairs: a reference and a shifted,
noisier copy of it, rendered exactly rather than interpolated. A row
reports pairs per second, megapixels of inspected image per second,
per-stage time, compilation time (first call minus the fastest repeat)
and the peak resident memory of the process so far. That peak never
decreases, so a row shows at least the peak of every row before it. In
the same process and on the same pairs,
``experiments.numpy_reference`` runs the pipeline in NumPy/SciPy, and the
ratio of pairs per second is reported.

* ``--batches`` at ``--batch_image_size``: ``tsjax.batch.detect_batch``
  with one compiled call per batch of ``B`` pairs.
* ``--sizes``: one pair per size, untiled (``detect_batch`` with ``B = 1``,
  up to ``--untiled_max_size``) and tiled (``tsjax.tiling.detect_tiled``),
  with the exponent of time against pixels fitted from 512 px up.
* ``--equality_size``: the maps of ``detect`` and ``detect_tiled`` on one
  pair, compared pixel by pixel.
* ``--defect_size``: a tiled pair with one 3 x 3 px bright defect, which
  must come out as a blob at its location.
* ``--memory_sizes``: a 16-bit pair written to TIFF, loaded with
  ``tsjax.io.load_image`` and detected tile by tile, each size in a fresh
  process so that its peak resident memory is its own.

The Markdown tables replace the ``## Pipeline throughput`` section of
``--markdown_out``. The script runs unchanged on a GPU and records the
device kind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from typing import Callable, Sequence

import jax
import numpy as np
import tifffile
from absl import app, flags, logging

from experiments import numpy_reference
from tsjax import batch, io, pipeline, teacher, tiling
from tsjax.config import DetectionConfig

flags.DEFINE_string("teacher_weights", None, "Teacher weights (default: TSJAX_TEACHER_WEIGHTS).")
flags.DEFINE_list("batches", ["1", "4", "16", "64"], "Batch sizes B for the batch rows.")
flags.DEFINE_integer("batch_image_size", 480, "Side in px of the pairs in the batch rows.")
flags.DEFINE_list("sizes", ["256", "512", "1024", "2048", "4096"], "Image sides in px for the size rows.")
flags.DEFINE_integer("untiled_max_size", 2048, "Largest side run untiled in the size rows.")
flags.DEFINE_integer("numpy_max_size", 4096, "Largest side the NumPy reference runs on.")
flags.DEFINE_integer("tile_size", tiling.DEFAULT_TILE_SIZE, "Tile interior side in px for the tiled rows.")
flags.DEFINE_integer("tile_batch", tiling.DEFAULT_TILE_BATCH, "Tiles per compiled call.")
flags.DEFINE_integer("repeats", 3, "Steady-state repeats per row; the fastest is reported.")
flags.DEFINE_integer("large_repeats", 1, "Steady-state repeats for sides of 2048 px and more.")
flags.DEFINE_integer("defect_size", 2048, "Side of the tiled single-defect pair; 0 skips it.")
flags.DEFINE_integer("equality_size", 1024, "Side of the pair whose tiled and untiled maps are compared; 0 skips it.")
flags.DEFINE_integer("equality_tile_size", 256, "Tile interior side in px for the equality check.")
flags.DEFINE_list("memory_sizes", ["2048", "8192"], "Sides of the 16-bit tiled memory runs; empty skips them.")
flags.DEFINE_string("markdown_out", "docs/benchmarks.md", "File whose '## Pipeline throughput' section is replaced.")
flags.DEFINE_string("json_out", None, "Also write every measurement to this JSON file.")
flags.DEFINE_enum("mode", "all", ["all", "memory"], "'memory' runs one --memory_run_size pair and prints JSON.")
flags.DEFINE_integer("memory_run_size", 0, "Side of the pair in --mode=memory.")

FLAGS = flags.FLAGS

_SECTION = "## Pipeline throughput"
_STAGES = batch.STAGES


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Every setting of one benchmark run (see the flags for their meaning)."""

    teacher_weights: str
    batches: tuple[int, ...]
    batch_image_size: int
    sizes: tuple[int, ...]
    untiled_max_size: int
    numpy_max_size: int
    tile_size: int
    tile_batch: int
    repeats: int
    large_repeats: int
    defect_size: int
    equality_size: int
    equality_tile_size: int
    memory_sizes: tuple[int, ...]
    markdown_out: str | None
    json_out: str | None


def _box_coverage(count: int, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
    # Length of each [start, stop) interval inside pixel [i - 0.5, i + 0.5), summed over intervals.
    centres = np.arange(count, dtype=np.float32)[:, None]
    return np.clip(np.minimum(centres + 0.5, stop) - np.maximum(centres - 0.5, start), 0.0, 1.0).sum(axis=1)


def _profile(count: int, rng: np.random.Generator, offset: float) -> np.ndarray:
    # Lines 3-9 px wide at a 12-40 px pitch along one axis, shifted by offset px.
    starts, position = [], -20.0
    while position < count + 20:
        position += rng.uniform(12.0, 40.0)
        starts.append(position)
    starts = np.asarray(starts, np.float32)
    widths = rng.uniform(3.0, 9.0, starts.size).astype(np.float32)
    coverage = np.zeros(count, np.float32)
    for chunk in range(0, starts.size, 256):
        part = slice(chunk, chunk + 256)
        coverage += _box_coverage(count, starts[part] + offset, starts[part] + widths[part] + offset)
    return np.clip(coverage, 0.0, 1.0)


def line_pair(
    side: int, seed: int, shift: tuple[float, float] = (3.4, -2.65), defect: tuple[int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Render a reference and a shifted, noisier inspected image of a line pattern.

    The pattern is a grid of horizontal and vertical lines whose pixel
    values are exact box integrals, so the shift moves the geometry without
    interpolation. Rows are rendered one band at a time to keep the memory
    of an 8192 px pair at a few image copies.

    Args:
      side: Image side in px.
      seed: Seed of the layout and the noise.
      shift: ``(dy, dx)`` of the inspected image against the reference, px.
      defect: ``(row, col)`` of a 3 x 3 px bright square in the inspected image.

    Returns:
      ``(reference, inspected)``, each ``[side, side]`` float32 in [0, 1].
    """
    layout = np.random.default_rng(seed)
    state = layout.bit_generator.state
    images = []
    for index, (dy, dx) in enumerate(((0.0, 0.0), shift)):
        layout.bit_generator.state = state
        rows = _profile(side, layout, dy)
        cols = _profile(side, layout, dx)
        noise = np.random.default_rng([seed, index])
        image = np.empty((side, side), np.float32)
        for top in range(0, side, 1024):
            band = slice(top, top + 1024)
            lines = np.maximum(rows[band, None], 0.7 * cols[None, :])
            values = 0.25 + 0.5 * lines + (0.02 + 0.01 * index) * noise.standard_normal((lines.shape[0], side), np.float32)
            image[band] = values
        images.append(np.clip(image, 0.0, 1.0))
    if defect is not None:
        row, col = defect
        images[1][row - 1 : row + 2, col - 1 : col + 2] = 1.0
    return images[0], images[1]


def _peak_rss_mb() -> float:
    # VmHWM restarts with each exec, while ru_maxrss of a process started by
    # fork and exec also counts the parent's pages at the fork. Both are KiB.
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _device_peak_mb() -> float | None:
    # Accelerators report their allocator's peak; the CPU client reports nothing.
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / 2**20


def _measure(run: Callable[[], list], pairs: int, pixels: int, repeats: int) -> dict:
    """Time ``run`` once cold and ``repeats`` times warm.

    Returns:
      ``pairs_per_s``, ``megapixels_per_s`` (inspected image px), the
      per-pair ``stages_s`` of the fastest repeat, ``compile_s`` (first call
      minus the fastest repeat, per batch) and ``peak_rss_mb``.
    """
    start = time.perf_counter()
    first = run()
    first_s = time.perf_counter() - start
    times, stage_rows = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        results = run()
        times.append(time.perf_counter() - start)
        stage_rows.append(_per_pair_stages(results))
    # The fastest repeat is the one least slowed by other processes on the
    # machine, so it stands for the steady state.
    fastest = int(np.argmin(times))
    steady = times[fastest]
    stages = stage_rows[fastest]
    return {
        "pairs": pairs,
        "pairs_per_s": pairs / steady,
        "megapixels_per_s": pairs * pixels / steady / 1e6,
        "seconds_per_batch": steady,
        "stages_s": stages,
        "compile_s": max(first_s - steady, 0.0),
        "peak_rss_mb": _peak_rss_mb(),
        "device_peak_mb": _device_peak_mb(),
        "first_result": first,
    }


def _per_pair_stages(results: list) -> dict[str, float]:
    # Each Detection of a batch carries its share of the batch's stage time,
    # and a NumPy result its own time, so the mean is the per-pair time.
    rows = [result["timings_s"] if isinstance(result, dict) else result.timings_s for result in results]
    return {stage: float(np.mean([row.get(stage, 0.0) for row in rows])) for stage in _STAGES}


def _fitted_exponent(rows: list[dict]) -> float | None:
    # Least-squares slope of log(seconds per pair) against log(pixels).
    points = [(row["side"] ** 2, 1.0 / row["pairs_per_s"]) for row in rows if row["side"] >= 512]
    if len(points) < 2:
        return None
    pixels, seconds = np.log(np.asarray(points)).T
    return float(np.polyfit(pixels, seconds, 1)[0])


def _batch_rows(config: BenchConfig, variables, detection_config: DetectionConfig) -> list[dict]:
    side = config.batch_image_size
    pool = [line_pair(side, seed) for seed in range(max(config.batches))]
    # The reference runs first, before any XLA work, and takes the fastest of
    # at least 5 repeats. Measured after the JAX rows with 3 repeats, its
    # time per pair varied from 686 to 842 ms between runs, while the JAX
    # pipeline's varied by 3%.
    reference, inspected = pool[0]
    numpy_row = _measure(
        lambda: [numpy_reference.detect_numpy(reference, inspected, variables, detection_config)],
        1,
        side * side,
        max(config.repeats, 5),
    )
    numpy_row.update(kind="NumPy/SciPy", side=side, batch=1)
    logging.info("NumPy reference at %d px: %.3f pairs/s", side, numpy_row["pairs_per_s"])
    rows = []
    for count in sorted(config.batches):
        references = [reference for reference, _ in pool[:count]]
        inspected = [target for _, target in pool[:count]]

        def run(references=references, inspected=inspected, count=count):
            return batch.detect_batch(references, inspected, variables, detection_config, batch_size=count)

        row = _measure(run, count, side * side, config.repeats)
        row.update(kind="JAX batch", side=side, batch=count)
        logging.info("batch %d of %d px: %.3f pairs/s, compile %.1f s", count, side, row["pairs_per_s"], row["compile_s"])
        rows.append(row)

    jax_map = rows[0]["first_result"][0].defect_map
    numpy_row["max_map_difference"] = float(np.abs(numpy_row["first_result"][0]["defect_map"] - jax_map).max())
    rows.append(numpy_row)
    return rows


def _size_rows(config: BenchConfig, variables, detection_config: DetectionConfig) -> list[dict]:
    rows = []
    for side in sorted(config.sizes):
        reference, inspected = line_pair(side, seed=side)
        repeats = config.repeats if side < 2048 else config.large_repeats
        runs = []
        if side <= config.untiled_max_size:
            runs.append(("JAX untiled", lambda: batch.detect_batch([reference], [inspected], variables, detection_config)))
        runs.append(
            (
                "JAX tiled",
                lambda: [
                    tiling.detect_tiled(
                        reference,
                        inspected,
                        variables,
                        detection_config,
                        tile_size=config.tile_size,
                        tile_batch=config.tile_batch,
                    )
                ],
            )
        )
        if side <= config.numpy_max_size:
            runs.append(
                ("NumPy/SciPy", lambda: [numpy_reference.detect_numpy(reference, inspected, variables, detection_config)])
            )
        for kind, run in runs:
            row = _measure(run, 1, side * side, repeats)
            row.update(kind=kind, side=side, batch=1)
            logging.info("%s at %d px: %.4f pairs/s, %.2f Mpx/s", kind, side, row["pairs_per_s"], row["megapixels_per_s"])
            rows.append(row)
    return rows


def _equality_row(config: BenchConfig, variables, detection_config: DetectionConfig) -> dict:
    side, tile = config.equality_size, config.equality_tile_size
    reference, inspected = line_pair(side, seed=3, defect=(side // 3, side // 2))
    untiled = pipeline.detect(reference, inspected, variables, detection_config)
    tiled = tiling.detect_tiled(reference, inspected, variables, detection_config, tile_size=tile)
    difference = np.abs(untiled.defect_map - tiled.defect_map)
    row = {
        "side": side,
        "tile_size": tile,
        "tiles": tiling.plan_tiles((side, side), detection_config, tile).count,
        "max_difference": float(difference.max()),
        "same_blobs": [blob["bbox"] for blob in untiled.blobs] == [blob["bbox"] for blob in tiled.blobs],
    }
    logging.info("tiled against untiled at %d px: %s", side, row)
    return row


def _blob_summary(blobs: list[dict], location: tuple[int, int]) -> dict:
    # Blobs are sorted by score_max, so the first one is the strongest.
    distances = [float(np.hypot(blob["y"] - location[0], blob["x"] - location[1])) for blob in blobs]
    return {
        "blobs": len(blobs),
        "strongest_blob_px": distances[0] if blobs else None,
        "strongest_score": blobs[0]["score_max"] if blobs else None,
        "runner_up_score": blobs[1]["score_max"] if len(blobs) > 1 else None,
    }


def _defect_row(config: BenchConfig, variables, detection_config: DetectionConfig) -> dict:
    side = config.defect_size
    location = (int(side * 0.61), int(side * 0.37))
    reference, inspected = line_pair(side, seed=7, defect=location)
    start = time.perf_counter()
    detection = tiling.detect_tiled(
        reference, inspected, variables, detection_config, tile_size=config.tile_size, tile_batch=config.tile_batch
    )
    seconds = time.perf_counter() - start
    row = {"side": side, "defect": list(location), "seconds": seconds, **_blob_summary(detection.blobs, location)}
    logging.info("defect run at %d px: %s", side, row)
    return row


def _memory_run(side: int, variables, detection_config: DetectionConfig, tile_size: int, tile_batch: int) -> dict:
    """Detect one 16-bit pair read from TIFF, for ``--mode=memory`` in a fresh process."""
    location = (side // 2 + 5, side // 3)

    folder = tempfile.mkdtemp(prefix="tsjax_bench_")
    paths = []
    for name, image in zip(("reference", "inspected"), line_pair(side, seed=11, defect=location)):
        path = os.path.join(folder, f"{name}.tif")
        tifffile.imwrite(path, np.round(image * 65535).astype(np.uint16))
        paths.append(path)
        del image
    reference, inspected = (io.load_image(path) for path in paths)
    loaded_mb = _peak_rss_mb()

    start = time.perf_counter()
    detection = tiling.detect_tiled(
        reference, inspected, variables, detection_config, tile_size=tile_size, tile_batch=tile_batch
    )
    seconds = time.perf_counter() - start
    for path in paths:
        os.remove(path)
    os.rmdir(folder)

    plan = tiling.plan_tiles(inspected.shape, detection_config, tile_size)
    return {
        "side": side,
        "seconds": seconds,
        "timings_s": detection.timings_s,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_after_loading_mb": loaded_mb,
        "tile_features_mb": tile_batch * tiling.tile_feature_bytes(plan, detection_config) / 2**20,
        "tiles": plan.count,
        **_blob_summary(detection.blobs, location),
    }


def _memory_rows(config: BenchConfig) -> list[dict]:
    rows = []
    for side in config.memory_sizes:
        command = [
            sys.executable,
            "-m",
            "experiments.bench",
            "--mode=memory",
            f"--memory_run_size={side}",
            f"--teacher_weights={config.teacher_weights}",
            f"--tile_size={config.tile_size}",
            f"--tile_batch={config.tile_batch}",
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            logging.error("memory run at %d px failed: %s", side, completed.stderr[-2000:])
            rows.append({"side": side, "error": completed.stderr[-500:]})
            continue
        row = json.loads(completed.stdout.strip().splitlines()[-1])
        logging.info("memory run at %d px: %s", side, row)
        rows.append(row)
    return rows


def _machine() -> dict:
    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as meminfo:
            memory_gb = int(meminfo.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        memory_gb = float("nan")
    device = jax.devices()[0]
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gb": round(memory_gb, 1),
        "platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "jax": jax.__version__,
        "numpy": np.__version__,
        "load_average": os.getloadavg(),
    }


def _stage_cells(row: dict) -> list[str]:
    return [f"{1000 * row['stages_s'][stage]:.0f}" for stage in _STAGES]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def _command(config: dict) -> str:
    """Return the command line of a run: the weights and every flag that differs from its default."""
    parts = ["python -m experiments.bench"]
    for name, value in config.items():
        if name not in FLAGS:
            continue
        default = FLAGS[name].default
        if isinstance(value, (list, tuple)):
            text, default_text = ",".join(map(str, value)), ",".join(map(str, default or []))
        else:
            text, default_text = str(value), str(default)
        if name == "teacher_weights" or text != default_text:
            parts.append(f"--{name}={text}")
    return " ".join(parts)


def _load_remark(load: float, cores: int) -> str:
    # A load average above the core count means other processes competed
    # for the cores during the run.
    if load > cores:
        return " (above the core count: other processes shared the machine)."
    return "."


def _markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        _SECTION,
        "",
        f"Measured by `python -m experiments.bench` on {machine['cpu']} ({machine['cores']} cores, "
        f"{machine['memory_gb']} GB), device `{machine['device_kind']}` ({machine['platform']}, "
        f"{machine['device_count']} device(s)), JAX {machine['jax']}, NumPy {machine['numpy']}. "
        f"Load average before and after: {results['load_before'][0]:.1f} and {machine['load_average'][0]:.1f}"
        + _load_remark(max(results["load_before"][0], machine["load_average"][0]), machine["cores"]),
        "",
        f"Run: `{_command(results['config'])}`. "
        "The NumPy/SciPy reference is `experiments/numpy_reference.py`: im2col convolutions and the ridge "
        "normal equations on BLAS, the same alignment and thresholding code. docs/scaling.md explains the "
        "design and why the CPU rows look as they do.",
        "",
        "Stage columns are milliseconds per pair in the steady state, the fastest of the repeats (a batch's "
        "stage time divided by its pairs). Compile is the first call's time minus the steady-state time, for the "
        "whole batch. Peak RSS is the "
        "process's peak resident memory up to the end of the row, so a row shows at least the peak of the rows "
        "before it. Mpx/s counts inspected-image pixels.",
        "",
    ]
    batch_rows = results["batch_rows"]
    if batch_rows:
        reference = next(row for row in batch_rows if row["kind"] == "NumPy/SciPy")
        single = next(row for row in batch_rows if row["kind"] == "JAX batch" and row["batch"] == 1)
        lines += [f"### Batches of {batch_rows[0]['side']} x {batch_rows[0]['side']} px pairs", ""]
        cells = []
        for row in batch_rows:
            cells.append(
                [row["kind"], str(row["batch"]), *_stage_cells(row), f"{row['pairs_per_s']:.3f}",
                 f"{row['megapixels_per_s']:.3f}", f"{row['pairs_per_s'] / reference['pairs_per_s']:.2f}",
                 f"{row['pairs_per_s'] / single['pairs_per_s']:.2f}", f"{row['compile_s']:.1f}", f"{row['peak_rss_mb']:.0f}"]
            )
        header = ["pipeline", "B", *(f"{stage} ms" for stage in _STAGES), "pairs/s", "Mpx/s", "x NumPy", "x B=1",
                  "compile s", "peak RSS MB"]
        lines += _table(header, cells)
        batched = [row for row in batch_rows if row["kind"] == "JAX batch"]
        best = max(batched, key=lambda row: row["pairs_per_s"])
        sixteen = next((row for row in batched if row["batch"] == 16), None)
        ratio = best["pairs_per_s"] / reference["pairs_per_s"]
        lines += [
            "",
            f"Largest |D_JAX - D_NumPy| on the first pair: {reference['max_map_difference']:.1e}.",
            "",
            f"- End to end, steady state: {single['pairs_per_s'] / reference['pairs_per_s']:.2f} times the "
            f"NumPy/SciPy reference's pairs per second at B = 1 and {ratio:.2f} at B = {best['batch']}; "
            f"the target of 3 is {'met' if ratio >= 3 else 'not met'}.",
        ]
        if sixteen is not None:
            gain = sixteen["pairs_per_s"] / single["pairs_per_s"]
            lines.append(
                f"- B = 16 against B = 1, per pair: {gain:.2f} times; the target of 1.5 is "
                f"{'met' if gain >= 1.5 else 'not met'}."
            )
        lines.append("")

    size_rows = results["size_rows"]
    if size_rows:
        lines += ["### One pair per size", ""]
        numpy_speed = {row["side"]: row["pairs_per_s"] for row in size_rows if row["kind"] == "NumPy/SciPy"}
        cells = []
        for row in size_rows:
            ratio = row["pairs_per_s"] / numpy_speed[row["side"]] if row["side"] in numpy_speed else float("nan")
            cells.append(
                [f"{row['side']}", row["kind"], *_stage_cells(row), f"{row['pairs_per_s']:.4f}",
                 f"{row['megapixels_per_s']:.3f}", f"{ratio:.2f}", f"{row['compile_s']:.1f}", f"{row['peak_rss_mb']:.0f}"]
            )
        header = ["side px", "pipeline", *(f"{stage} ms" for stage in _STAGES), "pairs/s", "Mpx/s", "x NumPy",
                  "compile s", "peak RSS MB"]
        lines += _table(header, cells)
        lines.append("")
        for kind, exponent in results["exponents"].items():
            if exponent is not None:
                verdict = "" if kind.startswith("NumPy") else f"; the target of 1.1 is {'met' if exponent <= 1.1 else 'not met'}"
                lines.append(f"- {kind}: time per pair grows as pixels^{exponent:.2f} from 512 px up{verdict}.")
        lines.append("")

    equality = results.get("equality_row")
    if equality:
        lines += [
            "### Tiled against untiled",
            "",
            f"On a {equality['side']} x {equality['side']} px pair, {equality['tiles']} tiles of "
            f"{equality['tile_size']} px against `pipeline.detect`: largest |difference| of the defect maps "
            f"{equality['max_difference']:.1e} over the whole image, "
            + ("the same blobs." if equality["same_blobs"] else "different blobs."),
            "",
        ]
    defect = results.get("defect_row")
    if defect:
        lines += [
            "### Single defect on a large pair",
            "",
            f"A {defect['side']} x {defect['side']} px line pattern with one 3 x 3 px bright defect at "
            f"(row, col) = ({defect['defect'][0]}, {defect['defect'][1]}), detected tile by tile in "
            f"{defect['seconds']:.1f} s: {_describe_blobs(defect)}.",
            "",
        ]
    memory_rows = results["memory_rows"]
    if memory_rows:
        lines += ["### 16-bit pairs tile by tile, each in a fresh process", ""]
        cells = []
        for row in memory_rows:
            if "error" in row:
                cells.append([str(row["side"]), "failed", "", "", "", "", ""])
                continue
            cells.append(
                [str(row["side"]), f"{row['seconds']:.1f}", str(row["tiles"]), f"{row['rss_after_loading_mb']:.0f}",
                 f"{row['peak_rss_mb']:.0f}", f"{row['tile_features_mb']:.0f}", _describe_blobs(row)]
            )
        header = ["side px", "seconds", "tiles", "RSS after loading MB", "peak RSS MB", "tile batch features MB",
                  "blobs"]
        lines += _table(header, cells)
        lines.append("")
    return "\n".join(lines)


def _describe_blobs(row: dict) -> str:
    if not row["blobs"]:
        return "no blob"
    text = (
        f"{row['blobs']} blob(s); the strongest (D = {row['strongest_score']:.2f}) lies "
        f"{row['strongest_blob_px']:.1f} px from the defect"
    )
    if row["runner_up_score"] is not None:
        text += f", the next has D = {row['runner_up_score']:.2f}"
    return text


def _write_section(path: str, section: str) -> None:
    # Replace this script's section and keep every other section of the file.
    text = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    start = text.find(_SECTION)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(_SECTION))
        text = text[:start] + section + ("\n" + text[end + 1 :] if end >= 0 else "")
    with open(path, "w") as handle:
        handle.write(text.rstrip("\n") + "\n")


def run_benchmark(config: BenchConfig) -> dict:
    """Run every requested row and write the tables; return all measurements."""
    detection_config = DetectionConfig()
    variables = teacher.load_pretrained(config.teacher_weights, last_layer=detection_config.deepest_layer)
    results = {"load_before": os.getloadavg(), "config": dataclasses.asdict(config)}
    results["batch_rows"] = _batch_rows(config, variables, detection_config) if config.batches else []
    results["size_rows"] = _size_rows(config, variables, detection_config) if config.sizes else []
    kinds = sorted({row["kind"] for row in results["size_rows"]})
    results["exponents"] = {kind: _fitted_exponent([r for r in results["size_rows"] if r["kind"] == kind]) for kind in kinds}
    results["equality_row"] = _equality_row(config, variables, detection_config) if config.equality_size else None
    results["defect_row"] = _defect_row(config, variables, detection_config) if config.defect_size else None
    results["memory_rows"] = _memory_rows(config)
    results["batch_compiles"] = batch.trace_counts()
    results["machine"] = _machine()
    for row in results["batch_rows"] + results["size_rows"]:
        row.pop("first_result", None)
    if config.markdown_out:
        _write_section(config.markdown_out, _markdown(results))
    if config.json_out:
        with open(config.json_out, "w") as handle:
            json.dump(results, handle, indent=1, default=float)
    return results


def _weights_path() -> str:
    path = FLAGS.teacher_weights or os.environ.get("TSJAX_TEACHER_WEIGHTS")
    if not path:
        raise app.UsageError("no teacher weights given; pass --teacher_weights=PATH or set TSJAX_TEACHER_WEIGHTS.")
    return path


def main(argv):
    del argv
    logging.info("JAX devices: %s", jax.devices())
    if FLAGS.mode == "memory":
        detection_config = DetectionConfig()
        variables = teacher.load_pretrained(_weights_path(), last_layer=detection_config.deepest_layer)
        row = _memory_run(FLAGS.memory_run_size, variables, detection_config, FLAGS.tile_size, FLAGS.tile_batch)
        print(json.dumps(row, default=float))
        return
    config = BenchConfig(
        teacher_weights=_weights_path(),
        batches=tuple(int(value) for value in FLAGS.batches),
        batch_image_size=FLAGS.batch_image_size,
        sizes=tuple(int(value) for value in FLAGS.sizes),
        untiled_max_size=FLAGS.untiled_max_size,
        numpy_max_size=FLAGS.numpy_max_size,
        tile_size=FLAGS.tile_size,
        tile_batch=FLAGS.tile_batch,
        repeats=FLAGS.repeats,
        large_repeats=FLAGS.large_repeats,
        defect_size=FLAGS.defect_size,
        equality_size=FLAGS.equality_size,
        equality_tile_size=FLAGS.equality_tile_size,
        memory_sizes=tuple(int(value) for value in FLAGS.memory_sizes),
        markdown_out=FLAGS.markdown_out,
        json_out=FLAGS.json_out,
    )
    run_benchmark(config)


if __name__ == "__main__":
    app.run(main)
