"""Students: models that predict inspected features from reference features."""

from tsjax.students.base import Student
from tsjax.students.ridge import RidgeState, RidgeStudent, ridge_solve

__all__ = ["Student", "RidgeState", "RidgeStudent", "ridge_solve", "STUDENTS", "make_student"]

# Student classes by the name that ``--student`` takes. A new student is one
# class implementing ``Student`` plus one entry here.
STUDENTS = {"ridge": RidgeStudent}


def make_student(name: str, *, patch_size: int, alpha: float) -> Student:
    """Build the student called ``name`` with the shared hyperparameters.

    Raises:
      ValueError: if ``name`` is not in ``STUDENTS``.
    """
    if name not in STUDENTS:
        raise ValueError(f"unknown student {name!r}; use one of {sorted(STUDENTS)}.")
    return STUDENTS[name](patch_size=patch_size, alpha=alpha)
