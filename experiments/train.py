"""Train a student on defect-free pairs and save it for experiments.run.

    python -m experiments.train --flagfile=experiments/train_mlp.flags
    python -m experiments.run --flagfile=experiments/case3.flags \
        --student_checkpoint=outputs/checkpoints/mlp_case3 --output_dir=outputs/case3_mlp_ckpt

The training pairs, student, layers, patch size, seed and augmentation are
set with the runner's flags (--train_reference, --train_inspected,
--train_augment, --student, --student_options, --layers, --patch_size,
--seed); --checkpoint_dir names the output folder.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from experiments import run as runner
from tsjax import hub, pipeline
from tsjax.students import is_transductive
from tsjax.students.checkpoint import save_student

flags.DEFINE_string("checkpoint_dir", None, "Folder for the trained student (orbax states and student.json).")

FLAGS = flags.FLAGS


def _fit_shapes(variables, images: list, layers, deepest_layer: str) -> dict:
    """Return the ``[B, h, w, C]`` feature shape of each layer for ``B`` images."""
    batch = jax.ShapeDtypeStruct((len(images),) + images[0].shape, jnp.float32)
    features = jax.eval_shape(lambda v, x: pipeline.extract_features(v, x, deepest_layer), variables, batch)
    return {layer: {"ref": features[layer].shape, "insp": features[layer].shape} for layer in layers}


def _loss_log(states: dict) -> dict:
    """Collect per-layer loss logs from states that have them (the MLP's)."""
    log = {}
    for layer, state in states.items():
        if not hasattr(state, "train_loss"):
            continue
        train_loss = np.asarray(state.train_loss)
        rounds_run = int(np.isfinite(train_loss).sum())
        log[layer] = {
            "train_loss": train_loss[:rounds_run].tolist(),
            "holdout_loss": np.asarray(state.holdout_loss)[:rounds_run].tolist(),
            "best_round": int(state.best_round),
        }
    return log


def _train() -> None:
    if not FLAGS.checkpoint_dir:
        raise app.UsageError("--checkpoint_dir is required.")
    if not FLAGS.train_reference:
        raise app.UsageError("--train_reference and --train_inspected are required: the defect-free pair(s).")
    config = runner.config_from_flags()
    student = runner.student_from_flags(config)
    if is_transductive(student):
        raise app.UsageError(
            f"student {student.name!r} is fitted on each scored pair by experiments.run and cannot be "
            "trained once; train 'ridge' or 'mlp' instead."
        )
    logging.info("JAX devices: %s", jax.devices())

    start = time.perf_counter()
    # Up to layer3 whatever --layers selects, so the checksum matches the runner's.
    variables, teacher_info = hub.resolve_teacher(FLAGS.teacher_weights)
    logging.info(
        "teacher weights: %s (sha256 %s) in %.2f s",
        teacher_info["source"], teacher_info["sha256"][:12], time.perf_counter() - start,
    )

    start = time.perf_counter()
    aligned, targets, valids, fit_key = runner.load_training_pairs(config)
    logging.info(
        "pairs: %d training pair(s), %d with augmented copies, in %.2f s",
        len(FLAGS.train_reference), len(aligned), time.perf_counter() - start,
    )

    start = time.perf_counter()
    states = pipeline.fit_students(student, variables, aligned, targets, valids, config.layers, fit_key)
    jax.block_until_ready(states)
    logging.info("fit: %s on layers %s in %.2f s", student.name, ",".join(config.layers), time.perf_counter() - start)
    loss_log = _loss_log(states)
    for layer, entry in loss_log.items():
        logging.info(
            "loss %s: %d round(s), best round %d, train %.4f -> %.4f, holdout %.4f -> %.4f (best %.4f)",
            layer, len(entry["train_loss"]), entry["best_round"], entry["train_loss"][0], entry["train_loss"][-1],
            entry["holdout_loss"][0], entry["holdout_loss"][-1], entry["holdout_loss"][entry["best_round"]],
        )

    start = time.perf_counter()
    training = {
        "train_reference": list(FLAGS.train_reference),
        "train_inspected": list(FLAGS.train_inspected or []),
        "train_augment": FLAGS.train_augment,
        "seed": config.seed,
        "teacher_source": teacher_info["source"],
        "loss_log": loss_log,
    }
    save_student(
        FLAGS.checkpoint_dir,
        student,
        states,
        teacher_sha256=teacher_info["sha256"],
        fit_shapes=_fit_shapes(variables, aligned, config.layers, config.deepest_layer),
        training=training,
        overwrite=FLAGS.overwrite,
    )
    logging.info("save: %s in %.2f s", FLAGS.checkpoint_dir, time.perf_counter() - start)


def main(argv):
    del argv
    try:
        _train()
    except (FileNotFoundError, ValueError, hub.WeightsDownloadError) as error:
        # Input and setting errors carry their own fix; a traceback would
        # only bury it.
        logging.error("%s: %s", type(error).__name__, error)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
