"""Rollover budget forcing (RBF, Kim et al. 2025, docs/algorithms.md 3) on flow models.

Kim, Yoon, Lee & Sung 2025, "Inference-Time Scaling for Flow Models via Stochastic Generation
and Rollover Budget Forcing". ``B`` chains start from the best of a pool of noises (scored after
the pool's first SDE step); at each step a chain draws one proposal at a time and advances as
soon as one beats its running best reward ``r*``, rolling the unused quota over to the next step;
if the quota runs out it takes the step's best proposal. Chains advance asynchronously inside one
``lax.while_loop``. Budget accounting, the NaN / ``+inf`` policy and held-out rewards are those of
:mod:`.flow_search` (module docstring), whose :class:`~.flow_search.Params`,
:func:`~.flow_search.make_params` and :func:`~.flow_search.check_params` RBF shares.

Kernel: :func:`rbf_sampler` (``init`` = the pool, one step = the while loop, ``last_step`` = the
data-end selection); :func:`rbf` runs it with ``run_with_keys(*rbf_keys(key), sampler, params)``.
Shapes: chains ``[B, ...]``, per-step diagnostics ``[S, B]``, pool rewards ``[B, num_init]``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax.interpolants import Diffusion, sde_step_mean_std, velocity_to_x0
from tts_jax.models.base import FlowModel
from tts_jax.rewards.base import Reward
from tts_jax.samplers.base import Sampler, run_with_keys
from tts_jax.samplers.image.flow_search import (
    _check_size,
    _propose,
    _register,
    _require,
    _rows,
    _score,
    _validate,
    make_params,
)
from tts_jax.samplers.image.integrate import initial_noise
from tts_jax.samplers.image.scaffold import finish, score, search_result
from tts_jax.samplers.image.selection import best_of_groups
from tts_jax.samplers.result import Result, count_invalid

Array = jax.Array


# --------------------------------------------------------------------------- RBF


class _Chains(NamedTuple):
    """Carry of the rollover-budget-forcing loop (leading axis: chains ``B``).

    Attributes:
        k: ``int32[B]`` grid index of each chain's state.
        x, u: ``[B, ...]`` state and its cached velocity at ``grid[k]``.
        best: ``[B]`` running best reward ``r*`` (never lowered).
        allowance: ``int32[B]`` NFE available at the current step (quota + rollover).
        used: ``int32[B]`` proposals drawn at the current step.
        spent: ``int32[B]`` NFE spent in the loop.
        step_x, step_u, step_r: best proposal of the current step and its reward.
        chain_nfe: ``int32[S, B]`` NFE spent per step.
        chain_reward: ``[S, B]`` reward of the proposal each step advanced to.
        early: ``bool[S, B]`` the step advanced on an improvement (quota rolled over).
        num_invalid: ``int32[2]`` NaN and ``+inf`` rewards seen.
        it: loop iterations.
    """

    k: Array
    x: Array
    u: Array
    best: Array
    allowance: Array
    used: Array
    spent: Array
    step_x: Array
    step_u: Array
    step_r: Array
    chain_nfe: Array
    chain_reward: Array
    early: Array
    num_invalid: Array
    it: Array


class _Transitions(NamedTuple):
    """Coefficients of the transition ``grid[k] -> grid[k + 1]`` for every ``k < S``: the
    Euler-Maruyama proposal is ``mean_x[k] x + mean_u[k] u + std[k] z`` and the x0-prediction at
    its landing point ``x0_u[k] u' + x0_x[k] x'`` (both linear in the state and its velocity, for
    every interpolant). RBF's chains sit at different grid indices; gathering these ``[S]``
    scalars per chain costs less than evaluating the interpolant at per-chain times."""

    mean_x: Array
    mean_u: Array
    std: Array
    x0_u: Array
    x0_x: Array


def _transitions(model: FlowModel, diffusion: Diffusion, grid: Array) -> _Transitions:
    """:class:`_Transitions` of ``grid`` (``[S]`` each), from unit states and velocities."""
    t, t_next = grid[:-1], grid[1:]
    one, zero = jnp.ones_like(t), jnp.zeros_like(t)
    g = diffusion(t, model.interpolant)
    mean_x, std = sde_step_mean_std(model.interpolant, zero, one, t, t_next, g)
    mean_u, _ = sde_step_mean_std(model.interpolant, one, zero, t, t_next, g)
    x0_u = velocity_to_x0(model.interpolant, one, zero, t_next)
    x0_x = velocity_to_x0(model.interpolant, zero, one, t_next)
    return _Transitions(mean_x, mean_u, jnp.broadcast_to(std, t.shape), x0_u, x0_x)


def _rbf_init(key, model, reward, grid, diffusion, cond, num_chains, num_init, quota):
    """The initial pool: each chain starts from the best of ``num_init`` noises after one SDE step.

    The pool cannot be scored at ``grid[0]``: at pure noise the x0-prediction carries (almost) no
    information about the noise (on the linear path it is exactly ``E[x0]`` for every noise), so
    every pool member would tie. Each noise therefore takes the first transition
    ``grid[0] -> grid[1]`` (1 NFE: its velocity at ``grid[0]``) and is scored by the reward of
    its x0-prediction at ``grid[1]`` (1 NFE: the velocity there, cached as the winner's next
    drift). ``B * num_init`` NFE each; the chains start at grid index 1 with ``r*`` = the winner's
    reward. Pool member ``j`` of every chain is drawn and scored in one batch of ``B`` rows, the
    width of the main loop (a ``lax.scan`` over members keeping each chain's best so far: memory
    for ``B`` states, not ``B * num_init``); ties go to the earlier member.

    Returns:
        ``(chains, pool_reward [B, num_init])``.
    """
    num_steps = grid.shape[0] - 1
    k_noise, k_step = jax.random.split(key)
    t0 = jnp.broadcast_to(grid[0], (num_chains,))
    t1 = jnp.broadcast_to(grid[1], (num_chains,))

    def member(best, j):
        x = initial_noise(jax.random.fold_in(k_noise, j), model, num_chains)
        u = model.velocity(x, t0, cond)
        xp = _propose(jax.random.fold_in(k_step, j), model, diffusion, x, u, grid[0], grid[1])
        up = model.velocity(xp, t1, cond)
        r, invalid = _score(model, reward, xp, t1, up, cond)
        better = (r > best[2]) | (j == 0)
        best = jax.tree.map(
            lambda new, old: jnp.where(_rows(better, new), new, old), (xp, up, r), best
        )
        return best, (r, count_invalid(invalid))

    shape = (num_chains, *model.sample_shape)
    start = (jnp.zeros(shape), jnp.zeros(shape), jnp.full((num_chains,), -jnp.inf))
    (x, u, r), (pool_reward, invalid) = jax.lax.scan(member, start, jnp.arange(num_init))
    zeros = jnp.zeros((num_chains,), jnp.int32)
    return _Chains(
        k=jnp.ones((num_chains,), jnp.int32),
        x=x,
        u=u,
        best=r,
        allowance=quota,
        used=zeros,
        spent=zeros,
        step_x=x,
        step_u=u,
        step_r=jnp.full((num_chains,), -jnp.inf, jnp.float32),
        chain_nfe=jnp.zeros((num_steps, num_chains), jnp.int32).at[0].set(num_init),
        chain_reward=jnp.full((num_steps, num_chains), -jnp.inf, jnp.float32).at[0].set(r),
        early=jnp.zeros((num_steps, num_chains), bool),
        num_invalid=jnp.sum(invalid, axis=0),
        it=jnp.int32(0),
    ), pool_reward.T


def _rbf_iteration(key, model, reward, grid, tr: _Transitions, cond, quota, chain_budget, c):
    """Every chain still short of ``t = grid[S - 1]`` draws one proposal (1 NFE) and decides."""
    num_steps = grid.shape[0] - 1
    active = c.k < num_steps - 1
    kk = jnp.minimum(c.k, num_steps - 2)
    z = jax.random.normal(jax.random.fold_in(key, c.it), c.x.shape, c.x.dtype)
    xp = _rows(tr.mean_x[kk], c.x) * c.x + _rows(tr.mean_u[kk], c.x) * c.u
    xp = xp + _rows(tr.std[kk], c.x) * z
    up = model.velocity(xp, grid[kk + 1], cond)  # computed for all rows, counted for active ones
    x0 = _rows(tr.x0_u[kk], xp) * up + _rows(tr.x0_x[kk], xp) * xp
    r, invalid = score(reward, x0, cond)
    used = c.used + active
    spent = c.spent + active
    step_better = active & ((r > c.step_r) | (used == 1))
    step_x = jnp.where(_rows(step_better, xp), xp, c.step_x)
    step_u = jnp.where(_rows(step_better, up), up, c.step_u)
    step_r = jnp.where(step_better, r, c.step_r)
    # Every earlier proposal of this step was <= r*, so an improvement is the step's best.
    last = kk == num_steps - 2
    improved = active & ~last & (r > c.best)
    exhausted = active & jnp.where(last, spent >= chain_budget, used >= c.allowance)
    advance = improved | exhausted
    rows = jnp.arange(c.k.shape[0])
    return _Chains(
        k=c.k + advance,
        x=jnp.where(_rows(advance, xp), step_x, c.x),
        u=jnp.where(_rows(advance, up), step_u, c.u),
        best=jnp.where(advance, jnp.maximum(c.best, step_r), c.best),
        allowance=jnp.where(advance, c.allowance - used + quota, c.allowance),
        used=jnp.where(advance, 0, used),
        spent=spent,
        step_x=step_x,
        step_u=step_u,
        step_r=jnp.where(advance, -jnp.inf, step_r),
        chain_nfe=c.chain_nfe.at[kk, rows].add(active.astype(jnp.int32)),
        chain_reward=c.chain_reward.at[kk, rows].set(
            jnp.where(advance, step_r, c.chain_reward[kk, rows])
        ),
        early=c.early.at[kk, rows].set(c.early[kk, rows] | improved),
        num_invalid=c.num_invalid + count_invalid(invalid & active[None]),
        it=c.it + 1,
    )


def _rbf_plan(budget: int, num_chains: int, num_init: int, num_steps: int) -> tuple[int, tuple]:
    """RBF's per-step quota ``Q`` and per-chain budgets (the loop's NFE, the remainder of an
    uneven split to the first chains), from the NFE ``budget`` (host-side)."""
    init = 2 * num_chains * num_init
    quota = (budget - init) // ((num_steps - 2) * num_chains)
    share, extra = divmod(budget - init, num_chains)
    return quota, tuple(share + (c < extra) for c in range(num_chains))


def rbf_sampler(
    num_chains: int,
    num_init: int,
    num_steps: int,
    budget: int,
    final_proposals: int | None = None,
) -> Sampler:
    """Rollover budget forcing (Kim et al. 2025, docs/algorithms.md 3) as a
    :class:`~tts_jax.samplers.base.Sampler` of two steps.

    ``init`` is the initial pool (``B num_init`` noises each taking the first SDE step, scored
    at ``grid[1]``; each chain ``[B, ...]`` starts from its best member). Step 0 is the whole
    asynchronous loop of the chains over the transitions landing at ``t > 0``: one
    ``lax.while_loop`` (the chains advance at data-dependent times, so its iteration count is
    not static; one proposal per chain per iteration). The last step (``last_step``) is the
    data-end transition: ``final_proposals`` samples per chain, each chain keeps its best.
    :func:`rbf` runs it with ``run_with_keys(k_init, [k_loop, k_final], ...)`` for
    ``k_init, k_loop, k_final = split(key, 3)``, its key layout; ``run(key, sampler, params)``
    is as valid (other keys, the same distribution).

    Args:
        num_chains: ``B >= 1`` (static).
        num_init: initial noises per chain (static, ``>= 1``).
        num_steps: ``S >= 3`` transitions of the grid (static).
        budget: NFE, at least ``B (2 num_init + S - 2)`` (static: it sets the per-step quota
            ``Q = (budget - 2 B num_init) // ((S - 2) B)`` and each chain's share).
        final_proposals: data-end proposals per chain (static; default ``Q``).

    Returns:
        A :class:`~tts_jax.samplers.base.Sampler` (equal arguments give the same one) whose
        result is that of :func:`rbf`.
    """
    method = "rbf"
    num_chains = _check_size(method, "num_chains", num_chains)
    num_init = _check_size(method, "num_init", num_init)
    num_steps = _check_size(method, "num_steps", num_steps)
    if num_steps < 3:
        raise ValueError(
            "rbf needs a grid of at least 3 steps (the initial pool takes the first, proposals "
            f"at t = 0 cost no NFE), got {num_steps}"
        )
    _require(
        budget,
        num_chains * (2 * num_init + num_steps - 2),
        "rbf",
        f"{num_chains} chains x ({num_init} initial noises taking their first step, 2 NFE "
        f"each, + 1 proposal for each of the other {num_steps - 2} steps landing at t > 0)",
    )
    quota, _ = _rbf_plan(int(budget), num_chains, num_init, num_steps)
    final = quota if final_proposals is None else final_proposals
    if final < 1:
        raise ValueError(f"rbf: final_proposals must be >= 1, got {final}")
    return _rbf_sampler(num_chains, num_init, num_steps, int(budget), int(final))


@functools.cache
def _rbf_sampler(num_chains, num_init, num_steps, budget, final_proposals) -> Sampler:
    quota, chain_budget = _rbf_plan(budget, num_chains, num_init, num_steps)

    def arrays():
        # Host constants, as the arrays the loop compares with (no device op at build time).
        return np.full(num_chains, quota, np.int32), np.asarray(chain_budget, np.int32)

    def init(key, params):
        q, _ = arrays()
        return _rbf_init(
            key,
            params.model,
            params.reward,
            params.grid,
            params.diffusion,
            params.cond,
            num_chains,
            num_init,
            q,
        )

    def loop(key, state, params):
        chains, pool_reward = state
        q, budgets = arrays()
        iteration = functools.partial(
            _rbf_iteration,
            key,
            params.model,
            params.reward,
            params.grid,
            _transitions(params.model, params.diffusion, params.grid),
            params.cond,
            q,
            budgets,
        )
        chains = jax.lax.while_loop(lambda c: jnp.any(c.k < num_steps - 1), iteration, chains)
        return (chains, pool_reward), {}

    def last_step(key, state, params):
        # Data-end transition: best of `final_proposals` samples per chain (0 NFE, reward calls).
        chains, pool_reward = state
        model, grid = params.model, params.grid
        xs = jnp.repeat(chains.x, final_proposals, axis=0)
        us = jnp.repeat(chains.u, final_proposals, axis=0)
        xs = _propose(key, model, params.diffusion, xs, us, grid[-2], grid[-1])
        r, invalid = score(params.reward, xs, params.cond)
        idx, _ = best_of_groups(r, num_chains)
        return (chains, pool_reward, xs[idx], r[idx], count_invalid(invalid)), {}

    def finalize(state, infos, params):
        chains, pool_reward, x, r, invalid = state
        chain_reward = chains.chain_reward.at[-1].set(r)
        # The pool's velocities at grid[0] are init_nfe; those at grid[1] are step 0's chain_nfe.
        init_nfe = num_chains * num_init
        loop_nfe = jnp.sum(chains.spent)
        info = {
            "best_reward": jax.lax.cummax(jnp.max(chain_reward, axis=1)),
            "chain_reward": chain_reward,
            "running_best": chains.best,
            "chain_nfe": chains.chain_nfe,
            "advanced_early": chains.early,
            "nfe": jnp.sum(chains.chain_nfe, axis=1),
            "init_nfe": jnp.int32(init_nfe),
            "pool_reward": pool_reward,
            "iterations": chains.it,
        }
        reward_calls = init_nfe + loop_nfe + num_chains * final_proposals
        invalid = chains.num_invalid + invalid
        nfe = 2 * init_nfe + loop_nfe
        return search_result(x, r, nfe, reward_calls, invalid, info, params.held_out, params.cond)

    sampler = Sampler(init, loop, finalize, 2, last_step=last_step)
    return _register(sampler, "rbf", num_steps, 3)


def rbf_keys(key: Array) -> tuple[Array, Array]:
    """:func:`rbf`'s key layout for :func:`~tts_jax.samplers.base.run_with_keys`:
    ``(k_init, Key[2] = [k_loop, k_final])`` from ``split(key, 3)``."""
    keys = jax.random.split(key, 3)
    return keys[0], keys[1:]


@functools.partial(jax.jit, static_argnames="sampler")
def _run_rbf(key, sampler, params):
    return run_with_keys(*rbf_keys(key), sampler, params)


def rbf(
    key: Array,
    model: FlowModel,
    reward: Reward,
    grid: Array,
    diffusion: Diffusion,
    budget: int,
    *,
    num_chains: int = 2,
    num_init: int = 25,
    final_proposals: int | None = None,
    cond: Any = None,
    held_out: Sequence[Reward] | dict[str, Reward] = (),
    nan_policy: str = "raise",
) -> Result:
    """Rollover budget forcing (Kim et al. 2025, docs/algorithms.md 3): spends exactly ``budget``
    NFE.

    1. Init (the initial pool, docs/algorithms.md 3): ``num_init`` noises per chain each take the
       first SDE step ``grid[0] -> grid[1]`` and are scored by the reward of their
       x0-prediction at ``grid[1]``; each chain starts at ``grid[1]`` from its best pool member
       and ``r*`` starts at its reward. Scoring at ``grid[0]`` would be meaningless: at pure
       noise the x0-prediction is ``E[x0]`` whatever the noise (exactly so on the linear path).
       Cost ``2 B num_init`` NFE: ``info.extra["init_nfe"] = B num_init`` velocities at the noises,
       and ``B num_init`` at the pool's proposals (step 0 of ``info.extra["nfe"]``; the winners'
       velocities drive their next step).
    2. Per-step quota ``Q = (budget - 2 B num_init) // ((S - 2) B)`` NFE per chain for each of
       the ``S - 2`` remaining transitions landing at ``t > 0`` (transitions into ``t = 0`` cost
       no NFE).
    3. A chain draws one SDE proposal at a time (1 NFE: the velocity at the proposal gives its
       x0-prediction and is cached for the next step). If its reward beats ``r*`` the chain
       advances to it at once, ``r* <- r`` and the unused quota rolls over
       (``Q_next = Q - used + Q``); if the step's allowance runs out the chain advances to the
       step's best proposal (SVDD fallback) and ``r*`` stays. The last of these transitions gets
       every NFE the chain has left (no early stop: nothing is left to roll over) and keeps the
       best proposal, so each chain spends its share of the budget exactly.
    4. Data end: each chain draws ``final_proposals`` (default ``Q``) samples at ``t = 0`` and
       keeps the best (reward calls only). The output is the argmax over chains.

    Chains advance asynchronously: one ``lax.while_loop`` with per-chain grid index, allowance
    and step-best proposal, updated with masks. Inactive chains' rows of the batched forward pass
    are computed but discarded and not counted.

    Args:
        num_chains: ``B`` (static, default 2).
        num_init: initial noises per chain (static, default 25 as in the paper).
        final_proposals: data-end proposals per chain (static; default ``Q``).
        budget: NFE; at least ``B (2 num_init + S - 2)`` (a quota of one proposal per step).
        grid: at least 3 steps (the pool takes the first; the loop needs one more before the
            data end).
        Others: as :func:`~.flow_search.code`; ``diffusion`` must be stochastic for proposals
            to differ.

    Returns:
        :class:`Result` of the ``B`` chains at ``t = 0`` with ``nfe == budget``. ``info``:
        ``nfe [S]`` and ``chain_nfe [S, B]`` per step (the data-end step spends 0),
        ``chain_reward [S, B]`` of the proposal each step advanced to, ``best_reward [S]``
        (running best over chains), ``running_best [B]`` final ``r*``, ``advanced_early [S, B]``
        (the step rolled its quota over), ``init_nfe``, ``pool_reward [B, num_init]`` (the
        initial pool's rewards at ``grid[1]``; ``chain_reward[0]`` is each chain's maximum),
        ``iterations``, ``info.num_nan`` and ``info.num_inf``.

    Raises:
        ValueError: as :func:`~.flow_search.code`.
    """
    grid, held_out = _validate("rbf", grid, budget, nan_policy, held_out, diffusion)
    sampler = rbf_sampler(num_chains, num_init, grid.shape[0] - 1, budget, final_proposals)
    params = make_params(model, reward, grid, diffusion, cond=cond, held_out=held_out)
    result = _run_rbf(key, sampler, params)
    return finish(result, "rbf", reward, nan_policy)
