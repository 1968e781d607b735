"""What every search-type sampler shares around its kernel: checks, scoring, results, the run.

A search method (noise search, docs/algorithms.md 1; SVDD / CoDe / RBF, docs/algorithms.md 3)
spends a budget of NFE on candidates and keeps those a verifier scores highest; it has no
weights. Around its :class:`~tts_jax.samplers.base.Sampler` it needs the same pieces, here once:

* host-side checks, before anything is traced (:func:`check_grid`, :func:`check_budget`,
  :func:`check_batch_size`, :func:`check_shared_cond`, :func:`held_out_dict`,
  :func:`check_finite_hyperparameters` re-exported from :mod:`.result`);
* the NaN / ``+inf`` policy (docs/policies.md): in the graph :func:`score` maps invalid scores to
  ``-inf`` (never selected while another candidate exists) and returns their mask, whose counts
  (:func:`~tts_jax.samplers.result.count_invalid`) the result reports as
  ``info.num_nan`` and ``info.num_inf``; on the host :func:`finish` makes
  any of them an error unless ``nan_policy="drop"``;
* held-out verifiers, evaluated on the returned samples only and never used for selection
  (``info.held_out``), and the uniformly weighted :class:`~tts_jax.samplers.result.Result`
  (:func:`search_result`);
* :func:`tts_jax.samplers.base.run_with_keys` (re-exported): ``run`` with its keys given instead of
  derived from one key, for entry points that keep an older key layout.

Selection itself (top-k, the bisection top set, per-chain argmax) is :mod:`.selection`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax.rewards.base import Reward
from tts_jax.samplers.base import run_with_keys
from tts_jax.samplers.result import (
    Cost,
    Result,
    check_finite_hyperparameters,
    check_finite_rewards,
    check_nan_policy,
    held_out_scores,
    make_info,
    mask_invalid_rewards,
)

Array = jax.Array
PyTree = Any

__all__ = [
    "check_batch_size",
    "check_budget",
    "check_finite_hyperparameters",
    "check_grid",
    "check_nan_policy",
    "check_shared_cond",
    "finish",
    "held_out_dict",
    "run_with_keys",
    "score",
    "search_result",
]


# --------------------------------------------------------------------------- host-side checks


def check_grid(method: str, grid: Any, data_end: bool = False) -> int:
    """Check that ``grid`` is ``[K + 1]`` times with ``K >= 1``; return ``K``.

    Only the shape is read (works on traced grids). With ``data_end`` the values are checked
    too, when concrete: strictly decreasing from noise to the data end ``0`` (samplers whose
    last transition lands on samples).

    Raises:
        ValueError: naming ``method`` and the grid's shape (or values).
    """
    shape = np.shape(grid)
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(f"{method}: grid must be [K + 1] times with K >= 1, got shape {shape}")
    if data_end and not isinstance(grid, jax.core.Tracer):
        values = np.asarray(grid, np.float32)
        if values[-1] != 0.0 or not (np.diff(values) < 0).all():
            raise ValueError(
                f"{method}: grid must decrease strictly from noise to the data end 0, got {values}"
            )
    return shape[0] - 1


def check_budget(method: str, budget: Any, minimum: int, what: str) -> None:
    """A budget is a positive int of NFE, at least the cost ``minimum`` of the cheapest run
    (``what`` says what that run is, e.g. "one trajectory of 8 steps").

    Raises:
        ValueError: naming ``method``, the budget and the minimum.
    """
    if isinstance(budget, bool) or not isinstance(budget, int | np.integer) or budget < 1:
        raise ValueError(f"{method}: budget must be a positive int (NFE), got {budget!r}")
    if budget < minimum:
        raise ValueError(
            f"{method}: budget of {budget} NFE is below the minimum of {minimum} NFE ({what})"
        )


def check_batch_size(method: str, batch_size: int | None) -> None:
    """``batch_size`` bounds how many candidates the model sees at once: ``None`` (all) or an
    int ``>= 1``."""
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"{method}: batch_size must be >= 1 or None, got {batch_size}")


def check_shared_cond(method: str, cond: Any) -> None:
    """All candidates search for one sample of one condition: every leaf of ``cond`` has a
    leading axis of size 1 (the model and the verifiers broadcast it to their rows)."""
    for leaf in jax.tree.leaves(cond):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != 1:
            raise ValueError(
                f"{method}: cond is shared by all candidates, its leaves need a leading axis "
                f"of size 1, got shape {jnp.shape(leaf)}"
            )


def held_out_dict(method: str, held_out: Any) -> dict[str, Reward]:
    """Held-out verifiers as ``{name: Reward}``, from ``None``, a mapping or a sequence of
    rewards (keyed by ``Reward.name``).

    Raises:
        ValueError: an entry that is not a :class:`~tts_jax.rewards.base.Reward`, or two
            rewards of a sequence with the same name.
    """
    if held_out is None:
        return {}
    if isinstance(held_out, Mapping):
        out = dict(held_out)
    else:
        held_out = list(held_out)
        names = [getattr(r, "name", None) for r in held_out]
        if len(set(names)) != len(names):
            raise ValueError(f"{method}: held-out rewards need distinct names, got {names}")
        out = dict(zip(names, held_out, strict=True))
    for name, r in out.items():
        if not isinstance(r, Reward):
            raise ValueError(f"{method}: held_out[{name!r}] is not a Reward")
    return out


def finish(result: Result, method: str, reward: Any, nan_policy: str) -> Result:
    """The host-side check after a run: NaN or ``+inf`` scores are an error naming ``method``,
    the verifier and both counts, unless ``nan_policy="drop"``
    (:func:`~tts_jax.samplers.result.check_finite_rewards`). Returns ``result`` unchanged."""
    return check_finite_rewards(result, method, reward, nan_policy)


# --------------------------------------------------------------------------- inside the graph


def score(reward: Any, x: Array, cond: Any = None) -> tuple[Array, Array]:
    """Verifier scores of the batch ``x [C, ...]`` with NaN and ``+inf`` replaced by ``-inf``.

    All scores a selection compares come from one call, so batch-relative verifiers (rank
    ensembles) select correctly. ``cond`` is passed unchanged (a shared one, leading axis 1:
    the reward broadcasts it to its rows).

    Returns:
        ``(scores Float[C], invalid Bool[2, C])``: the NaN and ``+inf`` masks
        (:func:`~tts_jax.samplers.result.mask_invalid_rewards`).
    """
    return mask_invalid_rewards(reward(x, cond))


def search_result(
    samples: Array,
    rewards: Array,
    nfe: Any,
    reward_calls: Any,
    invalid: Array,
    info: dict[str, Any],
    held_out: Any = None,
    cond: Any = None,
) -> Result:
    """The :class:`~tts_jax.samplers.result.Result` of a search: uniform weights, ``best``
    the argmax reward, ``log_evidence`` NaN (no target distribution), no SMC steps.

    Args:
        samples: ``[N, ...]`` the candidates returned.
        rewards: ``Float[N]`` their verifier scores.
        nfe: model forward passes spent, per candidate (int).
        reward_calls: verifier evaluations, per candidate (int).
        invalid: ``Int32[2]`` NaN and ``+inf`` scores seen over the run.
        info: the method's own diagnostics (``Info.extra``).
        held_out: ``{name: Reward}`` (or ``None``) evaluated on ``samples`` with ``cond``
            (passed unchanged), never used for selection.
    """
    num = samples.shape[0]
    return Result(
        samples=samples,
        rewards=rewards,
        log_weights=jnp.full((num,), -jnp.log(num), jnp.float32),
        best=jnp.argmax(rewards),
        log_evidence=jnp.float32(jnp.nan),
        all_dead=jnp.all(rewards == -jnp.inf),
        cost=Cost(jnp.int32(nfe), jnp.int32(reward_calls), jnp.int32(0)),
        info=make_info(
            num,
            num_nan=invalid[0],
            num_inf=invalid[1],
            held_out=held_out_scores(held_out or {}, samples, cond),
            extra=info,
        ),
    )


# --------------------------------------------------------------------------- the run
