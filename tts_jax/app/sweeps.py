"""One resumable sweep engine for every kind of experiment (image steering runs, LM problems).

A :class:`Task` says how to plan, identify, load, check and run the units of one kind of
experiment; :func:`sweep` does the rest the same way for all of them:

1. plan every unit (validating every config before anything runs);
2. claim the folder for the sweep's shared configuration (:func:`runs.claim_sweep_folder`: a
   folder holds one configuration; another is refused with the differences named);
3. skip the units whose identity (``config_id``: the whole resolved config and the package
   versions) is already recorded in ``runs.jsonl``;
4. load the models once, check every remaining unit is feasible, then run the units, appending
   each finished record to ``runs.jsonl`` with one write and an fsync (a killed sweep loses at
   most the unit it was running);
5. return the records of exactly the planned units.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from tts_jax.app import runs


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


def unit_id(task: Task, unit: Unit) -> str:
    """The unit's identity hash (:func:`runs.config_id` of :attr:`Task.identity`)."""
    return runs.config_id(task.identity(unit))


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
) -> list[dict[str, Any]]:
    """Run every planned unit not yet recorded in ``out_dir/runs.jsonl`` (see the module doc).

    Args:
        task: the kind of experiment.
        base: the config of the settings that are not swept.
        methods, budgets, seeds: the swept values.
        out_dir: the sweep folder.
        bundle: the models (default: ``task.load``, only if there is work to do).
        progress: show a progress bar.

    Returns:
        The records of exactly the planned units, in file order.

    Raises:
        ValueError: an invalid or infeasible config, or a folder of another configuration,
            before anything runs.
    """
    from tqdm.auto import tqdm

    plan = task.plan(base, list(methods), list(budgets), list(seeds))
    runs.claim_sweep_folder(out_dir, task.shared(base))
    path = pathlib.Path(out_dir) / "runs.jsonl"
    done = {r.get("config_id") for r in runs.read_jsonl(path)}
    todo = [u for u in plan if unit_id(task, u) not in done]
    if todo:
        bundle = task.load(todo) if bundle is None else bundle
        task.check(todo, bundle)
        # disable=None: tqdm stays quiet when stderr is not a terminal (CI, logs, notebooks).
        quiet = None if progress else True
        for unit in tqdm(todo, disable=quiet, desc=task.name):
            runs.append_jsonl(path, task.run(unit, bundle))
    wanted = {unit_id(task, u) for u in plan}
    return [r for r in runs.read_jsonl(path) if r.get("config_id") in wanted]
