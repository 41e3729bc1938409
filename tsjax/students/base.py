"""The contract every student implements.

A student learns to predict the inspected image's teacher features from the
reference image's features around the same pixel. Where the prediction fails,
the inspected image breaks the pattern that the reference shows.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import jax
from jax.typing import ArrayLike

__all__ = ["Student", "is_transductive"]


@runtime_checkable
class Student(Protocol):
    """A pair of pure functions over a pytree state.

    Implementations are frozen dataclasses whose fields are hyperparameters,
    so that an instance can be a static argument of ``jax.jit``.

    Shapes: ``ref`` and ``insp`` are ``[B, h, w, C]`` feature maps of one
    teacher layer, and ``valid`` is ``[B, h, w]`` (bool or 0/1 float) marking
    the pixels that may be used for fitting.

    A student whose state only describes the pair it was fitted on (for
    example per-pixel fits that need the inspected features) sets the class
    attribute ``transductive = True``; the pipeline then fits it on each
    scored pair and rejects states fitted elsewhere. The attribute is
    optional and read with ``is_transductive``.
    """

    name: str

    def fit(self, ref: ArrayLike, insp: ArrayLike, valid: ArrayLike, key: jax.Array) -> Any:
        """Fit the student on pairs and return its state (a pytree)."""
        ...

    def predict(self, state: Any, ref: ArrayLike) -> jax.Array:
        """Return the predicted inspected features, ``[B, h, w, C]``."""
        ...


def is_transductive(student: Student) -> bool:
    """Return whether ``student`` can only predict the pair it was fitted on."""
    return bool(getattr(student, "transductive", False))
