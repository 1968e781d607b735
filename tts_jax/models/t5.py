"""The T5 encoder (Raffel et al. 2020) and UMT5 encoder (Chung et al. 2023, "UniMax") in Flax
NNX, read from transformers folders.

This is the long-prompt text encoder of the SD3 and FLUX pipelines (T5 v1.1 XXL:
``feed_forward_proj = "gated-gelu"``, Shazeer 2020 "GLU Variants") and of Wan 2.1 (UMT5-XXL,
transformers' ``UMT5EncoderModel``, ``model_type = "umt5"``); the original T5's ReLU
feed-forward is supported too. What the pipelines read is ``last_hidden_state``
(:class:`T5EncoderOutput`).

The network, as in transformers' ``T5EncoderModel``: token embeddings (``shared``), then per
block a pre-norm self-attention and a pre-norm feed-forward sublayer with residuals, then a final
norm. T5 specifics:

- the norm is T5's RMS-style LayerNorm (no mean subtraction, no bias; Zhang & Sennrich 2019);
- attention has no bias and **no** ``1/sqrt(d)`` scaling (folded into the initialization);
- positions enter only through a learned relative position bias: relative distances are binned
  into ``relative_attention_num_buckets`` log-spaced buckets (exact up to half the buckets, then
  logarithmic up to ``relative_attention_max_distance``, one bucket set per direction), and the
  bias table of the **first** block's attention is added to the scores of every block. UMT5
  differs only there: every block's attention has a bias table of its own
  (:attr:`T5Config.position_bias_per_layer`, set from ``model_type = "umt5"``).

Parameters keep transformers' names and PyTorch shapes (``Linear.weight`` is ``[out, in]``), so
loading is a name-for-name copy (:mod:`tts_jax.models.checkpoint`; docs/design.md, "Models we
ship"). Folders hold ``shared.weight`` (transformers 5) and/or its tied copy
``encoder.embed_tokens.weight`` (earlier versions, e.g. the SD3/FLUX ``text_encoder_3`` /
``text_encoder_2`` folders); either loads. A full encoder-decoder folder loads its encoder (the
``decoder.*`` and ``lm_head.*`` tensors are skipped).

Precision: with ``dtype=jnp.bfloat16`` the matmul weights are bfloat16, while the norm weights,
the position bias table, the norm statistics, the residual stream, the attention scores and the
softmax stay float32.
(T5 is known to overflow in float16; transformers also keeps its norms and ``wo`` in float32 in
half precision.) ``last_hidden_state`` is returned in ``dtype``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.models.checkpoint import (
    IDENTITY,
    WEIGHTS_NAME,
    load_params,
    read_config_file,
    read_tensors,
)
from tts_jax.models.clip import ACTIVATIONS
from tts_jax.models.lm.modules import Embedding, Linear

Array = jax.Array

SUPPORTED_MODEL_TYPES = ("t5", "mt5", "umt5")
T5_ACTIVATIONS = ("relu", "gelu", "gelu_new", "silu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class T5Config:
    """The T5 encoder (transformers' ``T5Config`` field names and defaults).

    Attributes:
        vocab_size, d_model, d_kv, d_ff: widths (attention width is ``num_heads * d_kv``, which
            need not equal ``d_model``).
        num_layers, num_heads: encoder depth and heads.
        relative_attention_num_buckets, relative_attention_max_distance: the position buckets.
        layer_norm_epsilon: RMS norm epsilon.
        feed_forward_proj: ``"<act>"`` or ``"gated-<act>"`` with ``<act>`` in
            :data:`T5_ACTIVATIONS`; ``"gated-gelu"`` means the tanh GELU (``gelu_new``), as in
            transformers.
        position_bias_per_layer: every block has its own relative position bias table (UMT5;
            not a transformers key: :meth:`from_hf_dict` sets it from ``model_type``); ``False``
            is T5's single table in the first block, shared by all.
    """

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    position_bias_per_layer: bool = False

    def __post_init__(self):
        self.activation  # noqa: B018 - validates feed_forward_proj
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"T5Config.{name} must be positive, got {getattr(self, name)}")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_max_distance < 2:
            raise ValueError(
                "relative_attention_num_buckets must be >= 4 and relative_attention_max_distance "
                f">= 2, got {self.relative_attention_num_buckets}, "
                f"{self.relative_attention_max_distance}"
            )

    @property
    def is_gated(self) -> bool:
        return self.feed_forward_proj.startswith("gated-")

    @property
    def activation(self) -> str:
        """transformers' ``dense_act_fn`` name of the feed-forward activation."""
        parts = self.feed_forward_proj.split("-")
        if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
            raise ValueError(
                "feed_forward_proj must be '<act>' or 'gated-<act>', "
                f"got {self.feed_forward_proj!r}"
            )
        act = "gelu_new" if self.feed_forward_proj == "gated-gelu" else parts[-1]
        if act not in T5_ACTIVATIONS:
            raise ValueError(
                f"unsupported activation {act!r} (feed_forward_proj={self.feed_forward_proj!r}); "
                f"supported: {T5_ACTIVATIONS}"
            )
        return act

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> T5Config:
        """From a transformers ``config.json`` dict (missing keys take the defaults).

        Raises:
            ValueError: another ``model_type``, or an unsupported ``feed_forward_proj``.
        """
        if d.get("model_type") not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"unsupported model_type {d.get('model_type')!r}; expected one of "
                f"{SUPPORTED_MODEL_TYPES}"
            )
        names = {f.name for f in dataclasses.fields(cls)} - {"position_bias_per_layer"}
        fields = {k: v for k, v in d.items() if k in names and v is not None}
        return cls(**fields, position_bias_per_layer=d["model_type"] == "umt5")


T5_CONFIG_TYPES: dict[str, Any] = {
    "model_type": str,
    "vocab_size": int,
    "d_model": int,
    "d_kv": int,
    "d_ff": int,
    "num_layers": int,
    "num_heads": int,
    "relative_attention_num_buckets": int,
    "relative_attention_max_distance": int,
    "layer_norm_epsilon": float,
    "feed_forward_proj": str,
}


# --------------------------------------------------------------------------- modules


class T5LayerNorm(nnx.Module):
    """``weight * x / rms(x)`` (no mean, no bias); weight and statistics in float32."""

    def __init__(self, features: int, *, eps: float):
        self.weight = nnx.Param(jnp.ones((features,), jnp.float32))
        self.eps = eps

    def __call__(self, x: Array, out_dtype: Any) -> Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (jnp.broadcast_to(self.weight[...], y.shape) * y).astype(out_dtype)


def relative_position_buckets(
    length: int, num_buckets: int, max_distance: int, bidirectional: bool = True
) -> np.ndarray:
    """``int32[length, length]`` bucket of ``key - query`` distances (static, numpy float32 as in
    transformers' ``_relative_position_bucket``)."""
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]
    buckets = np.zeros_like(rel)
    if bidirectional:
        num_buckets //= 2
        buckets += (rel > 0).astype(rel.dtype) * num_buckets
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    max_exact = num_buckets // 2
    scaled = np.log(np.maximum(rel, 1).astype(np.float32) / np.float32(max_exact))
    scaled = scaled / np.float32(math.log(max_distance / max_exact))
    large = max_exact + (scaled * np.float32(num_buckets - max_exact)).astype(rel.dtype)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(rel < max_exact, rel, large)).astype(np.int32)


class T5Attention(nnx.Module):
    """Bias-free, unscaled multi-head self-attention (``q``, ``k``, ``v``, ``o``); the first
    block's (UMT5: every block's) also holds ``relative_attention_bias: [num_buckets,
    num_heads]``."""

    def __init__(self, config: T5Config, *, has_bias: bool, rngs: nnx.Rngs, dtype: Any):
        c = config
        inner = c.num_heads * c.d_kv
        self.num_heads, self.d_kv = c.num_heads, c.d_kv
        self.q = Linear(c.d_model, inner, bias=False, rngs=rngs, dtype=dtype)
        self.k = Linear(c.d_model, inner, bias=False, rngs=rngs, dtype=dtype)
        self.v = Linear(c.d_model, inner, bias=False, rngs=rngs, dtype=dtype)
        self.o = Linear(inner, c.d_model, bias=False, rngs=rngs, dtype=dtype)
        self.relative_attention_bias = (
            Embedding(c.relative_attention_num_buckets, c.num_heads, rngs=rngs, dtype=jnp.float32)
            if has_bias
            else None
        )

    def position_bias(self, config: T5Config, length: int) -> Array:
        """``float32[heads, T, T]`` the bias of every (query, key) pair."""
        buckets = relative_position_buckets(
            length, config.relative_attention_num_buckets, config.relative_attention_max_distance
        )
        table = self.relative_attention_bias.weight[...].astype(jnp.float32)
        return jnp.transpose(jnp.take(table, jnp.asarray(buckets), axis=0), (2, 0, 1))

    def __call__(self, x: Array, bias: Array) -> Array:
        """``x: [B, T, d_model]`` (compute dtype), ``bias: float32[B, heads, T, T]`` (position
        bias plus the padding mask) -> ``[B, T, d_model]``."""
        b, t, _ = x.shape
        shape = (b, t, self.num_heads, self.d_kv)
        q, k, v = (proj(x).reshape(shape) for proj in (self.q, self.k, self.v))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        probs = jax.nn.softmax(scores + bias, axis=-1).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, self.num_heads * self.d_kv)
        return self.o(out)


class T5LayerSelfAttention(nnx.Module):
    """``layer_norm`` then ``SelfAttention``."""

    def __init__(self, config: T5Config, *, has_bias: bool, rngs: nnx.Rngs, dtype: Any):
        self.SelfAttention = T5Attention(config, has_bias=has_bias, rngs=rngs, dtype=dtype)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)


class T5DenseActDense(nnx.Module):
    """``wo(act(wi(x)))`` (original T5, ReLU)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, dtype: Any):
        self.act = config.activation
        self.wi = Linear(config.d_model, config.d_ff, bias=False, rngs=rngs, dtype=dtype)
        self.wo = Linear(config.d_ff, config.d_model, bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        return self.wo(ACTIVATIONS[self.act](self.wi(x)))


class T5DenseGatedActDense(nnx.Module):
    """``wo(act(wi_0(x)) * wi_1(x))`` (T5 v1.1, gated GELU)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, dtype: Any):
        self.act = config.activation
        self.wi_0 = Linear(config.d_model, config.d_ff, bias=False, rngs=rngs, dtype=dtype)
        self.wi_1 = Linear(config.d_model, config.d_ff, bias=False, rngs=rngs, dtype=dtype)
        self.wo = Linear(config.d_ff, config.d_model, bias=False, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        return self.wo(ACTIVATIONS[self.act](self.wi_0(x)) * self.wi_1(x))


class T5LayerFF(nnx.Module):
    """``layer_norm`` then ``DenseReluDense`` (gated or not, per the config)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, dtype: Any):
        dense = T5DenseGatedActDense if config.is_gated else T5DenseActDense
        self.DenseReluDense = dense(config, rngs=rngs, dtype=dtype)
        self.layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)


class T5Block(nnx.Module):
    """``layer[0]`` self-attention, ``layer[1]`` feed-forward, each ``x + f(norm(x))``."""

    def __init__(self, config: T5Config, *, has_bias: bool, rngs: nnx.Rngs, dtype: Any):
        self.layer = nnx.List(
            [
                T5LayerSelfAttention(config, has_bias=has_bias, rngs=rngs, dtype=dtype),
                T5LayerFF(config, rngs=rngs, dtype=dtype),
            ]
        )

    def __call__(self, h: Array, bias: Array, dtype: Any) -> Array:
        """``h``: float32 residual stream ``[B, T, d_model]``; matmuls in ``dtype``."""
        attn, ff = self.layer[0], self.layer[1]
        h = h + attn.SelfAttention(attn.layer_norm(h, dtype), bias).astype(jnp.float32)
        return h + ff.DenseReluDense(ff.layer_norm(h, dtype)).astype(jnp.float32)


class T5Stack(nnx.Module):
    """transformers' ``encoder``: ``block`` list and ``final_layer_norm`` (the token embedding is
    the model's ``shared``)."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, dtype: Any):
        self.block = nnx.List(
            [
                T5Block(
                    config,
                    has_bias=config.position_bias_per_layer or i == 0,
                    rngs=rngs,
                    dtype=dtype,
                )
                for i in range(config.num_layers)
            ]
        )
        self.final_layer_norm = T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)


class T5EncoderModel(nnx.Module):
    """``shared`` token embedding and the ``encoder`` stack."""

    def __init__(self, config: T5Config, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        self.dtype = jnp.dtype(dtype).name
        self.shared = Embedding(config.vocab_size, config.d_model, rngs=rngs, dtype=dtype)
        self.encoder = T5Stack(config, rngs=rngs, dtype=dtype)


class T5EncoderOutput(NamedTuple):
    """Outputs of :func:`t5_encoder_apply`.

    Attributes:
        last_hidden_state: ``[B, T, d_model]`` after the final norm (SD3's and FLUX's T5 prompt
            embedding), in the model's dtype.
        hidden_states: ``L + 1`` arrays as transformers returns them: the embeddings, the
            outputs of blocks ``1 .. L-1`` (float32 residual stream, no norm), then
            ``last_hidden_state`` itself (the last block's un-normed output is not returned).
    """

    last_hidden_state: Array
    hidden_states: tuple[Array, ...]


def t5_encoder_apply(
    model: T5EncoderModel, input_ids: Array, attention_mask: Array | None = None
) -> T5EncoderOutput:
    """The encoder on ``input_ids int32[B, T]``.

    Args:
        model: a loaded :class:`T5EncoderModel`.
        input_ids: token ids (SD3/FLUX pad to 256 or 512 tokens and pass no mask).
        attention_mask: optional ``[B, T]`` 1 = token, 0 = padding (padding keys are masked).

    Returns:
        :class:`T5EncoderOutput`.
    """
    config, dtype = model.config, jnp.dtype(model.dtype)
    input_ids = jnp.asarray(input_ids)
    b, t = input_ids.shape
    shape = (b, config.num_heads, t, t)

    def scores_bias(block: T5Block) -> Array:
        """``float32[B, heads, T, T]``: the block's position bias plus the padding mask."""
        table = block.layer[0].SelfAttention.position_bias(config, t)
        bias = jnp.broadcast_to(table[None], shape)
        if attention_mask is None:
            return bias
        keys = jnp.asarray(attention_mask).astype(bool)[:, None, None, :]
        return jnp.where(jnp.broadcast_to(keys, shape), bias, jnp.finfo(jnp.float32).min)

    shared_bias = None if config.position_bias_per_layer else scores_bias(model.encoder.block[0])
    h = model.shared(input_ids).astype(jnp.float32)
    states = [h]
    for block in model.encoder.block:
        bias = scores_bias(block) if shared_bias is None else shared_bias
        states.append(block(states[-1], bias, dtype))
    last = model.encoder.final_layer_norm(states[-1], dtype)
    return T5EncoderOutput(last, (*states[:-1], last))


# --------------------------------------------------------------------------- loading

_SKIPPED_PREFIXES = ("decoder.", "lm_head.")


def load_t5_encoder(
    path: str | Path, dtype: Any = jnp.float32, *, loader: str = "load_t5_encoder"
) -> T5EncoderModel:
    """Loads a T5 encoder from a transformers folder (``T5EncoderModel`` / ``UMT5EncoderModel``,
    or the encoder of a ``T5ForConditionalGeneration`` / ``T5Model`` and their UMT5 twins;
    ``model_type`` ``"t5"``, ``"mt5"`` or ``"umt5"``).

    Args:
        path: folder with ``config.json`` and ``model.safetensors`` (or its shards).
        dtype: matmul weight dtype (``jnp.float32`` or ``jnp.bfloat16``; norms stay float32).

    Raises:
        FileNotFoundError: the folder, its config or its weights are missing.
        ValueError: (named subclasses of :class:`~tts_jax.models.checkpoint.CheckpointError`)
            a wrong ``model_type``, an unsupported ``feed_forward_proj``, a wrongly typed key, or
            missing / mis-shaped / unexpected tensors.
    """
    config_file = read_config_file(path, loader)
    config_file.check(T5_CONFIG_TYPES, ("model_type",))
    with config_file.errors():
        config = T5Config.from_hf_dict(config_file.raw)
    tensors = read_tensors(path, loader, WEIGHTS_NAME)
    tied = "encoder.embed_tokens.weight"
    ignore = [k for k in tensors if k.startswith(_SKIPPED_PREFIXES)]
    layout = IDENTITY
    if "shared.weight" in tensors:
        ignore.append(tied)
    elif tied in tensors:
        layout = dataclasses.replace(IDENTITY, rename=lambda n: tied if n == "shared.weight" else n)
    abstract = nnx.eval_shape(lambda: T5EncoderModel(config, rngs=nnx.Rngs(0), dtype=dtype))
    return load_params(abstract, tensors, layout, ignore=ignore)
