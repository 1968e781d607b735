"""Diffusion latent beam search with a lookahead estimator (Oshima et al. 2025,
docs/algorithms.md 6.4).

Oshima, Omura, Iwasawa, Suzuki, Matsuo, Furuta 2025, "Inference-time Text-to-Video Alignment with
Diffusion Latent Beam Search". A search: no target distribution, no weights.

``B`` beams start as independent noises. At each step ``t_i -> t_{i+1}`` of the grid:

1. every beam's velocity at ``(x_b, t_i)`` gives the mean ``mu_b`` and standard deviation
   ``std_i`` of its SDE step (docs/algorithms.md 0.2; the ``diffusion`` value sets the noise, as
   DDIM's ``eta`` does in the paper): ``B`` NFE;
2. each beam proposes ``K`` candidates ``x' = mu_b + std_i z``;
3. lookahead: each candidate is solved by ``T' - 1`` Euler ODE steps on ``tau_j = t_{i+1} j / T'``
   from ``tau_{T'} = t_{i+1}`` down to ``tau_1``, and scored on the Tweedie estimate at ``tau_1``
   (``T' = 1``: the Tweedie estimate at ``t_{i+1}``): ``B K T'`` NFE, ``B K`` reward calls;
4. the ``B K`` candidates are pooled and the ``B`` best kept (siblings may all survive).

At the last step (``t_{i+1} = 0``) the candidates are samples and are scored as they are (no
lookahead). The result holds the ``B`` final beams, best first.

Cost (exact): ``S B + (S - 1) B K T'`` NFE and ``S B K`` reward calls for ``S`` steps
(:func:`cost`); the paper's ``S B (1 + K T')`` counts a lookahead at the last step too.
``B = K = 1`` is plain SDE sampling scored once per step.

Two ways to call it (:mod:`tts_jax.samplers.base`): :func:`sampler` + :func:`make_params` +
:func:`check_params` + :func:`tts_jax.samplers.run`, or :func:`dlbs`. Invalid scores (NaN,
``+inf``) are never kept while a finite one exists and are an error after the run unless
``nan_policy="drop"`` (:mod:`tts_jax.samplers.image.scaffold`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax.interpolants import Diffusion, euler_step, sde_step_mean_std
from tts_jax.models.base import FlowModel
from tts_jax.rewards.base import Reward
from tts_jax.samplers.base import Sampler, float32, run
from tts_jax.samplers.image.integrate import initial_noise, tweedie
from tts_jax.samplers.image.scaffold import (
    check_finite_hyperparameters,
    check_grid,
    check_nan_policy,
    check_shared_cond,
    finish,
    held_out_dict,
    score,
    search_result,
)
from tts_jax.samplers.image.selection import keep_top
from tts_jax.samplers.result import Result, count_invalid

Array = jax.Array
METHOD = "dlbs"


class Params(NamedTuple):
    """Everything array-valued DLBS needs (a jit argument, never static).

    Attributes:
        model: :class:`~tts_jax.models.base.FlowModel`.
        reward: the verifier, ``x [C, ...] -> [C]`` (higher is better).
        grid: ``Float[S + 1]`` times from noise to the data end 0.
        diffusion: :class:`~tts_jax.interpolants.Diffusion` of the beams' steps (use a
            stochastic one: with the ODE every candidate of a beam is the same).
        cond: shared condition (leaves ``[1, ...]``) or ``None``.
        held_out: ``{name: Reward}`` evaluated on the final beams only.
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
    cond: Any = None,
    held_out: dict[str, Reward] | Sequence[Reward] | None = None,
) -> Params:
    """:class:`Params` with the grid as float32 and ``held_out`` as a dict (no checks)."""
    return Params(model, reward, float32(grid), diffusion, cond, held_out_dict(METHOD, held_out))


class Plan(NamedTuple):
    """The static sizes of a DLBS run: ``B`` beams, ``K`` candidates, ``T'`` lookahead steps,
    ``S`` grid steps."""

    num_beams: int
    num_candidates: int
    lookahead: int
    num_steps: int


def cost(plan: Plan) -> tuple[int, int]:
    """``(NFE, reward calls)`` of a run: ``(S B + (S - 1) B K T', S B K)``."""
    b, k, la, s = plan
    return s * b + (s - 1) * b * k * la, s * b * k


_PLANS: dict[Sampler, Plan] = {}


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{METHOD}: {name} must be an int >= 1, got {value!r}")
    return int(value)


def sampler(num_beams: int, num_candidates: int, lookahead: int, num_steps: int) -> Sampler:
    """DLBS (docs/algorithms.md 6.4) as a :class:`~tts_jax.samplers.base.Sampler` with one step per
    grid step (memoized: equal sizes give the same sampler).

    Args:
        num_beams: ``B >= 1``.
        num_candidates: ``K >= 1`` candidates per beam.
        lookahead: ``T' >= 1`` ODE steps (NFE) of the lookahead estimate.
        num_steps: ``S >= 1`` grid steps.

    Returns:
        A sampler over ``{"x" [B, ...], "scores" [B], "invalid" Int32[2], "step" int32}``
        whose per-step info is the best kept score and whose result is that of :func:`dlbs`.
    """
    plan = Plan(
        _check_size("num_beams", num_beams),
        _check_size("num_candidates", num_candidates),
        _check_size("lookahead", lookahead),
        _check_size("num_steps", num_steps),
    )
    built = _sampler(plan)
    _PLANS[built] = plan
    return built


def check_params(params: Params, sampler: Sampler) -> None:
    """Host-side checks before tracing.

    Raises:
        ValueError: naming the method: a sampler not built by :func:`sampler`, a grid that is
            not ``[S + 1]`` for the sampler's ``S`` or does not decrease strictly to 0, a
            non-finite diffusion norm, ``cond`` leaves without a leading axis of size 1, a
            held-out entry that is not a Reward.
    """
    plan = _PLANS.get(sampler)
    if plan is None:
        raise ValueError(f"{METHOD}: the sampler was not built by dlbs.sampler")
    num_steps = check_grid(METHOD, params.grid, data_end=True)
    if num_steps != plan.num_steps:
        raise ValueError(
            f"{METHOD}: the grid has {num_steps} steps but the sampler takes {plan.num_steps}"
        )
    norms = jax.tree_util.tree_leaves_with_path(getattr(params.diffusion, "norm", None))
    check_finite_hyperparameters(
        METHOD, {f"diffusion.norm{jax.tree_util.keystr(p)}": v for p, v in norms}
    )
    check_shared_cond(METHOD, params.cond)
    held_out_dict(METHOD, params.held_out)


def _candidates(key, params: Params, x: Array, t: Array, t_next: Array, k: int) -> Array:
    """``K`` SDE-step candidates per beam, beam-major ``[B K, ...]`` (``B`` NFE)."""
    model, interp = params.model, params.model.interpolant
    times = jnp.broadcast_to(t, x.shape[:1])
    u = model.velocity(x, times, params.cond)
    g = params.diffusion(times, interp)
    mean, std = sde_step_mean_std(interp, u, x, times, jnp.broadcast_to(t_next, times.shape), g)
    z = jax.random.normal(key, (x.shape[0], k, *x.shape[1:]), x.dtype)
    std = std.reshape(std.shape + (1,) * (x.ndim - 1))
    cands = mean[:, None] + std[:, None] * z
    return cands.reshape(-1, *x.shape[1:])


def lookahead_x0(params: Params, z: Array, t: Array, steps: int) -> Array:
    """The lookahead estimate of ``x0`` from ``z [C, ...]`` at time ``t``: ``steps - 1`` Euler ODE
    steps on ``t j / steps`` (``j = steps .. 1``), then the Tweedie estimate at ``t / steps``
    (``steps`` NFE per row)."""
    model = params.model

    def body(z, j):
        tau, tau_next = t * j / steps, t * (j - 1) / steps
        times = jnp.broadcast_to(tau, z.shape[:1])
        u = model.velocity(z, times, params.cond)
        return euler_step(u, z, times, jnp.broadcast_to(tau_next, times.shape)), None

    if steps > 1:
        z, _ = jax.lax.scan(body, z, jnp.arange(steps, 1, -1, dtype=jnp.float32))
    tau = jnp.broadcast_to(t / steps, z.shape[:1])
    return tweedie(model, z, tau, model.velocity(z, tau, params.cond))


@functools.cache
def _sampler(plan: Plan) -> Sampler:
    b, k, la, num_steps = plan

    def init(key, params):
        return {
            "x": initial_noise(key, params.model, b),
            "scores": jnp.full((b,), -jnp.inf, jnp.float32),
            "invalid": jnp.zeros((2,), jnp.int32),
            "step": jnp.int32(0),
        }

    def step(key, state, params):
        grid = jnp.asarray(params.grid)
        i = state["step"]
        t, t_next = grid[i], grid[i + 1]
        cands = _candidates(key, params, state["x"], t, t_next, k)
        scores, invalid = score(params.reward, lookahead_x0(params, cands, t_next, la), params.cond)
        top, kept = keep_top(scores, cands, b)
        new = {
            "x": kept,
            "scores": top,
            "invalid": state["invalid"] + count_invalid(invalid),
            "step": i + 1,
        }
        return new, jnp.max(scores)

    def last_step(key, state, params):
        grid = jnp.asarray(params.grid)
        cands = _candidates(key, params, state["x"], grid[num_steps - 1], grid[num_steps], k)
        scores, invalid = score(params.reward, cands, params.cond)
        top, kept = keep_top(scores, cands, b)
        new = {
            "x": kept,
            "scores": top,
            "invalid": state["invalid"] + count_invalid(invalid),
            "step": state["step"] + 1,
        }
        return new, jnp.max(scores)

    def finalize(state, infos, params):
        nfe, calls = cost(plan)
        per_step = jnp.arange(1, num_steps + 1, dtype=jnp.int32)
        info = {
            "best_reward": infos,
            "nfe": per_step * b + jnp.minimum(per_step, num_steps - 1) * b * k * la,
            "time": jnp.asarray(params.grid)[1:],
        }
        return search_result(
            state["x"],
            state["scores"],
            nfe,
            calls,
            state["invalid"],
            info,
            params.held_out,
            params.cond,
        )

    if num_steps == 1:
        return Sampler(init, last_step, finalize, 1)
    return Sampler(init, step, finalize, num_steps, last_step=last_step)


_run = jax.jit(run, static_argnames="sampler")


def dlbs(
    key: Array,
    model: FlowModel,
    reward: Reward,
    grid: Array,
    diffusion: Diffusion,
    *,
    num_beams: int = 4,
    num_candidates: int = 2,
    lookahead: int = 1,
    cond: Any = None,
    held_out: dict[str, Reward] | Sequence[Reward] | None = None,
    nan_policy: str = "raise",
) -> Result:
    """Diffusion latent beam search (module docstring): host checks, the jitted kernel, the
    NaN policy.

    Args:
        key: PRNG key.
        model: :class:`~tts_jax.models.base.FlowModel`.
        reward: the verifier used for selection.
        grid: ``[S + 1]`` times from noise to the data end 0.
        diffusion: the beams' SDE noise (a stochastic :class:`~tts_jax.interpolants.Diffusion`).
        num_beams: ``B`` (default 4, the paper's).
        num_candidates: ``K`` per beam (default 2).
        lookahead: ``T'`` (default 1: the Tweedie estimate; the paper's lookahead variant uses 6).
        cond: shared condition (leaves ``[1, ...]``) or ``None``.
        held_out: verifiers evaluated on the final beams only.
        nan_policy: ``raise`` or ``drop`` (docs/policies.md).

    Returns:
        :class:`~tts_jax.samplers.result.Result` with the ``B`` final beams best first, uniform
        weights, ``cost`` as :func:`cost`; ``info.extra``: ``best_reward [S]`` (the best
        candidate score of each step: on the lookahead estimate, then on the samples), ``nfe
        [S]`` (spent after each step), ``time [S]``.
    """
    check_nan_policy(METHOD, nan_policy)
    params = make_params(model, reward, grid, diffusion, cond, held_out)
    num_steps = check_grid(METHOD, params.grid)
    beam_sampler = sampler(num_beams, num_candidates, lookahead, num_steps)
    check_params(params, beam_sampler)
    return finish(_run(key, beam_sampler, params), METHOD, reward, nan_policy)
