"""Starting and describing the process group of a multi-host run (docs/design.md "Multi-host").

One Python process per host (or per accelerator) runs the same program; ``jax.distributed`` joins
them so that ``jax.devices()`` lists every process's devices. Two ways to use a group:

* **one run across hosts**: the samplers run unchanged on a global mesh
  (:func:`tts_jax.sharding.particle_mesh` builds it from ``jax.devices()``, which then spans every
  process); every process runs the same program on its shards of the particles;
* **a sweep across hosts**: :func:`tts_jax.app.sweeps.sweep` splits the (method, budget, seed)
  grid, each process runs its own units on its own devices, and one merged ``runs.jsonl``
  is written (see :mod:`tts_jax.app.sweeps`).

:func:`initialize` starts the group from explicit settings or the environment, and is a no-op
for a single process (the default), so the same command runs on a laptop and on a pod.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import NamedTuple

import jax

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
"""``HOST:PORT`` of process 0's coordinator service (JAX reads it itself too)."""
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
"""The number of processes (read here; JAX itself reads it only through cluster detection)."""
ENV_PROCESS_ID = "JAX_PROCESS_ID"
"""This process's id in ``0 .. num_processes - 1`` (read here, like :data:`ENV_NUM_PROCESSES`)."""

BARRIER_TIMEOUT_S = 7 * 24 * 3600
"""How long a process waits at :func:`barrier` for the others (a sweep's processes finish their
shares at different times; the wait must outlast the imbalance, not a network hiccup)."""


class ProcessGroup(NamedTuple):
    """Where this process stands in a group: ``process_id`` in ``0 .. num_processes - 1``."""

    process_id: int = 0
    num_processes: int = 1


SINGLE = ProcessGroup()
"""The group of a single process (nothing started)."""


class Settings(NamedTuple):
    """What :func:`initialize` passes to ``jax.distributed.initialize`` (``None``: left to JAX's
    cluster detection: TPU pods, Slurm, Open MPI)."""

    coordinator: str | None
    num_processes: int | None
    process_id: int | None


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    text = environ.get(name)
    if text is None or text.strip() == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"${name}={text!r} is not an integer") from None


def resolve(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings | None:
    """The settings of the group to start, or ``None`` for a single process.

    Explicit values win over :data:`ENV_COORDINATOR`, :data:`ENV_NUM_PROCESSES` and
    :data:`ENV_PROCESS_ID`. Nothing set, or one process, means a single process.

    Raises:
        ValueError: a process count below 1, a process id outside ``0 .. num_processes - 1``,
            or an environment value that is not an integer.
    """
    environ = os.environ if environ is None else environ
    coordinator = coordinator or environ.get(ENV_COORDINATOR) or None
    num_processes = _env_int(environ, ENV_NUM_PROCESSES) if num_processes is None else num_processes
    process_id = _env_int(environ, ENV_PROCESS_ID) if process_id is None else process_id
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"the number of processes must be at least 1, got {num_processes}")
    if process_id is not None and (
        process_id < 0 or (num_processes is not None and process_id >= num_processes)
    ):
        bound = "" if num_processes is None else f" .. {num_processes - 1}"
        raise ValueError(f"process id {process_id} is outside 0{bound}")
    if num_processes == 1 or (coordinator, num_processes, process_id) == (None, None, None):
        return None
    return Settings(coordinator, num_processes, process_id)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    initialization_timeout: int = 300,
) -> ProcessGroup:
    """Start the process group (``jax.distributed.initialize``) if one is asked for.

    Must run before any JAX computation of the process. Settings come from the arguments, else
    the environment (:func:`resolve`); what is still unset is left to JAX's cluster detection
    (on a TPU pod or under Slurm, ``num_processes`` alone, or even nothing but
    ``$JAX_COORDINATOR_ADDRESS``, is enough). Nothing asked for: a no-op returning
    :data:`SINGLE`. Calling it again in a started process returns the running group.

    Args:
        coordinator: ``HOST:PORT`` of process 0 (every process passes the same).
        num_processes: the number of processes.
        process_id: this process's id.
        environ: the environment to read (default ``os.environ``).
        initialization_timeout: seconds to wait for every process to join.

    Returns:
        This process's :class:`ProcessGroup`.

    Raises:
        ValueError: invalid settings, settings JAX cannot complete (no coordinator outside a
            managed cluster), or a JAX computation already ran in this process.
    """
    if jax.distributed.is_initialized():
        return process_group()
    settings = resolve(coordinator, num_processes, process_id, environ)
    if settings is None:
        return SINGLE
    try:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator,
            num_processes=settings.num_processes,
            process_id=settings.process_id,
            initialization_timeout=initialization_timeout,
        )
    except ValueError as err:
        raise ValueError(
            f"cannot start the process group ({err}): outside a managed cluster (TPU pod, Slurm, "
            f"Open MPI) give the coordinator HOST:PORT (or ${ENV_COORDINATOR}), the number of "
            f"processes (${ENV_NUM_PROCESSES}) and this process's id (${ENV_PROCESS_ID})"
        ) from None
    except RuntimeError as err:
        raise ValueError(
            f"cannot start the process group: {err} (start it first thing in the process)"
        ) from None
    return process_group()


def process_group() -> ProcessGroup:
    """This process's place in the running group (:data:`SINGLE` when none was started)."""
    return ProcessGroup(jax.process_index(), jax.process_count())


def is_running() -> bool:
    """Whether a ``jax.distributed`` group is running in this process."""
    return jax.distributed.is_initialized()


def _client():
    from jax._src import distributed as jax_distributed

    return jax_distributed.global_state.client


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """Wait until every process of the running group reaches the barrier ``name`` (a no-op
    without a group). Every process must call it with the same ``name``, the same number of
    times.

    Raises:
        RuntimeError: a process did not arrive within ``timeout_s`` or the group failed.
    """
    if not is_running():
        return
    _client().wait_at_barrier(name, int(timeout_s * 1000))


def agree(name: str, value: str, timeout_s: float = 600.0) -> None:
    """Check that every process of the running group holds the same ``value`` under ``name`` (a
    no-op without a group): for settings that must not differ between processes, such as the
    plan of a sweep they split.

    Raises:
        ValueError: naming the processes whose value differs from process 0's.
    """
    if not is_running():
        return
    group = process_group()
    client = _client()
    client.key_value_set(f"{name}/{group.process_id}", value)
    barrier(f"{name}/set", timeout_s)
    values = [
        client.blocking_key_value_get(f"{name}/{i}", int(timeout_s * 1000))
        for i in range(group.num_processes)
    ]
    differ = [i for i, v in enumerate(values) if v != values[0]]
    if differ:
        raise ValueError(
            f"{name}: processes {differ} hold another value than process 0 "
            f"({values[differ[0]]!r} vs {values[0]!r}); start every process with the same settings"
        )
