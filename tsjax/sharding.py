"""Spreading a batch of pairs over devices with a ``Mesh`` and ``NamedSharding``.

The batch stages of ``tsjax.batch`` compute every pair independently, so the
pairs axis splits over devices with no communication: put the batch arrays
on the devices with ``shard_pairs``, the teacher variables with
``replicate``, and call the same jitted stages. ``jax.jit`` compiles one SPMD
program from the input shardings, and each device computes its own pairs.

One process drives all devices here. ``docs/scaling.md`` describes runs over
several hosts with ``jax.distributed``.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["PAIR_AXIS", "pair_mesh", "pairs_sharding", "shard_pairs", "replicate"]

# Name of the mesh axis that the pairs of a batch are split over.
PAIR_AXIS = "pairs"


def pair_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a one-axis mesh over ``devices`` (default: every device JAX sees).

    Args:
      devices: The devices to spread pairs over.

    Returns:
      A ``Mesh`` with the single axis ``PAIR_AXIS``.

    Raises:
      ValueError: if ``devices`` is empty.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices is empty; pass at least one device or None for all of them.")
    return Mesh(np.asarray(devices), (PAIR_AXIS,))


def pairs_sharding(mesh: Mesh) -> NamedSharding:
    """Return the sharding that splits an array's leading (pairs) axis over ``mesh``."""
    return NamedSharding(mesh, PartitionSpec(PAIR_AXIS))


def shard_pairs(tree: Any, mesh: Mesh) -> Any:
    """Put every array of ``tree`` on the mesh, split along its leading axis.

    Args:
      tree: A pytree of arrays whose leading axis is the pairs of a batch.
      mesh: A mesh from ``pair_mesh``.

    Returns:
      The same pytree of ``jax.Array``s sharded with ``pairs_sharding(mesh)``.

    Raises:
      ValueError: if a leading axis does not divide by the mesh's device count.
    """
    for leaf in jax.tree_util.tree_leaves(tree):
        if np.shape(leaf)[0] % mesh.size:
            raise ValueError(
                f"a batch of {np.shape(leaf)[0]} pairs does not split over {mesh.size} devices; "
                "use a batch size that is a multiple of the device count."
            )
    return jax.device_put(tree, pairs_sharding(mesh))


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Put a full copy of every array of ``tree`` (for example the teacher variables) on each device."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
