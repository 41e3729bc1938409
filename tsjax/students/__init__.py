"""Students: models that predict inspected features from reference features."""

import dataclasses
from typing import Mapping

from tsjax.students.base import Student, is_transductive
from tsjax.students.local_ridge import LocalRidgeState, LocalRidgeStudent, local_ridge_predict
from tsjax.students.mlp import FeatureMLP, MLPState, MLPStudent
from tsjax.students.ridge import RidgeState, RidgeStudent, ridge_solve

__all__ = [
    "Student",
    "is_transductive",
    "RidgeState",
    "RidgeStudent",
    "ridge_solve",
    "LocalRidgeState",
    "LocalRidgeStudent",
    "local_ridge_predict",
    "FeatureMLP",
    "MLPState",
    "MLPStudent",
    "STUDENTS",
    "register_student",
    "make_student",
]

# Student classes by the name that ``--student`` takes. A new student is one
# class implementing ``Student``, added here or with ``register_student``.
STUDENTS = {"ridge": RidgeStudent, "local_ridge": LocalRidgeStudent, "mlp": MLPStudent}


def register_student(cls: type) -> type:
    """Add a student class to ``STUDENTS`` under its ``name`` default; usable as a decorator.

    Raises:
      TypeError: if ``cls`` is not a frozen dataclass with a ``name`` field.
      ValueError: if another class is registered under that name.
    """
    params = getattr(cls, "__dataclass_params__", None)
    fields = {field.name: field for field in dataclasses.fields(cls)} if params else {}
    if params is None or not params.frozen or "name" not in fields:
        raise TypeError(
            f"{cls!r} is not a frozen dataclass with a 'name' field; declare it with "
            "@dataclasses.dataclass(frozen=True) so that it can be a static jit argument."
        )
    name = fields["name"].default
    if STUDENTS.get(name, cls) is not cls:
        raise ValueError(f"student name {name!r} is taken by {STUDENTS[name]!r}; give {cls!r} another name.")
    STUDENTS[name] = cls
    return cls


def _convert_option(cls: type, field: dataclasses.Field, value: object) -> object:
    """Convert a string option to the type of the field's default."""
    if not isinstance(value, str) or isinstance(field.default, str):
        return value
    kind = type(field.default)
    try:
        if kind is bool:
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(value)
            return value.lower() in ("true", "1")
        return kind(value)
    except ValueError as error:
        raise ValueError(
            f"option {field.name}={value!r} of {cls.__name__} is not a valid {kind.__name__}."
        ) from error


def make_student(
    name: str, *, patch_size: int, alpha: float, options: Mapping[str, object] | None = None
) -> Student:
    """Build the student called ``name`` with the shared hyperparameters.

    Args:
      name: A key of ``STUDENTS``.
      patch_size: Odd side of the reference patch, in feature px.
      alpha: Relative ridge penalty, or the student's own reading of it.
      options: Student-specific hyperparameters by field name. String values
        (as from a command line) are converted to the type of the field's
        default.

    Returns:
      The student instance.

    Raises:
      ValueError: if ``name`` is not in ``STUDENTS``, an option names no
        field of the student, or a value does not convert.
    """
    if name not in STUDENTS:
        raise ValueError(f"unknown student {name!r}; use one of {sorted(STUDENTS)}.")
    cls = STUDENTS[name]
    fields = {field.name: field for field in dataclasses.fields(cls) if field.name not in ("name",)}
    options = dict(options or {})
    shared = sorted(set(options) & {"patch_size", "alpha"})
    if shared:
        raise ValueError(f"options {shared} are shared settings; set them with --patch_size and --alpha instead.")
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ValueError(
            f"student {name!r} has no option(s) {unknown}; its options are "
            f"{sorted(set(fields) - {'patch_size', 'alpha'})}."
        )
    values = {key: _convert_option(cls, fields[key], value) for key, value in options.items()}
    return cls(patch_size=patch_size, alpha=alpha, **values)
