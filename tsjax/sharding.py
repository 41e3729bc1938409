"""Spreading a batch of pairs over devices with a ``Mesh`` and ``NamedSharding``.

The batch stages of ``tsjax.batch`` compute every pair independently, so the
pairs axis splits over devices with no communication. Put the batch arrays
on the devices with ``shard_pairs`` and the teacher variables with
``replicate``, then call the jitted stages with the mesh. Each stage then
runs its body through ``per_device`` (``jax.shard_map``), so every device
computes its own pairs. Left to the automatic partitioner, the stages that
loop over pairs with ``jax.lax.map`` (alignment, ridge solves) were
gathered onto every device and computed in full there.

One process drives all devices here. ``docs/scaling.md`` describes runs over
several hosts with ``jax.distributed``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["PAIR_AXIS", "pair_mesh", "pairs_sharding", "shard_pairs", "replicate", "per_device"]

# Name of the mesh axis that the pairs of a batch are split over.
PAIR_AXIS = "pairs"


def pair_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build a one-axis mesh over ``devices`` (default: all of ``jax.devices()``).

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


def per_device(function: Callable, mesh: Mesh | None, in_specs: Any, out_specs: Any = None) -> Callable:
    """Run ``function`` on each device's slice of the pairs, or as is without a mesh.

    Args:
      function: A batch-level function whose pair-axis inputs and outputs
        have the pairs as their leading axis.
      mesh: A mesh from ``pair_mesh``, or ``None``.
      in_specs: One ``PartitionSpec`` (or pytree prefix of them) per
        argument: ``PartitionSpec(PAIR_AXIS)`` for pairs, ``PartitionSpec()``
        for values every device needs whole.
      out_specs: The outputs' specs; by default all outputs are split over
        the pairs.

    Returns:
      ``function`` wrapped in ``jax.shard_map`` over ``mesh``, or
      ``function`` itself when ``mesh`` is ``None``.
    """
    if mesh is None:
        return function
    out_specs = PartitionSpec(PAIR_AXIS) if out_specs is None else out_specs
    # check_vma=False: every output comes from its device's own pairs, as the
    # specs state. The check would reject the replicated PRNG key.
    return jax.shard_map(function, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
