"""Save a trained student with its settings, and load it back checked.

A checkpoint folder contains ``student.json`` (the student's name and
hyperparameters, the teacher layers, the patch size, the SHA-256 of the
teacher variables and the input shapes it was fitted on) and ``states/``,
the per-layer states written by ``orbax.checkpoint.StandardCheckpointer``.
A state only makes sense for the features it was fitted on, so loading
compares the run's teacher hash, layers and patch size with the saved ones
and raises one error that names every mismatch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from tsjax.students import STUDENTS, Student, is_transductive, make_student

__all__ = [
    "CHECKPOINT_FORMAT",
    "METADATA_FILE",
    "StudentMismatchError",
    "save_student",
    "read_metadata",
    "load_student",
]

CHECKPOINT_FORMAT = 1
METADATA_FILE = "student.json"
_STATES_DIR = "states"


class StudentMismatchError(ValueError):
    """A checkpoint was trained for other teacher weights, layers or patch size."""


def save_student(
    directory: str | os.PathLike,
    student: Student,
    states: Mapping[str, Any],
    *,
    teacher_sha256: str,
    fit_shapes: Mapping[str, Mapping[str, Sequence[int]]],
    training: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> None:
    """Write a student and its per-layer states to ``directory``.

    Args:
      directory: Checkpoint folder; created if missing.
      student: A dataclass student registered in ``STUDENTS``.
      states: State per teacher layer, in the order the layers are scored.
      teacher_sha256: ``tsjax.teacher.variables_sha256`` of the teacher.
      fit_shapes: Per layer, the ``'ref'`` and ``'insp'`` shapes
        ``[B, h, w, C]`` passed to ``fit``; loading traces ``fit`` on them
        to rebuild the state's structure.
      training: JSON-serialisable notes on how the student was trained.
      overwrite: Replace an existing checkpoint in ``directory``.

    Raises:
      ValueError: for a transductive or unregistered student, layers without
        a fit shape, or an existing checkpoint when ``overwrite`` is False.
    """
    if is_transductive(student):
        raise ValueError(
            f"student {student.name!r} only predicts the pair it was fitted on, so it cannot be "
            "saved and reused; choose a student such as 'ridge' or 'mlp'."
        )
    if STUDENTS.get(student.name) is not type(student):
        raise ValueError(
            f"student {student.name!r} ({type(student).__name__}) is not registered in STUDENTS, so a "
            "checkpoint of it could not be loaded; register it with register_student first."
        )
    missing = [layer for layer in states if layer not in fit_shapes]
    if missing:
        raise ValueError(f"fit_shapes has no entry for layer(s) {missing}; give the ref and insp shapes of each.")
    directory = os.path.abspath(os.fspath(directory))
    metadata_path = os.path.join(directory, METADATA_FILE)
    states_path = os.path.join(directory, _STATES_DIR)
    if os.path.exists(metadata_path) or os.path.exists(states_path):
        if not overwrite:
            raise ValueError(
                f"{directory} already contains a student checkpoint; pass overwrite=True (--overwrite) "
                "to replace it or choose another folder."
            )
        shutil.rmtree(states_path, ignore_errors=True)
    os.makedirs(directory, exist_ok=True)

    metadata = {
        "format": CHECKPOINT_FORMAT,
        "student": student.name,
        "hyperparameters": dataclasses.asdict(student),
        "layers": list(states),
        "patch_size": student.patch_size,
        "teacher_sha256": teacher_sha256,
        "fit_shapes": {layer: {key: list(value) for key, value in fit_shapes[layer].items()} for layer in states},
        "training": dict(training or {}),
    }
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(states_path, dict(states))
    checkpointer.wait_until_finished()
    with open(metadata_path, "w") as handle:
        json.dump(metadata, handle, indent=2)


def read_metadata(directory: str | os.PathLike) -> dict:
    """Read ``student.json`` of a checkpoint.

    Raises:
      FileNotFoundError: if ``directory`` contains no ``student.json``.
      ValueError: if the file is from another checkpoint format.
    """
    path = os.path.join(os.fspath(directory), METADATA_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"no student checkpoint at {os.fspath(directory)!r} ({METADATA_FILE} not found); "
            "create one with python -m experiments.train."
        )
    with open(path) as handle:
        metadata = json.load(handle)
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"{path} has checkpoint format {metadata.get('format')!r}, but this tsjax reads format "
            f"{CHECKPOINT_FORMAT}; retrain the student with python -m experiments.train."
        )
    return metadata


def load_student(
    directory: str | os.PathLike, *, teacher_sha256: str, layers: Sequence[str], patch_size: int
) -> tuple[Student, dict[str, Any]]:
    """Load a student and its states, checking they fit this run.

    Args:
      directory: Folder written by ``save_student``.
      teacher_sha256: ``tsjax.teacher.variables_sha256`` of this run's teacher.
      layers: Layers this run scores, in order.
      patch_size: Patch size of this run.

    Returns:
      ``(student, states)`` with states keyed by layer.

    Raises:
      FileNotFoundError: if ``directory`` contains no checkpoint.
      StudentMismatchError: if the teacher hash, layers or patch size differ;
        the message names each difference.
      ValueError: for an unknown format or student.
    """
    metadata = read_metadata(directory)
    mismatches = []
    if metadata["teacher_sha256"] != teacher_sha256:
        mismatches.append(
            f"teacher weights: checkpoint sha256 {metadata['teacher_sha256'][:16]}..., "
            f"this run {teacher_sha256[:16]}..."
        )
    if list(metadata["layers"]) != list(layers):
        mismatches.append(f"layers: checkpoint {metadata['layers']}, this run {list(layers)}")
    if metadata["patch_size"] != patch_size:
        mismatches.append(f"patch_size: checkpoint {metadata['patch_size']}, this run {patch_size}")
    if mismatches:
        raise StudentMismatchError(
            f"student checkpoint {os.fspath(directory)!r} does not match this run: "
            + "; ".join(mismatches)
            + ". Run with the checkpoint's settings, or train a new checkpoint for these."
        )

    hyperparameters = dict(metadata["hyperparameters"])
    name = hyperparameters.pop("name")
    options = {key: value for key, value in hyperparameters.items() if key not in ("patch_size", "alpha")}
    student = make_student(
        name, patch_size=hyperparameters["patch_size"], alpha=hyperparameters["alpha"], options=options
    )
    abstract = {}
    for layer in metadata["layers"]:
        shapes = metadata["fit_shapes"][layer]
        ref = jax.ShapeDtypeStruct(tuple(shapes["ref"]), jnp.float32)
        insp = jax.ShapeDtypeStruct(tuple(shapes["insp"]), jnp.float32)
        valid = jax.ShapeDtypeStruct(tuple(shapes["ref"][:3]), jnp.bool_)
        abstract[layer] = jax.eval_shape(student.fit, ref, insp, valid, jax.random.key(0))
    states_path = os.path.join(os.path.abspath(os.fspath(directory)), _STATES_DIR)
    states = ocp.StandardCheckpointer().restore(states_path, abstract)
    return student, states
