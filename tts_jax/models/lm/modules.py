"""Decoder-only language model (Qwen2 / Llama layouts) in Flax NNX with a per-row KV cache.

The network follows the transformers ``Qwen2ForCausalLM`` / ``LlamaForCausalLM`` layout (RMSNorm,
rotary embeddings, grouped-query attention, SiLU-gated MLP; Vaswani et al. 2017, Su et al. 2021
"RoFormer", Ainslie et al. 2023 "GQA", Shazeer 2020 "GLU Variants"). Every parameter is stored
under its transformers name and PyTorch shape (``Linear.weight`` is ``[out, in]``), so loading a
``*.safetensors`` checkpoint is a name-for-name, shape-for-shape copy and saving writes a folder
that ``transformers.AutoModelForCausalLM`` loads.

The KV cache is particle state (ALGORITHMS.md 4.4): every leaf has the row axis first, so
resampling is ``jax.tree.map(lambda x: x[ancestors], cache)``. Each row has its own length, so
rows can be ragged, and a row that writes no new tokens is left untouched.

Modules are pytrees (Flax NNX), so :func:`forward`, :func:`decode_step` and friends take the model
as an ordinary argument inside ``jax.jit`` / ``lax.while_loop``: one compiled program serves any
weights and nothing is closed over. They are un-jitted library functions; :func:`generate` is the
jitted runner (``lax.while_loop`` over tokens, cache donated, temperature an array argument).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.flax import save_file

from tts_jax.models.base import LanguageModel, as_language_model
from tts_jax.models.checkpoint_errors import (
    CheckpointError,
    read_config_file,
    require_files,
    safetensors_errors,
)
from tts_jax.samplers.lm_state import sample_token  # defined next to the samplers

Array = jax.Array

SUPPORTED_MODEL_TYPES = ("qwen2", "llama")
CAUSAL_LM_ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_intermediate_size")
# Non-parameter buffers some older checkpoints carry; they are recomputed, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
INIT_STD = 0.02  # transformers' default initializer_range


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, kw_only=True)
class LMConfig:
    """Architecture of a dense, full-attention Qwen2 / Llama decoder (transformers field names).

    Attributes:
        model_type: ``"qwen2"`` (q/k/v projections always have a bias) or ``"llama"``.
        vocab_size, hidden_size, intermediate_size: widths.
        num_hidden_layers, num_attention_heads, num_key_value_heads: depth and (GQA) heads.
        head_dim: per-head width; ``None`` means ``hidden_size // num_attention_heads``.
        rope_theta: RoPE base (default RoPE only).
        rms_norm_eps: RMSNorm epsilon.
        tie_word_embeddings: output projection shares the input embedding matrix.
        attention_bias: Llama only: bias on q/k/v/o projections.
        mlp_bias: Llama only: bias on the gate/up/down projections.
        max_position_embeddings: recorded for round trips (the cache size is chosen at run time).
        bos_token_id, eos_token_id, pad_token_id: special tokens (``eos_token_id`` is a tuple).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 32768
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {self.model_type!r}; the tts-jax LM supports "
                f"{SUPPORTED_MODEL_TYPES} (dense, full attention, default RoPE)"
            )
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        object.__setattr__(self, "eos_token_id", tuple(self.eos_token_id))
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim")
        for name in sizes:
            if getattr(self, name) <= 0:
                raise ValueError(f"LMConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.model_type == "qwen2" and (self.attention_bias or self.mlp_bias):
            raise ValueError("Qwen2 has fixed biases (q/k/v only); attention_bias/mlp_bias are "
                             "Llama options")

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type == "llama" and self.attention_bias

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> LMConfig:
        """Builds a config from a transformers ``config.json`` dict.

        Raises:
            ValueError: for another ``model_type``, mixture-of-experts, sliding-window attention,
                a non-SiLU activation, or RoPE scaling other than the default.
        """
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {model_type!r}; the tts-jax LM supports "
                f"{SUPPORTED_MODEL_TYPES} (dense, full attention, default RoPE)"
            )
        moe = [k for k in _MOE_KEYS if d.get(k)]
        if moe:
            raise ValueError(f"mixture-of-experts configs are not supported (found {moe})")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"only hidden_act='silu' is supported, got {d['hidden_act']!r}")
        layer_types = set(d.get("layer_types") or ["full_attention"])
        if d.get("use_sliding_window") or layer_types != {"full_attention"}:
            raise ValueError("sliding-window attention is not supported (use_sliding_window / "
                             f"layer_types={sorted(layer_types)}); only full attention is")
        eos = d.get("eos_token_id")
        return cls(
            model_type=model_type,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            num_key_value_heads=d.get("num_key_value_heads") or d["num_attention_heads"],
            head_dim=d.get("head_dim"),
            rope_theta=_default_rope_theta(d),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=d.get("tie_word_embeddings", False),
            attention_bias=d.get("attention_bias", False) if model_type == "llama" else False,
            mlp_bias=d.get("mlp_bias", False) if model_type == "llama" else False,
            max_position_embeddings=d.get("max_position_embeddings", 32768),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=() if eos is None else tuple(np.atleast_1d(eos).tolist()),
            pad_token_id=d.get("pad_token_id"),
        )

    def to_hf_dict(self, architecture: str | None = None) -> dict[str, Any]:
        """The transformers ``config.json`` dict (``architecture`` defaults to the causal LM)."""
        d = {
            "architectures": [architecture or CAUSAL_LM_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            # Both spellings: transformers >= 5 reads rope_parameters, 4.x reads rope_theta.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": _eos_to_hf(self.eos_token_id),
            "pad_token_id": self.pad_token_id,
        }
        if self.model_type == "llama":
            d |= {"attention_bias": self.attention_bias, "mlp_bias": self.mlp_bias}
        else:
            d |= {"use_sliding_window": False, "sliding_window": None}
        return d


def _default_rope_theta(d: dict[str, Any]) -> float:
    """RoPE base from ``rope_parameters`` (transformers 5) or ``rope_theta``/``rope_scaling``."""
    theta = d.get("rope_theta", 10000.0)
    for key in ("rope_parameters", "rope_scaling"):
        params = d.get(key) or {}
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default" or params.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"only default RoPE is supported, got {key}={params}")
        theta = params.get("rope_theta", theta)
    return float(theta)


def _eos_to_hf(eos: tuple[int, ...]) -> int | list[int] | None:
    return None if not eos else eos[0] if len(eos) == 1 else list(eos)


# --------------------------------------------------------------------------------------------
# Modules (parameter names and shapes follow transformers)
# --------------------------------------------------------------------------------------------
def _bcast(x: Array, like: Array) -> Array:
    """Explicit trailing-axis broadcast (the tests forbid implicit rank promotion)."""
    return jnp.broadcast_to(x, like.shape)


class Linear(nnx.Module):
    """``y = x W^T + b`` with ``W: [out, in]`` stored as in PyTorch."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32):
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
            c.num_attention_heads, c.num_key_value_heads, hd)
        self.q_proj = Linear(h, c.num_attention_heads * hd, bias=c.qkv_bias, rngs=rngs, dtype=dtype)
        self.k_proj = Linear(h, c.num_key_value_heads * hd, bias=c.qkv_bias, rngs=rngs, dtype=dtype)
        self.v_proj = Linear(h, c.num_key_value_heads * hd, bias=c.qkv_bias, rngs=rngs, dtype=dtype)
        self.o_proj = Linear(c.num_attention_heads * hd, h, bias=c.o_bias, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array, rope: tuple[Array, Array], k_cache: Array, v_cache: Array,
                 write_pos: Array, mask: Array) -> tuple[Array, Array, Array]:
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
        scores = jnp.einsum("ntkgd,nksd->nkgts", q, k_cache.astype(q.dtype),
                            preferred_element_type=jnp.float32) * self.head_dim**-0.5
        scores = jnp.where(_bcast(mask[:, None, None], scores), scores,
                           jnp.finfo(jnp.float32).min)
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
        self.layers = nnx.List([DecoderLayer(config, rngs=rngs, dtype=dtype)
                                for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype)


class LM(nnx.Module):
    """Causal LM: ``model`` (:class:`Backbone`) and ``lm_head`` (``None`` when tied)."""

    def __init__(self, config: LMConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        self.model = Backbone(config, rngs=rngs, dtype=dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        Linear(config.hidden_size, config.vocab_size, bias=False, rngs=rngs,
                               dtype=dtype))


# --------------------------------------------------------------------------------------------
# KV cache and the pure forward functions
# --------------------------------------------------------------------------------------------
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
    return KVCache(tuple(jnp.zeros(shape, dtype) for _ in layers),
                   tuple(jnp.zeros(shape, dtype) for _ in layers),
                   jnp.zeros((batch,), jnp.int32))


def _rope_tables(positions: Array, head_dim: int, theta: float) -> tuple[Array, Array]:
    """``(cos, sin)`` of shape ``[N, T, head_dim]`` for ``int32[N, T]`` positions (RoFormer)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def _apply_rope(x: Array, rope: tuple[Array, Array]) -> Array:
    """Rotates ``x: [N, T, heads, head_dim]`` by the half-split convention of transformers."""
    cos, sin = (r[:, :, None, :].astype(x.dtype) for r in rope)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * _bcast(cos, x) + rotated * _bcast(sin, x)


def _check_fits(cache: KVCache, tokens: Array, num_new: Array) -> None:
    """Shape checks always; value checks when the lengths are concrete (not traced)."""
    n, t = tokens.shape
    if t > cache.max_len:
        raise ValueError(f"{t} new tokens do not fit a cache of max_len={cache.max_len}")
    if cache.length.shape != (n,) or num_new.shape != (n,):
        raise ValueError(f"tokens [N={n}, T] need cache.length and num_new of shape ({n},), got "
                         f"{cache.length.shape} and {num_new.shape}")
    if isinstance(cache.length, jax.core.Tracer) or isinstance(num_new, jax.core.Tracer):
        return
    length, new = np.asarray(cache.length), np.asarray(num_new)
    if np.any(new < 0) or np.any(new > t):
        raise ValueError(f"num_new must lie in [0, {t}], got {new}")
    if np.any(length + new > cache.max_len):
        raise ValueError(f"rows overflow the cache (max_len={cache.max_len}): "
                         f"length + num_new = {length + new}")


def hidden_states(model: nnx.Module, tokens: Array, cache: KVCache,
                  num_new: Array | None = None) -> tuple[Array, KVCache]:
    """Final-norm hidden states of new tokens, written into the cache at each row's offset.

    Row ``i`` appends ``tokens[i, :num_new[i]]`` at positions ``cache.length[i] + t`` and each of
    them attends causally to the row's prefix; entries ``t >= num_new[i]`` are padding (their
    outputs are meaningless and nothing is written), so a row with ``num_new = 0`` is untouched.

    Args:
        model: any module with a :class:`Backbone` at ``model.model`` (:class:`LM`, reward models).
        tokens: ``int32[N, T]``.
        cache: :class:`KVCache` with ``N`` rows.
        num_new: ``int32[N]`` new tokens per row; ``None`` means all ``T``.

    Returns:
        ``(hidden [N, T, hidden_size], cache)`` with ``cache.length += num_new``.

    Raises:
        ValueError: ``T > max_len`` or mismatched shapes; when the lengths are concrete (outside
            ``jit``) also ``num_new`` outside ``[0, T]`` or ``length + num_new > max_len``. Under
            ``jit`` the caller guarantees capacity (overflowing writes would be dropped).
    """
    backbone: Backbone = model.model
    config = backbone.config
    n, t = tokens.shape
    num_new = jnp.full((n,), t, jnp.int32) if num_new is None else jnp.asarray(num_new, jnp.int32)
    _check_fits(cache, tokens, num_new)
    offsets = jnp.arange(t, dtype=jnp.int32)[None, :]
    positions = cache.length[:, None] + offsets
    write_pos = jnp.where(offsets < num_new[:, None], positions, cache.max_len)
    mask = jnp.arange(cache.max_len)[None, None, :] <= positions[:, :, None]
    rope = _rope_tables(positions, config.head_dim, config.rope_theta)
    k_all, v_all = [], []
    x = backbone.embed_tokens(tokens)
    for layer, k_i, v_i in zip(backbone.layers, cache.k, cache.v, strict=True):
        attn, k_i, v_i = layer.self_attn(layer.input_layernorm(x), rope, k_i, v_i, write_pos, mask)
        k_all.append(k_i)
        v_all.append(v_i)
        x = x + attn
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return backbone.norm(x), KVCache(tuple(k_all), tuple(v_all), cache.length + num_new)


def lm_logits(model: LM, hidden: Array) -> Array:
    """Output projection ``hidden [..., hidden_size] -> float32 logits [..., vocab]``."""
    head = model.model.embed_tokens.attend if model.lm_head is None else model.lm_head
    return head(hidden).astype(jnp.float32)


def forward(model: LM, tokens: Array, cache: KVCache,
            num_new: Array | None = None) -> tuple[Array, KVCache]:
    """Logits of new tokens, reading and writing the cache (see :func:`hidden_states`).

    Args:
        model: :class:`LM`.
        tokens: ``int32[N, T]``.
        cache: :class:`KVCache` with ``N`` rows.
        num_new: ``int32[N]`` tokens to append per row (``None``: all ``T``; ``0``: untouched).

    Returns:
        ``(logits float32[N, T, vocab], cache)``.
    """
    hidden, cache = hidden_states(model, tokens, cache, num_new)
    return lm_logits(model, hidden), cache


def decode_step(model: LM, token: Array, cache: KVCache,
                active: Array | None = None) -> tuple[Array, KVCache]:
    """Appends one token per active row and returns the next-token logits.

    Args:
        model: :class:`LM`.
        token: ``int32[N]``.
        cache: :class:`KVCache` with ``N`` rows.
        active: ``bool[N]``; inactive rows (e.g. finished particles) are left untouched.

    Returns:
        ``(logits float32[N, vocab], cache)`` (logits of inactive rows are meaningless).
    """
    num_new = None if active is None else jnp.asarray(active).astype(jnp.int32)
    logits, cache = forward(model, token[:, None], cache, num_new)
    return logits[:, 0], cache


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
class GenerateOutput(NamedTuple):
    """Result of :func:`generate`.

    Attributes:
        tokens: ``int32[N, max_new_tokens]`` sampled tokens, ``pad_id`` after a row stopped.
        num_tokens: ``int32[N]`` tokens generated per row (a stop token counts).
        finished: ``bool[N]`` the row emitted a stop token.
        log_probs: ``float32[N, max_new_tokens]`` untempered model log-probability of each token
            (0 after a stop), e.g. for token-level importance weights.
        cache: holds the prompt and ``tokens[i, :num_tokens[i] - 1]``; the last sampled token of
            each row is *pending* (not yet written), so a continuation feeds it first.
    """

    tokens: Array
    num_tokens: Array
    finished: Array
    log_probs: Array
    cache: KVCache


@functools.partial(jax.jit, static_argnames=("max_new_tokens",), donate_argnames=("cache",))
def _generate_jit(model: LM, prompt: Array, prompt_lengths: Array, cache: KVCache, key: Array,
                  temperature: Array, stop_ids: Array, pad_id: Array,
                  max_new_tokens: int) -> GenerateOutput:
    """Prefill all but the last prompt token, then one ``lax.while_loop`` step per token."""
    n, p = prompt.shape
    if p > 1:
        _, cache = hidden_states(model, prompt[:, :-1], cache, prompt_lengths - 1)
    last = jnp.take_along_axis(prompt, (prompt_lengths - 1)[:, None], axis=1)[:, 0]

    def cond(carry):
        i, _, _, done, *_ = carry
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(carry):
        i, prev, cache, done, num, out, logp = carry
        logits, cache = decode_step(model, prev, cache, ~done)
        tok = sample_token(jax.random.fold_in(key, i), logits, temperature)
        lp = jnp.take_along_axis(jax.nn.log_softmax(logits), tok[:, None], axis=1)[:, 0]
        tok, lp = jnp.where(done, pad_id, tok), jnp.where(done, 0.0, lp)
        out, logp = out.at[:, i].set(tok), logp.at[:, i].set(lp)
        num = num + (~done).astype(jnp.int32)
        done = done | jnp.any(tok[:, None] == stop_ids[None, :], axis=1)
        return i + 1, tok, cache, done, num, out, logp

    init = (jnp.int32(0), last, cache, jnp.zeros((n,), bool), jnp.zeros((n,), jnp.int32),
            jnp.full((n, max_new_tokens), pad_id, jnp.int32),
            jnp.zeros((n, max_new_tokens), jnp.float32))
    _, _, cache, done, num, out, logp = jax.lax.while_loop(cond, body, init)
    return GenerateOutput(out, num, done, logp, cache)


def generate(model: LM, prompt: Array, key: Array, *, max_new_tokens: int,
             temperature: float | Array = 1.0, eos_id: int | Sequence[int] | None = None,
             prompt_lengths: Array | None = None, cache: KVCache | None = None,
             pad_id: int = 0, cache_dtype: Any = jnp.float32) -> GenerateOutput:
    """Samples up to ``max_new_tokens`` per row in one jitted ``lax.while_loop``.

    The loop stops early once every row emitted a stop token. ``temperature`` (scalar or ``[N]``,
    0 = greedy), ``eos_id`` values, ``pad_id`` and ``key`` are traced, so changing them does not
    recompile; ``max_new_tokens`` and shapes are static. The cache is donated.

    Args:
        model: :class:`LM`.
        prompt: ``int32[N, P]``, right-padded when ``prompt_lengths`` is given.
        key: PRNG key (``fold_in(key, step)`` per token).
        max_new_tokens: static budget per row.
        temperature: sampling temperature, scalar or ``[N]``.
        eos_id: stop token id(s); ``None`` never stops early.
        prompt_lengths: ``int32[N]`` (each ``>= 1``); ``None`` means ``P``.
        cache: existing cache to continue (the prompt is appended at each row's offset; the
            caller must not reuse it after the call, it is donated); ``None`` allocates
            ``max_len = P + max_new_tokens``.
        pad_id: filler after a row stops.
        cache_dtype: dtype of a newly allocated cache.

    Returns:
        :class:`GenerateOutput`.

    Note:
        For ``N`` samples of one prompt, prefill a 1-row cache with :func:`forward` on all but
        the last prompt token, gather it to ``N`` rows (``x[jnp.zeros(N, int)]``) and call
        ``generate`` with the last token as a 1-token prompt: the prompt is processed once.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2 or prompt.shape[1] == 0:
        raise ValueError(f"prompt must be int32[N, P] with P >= 1, got shape {prompt.shape}")
    n, p = prompt.shape
    lengths = np.full((n,), p) if prompt_lengths is None else np.asarray(prompt_lengths)
    if lengths.shape != (n,) or np.any(lengths < 1) or np.any(lengths > p):
        raise ValueError(f"prompt_lengths must be ({n},) values in [1, {p}] (empty prompts have "
                         f"no next-token distribution), got {lengths}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if cache is None:
        cache = init_cache(model.model.config, n, p + max_new_tokens, cache_dtype)
    needed = np.asarray(cache.length) + lengths - 1 + max_new_tokens
    if np.any(needed > cache.max_len):
        raise ValueError(f"prompt + max_new_tokens needs {needed.max()} cache slots, the cache "
                         f"has max_len={cache.max_len}")
    stop = [-1] if eos_id is None else list(np.atleast_1d(eos_id))
    return _generate_jit(model, prompt, jnp.asarray(lengths, jnp.int32), cache, key,
                         jnp.asarray(temperature, jnp.float32), jnp.asarray(stop, jnp.int32),
                         jnp.asarray(pad_id, jnp.int32), max_new_tokens=max_new_tokens)


# --------------------------------------------------------------------------------------------
# Checkpoints (transformers layout, safetensors only)
# --------------------------------------------------------------------------------------------
# Types of the transformers config.json keys :meth:`LMConfig.from_hf_dict` reads (other keys are
# not checked) and the keys it cannot default.
HF_CONFIG_TYPES: dict[str, Any] = {
    "architectures": list[str] | None,
    "model_type": str,
    "vocab_size": int,
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "num_key_value_heads": int | None,
    "head_dim": int | None,
    "hidden_act": str,
    "rope_theta": float,
    "rope_parameters": dict | None,
    "rope_scaling": dict | None,
    "rms_norm_eps": float,
    "tie_word_embeddings": bool,
    "attention_bias": bool,
    "mlp_bias": bool,
    "use_sliding_window": bool | None,
    "layer_types": list[str] | None,
    "max_position_embeddings": int,
    "bos_token_id": int | None,
    "eos_token_id": int | list[int] | None,
    "pad_token_id": int | None,
}
HF_REQUIRED_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                    "num_hidden_layers", "num_attention_heads")


def read_lm_config(path: str | pathlib.Path, allowed: Iterable[str], *,
                   loader: str) -> tuple[str, LMConfig]:
    """Reads and checks a folder's ``config.json`` for a Qwen2 / Llama model.

    Args:
        path: the checkpoint folder.
        allowed: accepted ``architectures`` names.
        loader: the calling loader's name (first word of the messages).

    Returns:
        ``(architecture name, config)``.

    Raises:
        FileNotFoundError: the folder or its ``config.json`` does not exist.
        ValueError: invalid JSON, a missing (:data:`HF_REQUIRED_KEYS`) or wrongly typed
            (:data:`HF_CONFIG_TYPES`) key, or an unsupported architecture/config; every message
            names the folder, the file and the key.
    """
    config_file = read_config_file(path, loader)
    config_file.check(HF_CONFIG_TYPES, HF_REQUIRED_KEYS)
    with config_file.errors():
        architecture = check_architecture(config_file.raw, allowed)
        return architecture, LMConfig.from_hf_dict(config_file.raw)


def check_architecture(raw: dict[str, Any], allowed: Iterable[str]) -> str:
    """Returns the folder's architecture name, raising if it is not one of ``allowed``."""
    allowed = tuple(allowed)
    archs = raw.get("architectures") or [CAUSAL_LM_ARCHITECTURES.get(raw.get("model_type"), "")]
    if len(archs) != 1 or archs[0] not in allowed:
        raise ValueError(f"unsupported architectures {archs}; expected one of {allowed}")
    return archs[0]


def _read_tensors(path: pathlib.Path, loader: str = "load_weights") -> dict[str, Array]:
    files = require_files(path, "*.safetensors", loader, "expected model.safetensors or its "
                          "shards model-*-of-*.safetensors; pickle checkpoints are refused")
    tensors = {}
    for file in files:
        with safetensors_errors(file, loader), safe_open(file, framework="flax") as f:
            tensors |= {name: f.get_tensor(name) for name in f.keys()}
    return tensors


def _name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def load_weights(abstract: nnx.Module, path: str | pathlib.Path, dtype: Any,
                 ignore: Iterable[str] = (), *, loader: str = "load_weights") -> nnx.Module:
    """Fills an abstract module (``nnx.eval_shape``) from a folder's ``*.safetensors``.

    Parameter ``a.b.0.c`` reads tensor ``"a.b.0.c"``; tensors in ``ignore`` or ending in a known
    buffer suffix are skipped, any other unused tensor is an error.

    Raises:
        FileNotFoundError: the folder does not exist or holds no ``*.safetensors``.
        ValueError: naming every missing, mis-shaped or unexpected tensor.
    """
    tensors = _read_tensors(pathlib.Path(path), loader)
    graphdef, state = nnx.split(abstract)
    flat, problems = [], []
    for p, var in nnx.to_flat_state(state):
        name, want = _name(p), var.get_value().shape
        if name not in tensors:
            problems.append(f"missing tensor {name!r} (expected shape {want})")
        elif tensors[name].shape != want:
            problems.append(f"tensor {name!r} has shape {tensors[name].shape}, expected {want}")
        else:
            flat.append((p, var.replace(jnp.asarray(tensors[name], dtype))))
    used = {_name(p) for p, _ in nnx.to_flat_state(state)} | set(ignore)
    extra = sorted(k for k in tensors if k not in used and not k.endswith(_IGNORED_SUFFIXES))
    problems += [f"unexpected tensor {k!r}" for k in extra]
    if problems:
        raise CheckpointError(
            f"{loader}: the *.safetensors in {path} do not match config.json: "
            + "; ".join(problems))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def save_weights(module: nnx.Module, path: str | pathlib.Path, hf_config: dict[str, Any]) -> None:
    """Writes ``config.json`` and ``model.safetensors`` (parameters under their names)."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {_name(p): jnp.asarray(v.get_value())
               for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))


def load_lm(path: str | pathlib.Path, *, dtype: Any = jnp.float32) -> tuple[LMConfig, LM]:
    """Loads a Qwen2 / Llama causal LM from a local transformers folder.

    Args:
        path: folder with ``config.json`` and ``*.safetensors`` (pickle files are never read).
        dtype: parameter dtype.

    Returns:
        ``(config, model)``.

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or its ``*.safetensors`` is missing.
        ValueError: invalid JSON, a missing or wrongly typed config key, an unsupported
            architecture/config (naming the folder, the file and the key), or missing /
            mis-shaped tensors (named).
    """
    _, config = read_lm_config(path, CAUSAL_LM_ARCHITECTURES.values(), loader="load_lm")
    abstract = nnx.eval_shape(lambda: LM(config, rngs=nnx.Rngs(0), dtype=dtype))
    ignore = ("lm_head.weight",) if config.tie_word_embeddings else ()
    return config, load_weights(abstract, path, dtype, ignore, loader="load_lm")


def save_lm(path: str | pathlib.Path, config: LMConfig, model: LM) -> None:
    """Saves ``config.json`` + ``model.safetensors`` loadable by ``AutoModelForCausalLM``."""
    save_weights(model, path, config.to_hf_dict())


# --------------------------------------------------------------------------------------------
# The LanguageModel protocol (what the LM samplers consume)
# --------------------------------------------------------------------------------------------
def _init_cache(model: LM, batch: int, max_len: int, dtype: Any) -> KVCache:
    return init_cache(model.model.config, batch, max_len, dtype)


def _prefill(model: LM, tokens: Array, cache: KVCache, lengths: Array) -> tuple[Array, KVCache]:
    logits, cache = forward(model, tokens, cache, lengths)
    return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0], cache


def language_model(model: LM) -> LanguageModel:
    """``model`` as a :class:`~tts_jax.models.base.LanguageModel` (params: the module itself;
    cache: :class:`KVCache`; prefill: :func:`forward` read at each row's last prompt token;
    decode: :func:`decode_step`). Registered with
    :func:`~tts_jax.models.base.as_language_model`, so the samplers accept an :class:`LM`."""
    return LanguageModel(model, _init_cache, _prefill, decode_step, model.config.vocab_size)


as_language_model.register(LM, language_model)
