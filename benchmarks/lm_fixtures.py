"""Shared pieces of the LM benchmarks: a small random Qwen2 and two free in-graph rewards."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from tts_jax.models import lm


def small_qwen2(hidden: int = 64, layers: int = 2, vocab: int = 128) -> lm.LM:
    """A random Qwen2 (4 query heads, 2 KV heads, MLP 3x ``hidden``), seed 0."""
    config = lm.LMConfig(
        model_type="qwen2",
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=3 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return lm.LM(config, rngs=nnx.Rngs(0))


def step_scorer(_params, tokens, step_ends):
    """Free oracle process reward in (0, 1) that depends on the tokens (no model call)."""
    r = jax.nn.sigmoid(jnp.cumsum((tokens % 7 == 0).astype(jnp.float32), axis=1) - 2.0)
    return jnp.where(step_ends, r, 0.0)


def even_token_tilt(lam, tokens, lengths, _done):
    """Token-SMC twist: ``lam`` times the number of even tokens so far."""
    written = jnp.arange(tokens.shape[1])[None, :] < lengths[:, None]
    return lam * jnp.sum((tokens % 2 == 0) & written, axis=1).astype(jnp.float32)
