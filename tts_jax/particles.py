"""The particle abstraction every sampler shares.

A particle set is a pytree whose every leaf has the particle axis first (``[N, ...]``) together
with log-weights ``[N]``. Resampling produces ancestor indices, and applying them is one gather
over every leaf (latents, token buffers, KV caches, done flags, running rewards alike), which is
what lets one SMC engine steer a diffusion latent and a KV-cached language model
(docs/algorithms.md 0.4, docs/design.md "The particle abstraction").
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

Array = jax.Array
PyTree = Any


class _ParticlesFields(NamedTuple):
    state: PyTree
    log_weights: Array


class Particles(_ParticlesFields):
    """N weighted particles (a NamedTuple, hence a pytree).

    Attributes:
        state: pytree whose every leaf has shape ``[N, ...]``.
        log_weights: ``Float[N]`` unnormalized log-weights (``-inf`` marks a dead particle).

    Construction checks that every state leaf's leading axis equals ``log_weights.shape[0]``
    and raises ``ValueError`` naming the leaf and both sizes otherwise. Shapes are known at
    trace time, so the check runs under ``jit``, ``vmap`` and ``scan`` too (per example under
    ``vmap``, where the sizes still agree). It only compares leaves that have a ``shape``: JAX's
    own tree operations rebuild a ``Particles`` with placeholder leaves (``None``, ``object()``,
    shape tuples, ``in_axes`` integers), and a scalar ``log_weights`` (e.g. after
    ``jax.tree.map(jnp.sum, p)``) switches it off. Stacked sets (``log_weights [K, N]``, leaves
    ``[K, N, ...]``) pass: only the leading axis is compared. :func:`make_particles` checks more
    (a 1-D ``log_weights``, no scalar or empty state).
    """

    __slots__ = ()

    def __new__(cls, state: PyTree, log_weights: Array) -> Particles:
        _check_particle_axes(state, log_weights)
        return super().__new__(cls, state, log_weights)

    @classmethod
    def _make(cls, iterable) -> Particles:
        # NamedTuple's _make (used by _replace) bypasses __new__: route it through the check.
        return cls(*iterable)

    @property
    def num_particles(self) -> int:
        return self.log_weights.shape[0]


def _leading_size(leaf) -> int | None:
    """``leaf.shape[0]``; ``-1`` for a scalar; ``None`` when ``leaf`` has no shape (a
    placeholder) or a symbolic leading dimension (nothing to compare)."""
    shape = getattr(leaf, "shape", None)
    if not isinstance(shape, tuple):
        return None
    if not shape:
        return -1
    return shape[0] if isinstance(shape[0], int) else None


def _check_particle_axes(state: PyTree, log_weights: Array) -> None:
    """Raise if a state leaf with a shape does not have ``log_weights.shape[0]`` leading rows."""
    n = _leading_size(log_weights)
    if n is None or n < 0:
        return
    leaves = jax.tree_util.tree_leaves(state)
    if all(_leading_size(leaf) in (None, n) for leaf in leaves):
        return
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        size = _leading_size(leaf)
        if size not in (None, n):
            shown = "a scalar" if size == -1 else f"shape {leaf.shape}"
            raise ValueError(
                f"Particles: state leaf {jax.tree_util.keystr(path) or '(root)'} has {shown} "
                f"but log_weights has shape {log_weights.shape}: every state leaf needs the "
                f"particle axis first, of size N = {n}"
            )


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

    Out-of-range indices. Every index must lie in ``[0, N)`` (no negative indices). When
    ``ancestors`` is concrete (an eager call, or a NumPy array inside a traced function) they
    are checked and a ``ValueError`` names the offending indices and ``N``. Traced indices
    cannot be checked without a host callback per call, so inside ``jit`` the gather runs in
    ``clip`` mode: a bare XLA gather (no masking pass, unlike ``jnp.take``'s default ``fill``
    mode, which would write NaN), where an out-of-range index reads the nearest end row. The
    resamplers of :mod:`tts_jax.resampling` return in-range indices for valid weights, and the
    SMC engine never resamples an all-dead set.

    Args:
        tree: pytree of ``[N, ...]`` leaves.
        ancestors: ``Int[M]`` indices into the particle axis, in ``[0, N)``.

    Returns:
        pytree of ``[M, ...]`` leaves.

    Raises:
        ValueError: concrete ``ancestors`` with an index outside ``[0, N)`` for some leaf.
    """
    if not isinstance(ancestors, jax.core.Tracer):
        _check_ancestors(tree, np.asarray(ancestors))
    return jax.tree.map(lambda leaf: jnp.take(leaf, ancestors, axis=0, mode="clip"), tree)


def _check_ancestors(tree: PyTree, ancestors: np.ndarray) -> None:
    """Host-side range check of concrete ``ancestors`` against every leaf's particle axis."""
    if ancestors.size == 0:
        return
    low, high = int(ancestors.min()), int(ancestors.max())
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        n = np.shape(leaf)[0] if np.ndim(leaf) else 0
        if low < 0 or high >= n:
            flat = ancestors.reshape(-1)
            bad = flat[(flat < 0) | (flat >= n)]
            raise ValueError(
                f"gather: ancestor indices {np.unique(bad)[:10].tolist()} are outside [0, {n}) "
                f"for leaf {jax.tree_util.keystr(path) or '(root)'} of shape {np.shape(leaf)}"
            )


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
