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

Two ways to call each (the kernel shape of :mod:`tts_jax.samplers.base`):

* the kernel: :func:`best_of_n_sampler`, :func:`zero_order_sampler` and :func:`paths_sampler`
  build a hashable :class:`~tts_jax.samplers.base.Sampler` from the static sizes (candidates,
  iterations, rounds, ``batch_size``); :func:`make_params` builds the :class:`Params` pytree
  (model, verifier, grid, diffusion, ``lambda_cos``, condition, held-out verifiers);
  :func:`check_params` checks them on the host; :func:`tts_jax.samplers.run` runs them, pure:
  jit it (``static_argnames="sampler"``), ``vmap`` it over keys; sweeping ``lambda_cos`` or the
  diffusion's norm, or swapping verifier or model weights of the same shapes, reuses the
  compiled program;
* :func:`best_of_n`, :func:`zero_order_search`, :func:`search_over_paths`, the convenience entry
  points: budget -> sizes, the host checks, the jitted kernel, then the host-side NaN check
  (:func:`tts_jax.samplers.image.scaffold.finish`). They keep the key layout they had before the
  kernels existed (:func:`tts_jax.samplers.image.scaffold.run_with_keys`), so their results are
  bit-identical to it; ``run(key, ...)`` derives its keys from ``key`` its own way, so the same
  key gives other (equally distributed) candidates there.

Cost accounting. ``nfe`` counts model forward passes per candidate (one velocity evaluation of one
sample is 1 NFE), the unit in which scaling curves compare methods; a budget is a maximum of that
count and is never exceeded (any remainder too small for another candidate is left unspent).
``reward_calls`` counts verifier evaluations per candidate separately. Budgets below the cheapest
run of a method are rejected with an error that names the minimum.

Verifiers and non-finite scores. Selection only ever compares scores computed in the same
verifier batch, so batch-relative verifiers (mean-rank ensembles) select correctly. A NaN or
``+inf`` score is invalid and becomes ``-inf``: such a candidate is never selected while any
other exists; ``info.num_nan`` and ``info.num_inf`` count them. After the
run the host raises an error naming the method, the verifier and both counts if any was seen,
unless ``nan_policy="drop"``. A ``-inf`` score is valid (it rejects the candidate). Non-finite
hyper-parameters (``lambda_cos``, the diffusion norm, grid times) are an error at the call.
``held_out`` verifiers (``name -> Reward``) are evaluated on the returned samples only, reported
in ``info.held_out`` and never used for selection: optimizing one verifier can lower the
others, which users need to see. (The checks, the scoring and the result are
:mod:`tts_jax.samplers.image.scaffold`; the selection is :mod:`tts_jax.samplers.image.selection`.)

Conditioning and batching. All candidates search for one sample of one condition: ``cond`` is
``None`` or a pytree whose leaves have a leading axis of size 1 (e.g. a class label ``[1]``, a
prompt's embeddings), passed unchanged to every model and verifier call, which broadcast it to
their rows (as FK steering does: one copy of a prompt serves every candidate). The model is
called on all candidates at once (``[C, ...]``, one batched forward per step), or, when
``batch_size`` bounds memory, on chunks of ``batch_size`` rows in sequence. Candidate ``i``'s
SDE noise comes from its own key (:func:`~tts_jax.samplers.image.integrate.solve_rows`), so a
candidate does not depend on which others share its batch: results do not depend on
``batch_size`` (up to float rounding).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax.interpolants import Diffusion, forward_renoise, ode
from tts_jax.models.base import FlowModel
from tts_jax.rewards.base import Reward
from tts_jax.samplers.base import Sampler, float32
from tts_jax.samplers.image.integrate import initial_noise, solve_rows, tweedie
from tts_jax.samplers.image.scaffold import (
    check_batch_size,
    check_budget,
    check_finite_hyperparameters,
    check_grid,
    check_nan_policy,
    check_shared_cond,
    finish,
    held_out_dict,
    run_with_keys,
    score,
    search_result,
)
from tts_jax.samplers.image.selection import keep_top, top_set
from tts_jax.samplers.result import Result, count_invalid
from tts_jax.smc import step_keys_for

Array = jax.Array
PyTree = Any


# --------------------------------------------------------------------------- params


class Params(NamedTuple):
    """Everything array-valued the searches need: a pytree (a jit argument, never static).

    Attributes:
        model: :class:`~tts_jax.models.base.FlowModel` (its weights are leaves).
        reward: the verifier used for selection, ``x [C, ...] -> [C]`` (higher is better).
        grid: ``Float[K + 1]`` times from noise (1) to data (0).
        diffusion: :class:`~tts_jax.interpolants.Diffusion` of the solves (``ode()``: the
            noise -> sample map is deterministic).
        lambda_cos: scalar cosine similarity of zero-order neighbours and their pivot, in
            ``[-1, 1]`` (read by :func:`zero_order_sampler` only).
        cond: shared condition (leaves ``[1, ...]``) or ``None``.
        held_out: ``{name: Reward}`` evaluated on the returned samples only.
    """

    model: FlowModel
    reward: Reward
    grid: Array
    diffusion: Diffusion
    lambda_cos: Array
    cond: Any = None
    held_out: dict[str, Reward] | None = None


def make_params(
    model: FlowModel,
    reward: Reward,
    grid: Array,
    diffusion: Diffusion | None = None,
    *,
    lambda_cos: float | Array = 0.95,
    cond: Any = None,
    held_out: dict[str, Reward] | Sequence[Reward] | None = None,
) -> Params:
    """:class:`Params` with ``grid`` and ``lambda_cos`` as float32 arrays, ``diffusion``
    defaulting to ``ode()`` and ``held_out`` to ``{}``. No checks (:func:`check_params`) and no
    device op for host values."""
    diffusion = ode() if diffusion is None else diffusion
    held_out = held_out_dict("make_params", held_out)  # a mapping or a sequence of rewards
    return Params(model, reward, float32(grid), diffusion, float32(lambda_cos), cond, held_out)


class _Config(NamedTuple):
    """What :func:`check_params` needs to know of a search sampler."""

    method: str
    num_steps: int | None  # the grid's K the sampler is built for (None: any)


_CONFIGS: dict[Sampler, _Config] = {}


def check_params(params: Params, sampler: Sampler) -> None:
    """Host-side checks of ``params`` for a search ``sampler``, before anything is traced.

    Shapes are always checked; values only when concrete (traced values are skipped, so this
    may run inside someone's ``jit``).

    Raises:
        ValueError: naming the sampler's method: a grid that is not ``[K + 1]`` (or of another
            ``K`` than :func:`paths_sampler` was built for), a non-finite grid or diffusion
            norm, ``cond`` leaves without a leading axis of size 1, a held-out entry that is not
            a :class:`~tts_jax.rewards.base.Reward`, and for :func:`zero_order_sampler` a
            ``lambda_cos`` that is not a scalar in ``[-1, 1]`` (NaN included); a ``sampler``
            not built by this module.
    """
    config = _CONFIGS.get(sampler)
    if config is None:
        raise ValueError("check_params: the sampler was not built by tts_jax noise_search")
    method = config.method
    num_steps = check_grid(method, params.grid)
    if config.num_steps is not None and num_steps != config.num_steps:
        raise ValueError(
            f"{method}: the grid has {num_steps} steps but the sampler takes {config.num_steps}"
        )
    norms = jax.tree_util.tree_leaves_with_path(getattr(params.diffusion, "norm", None))
    check_finite_hyperparameters(
        method,
        {
            "grid": params.grid,
            **{f"diffusion.norm{jax.tree_util.keystr(path)}": v for path, v in norms},
        },
    )
    check_shared_cond(method, params.cond)
    held_out_dict(method, params.held_out)
    if method == "zero_order_search":
        lambda_cos = params.lambda_cos
        if np.ndim(lambda_cos) != 0:
            raise ValueError(
                f"{method}: lambda_cos must be a scalar in [-1, 1], got shape "
                f"{np.shape(lambda_cos)}"
            )
        if not isinstance(lambda_cos, jax.core.Tracer) and not abs(float(lambda_cos)) <= 1.0:
            raise ValueError(
                f"{method}: lambda_cos must be a scalar in [-1, 1], got {np.asarray(lambda_cos)}"
            )


def _register(sampler: Sampler, method: str, num_steps: int | None = None) -> Sampler:
    _CONFIGS[sampler] = _Config(method, num_steps)
    return sampler


def _check_size(method: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{method}: {name} must be >= 1, got {value}")
    return int(value)


# --------------------------------------------------------------------------- batched pieces


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


def _solve(keys: Array, params: Params, x: Array, grid: Array) -> Array:
    """Integrate the rows ``x [B, ...]`` along ``grid``, row ``i``'s noise from ``keys[i]``:
    ``(len(grid) - 1) B`` NFE, one batched forward per step."""
    return solve_rows(keys, params.model, x, grid, params.diffusion, params.cond)


def _denoise(keys: Array, params: Params, x: Array, grid: Array, batch_size) -> Array:
    """:func:`_solve` of every candidate ``x [C, ...]`` (``keys [C]``) in chunks of
    ``batch_size`` rows: ``(len(grid) - 1) C`` NFE."""

    def rows(args):
        keys, xs = args
        return _solve(keys, params, xs, grid)

    return _map_rows(rows, (keys, x), batch_size)


def _velocity(params: Params, x: Array, t: Array, batch_size) -> Array:
    """Velocity of every candidate ``x [C, ...]`` at scalar time ``t``, batched: ``C`` NFE."""

    def rows(xs):
        return params.model.velocity(xs, t, params.cond)

    return _map_rows(rows, x, batch_size)


def _score(params: Params, x: Array) -> tuple[Array, Array]:
    """Verifier scores ``[C]`` of ``x [C, ...]`` in one call (NaN and ``+inf`` -> ``-inf``) and
    the mask ``Bool[2, C]`` of the NaN and ``+inf`` scores."""
    return score(params.reward, x, params.cond)


def _result(params: Params, samples, rewards, nfe, reward_calls, invalid, info) -> Result:
    """Uniformly weighted search output ``samples [N, ...]`` with the held-out scores."""
    return search_result(
        samples, rewards, nfe, reward_calls, invalid, info, params.held_out, params.cond
    )


# --------------------------------------------------------------------------- random search


def best_of_n_sampler(num_samples: int, batch_size: int | None = None) -> Sampler:
    """Random search (Ma et al. 2025, docs/algorithms.md 1) as a
    :class:`~tts_jax.samplers.base.Sampler`.

    ``init`` draws ``N`` noises, candidate ``i`` from ``fold_in(key, i)`` (so a larger ``N``
    extends the candidates of a smaller one); step ``j`` denoises the ``j``-th chunk of
    ``batch_size`` candidates over the whole grid (one step for all ``N`` when ``batch_size``
    is ``None``; the last chunk may be shorter); the last step then scores all ``N`` in one
    verifier call. Steps draw no randomness of their own (each candidate's SDE noise comes from
    its key). Cost: ``N K`` NFE, ``N`` reward calls (``K`` the grid's steps; a budget buys
    ``N = budget // K``).

    Args:
        num_samples: ``N >= 1`` (static).
        batch_size: candidates denoised at once (static; ``None``: all).

    Returns:
        A :class:`~tts_jax.samplers.base.Sampler` (equal arguments give the same one) with
        ``ceil(N / batch_size)`` steps, whose state is ``{"x" [N, ...] (noises, then samples),
        "keys" Key[N], "chunk" int32}`` (then ``{"x", "scores" [N], "invalid" Int32[2]}``) and
        whose result is that of :func:`best_of_n`.
    """
    method = "best_of_n"
    num_samples = _check_size(method, "num_samples", num_samples)
    check_batch_size(method, batch_size)
    return _best_of_n_sampler(num_samples, None if batch_size is None else int(batch_size))


@functools.cache
def _best_of_n_sampler(n: int, batch_size: int | None) -> Sampler:
    size = n if batch_size is None or batch_size >= n else batch_size
    num_chunks = -(-n // size)
    last = (num_chunks - 1) * size  # first row of the last (possibly shorter) chunk

    def init(key, params):
        keys = jax.vmap(jax.random.split)(step_keys_for(key, n))  # [N, 2]
        noise = jax.vmap(lambda k: initial_noise(k, params.model, 1)[0])(keys[:, 0])
        return {"x": noise, "keys": keys[:, 1], "chunk": jnp.int32(0)}

    def step(key, state, params):
        start = state["chunk"] * size
        rows = jax.lax.dynamic_slice_in_dim(state["x"], start, size)
        keys = jax.lax.dynamic_slice_in_dim(state["keys"], start, size)
        x = _solve(keys, params, rows, params.grid)
        x = jax.lax.dynamic_update_slice_in_dim(state["x"], x, start, 0)
        return {**state, "x": x, "chunk": state["chunk"] + 1}, {}

    def last_step(key, state, params):
        x = _solve(state["keys"][last:], params, state["x"][last:], params.grid)
        x = x if last == 0 else jnp.concatenate([state["x"][:last], x])
        scores, invalid = _score(params, x)
        return {"x": x, "scores": scores, "invalid": count_invalid(invalid)}, {}

    def finalize(state, infos, params):
        num_steps = params.grid.shape[0] - 1
        scores = state["scores"]
        info = {
            "best_reward": jax.lax.cummax(scores),
            "nfe": num_steps * jnp.arange(1, n + 1, dtype=jnp.int32),
        }
        return _result(params, state["x"], scores, num_steps * n, n, state["invalid"], info)

    sampler = Sampler(init, step, finalize, num_chunks, last_step=last_step)
    return _register(sampler, "best_of_n")


def _best_of_n_keys(key: Array, sampler: Sampler) -> tuple[Array, Array]:
    """:func:`best_of_n`'s key layout: candidate ``i`` from ``fold_in(key, i)``."""
    return key, step_keys_for(key, sampler.num_steps)  # the steps draw nothing


def best_of_n(
    key: Array,
    model: FlowModel,
    reward: Reward,
    budget: int,
    grid: Array,
    diffusion: Diffusion | None = None,
    *,
    held_out: dict[str, Reward] | Sequence[Reward] | None = None,
    cond: Any = None,
    batch_size: int | None = None,
    nan_policy: str = "raise",
) -> Result:
    """Random search: ``N = budget // K`` independent noises, each denoised, argmax verifier.

    Ma et al. 2025, "Inference-Time Scaling for Diffusion Models beyond Scaling Denoising Steps"
    (docs/algorithms.md 1). The convenience entry point of :func:`best_of_n_sampler`.

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
        held_out: ``name -> Reward`` (or a sequence of rewards, keyed by their ``name``)
            evaluated on the returned samples only.
        cond: shared condition (leaves ``[1, ...]``) or ``None``.
        batch_size: denoise at most this many candidates at once; ``None``: all.
        nan_policy: ``raise`` (default: a NaN or ``+inf`` score is an error after the run) or
            ``drop`` (such candidates score ``-inf``: never selected).

    Returns:
        :class:`Result` with all ``N`` candidates ``[N, ...]``, their scores ``[N]``,
        ``best`` the argmax, ``nfe = N K``, ``reward_calls = N``; ``info``: ``best_reward [N]``
        and ``nfe [N]`` (the best score and cost after each of the first ``n`` candidates),
        ``info.num_nan`` and ``info.num_inf`` (NaN and ``+inf`` scores),
        ``held_out`` (``name -> [N]``).

    Raises:
        ValueError: bad arguments, a non-finite ``grid`` or diffusion norm, or (unless
            ``nan_policy="drop"``) a NaN or ``+inf`` score.
    """
    method = "best_of_n"
    params = make_params(model, reward, grid, diffusion, cond=cond, held_out=held_out)
    num_steps = check_grid(method, params.grid)
    check_nan_policy(method, nan_policy)
    check_budget(method, budget, num_steps, f"one trajectory of {num_steps} steps")
    sampler = best_of_n_sampler(budget // num_steps, batch_size)
    check_params(params, sampler)
    result = _run_compat(key, sampler, params, _best_of_n_keys)
    return finish(result, method, reward, nan_policy)


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


class PivotState(NamedTuple):
    """The state of :func:`zero_order_sampler` (one pivot: unbatched ``[*shape]`` leaves).

    Attributes:
        pivot: ``[*shape]`` the pivot noise.
        pivot_x0: ``[*shape]`` its denoised sample (cached: never denoised again).
        pivot_scored: bool; false right after a restart (a fresh noise, not denoised).
        best_x0: ``[*shape]`` the best sample seen so far.
        invalid: ``Int32[2]`` NaN and ``+inf`` scores among the freshly denoised candidates.
        first_score: ``Float[1]`` the initial pivot's score.
    """

    pivot: Array
    pivot_x0: Array
    pivot_scored: Array
    best_x0: Array
    invalid: Array
    first_score: Array


def zero_order_sampler(
    num_iterations: int, num_neighbours: int = 4, batch_size: int | None = None
) -> Sampler:
    """Zero-order search (Ma et al. 2025, docs/algorithms.md 1) as a
    :class:`~tts_jax.samplers.base.Sampler`: ``init`` denoises and scores a random pivot
    (``K`` NFE); each of the ``I`` steps is one hill-climbing iteration (``M K`` NFE,
    ``M + 2`` reward calls: :func:`zero_order_search` has the rule). A budget buys
    ``I = (budget - K) // (M K)`` iterations.

    ``init`` uses ``split(key, 3)[:2]`` (the pivot's noise, its solve); step ``i`` draws the
    neighbours, their solves and a restart noise from its own key.

    Args:
        num_iterations: ``I >= 0`` (static).
        num_neighbours: ``M >= 1`` (static).
        batch_size: neighbours denoised at once (static; ``None``: all).

    Returns:
        A :class:`~tts_jax.samplers.base.Sampler` with ``I`` steps over a :class:`PivotState`,
        whose per-step ``info`` is ``{"best_reward", "pivot_reward", "restarted"}`` and whose
        result is that of :func:`zero_order_search`.
    """
    method = "zero_order_search"
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, int | np.integer):
        raise ValueError(f"{method}: num_iterations must be an int >= 0, got {num_iterations}")
    if num_iterations < 0:
        raise ValueError(f"{method}: num_iterations must be an int >= 0, got {num_iterations}")
    num_neighbours = _check_size(method, "num_neighbours", num_neighbours)
    check_batch_size(method, batch_size)
    batch_size = None if batch_size is None else int(batch_size)
    return _zero_order_sampler(int(num_iterations), num_neighbours, batch_size)


@functools.cache
def _zero_order_sampler(num_iterations: int, num_neighbours: int, batch_size) -> Sampler:
    def init(key, params):
        k_init, k_solve, _ = jax.random.split(key, 3)
        pivot = initial_noise(k_init, params.model, 1)
        x0 = _denoise(k_solve[None], params, pivot, params.grid, batch_size)
        first, invalid = _score(params, x0)
        return PivotState(pivot[0], x0[0], jnp.bool_(True), x0[0], count_invalid(invalid), first)

    def step(key, state: PivotState, params):
        """One hill-climbing iteration: ``M K`` NFE, ``M + 2`` reward calls."""
        k_nb, k_solve, k_restart = jax.random.split(key, 3)
        noises = sphere_neighbours(k_nb, state.pivot, params.lambda_cos, num_neighbours)
        keys = jax.random.split(k_solve, num_neighbours)
        cand = _denoise(keys, params, noises, params.grid, batch_size)
        # Rescore the cached best and pivot samples with the neighbours (0 NFE) so that
        # batch-relative verifiers compare all three within one batch.
        batch = jnp.concatenate([state.best_x0[None], state.pivot_x0[None], cand])
        scores, invalid = _score(params, batch)
        pivot_score = jnp.where(state.pivot_scored, scores[1], -jnp.inf)
        j = jnp.argmax(scores[2:])
        nb_score = scores[2 + j]
        move = nb_score > pivot_score
        fresh = jax.random.normal(k_restart, state.pivot.shape, state.pivot.dtype)
        improved = nb_score > scores[0]
        new = PivotState(
            pivot=jnp.where(move, noises[j], fresh),
            pivot_x0=jnp.where(move, cand[j], state.pivot_x0),
            pivot_scored=move,
            best_x0=jnp.where(improved, cand[j], state.best_x0),
            invalid=state.invalid + count_invalid(invalid[:, 2:]),
            first_score=state.first_score,
        )
        info = {
            "best_reward": jnp.maximum(scores[0], nb_score),
            "pivot_reward": jnp.where(move, nb_score, -jnp.inf),
            "restarted": ~move,
        }
        return new, info

    def finalize(state: PivotState, infos, params):
        num_steps = params.grid.shape[0] - 1
        first = state.first_score
        iterations = jnp.arange(num_iterations + 1, dtype=jnp.int32)
        info = {
            "best_reward": jnp.concatenate([first, infos["best_reward"]]),
            "pivot_reward": jnp.concatenate([first, infos["pivot_reward"]]),
            "restarted": jnp.concatenate([jnp.zeros((1,), bool), infos["restarted"]]),
            "nfe": num_steps * (1 + num_neighbours * iterations),
        }
        return _result(
            params,
            state.best_x0[None],
            info["best_reward"][-1:],
            num_steps * (1 + num_neighbours * num_iterations),
            1 + (num_neighbours + 2) * num_iterations,
            state.invalid,
            info,
        )

    sampler = Sampler(init, step, finalize, num_iterations)
    return _register(sampler, "zero_order_search")


def _zero_order_keys(key: Array, sampler: Sampler) -> tuple[Array, Array]:
    """:func:`zero_order_search`'s key layout: iteration ``i`` uses
    ``fold_in(split(key, 3)[2], i)``."""
    return key, step_keys_for(jax.random.split(key, 3)[2], sampler.num_steps)


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
    held_out: dict[str, Reward] | Sequence[Reward] | None = None,
    cond: Any = None,
    batch_size: int | None = None,
    nan_policy: str = "raise",
) -> Result:
    """Zero-order search over the initial noise (Ma et al. 2025, docs/algorithms.md 1).

    Start from a random pivot noise, denoised and scored once (``K`` NFE). Each iteration draws
    ``M`` neighbours on the sphere of the pivot (:func:`sphere_neighbours`: same norm, cosine
    similarity ``lambda_cos``), denoises and scores them (``M K`` NFE). If the best neighbour
    beats the pivot it becomes the pivot; otherwise the search restarts from a fresh random noise,
    which escapes the fixed point. The fresh pivot is not denoised (that would spend ``K`` NFE on
    a sample whose neighbours are denoised next anyway): it counts as scoring ``-inf``, so after a
    restart the best neighbour always becomes the pivot. The pivot is never denoised twice: its
    sample is cached and rescored with the neighbours (a reward call, 0 NFE), which keeps
    batch-relative verifiers consistent. The best sample seen over all iterations is returned.
    The convenience entry point of :func:`zero_order_sampler`.

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
        :class:`Result` with the best sample ``[1, ...]`` and its score ``[1]``; ``info.extra``:
        per iteration (index 0 is the initial pivot) ``best_reward [I + 1]`` (best so far),
        ``pivot_reward [I + 1]`` (``-inf`` after a restart), ``restarted [I + 1]``,
        ``nfe [I + 1]`` (spent so far); ``info.num_nan``, ``info.num_inf``; ``info.held_out``
        (``name -> [1]``).

    Raises:
        ValueError: as :func:`best_of_n`, and ``lambda_cos`` outside ``[-1, 1]`` (NaN included).
    """
    method = "zero_order_search"
    params = make_params(
        model, reward, grid, diffusion, lambda_cos=lambda_cos, cond=cond, held_out=held_out
    )
    num_steps = check_grid(method, params.grid)
    check_nan_policy(method, nan_policy)
    check_budget(method, budget, num_steps, f"the initial pivot's {num_steps}-step trajectory")
    num_neighbours = _check_size(method, "num_neighbours", num_neighbours)
    num_iterations = (budget - num_steps) // (num_neighbours * num_steps)
    sampler = zero_order_sampler(num_iterations, num_neighbours, batch_size)
    check_params(params, sampler)
    result = _run_compat(key, sampler, params, _zero_order_keys)
    return finish(result, method, reward, nan_policy)


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


def _paths_schedule(method, num_steps, start_step, forward_steps, backward_steps):
    """The defaults of search over paths filled in and checked (host-side)."""
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
    return int(start_step), int(forward_steps), int(backward_steps)


def paths_sampler(
    num_paths: int,
    num_steps: int,
    num_branches: int = 4,
    start_step: int | None = None,
    forward_steps: int | None = None,
    backward_steps: int | None = None,
    batch_size: int | None = None,
) -> Sampler:
    """Search over paths (Ma et al. 2025, docs/algorithms.md 1) as a
    :class:`~tts_jax.samplers.base.Sampler`, on a ``K``-step grid.

    ``init`` denoises ``N`` noises to ``grid[start_step]`` (``split(key, 3)[:2]``: the noises,
    their solves); each step is one round of :func:`paths_plan` (re-noise every path ``M``
    times, solve back, score the ``N M`` candidates on their Tweedie estimate, keep the top
    ``N`` as a set, :func:`~tts_jax.samplers.image.selection.top_set`); the last step is the round
    that reaches the data end, scores the samples themselves and keeps the top ``N`` best first
    (:func:`~tts_jax.samplers.image.selection.keep_top`). Cost: ``N paths_plan(...).nfe_per_path``
    NFE; a budget buys ``N = budget // nfe_per_path`` paths.

    Args:
        num_paths: ``N >= 1`` (static).
        num_steps: ``K``, the grid's steps (the grid in the params has ``K + 1`` times).
        num_branches: ``M >= 1`` re-noisings per path.
        start_step: grid index of the first level (default ``K // 2``).
        forward_steps: ``delta_f`` in grid steps (default ``max(1, K // 10)``).
        backward_steps: ``delta_b > delta_f`` in grid steps (default ``2 delta_f``).
        batch_size: candidates solved at once (static; ``None``: all).

    Returns:
        A :class:`~tts_jax.samplers.base.Sampler` with one step per round (``num_steps`` of
        the sampler: the rounds, not ``K``), over ``{"x" [N, ...], "invalid" Int32[2],
        "round" int32}`` (after the last round ``{"x", "scores" [N], "invalid"}``), with the
        round's best kept score as ``info`` and the result of :func:`search_over_paths`.

    Raises:
        ValueError: a schedule that does not fit ``K``, sizes below 1.
    """
    method = "search_over_paths"
    num_paths = _check_size(method, "num_paths", num_paths)
    num_steps = _check_size(method, "num_steps", num_steps)
    start_step, forward_steps, backward_steps = _paths_schedule(
        method, num_steps, start_step, forward_steps, backward_steps
    )
    if num_branches < 1:
        raise ValueError(f"{method}: num_branches must be >= 1, got {num_branches}")
    check_batch_size(method, batch_size)
    batch_size = None if batch_size is None else int(batch_size)
    return _paths_sampler(
        num_paths,
        num_steps,
        int(num_branches),
        start_step,
        forward_steps,
        backward_steps,
        batch_size,
    )


@functools.cache
def _paths_sampler(
    num_paths, num_steps, num_branches, start_step, forward_steps, backward_steps, batch_size
):
    plan = paths_plan(num_steps, num_branches, start_step, forward_steps, backward_steps)
    levels = np.asarray(plan.levels, np.int32)  # step r < R - 1 reads levels[r]

    def branch_and_solve(key, params, x, level, length):
        """Re-noise each of ``x [N, ...]`` ``M`` times from ``grid[level]`` to
        ``grid[level - f]`` (exact forward transition) and solve ``length`` steps back ->
        ``[N M, ...]``."""
        grid = params.grid
        k_noise, k_solve = jax.random.split(key)
        up = level - forward_steps
        branches = jnp.repeat(x, num_branches, axis=0)
        branches = forward_renoise(
            params.model.interpolant, k_noise, branches, grid[level], grid[up]
        )
        segment = jax.lax.dynamic_slice(grid, (up,), (length + 1,))
        keys = jax.random.split(k_solve, branches.shape[0])
        return _denoise(keys, params, branches, segment, batch_size)

    def init(key, params):
        k_noise, k_solve, _ = jax.random.split(key, 3)
        noise = initial_noise(k_noise, params.model, num_paths)
        keys = jax.random.split(k_solve, num_paths)
        grid = params.grid[: plan.levels[0] + 1]
        x = _denoise(keys, params, noise, grid, batch_size)
        return {"x": x, "invalid": jnp.zeros((2,), jnp.int32), "round": jnp.int32(0)}

    def step(key, state, params):
        """An intermediate round: select on the Tweedie estimates (1 NFE each)."""
        level = jnp.asarray(levels)[state["round"]]
        cand = branch_and_solve(key, params, state["x"], level, backward_steps)
        t = params.grid[level - forward_steps + backward_steps]
        x0_hat = tweedie(params.model, cand, t, _velocity(params, cand, t, batch_size))
        scores, invalid = _score(params, x0_hat)
        kept = cand[top_set(scores, num_paths)]
        new = {
            "x": kept,
            "invalid": state["invalid"] + count_invalid(invalid),
            "round": state["round"] + 1,
        }
        return new, jnp.max(scores)

    def last_step(key, state, params):
        """The round reaching the data end: select on the samples, best first."""
        cand = branch_and_solve(key, params, state["x"], plan.levels[-1], plan.lengths[-1])
        scores, invalid = _score(params, cand)
        top, kept = keep_top(scores, cand, num_paths)
        new = {"x": kept, "scores": top, "invalid": state["invalid"] + count_invalid(invalid)}
        return new, jnp.max(scores)

    def finalize(state, infos, params):
        ends = np.asarray(plan.levels) - forward_steps + np.asarray(plan.lengths)
        info = {
            "best_reward": infos,
            "nfe": num_paths * jnp.asarray(plan.nfe_after_round, jnp.int32),
            "time": params.grid[ends],
        }
        return _result(
            params,
            state["x"],
            state["scores"],
            num_paths * plan.nfe_per_path,
            len(plan.levels) * num_paths * num_branches,
            state["invalid"],
            info,
        )

    sampler = Sampler(init, step, finalize, len(plan.levels), last_step=last_step)
    return _register(sampler, "search_over_paths", num_steps)


def _paths_keys(key: Array, sampler: Sampler) -> tuple[Array, Array]:
    """:func:`search_over_paths`' key layout: round ``r`` uses ``split(split(key, 3)[2], R)[r]``."""
    return key, jax.random.split(jax.random.split(key, 3)[2], sampler.num_steps)


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
    held_out: dict[str, Reward] | Sequence[Reward] | None = None,
    cond: Any = None,
    batch_size: int | None = None,
    nan_policy: str = "raise",
) -> Result:
    """Search over denoising paths (Ma et al. 2025, docs/algorithms.md 1).

    ``N`` noises are solved to the intermediate level ``s = grid[start_step]``. Then, in rounds,
    every candidate is re-noised ``M`` times from its level ``s`` to ``s + delta_f`` with the
    interpolant's exact forward transition (:func:`~tts_jax.interpolants.forward_renoise`),
    solved back by ``delta_b > delta_f`` (so each round moves ``delta_b - delta_f`` towards
    data), and the ``N M`` candidates are scored on their Tweedie x0-estimate (1 NFE each); the
    top ``N`` are kept. The last round ends at the data end, where the candidates are scored
    directly and the top ``N`` returned (best-of-N on the final set). Levels are grid points:
    ``delta_f`` is ``forward_steps`` grid intervals and ``delta_b`` is ``backward_steps`` (on
    ``uniform_grid(K)``, ``delta = steps / K``). The exact cost is given by :func:`paths_plan`.
    The convenience entry point of :func:`paths_sampler`.

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
        :class:`Result` with the final ``N`` candidates ``[N, ...]`` and scores ``[N]``;
        ``info.extra`` per round: ``best_reward`` (the best kept score: on the Tweedie estimate for
        intermediate rounds, on the sample for the last), ``nfe`` (spent so far), ``time`` (the
        level the round ends at); ``info.num_nan``, ``info.num_inf``; ``info.held_out``
        (``name -> [N]``).

    Raises:
        ValueError: as :func:`best_of_n`, and a schedule or path count that does not fit.
    """
    method = "search_over_paths"
    params = make_params(model, reward, grid, diffusion, cond=cond, held_out=held_out)
    num_steps = check_grid(method, params.grid)
    check_nan_policy(method, nan_policy)
    start_step, forward_steps, backward_steps = _paths_schedule(
        method, num_steps, start_step, forward_steps, backward_steps
    )
    if num_branches < 1:
        raise ValueError(f"{method}: num_branches must be >= 1, got {num_branches}")
    plan = paths_plan(num_steps, num_branches, start_step, forward_steps, backward_steps)
    check_budget(method, budget, plan.nfe_per_path, "one path")
    num_paths = budget // plan.nfe_per_path if num_paths is None else num_paths
    if not 1 <= num_paths * plan.nfe_per_path <= budget:
        raise ValueError(
            f"{method}: {num_paths} paths cost {num_paths * plan.nfe_per_path} NFE, "
            f"the budget is {budget} ({plan.nfe_per_path} NFE per path)"
        )
    sampler = paths_sampler(
        num_paths,
        num_steps,
        num_branches,
        start_step,
        forward_steps,
        backward_steps,
        batch_size,
    )
    check_params(params, sampler)
    result = _run_compat(key, sampler, params, _paths_keys)
    return finish(result, method, reward, nan_policy)


# --------------------------------------------------------------------------- the entry points


@functools.partial(jax.jit, static_argnames=("sampler", "layout"))
def _run_compat(key: Array, sampler: Sampler, params: Params, layout) -> Result:
    """The kernel run by the convenience entry points, with the key layout ``layout(key,
    sampler) -> (init_key, step_keys)`` they had before the kernels (bit-identical results)."""
    return run_with_keys(*layout(key, sampler), sampler, params)
