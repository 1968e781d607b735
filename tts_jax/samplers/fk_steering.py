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

Non-finite values (docs/policies.md). A NaN or ``+inf`` reward is invalid: its particle gets
zero weight (the engine drops its NaN-flagged potential) and it is counted in
``info["num_nan_rewards"]`` / ``info["num_inf_rewards"]``; unless ``nan_policy="drop"`` a run
that saw any is an error naming the reward and both counts. A ``-inf`` reward is valid and
rejects its particle. If every particle ends with zero weight the error says why: every
particle met a ``-inf`` reward (or a potential below the float32 range), or, under
``nan_policy="drop"``, invalid rewards were dropped; a potential of ``+inf`` (``lambda`` times a
reward overflowing, or ``lambda < 0`` meeting a ``-inf`` reward) is reported as an overflow.
``lambda``, the diffusion norm, the grid and the schedule's ESS threshold must be finite.
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
    check_finite_hyperparameters,
    check_finite_rewards,
    check_nan_policy,
    count_invalid,
    held_out_scores,
    mask_invalid_rewards,
    reward_name,
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


def _make_callbacks(model: FlowModel, reward: Reward, grid, diffusion, kind, eval_mask, cond):
    def move(key, state, k):
        t, t_next = grid[k], grid[k + 1]
        g = diffusion(jnp.broadcast_to(t, state["x"].shape[:1]), model.interpolant)
        return sde_step(key, model.interpolant, state["u"], state["x"], t, t_next, g), t_next

    def updated(state, x, u, phi, running, r, code):
        new = {"x": x, "u": u, "phi": phi, "reward": r, "invalid": code}
        if running is not None:
            new["running"] = running
        return new, jnp.zeros(x.shape[:1], x.dtype)

    def propagate(key, state, k, lam):
        """Steps ``k < K - 1``: the velocity at the new state serves its Tweedie estimate now and
        the next SDE step later."""
        x, t_next = move(key, state, k)
        u = model.velocity(x, t_next, cond)

        def evaluate(_):
            r, invalid = mask_invalid_rewards(reward(tweedie(model, x, t_next, u), cond))
            phi, running = _next_log_potential(kind, state["phi"], state.get("running"), r, lam)
            return _flag_nan(phi, invalid[0] | invalid[1]), running, r, _invalid_code(invalid)

        def skip(_):  # an invalid reward is reported at its own step only
            phi = _flag_nan(state["phi"], False)
            return phi, state.get("running"), state["reward"], jnp.zeros_like(state["invalid"])

        return updated(state, x, u, *jax.lax.cond(eval_mask[k], evaluate, skip, None))

    def propagate_last(key, state, k, lam):
        """The last step needs no velocity: its Tweedie estimate is the state itself (0 NFE).
        The final potential is exactly ``lambda * r(x0)``, dividing out every earlier factor."""
        x, _ = move(key, state, k)
        r, invalid = mask_invalid_rewards(reward(x, cond))
        _, running = _next_log_potential(kind, state["phi"], state.get("running"), r, lam)
        phi = _flag_nan(lam * r, invalid[0] | invalid[1])
        return updated(state, x, jnp.zeros_like(x), phi, running, r, _invalid_code(invalid))

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
        "invalid": jnp.zeros((n,), jnp.int8),
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
        observe=_observe,
    )
    final = out.particles.state
    info = out.info._asdict()
    info["best_reward"], invalid = info.pop("observed")  # [K], [K, 2]
    info["num_nan_rewards"] = jnp.sum(invalid[:, 0])  # each invalid reward counted once
    info["num_inf_rewards"] = jnp.sum(invalid[:, 1])
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
        lam: inverse temperature, finite (array: sweeping it does not recompile). ``lam = 0``
            is independent sampling.
        schedule: when to resample (default: adaptive, ESS < 0.5 N, never after the last step).
        potential: ``diff`` | ``max`` | ``sum`` | ``final``.
        resampler: see :mod:`tts_jax.resampling`.
        held_out: ``name -> Reward`` evaluated on the final particles only
            (``info["held_out"]``), never used for weighting.
        nan_policy: ``raise`` (a NaN or ``+inf`` reward is an error after the run) or ``drop``
            (such a reward gives its particle zero weight).

    Returns:
        :class:`SampleResult`: weighted particles targeting ``p(x0) exp(lam r(x0)) / Z``,
        ``log_evidence`` estimating ``log E_p[exp(lam r(x0))]``, per-step SMC diagnostics
        (:class:`~tts_jax.smc.SMCInfo`: ``ess``, ``resampled``, ``ancestors``,
        ``unique_ancestors``, ``num_nan_potentials`` (the invalid rewards of each step), ...)
        and ``best_reward [K]``: after each step, the best of the particles' latest rewards (on
        the Tweedie estimate before the last step, whose reward is the samples'; at steps
        without a reward call, the previous call's rewards of the current particles);
        ``num_nan_rewards`` and ``num_inf_rewards`` (NaN and ``+inf`` reward evaluations).

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
    potential: str = "max",
    resampler: str = "multinomial",
    cond: Any = None,
    held_out: Any = None,
) -> SampleResult:
    """:func:`fk_steering` without the host-side checks of the finished run, for samplers built
    on it (``method`` names them in the argument errors); finish with :func:`check_fk_result`.

    The arguments are validated host-side, before tracing, as in :func:`fk_steering`.
    ``held_out`` may be a dict ``name -> Reward`` or a sequence of rewards.
    """
    if potential not in POTENTIALS:
        raise ValueError(f"{method}: unknown potential {potential!r}; known: {POTENTIALS}")
    if num_particles < 1:
        raise ValueError(f"{method}: num_particles must be >= 1, got {num_particles}")
    grid = np.asarray(grid, np.float32)  # host-side: no eager device op per call
    if grid.ndim != 1 or grid.shape[0] < 2:
        raise ValueError(
            f"{method}: grid must be [K + 1] times with K >= 1, got shape {grid.shape}"
        )
    num_steps = grid.shape[0] - 1
    schedule = _default_schedule(num_steps) if schedule is None else schedule
    if schedule.mask.shape != (num_steps,):
        raise ValueError(
            f"{method}: schedule has {schedule.mask.shape[0]} steps but the grid has {num_steps}"
        )
    lam = np.asarray(lam, np.float32)
    check_finite_hyperparameters(
        method,
        {
            "lam": lam,
            "diffusion.norm": getattr(diffusion, "norm", None),
            "grid": grid,
            "schedule.ess_threshold": schedule.ess_threshold,
        },
    )
    result = _fk_steering(
        key,
        model,
        reward,
        grid,
        diffusion,
        lam,
        schedule,
        cond,
        num_particles,
        potential,
        resampler,
    )
    if held_out:
        info = dict(result.info, held_out=held_out_scores(held_out, result.samples, cond))
        result = result._replace(info=info)
    return result


def check_fk_result(
    result: SampleResult, method: str, reward: Reward, nan_policy: str
) -> SampleResult:
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
    result = check_finite_rewards(result, method, reward, nan_policy)
    log_z = float(np.asarray(result.log_evidence))
    if np.isfinite(log_z):
        return result
    dead = np.flatnonzero(np.asarray(result.info["all_dead"]))
    num_steps = np.asarray(result.info["all_dead"]).shape[0]
    when = f" at step {dead[0] + 1} of {num_steps}" if dead.size else ""
    name = reward_name(reward)
    if not np.isneginf(log_z):
        raise ValueError(
            f"{method}: the particle weights overflowed{when}: a log-potential lam * reward "
            f"(reward {name!r}) reached +inf, from a huge reward or lam, or from lam < 0 and a "
            "-inf reward"
        )
    nan = int(np.asarray(result.info["num_nan_rewards"]))
    inf = int(np.asarray(result.info["num_inf_rewards"]))
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
