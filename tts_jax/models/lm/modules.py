"""The Qwen2 / Llama decoder as Flax NNX modules (parameter names and shapes follow transformers).

The network follows the transformers ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` layout (RMSNorm,
rotary embeddings, grouped-query attention, SiLU-gated MLP; Vaswani et al. 2017, Su et al. 2021
"RoFormer", Ainslie et al. 2023 "GQA", Shazeer 2020 "GLU Variants"). Every parameter is stored
under its transformers name and PyTorch shape (``Linear.weight`` is ``[out, in]``), so loading a
``*.safetensors`` checkpoint is a name-for-name, shape-for-shape copy
(:mod:`tts_jax.models.lm.checkpoint`) and saving writes a folder that
``transformers.AutoModelForCausalLM`` loads.

The modules hold parameters only; the forward pass over a KV cache is the pure function
:func:`tts_jax.models.lm.generation.hidden_states` (see docs/design.md, "Models we ship").

Precision: parameters, activations and the residual stream are in the model ``dtype`` (e.g.
``bfloat16``, as transformers runs a bfloat16 checkpoint); RMSNorm statistics, attention scores
and softmax, the rotary tables and the rotation itself are float32, and the logits are
accumulated in float32 (docs/precision.md).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tts_jax.models.lm.config import LMConfig

Array = jax.Array

INIT_STD = 0.02  # transformers' default initializer_range


def _bcast(x: Array, like: Array) -> Array:
    """Explicit trailing-axis broadcast (the tests forbid implicit rank promotion)."""
    return jnp.broadcast_to(x, like.shape)


class Linear(nnx.Module):
    """``y = x W^T + b`` with ``W: [out, in]`` stored as in PyTorch."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ):
        w = INIT_STD * jax.random.normal(rngs.params(), (out_features, in_features))
        self.weight = nnx.Param(w.astype(dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), dtype)) if bias else None

    def __call__(self, x: Array) -> Array:
        """``x: [..., in] -> [..., out]``."""
        y = jnp.einsum("...i,oi->...o", x, self.weight[...])
        return y if self.bias is None else y + _bcast(self.bias[...], y)


class Embedding(nnx.Module):
    """Token embedding ``weight: [vocab, hidden]``."""

    def __init__(self, num: int, features: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        w = INIT_STD * jax.random.normal(rngs.params(), (num, features))
        self.weight = nnx.Param(w.astype(dtype))

    def __call__(self, tokens: Array) -> Array:
        """``tokens: int[...] -> [..., hidden]``."""
        return jnp.take(self.weight[...], tokens, axis=0)

    def attend(self, h: Array) -> Array:
        """Tied output projection ``h: [..., hidden] -> [..., vocab]``."""
        return jnp.einsum("...h,vh->...v", h, self.weight[...])


class RMSNorm(nnx.Module):
    """RMSNorm (Zhang & Sennrich 2019), statistics in float32 as transformers does."""

    def __init__(self, features: int, *, eps: float, dtype: Any = jnp.float32):
        self.weight = nnx.Param(jnp.ones((features,), dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        y = y.astype(x.dtype)
        return _bcast(self.weight[...], y) * y


class Attention(nnx.Module):
    """Grouped-query self-attention with rotary embeddings over a per-row KV cache."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs, dtype: Any):
        c = config
        h, hd = c.hidden_size, c.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            hd,
        )
        self.q_proj = Linear(h, c.num_attention_heads * hd, bias=c.qkv_bias, rngs=rngs, dtype=dtype)
        self.k_proj = Linear(h, c.num_key_value_heads * hd, bias=c.qkv_bias, rngs=rngs, dtype=dtype)
        self.v_proj = Linear(h, c.num_key_value_heads * hd, bias=c.qkv_bias, rngs=rngs, dtype=dtype)
        self.o_proj = Linear(c.num_attention_heads * hd, h, bias=c.o_bias, rngs=rngs, dtype=dtype)

    def __call__(
        self,
        x: Array,
        rope: tuple[Array, Array],
        k_cache: Array,
        v_cache: Array,
        write_pos: Array,
        mask: Array,
    ) -> tuple[Array, Array, Array]:
        """One attention block.

        Args:
            x: ``[N, T, hidden]`` new-token activations.
            rope: ``(cos, sin)``, each ``[N, T, head_dim]``.
            k_cache, v_cache: ``[N, kv_heads, S, head_dim]`` this layer's cache (slots minor to
                heads, so the score and value products read it without a transposed copy).
            write_pos: ``int32[N, T]`` cache slot of each new token (``S`` = do not write).
            mask: ``bool[N, T, S]`` which cache slots each new token attends to.

        Returns:
            ``(out [N, T, hidden], k_cache, v_cache)`` with the new keys/values written.
        """
        n, t, _ = x.shape
        q = _apply_rope(self.q_proj(x).reshape(n, t, self.num_heads, self.head_dim), rope)
        k = _apply_rope(self.k_proj(x).reshape(n, t, self.num_kv_heads, self.head_dim), rope)
        v = self.v_proj(x).reshape(n, t, self.num_kv_heads, self.head_dim)
        rows = jnp.arange(n)[:, None]
        k_cache = k_cache.at[rows, :, write_pos].set(k.astype(k_cache.dtype), mode="drop")
        v_cache = v_cache.at[rows, :, write_pos].set(v.astype(v_cache.dtype), mode="drop")
        groups = self.num_heads // self.num_kv_heads
        q = q.reshape(n, t, self.num_kv_heads, groups, self.head_dim)
        scores = (
            jnp.einsum(
                "ntkgd,nksd->nkgts", q, k_cache.astype(q.dtype), preferred_element_type=jnp.float32
            )
            * self.head_dim**-0.5
        )
        scores = jnp.where(_bcast(mask[:, None, None], scores), scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("nkgts,nksd->ntkgd", probs, v_cache.astype(x.dtype))
        return self.o_proj(out.reshape(n, t, self.num_heads * self.head_dim)), k_cache, v_cache


class MLP(nnx.Module):
    """SiLU-gated feed-forward ``down(silu(gate(x)) * up(x))``."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs, dtype: Any):
        h, f, b = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = Linear(h, f, bias=b, rngs=rngs, dtype=dtype)
        self.up_proj = Linear(h, f, bias=b, rngs=rngs, dtype=dtype)
        self.down_proj = Linear(f, h, bias=b, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs, dtype: Any):
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.self_attn = Attention(config, rngs=rngs, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.mlp = MLP(config, rngs=rngs, dtype=dtype)


class Backbone(nnx.Module):
    """Embeddings, decoder layers and the final norm (transformers' ``model.*``)."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size, rngs=rngs, dtype=dtype)
        self.layers = nnx.List(
            [DecoderLayer(config, rngs=rngs, dtype=dtype) for _ in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)


class LM(nnx.Module):
    """Causal LM: ``model`` (:class:`Backbone`) and ``lm_head`` (``None`` when tied)."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        self.model = Backbone(config, rngs=rngs, dtype=dtype)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else Linear(config.hidden_size, config.vocab_size, bias=False, rngs=rngs, dtype=dtype)
        )


def _rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """``(cos, sin)`` of shape ``[N, T, head_dim]`` for ``int32[N, T]`` positions (RoFormer)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: Array, rope: tuple[Array, Array]) -> Array:
    """Rotates ``x: [N, T, heads, head_dim]`` by the half-split convention of transformers, in
    float32 with the float32 tables (transformers rounds the tables to a bfloat16 model's dtype
    first; rotating in float32 rounds once instead of three times), result in ``x.dtype``."""
    xf = x.astype(jnp.float32)
    cos, sin = (r[:, :, None, :].astype(jnp.float32) for r in rope)
    x1, x2 = jnp.split(xf, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return (xf * _bcast(cos, xf) + rotated * _bcast(sin, xf)).astype(x.dtype)
