"""Feynman-Kac steering of a diffusion / flow model (Singhal et al. 2025, ALGORITHMS.md section 2).

SMC over denoising steps with a stochastic sampler (the SDE of ALGORITHMS.md 0.2; with the ODE,
resampled copies stay identical forever, which is allowed but pointless). The intermediate reward
``r_k`` is the reward of the Tweedie estimate ``x0_hat(x_k)``. Potentials, with ``lambda`` the
inverse temperature, as per-step factors ``G_k``:

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
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax import smc
from tts_jax.interpolants import Diffusion, sde_step
from tts_jax.models.base import FlowModel
from tts_jax.rewards.base import Reward
from tts_jax.samplers.integrate import initial_noise, tweedie
from tts_jax.samplers.result import (
    SampleResult,
    check_finite_rewards,
    held_out_scores,
    nan_to_neg_inf,
)

Array = jax.Array
POTENTIALS = ("diff", "max", "sum", "final")


def _next_log_potential(kind: str, phi, running, reward, lam):
    """Cumulative log potential ``Phi_{k+1} = Phi_k + log G_{k+1}`` and the running statistic
    (``None`` for ``diff`` and ``final``, which need none)."""
    if kind == "diff":
        return lam * reward, None
    if kind == "max":
        running = jnp.maximum(running, reward)  # starts at -inf: the first reward seeds it
        return phi + lam * running, running
    if kind == "sum":
        running = running + reward
        return phi + lam * running, running
    return phi + lam * reward, None  # final / rt


def _flag_nan(phi, nan):
    """The log potential the SMC engine sees: NaN exactly where the reward was NaN (the engine
    drops such particles and counts them in ``num_nan_potentials``), and ``-inf`` where a
    ``-inf`` reward made it undefined (``0 * -inf`` at ``lam = 0``): dropped, not counted."""
    return jnp.where(nan, jnp.nan, jnp.where(jnp.isnan(phi), -jnp.inf, phi))


def _make_callbacks(model: FlowModel, reward: Reward, grid, diffusion, kind, eval_mask, cond):
    def move(key, state, k):
        t, t_next = grid[k], grid[k + 1]
        g = diffusion(jnp.broadcast_to(t, state["x"].shape[:1]), model.interpolant)
        return sde_step(key, model.interpolant, state["u"], state["x"], t, t_next, g), t_next

    def updated(state, x, u, phi, running, r):
        new = {"x": x, "u": u, "phi": phi, "reward": r}
        if running is not None:
            new["running"] = running
        return new, jnp.zeros(x.shape[:1], x.dtype)

    def propagate(key, state, k, lam):
        """Steps ``k < K - 1``: the velocity at the new state serves its Tweedie estimate now and
        the next SDE step later."""
        x, t_next = move(key, state, k)
        u = model.velocity(x, t_next, cond)

        def evaluate(_):
            r, nan = nan_to_neg_inf(reward(tweedie(model, x, t_next, u), cond))
            phi, running = _next_log_potential(kind, state["phi"], state.get("running"), r, lam)
            return _flag_nan(phi, nan), running, r

        def skip(_):  # a NaN flag is reported at its own step only
            return _flag_nan(state["phi"], False), state.get("running"), state["reward"]

        return updated(state, x, u, *jax.lax.cond(eval_mask[k], evaluate, skip, None))

    def propagate_last(key, state, k, lam):
        """The last step needs no velocity: its Tweedie estimate is the state itself (0 NFE).
        The final potential is exactly ``lambda * r(x0)``, dividing out every earlier factor."""
        x, _ = move(key, state, k)
        r, nan = nan_to_neg_inf(reward(x, cond))
        _, running = _next_log_potential(kind, state["phi"], state.get("running"), r, lam)
        return updated(state, x, jnp.zeros_like(x), _flag_nan(lam * r, nan), running, r)

    def log_potential(state, k, lam):
        return state["phi"]

    return propagate, propagate_last, log_potential


@functools.partial(jax.jit, static_argnames=("num_particles", "potential", "resampler"))
def _fk_steering(
    key, model, reward, grid, diffusion, lam, schedule, cond, num_particles, potential, resampler
):
    k_init, k_run = jax.random.split(key)
    x = initial_noise(k_init, model, num_particles)
    u = model.velocity(x, grid[0], cond)
    n = num_particles
    state = {
        "x": x,
        "u": u,
        "phi": jnp.zeros((n,), jnp.float32),
        "reward": jnp.full((n,), -jnp.inf, jnp.float32),
    }
    if potential in ("max", "sum"):
        state["running"] = jnp.full((n,), -jnp.inf if potential == "max" else 0.0, jnp.float32)
    num_steps = grid.shape[0] - 1
    eval_mask = schedule.mask.at[num_steps - 1].set(True)
    propagate, propagate_last, log_potential = _make_callbacks(
        model, reward, grid, diffusion, potential, eval_mask, cond
    )
    out = smc.run_scan(
        k_run,
        state,
        propagate,
        log_potential,
        schedule,
        lam,
        resampler,
        propagate_last,
        observe=lambda state: jnp.max(state["reward"]),
    )
    final = out.particles.state
    info = out.info._asdict()
    info["best_reward"] = info.pop("observed")
    info["num_nan_rewards"] = jnp.sum(out.info.num_nan_potentials)  # NaN rewards, once each
    return SampleResult(
        samples=final["x"],
        rewards=final["reward"],
        log_weights=out.particles.log_weights,
        best=jnp.argmax(final["reward"]),
        nfe=jnp.int32(num_steps * n),
        reward_calls=jnp.sum(eval_mask).astype(jnp.int32) * n,
        log_evidence=out.log_evidence,
        info=info,
    )


_default_schedule = functools.lru_cache(smc.adaptive)


def fk_steering(
    key: Array,
    model: FlowModel,
    reward: Reward,
    num_particles: int,
    grid: Array,
    diffusion: Diffusion,
    lam: float | Array,
    schedule: smc.ResampleSchedule | None = None,
    potential: str = "max",
    resampler: str = "multinomial",
    cond: Any = None,
    held_out: dict[str, Reward] | None = None,
    nan_policy: str = "raise",
) -> SampleResult:
    """Run FK steering.

    Args:
        key: PRNG key.
        model: :class:`~tts_jax.models.base.FlowModel`.
        reward: :class:`~tts_jax.rewards.base.Reward` ``r(x0, cond) -> [N]``.
        num_particles: N (static).
        grid: ``[K + 1]`` times from noise to data (``grid[-1]`` must be the data end 0).
        diffusion: SDE coefficient (use a stochastic one; ``ode()`` gives identical copies).
        lam: inverse temperature (array: sweeping it does not recompile). ``lam = 0`` is
            independent sampling.
        schedule: when to resample (default: adaptive, ESS < 0.5 N, never after the last step).
        potential: ``diff`` | ``max`` | ``sum`` | ``final``.
        resampler: see :mod:`tts_jax.resampling`.
        held_out: ``name -> Reward`` evaluated on the final particles only
            (``info["held_out"]``), never used for weighting.
        nan_policy: ``raise`` or ``drop`` (a NaN reward gives its particle zero weight).

    Returns:
        :class:`SampleResult`: weighted particles targeting ``p(x0) exp(lam r(x0)) / Z``,
        ``log_evidence`` estimating ``log E_p[exp(lam r(x0))]``, per-step SMC diagnostics
        (:class:`~tts_jax.smc.SMCInfo`: ``ess``, ``resampled``, ``ancestors``,
        ``unique_ancestors``, ...) and ``best_reward [K]``: after each step, the best of the
        particles' latest rewards (on the Tweedie estimate before the last step, whose reward is
        the samples'; at steps without a reward call, the previous call's rewards of the current
        particles), ``num_nan_rewards``.
    """
    if potential not in POTENTIALS:
        raise ValueError(f"unknown potential {potential!r}; known: {POTENTIALS}")
    if num_particles < 1:
        raise ValueError(f"num_particles must be >= 1, got {num_particles}")
    grid = np.asarray(grid, np.float32)  # host-side: no eager device op per call
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(f"grid must be [K + 1] times with K >= 1, got shape {grid.shape}")
    num_steps = grid.shape[0] - 1
    schedule = _default_schedule(num_steps) if schedule is None else schedule
    if schedule.mask.shape != (num_steps,):
        raise ValueError(
            f"schedule has {schedule.mask.shape[0]} steps but the grid has {num_steps}"
        )
    result = _fk_steering(
        key,
        model,
        reward,
        grid,
        diffusion,
        np.asarray(lam, np.float32),
        schedule,
        cond,
        num_particles,
        potential,
        resampler,
    )
    if held_out:
        info = dict(result.info, held_out=held_out_scores(held_out, result.samples, cond))
        result = result._replace(info=info)
    # Host reads of the finished arrays: no eager device op per call (benchmarks/fk_overhead.py).
    if np.asarray(result.info["all_dead"])[-1]:
        raise ValueError("fk_steering: every particle has zero weight (all rewards -inf or NaN)")
    return result if nan_policy == "drop" else check_finite_rewards(result, "fk_steering")
