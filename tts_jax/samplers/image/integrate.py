"""Solving a flow model's ODE or SDE over a time grid, and its Tweedie estimate.

The building blocks every image sampler shares: one Euler / Euler-Maruyama step of
``dx = [u - 0.5 g^2 score] dt + g dW`` (docs/algorithms.md 0.2) and a ``lax.scan`` over a grid.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tts_jax.interpolants import (
    Diffusion,
    euler_step,
    sde_step,
    sde_step_mean_std,
    velocity_to_x0,
)
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


def solve_rows(
    keys: Array, model: FlowModel, x: Array, grid: Array, diffusion: Diffusion, cond: Any = None
) -> Array:
    """Integrate every row of ``x`` along ``grid`` with its own key: ``len(grid) - 1`` NFE each.

    The model sees all rows at once (one batched forward per step), while row ``i``'s step-``k``
    noise is drawn from ``fold_in(keys[i], k)``: a row's path does not depend on which other rows
    share its batch, so splitting the rows into chunks, or adding rows, leaves it unchanged. The
    ODE (``diffusion.kind == "zero"``) draws no noise and ignores ``keys``.

    Args:
        keys: ``[N]`` PRNG keys, one per row.
        model: :class:`~tts_jax.models.base.FlowModel`.
        x: ``[N, ...]`` states at ``grid[0]``.
        grid: ``[K + 1]`` times.
        diffusion: :class:`~tts_jax.interpolants.Diffusion` (``ode()`` for the deterministic flow).
        cond: condition with leaves ``[N, ...]``, or ``None``.

    Returns:
        ``[N, ...]`` states at ``grid[-1]``.
    """
    interp = model.interpolant

    def row_noise(key, k):
        return jax.random.normal(jax.random.fold_in(key, k), x.shape[1:], x.dtype)

    def body(x, k):
        t = jnp.broadcast_to(grid[k].astype(x.dtype), x.shape[:1])
        t_next = jnp.broadcast_to(grid[k + 1].astype(x.dtype), x.shape[:1])
        u = model.velocity(x, t, cond)
        if diffusion.kind == "zero":
            return euler_step(u, x, t, t_next), None
        mean, std = sde_step_mean_std(interp, u, x, t, t_next, diffusion(t, interp))
        z = jax.vmap(row_noise, in_axes=(0, None))(keys, k)
        return mean + std.reshape(std.shape + (1,) * (x.ndim - 1)) * z, None

    return jax.lax.scan(body, x, jnp.arange(grid.shape[0] - 1))[0]


def tweedie(model: FlowModel, x: Array, t: Array, u: Array) -> Array:
    """Tweedie x0-estimate ``E[x0 | x_t]`` from an already evaluated velocity ``u`` (0 NFE)."""
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])
    return velocity_to_x0(model.interpolant, u, x, t)


def initial_noise(key: Array, model: FlowModel, num: int) -> Array:
    """``num`` standard normal starting states ``[num, *model.sample_shape]``."""
    return jax.random.normal(key, (num, *model.sample_shape), jnp.float32)
