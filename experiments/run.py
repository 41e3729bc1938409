"""Detect defects in one reference/inspected pair.

    python -m experiments.run --flagfile=experiments/case2.flags
    python -m experiments.run --demo --teacher_weights=../shared/weights/resnet18_imagenet_bnfolded

``--demo`` generates a synthetic pair with planted defects in place of the
two images and reports the planted defects next to the detections.

Flags become one ``DetectionConfig``; the library never reads ``FLAGS``.
"""

from __future__ import annotations

import dataclasses
import logging as python_logging
import time

import jax
import numpy as np
from absl import app, flags, logging

from tsjax import hub, io, metrics, pipeline, synth
from tsjax.config import DetectionConfig
from tsjax.report import check_output_dir, write_detection
from tsjax.students import STUDENTS, Student, make_student
from tsjax.students.checkpoint import load_student

_DEFAULTS = DetectionConfig()

flags.DEFINE_string("reference", None, "Defect-free reference image (TIFF, PNG or JPEG).")
flags.DEFINE_string("inspected", None, "Inspected image of the same pattern.")
flags.DEFINE_string(
    "output_dir", None, "Folder for the maps, figures and detections.json (with --demo: default outputs/demo)."
)
flags.DEFINE_bool(
    "demo",
    False,
    "Detect on a synthetic pair with planted defects, generated from --seed, in place of --reference "
    "and --inspected, and report the planted defects next to the detections.",
)
flags.DEFINE_bool("overwrite", False, "Replace the results of an earlier run in --output_dir.")
flags.DEFINE_string(
    "teacher_weights",
    None,
    "Teacher weights: a folder of per-key .npy files, .npz, .safetensors or a torchvision "
    ".pth checkpoint, or 'random' (tests and ablations only). Unset: TSJAX_TEACHER_WEIGHTS, "
    "then pretrained/resnet18_imagenet.npz, then torchvision's ImageNet download.",
)
flags.DEFINE_string(
    "student",
    "ridge",
    f"Student that predicts inspected features: {', '.join(sorted(STUDENTS))}, or a class of your own "
    "registered before this module is imported (docs/students.md, 'Writing a new student').",
)
flags.register_validator(
    "student",
    lambda name: name in STUDENTS,
    message=(
        f"--student must be one of {', '.join(sorted(STUDENTS))}. To run a student class of your own, register "
        "it and start the runner from a wrapper script, as docs/students.md shows under 'Writing a new student'."
    ),
)
flags.DEFINE_list(
    "student_options",
    [],
    "Student-specific settings as key=value pairs, for example window=7,leave_out=1 for local_ridge "
    "or hidden_size=256,steps=1000 for mlp; docs/students.md lists them.",
)
flags.DEFINE_string(
    "student_checkpoint",
    None,
    "Folder written by experiments.train: use its trained student instead of fitting one. Its teacher "
    "weights, --layers and --patch_size must match this run.",
)
flags.DEFINE_list("layers", list(_DEFAULTS.layers), "Teacher layers to score: stem, layer1, layer2, layer3.")
flags.DEFINE_list("layer_weights", None, "One weight per layer for the combined map (default: equal).")
flags.DEFINE_integer("patch_size", _DEFAULTS.patch_size, "Odd side of the reference patch, in feature pixels.")
flags.DEFINE_float("alpha", _DEFAULTS.alpha, "Ridge penalty relative to the mean feature variance.")
flags.DEFINE_enum(
    "normalization", _DEFAULTS.normalization, ["global", "pixel"], "Residual normalisation of the score."
)
flags.DEFINE_float("denoise_sigma", _DEFAULTS.denoise_sigma, "Gaussian sigma (px) on both images; 0 disables.")
flags.DEFINE_float("map_sigma", _DEFAULTS.map_sigma, "Gaussian sigma (px) on the defect map; 0 disables.")
flags.DEFINE_integer("valid_margin", None, "Erosion (px) of the overlap mask; default derives it from the layers.")
flags.DEFINE_float("z_floor", _DEFAULTS.z_floor, "Minimum robust z-score of a defective pixel.")
flags.DEFINE_float("min_score", _DEFAULTS.min_score, "Minimum D of a defective pixel, in [0, 1].")
flags.DEFINE_integer("opening_radius", _DEFAULTS.opening_radius, "Disk radius (px) of the opening.")
flags.DEFINE_integer("closing_radius", _DEFAULTS.closing_radius, "Disk radius (px) of the closing.")
flags.DEFINE_integer("min_area", _DEFAULTS.min_area, "Smallest blob kept, in px.")
flags.DEFINE_integer("seed", _DEFAULTS.seed, "Seed of the PRNG key.")
flags.DEFINE_list("train_reference", None, "Reference image(s) of defect-free pair(s) to fit the student on.")
flags.DEFINE_list("train_inspected", None, "Inspected image(s) of the same defect-free pair(s).")
flags.DEFINE_integer(
    "train_augment", 0, "Extra copies of each training pair with random brightness and contrast."
)

FLAGS = flags.FLAGS

_DEMO_OUTPUT_DIR = "outputs/demo"
# The demo pair always carries defects of clearly visible contrast and size,
# so that a first run shows the method working. The synthetic benchmark in
# docs/results.md covers the faint and tiny defects that it misses.
_DEMO_SYNTH_CONFIG = synth.SynthConfig(
    defect_free_fraction=0.0, defect_contrast_range=(0.25, 0.5), defect_size_range_px=(6.0, 20.0)
)


def config_from_flags() -> DetectionConfig:
    """Build the frozen pipeline config from the parsed flags."""
    weights = None
    if FLAGS.layer_weights:
        try:
            weights = tuple(float(value) for value in FLAGS.layer_weights)
        except ValueError as error:
            raise app.UsageError(f"--layer_weights must be numbers; got {FLAGS.layer_weights}.") from error
    return DetectionConfig(
        layers=tuple(FLAGS.layers),
        layer_weights=weights,
        patch_size=FLAGS.patch_size,
        alpha=FLAGS.alpha,
        normalization=FLAGS.normalization,
        denoise_sigma=FLAGS.denoise_sigma,
        map_sigma=FLAGS.map_sigma,
        valid_margin=FLAGS.valid_margin,
        z_floor=FLAGS.z_floor,
        min_score=FLAGS.min_score,
        opening_radius=FLAGS.opening_radius,
        closing_radius=FLAGS.closing_radius,
        min_area=FLAGS.min_area,
        seed=FLAGS.seed,
    )


def run_flags(defining: str = "reference") -> list:
    """Return the flags of the module that defines the flag ``defining`` (this one by default)."""
    # absl files flags under the defining module's name, which is __main__
    # under ``python -m``, so the module is found by one of its flags.
    for module_flags in FLAGS.flags_by_module_dict().values():
        if any(flag.name == defining for flag in module_flags):
            return module_flags
    return []


def check_pair_shapes(
    reference_shape: tuple[int, int], inspected_shape: tuple[int, int], *, pair: str = "", record: str = "detections.json"
) -> None:
    """Reject sizes without a useful overlap (``io.check_pair_sizes``) and log a warning when they differ.

    ``pair`` prefixes the warning among many pairs, and ``record`` names the
    file whose ``compared_fraction`` gives the share that was compared.
    """
    io.check_pair_sizes(reference_shape, inspected_shape)
    if reference_shape != inspected_shape:
        logging.warning(
            "%sthe reference %s and inspected %s images differ in size; only the part of the inspected "
            "image that the reference covers is compared (see compared_fraction in %s).",
            pair,
            reference_shape,
            inspected_shape,
            record,
        )


def student_from_flags(config: DetectionConfig) -> Student:
    """Build the student named by --student with --student_options."""
    options = {}
    for pair in FLAGS.student_options:
        key, separator, value = pair.partition("=")
        if not separator or not key:
            raise ValueError(f"--student_options entries must be key=value; got {pair!r}.")
        options[key.strip()] = value.strip()
    return make_student(FLAGS.student, patch_size=config.patch_size, alpha=config.alpha, options=options)


def load_training_pairs(config: DetectionConfig) -> tuple[list, list, list, jax.Array]:
    """Load, align and augment the pairs named by --train_reference and --train_inspected.

    Returns:
      ``(aligned_references, inspected, valids, fit_key)``: ``[H, W]`` arrays
      per pair, augmented copies included, and the PRNG key for fitting.
    """
    references = FLAGS.train_reference or []
    inspected = FLAGS.train_inspected or []
    if len(references) != len(inspected):
        raise app.UsageError(
            f"--train_reference has {len(references)} image(s) but --train_inspected has "
            f"{len(inspected)}; give one inspected image per reference."
        )
    aligned, targets, valids = [], [], []
    shape = None
    for ref_path, insp_path in zip(references, inspected):
        ref_image, insp_image = io.load_image(ref_path), io.load_image(insp_path)
        if shape is not None and insp_image.shape != shape:
            raise app.UsageError(
                f"training pairs must share one size; {insp_path} is {insp_image.shape}, "
                f"the first pair is {shape}."
            )
        shape = insp_image.shape
        alignment, valid = pipeline.align_and_mask(ref_image, insp_image, config.margin)
        aligned.append(alignment.aligned_reference)
        targets.append(insp_image)
        valids.append(valid)
    key = jax.random.key(config.seed)
    augment_key, fit_key = jax.random.split(key)
    if FLAGS.train_augment > 0:
        base_refs, base_insp, base_valid = list(aligned), list(targets), list(valids)
        for copy in range(FLAGS.train_augment):
            copy_key = jax.random.fold_in(augment_key, copy)
            aligned += list(pipeline.augment_brightness_contrast(np.stack(base_refs), jax.random.fold_in(copy_key, 0)))
            targets += list(pipeline.augment_brightness_contrast(np.stack(base_insp), jax.random.fold_in(copy_key, 1)))
            valids += base_valid
    return aligned, targets, valids, fit_key


def _fit_on_training_pairs(student, variables, config: DetectionConfig) -> dict:
    aligned, targets, valids, fit_key = load_training_pairs(config)
    return pipeline.fit_students(student, variables, aligned, targets, valids, config.layers, fit_key)


def student_and_states(
    student: Student | None, variables, teacher_sha256: str, config: DetectionConfig
) -> tuple[Student, dict | None, float]:
    """Load the checkpointed student, fit ``student`` on training pairs, or leave fitting to detect."""
    if FLAGS.student_checkpoint:
        conflicts = [
            f"--{name}" for name in ("train_reference", "train_inspected", "student_options") if FLAGS[name].present
        ]
        if conflicts:
            raise app.UsageError(f"--student_checkpoint brings a trained student; drop {', '.join(conflicts)}.")
        start = time.perf_counter()
        student, states = load_student(
            FLAGS.student_checkpoint, teacher_sha256=teacher_sha256, layers=config.layers, patch_size=config.patch_size
        )
        if FLAGS["student"].present and FLAGS.student != student.name:
            raise app.UsageError(
                f"--student={FLAGS.student} but {FLAGS.student_checkpoint} contains a {student.name!r} student; "
                "drop --student or pass its name."
            )
        logging.info("student: loaded %s from %s in %.2f s", student.name, FLAGS.student_checkpoint, time.perf_counter() - start)
        return student, states, 0.0

    if not (FLAGS.train_reference or FLAGS.train_inspected):
        return student, None, 0.0
    start = time.perf_counter()
    states = _fit_on_training_pairs(student, variables, config)
    train_time = time.perf_counter() - start
    logging.info("student: fitted on %d training pair(s) in %.2f s", len(FLAGS.train_reference), train_time)
    return student, states, train_time


def _report_demo(planted: list[dict], detection: pipeline.Detection) -> dict:
    """Log the planted defects next to the blobs that match them, and return the record for detections.json."""
    match = metrics.match_points([(defect["x"], defect["y"]) for defect in planted], detection.blobs)
    logging.info(
        "demo: %d planted defect(s): %d found, %d missed; %d false-positive blob(s)",
        len(planted), match["found"], match["missed"], match["false_positives"],
    )
    logging.info("demo: %-16s %6s %6s %5s %9s %6s  %s", "kind", "x", "y", "size", "contrast", "valid", "matched blob")
    for defect, blob_id, error in zip(planted, match["matched_blob_ids"], match["localisation_errors_px"]):
        inside = bool(detection.valid[int(round(defect["y"])), int(round(defect["x"]))])
        found = f"blob {blob_id}, {error:.1f} px away" if blob_id is not None else "missed"
        logging.info(
            "demo: %-16s %6.1f %6.1f %5d %9.3f %6s  %s",
            defect["kind"], defect["x"], defect["y"], defect["size_px"], defect["contrast"], "yes" if inside else "no", found,
        )
    return {"seed": FLAGS.seed, "planted": planted, "match": match}


def _detect_and_write() -> None:
    if FLAGS.demo:
        if FLAGS.reference or FLAGS.inspected:
            raise app.UsageError("--demo generates its own pair; drop --reference and --inspected.")
        output_dir = FLAGS.output_dir or _DEMO_OUTPUT_DIR
    else:
        for name in ("reference", "inspected", "output_dir"):
            if not getattr(FLAGS, name):
                raise app.UsageError(f"--{name} is required (or pass --demo).")
        output_dir = FLAGS.output_dir
    config = config_from_flags()
    # Build the student now, so that a bad --student_options fails before
    # the images and the teacher load.
    student = None if FLAGS.student_checkpoint else student_from_flags(config)
    logging.info("JAX devices: %s", jax.devices())
    check_output_dir(output_dir, overwrite=FLAGS.overwrite)

    start = time.perf_counter()
    planted = None
    if FLAGS.demo:
        pair = synth.make_pair(FLAGS.seed, _DEMO_SYNTH_CONFIG)
        reference, inspected, planted = pair.reference, pair.inspected, pair.defects
        logging.info(
            "demo: synthetic pair of seed %d, planted shift (dy, dx) = (%.2f, %.2f)", FLAGS.seed, *pair.shift
        )
    else:
        reference = io.load_image(FLAGS.reference)
        inspected = io.load_image(FLAGS.inspected)
    load_time = time.perf_counter() - start
    logging.info("load: reference %s, inspected %s in %.2f s", reference.shape, inspected.shape, load_time)
    check_pair_shapes(reference.shape, inspected.shape)

    start = time.perf_counter()
    # Load every stage up to layer3, whatever --layers selects, so that the
    # recorded SHA-256 identifies the weights file and not the layer choice.
    variables, teacher_info = hub.resolve_teacher(FLAGS.teacher_weights)
    load_teacher_time = time.perf_counter() - start
    logging.info(
        "teacher weights: %s (%s, sha256 %s) in %.2f s",
        teacher_info["source"], teacher_info["kind"], teacher_info["sha256"][:12], load_teacher_time,
    )

    student, states, train_time = student_and_states(student, variables, teacher_info["sha256"], config)

    detection = pipeline.detect(reference, inspected, variables, config, student=student, states=states)
    summary = detection.alignment.summary()
    logging.info(
        "align: shift (dy, dx) = (%.2f, %.2f) by %s, correlation %.3f, in %.2f s",
        *summary["shift"], summary["estimator"], summary["correlation"], detection.timings_s["align"],
    )
    logging.info("teacher: layers %s in %.2f s", ",".join(config.layers), detection.timings_s["teacher"])
    logging.info("student fit (%s): %.2f s", student.name, detection.timings_s["student_fit"])
    logging.info("score: %.2f s", detection.timings_s["score"])
    logging.info(
        "postprocess: threshold %.3f, %d blob(s) in %.2f s",
        detection.threshold.value, len(detection.blobs), detection.timings_s["postprocess"],
    )

    start = time.perf_counter()
    flag_values = {flag.name: flag.value for flag in run_flags()}
    extra = {
        "teacher": teacher_info,
        "student": student.name,
        "student_settings": dataclasses.asdict(student),
        "student_checkpoint": FLAGS.student_checkpoint,
        "pipeline_config": dataclasses.asdict(config),
        "timings_s": {"load": load_time, "load_teacher": load_teacher_time, "student_train": train_time},
    }
    if planted is not None:
        extra["demo"] = _report_demo(planted, detection)
    record = write_detection(output_dir, inspected, detection, flag_values, extra)
    if record["compared_fraction"] < 0.8:
        logging.warning(
            "only %.0f%% of the inspected image was compared; the rest lies outside the aligned reference.",
            100 * record["compared_fraction"],
        )
    logging.info("write: %s in %.2f s", output_dir, time.perf_counter() - start)
    for blob in detection.blobs:
        logging.info(
            "blob %d: x=%.1f y=%.1f area=%d score_max=%.3f", blob["id"], blob["x"], blob["y"], blob["area"], blob["score_max"]
        )


def main(argv):
    del argv
    # Library warnings (too few valid pixels, for example) then print as log
    # lines like the rest of the run rather than as raw Python warnings.
    python_logging.captureWarnings(True)
    try:
        _detect_and_write()
    except (FileNotFoundError, FileExistsError, ValueError, hub.WeightsDownloadError) as error:
        # Input and setting errors carry their own fix; a traceback would
        # only bury it. ImageError and UnsafeCheckpointError are ValueErrors.
        logging.error("%s", error)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
