"""Search over initial noises and denoising paths (Ma et al. 2025, "Inference-Time Scaling for
Diffusion Models beyond Scaling Denoising Steps", docs/algorithms.md 1).

Three search algorithms, all driven by a verifier (any :class:`~tts_jax.rewards.base.Reward`,
including a :func:`~tts_jax.rewards.ensemble.mean_rank_ensemble` of several) and all given a
budget in NFE:

* :func:`best_of_n` (random search): ``N`` independent noises, each denoised, argmax verifier.
* :func:`zero_order_search`: hill climbing on the sphere of the pivot noise, restarting from a
  fresh noise when no neighbour improves.
* :func:`search_over_paths`: branch ``N`` partial trajectories by exact forward re-noising, solve
  back further than they were re-noised, keep the top ``N`` by the verifier on the Tweedie
  estimate, until the data end.

Cost accounting. ``nfe`` counts model forward passes per candidate (one velocity evaluation of one
sample is 1 NFE), the unit in which scaling curves compare methods; a budget is a maximum of that
count and is never exceeded (any remainder too small for another candidate is left unspent).
``reward_calls`` counts verifier evaluations per candidate separately. Budgets below the cheapest
run of a method are rejected with an error that names the minimum.

Verifiers and non-finite scores. Selection only ever compares scores computed in the same
verifier batch, so batch-relative verifiers (mean-rank ensembles) select correctly. A NaN or
``+inf`` score is invalid and becomes ``-inf``: such a candidate is never selected while any
other exists; ``info["num_nan_rewards"]`` and ``info["num_inf_rewards"]`` count them. After the
run the host raises an error naming the method, the verifier and both counts if any was seen,
unless ``nan_policy="drop"``. A ``-inf`` score is valid (it rejects the candidate). Non-finite
hyper-parameters (``lambda_cos``, the diffusion norm, grid times) are an error at the call.
``held_out`` verifiers (``name -> Reward``) are evaluated on the returned samples only, reported
in ``info["held_out"]`` and never used for selection: optimizing one verifier can lower the
others, which users need to see.

Conditioning and batching. All candidates search for one sample of one condition: ``cond`` is
``None`` or a pytree whose leaves have a leading axis of size 1 (e.g. a class label ``[1]``),
broadcast to the rows of every model and verifier call. The model is called on all candidates
at once (``[C, ...]``, one batched forward per step), or, when ``batch_size`` bounds memory, on
chunks of ``batch_size`` rows in sequence (``lax.map``). Candidate ``i``'s SDE noise comes from
its own key (:func:`~tts_jax.samplers.integrate.solve_rows`), so a candidate does not depend on
which others share its batch: results do not depend on ``batch_size`` (up to float rounding).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax.interpolants import Diffusion, forward_renoise, ode
from tts_jax.models.base import FlowModel
from tts_jax.rewards.base import Reward
from tts_jax.samplers.integrate import initial_noise, solve_rows, tweedie
from tts_jax.samplers.result import (
    SampleResult,
    check_finite_hyperparameters,
    check_finite_rewards,
    check_nan_policy,
    count_invalid,
    invalid_reward_info,
    mask_invalid_rewards,
)

Array = jax.Array


# --------------------------------------------------------------------------- shared pieces


def _broadcast_cond(cond: Any, num: int) -> Any:
    """Broadcast a shared condition (leaves ``[1, ...]``) to ``num`` candidates."""
    return jax.tree.map(lambda c: jnp.broadcast_to(c, (num, *c.shape[1:])), cond)


def _map_rows(fn, xs, batch_size: int | None) -> Array:
    """``fn`` (a batch of rows ``[B, ...]`` -> ``[B, ...]``) over the rows of ``xs`` (pytree,
    leading axis ``C``): one call on all rows, or sequential calls (``lax.map``) on chunks of
    ``batch_size`` rows followed by one call on the remaining ``C mod batch_size`` rows."""
    num = jax.tree.leaves(xs)[0].shape[0]
    if batch_size is None or batch_size >= num:
        return fn(xs)
    full = num - num % batch_size
    chunks = jax.tree.map(lambda x: x[:full].reshape(-1, batch_size, *x.shape[1:]), xs)
    out = jax.lax.map(fn, chunks)
    out = out.reshape(full, *out.shape[2:])
    if full == num:
        return out
    return jnp.concatenate([out, fn(jax.tree.map(lambda x: x[full:], xs))])


def _denoise(keys, model, x, grid, diffusion, cond, batch_size):
    """Integrate every candidate ``x [C, ...]`` along ``grid``, batched (chunks of ``batch_size``
    rows), candidate ``i``'s noise from ``keys[i]`` (``keys [C]``): ``(len(grid) - 1) C`` NFE."""

    def rows(args):
        k, xs = args
        return solve_rows(k, model, xs, grid, diffusion, _broadcast_cond(cond, xs.shape[0]))

    return _map_rows(rows, (keys, x), batch_size)


def _fold_in_range(key, num: int):
    """Keys ``fold_in(key, i)`` for ``i < num``: a larger run extends a smaller one."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(num))


def _velocity(model, x, t, cond, batch_size):
    """Velocity of every candidate ``x [C, ...]`` at scalar time ``t``, batched: ``C`` NFE."""

    def rows(xs):
        return model.velocity(xs, t, _broadcast_cond(cond, xs.shape[0]))

    return _map_rows(rows, x, batch_size)


def _score(reward, x, cond):
    """Verifier scores ``[C]`` of the batch ``x [C, ...]`` (NaN and ``+inf`` -> ``-inf``) and
    the mask ``Bool[2, C]`` of the NaN and ``+inf`` scores."""
    return mask_invalid_rewards(reward(x, _broadcast_cond(cond, x.shape[0])))


def _held_out(held_out, samples, cond):
    """Held-out verifier scores of the returned samples (never used for selection)."""
    cond = _broadcast_cond(cond, samples.shape[0])
    return {name: r(samples, cond) for name, r in held_out.items()}


def _result(samples, rewards, nfe, reward_calls, invalid, held_out, cond, info) -> SampleResult:
    """Uniformly weighted search output ``samples [N, ...]``; ``invalid Int32[2]`` counts the
    NaN and ``+inf`` scores; held-out scores added to ``info``."""
    num = samples.shape[0]
    info = {
        **info,
        **invalid_reward_info(invalid),
        "held_out": _held_out(held_out, samples, cond),
    }
    return SampleResult(
        samples=samples,
        rewards=rewards,
        log_weights=jnp.full((num,), -jnp.log(num), jnp.float32),
        best=jnp.argmax(rewards),
        nfe=jnp.int32(nfe),
        reward_calls=jnp.int32(reward_calls),
        log_evidence=jnp.float32(jnp.nan),
        info=info,
    )


def _validate(
    method, grid, diffusion, cond, held_out, nan_policy, batch_size
) -> tuple[Array, Diffusion, dict]:
    """Host-side input checks shared by the three searches; returns ``(grid, diffusion,
    held_out)`` with the default ``ode()`` filled in."""
    grid = np.asarray(grid, np.float32)  # host-side: no device op before the one jitted call
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"{method}: grid must be [K + 1] times with K >= 1, got {grid.shape}")
    check_nan_policy(method, nan_policy)
    diffusion = ode() if diffusion is None else diffusion
    check_finite_hyperparameters(
        method, {"grid": grid, "diffusion.norm": getattr(diffusion, "norm", None)}
    )
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"{method}: batch_size must be >= 1 or None, got {batch_size}")
    for leaf in jax.tree.leaves(cond):
        if jnp.ndim(leaf) < 1 or jnp.shape(leaf)[0] != 1:
            raise ValueError(
                f"{method}: cond is shared by all candidates, its leaves need a leading axis "
                f"of size 1, got shape {jnp.shape(leaf)}"
            )
    held_out = {} if held_out is None else dict(held_out)
    for name, r in held_out.items():
        if not isinstance(r, Reward):
            raise ValueError(f"{method}: held_out[{name!r}] is not a Reward")
    return grid, diffusion, held_out


def _check_budget(method: str, budget: int, minimum: int, what: str) -> None:
    if budget < minimum:
        raise ValueError(
            f"{method}: budget of {budget} NFE is below the minimum of {minimum} NFE ({what})"
        )


def _finish(result: SampleResult, method: str, reward: Reward, nan_policy: str) -> SampleResult:
    """The host-side check of NaN / ``+inf`` scores (an error unless ``nan_policy="drop"``)."""
    return check_finite_rewards(result, method, reward, nan_policy)


# --------------------------------------------------------------------------- random search


@functools.partial(jax.jit, static_argnames=("num_samples", "batch_size"))
def _best_of_n(key, model, reward, grid, diffusion, cond, held_out, num_samples, batch_size):
    keys = jax.vmap(jax.random.split)(_fold_in_range(key, num_samples))  # [N, 2]
    noise = jax.vmap(lambda k: initial_noise(k, model, 1)[0])(keys[:, 0])
    samples = _denoise(keys[:, 1], model, noise, grid, diffusion, cond, batch_size)
    scores, invalid = _score(reward, samples, cond)
    num_steps = grid.shape[0] - 1
    info = {
        "best_reward": jax.lax.cummax(scores),
        "nfe": num_steps * jnp.arange(1, num_samples + 1, dtype=jnp.int32),
    }
    return _result(
        samples,
        scores,
        num_steps * num_samples,
        num_samples,
        count_invalid(invalid),
        held_out,
        cond,
        info,
    )


def best_of_n(
    key: Array,
    model: FlowModel,
    reward: Reward,
    budget: int,
    grid: Array,
    diffusion: Diffusion | None = None,
    *,
    held_out: dict[str, Reward] | None = None,
    cond: Any = None,
    batch_size: int | None = None,
    nan_policy: str = "raise",
) -> SampleResult:
    """Random search: ``N = budget // K`` independent noises, each denoised, argmax verifier.

    Ma et al. 2025, "Inference-Time Scaling for Diffusion Models beyond Scaling Denoising Steps".

    Candidate ``i`` uses ``fold_in(key, i)``: with the same key, a larger budget extends the
    candidates of a smaller one, so (for a per-candidate reward) the best reward never decreases
    with the budget.

    Args:
        key: PRNG key (same key -> same result, whatever ``batch_size``).
        model: :class:`~tts_jax.models.base.FlowModel`.
        reward: the verifier used for selection, ``x [N, ...] -> [N]`` (higher is better).
        budget: maximum NFE; at least ``K``, one full trajectory.
        grid: ``[K + 1]`` times from noise (1) to data (0).
        diffusion: ``ode()`` (default) or an SDE coefficient.
        held_out: ``name -> Reward`` evaluated on the returned samples only.
        cond: shared condition (leaves ``[1, ...]``) or ``None``.
        batch_size: denoise at most this many candidates at once (``lax.map``); ``None``: all.
        nan_policy: ``raise`` (default: a NaN or ``+inf`` score is an error after the run) or
            ``drop`` (such candidates score ``-inf``: never selected).

    Returns:
        :class:`SampleResult` with all ``N`` candidates ``[N, ...]``, their scores ``[N]``,
        ``best`` the argmax, ``nfe = N K``, ``reward_calls = N``; ``info``: ``best_reward [N]``
        and ``nfe [N]`` (the best score and cost after each of the first ``n`` candidates),
        ``num_nan_rewards`` and ``num_inf_rewards`` (NaN and ``+inf`` scores),
        ``held_out`` (``name -> [N]``).

    Raises:
        ValueError: bad arguments, a non-finite ``grid`` or diffusion norm, or (unless
            ``nan_policy="drop"``) a NaN or ``+inf`` score.
    """
    grid, diffusion, held_out = _validate(
        "best_of_n", grid, diffusion, cond, held_out, nan_policy, batch_size
    )
    num_steps = grid.shape[0] - 1
    _check_budget("best_of_n", budget, num_steps, f"one trajectory of {num_steps} steps")
    result = _best_of_n(
        key, model, reward, grid, diffusion, cond, held_out, budget // num_steps, batch_size
    )
    return _finish(result, "best_of_n", reward, nan_policy)


# --------------------------------------------------------------------------- zero-order search


def sphere_neighbours(key: Array, pivot: Array, lambda_cos: Array, num: int) -> Array:
    """``num`` points with the norm of ``pivot`` and cosine similarity ``lambda_cos`` with it.

    ``n' = ||n|| (a u + sqrt(1 - a^2) w)`` with ``u = n / ||n||``, ``a = lambda_cos`` and ``w`` a
    uniformly random unit vector orthogonal to ``u`` (Ma et al. 2025, zero-order search).

    Args:
        key: PRNG key.
        pivot: ``[*shape]`` the pivot noise (non-zero).
        lambda_cos: scalar in ``[-1, 1]``.
        num: number of neighbours (static).

    Returns:
        ``[num, *shape]`` neighbours.
    """
    flat = pivot.reshape(-1)
    norm = jnp.linalg.norm(flat)
    u = flat / norm
    z = jax.random.normal(key, (num, flat.shape[0]), flat.dtype)
    w = z - (z @ u)[:, None] * u[None]
    w = w / jnp.linalg.norm(w, axis=-1, keepdims=True)
    a = jnp.asarray(lambda_cos, flat.dtype)
    out = norm * (a * u[None] + jnp.sqrt(1.0 - a**2) * w)
    return out.reshape(num, *pivot.shape)


class _PivotState(NamedTuple):
    """Zero-order search carry (one pivot, unbatched ``[*shape]`` leaves)."""

    pivot: Array  # [*shape] pivot noise
    pivot_x0: Array  # [*shape] its denoised sample (cached: never denoised again)
    pivot_scored: Array  # bool; False right after a restart (fresh noise, not denoised)
    best_x0: Array  # [*shape] best sample seen so far
    invalid: Array  # int32[2] NaN and +inf scores among freshly denoised candidates


def _zero_order_iteration(
    model, reward, grid, diffusion, lambda_cos, cond, num_neighbours, batch_size
):
    """One hill-climbing step ``(state, key) -> (state, diagnostics)``: ``M K`` NFE, M+2 calls."""

    def iteration(state: _PivotState, key):
        k_nb, k_solve, k_restart = jax.random.split(key, 3)
        noises = sphere_neighbours(k_nb, state.pivot, lambda_cos, num_neighbours)
        keys = jax.random.split(k_solve, num_neighbours)
        cand = _denoise(keys, model, noises, grid, diffusion, cond, batch_size)
        # Rescore the cached best and pivot samples with the neighbours (0 NFE) so that
        # batch-relative verifiers compare all three within one batch.
        batch = jnp.concatenate([state.best_x0[None], state.pivot_x0[None], cand])
        scores, invalid = _score(reward, batch, cond)
        pivot_score = jnp.where(state.pivot_scored, scores[1], -jnp.inf)
        j = jnp.argmax(scores[2:])
        nb_score = scores[2 + j]
        move = nb_score > pivot_score
        fresh = jax.random.normal(k_restart, state.pivot.shape, state.pivot.dtype)
        improved = nb_score > scores[0]
        new = _PivotState(
            pivot=jnp.where(move, noises[j], fresh),
            pivot_x0=jnp.where(move, cand[j], state.pivot_x0),
            pivot_scored=move,
            best_x0=jnp.where(improved, cand[j], state.best_x0),
            invalid=state.invalid + count_invalid(invalid[:, 2:]),
        )
        diag = {
            "best_reward": jnp.maximum(scores[0], nb_score),
            "pivot_reward": jnp.where(move, nb_score, -jnp.inf),
            "restarted": ~move,
        }
        return new, diag

    return iteration


@functools.partial(jax.jit, static_argnames=("num_iterations", "num_neighbours", "batch_size"))
def _zero_order_search(
    key,
    model,
    reward,
    grid,
    diffusion,
    lambda_cos,
    cond,
    held_out,
    num_iterations,
    num_neighbours,
    batch_size,
):
    k_init, k_solve, k_loop = jax.random.split(key, 3)
    pivot = initial_noise(k_init, model, 1)
    x0 = _denoise(k_solve[None], model, pivot, grid, diffusion, cond, batch_size)
    score, invalid = _score(reward, x0, cond)
    init = _PivotState(pivot[0], x0[0], jnp.bool_(True), x0[0], count_invalid(invalid))
    iteration = _zero_order_iteration(
        model, reward, grid, diffusion, lambda_cos, cond, num_neighbours, batch_size
    )
    final, diag = jax.lax.scan(iteration, init, _fold_in_range(k_loop, num_iterations))
    num_steps = grid.shape[0] - 1
    info = {
        "best_reward": jnp.concatenate([score, diag["best_reward"]]),
        "pivot_reward": jnp.concatenate([score, diag["pivot_reward"]]),
        "restarted": jnp.concatenate([jnp.zeros((1,), bool), diag["restarted"]]),
        "nfe": num_steps * (1 + num_neighbours * jnp.arange(num_iterations + 1, dtype=jnp.int32)),
    }
    return _result(
        final.best_x0[None],
        info["best_reward"][-1:],
        num_steps * (1 + num_neighbours * num_iterations),
        1 + (num_neighbours + 2) * num_iterations,
        final.invalid,
        held_out,
        cond,
        info,
    )


def zero_order_search(
    key: Array,
    model: FlowModel,
    reward: Reward,
    budget: int,
    grid: Array,
    diffusion: Diffusion | None = None,
    *,
    num_neighbours: int = 4,
    lambda_cos: float | Array = 0.95,
    held_out: dict[str, Reward] | None = None,
    cond: Any = None,
    batch_size: int | None = None,
    nan_policy: str = "raise",
) -> SampleResult:
    """Zero-order search over the initial noise (Ma et al. 2025).

    Start from a random pivot noise, denoised and scored once (``K`` NFE). Each iteration draws
    ``M`` neighbours on the sphere of the pivot (:func:`sphere_neighbours`: same norm, cosine
    similarity ``lambda_cos``), denoises and scores them (``M K`` NFE). If the best neighbour
    beats the pivot it becomes the pivot; otherwise the search restarts from a fresh random noise,
    which escapes the fixed point. The fresh pivot is not denoised (that would spend ``K`` NFE on
    a sample whose neighbours are denoised next anyway): it counts as scoring ``-inf``, so after a
    restart the best neighbour always becomes the pivot. The pivot is never denoised twice: its
    sample is cached and rescored with the neighbours (a reward call, 0 NFE), which keeps
    batch-relative verifiers consistent. The best sample seen over all iterations is returned.

    Iterations: ``I = (budget - K) // (M K)`` inside one ``lax.scan``; ``nfe = K (1 + I M)``,
    ``reward_calls = 1 + I (M + 2)``. Iteration ``i`` uses ``fold_in(key', i)``: with the same key,
    a larger budget continues the run of a smaller one (for a per-candidate reward the best reward
    never decreases; a rank ensemble's scores are relative to each iteration's batch).

    Args:
        key: PRNG key.
        model: :class:`~tts_jax.models.base.FlowModel`.
        reward: the verifier used for selection.
        budget: maximum NFE; at least ``K``.
        grid: ``[K + 1]`` times from noise (1) to data (0).
        diffusion: ``ode()`` (default; the noise -> sample map is then deterministic) or an SDE.
        num_neighbours: ``M`` (static).
        lambda_cos: cosine similarity of neighbours and pivot in ``[-1, 1]`` (an array argument:
            sweeping it does not recompile).
        held_out, cond, batch_size, nan_policy: as in :func:`best_of_n`.

    Returns:
        :class:`SampleResult` with the best sample ``[1, ...]`` and its score ``[1]``; ``info``:
        per iteration (index 0 is the initial pivot) ``best_reward [I + 1]`` (best so far),
        ``pivot_reward [I + 1]`` (``-inf`` after a restart), ``restarted [I + 1]``,
        ``nfe [I + 1]`` (spent so far); ``num_nan_rewards``, ``num_inf_rewards``; ``held_out``
        (``name -> [1]``).

    Raises:
        ValueError: as :func:`best_of_n`, and ``lambda_cos`` outside ``[-1, 1]`` (NaN included).
    """
    method = "zero_order_search"
    grid, diffusion, held_out = _validate(
        method, grid, diffusion, cond, held_out, nan_policy, batch_size
    )
    num_steps = grid.shape[0] - 1
    _check_budget(method, budget, num_steps, f"the initial pivot's {num_steps}-step trajectory")
    if num_neighbours < 1:
        raise ValueError(f"{method}: num_neighbours must be >= 1, got {num_neighbours}")
    lambda_cos = np.asarray(lambda_cos, np.float32)
    if lambda_cos.ndim != 0 or not abs(float(lambda_cos)) <= 1.0:
        raise ValueError(f"{method}: lambda_cos must be a scalar in [-1, 1], got {lambda_cos}")
    result = _zero_order_search(
        key,
        model,
        reward,
        grid,
        diffusion,
        lambda_cos,
        cond,
        held_out,
        (budget - num_steps) // (num_neighbours * num_steps),
        num_neighbours,
        batch_size,
    )
    return _finish(result, method, reward, nan_policy)


# --------------------------------------------------------------------------- search over paths


class PathsPlan(NamedTuple):
    """The static schedule of :func:`search_over_paths` on a ``K``-step grid (grid indices).

    Attributes:
        levels: grid index where each round starts (before re-noising).
        lengths: ODE steps each round solves back (the last one is clipped at the data end).
        nfe_after_round: NFE spent per path (``N = 1``) once each round is done; a run with
            ``N`` paths costs ``N`` times it.
    """

    levels: tuple[int, ...]
    lengths: tuple[int, ...]
    nfe_after_round: tuple[int, ...]

    @property
    def nfe_per_path(self) -> int:
        return self.nfe_after_round[-1]


def paths_plan(
    num_steps: int, num_branches: int, start_step: int, forward_steps: int, backward_steps: int
) -> PathsPlan:
    """Rounds and exact cost of search over paths (host-side, static).

    Round ``r`` starts at grid index ``k_r = start + r (b - f)``, re-noises to ``k_r - f`` and
    solves ``min(b, K - k_r + f)`` steps back; every round but the last (which ends at the data
    end) spends one more NFE per candidate on the velocity of its Tweedie estimate. Per path:
    ``start + M sum_r (length_r + 1[not last])`` NFE.
    """
    levels, lengths, spent = [], [], [start_step]
    level = start_step
    while level < num_steps:
        length = min(backward_steps, num_steps - level + forward_steps)
        last = level - forward_steps + length == num_steps
        levels.append(level)
        lengths.append(length)
        spent.append(spent[-1] + num_branches * (length + (0 if last else 1)))
        level += backward_steps - forward_steps
    return PathsPlan(tuple(levels), tuple(lengths), tuple(spent[1:]))


def _branch_and_solve(key, model, grid, diffusion, x, level, length, settings):
    """Re-noise each of ``x [N, ...]`` ``M`` times from ``grid[level]`` to ``grid[level - f]``
    (exact forward transition) and solve ``length`` steps back -> ``[N M, ...]``."""
    num_branches, forward_steps, cond, batch_size = settings
    k_noise, k_solve = jax.random.split(key)
    up = level - forward_steps
    branches = jnp.repeat(x, num_branches, axis=0)
    branches = forward_renoise(model.interpolant, k_noise, branches, grid[level], grid[up])
    segment = jax.lax.dynamic_slice(grid, (up,), (length + 1,))
    keys = jax.random.split(k_solve, branches.shape[0])
    return _denoise(keys, model, branches, segment, diffusion, cond, batch_size)


def _keep_top(scores: Array, cand: Array, num: int) -> tuple[Array, Array]:
    """The ``num`` best of ``cand [C, ...]`` by ``scores [C]``, best first: ``(scores [num],
    candidates [num, ...])``.

    Callers take the best score as ``max(scores)``, never by slicing the result: XLA:CPU runs
    ``top_k`` as its partial-sort kernel only when every use of it is the whole ``[num]`` result;
    a slice such as ``top[0]`` makes it fall back to a full stable sort of ``C`` (about 3x slower
    at ``C = 16384``).
    """
    top, idx = jax.lax.top_k(scores, num)
    return top, cand[idx]


def _order_key(scores: Array) -> Array:
    """``uint32`` keys of float32 ``scores`` that order like the scores (``-inf`` lowest)."""
    bits = jax.lax.bitcast_convert_type(scores.astype(jnp.float32), jnp.uint32)
    negative = (bits >> 31) == 1
    return jnp.where(negative, ~bits, bits | jnp.uint32(0x80000000))


def _top_set(scores: Array, num: int) -> Array:
    """Indices ``Int32[num]`` of the ``num`` largest of NaN-free ``scores [C]``, in index order:
    the set ``lax.top_k`` picks (ties broken towards lower indices), unsorted.

    The ``num``-th largest key is found by a 32-round bisection of the ``uint32`` key range, each
    round one count over ``C``; the indices are then compacted with one cumulative sum and one
    scatter. On XLA:CPU this is about 3x faster than ``top_k``'s partial sort at ``C >= 4096``
    (``num = C / 4``), which search over paths pays every round and never needs sorted.
    """
    keys = _order_key(scores)

    def bisect(_, bounds):
        low, high = bounds  # invariant: at least `num` keys >= low; fewer than `num` > high
        span = high - low
        mid = low + (span >> 1) + (span & 1)
        enough = jnp.sum(keys >= mid) >= num
        return jnp.where(enough, mid, low), jnp.where(enough, high, mid - jnp.uint32(1))

    threshold, _ = jax.lax.fori_loop(0, 32, bisect, (jnp.uint32(0), jnp.uint32(0xFFFFFFFF)))
    above = keys > threshold
    at = keys == threshold
    take = above | (at & (jnp.cumsum(at) <= num - jnp.sum(above)))
    slot = jnp.where(take, jnp.cumsum(take) - 1, num)
    index = jnp.arange(scores.shape[0], dtype=jnp.int32)
    return jnp.zeros((num,), jnp.int32).at[slot].set(index, mode="drop")


@functools.partial(
    jax.jit,
    static_argnames=(
        "num_paths",
        "num_branches",
        "start_step",
        "forward_steps",
        "backward_steps",
        "batch_size",
    ),
)
def _search_over_paths(
    key,
    model,
    reward,
    grid,
    diffusion,
    cond,
    held_out,
    num_paths,
    num_branches,
    start_step,
    forward_steps,
    backward_steps,
    batch_size,
):
    num_steps = grid.shape[0] - 1
    plan = paths_plan(num_steps, num_branches, start_step, forward_steps, backward_steps)
    settings = (num_branches, forward_steps, cond, batch_size)
    k_noise, k_solve, k_loop = jax.random.split(key, 3)
    noise = initial_noise(k_noise, model, num_paths)
    keys = jax.random.split(k_solve, num_paths)
    x = _denoise(keys, model, noise, grid[: start_step + 1], diffusion, cond, batch_size)
    round_keys = jax.random.split(k_loop, len(plan.levels))

    def intermediate_round(carry, inputs):
        x, num_invalid = carry
        k, level = inputs
        cand = _branch_and_solve(k, model, grid, diffusion, x, level, backward_steps, settings)
        t = grid[level - forward_steps + backward_steps]
        x0_hat = tweedie(model, cand, t, _velocity(model, cand, t, cond, batch_size))
        scores, invalid = _score(reward, x0_hat, cond)
        kept = cand[_top_set(scores, num_paths)]
        return (kept, num_invalid + count_invalid(invalid)), jnp.max(scores)

    num_full = len(plan.levels) - 1
    levels = jnp.asarray(plan.levels[:num_full], jnp.int32)
    (x, num_invalid), round_best = jax.lax.scan(
        intermediate_round, (x, jnp.zeros((2,), jnp.int32)), (round_keys[:num_full], levels)
    )
    cand = _branch_and_solve(
        round_keys[-1], model, grid, diffusion, x, plan.levels[-1], plan.lengths[-1], settings
    )
    scores, invalid = _score(reward, cand, cond)
    top, kept = _keep_top(scores, cand, num_paths)
    ends = np.asarray(plan.levels) - forward_steps + np.asarray(plan.lengths)
    info = {
        "best_reward": jnp.concatenate([round_best, jnp.max(scores, keepdims=True)]),
        "nfe": num_paths * jnp.asarray(plan.nfe_after_round, jnp.int32),
        "time": grid[ends],
    }
    return _result(
        kept,
        top,
        num_paths * plan.nfe_per_path,
        len(plan.levels) * num_paths * num_branches,
        num_invalid + count_invalid(invalid),
        held_out,
        cond,
        info,
    )


def search_over_paths(
    key: Array,
    model: FlowModel,
    reward: Reward,
    budget: int,
    grid: Array,
    diffusion: Diffusion | None = None,
    *,
    num_paths: int | None = None,
    num_branches: int = 4,
    start_step: int | None = None,
    forward_steps: int | None = None,
    backward_steps: int | None = None,
    held_out: dict[str, Reward] | None = None,
    cond: Any = None,
    batch_size: int | None = None,
    nan_policy: str = "raise",
) -> SampleResult:
    """Search over denoising paths (Ma et al. 2025).

    ``N`` noises are solved to the intermediate level ``s = grid[start_step]``. Then, in rounds,
    every candidate is re-noised ``M`` times from its level ``s`` to ``s + delta_f`` with the
    interpolant's exact forward transition (:func:`~tts_jax.interpolants.forward_renoise`),
    solved back by ``delta_b > delta_f`` (so each round moves ``delta_b - delta_f`` towards
    data), and the ``N M`` candidates are scored on their Tweedie x0-estimate (1 NFE each); the
    top ``N`` are kept. The last round ends at the data end, where the candidates are scored
    directly and the top ``N`` returned (best-of-N on the final set). Levels are grid points:
    ``delta_f`` is ``forward_steps`` grid intervals and ``delta_b`` is ``backward_steps`` (on
    ``uniform_grid(K)``, ``delta = steps / K``). The exact cost is given by :func:`paths_plan`.

    Args:
        key: PRNG key.
        model: :class:`~tts_jax.models.base.FlowModel`.
        reward: the verifier used for selection.
        budget: maximum NFE; at least the cost of one path (``paths_plan(...).nfe_per_path``).
        grid: ``[K + 1]`` times from noise (1) to data (0).
        diffusion: ``ode()`` (default) or an SDE coefficient for the solves.
        num_paths: ``N``; default the largest that fits the budget.
        num_branches: ``M`` re-noisings per candidate.
        start_step: grid index of the first level ``s`` (default ``K // 2``).
        forward_steps: ``delta_f`` in grid steps (default ``max(1, K // 10)``).
        backward_steps: ``delta_b > delta_f`` in grid steps (default ``2 delta_f``).
        held_out, cond, batch_size, nan_policy: as in :func:`best_of_n`.

    Returns:
        :class:`SampleResult` with the final ``N`` candidates ``[N, ...]`` and scores ``[N]``;
        ``info`` per round: ``best_reward`` (the best kept score: on the Tweedie estimate for
        intermediate rounds, on the sample for the last), ``nfe`` (spent so far), ``time`` (the
        level the round ends at); ``num_nan_rewards``, ``num_inf_rewards``; ``held_out``
        (``name -> [N]``).

    Raises:
        ValueError: as :func:`best_of_n`, and a schedule or path count that does not fit.
    """
    method = "search_over_paths"
    grid, diffusion, held_out = _validate(
        method, grid, diffusion, cond, held_out, nan_policy, batch_size
    )
    num_steps = grid.shape[0] - 1
    start_step = num_steps // 2 if start_step is None else start_step
    forward_steps = max(1, num_steps // 10) if forward_steps is None else forward_steps
    backward_steps = 2 * forward_steps if backward_steps is None else backward_steps
    if not 1 <= forward_steps < backward_steps:
        raise ValueError(
            f"{method}: need 1 <= forward_steps < backward_steps, got {forward_steps}, "
            f"{backward_steps}"
        )
    if not forward_steps <= start_step < num_steps:
        raise ValueError(
            f"{method}: need forward_steps <= start_step < K = {num_steps}, got {start_step}"
        )
    if num_branches < 1:
        raise ValueError(f"{method}: num_branches must be >= 1, got {num_branches}")
    plan = paths_plan(num_steps, num_branches, start_step, forward_steps, backward_steps)
    _check_budget(method, budget, plan.nfe_per_path, "one path")
    num_paths = budget // plan.nfe_per_path if num_paths is None else num_paths
    if not 1 <= num_paths * plan.nfe_per_path <= budget:
        raise ValueError(
            f"{method}: {num_paths} paths cost {num_paths * plan.nfe_per_path} NFE, "
            f"the budget is {budget} ({plan.nfe_per_path} NFE per path)"
        )
    result = _search_over_paths(
        key,
        model,
        reward,
        grid,
        diffusion,
        cond,
        held_out,
        num_paths,
        num_branches,
        start_step,
        forward_steps,
        backward_steps,
        batch_size,
    )
    return _finish(result, method, reward, nan_policy)
