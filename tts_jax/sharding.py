"""Data-parallel particles: shard the particle axis over a device mesh (docs/design.md "Scale-out").

Every leaf of a particle state has the particle axis first, so sharding a particle set is one
``NamedSharding(mesh, P(axis))`` per leaf. Propagation and weighting stay local to each shard;
resampling is a gather across shards that XLA lowers to collectives. Results do not depend on the
sharding (JAX's partitionable threefry makes random draws layout-independent).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PARTICLE_AXIS = "particles"


def particle_mesh(num_devices: int | None = None, axis: str = PARTICLE_AXIS) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (all by default)."""
    devices = jax.devices()
    num_devices = len(devices) if num_devices is None else num_devices
    if not 1 <= num_devices <= len(devices):
        raise ValueError(f"asked for {num_devices} devices, {len(devices)} available")
    return Mesh(np.array(devices[:num_devices]), (axis,))


def shard_particles(tree: Any, mesh: Mesh, axis: str = PARTICLE_AXIS) -> Any:
    """Place every ``[N, ...]`` leaf with its particle axis split over ``mesh[axis]``.

    Raises:
        ValueError: if N is not divisible by the number of devices on the axis.
    """
    size = mesh.shape[axis]

    def place(leaf):
        if leaf.shape[0] % size:
            raise ValueError(
                f"particle axis of size {leaf.shape[0]} is not divisible by the {size} devices "
                f"of mesh axis {axis!r}"
            )
        spec = PartitionSpec(axis, *([None] * (leaf.ndim - 1)))
        return jax.device_put(leaf, NamedSharding(mesh, spec))

    return jax.tree.map(place, tree)


def constrain_particles(
    tree: Any, mesh: Mesh, num_particles: int, axis: str = PARTICLE_AXIS
) -> Any:
    """Inside jit: split every leaf whose leading axis is ``num_particles`` over ``mesh[axis]``.

    For programs that create their particles themselves (a sampler drawing its initial noise or
    prefilling a prompt), where :func:`shard_particles` has no input to place: constraining the
    particle leaves of the output is enough, XLA propagates the sharding back through the SMC
    loop, so every step runs on the local shards. Other leaves are left to the compiler.

    Raises:
        ValueError: if ``num_particles`` is not divisible by the number of devices on the axis.
    """
    size = mesh.shape[axis]
    if num_particles % size:
        raise ValueError(
            f"{num_particles} particles are not divisible by the {size} devices of mesh axis "
            f"{axis!r}"
        )

    def constrain(leaf):
        if leaf.ndim == 0 or leaf.shape[0] != num_particles:
            return leaf
        spec = PartitionSpec(axis, *([None] * (leaf.ndim - 1)))
        return jax.lax.with_sharding_constraint(leaf, NamedSharding(mesh, spec))

    return jax.tree.map(constrain, tree)
