"""Feynman-Kac steering of a diffusion / flow model (Singhal et al. 2025, docs/algorithms.md 2).

Singhal et al. 2025, "A General Framework for Inference-time Scaling and Steering of Diffusion
Models". SMC over denoising steps with a
stochastic sampler (the SDE of docs/algorithms.md 0.2; with the ODE, resampled copies stay identical
forever, which is allowed but pointless). The intermediate reward ``r_k`` is the reward of the
Tweedie estimate ``x0_hat(x_k)``. Potentials, with ``lambda`` the inverse temperature, as
per-step factors ``G_k`` (values of :data:`potentials`; write your own :class:`Potential`):

* ``diff``:  ``log G_k = lambda (r_k - r_{k-1})``  (telescopes to ``lambda r_final``)
* ``max``:   ``log G_k = lambda max_{j<=k} r_j``
* ``sum``:   ``log G_k = lambda sum_{j<=k} r_j``
* ``final``: ``log G_k = lambda r_k``

Whatever the potential, the last step divides out the product of the earlier factors so the
weighted particles target exactly ``p(x0) exp(lambda r(x0)) / Z``. Rewards are evaluated only at
steps where the schedule may resample, plus the last step (every step for adaptive resampling).
The running maximum starts from the first observed reward, never from 0.

Cost: ``K`` NFE per particle for ``K`` steps (the velocity computed for the Tweedie estimate is
reused by the next SDE step) plus one reward call per particle at each evaluated step.

Two ways to call it:

* the kernel (:mod:`tts_jax.samplers.base`): :func:`sampler` builds a hashable
  :class:`~tts_jax.samplers.base.Sampler` from the static configuration (particle and step
  counts, potential, resampler), :func:`make_params` the :class:`Params` pytree (model, reward,
  grid, diffusion, ``lam``, schedule, condition), :func:`check_params` checks them on the host,
  and :func:`tts_jax.samplers.run` runs them, pure: jit it (``static_argnames="sampler"``),
  ``vmap`` it over keys, shard it; sweeping ``lam`` or the diffusion's norm, or swapping weights
  of the same shapes, reuses the compiled program;
* :func:`fk_steering`, the convenience entry point: host checks, the jitted run, then the
  host-side checks of the result (:func:`check_fk_result`).

Non-finite values (docs/policies.md). A NaN or ``+inf`` reward is invalid: its particle gets
zero weight (the engine drops its NaN-flagged potential) and it is counted in
``info.num_nan`` / ``info.num_inf``; unless ``nan_policy="drop"`` a run
that saw any is an error naming the reward and both counts. A ``-inf`` reward is valid and
rejects its particle. If every particle ends with zero weight the error says why: every
particle met a ``-inf`` reward (or a potential below the float32 range), or, under
``nan_policy="drop"``, invalid rewards were dropped; a potential of ``+inf`` (``lambda`` times a
reward overflowing, or ``lambda < 0`` meeting a ``-inf`` reward) is reported as an overflow.
``lambda``, the diffusion norm, the grid and the schedule's ESS threshold must be finite.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax import smc
from tts_jax.interpolants import Diffusion, sde_step
from tts_jax.models.base import FlowModel
from tts_jax.resampling import Resampler, get_resampler
from tts_jax.rewards.base import Reward
from tts_jax.samplers.base import Sampler, float32, run
from tts_jax.samplers.image.integrate import initial_noise, tweedie
from tts_jax.samplers.result import (
    Cost,
    Result,
    check_finite_hyperparameters,
    check_nan_policy,
    count_invalid,
    held_out_scores,
    make_info,
    mask_invalid_rewards,
    raise_for_invalid_rewards,
    reward_name,
    to_host,
)

Array = jax.Array
PyTree = Any

# --------------------------------------------------------------------------- potentials


class Potential(NamedTuple):
    """How the rewards seen so far make the cumulative log-potential ``Phi_k = sum_j log G_j``.

    Both functions are pure and work on ``[N]`` arrays; their state travels with the particles
    (and is resampled with them).

    Attributes:
        init: ``(num_particles) -> state``, a pytree of ``[N]`` arrays (``None`` if the
            potential needs none), before any reward.
        update: ``(state, log_potential [N], reward [N], lam) -> (state, log_potential [N])``:
            from ``Phi_k`` and the reward ``r_{k+1}`` of the new Tweedie estimates, the new
            state and ``Phi_{k+1}``. Called at every step that evaluates the reward, the last
            one included (whose ``Phi`` FK then replaces by the exact tilt ``lam * r(x0)``).

    Use module-level functions (a :class:`Potential` is part of the sampler's static
    configuration and is hashed by the identity of its functions).
    """

    init: Callable[[int], PyTree]
    update: Callable[[PyTree, Array, Array, Array], tuple[PyTree, Array]]


def _no_state(num_particles: int) -> None:
    return None


def _diff_update(state, phi, reward, lam):
    return state, lam * reward


def _max_init(num_particles: int) -> Array:
    return jnp.full((num_particles,), -jnp.inf, jnp.float32)  # the first reward seeds it


def _max_update(running, phi, reward, lam):
    running = jnp.maximum(running, reward)
    return running, phi + lam * running


def _sum_init(num_particles: int) -> Array:
    return jnp.zeros((num_particles,), jnp.float32)


def _sum_update(running, phi, reward, lam):
    running = running + reward
    return running, phi + lam * running


def _final_update(state, phi, reward, lam):
    return state, phi + lam * reward


class Potentials(NamedTuple):
    """The built-in potentials (:data:`potentials`)."""

    diff: Potential
    max: Potential
    sum: Potential
    final: Potential


potentials = Potentials(
    diff=Potential(_no_state, _diff_update),
    max=Potential(_max_init, _max_update),
    sum=Potential(_sum_init, _sum_update),
    final=Potential(_no_state, _final_update),
)
"""``diff``, ``max``, ``sum``, ``final`` (module docstring); their names are aliases."""

POTENTIALS = potentials._fields


def _potential(potential: str | Potential) -> Potential:
    if isinstance(potential, Potential):
        return potential
    if isinstance(potential, str) and potential in POTENTIALS:
        return getattr(potentials, potential)
    raise ValueError(
        f"fk_steering: unknown potential {potential!r}; known: {POTENTIALS}, or a Potential"
    )


# --------------------------------------------------------------------------- params


class Params(NamedTuple):
    """Everything array-valued FK steering needs: a pytree (jit argument, never static).

    Attributes:
        model: :class:`~tts_jax.models.base.FlowModel` (its weights are leaves).
        reward: :class:`~tts_jax.rewards.base.Reward` ``r(x0, cond) -> [N]``.
        grid: ``Float[K + 1]`` times from noise to data (``grid[-1]`` the data end 0).
        diffusion: :class:`~tts_jax.interpolants.Diffusion`, the SDE coefficient (use a
            stochastic one: with ``ode()`` resampled copies stay identical).
        lam: scalar inverse temperature (``0`` is independent sampling).
        schedule: :class:`~tts_jax.smc.ResampleSchedule` (``mask Bool[K]``, ``ess_threshold``).
        cond: condition passed unchanged to the model and the reward (shared by all particles),
            or ``None``.
    """

    model: FlowModel
    reward: Reward
    grid: Array
    diffusion: Diffusion
    lam: Array
    schedule: smc.ResampleSchedule
    cond: Any = None


_default_schedule = functools.lru_cache(smc.adaptive)


def make_params(
    model: FlowModel,
    reward: Reward,
    grid: Array,
    diffusion: Diffusion,
    lam: float | Array,
    schedule: smc.ResampleSchedule | None = None,
    cond: Any = None,
) -> Params:
    """:class:`Params` with ``grid`` and ``lam`` as float32 arrays and the default schedule
    filled in: adaptive, ``ESS < 0.5 N``, never after the last step (see
    :func:`tts_jax.smc.adaptive`). No checks (:func:`check_params`) and no device op for host
    values."""
    grid, lam = float32(grid), float32(lam)
    if schedule is None and grid.ndim == 1 and grid.shape[0] >= 2:
        schedule = _default_schedule(grid.shape[0] - 1)
    return Params(model, reward, grid, diffusion, lam, schedule, cond)


def check_params(params: Params, sampler: Sampler, method: str = "fk_steering") -> None:
    """Host-side checks of ``params`` for ``sampler``, before anything is traced.

    Shapes are always checked; values only when concrete (traced values are skipped, so this
    may run inside someone's ``jit``). It reads no device value it does not need (the finite
    checks read ``lam``, the grid, the diffusion's numbers and the ESS threshold).

    Raises:
        ValueError: naming ``method``: a grid that is not ``[K + 1]`` with ``K`` the sampler's
            ``num_steps``, a schedule of another length, a non-finite ``lam``, grid, diffusion
            norm or ESS threshold.
    """
    shape = np.shape(params.grid)
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(f"{method}: grid must be [K + 1] times with K >= 1, got shape {shape}")
    num_steps = shape[0] - 1
    if num_steps != sampler.num_steps:
        raise ValueError(
            f"{method}: the grid has {num_steps} steps but the sampler takes {sampler.num_steps}"
        )
    if params.schedule is None:
        raise ValueError(f"{method}: params.schedule is missing (see tts_jax.smc)")
    mask = np.shape(params.schedule.mask)
    if mask != (num_steps,):
        steps = mask[0] if mask else mask
        raise ValueError(f"{method}: schedule has {steps} steps but the grid has {num_steps}")
    norms = jax.tree_util.tree_leaves_with_path(getattr(params.diffusion, "norm", None))
    check_finite_hyperparameters(
        method,
        {
            "lam": params.lam,
            **{f"diffusion.norm{jax.tree_util.keystr(path)}": v for path, v in norms},
            "grid": params.grid,
            "schedule.ess_threshold": params.schedule.ess_threshold,
        },
    )


# --------------------------------------------------------------------------- the kernel


def _flag_nan(phi, invalid):
    """The log potential the SMC engine sees: NaN exactly where the reward was invalid (NaN or
    ``+inf``; the engine drops such particles and counts them in ``num_nan_potentials``), and
    ``-inf`` where a ``-inf`` reward made it undefined (``0 * -inf`` at ``lam = 0``): dropped,
    not counted."""
    return jnp.where(invalid, jnp.nan, jnp.where(jnp.isnan(phi), -jnp.inf, phi))


def _invalid_code(invalid):
    """``Int8[N]`` per-particle code of an ``invalid Bool[2, N]`` mask: 0 valid, 1 NaN, 2 +inf."""
    return invalid[0].astype(jnp.int8) + 2 * invalid[1].astype(jnp.int8)


def _observe(state):
    """Per-step diagnostics of the propagated particles: their best latest reward and the
    ``Int32[2]`` counts of this step's NaN and ``+inf`` rewards."""
    code = state["invalid"]
    return jnp.max(state["reward"]), count_invalid(jnp.stack([code == 1, code == 2]))


def _log_potential(state, k, params):
    return state["phi"]


def _check_log_potential(phi, n: int) -> None:
    """Trace-time check (shapes are static) of what a potential's ``update`` returned."""
    if np.shape(phi) != (n,):
        raise ValueError(
            f"fk_steering: the potential's update must return a log-potential of shape [N] = "
            f"({n},), one entry per particle; got shape {np.shape(phi)}"
        )


def _propagators(num_particles: int, potential: Potential):
    """The SMC proposals of FK steering: ``(propagate, propagate_last)``, both
    ``(key, state, k, params) -> (state, log_correction [N])``."""

    def move(key, state, k, params):
        grid = jnp.asarray(params.grid)
        t, t_next = grid[k], grid[k + 1]
        interp = params.model.interpolant
        g = params.diffusion(jnp.broadcast_to(t, state["x"].shape[:1]), interp)
        return sde_step(key, interp, state["u"], state["x"], t, t_next, g), t_next

    def updated(state, x, u, phi, running, r, code):
        new = {"x": x, "u": u, "phi": phi, "reward": r, "invalid": code, "running": running}
        return new, jnp.zeros(x.shape[:1], x.dtype)

    def propagate(key, state, k, params):
        """Steps ``k < K - 1``: the velocity at the new state serves its Tweedie estimate now and
        the next SDE step later."""
        x, t_next = move(key, state, k, params)
        model, reward, lam, cond = params.model, params.reward, params.lam, params.cond
        u = model.velocity(x, t_next, cond)

        def evaluate(_):
            r, invalid = mask_invalid_rewards(reward(tweedie(model, x, t_next, u), cond))
            running, phi = potential.update(state["running"], state["phi"], r, lam)
            _check_log_potential(phi, num_particles)
            return _flag_nan(phi, invalid[0] | invalid[1]), running, r, _invalid_code(invalid)

        def skip(_):  # an invalid reward is reported at its own step only
            phi = _flag_nan(state["phi"], False)
            return phi, state["running"], state["reward"], jnp.zeros_like(state["invalid"])

        evaluated = jnp.asarray(params.schedule.mask)[k]
        return updated(state, x, u, *jax.lax.cond(evaluated, evaluate, skip, None))

    def propagate_last(key, state, k, params):
        """The last step needs no velocity: its Tweedie estimate is the state itself (0 NFE).
        The final potential is exactly ``lambda * r(x0)``, dividing out every earlier factor."""
        x, _ = move(key, state, k, params)
        lam = params.lam
        r, invalid = mask_invalid_rewards(params.reward(x, params.cond))
        running, _ = potential.update(state["running"], state["phi"], r, lam)
        phi = _flag_nan(lam * r, invalid[0] | invalid[1])
        return updated(state, x, jnp.zeros_like(x), phi, running, r, _invalid_code(invalid))

    return propagate, propagate_last


def sampler(
    num_particles: int,
    num_steps: int,
    potential: str | Potential = "max",
    resampler: str | Resampler = "multinomial",
) -> Sampler:
    """FK steering (Singhal et al. 2025) as a :class:`~tts_jax.samplers.base.Sampler`.

    Only static configuration: equal arguments give the same sampler (memoized), so
    ``jax.jit(tts_jax.samplers.run, static_argnames="sampler")`` compiles once per
    configuration; the numbers (``lam``, grid, schedule, diffusion norm) and the model and reward
    travel in :class:`Params`.

    Args:
        num_particles: ``N >= 1``.
        num_steps: ``K >= 1`` SDE steps (the grid in the params has ``K + 1`` times).
        potential: a :class:`Potential` (e.g. ``potentials.max`` or your own) or its name.
        resampler: any ``(key, log_weights [N], num) -> Int32[num]`` function (e.g.
            :func:`tts_jax.resampling.systematic` or your own) or its name in
            :mod:`tts_jax.resampling`.

    Returns:
        A :class:`~tts_jax.samplers.base.Sampler` whose state is a
        :class:`~tts_jax.smc.SMCState` over particles ``{"x" [N, ...], "u" [N, ...] (the cached
        velocity), "phi" [N], "reward" [N], "invalid" Int8[N], "running" (the potential's
        state)}``, whose ``info`` is a :class:`~tts_jax.smc.SMCInfo` (``observed``: the step's
        best reward and invalid-reward counts) and whose result is the
        :class:`~tts_jax.samplers.result.Result` of :func:`fk_steering`. Steps take
        ``keys_per_step = 2`` keys (proposal, resampler); the last step is its own function
        (no velocity at the data end).

    Raises:
        ValueError: ``num_particles`` or ``num_steps`` below 1, an unknown potential or
            resampler name.
    """
    if not isinstance(num_particles, int | np.integer) or num_particles < 1:
        raise ValueError(f"fk_steering: num_particles must be >= 1, got {num_particles}")
    if not isinstance(num_steps, int | np.integer) or num_steps < 1:
        raise ValueError(f"fk_steering: num_steps must be >= 1, got {num_steps}")
    if not (isinstance(resampler, str) or callable(resampler)):
        raise ValueError(f"fk_steering: resampler must be a name or a function, got {resampler}")
    resample = get_resampler(resampler)
    return _sampler(int(num_particles), int(num_steps), _potential(potential), resample)


@functools.cache
def _sampler(n: int, num_steps: int, potential: Potential, resampler: Resampler) -> Sampler:
    propagate, propagate_last = _propagators(n, potential)

    def init(key, params):
        model = params.model
        x = initial_noise(key, model, n)
        u = model.velocity(x, jnp.asarray(params.grid)[0], params.cond)
        state = {
            "x": x,
            "u": u,
            "phi": jnp.zeros((n,), jnp.float32),
            "reward": jnp.full((n,), -jnp.inf, jnp.float32),
            "invalid": jnp.zeros((n,), jnp.int8),
            "running": potential.init(n),
        }
        return smc.init(state, _log_potential, params)

    def step(keys, state, params):
        return smc.step(
            keys, state, propagate, _log_potential, params.schedule, params, resampler, _observe
        )

    def last_step(keys, state, params):
        return smc.step(
            keys,
            state,
            propagate_last,
            _log_potential,
            params.schedule,
            params,
            resampler,
            _observe,
        )

    def finalize(state, infos, params):
        final = state.particles.state
        best_reward, invalid = infos.observed  # [K], [K, 2]
        evaluated = jnp.asarray(params.schedule.mask).at[num_steps - 1].set(True)
        info = make_info(
            n,
            num_nan=jnp.sum(invalid[:, 0]),  # each invalid reward counted once
            num_inf=jnp.sum(invalid[:, 1]),
            steps=infos,
            extra={
                "best_reward": best_reward,
                "log_evidence_increment": infos.log_evidence_increment,
                "num_nan_potentials": infos.num_nan_potentials,
                "all_dead": infos.all_dead,
            },
        )
        return Result(
            samples=final["x"],
            rewards=final["reward"],
            log_weights=state.particles.log_weights,
            best=jnp.argmax(final["reward"]),
            log_evidence=state.log_evidence,
            all_dead=~jnp.isfinite(state.log_evidence),
            cost=Cost(
                jnp.int32(num_steps * n), jnp.sum(evaluated).astype(jnp.int32) * n, jnp.int32(0)
            ),
            info=info,
        )

    return Sampler(init, step, finalize, num_steps, last_step=last_step, keys_per_step=2)


_run = jax.jit(run, static_argnames="sampler")


def fk_steering(
    key: Array,
    model: FlowModel,
    reward: Reward,
    num_particles: int,
    grid: Array,
    diffusion: Diffusion,
    lam: float | Array,
    schedule: smc.ResampleSchedule | None = None,
    potential: str | Potential = "max",
    resampler: str | Resampler = "multinomial",
    cond: Any = None,
    held_out: dict[str, Reward] | None = None,
    nan_policy: str = "raise",
) -> Result:
    """Run FK steering: the convenience entry point.

    :func:`check_params` on the host, the jitted kernel (:func:`sampler` run by
    :func:`tts_jax.samplers.run`), then :func:`check_fk_result` on the host. To jit, ``vmap``
    or shard the whole run yourself, use the kernel directly (module docstring).

    Args:
        key: PRNG key.
        model: :class:`~tts_jax.models.base.FlowModel`.
        reward: :class:`~tts_jax.rewards.base.Reward` ``r(x0, cond) -> [N]``.
        num_particles: N (static).
        grid: ``[K + 1]`` times from noise to data (``grid[-1]`` must be the data end 0).
        diffusion: SDE coefficient (use a stochastic one; ``ode()`` gives identical copies), a
            built-in kind or your own function (:class:`~tts_jax.interpolants.Diffusion`).
        lam: inverse temperature, finite (array: sweeping it does not recompile). ``lam = 0``
            is independent sampling.
        schedule: when to resample (default: adaptive, ESS < 0.5 N, never after the last step).
        potential: a :class:`Potential` or its name in :data:`potentials`: ``diff`` | ``max`` |
            ``sum`` | ``final``.
        resampler: any ``(key, log_weights [N], num) -> Int32[num]`` function or its name in
            :mod:`tts_jax.resampling`.
        held_out: ``name -> Reward`` evaluated on the final particles only
            (``info.held_out``), never used for weighting.
        nan_policy: ``raise`` (a NaN or ``+inf`` reward is an error after the run) or ``drop``
            (such a reward gives its particle zero weight).

    Returns:
        :class:`Result`: weighted particles targeting ``p(x0) exp(lam r(x0)) / Z``,
        ``log_evidence`` estimating ``log E_p[exp(lam r(x0))]``, per-step SMC diagnostics
        (:class:`~tts_jax.smc.SMCInfo`: ``ess``, ``resampled``, ``ancestors``,
        ``unique_ancestors``, ``num_nan_potentials`` (the invalid rewards of each step), ...)
        and ``best_reward [K]``: after each step, the best of the particles' latest rewards (on
        the Tweedie estimate before the last step, whose reward is the samples'; at steps
        without a reward call, the previous call's rewards of the current particles);
        ``info.num_nan`` and ``info.num_inf`` (NaN and ``+inf`` reward evaluations).

    Raises:
        ValueError: bad arguments (non-finite ``lam``, diffusion norm, grid or ESS threshold
            included, before anything is traced); unless ``nan_policy="drop"``, a NaN or ``+inf``
            reward; every particle with zero weight at the end (see :func:`check_fk_result`).
    """
    check_nan_policy("fk_steering", nan_policy)
    result = fk_steering_unchecked(
        "fk_steering",
        key,
        model,
        reward,
        num_particles,
        grid,
        diffusion,
        lam,
        schedule,
        potential,
        resampler,
        cond,
        held_out,
    )
    return check_fk_result(result, "fk_steering", reward, nan_policy)


def fk_steering_unchecked(
    method: str,
    key: Array,
    model: FlowModel,
    reward: Reward,
    num_particles: int,
    grid: Array,
    diffusion: Diffusion,
    lam: float | Array,
    schedule: smc.ResampleSchedule | None = None,
    potential: str | Potential = "max",
    resampler: str | Resampler = "multinomial",
    cond: Any = None,
    held_out: Any = None,
) -> Result:
    """:func:`fk_steering` without the host-side checks of the finished run, for samplers built
    on it (``method`` names them in the argument errors); finish with :func:`check_fk_result`.

    :func:`make_params`, :func:`sampler` and :func:`check_params` (host-side, before tracing),
    then the jitted :func:`~tts_jax.samplers.base.run` and the held-out rewards.
    ``held_out`` may be a dict ``name -> Reward`` or a sequence of rewards.
    """
    params = make_params(model, reward, grid, diffusion, lam, schedule, cond)
    shape = np.shape(params.grid)
    if len(shape) != 1 or shape[0] < 2:
        raise ValueError(f"{method}: grid must be [K + 1] times with K >= 1, got shape {shape}")
    fk_sampler = sampler(num_particles, shape[0] - 1, potential, resampler)
    check_params(params, fk_sampler, method)
    result = _run(key, fk_sampler, params)
    if held_out:
        scores = held_out_scores(held_out, result.samples, cond)
        result = result._replace(info=result.info._replace(held_out=scores))
    return result


def check_fk_result(result: Result, method: str, reward: Reward, nan_policy: str) -> Result:
    """Host-side checks of a finished FK run (no eager device op: host reads of its arrays).

    1. NaN and ``+inf`` rewards: an error unless ``nan_policy="drop"``
       (:func:`~tts_jax.samplers.result.check_finite_rewards`).
    2. A non-finite ``log_evidence``, whatever the policy, with a message that says which:
       ``-inf`` means every particle has zero weight (each met a ``-inf`` reward, or had an
       invalid reward dropped under ``nan_policy="drop"``); ``+inf`` or NaN means a log-potential
       reached ``+inf`` (``lam`` times a reward overflowed, or ``lam < 0`` met a ``-inf`` reward).

    Returns:
        ``result`` unchanged.

    Raises:
        ValueError: as above, naming ``method``, the reward and the first step concerned.
    """
    nan, inf, log_z = to_host(result.info.num_nan, result.info.num_inf, result.log_evidence)
    nan, inf, log_z = int(nan), int(inf), float(log_z)
    if nan_policy != "drop":
        raise_for_invalid_rewards(method, reward, nan, inf)
    if np.isfinite(log_z):
        return result
    dead = np.flatnonzero(np.asarray(result.info.extra["all_dead"]))
    num_steps = np.asarray(result.info.extra["all_dead"]).shape[0]
    when = f" at step {dead[0] + 1} of {num_steps}" if dead.size else ""
    name = reward_name(reward)
    if not np.isneginf(log_z):
        raise ValueError(
            f"{method}: the particle weights overflowed{when}: a log-potential lam * reward "
            f"(reward {name!r}) reached +inf, from a huge reward or lam, or from lam < 0 and a "
            "-inf reward"
        )
    if nan or inf:
        counts = (("NaN", nan), ("+inf", inf))
        returned = " and ".join(f"{kind} in {n} evaluations" for kind, n in counts if n)
        raise ValueError(
            f"{method}: every particle has zero weight{when}: each met a -inf reward or an "
            f"invalid one dropped under nan_policy='drop' (reward {name!r} returned {returned})"
        )
    raise ValueError(
        f"{method}: every particle has zero weight{when}: reward {name!r} was -inf for each "
        "of them (a -inf reward rejects its particle) or lam * reward fell below the float32 "
        "range"
    )
