"""Device meshes: particles over one axis, model weights over another (docs/design.md "Scale-out").

Every leaf of a particle state has the particle axis first, so sharding a particle set is one
``NamedSharding(mesh, P(axis))`` per leaf. Propagation and weighting stay local to each shard;
resampling is a gather across shards that XLA lowers to collectives. Results do not depend on the
sharding (JAX's partitionable threefry makes random draws layout-independent).

A 2-D mesh (:func:`mesh`, axes ``particles`` x ``model``) adds tensor parallelism: the weights
are split over the ``model`` axis by :func:`tts_jax.models.partitioning.shard_model` and
replicated over ``particles``; the particle functions below take the same mesh unchanged (their
specs name only the particle axis, so particle leaves are replicated over ``model``).
``--mesh particles=2,model=4`` on the command line is :func:`parse_mesh`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PARTICLE_AXIS = "particles"
MODEL_AXIS = "model"
AXES = (PARTICLE_AXIS, MODEL_AXIS)


def mesh(particles: int | None = None, model: int | None = 1, devices: list | None = None) -> Mesh:
    """A 2-D ``(particles, model)`` mesh over ``devices`` (default ``jax.devices()``).

    One size may be ``None`` or ``-1``: it takes the remaining devices. The model axis is the
    minor one, so a model-parallel group is adjacent devices (one host, the fast interconnect);
    the device order comes from ``jax.experimental.mesh_utils.create_device_mesh`` (topology
    aware on TPU).

    Raises:
        ValueError: a size below 1 (other than one ``None`` / ``-1``), two open sizes, or sizes
            whose product is not the device count (naming both).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = {PARTICLE_AXIS: particles, MODEL_AXIS: model}
    open_axes = [a for a, v in sizes.items() if v is None or v == -1]
    if len(open_axes) > 1:
        raise ValueError("mesh: at most one axis size may be left open (None or -1)")
    for axis, value in sizes.items():
        if axis not in open_axes and (not isinstance(value, int | np.integer) or value < 1):
            raise ValueError(f"mesh: axis {axis!r} needs a size >= 1 (or -1), got {value!r}")
    fixed = int(np.prod([v for a, v in sizes.items() if a not in open_axes]))
    if open_axes:
        if len(devices) % fixed:
            raise ValueError(
                f"mesh: {len(devices)} devices do not split into groups of {fixed} "
                f"({_describe(sizes)})"
            )
        sizes[open_axes[0]] = len(devices) // fixed
    shape = (int(sizes[PARTICLE_AXIS]), int(sizes[MODEL_AXIS]))
    if shape[0] * shape[1] != len(devices):
        raise ValueError(
            f"mesh: {_describe(sizes)} needs {shape[0] * shape[1]} devices, "
            f"{len(devices)} available"
        )
    from jax.experimental import mesh_utils

    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.array(devices).reshape(shape)
    return Mesh(grid, AXES)


def _describe(sizes: dict[str, Any]) -> str:
    return ",".join(f"{a}={'-1' if v is None else v}" for a, v in sizes.items())


def parse_mesh(text: str) -> dict[str, int]:
    """``"particles=2,model=4"`` -> ``{"particles": 2, "model": 4}`` (the ``--mesh`` option).

    Axes may come in any order and either may be omitted; a size is a positive integer or
    ``-1`` ("the rest"). :func:`mesh_from_string` builds the mesh: an omitted ``model`` is 1, an
    omitted ``particles`` takes the remaining devices (1 when ``model=-1``).

    Raises:
        ValueError: naming the offending part: not ``name=size``, an unknown or repeated axis, a
            size that is not an integer >= 1 or -1.
    """
    out: dict[str, int] = {}
    parts = [p.strip() for p in str(text).split(",")]
    if not text or not text.strip():
        raise ValueError(f"--mesh: empty; expected e.g. {PARTICLE_AXIS}=2,{MODEL_AXIS}=4")
    for part in parts:
        name, eq, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if not eq or not name or not value:
            raise ValueError(f"--mesh: {part!r} is not name=size (e.g. {MODEL_AXIS}=4)")
        if name not in AXES:
            raise ValueError(f"--mesh: unknown axis {name!r}; axes are {', '.join(AXES)}")
        if name in out:
            raise ValueError(f"--mesh: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(
                f"--mesh: size of {name!r} must be an integer, got {value!r}"
            ) from None
        if size < 1 and size != -1:
            raise ValueError(f"--mesh: size of {name!r} must be >= 1 or -1, got {size}")
        out[name] = size
    if sum(v == -1 for v in out.values()) > 1:
        raise ValueError("--mesh: at most one axis may be -1")
    return out


def mesh_from_string(text: str, devices: list | None = None) -> Mesh:
    """:func:`mesh` from a ``--mesh`` string (:func:`parse_mesh`)."""
    sizes = parse_mesh(text)
    rest = 1 if -1 in sizes.values() else -1
    return mesh(sizes.get(PARTICLE_AXIS, rest), sizes.get(MODEL_AXIS, 1), devices)


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
