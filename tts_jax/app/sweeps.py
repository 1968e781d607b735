"""One resumable sweep engine for every kind of experiment (image steering runs, LM problems).

A :class:`Task` says how to plan, identify, load, check and run the units of one kind of
experiment; :func:`sweep` does the rest the same way for all of them:

1. plan every unit (validating every config before anything runs);
2. claim the folder for the sweep's shared configuration (:func:`runs.claim_sweep_folder`: a
   folder holds one configuration; another is refused with the differences named);
3. skip the units whose identity (``config_id``: the whole resolved config and the package
   versions) is already recorded in ``runs.jsonl`` or a process shard (below);
4. load the models once, check every remaining unit is feasible, then run the units, appending
   each finished record to ``runs.jsonl`` with one write and an fsync (a killed sweep loses at
   most the unit it was running);
5. return the records of exactly the planned units.

**Several processes** (``jax.distributed``, :mod:`tts_jax.distributed`; or an explicit
:class:`~tts_jax.distributed.ProcessGroup`) split the plan and still write ONE ``runs.jsonl``:

* the split is static and deterministic: the k-th distinct unit of the plan (in plan order)
  belongs to process ``k mod num_processes`` (:func:`owner`). It is computed from the plan, never
  from what is left to do, so a restarted process owns exactly the units it owned before, and no
  unit has two owners. Round robin over the plan, rather than a hash of the unit id, gives every
  process the same number of units to one, and since seeds are the innermost loop of the grids,
  a similar mix of budgets (the cost);
* each process appends only to its own shard ``runs.p<id>.jsonl`` (one writer per file, so a
  line is never interleaved with another process's; a line killed mid-write is skipped by the
  readers and re-run). One file appended to by every process would rely on ``O_APPEND`` being
  atomic across hosts, which NFS does not promise and object-store mounts (GCS-fuse) do not
  support at all; private shards need only one writer's appends and a rename;
* every reader (resume, the returned records) reads ``runs.jsonl`` and all shards, one record per
  unit id (:func:`tts_jax.app.runs.read_runs`), so resuming with any number of processes skips
  every finished unit, whoever ran it;
* the merge writes that union to ``runs.jsonl`` (temp file + rename; shards are kept, so a merge
  can be stale but never loses a line). It runs once every planned unit is recorded: with a
  ``jax.distributed`` group, all processes wait for each other at the end and process 0 merges
  (every process then returns all records); without one, every process that finds the plan
  complete when it finishes merges (the last one to finish always does; two merging at once
  write the same lines). A single process resuming a folder with shards merges them too;
* each process runs its units on its own devices (the app's tasks use the default device, which
  is local): a task must not build a mesh over the global ``jax.devices()``, which would need
  every process to run the same unit.

Every process must plan the same grid (the same settings): with a running group this is checked
(the plan's unit ids must agree) before anything runs.
"""

from __future__ import annotations

import hashlib
import itertools
import pathlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from tts_jax import distributed
from tts_jax.app import runs
from tts_jax.distributed import ProcessGroup


class Unit(NamedTuple):
    """One unit of work: a resolved config and, for tasks with several items per config (LM
    problems), the item's index (``None`` otherwise)."""

    config: Any
    item: int | None = None


class Task(NamedTuple):
    """How the sweep engine runs one kind of experiment.

    Attributes:
        name: shown on the progress bar.
        plan: ``(base, methods, budgets, seeds) -> [Unit]``, every config validated.
        shared: ``base -> dict``: the settings every unit of a sweep shares (its folder's identity).
        identity: ``Unit -> dict``: every field that defines the unit's result.
        load: ``[Unit] -> bundle``: the models the units need, loaded once.
        check: ``([Unit], bundle) -> None``: raise ``ValueError`` naming a unit that cannot
            run (called once with every unit still to run, before the first runs).
        run: ``(Unit, bundle) -> record``: run one unit; returns its JSON-able record.
    """

    name: str
    plan: Callable[[Any, Sequence[str], Sequence[int], Sequence[int]], list[Unit]]
    shared: Callable[[Any], dict[str, Any]]
    identity: Callable[[Unit], dict[str, Any]]
    load: Callable[[list[Unit]], Any]
    check: Callable[[list[Unit], Any], None]
    run: Callable[[Unit, Any], dict[str, Any]]


def unit_id(task: Task, unit: Unit, versions: dict[str, Any] | None = None) -> str:
    """The unit's identity hash (:func:`runs.config_id` of :attr:`Task.identity`; ``versions``:
    :func:`runs.identity_versions`, looked up if not given)."""
    return runs.config_id(task.identity(unit), versions)


def owner(index: int, group: ProcessGroup) -> int:
    """The process that runs the ``index``-th distinct unit of a plan (round robin)."""
    return index % group.num_processes


def share(ids: Sequence[str], group: ProcessGroup) -> set[str]:
    """The unit ids of a plan (``ids`` in plan order, repeats allowed) that ``group``'s process
    runs: every distinct id belongs to exactly one process of the group."""
    distinct = dict.fromkeys(ids)
    return {uid for k, uid in enumerate(distinct) if owner(k, group) == group.process_id}


_calls = itertools.count()  # every process of a group runs its sweeps in the same order


def sweep(
    task: Task,
    base: Any,
    methods: Sequence[str],
    budgets: Sequence[int],
    seeds: Sequence[int],
    out_dir: str | pathlib.Path,
    *,
    bundle: Any = None,
    progress: bool = True,
    group: ProcessGroup | None = None,
) -> list[dict[str, Any]]:
    """Run every planned unit not yet recorded in ``out_dir`` (see the module doc).

    Args:
        task: the kind of experiment.
        base: the config of the settings that are not swept.
        methods, budgets, seeds: the swept values.
        out_dir: the sweep folder.
        bundle: the models (default: ``task.load``, only if there is work to do).
        progress: show a progress bar.
        group: this process's share of the sweep (default: the running ``jax.distributed``
            group, :func:`tts_jax.distributed.process_group`; a single process without one).

    Returns:
        The records of exactly the planned units, in file order (with several processes and no
        ``jax.distributed`` group: the ones recorded so far; all of them once the last process
        finishes).

    Raises:
        ValueError: an invalid or infeasible config, a folder of another configuration, or
            processes of a group planning different grids, before anything runs.
    """
    from tqdm.auto import tqdm

    group = distributed.process_group() if group is None else group
    if not 0 <= group.process_id < group.num_processes:
        raise ValueError(f"process id {group.process_id} is outside 0 .. {group.num_processes - 1}")
    plan = task.plan(base, list(methods), list(budgets), list(seeds))
    versions = runs.identity_versions()  # looked up once: every unit of a sweep shares them
    ids = [unit_id(task, u, versions) for u in plan]
    several = group.num_processes > 1
    synced = several and distributed.is_running()
    if synced:
        digest = hashlib.sha256(" ".join(ids).encode()).hexdigest()[:16]
        distributed.agree(f"tts_jax/sweep/{next(_calls)}/plan", f"{len(ids)} units, {digest}")
    runs.claim_sweep_folder(out_dir, task.shared(base))
    done = {r.get("config_id") for r in runs.read_runs(out_dir)}
    remaining = {uid: u for uid, u in zip(ids, plan, strict=True) if uid not in done}
    mine = share(ids, group)
    todo = [u for uid, u in remaining.items() if uid in mine]
    folder = pathlib.Path(out_dir)
    path = runs.shard_path(folder, group.process_id) if several else folder / runs.RUNS
    if todo:
        bundle = task.load(todo) if bundle is None else bundle
        # Every unit left, not only this process's: processes that have work fail together.
        task.check(list(remaining.values()), bundle)
        # disable=None: tqdm stays quiet when stderr is not a terminal (CI, logs, notebooks).
        quiet = None if progress else True
        for unit in tqdm(todo, disable=quiet, desc=task.name):
            runs.append_jsonl(path, task.run(unit, bundle))
    if synced:
        distributed.barrier(f"tts_jax/sweep/{next(_calls)}/done")
    records = runs.read_runs(out_dir)
    wanted = set(ids)
    complete = wanted <= {r.get("config_id") for r in records}
    sharded = any(p.name != runs.RUNS for p in runs.run_files(folder))
    merger = not synced or group.process_id == 0
    if sharded and merger and (complete or not several):
        runs.merge_runs(folder)
    return [r for r in records if r.get("config_id") in wanted]
