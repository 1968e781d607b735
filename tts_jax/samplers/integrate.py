"""Solving a flow model's ODE or SDE over a time grid, and its Tweedie estimate.

The building blocks every image sampler shares: one Euler / Euler-Maruyama step of
``dx = [u - 0.5 g^2 score] dt + g dW`` (ALGORITHMS.md 0.2) and a ``lax.scan`` over a grid.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tts_jax.interpolants import Diffusion, euler_step, sde_step, velocity_to_x0
from tts_jax.models.base import FlowModel

Array = jax.Array


def step(
    key: Array,
    model: FlowModel,
    x: Array,
    t: Array,
    t_next: Array,
    diffusion: Diffusion,
    cond: Any = None,
) -> tuple[Array, Array]:
    """One SDE (or ODE when ``g = 0``) step from ``t`` to ``t_next``; costs 1 NFE per particle.

    Args:
        x: ``[N, ...]`` states at time ``t`` (scalar or ``[N]``).

    Returns:
        ``(x_next [N, ...], u [N, ...])``: the new states and the velocity evaluated at ``(x, t)``.
    """
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    t_next = jnp.broadcast_to(jnp.asarray(t_next, x.dtype), x.shape[:1])
    u = model.velocity(x, t, cond)
    if diffusion.kind == "zero":  # the ODE: same result as g = 0, without drawing noise
        return euler_step(u, x, t, t_next), u
    g = diffusion(t, model.interpolant)
    return sde_step(key, model.interpolant, u, x, t, t_next, g), u


def solve(
    key: Array, model: FlowModel, x: Array, grid: Array, diffusion: Diffusion, cond: Any = None
) -> Array:
    """Integrate ``x`` along ``grid`` (``grid[0]`` -> ``grid[-1]``): ``len(grid) - 1`` NFE each.

    Args:
        key: PRNG key (step ``k`` uses ``fold_in(key, k)``).
        x: ``[N, ...]`` states at ``grid[0]``.
        grid: ``[K + 1]`` times.
        diffusion: :class:`~tts_jax.interpolants.Diffusion` (``ode()`` for the deterministic flow).
    """

    def body(x, k):
        x_next, _ = step(
            jax.random.fold_in(key, k), model, x, grid[k], grid[k + 1], diffusion, cond
        )
        return x_next, None

    x, _ = jax.lax.scan(body, x, jnp.arange(grid.shape[0] - 1))
    return x


def tweedie(model: FlowModel, x: Array, t: Array, u: Array) -> Array:
    """Tweedie x0-estimate ``E[x0 | x_t]`` from an already evaluated velocity ``u`` (0 NFE)."""
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    return velocity_to_x0(model.interpolant, u, x, t)


def initial_noise(key: Array, model: FlowModel, num: int) -> Array:
    """``num`` standard normal starting states ``[num, *model.sample_shape]``."""
    return jax.random.normal(key, (num, *model.sample_shape), jnp.float32)
