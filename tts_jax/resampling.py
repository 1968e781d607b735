"""Resampling schemes: ``(key, log_weights[N], num_samples) -> Int32[num_samples]`` ancestors.

A resampler is a value: any function with that signature (:data:`Resampler`) can be passed
wherever one is expected (:func:`tts_jax.smc.step`, the samplers' factories such as
:func:`tts_jax.samplers.image.fk_steering.sampler`); the names of :data:`RESAMPLERS` are
aliases of the four below, resolved by :func:`get_resampler` (the CLI and the convenience entry
points accept them). A resampler of your own must be jit-able with static shapes, return indices in
``[0, N)``, and never pick a particle whose log-weight is ``-inf`` (the engine calls it only when
some weight is positive).

All four work from unnormalized log-weights, are jit-able with static shapes, and never pick a
particle whose log-weight is ``-inf`` (docs/algorithms.md 0.4).

How: the normalized weights are quantized to integers of ``2^-30`` (finer than a float32 cdf,
whose spacing near 1 is ``2^-24``) and summed exactly, so the cdf is non-decreasing, exactly 1
from the last positive weight on, and a zero-weight particle's cdf equals its predecessor's: no
draw can land on it, with no extra pass to clamp the search. Stratified and systematic draws are
sorted, so each particle's cumulative offspring count has a closed form (one floor per
particle) and the ancestors follow from the counts by one histogram and a cumulative sum: O(N),
no O(N log N) search. Multinomial draws (i.i.d., unsorted) are located by a binary search of
the cdf. (A guide table, Chen & Asau 1974, measured slower on CPU: the histogram and gathers
that set it up cost more than the search rounds they save.)

Behaviour on invalid weights: called eagerly (outside jit) with NaN or all ``-inf`` weights they
raise ``ValueError``; inside jit they cannot raise and return the out-of-range sentinel index
``N`` for every draw. :func:`tts_jax.particles.gather` refuses such indices when they are
concrete, but inside jit it gathers in clip mode (the sentinel reads row ``N - 1``), so a caller
that resamples under jit must check the weights first: the SMC engine never resamples a set whose
weights are all ``-inf`` or NaN, and reports it as ``all_dead``.

References: Douc, Cappé & Moulines (2005), "Comparison of resampling schemes for particle
filtering"; Kitagawa (1996) for systematic resampling.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from tts_jax.particles import check_log_weights

Array = jax.Array
# (key, log_weights Float[N], num_samples: int) -> Int32[num_samples] ancestor indices
Resampler = Callable[[Array, Array, int], Array]

_QUANTUM = 2.0**30  # integer weight units per unit of mass: the cdf total stays below 2^31
_BLOCK = 32  # row length of the blocked cumulative sum (used above _SHORT entries)
_SHORT = 256  # up to this length jnp.cumsum's own lowering is as fast
_DENSE = 32  # up to this many particles, searches compare every draw with every particle


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _cumsum(x: Array) -> Array:
    """Inclusive cumulative sum of ``Int32[N]`` (exact): in-row doubling steps over rows of
    ``_BLOCK`` entries, then the row offsets; on CPU about 2x faster than ``jnp.cumsum``'s
    reduce-window lowering at N = 16384."""
    n = x.shape[0]
    if n <= _SHORT:
        return jnp.cumsum(x)
    rows = jnp.pad(x, (0, -n % _BLOCK)).reshape(-1, _BLOCK)
    shift = 1
    while shift < _BLOCK:
        rows = rows + jnp.pad(rows[:, :-shift], ((0, 0), (shift, 0)))
        shift *= 2
    ends = rows[:, -1]
    return (rows + (jnp.cumsum(ends) - ends)[:, None]).reshape(-1)[:n]


def _weights(log_weights: Array) -> tuple[Array, Array]:
    """Weights ``Float[N]`` scaled to a maximum of 1, and whether they are valid (no NaN or
    ``+inf``, not all ``-inf``; invalid weights come back as ones so later steps stay finite)."""
    if not _is_tracer(log_weights):
        check_log_weights(log_weights)
    log_weights = jnp.asarray(log_weights, jnp.float32)
    top = jnp.max(log_weights)
    e = jnp.exp(log_weights - jnp.where(jnp.isfinite(top), top, 0.0))
    valid = jnp.isfinite(top)  # NaN propagates through the max
    return jnp.where(valid, e, 1.0), valid


def _cdf(weights: Array) -> Array:
    """Normalized cdf ``Float[N]`` of non-negative ``weights [N]`` (positive sum), summed exactly
    on the integer grid: non-decreasing, exactly 1 from the last positive weight on, and equal to
    its predecessor at every zero weight."""
    units = jnp.floor(weights * (_QUANTUM / jnp.sum(weights))).astype(jnp.int32)
    cum = _cumsum(units)
    return cum.astype(jnp.float32) / cum[-1].astype(jnp.float32)


def _ancestors_from_counts(cum_counts: Array, num_samples: int) -> Array:
    """``Int32[M]`` slots ``k`` filled by the particle ``#{i : cum_counts[i] <= k}``.

    Args:
        cum_counts: ``Int32[N]`` non-decreasing cumulative offspring counts ending at ``M``.
    """
    n = cum_counts.shape[0]
    slots = jnp.arange(num_samples, dtype=jnp.int32)
    if n <= _DENSE and num_samples <= _DENSE:
        return jnp.sum(cum_counts[None, :] <= slots[:, None], axis=1, dtype=jnp.int32)
    hist = jnp.zeros((num_samples,), jnp.int32).at[cum_counts].add(1, mode="drop")
    return _cumsum(hist)


def _search(cdf: Array, u: Array) -> Array:
    """``Int32[M]`` indices ``#{i : cdf[i] <= u_k}`` for draws ``u [M]`` in ``[0, 1)``.

    Args:
        cdf: ``Float[N]`` non-decreasing, ending at 1 (so every index is below ``N``).
    """
    if cdf.shape[0] <= _DENSE and u.shape[0] <= _DENSE:
        return jnp.sum(cdf[None, :] <= u[:, None], axis=1, dtype=jnp.int32)
    return jnp.searchsorted(cdf, u, side="right").astype(jnp.int32)


def _checked(ancestors: Array, valid: Array, n: int) -> Array:
    return jnp.where(valid, ancestors, jnp.int32(n))


def multinomial(key: Array, log_weights: Array, num_samples: int) -> Array:
    """i.i.d. draws from the categorical distribution of the weights."""
    weights, valid = _weights(log_weights)
    cdf = _cdf(weights)
    u = jax.random.uniform(key, (num_samples,))
    return _checked(_search(cdf, u), valid, cdf.shape[0])


def stratified(key: Array, log_weights: Array, num_samples: int) -> Array:
    """One uniform draw ``u_k`` in each stratum ``[k/M, (k+1)/M)``.

    Particle ``i`` covers ``[cdf[i-1], cdf[i])``; with ``y = M cdf[i]`` and ``m = floor(y)``, the
    draws below ``cdf[i]`` are those of strata ``k < m`` and, if ``u`` of stratum ``m`` falls
    below ``y - m``, stratum ``m``.
    """
    weights, valid = _weights(log_weights)
    cdf = _cdf(weights)
    u = jax.random.uniform(key, (num_samples,))
    y = cdf * num_samples
    m = jnp.minimum(jnp.floor(y).astype(jnp.int32), num_samples)
    last = u[jnp.minimum(m, num_samples - 1)] < y - m
    cum = m + ((m < num_samples) & last).astype(jnp.int32)
    return _checked(_ancestors_from_counts(cum, num_samples), valid, cdf.shape[0])


def systematic(key: Array, log_weights: Array, num_samples: int) -> Array:
    """One shared uniform offset ``U`` for every stratum (lowest variance, not exchangeable).

    The draws ``(k + U) / M`` below ``cdf[i]`` number ``ceil(M cdf[i] - U)``.
    """
    weights, valid = _weights(log_weights)
    cdf = _cdf(weights)
    u = jax.random.uniform(key, ())
    cum = jnp.clip(jnp.ceil(cdf * num_samples - u), 0, num_samples).astype(jnp.int32)
    # Rounding cannot leave the last slots empty: the cdf is exactly 1 from the last positive
    # weight on.
    cum = jnp.where(cdf >= 1.0, num_samples, cum)
    return _checked(_ancestors_from_counts(cum, num_samples), valid, cdf.shape[0])


def residual(key: Array, log_weights: Array, num_samples: int) -> Array:
    """Deterministic ``floor(M w_i)`` copies, the remainder drawn multinomially.

    Static shapes: the deterministic copies fill the first slots in particle order, and the
    residual draws fill the slots they leave, so the output always has ``num_samples`` entries.
    """
    weights, valid = _weights(log_weights)
    scaled = weights * (num_samples / jnp.sum(weights))
    counts = jnp.floor(scaled)
    cum = _cumsum(counts.astype(jnp.int32))
    rest = scaled - counts
    rest_cdf = _cdf(jnp.where(jnp.any(rest > 0), rest, weights))
    drawn = _search(rest_cdf, jax.random.uniform(key, (num_samples,)))
    slots = jnp.arange(num_samples, dtype=jnp.int32)
    out = jnp.where(slots < cum[-1], _ancestors_from_counts(cum, num_samples), drawn)
    return _checked(out, valid, weights.shape[0])


RESAMPLERS: dict[str, Resampler] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def get_resampler(name_or_fn: str | Resampler) -> Resampler:
    """Look up a resampler by name in :data:`RESAMPLERS`, or pass a function through unchanged.

    Raises:
        ValueError: an unknown name (listing the known ones).
    """
    if callable(name_or_fn):
        return name_or_fn
    try:
        return RESAMPLERS[name_or_fn]
    except KeyError:
        raise ValueError(f"unknown resampler {name_or_fn!r}; known: {sorted(RESAMPLERS)}") from None
