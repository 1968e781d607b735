"""The particle abstraction every sampler shares.

A particle set is a pytree whose every leaf has the particle axis first (``[N, ...]``) together
with log-weights ``[N]``. Resampling produces ancestor indices, and applying them is one gather
over every leaf (latents, token buffers, KV caches, done flags, running rewards alike), which is
what lets one SMC engine steer a diffusion latent and a KV-cached language model
(ALGORITHMS.md 0.4, DESIGN.md "The particle abstraction").
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

Array = jax.Array
PyTree = Any


class Particles(NamedTuple):
    """N weighted particles.

    Attributes:
        state: pytree whose every leaf has shape ``[N, ...]``.
        log_weights: ``Float[N]`` unnormalized log-weights (``-inf`` marks a dead particle).
    """

    state: PyTree
    log_weights: Array

    @property
    def num_particles(self) -> int:
        return self.log_weights.shape[0]


def num_particles(state: PyTree) -> int:
    """Size of the shared leading axis of ``state``.

    Raises:
        ValueError: if ``state`` has no leaves, a scalar leaf, or leaves whose leading axes differ.
    """
    leaves = jax.tree_util.tree_leaves_with_path(state)
    if not leaves:
        raise ValueError(
            "particle state has no array leaves; it must hold at least one [N, ...] array"
        )
    sizes = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"particle state leaf {jax.tree_util.keystr(path)} is a scalar; every leaf needs "
                "the particle axis first ([N, ...])"
            )
        sizes[jax.tree_util.keystr(path)] = shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(f"particle state leaves disagree on the particle axis size: {sizes}")
    n = next(iter(sizes.values()))
    if n == 0:
        raise ValueError("particle set is empty (N = 0)")
    return n


def make_particles(state: PyTree, log_weights: Array | None = None) -> Particles:
    """Build a :class:`Particles`, checking that every leaf shares the particle axis.

    Args:
        state: pytree of ``[N, ...]`` leaves.
        log_weights: ``Float[N]``; defaults to zeros (equal weights).

    Raises:
        ValueError: mismatched particle axes, empty set, or log-weights of the wrong shape.
    """
    n = num_particles(state)
    if log_weights is None:
        log_weights = jnp.zeros((n,), jnp.float32)
    log_weights = jnp.asarray(log_weights)
    if log_weights.shape != (n,):
        raise ValueError(
            f"log_weights has shape {log_weights.shape}, expected ({n},) to match the state"
        )
    return Particles(state, log_weights)


def log_normalize(log_weights: Array) -> Array:
    """Normalized log-weights ``lw - logsumexp(lw)``; ``-inf`` entries stay ``-inf``.

    Args:
        log_weights: ``Float[N]``.

    Returns:
        ``Float[N]`` whose exponentials sum to one (NaN everywhere if every entry is ``-inf``:
        use :func:`check_log_weights` outside jit to get an error instead).
    """
    return log_weights - logsumexp(log_weights)


def ess(log_weights: Array) -> Array:
    """Effective sample size ``exp(2 logsumexp(lw) - logsumexp(2 lw)) = (sum w)^2 / sum w^2``.

    Stable for huge and ``-inf`` entries; invariant to adding a constant. Equals N for equal
    weights and 1 when a single weight is non-zero. Returns 0 when every weight is ``-inf``.

    Args:
        log_weights: ``Float[..., N]`` (reduces the last axis).
    """
    # Subtract the max first (exact for nearby values) so huge offsets cost no precision.
    top = jnp.max(log_weights, axis=-1, keepdims=True)
    alive = jnp.isfinite(top)
    w = jnp.exp(log_weights - jnp.where(alive, top, 0.0))
    out = jnp.sum(w, axis=-1) ** 2 / jnp.sum(w**2, axis=-1)
    return jnp.where(alive[..., 0], out, 0.0)


def log_mean_exp(log_weights: Array, axis: int = -1) -> Array:
    """``log(mean(exp(lw)))`` along ``axis``, stable for ``-inf`` entries."""
    n = log_weights.shape[axis]
    return logsumexp(log_weights, axis=axis) - jnp.log(n)


def gather(tree: PyTree, ancestors: Array) -> PyTree:
    """Reorder every leaf of ``tree`` along its particle axis: ``leaf[ancestors]``.

    Works on a :class:`Particles` (state and log-weights alike) or on any bare state pytree. This is
    the single operation resampling needs: latents, KV caches, token buffers, done flags and running
    rewards all move together with the same ancestor index.

    Args:
        tree: pytree of ``[N, ...]`` leaves.
        ancestors: ``Int[M]`` indices into the particle axis.

    Returns:
        pytree of ``[M, ...]`` leaves.
    """
    return jax.tree.map(lambda leaf: jnp.take(leaf, ancestors, axis=0), tree)


def check_log_weights(log_weights: Array, what: str = "log_weights") -> None:
    """Raise a clear error for NaN or all-dead weights (host-side, outside jit).

    Raises:
        ValueError: NaN entries, ``+inf`` entries, an empty vector, or every entry ``-inf``.
    """
    lw = np.asarray(log_weights)
    if lw.ndim != 1 or lw.shape[0] == 0:
        raise ValueError(f"{what} must be a non-empty vector [N], got shape {lw.shape}")
    if np.isnan(lw).any():
        raise ValueError(
            f"{what} contains NaN at particles {np.flatnonzero(np.isnan(lw)).tolist()}"
        )
    if np.isposinf(lw).any():
        raise ValueError(
            f"{what} contains +inf at particles {np.flatnonzero(np.isposinf(lw)).tolist()}"
        )
    if np.isneginf(lw).all():
        raise ValueError(f"all particles are dead: every entry of {what} is -inf")
