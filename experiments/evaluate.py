"""Measure detection quality of the method and its baselines on datasets with known defects.

    python -m experiments.evaluate --dataset=../shared/data/wafer \
        --teacher_weights=../shared/weights/resnet18_imagenet_bnfolded
    python -m experiments.evaluate --flagfile=experiments/results.flags

Every method runs on every pair of each ``--dataset`` folder (the layout of
the real wafer data, see ``tsjax.evaluation``) and goes through the same
segmentation and metrics. ``--synthetic_pairs`` adds a synthetic dataset,
generated once into ``--synthetic_dir``. Per dataset, ``--output_dir`` gets
``results.json``, ``summary.md``, ``summary.csv``, ``pairs.csv``, the
curve and recall figures and the defect maps of the first pairs.
``--results_page`` also writes a Markdown page such as ``docs/results.md``.
Each pair's outcome is saved as it finishes, so an
interrupted run resumes, and a method added later (a new student) runs
alone on the saved pairs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time

import jax
from absl import app, flags, logging
from tqdm import tqdm

from tsjax import aggregate, baselines, evaluation, evaluation_report, hub, plots, synth
from tsjax.config import DetectionConfig
from tsjax.methods import Method, teacher_student_method
from tsjax.students import STUDENTS, make_student
from tsjax.teacher import LAYERS

FLAGS = flags.FLAGS

# Layer sets of the ridge student besides the default layer1+layer2.
_RIDGE_LAYER_SETS = {"ridge_layer1": ("layer1",), "ridge_layer2": ("layer2",), "ridge_layer123": ("layer1", "layer2", "layer3")}

# Flags of a student's flagfile that describe the run, not the method.
_RUN_FLAGS = ("reference", "inspected", "output_dir", "overwrite", "teacher_weights", "student")

_EXPERIMENTS_DIR = os.path.dirname(os.path.abspath(__file__))
# Flagfiles name nested flagfiles relative to the repository root, where
# the experiments run.
_REPO_ROOT = os.path.dirname(_EXPERIMENTS_DIR)


def define_flags() -> None:
    """Define this script's flags.

    They are defined when the script runs rather than at import, so that
    importing it next to ``experiments.run`` (which has flags of the same
    names) raises no DuplicateFlagError.
    """
    flags.DEFINE_multi_string("dataset", [], "Dataset folder with defects.json; repeat for several.")
    flags.DEFINE_string("synthetic_dir", "outputs/synthetic", "Folder of the synthetic dataset.")
    flags.DEFINE_integer("synthetic_pairs", 0, "Also evaluate this many synthetic pairs; 0 disables.", lower_bound=0)
    flags.DEFINE_integer("synthetic_seed", 0, "Seed of the synthetic dataset.", lower_bound=0)
    flags.DEFINE_list(
        "synthetic_size", ["384", "384"], "Height and width of every synthetic pair, in px. One size "
        "for all pairs lets JAX compile each method once."
    )
    flags.DEFINE_string("output_dir", "outputs/evaluate", "Folder for the per-dataset results and saved outcomes.")
    flags.DEFINE_string(
        "teacher_weights", None, "Teacher weights, as experiments.run takes them; unset uses the default chain."
    )
    flags.DEFINE_list("methods", None, "Methods to run (default: all; see --helpfull for the names).")
    flags.DEFINE_list(
        "method_pairs", [], "NAME=N: run method NAME only on the first N pairs of each dataset, for slow methods."
    )
    flags.DEFINE_float("match_radius", 10.0, "A defect is found when a blob's box grown by this many px contains it.")
    flags.DEFINE_float("fpr_limit", 0.3, "FPR limit of the AUPRO.")
    flags.DEFINE_list("contrast_bins", ["0", "0.075", "0.1", "0.15", "0.2", "0.3", "1"], "Bin edges of |contrast|.")
    flags.DEFINE_list("size_bins", ["1", "4", "6", "10", "16", "31"], "Bin edges of defect size, in px.")
    flags.DEFINE_integer(
        "map_figures", 2, "Draw every method's defect map for the first N pairs of each dataset.", lower_bound=0
    )
    flags.DEFINE_string("results_page", "", "Markdown page to write with every dataset's tables, e.g. docs/results.md.")
    flags.DEFINE_string("figures_dir", "docs/figures", "Folder of the results page's figures.")
    flags.DEFINE_bool("fresh", False, "Ignore saved pair outcomes and run every method again.")


def _parse_flagfile(path: str) -> dict[str, str]:
    """Read ``--name=value`` lines, expanding ``--flagfile`` in place; later values win.

    ``--name`` alone reads as ``'true'`` and ``--noname`` as ``'false'``.
    """
    values = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if not line.startswith("--"):
                continue
            name, separator, value = line[2:].partition("=")
            if not separator:
                name, value = (name[2:], "false") if name.startswith("no") else (name, "true")
            if name == "flagfile":
                values.update(_parse_flagfile(os.path.join(_REPO_ROOT, value)))
            else:
                values[name] = value
    return values


def _config_value(field: dataclasses.Field, text: str):
    if field.name == "layers":
        return tuple(text.split(","))
    if field.name == "layer_weights":
        return tuple(float(value) for value in text.split(","))
    if field.name == "valid_margin":
        return int(text)
    return type(field.default)(text)


def student_settings(name: str, base: DetectionConfig) -> tuple[DetectionConfig, dict[str, str], str | None]:
    """Read a student's own settings from ``experiments/case2_<name>.flags``, if that file exists.

    Flags named like ``DetectionConfig`` fields override ``base``,
    ``--student_options=key=value,...`` become the student's options, and
    run flags (images, output, weights) are skipped. The ``progress`` option
    is turned off, because a progress bar per pair would flood the log.

    Returns:
      ``(config, options, flagfile)``; ``flagfile`` is ``None`` when there is
      none.

    Raises:
      app.UsageError: if the flagfile has a value of the wrong type.
    """
    path = os.path.join(_EXPERIMENTS_DIR, f"case2_{name}.flags")
    if not os.path.isfile(path):
        return base, {}, None
    fields = {field.name: field for field in dataclasses.fields(DetectionConfig)}
    overrides, options = {}, {}
    for flag, text in _parse_flagfile(path).items():
        try:
            if flag in fields:
                overrides[flag] = _config_value(fields[flag], text)
            elif flag == "student_options":
                options.update(entry.split("=", 1) for entry in text.split(",") if "=" in entry)
            elif flag not in _RUN_FLAGS:
                logging.warning("%s: --%s is neither a pipeline setting nor a student option; ignored.", path, flag)
        except ValueError as error:
            raise app.UsageError(f"{path}: --{flag}={text} is invalid: {error}") from error
    if "progress" in options:
        options["progress"] = "false"
    return dataclasses.replace(base, **overrides), options, path


def build_methods(base: DetectionConfig) -> list[Method]:
    """List the baselines, the ridge layer sets and every registered student."""
    methods = [baselines.absolute_difference_method(base), baselines.feature_distance_method(base)]
    ridge = make_student("ridge", patch_size=base.patch_size, alpha=base.alpha)
    methods.append(teacher_student_method("ridge", ridge, base))
    for method_name, layers in _RIDGE_LAYER_SETS.items():
        methods.append(teacher_student_method(method_name, ridge, dataclasses.replace(base, layers=layers)))
    for student_name in sorted(STUDENTS):
        if student_name == "ridge":
            continue
        config, options, flagfile = student_settings(student_name, base)
        student = make_student(student_name, patch_size=config.patch_size, alpha=config.alpha, options=options)
        if flagfile:
            logging.info("student %s: settings from %s, options %s", student_name, flagfile, options)
        methods.append(teacher_student_method(student_name, student, config))
    return methods


def _parse_method_pairs(entries: list[str], names: list[str]) -> dict[str, int]:
    limits = {}
    for entry in entries:
        name, _, count = entry.partition("=")
        if name not in names or not count.isdigit() or int(count) < 1:
            raise app.UsageError(f"--method_pairs entry {entry!r} is invalid; use NAME=N with NAME in {names} and N >= 1.")
        limits[name] = int(count)
    return limits


def _ensure_synthetic_dataset() -> str:
    """Generate the synthetic dataset unless ``--synthetic_dir`` already contains the requested one."""
    directory = FLAGS.synthetic_dir
    try:
        height, width = (int(value) for value in FLAGS.synthetic_size)
    except ValueError as error:
        raise app.UsageError(f"--synthetic_size={','.join(FLAGS.synthetic_size)} is invalid; use HEIGHT,WIDTH.") from error
    config = synth.SynthConfig(height_range=(height, height), width_range=(width, width))
    index_path = os.path.join(directory, evaluation.DATASET_INDEX)
    if os.path.isfile(index_path):
        with open(index_path, encoding="utf-8") as handle:
            index = json.load(handle)
        generator = index.get("generator", {})
        same = (
            generator.get("seed") == FLAGS.synthetic_seed
            and len(index.get("cases", {})) == FLAGS.synthetic_pairs
            and generator.get("config", {}).get("height_range") == [height, height]
            and generator.get("config", {}).get("width_range") == [width, width]
        )
        if same:
            logging.info("synthetic dataset: reusing %s", directory)
            return directory
        raise app.UsageError(
            f"{directory} already contains another synthetic dataset ({len(index.get('cases', {}))} pairs, seed "
            f"{generator.get('seed')}); choose another --synthetic_dir or delete it."
        )
    start = time.perf_counter()
    with tqdm(total=FLAGS.synthetic_pairs, unit="pair", desc="synthetic") as progress:
        synth.write_dataset(directory, FLAGS.synthetic_pairs, FLAGS.synthetic_seed, config, on_pair_written=lambda _: progress.update(1))
    logging.info(
        "synthetic dataset: %d pairs of %dx%d px (seed %d) in %s in %.1f s",
        FLAGS.synthetic_pairs, height, width, FLAGS.synthetic_seed, directory, time.perf_counter() - start,
    )
    return directory


def _run_dataset(directory: str, label: str, methods: list[Method], variables, limits: dict[str, int], last_layer: str):
    """Evaluate every method on every pair of one dataset, reusing saved outcomes."""
    start = time.perf_counter()
    pairs = evaluation.read_dataset(directory)
    logging.info("dataset %s: %d pairs from %s in %.1f s", label, len(pairs), directory, time.perf_counter() - start)
    outcome_dir = os.path.join(FLAGS.output_dir, label, "outcomes")
    os.makedirs(outcome_dir, exist_ok=True)
    outcomes = []
    start = time.perf_counter()
    for index, pair in enumerate(tqdm(pairs, desc=label, unit="pair")):
        path = os.path.join(outcome_dir, f"{pair.name}.npz")
        saved = None if FLAGS.fresh or not os.path.isfile(path) else evaluation.load_outcome(path)
        wanted = [method for method in methods if index < limits.get(method.name, len(pairs))]
        missing = [method for method in wanted if saved is None or method.name not in saved.methods]
        if missing:
            outcome = evaluation.evaluate_pair(
                pair, missing, variables, match_radius=FLAGS.match_radius, fpr_limit=FLAGS.fpr_limit, last_layer=last_layer
            )
            if saved is not None:
                saved.methods.update(outcome.methods)
                outcome = saved
            evaluation.save_outcome(path, outcome)
        else:
            outcome = saved
        outcome.methods = {method.name: outcome.methods[method.name] for method in wanted}
        outcomes.append(outcome)
    logging.info("run %s: %d pairs x %d methods in %.1f s", label, len(pairs), len(methods), time.perf_counter() - start)
    return pairs, outcomes


def _report_dataset(label: str, pairs, outcomes, methods: list[Method]) -> tuple[dict, dict[str, str]]:
    """Write one dataset's tables and figures; return the results and the paths of the map figures."""
    start = time.perf_counter()
    results = aggregate.summarize_dataset(
        outcomes,
        methods,
        fpr_limit=FLAGS.fpr_limit,
        contrast_edges=[float(value) for value in FLAGS.contrast_bins],
        size_edges=[float(value) for value in FLAGS.size_bins],
    )
    results["dataset"] = label
    results["match_radius"] = FLAGS.match_radius
    results["methods_config"] = {method.name: dataclasses.asdict(method.config) for method in methods}

    directory = os.path.join(FLAGS.output_dir, label)
    written = evaluation_report.write_results(directory, results)
    written += list(plots.write_figures(results, directory).values())
    map_figures = {}
    for pair, outcome in list(zip(pairs, outcomes))[: FLAGS.map_figures]:
        shown = [method.name for method in methods if method.name in outcome.methods]
        path = os.path.join(directory, f"maps_{pair.name}.png")
        map_figures[f"maps_{pair.name}"] = plots.plot_pair_maps(pair.inspected, outcome, shown, path)
    written += list(map_figures.values())

    logging.info("report %s: %d files in %s in %.1f s", label, len(written), directory, time.perf_counter() - start)
    for entry in results["methods"]:
        summary = entry["summary"]
        logging.info(
            "%s %-15s found %d/%d, %d FP blobs, pixel AUROC %.3f, AUPRO %.3f, F1-max %.3f, image AUROC %.3f",
            label, entry["name"], summary["found"], summary["num_points"], summary["false_positives"],
            summary["pixel_auroc"], summary["aupro"], summary["f1_max"], summary["image_auroc"],
        )
    return results, map_figures


def _write_page(all_results: list[dict], all_map_figures: list[dict[str, str]]) -> None:
    start = time.perf_counter()
    os.makedirs(FLAGS.figures_dir, exist_ok=True)
    page_dir = os.path.dirname(os.path.abspath(FLAGS.results_page))
    figures = {}
    for results, map_figures in zip(all_results, all_map_figures):
        prefix = f"{results['dataset']}_"
        written = plots.write_figures(results, FLAGS.figures_dir, prefix=prefix)
        for name, source in map_figures.items():
            written[name] = shutil.copyfile(source, os.path.join(FLAGS.figures_dir, prefix + os.path.basename(source)))
        figures[results["dataset"]] = {name: os.path.relpath(path, page_dir) for name, path in written.items()}
    evaluation_report.write_results_page(FLAGS.results_page, all_results, figures)
    logging.info("results page: %s in %.1f s", FLAGS.results_page, time.perf_counter() - start)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    datasets = list(FLAGS.dataset)
    if FLAGS.synthetic_pairs:
        datasets.append(_ensure_synthetic_dataset())
    if not datasets:
        raise app.UsageError("no dataset: pass --dataset=DIR and/or --synthetic_pairs=N.")
    labels = [os.path.basename(os.path.normpath(directory)) for directory in datasets]
    if len(set(labels)) != len(labels):
        raise app.UsageError(f"dataset folder names {labels} repeat; their results would share a folder.")
    logging.info("JAX devices: %s", jax.devices())

    methods = build_methods(DetectionConfig())
    names = [method.name for method in methods]
    if FLAGS.methods:
        unknown = [name for name in FLAGS.methods if name not in names]
        if unknown:
            raise app.UsageError(f"--methods names unknown method(s) {unknown}; choose from {names}.")
        methods = [method for method in methods if method.name in FLAGS.methods]
    limits = _parse_method_pairs(FLAGS.method_pairs, names)
    logging.info("methods: %s", ", ".join(method.name for method in methods))

    last_layer = max((layer for method in methods for layer in method.config.layers), key=LAYERS.index)
    start = time.perf_counter()
    variables, teacher_info = hub.resolve_teacher(FLAGS.teacher_weights, last_layer=last_layer)
    logging.info("teacher weights: %s (%s) in %.2f s", teacher_info["source"], teacher_info["kind"], time.perf_counter() - start)

    all_results, all_map_figures = [], []
    for directory, label in zip(datasets, labels):
        pairs, outcomes = _run_dataset(directory, label, methods, variables, limits, last_layer)
        results, map_figures = _report_dataset(label, pairs, outcomes, methods)
        all_results.append(results)
        all_map_figures.append(map_figures)
    if FLAGS.results_page:
        _write_page(all_results, all_map_figures)


if __name__ == "__main__":
    define_flags()
    app.run(main)
