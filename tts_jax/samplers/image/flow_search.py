"""Particle search on flow models at a fixed NFE budget: BoN, SMC, SVDD, CoDe (Kim et al. 2025,
docs/algorithms.md 3); :func:`rbf` lives in :mod:`.rollover`, everything is re-exported by
:mod:`.flow_particles`.

This module also holds what :mod:`.rollover` shares with SVDD / CoDe: :class:`Params`,
:func:`make_params`, :func:`check_params` and the proposal / scoring helpers.


Kim, Yoon, Lee & Sung 2025, "Inference-Time Scaling for Flow Models via Stochastic Generation
and Rollover Budget Forcing". A flow model branches once its ODE is turned into an SDE
(docs/algorithms.md 0.2) and, for more diverse particles, once it runs on the VP path (0.3). The
generation mode is the caller's choice and every method accepts all three:

* ODE: ``diffusion=ode()`` (deterministic; only the initial noises differ),
* linear SDE: ``diffusion=diffusion("square", 3.0)`` with the model as trained,
* VP SDE: the same diffusion with ``model=linear_to_vp(model)``.

Methods (``S = len(grid) - 1`` transitions from noise to the data end ``grid[-1] = 0``):

* :func:`smc` - FK particle filtering (:func:`~tts_jax.samplers.image.fk_steering.fk_steering`) with
  the potential ``exp(lam (r_k - r_{k-1}))`` on the Tweedie x0-prediction and multinomial
  resampling after every step.
* :func:`svdd` - ``B`` chains; at every step each chain draws ``M`` SDE proposals from its state
  and keeps the one whose x0-prediction has the highest reward.
* :func:`code` - SVDD that selects every ``L`` steps: each proposal is rolled out ``L``
  transitions before the selection (CoDe, block size ``L = 2``).
* :func:`~.rollover.rbf` - rollover budget forcing: ``B`` chains start from the best of a pool
  of noises (scored after the pool's first SDE step: at pure noise every x0-prediction is
  ~``E[x0]``); at each step a chain draws one proposal at a time and advances as soon as one
  beats its running best reward ``r*``, rolling the unused quota over to the next step; if the
  quota runs out it takes the step's best proposal (``r*`` is not lowered). Chains advance
  asynchronously inside one ``lax.while_loop``.

Budget accounting (``result.cost.nfe`` counts model forward passes per particle):

* a proposal landing at ``t > 0`` costs 1 NFE: the velocity at the proposal gives its
  x0-prediction (``velocity_to_x0``, 0 NFE) *and* the drift of the chain's next step, so it is
  cached and never recomputed;
* a proposal landing at the data end ``t = 0`` costs 0 NFE: it is a sample, scored as itself.
  The budget is therefore spent on the ``S - 1`` transitions landing at ``t > 0`` (plus the
  velocities at the initial noises), and the data-end transition is a best-of-``M`` selection
  that costs reward calls only (``M`` = the per-step proposal count or quota);
* BoN and SMC spend ``S`` NFE per sample (one velocity per grid point except the data end).

Every method rejects budgets below its minimum with a message that states it, returns
:class:`~tts_jax.samplers.result.Result` whose ``samples`` are the outputs at ``t = 0``
(particles, chains or BoN candidates) with their rewards, and ``info`` with per-step
diagnostics (``nfe`` per step, ``init_nfe``, ``best_reward``: the running best reward, for SMC
each step's best, plus method-specific entries). Rewards passed as ``held_out`` are evaluated
on the outputs only (``info.held_out[name]``), never used for selection.

Non-finite rewards: a NaN or ``+inf`` reward is invalid. The proposal is scored ``-inf`` and never
selected (if all of a chain's proposals are invalid it keeps the first one; SMC gives the
particle zero weight); the counts are ``info.num_nan`` and ``info.num_inf``
and, with ``nan_policy="raise"`` (default), a run that saw any is a host-side error naming the
method, the reward and both counts. A ``-inf`` reward is valid: it rejects the proposal.

Hyper-parameters are arrays (``lam``, ``diffusion.norm``): sweeping them never recompiles; a NaN
or infinite one is an error at the call, before anything is traced. Sizes
(budget-derived particle / proposal counts, ``num_chains``, ``num_init``, ``block``) are static.
``cond`` is passed unchanged to the model and the rewards (one condition shared by all particles).

Kernels (issue 16, :mod:`tts_jax.samplers.base`): :func:`svdd_sampler`, :func:`code_sampler`
and :func:`~.rollover.rbf_sampler` build memoized :class:`~tts_jax.samplers.base.Sampler`
values from static sizes; :func:`make_params` gathers the arrays (:class:`Params`) and
:func:`check_params` checks them on the host.
``jax.jit(run, static_argnames="sampler")(key, sampler, params)`` is :func:`svdd` /
:func:`code` bit for bit; :func:`~.rollover.rbf` keeps its key layout through
``run_with_keys(*rbf_keys(key), sampler, params)``. :func:`smc_sampler` / :func:`smc_params`
are FK steering's kernel and parameters as :func:`smc` configures them. Best-of-N, the baseline
of Kim et al., is the library's one image best-of-N,
:func:`~tts_jax.samplers.image.noise_search.best_of_n` (it takes a ``diffusion`` too).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax import smc as smc_engine
from tts_jax.interpolants import Diffusion, sde_step
from tts_jax.models.base import FlowModel
from tts_jax.rewards.base import Reward
from tts_jax.samplers.base import Sampler, float32, run
from tts_jax.samplers.image import fk_steering
from tts_jax.samplers.image.fk_steering import check_fk_result, fk_steering_unchecked
from tts_jax.samplers.image.integrate import initial_noise, tweedie
from tts_jax.samplers.image.scaffold import (
    check_budget,
    check_finite_hyperparameters,
    check_grid,
    check_nan_policy,
    finish,
    held_out_dict,
    score,
    search_result,
)
from tts_jax.samplers.image.selection import best_of_groups
from tts_jax.samplers.result import Result, count_invalid

Array = jax.Array


# --------------------------------------------------------------------------- shared helpers


def _rows(mask: Array, x: Array) -> Array:
    """Reshape a per-particle ``[N]`` array to broadcast against ``x [N, ...]``."""
    return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def _validate(
    method: str, grid, budget: int, nan_policy: str, held_out, diffusion: Diffusion
) -> tuple[np.ndarray, dict[str, Reward]]:
    """Host-side checks shared by every method (before tracing), from :mod:`.scaffold`; returns
    the grid as float32 ``[S + 1]`` (host-side: no eager device op per call) and the held-out
    rewards as ``{name: Reward}``. The budget's minimum is checked by each method."""
    check_nan_policy(method, nan_policy)
    check_budget(method, budget, 1, "one NFE")
    held_out = held_out_dict(method, held_out)
    grid = np.asarray(grid, np.float32)
    check_grid(method, grid)
    check_finite_hyperparameters(
        method, {"grid": grid, "diffusion.norm": getattr(diffusion, "norm", None)}
    )
    check_grid(method, grid, data_end=True)
    return grid, held_out


def _require(budget: int, minimum: int, method: str, why: str) -> None:
    check_budget(method, budget, minimum, why)


def _need_steps(num_steps: int, method: str) -> None:
    if num_steps < 2:
        raise ValueError(
            f"{method} needs a grid of at least 2 steps (proposals at t = 0 cost no NFE), "
            f"got {num_steps}"
        )


def _score(model: FlowModel, reward: Reward, x: Array, t: Array, u: Array, cond) -> tuple:
    """Reward of the x0-prediction of ``x [N, ...]`` at a time ``t > 0`` from its velocity ``u``.

    Returns ``(rewards [N] with NaN and +inf -> -inf, invalid Bool[2, N])`` (see
    :func:`~tts_jax.samplers.result.mask_invalid_rewards`).
    """
    x0 = tweedie(model, x, jnp.broadcast_to(t, x.shape[:1]), u)
    return score(reward, x0, cond)


def _propose(key, model: FlowModel, diffusion: Diffusion, x, u, t, t_next) -> Array:
    """One Euler-Maruyama proposal from ``x [N, ...]`` with cached velocity ``u``; 0 NFE."""
    t = jnp.broadcast_to(t, x.shape[:1])
    g = diffusion(t, model.interpolant)
    return sde_step(key, model.interpolant, u, x, t, jnp.broadcast_to(t_next, x.shape[:1]), g)


def smc(
    key: Array,
    model: FlowModel,
    reward: Reward,
    grid: Array,
    diffusion: Diffusion,
    budget: int,
    lam: float | Array,
    *,
    cond: Any = None,
    held_out: Sequence[Reward] | dict[str, Reward] = (),
    nan_policy: str = "raise",
) -> Result:
    """Particle filtering with ``log G_k = lam (r_k - r_{k-1})``, multinomial resampling every step.

    ``N = budget // S`` particles; this is FK steering (Singhal et al. 2025) with the ``diff``
    potential on the Tweedie x0-prediction and resampling after every step, including the last
    (so the output particles are equally weighted draws targeting ``p(x0) exp(lam r(x0)) / Z``).

    Args:
        lam: inverse temperature (array; sweeping it does not recompile); must be finite.
        budget: NFE; at least ``S`` (one particle).
        Others: as :func:`code` (use a stochastic ``diffusion``: ODE copies stay identical).

    Returns:
        :class:`Result` of the ``N`` particles with FK's SMC diagnostics (``ess``,
        ``unique_ancestors``, ``resampled``, ``log_evidence_increment`` per step), ``nfe [S]``
        and ``init_nfe``; ``best_reward [S]`` is each step's best reward of the particles'
        x0-predictions (the samples' at the last step), not a running maximum: intermediate
        rewards are on Tweedie estimates, not samples. ``info.num_nan`` and
        ``info.num_inf`` count the invalid rewards (their particles get zero weight).

    Raises:
        ValueError: as :func:`code`, a non-finite ``lam``, or every particle with zero weight
            (see :func:`~tts_jax.samplers.image.fk_steering.fk_steering`).
    """
    grid, held_out = _validate("smc", grid, budget, nan_policy, held_out, diffusion)
    num_steps = grid.shape[0] - 1
    _require(budget, num_steps, "smc", f"one particle for {num_steps} steps")
    n = budget // num_steps
    result = fk_steering_unchecked(
        "smc",
        key,
        model,
        reward,
        n,
        grid,
        diffusion,
        lam,
        schedule=smc_engine.every(num_steps, 1),
        potential="diff",
        resampler="multinomial",
        cond=cond,
        held_out=held_out,
    )
    # fk_steering evaluates the velocity at grid[0] and at every landing point except t = 0.
    per_step = np.full(num_steps, n, np.int32)
    per_step[-1] = 0
    extra = dict(result.info.extra, nfe=per_step, init_nfe=np.int32(n))  # host values
    result = result._replace(info=result.info._replace(extra=extra))
    return check_fk_result(result, "smc", reward, nan_policy)


def smc_sampler(num_particles: int, num_steps: int) -> Sampler:
    """:func:`smc`'s kernel: the FK steering sampler
    (:func:`tts_jax.samplers.image.fk_steering.sampler`) with the ``diff`` potential and multinomial
    resampling, for ``N = num_particles`` particles over ``S = num_steps`` transitions (static;
    memoized by FK). Run it with :func:`smc_params`; the result is :func:`smc`'s without the
    host-side ``info.extra["nfe"]`` / ``info.extra["init_nfe"]`` (``N`` velocities at
    ``grid[0]``, ``N`` per step landing at ``t > 0``) and ``info.held_out`` that :func:`smc`
    adds."""
    return fk_steering.sampler(num_particles, num_steps, "diff", "multinomial")


def smc_params(
    model: FlowModel,
    reward: Reward,
    grid: Array,
    diffusion: Diffusion,
    lam: float | Array,
    *,
    cond: Any = None,
) -> fk_steering.Params:
    """:func:`smc`'s parameters: FK's (:func:`tts_jax.samplers.image.fk_steering.make_params`) with
    a resampling after every step (``smc.every(S, 1)``). Check them with
    ``fk_steering.check_params(params, sampler, "smc")``."""
    grid = np.asarray(grid, np.float32) if not isinstance(grid, jax.Array) else grid
    num_steps = check_grid("smc", grid)
    schedule = smc_engine.every(num_steps, 1)
    return fk_steering.make_params(model, reward, grid, diffusion, lam, schedule, cond)


# --------------------------------------------------------------------------- SVDD / CoDe


def _rollout(key, model, diffusion, grid, x, u, first, length: int, cond):
    """Advance ``x [P, ...]`` (velocity ``u`` at ``grid[first]``) by ``length`` transitions that
    all land at ``t > 0``, evaluating the velocity at each landing point (1 NFE per particle
    and transition). Transition ``j`` draws its noise with ``fold_in(key, j)``.

    Returns:
        ``(x, u)`` at ``grid[first + length]``.
    """

    def sub(carry, j):
        x, u = carry
        k = first + j
        x = _propose(jax.random.fold_in(key, j), model, diffusion, x, u, grid[k], grid[k + 1])
        return (x, model.velocity(x, grid[k + 1], cond)), None

    return jax.lax.scan(sub, (x, u), jnp.arange(length))[0]


class Params(NamedTuple):
    """Everything array-valued the flow particle samplers need: a pytree (a jit argument).

    Attributes:
        model: :class:`~tts_jax.models.base.FlowModel` (``linear_to_vp(model)`` for the VP path;
            its weights are leaves).
        reward: :class:`~tts_jax.rewards.base.Reward` ``r(x0, cond) -> [N]`` used for selection.
        grid: ``Float[S + 1]`` times from noise to the data end ``grid[-1] = 0``.
        diffusion: :class:`~tts_jax.interpolants.Diffusion` of the SDE proposals (its norm is an
            array: sweeping it never recompiles).
        cond: condition passed unchanged to the model and the rewards, or ``None``.
        held_out: ``{name: Reward}`` evaluated on the returned samples only.
    """

    model: FlowModel
    reward: Reward
    grid: Array
    diffusion: Diffusion
    cond: Any = None
    held_out: dict[str, Reward] | None = None


def make_params(
    model: FlowModel,
    reward: Reward,
    grid: Array,
    diffusion: Diffusion,
    *,
    cond: Any = None,
    held_out: dict[str, Reward] | None = None,
) -> Params:
    """:class:`Params` with ``grid`` as a float32 array (NumPy for host values: no device op)
    and ``held_out`` defaulting to ``{}``. No checks (:func:`check_params`)."""
    grid = float32(grid)
    held_out = {} if held_out is None else dict(held_out)
    return Params(model, reward, grid, diffusion, cond, held_out)


class _Config(NamedTuple):
    """What :func:`check_params` needs to know of a sampler built here."""

    method: str
    num_steps: int  # S, the grid's transitions the sampler is built for
    min_steps: int  # the fewest transitions the method works with


_CONFIGS: dict[Sampler, _Config] = {}


def _register(sampler: Sampler, method: str, num_steps: int, min_steps: int) -> Sampler:
    _CONFIGS[sampler] = _Config(method, num_steps, min_steps)
    return sampler


def _check_size(method: str, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{method}: {name} must be >= 1, got {value}")
    return int(value)


def check_params(params: Params, sampler: Sampler) -> None:
    """Host-side checks of ``params`` for a ``sampler`` of this module, before tracing.

    Shapes are always checked, values when concrete (traced ones are skipped).

    Raises:
        ValueError: naming the method: a grid that is not ``[S + 1]`` for the sampler's ``S``,
            not strictly decreasing to the data end 0, or not finite; a non-finite diffusion
            norm; a held-out entry that is not a :class:`~tts_jax.rewards.base.Reward`; a
            ``sampler`` not built by this module.
    """
    config = _CONFIGS.get(sampler)
    if config is None:
        raise ValueError("check_params: the sampler was not built by tts_jax flow_particles")
    method = config.method
    num_steps = check_grid(method, params.grid)
    if num_steps != config.num_steps:
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
    check_grid(method, params.grid, data_end=True)
    held_out_dict(method, params.held_out)


def code_sampler(num_chains: int, num_proposals: int, num_steps: int, block: int = 2) -> Sampler:
    """CoDe (Kim et al. 2025, docs/algorithms.md 3) as a :class:`~tts_jax.samplers.base.Sampler`.

    ``init`` draws the ``B`` chains' noises ``[B, ...]`` and their velocities at ``grid[0]``
    (``B`` NFE). Step ``b`` (one per block of ``L`` transitions, ``ceil(S / L)`` steps) copies
    each chain into ``M`` proposals ``[B M, ...]``, rolls them out over the block (transition
    ``j`` of the block draws its noise with ``fold_in(step key, j)``, 1 NFE per proposal and
    transition landing at ``t > 0``), scores the x0-predictions at the block's end and keeps
    each chain's best (:func:`~tts_jax.samplers.image.selection.best_of_groups`). The last step
    (``last_step``) ends at the data end: its final transition needs no velocity and its
    proposals are scored as samples. ``run(key, sampler, params)`` gives :func:`code`'s result.

    Args:
        num_chains: ``B >= 1`` (static).
        num_proposals: ``M >= 1`` proposals per chain and selection (static; :func:`code`
            spends its budget with ``M = (budget // B - 1) // (S - 1)``).
        num_steps: ``S >= 2`` transitions of the grid (static).
        block: ``L >= 1`` transitions between selections (static; 1 is SVDD).

    Returns:
        A :class:`~tts_jax.samplers.base.Sampler` (equal arguments give the same one) whose
        state is ``(x, u)`` ``[B, ...]`` each (the chains and their velocities) and whose
        result is that of :func:`code`.
    """
    return _code_sampler_checked("code", num_chains, num_proposals, num_steps, block)


def svdd_sampler(num_chains: int, num_proposals: int, num_steps: int) -> Sampler:
    """SVDD (Li et al. 2024, as run by Kim et al. 2025, docs/algorithms.md 3):
    :func:`code_sampler` with ``block=1`` (a selection after every transition, ``S`` steps)."""
    return _code_sampler_checked("svdd", num_chains, num_proposals, num_steps, 1)


def _code_sampler_checked(method, num_chains, num_proposals, num_steps, block) -> Sampler:
    num_chains = _check_size(method, "num_chains", num_chains)
    num_proposals = _check_size(method, "num_proposals", num_proposals)
    block = _check_size(method, "block", block)
    num_steps = _check_size(method, "num_steps", num_steps)
    _need_steps(num_steps, method)
    return _code_sampler(method, num_chains, num_proposals, num_steps, block)


@functools.cache
def _code_sampler(method, num_chains, num_proposals, num_steps, block) -> Sampler:
    particles = num_chains * num_proposals
    # Every block but the last ends at t > 0; the last one (1..L transitions) ends at the data
    # end, where the proposals are samples (its final transition needs no velocity).
    num_blocks = -(-num_steps // block)
    last_block = num_steps - (num_blocks - 1) * block

    def copies(x, u):
        return jnp.repeat(x, num_proposals, axis=0), jnp.repeat(u, num_proposals, axis=0)

    def keep_best(xs, us, r, invalid, end, nfe):
        idx, pick = best_of_groups(r, num_chains)
        record = {
            "chain_reward": r[idx],
            "selected": pick,
            "step_end": jnp.asarray(end, jnp.int32),
            "nfe": jnp.asarray(nfe * particles, jnp.int32),
            "num_invalid": count_invalid(invalid),
        }
        return (xs[idx], us[idx]), record

    def init(key, params):
        x = initial_noise(key, params.model, num_chains)
        return x, params.model.velocity(x, params.grid[0], params.cond)

    def block_step(key, state, params):
        (x, u), b = state
        model, grid, cond = params.model, params.grid, params.cond
        first, end = b * block, (b + 1) * block
        xs, us = _rollout(key, model, params.diffusion, grid, *copies(x, u), first, block, cond)
        r, invalid = _score(model, params.reward, xs, grid[end], us, cond)
        chains, record = keep_best(xs, us, r, invalid, end, block)
        return (chains, b + 1), record

    def last_step(key, state, params):
        (x, u), _ = state
        model, grid, cond = params.model, params.grid, params.cond
        first = num_steps - last_block
        xs, us = _rollout(
            key, model, params.diffusion, grid, *copies(x, u), first, last_block - 1, cond
        )
        k = num_steps - 1
        xs = _propose(
            jax.random.fold_in(key, last_block - 1),
            model,
            params.diffusion,
            xs,
            us,
            grid[k],
            grid[k + 1],
        )
        chains, record = keep_best(
            xs, us, *score(params.reward, xs, cond), num_steps, last_block - 1
        )
        return (chains, jnp.int32(num_blocks)), record

    def finalize(state, per, params):
        (x, _), _ = state
        r = per["chain_reward"][-1]
        info = {
            "best_reward": jax.lax.cummax(jnp.max(per["chain_reward"], axis=1)),
            "chain_reward": per["chain_reward"],
            "selected": per["selected"],
            "step_end": per["step_end"],
            "nfe": per["nfe"],
            "init_nfe": jnp.int32(num_chains),
        }
        nfe = num_chains + jnp.sum(per["nfe"])
        invalid = jnp.sum(per["num_invalid"], axis=0)
        return search_result(
            x, r, nfe, num_blocks * particles, invalid, info, params.held_out, params.cond
        )

    def init_with_index(key, params):
        return init(key, params), jnp.int32(0)

    sampler = Sampler(init_with_index, block_step, finalize, num_blocks, last_step=last_step)
    return _register(sampler, method, num_steps, 2)


def code(
    key: Array,
    model: FlowModel,
    reward: Reward,
    grid: Array,
    diffusion: Diffusion,
    budget: int,
    *,
    num_chains: int = 2,
    block: int = 2,
    cond: Any = None,
    held_out: Sequence[Reward] | dict[str, Reward] = (),
    nan_policy: str = "raise",
) -> Result:
    """CoDe: ``B`` chains, each drawing ``M`` proposals rolled out ``block`` steps, then argmax.

    Every ``block`` transitions each chain copies itself into ``M`` proposals, advances them
    ``block`` SDE steps (the last block may be shorter), scores the x0-prediction at the block's
    end (the sample itself at ``t = 0``) and keeps the best. ``M = (budget // B - 1) // (S - 1)``
    uses the budget: the ``B`` initial velocities plus ``M`` NFE per chain per transition landing
    at ``t > 0``, i.e. ``nfe = B (1 + M (S - 1)) <= budget`` whatever the block size.

    Args:
        num_chains: ``B`` (static).
        block: ``L`` transitions between selections (static; 1 is SVDD).
        budget: NFE; at least ``B S`` (``M = 1``).
        key: PRNG key.
        model: :class:`~tts_jax.models.base.FlowModel` (``linear_to_vp(model)`` for the VP path).
        reward: :class:`~tts_jax.rewards.base.Reward` ``r(x0, cond) -> [N]``, scored once per
            sample.
        grid: ``[S + 1]`` times from noise to the data end 0.
        diffusion: an SDE coefficient (stochastic: the proposals must differ).
        cond, held_out, nan_policy: see the module docstring.


    Returns:
        :class:`Result` of the ``B`` chains at ``t = 0``; per selection step ``j``
        (``ceil(S / L)`` of them): ``best_reward`` (running best over chains), ``chain_reward
        [j, B]`` of the kept proposal, ``selected [j, B]`` its index, ``step_end [j]`` its grid
        index and ``nfe [j]``; ``info.num_nan`` and ``info.num_inf``.

    Raises:
        ValueError: bad arguments, a non-finite grid or diffusion norm, a budget below the
            minimum, or (unless ``nan_policy="drop"``) a NaN or ``+inf`` reward.
    """
    return _code_method(
        "code",
        key,
        model,
        reward,
        grid,
        diffusion,
        budget,
        num_chains,
        block,
        cond,
        held_out,
        nan_policy,
    )


def svdd(
    key: Array,
    model: FlowModel,
    reward: Reward,
    grid: Array,
    diffusion: Diffusion,
    budget: int,
    *,
    num_chains: int = 2,
    cond: Any = None,
    held_out: Sequence[Reward] | dict[str, Reward] = (),
    nan_policy: str = "raise",
) -> Result:
    """SVDD (Li et al. 2024, as run by Kim et al. 2025): :func:`code` selecting after every step.

    Each of the ``B`` chains draws ``M = (budget // B - 1) // (S - 1)`` one-step SDE proposals
    per step and keeps the argmax of their x0-predictions' rewards; the velocity evaluated at the
    kept proposal drives its next step. Arguments and outputs as :func:`code` (one selection
    per step).
    """
    return _code_method(
        "svdd",
        key,
        model,
        reward,
        grid,
        diffusion,
        budget,
        num_chains,
        1,
        cond,
        held_out,
        nan_policy,
    )


def _code_method(
    method,
    key,
    model,
    reward,
    grid,
    diffusion,
    budget,
    num_chains,
    block,
    cond,
    held_out,
    nan_policy,
):
    grid, held_out = _validate(method, grid, budget, nan_policy, held_out, diffusion)
    num_steps = grid.shape[0] - 1
    _need_steps(num_steps, method)
    if num_chains < 1 or block < 1:
        raise ValueError(f"{method}: num_chains and block must be >= 1, got {num_chains}, {block}")
    _require(
        budget,
        num_chains * num_steps,
        method,
        f"{num_chains} chains x {num_steps} steps with one proposal each",
    )
    num_proposals = (budget // num_chains - 1) // (num_steps - 1)
    sampler = _code_sampler_checked(method, num_chains, num_proposals, num_steps, block)
    params = make_params(model, reward, grid, diffusion, cond=cond, held_out=held_out)
    return finish(_run(key, sampler, params), method, reward, nan_policy)


_run = jax.jit(run, static_argnames="sampler")
