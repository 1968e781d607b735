"""The per-row key/value cache of the LM: particle state with the row axis first.

The KV cache is particle state (docs/algorithms.md, 4.4 "KV caches and particles"): every leaf has
the row axis first, so resampling is ``jax.tree.map(lambda x: x[ancestors], cache)``. Each row has
its own length, so rows can be ragged, and a row that writes no new tokens is left untouched.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax.models.lm.config import LMConfig

Array = jax.Array


class KVCache(NamedTuple):
    """Per-row key/value cache; every leaf has the row (particle) axis first.

    One buffer per layer: a decode step writes each layer's buffer in place (inside a jitted
    loop or with the cache donated) instead of slicing and re-assembling a stacked array, which
    would copy the whole cache every token.

    Attributes:
        k, v: per-layer tuples of ``[N, kv_heads, max_len, head_dim]`` arrays.
        length: ``int32[N]`` tokens written per row (the next write offset).
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    length: Array

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def init_cache(config: LMConfig, batch: int, max_len: int, dtype: Any = jnp.float32) -> KVCache:
    """An empty cache of ``batch`` rows with room for ``max_len`` tokens each."""
    shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
    layers = range(config.num_hidden_layers)
    return KVCache(
        tuple(jnp.zeros(shape, dtype) for _ in layers),
        tuple(jnp.zeros(shape, dtype) for _ in layers),
        jnp.zeros((batch,), jnp.int32),
    )


def _check_fits(cache: KVCache, tokens: Array, num_new: Array) -> None:
    """Shape checks always; value checks when the lengths are concrete (not traced)."""
    n, t = tokens.shape
    if t > cache.max_len:
        raise ValueError(f"{t} new tokens do not fit a cache of max_len={cache.max_len}")
    if cache.length.shape != (n,) or num_new.shape != (n,):
        raise ValueError(
            f"tokens [N={n}, T] need cache.length and num_new of shape ({n},), got "
            f"{cache.length.shape} and {num_new.shape}"
        )
    if isinstance(cache.length, jax.core.Tracer) or isinstance(num_new, jax.core.Tracer):
        return
    length, new = np.asarray(cache.length), np.asarray(num_new)
    if np.any(new < 0) or np.any(new > t):
        raise ValueError(f"num_new must lie in [0, {t}], got {new}")
    if np.any(length + new > cache.max_len):
        raise ValueError(
            f"rows overflow the cache (max_len={cache.max_len}): length + num_new = {length + new}"
        )
