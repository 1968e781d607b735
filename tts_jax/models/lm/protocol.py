"""The LM as a :class:`~tts_jax.models.base.LanguageModel` (what the LM samplers consume).

Importing :mod:`tts_jax.models.lm` registers :func:`language_model` with
:func:`~tts_jax.models.base.as_language_model`, so the samplers accept an :class:`LM` directly
(docs/design.md, "Language models and step scorers").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from tts_jax.models.base import LanguageModel, as_language_model
from tts_jax.models.lm.cache import KVCache, init_cache
from tts_jax.models.lm.generation import decode_step, forward
from tts_jax.models.lm.modules import LM

Array = jax.Array


def _init_cache(model: LM, batch: int, max_len: int, dtype: Any) -> KVCache:
    return init_cache(model.model.config, batch, max_len, dtype)


@dataclasses.dataclass(frozen=True)
class _FixedDtypeCache:
    """``init_cache`` with the cache dtype fixed at adaptation (the samplers' request ignored);
    a frozen dataclass, hashed by value, so rebuilding the adapter never recompiles."""

    dtype: Any

    def __call__(self, model: LM, batch: int, max_len: int, dtype: Any) -> KVCache:
        return init_cache(model.model.config, batch, max_len, self.dtype)


def _prefill(model: LM, tokens: Array, cache: KVCache, lengths: Array) -> tuple[Array, KVCache]:
    logits, cache = forward(model, tokens, cache, lengths)
    return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0], cache


def language_model(model: LM, *, cache_dtype: Any = None) -> LanguageModel:
    """``model`` as a :class:`~tts_jax.models.base.LanguageModel` (params: the module itself;
    cache: :class:`KVCache`; prefill: :func:`forward` read at each row's last prompt token;
    decode: :func:`decode_step`). Registered with
    :func:`~tts_jax.models.base.as_language_model`, so the samplers accept an :class:`LM`.

    Args:
        model: the transformer.
        cache_dtype: dtype of the KV cache whatever the samplers ask for (they ask for float32);
            ``None`` honours the request. The keys and values are computed in the model dtype and
            read back in it, so for a bfloat16 model a bfloat16 cache gives bit-identical results
            at half the cache memory (docs/precision.md).
    """
    init = _init_cache if cache_dtype is None else _FixedDtypeCache(jnp.dtype(cache_dtype))
    return LanguageModel(model, init, _prefill, decode_step, model.config.vocab_size)


as_language_model.register(LM, language_model)
