"""Resampling schemes: ``(key, log_weights[N], num_samples) -> Int32[num_samples]`` ancestors.

All four work from unnormalized log-weights (normalized with ``logsumexp``), are jit-able with
static shapes, and never pick a particle whose log-weight is ``-inf`` (ALGORITHMS.md 0.4).

Behaviour on invalid weights: called eagerly (outside jit) with NaN or all ``-inf`` weights they
raise ``ValueError``; inside jit they cannot raise and return the out-of-range sentinel index
``N`` for every draw, so :func:`tts_jax.particles.gather` (``jnp.take``'s fill mode) fills float
leaves with NaN rather than inventing particles. The SMC engine reports this as ``all_dead``.

References: Douc, Cappé & Moulines (2005), "Comparison of resampling schemes for particle
filtering"; Kitagawa (1996) for systematic resampling.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from tts_jax.particles import check_log_weights

Array = jax.Array
Resampler = Callable[[Array, Array, int], Array]


def _is_tracer(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def _normalized_weights(log_weights: Array) -> tuple[Array, Array]:
    """Normalized weights ``[N]`` and a flag that they are valid (finite, not all -inf)."""
    if not _is_tracer(log_weights):
        check_log_weights(log_weights)
    log_weights = jnp.asarray(log_weights, jnp.float32)
    lse = jax.scipy.special.logsumexp(log_weights)
    valid = jnp.isfinite(lse) & ~jnp.any(jnp.isnan(log_weights))
    w = jnp.exp(log_weights - lse)
    return jnp.where(valid, w, 0.0), valid


def _search(cdf: Array, u: Array, valid: Array) -> Array:
    """Indices ``i`` with ``cdf[i-1] <= u < cdf[i]``, skipping zero-weight particles."""
    n = cdf.shape[0]
    # Clamp the cdf so rounding cannot push u past the last positive-weight particle.
    idx = jnp.searchsorted(cdf, u, side="right").astype(jnp.int32)
    last_alive = jnp.max(jnp.where(jnp.diff(cdf, prepend=0.0) > 0, jnp.arange(n), -1)).astype(
        jnp.int32
    )
    idx = jnp.minimum(idx, last_alive)
    return jnp.where(valid, idx, jnp.int32(n))


def _cdf(w: Array) -> Array:
    cdf = jnp.cumsum(w)
    return cdf / cdf[-1]


def multinomial(key: Array, log_weights: Array, num_samples: int) -> Array:
    """i.i.d. draws from the categorical distribution of the weights."""
    w, valid = _normalized_weights(log_weights)
    u = jax.random.uniform(key, (num_samples,))
    return _search(_cdf(w), u, valid)


def stratified(key: Array, log_weights: Array, num_samples: int) -> Array:
    """One uniform draw in each stratum ``[k/M, (k+1)/M)``."""
    w, valid = _normalized_weights(log_weights)
    u = (jnp.arange(num_samples) + jax.random.uniform(key, (num_samples,))) / num_samples
    return _search(_cdf(w), u, valid)


def systematic(key: Array, log_weights: Array, num_samples: int) -> Array:
    """One shared uniform offset for every stratum (lowest variance, not exchangeable)."""
    w, valid = _normalized_weights(log_weights)
    u = (jnp.arange(num_samples) + jax.random.uniform(key, ())) / num_samples
    return _search(_cdf(w), u, valid)


def residual(key: Array, log_weights: Array, num_samples: int) -> Array:
    """Deterministic ``floor(M w_i)`` copies, the remainder drawn multinomially.

    Static shapes: the deterministic part is written with a cumulative-count search, and the
    residual draws fill the slots it leaves, so the output always has ``num_samples`` entries.
    """
    w, valid = _normalized_weights(log_weights)
    n = w.shape[0]
    scaled = w * num_samples
    counts = jnp.floor(scaled).astype(jnp.int32)
    num_det = jnp.sum(counts)
    # Slot s < num_det belongs to the particle whose cumulative count first exceeds s.
    slots = jnp.arange(num_samples, dtype=jnp.int32)
    det = jnp.searchsorted(jnp.cumsum(counts), slots, side="right").astype(jnp.int32)
    rest = scaled - counts
    rest_total = jnp.sum(rest)
    rest_w = jnp.where(rest_total > 0, rest / jnp.maximum(rest_total, 1e-30), w)
    u = jax.random.uniform(key, (num_samples,))
    drawn = _search(_cdf(rest_w), u, valid)
    out = jnp.where(slots < num_det, jnp.minimum(det, n - 1), drawn)
    return jnp.where(valid, out, jnp.int32(n))


RESAMPLERS: dict[str, Resampler] = {
    "multinomial": multinomial,
    "stratified": stratified,
    "systematic": systematic,
    "residual": residual,
}


def get_resampler(name_or_fn: str | Resampler) -> Resampler:
    """Look up a resampler by name, or pass a callable through."""
    if callable(name_or_fn):
        return name_or_fn
    try:
        return RESAMPLERS[name_or_fn]
    except KeyError:
        raise ValueError(f"unknown resampler {name_or_fn!r}; known: {sorted(RESAMPLERS)}") from None
