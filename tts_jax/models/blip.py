"""BLIP (Li et al. 2022) image encoder and text encoder with cross-attention, in Flax NNX.

The backbone of ImageReward (:mod:`tts_jax.rewards.image_reward`): a ViT image encoder and the
BLIP "med" text encoder (BERT whose every layer cross-attends to the image tokens). Parameters
are stored under transformers' names and PyTorch shapes (``Linear.weight`` is ``[out, in]``), so
loading is a name-for-name copy through :mod:`tts_jax.models.checkpoint`:

- :class:`BlipVisionModel` = transformers' ``BlipVisionModel``: ``embeddings.{class_embedding
  [1, 1, D], patch_embedding.{weight [D, 3, p, p], bias}, position_embedding [1, 1 + P, D]}``,
  ``encoder.layers.{i}.{layer_norm1, self_attn.qkv (fused q, k, v: [3D, D]),
  self_attn.projection, layer_norm2, mlp.fc1, mlp.fc2}``, ``post_layernorm``. Pre-norm blocks;
  the output is ``post_layernorm`` of every token (BLIP's ``visual_encoder`` output).
- :class:`BlipTextModel` = transformers' ``BlipTextModel`` without the pooler (BLIP's
  ``BertModel(add_pooling_layer=False)``): ``embeddings.{word_embeddings, position_embeddings,
  LayerNorm}``, ``encoder.layer.{i}.{attention, crossattention}.{self.{query, key, value},
  output.{dense, LayerNorm}}``, ``encoder.layer.{i}.intermediate.dense``,
  ``encoder.layer.{i}.output.{dense, LayerNorm}``. Post-norm BERT layers: bidirectional
  self-attention over the tokens (padding keys masked), cross-attention to the image tokens
  (keys / values from ``encoder_hidden_size``), GELU MLP.

The original BLIP / ImageReward checkpoints name the image encoder as timm's ViT
(``visual_encoder.{cls_token, pos_embed, patch_embed.proj, blocks.{i}.{norm1, attn.qkv,
attn.proj, norm2, mlp.fc1, mlp.fc2}, norm}``); :func:`timm_vit_to_transformers` renames them.
The text encoder names are the same in both.

Forward passes are pure functions of a module and arrays, to be jitted by the caller:
:func:`blip_vision_apply` and :func:`blip_text_apply`. Precision: parameters and matmuls in the
load dtype; layer-norm statistics, attention scores and softmax in float32.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.models.clip import ACTIVATIONS, LayerNorm, activation, require_multiple
from tts_jax.models.lm.modules import Embedding, Linear

Array = jax.Array

BLIP_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "quick_gelu", "relu")


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlipVisionConfig:
    """The image encoder (transformers' ``BlipVisionConfig`` names; defaults: ImageReward's
    ViT-L/16 at 224 px; BLIP's timm ViT uses ``layer_norm_eps=1e-6``)."""

    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        activation(self.hidden_act, BLIP_ACTIVATIONS)
        require_multiple(self, "hidden_size", "num_attention_heads")
        require_multiple(self, "image_size", "patch_size")

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> BlipVisionConfig:
        """From a transformers ``BlipVisionConfig`` dict (missing keys: defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


@dataclasses.dataclass(frozen=True, kw_only=True)
class BlipTextConfig:
    """The text encoder (transformers' ``BlipTextConfig`` names; defaults: ImageReward's
    ``med_config.json``, BERT-base with cross-attention to a 1024-wide image encoder)."""

    vocab_size: int = 30524
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 512
    encoder_hidden_size: int = 1024
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    def __post_init__(self):
        activation(self.hidden_act, BLIP_ACTIVATIONS)
        require_multiple(self, "hidden_size", "num_attention_heads")

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> BlipTextConfig:
        """From a transformers ``BlipTextConfig`` dict (missing keys: defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


def _attend(q: Array, k: Array, v: Array, heads: int, key_mask: Array | None) -> Array:
    """Scaled dot-product attention: ``q [B, T, D]``, ``k, v [B, S, D]``, ``key_mask bool[B, S]``
    -> ``[B, T, D]`` (scores and softmax in float32)."""
    b, t, d = q.shape
    s = k.shape[1]
    hd = d // heads
    q, k, v = q.reshape(b, t, heads, hd), k.reshape(b, s, heads, hd), v.reshape(b, s, heads, hd)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * hd**-0.5
    if key_mask is not None:
        full = jnp.broadcast_to(key_mask[:, None, None, :], scores.shape)
        scores = jnp.where(full, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)


# --------------------------------------------------------------------------- vision


class _Param(nnx.Module):
    """A convolution as ``weight [D, C, p, p]`` and ``bias [D]`` (applied as a patch matmul)."""

    def __init__(self, weight: Array, bias: Array):
        self.weight = nnx.Param(weight)
        self.bias = nnx.Param(bias)


class BlipVisionEmbeddings(nnx.Module):
    """Class token, patch projection (with bias) and learned positions."""

    def __init__(self, config: BlipVisionConfig, *, rngs: nnx.Rngs, dtype: Any):
        c = config
        d, p = c.hidden_size, c.patch_size
        keys = jax.random.split(rngs.params(), 3)
        self.class_embedding = nnx.Param(
            (0.02 * jax.random.normal(keys[0], (1, 1, d))).astype(dtype)
        )
        w = 0.02 * jax.random.normal(keys[1], (d, c.num_channels, p, p))
        self.patch_embedding = _Param(w.astype(dtype), jnp.zeros((d,), dtype))
        pos = 0.02 * jax.random.normal(keys[2], (1, c.num_positions, d))
        self.position_embedding = nnx.Param(pos.astype(dtype))
        self.patch_size = p

    def __call__(self, pixel_values: Array) -> Array:
        w = self.patch_embedding.weight[...]
        b, c, h, wd = pixel_values.shape
        p = self.patch_size
        patches = pixel_values.astype(w.dtype).reshape(b, c, h // p, p, wd // p, p)
        emb = jnp.einsum("bcipjq,dcpq->bijd", patches, w, preferred_element_type=jnp.float32)
        emb = emb + self.patch_embedding.bias[...].astype(jnp.float32)[None, None, None, :]
        emb = emb.astype(w.dtype).reshape(b, (h // p) * (wd // p), w.shape[0])
        cls = jnp.broadcast_to(self.class_embedding[...], (b, 1, w.shape[0]))
        x = jnp.concatenate([cls, emb], axis=1)
        return x + jnp.broadcast_to(self.position_embedding[...], x.shape)


class BlipAttention(nnx.Module):
    """Self-attention with a fused ``qkv`` projection and an output ``projection``."""

    def __init__(self, hidden: int, heads: int, *, rngs: nnx.Rngs, dtype: Any):
        self.num_heads = heads
        self.qkv = Linear(hidden, 3 * hidden, bias=True, rngs=rngs, dtype=dtype)
        self.projection = Linear(hidden, hidden, bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, d)
        out = _attend(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], self.num_heads, None)
        return self.projection(out)


class BlipMLP(nnx.Module):
    """``fc2(act(fc1(x)))``."""

    def __init__(self, hidden: int, inner: int, act: str, *, rngs: nnx.Rngs, dtype: Any):
        self.act = act
        self.fc1 = Linear(hidden, inner, bias=True, rngs=rngs, dtype=dtype)
        self.fc2 = Linear(inner, hidden, bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class BlipEncoderLayer(nnx.Module):
    """Pre-norm ViT block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, config: BlipVisionConfig, *, rngs: nnx.Rngs, dtype: Any):
        c = config
        self.self_attn = BlipAttention(c.hidden_size, c.num_attention_heads, rngs=rngs, dtype=dtype)
        self.layer_norm1 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
        self.mlp = BlipMLP(c.hidden_size, c.intermediate_size, c.hidden_act, rngs=rngs, dtype=dtype)
        self.layer_norm2 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class BlipEncoder(nnx.Module):
    """The stack of :class:`BlipEncoderLayer` (``layers``)."""

    def __init__(self, config: BlipVisionConfig, *, rngs: nnx.Rngs, dtype: Any):
        n = config.num_hidden_layers
        self.layers = nnx.List([BlipEncoderLayer(config, rngs=rngs, dtype=dtype) for _ in range(n)])

    def __call__(self, x: Array) -> Array:
        for layer in self.layers:
            x = layer(x)
        return x


class BlipVisionModel(nnx.Module):
    """transformers' ``BlipVisionModel``: ``embeddings``, ``encoder``, ``post_layernorm``."""

    def __init__(self, config: BlipVisionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        self.embeddings = BlipVisionEmbeddings(config, rngs=rngs, dtype=dtype)
        self.encoder = BlipEncoder(config, rngs=rngs, dtype=dtype)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, dtype=dtype)


def blip_vision_apply(model: BlipVisionModel, pixel_values: Array) -> Array:
    """``[B, 1 + P, D]`` image tokens (``post_layernorm`` of every token: transformers'
    ``last_hidden_state``, BLIP's ``visual_encoder(image)``) of normalized ``pixel_values
    [B, C, S, S]`` (``S`` the config's ``image_size``).

    Raises:
        ValueError: the images are not ``num_channels x image_size x image_size``.
    """
    c = model.config
    want = (c.num_channels, c.image_size, c.image_size)
    if tuple(pixel_values.shape[1:]) != want:
        raise ValueError(
            f"pixel_values must be [B, {', '.join(map(str, want))}], got {pixel_values.shape}"
        )
    return model.post_layernorm(model.encoder(model.embeddings(pixel_values)))


# --------------------------------------------------------------------------- text


class BlipTextSelfAttention(nnx.Module):
    """``query`` from the text, ``key`` / ``value`` from the text or (cross) the image."""

    def __init__(self, hidden: int, kv_width: int, heads: int, *, rngs: nnx.Rngs, dtype: Any):
        self.num_heads = heads
        self.query = Linear(hidden, hidden, bias=True, rngs=rngs, dtype=dtype)
        self.key = Linear(kv_width, hidden, bias=True, rngs=rngs, dtype=dtype)
        self.value = Linear(kv_width, hidden, bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array, context: Array, key_mask: Array | None) -> Array:
        q, k, v = self.query(x), self.key(context), self.value(context)
        return _attend(q, k, v, self.num_heads, key_mask)


class BlipTextSelfOutput(nnx.Module):
    """``LayerNorm(dense(h) + residual)`` (BERT's post-norm)."""

    def __init__(self, hidden: int, inner: int, eps: float, *, rngs: nnx.Rngs, dtype: Any):
        self.dense = Linear(inner, hidden, bias=True, rngs=rngs, dtype=dtype)
        self.LayerNorm = LayerNorm(hidden, eps=eps, dtype=dtype)

    def __call__(self, h: Array, residual: Array) -> Array:
        return self.LayerNorm(self.dense(h) + residual)


class BlipTextAttention(nnx.Module):
    """``self`` (attention) then ``output`` (dense, residual, LayerNorm)."""

    def __init__(self, config: BlipTextConfig, kv_width: int, *, rngs: nnx.Rngs, dtype: Any):
        c = config
        h = c.hidden_size
        self.self = BlipTextSelfAttention(
            h, kv_width, c.num_attention_heads, rngs=rngs, dtype=dtype
        )
        self.output = BlipTextSelfOutput(h, h, c.layer_norm_eps, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array, context: Array, key_mask: Array | None) -> Array:
        return self.output(self.self(x, context, key_mask), x)


class _Dense(nnx.Module):
    def __init__(self, a: int, b: int, *, rngs: nnx.Rngs, dtype: Any):
        self.dense = Linear(a, b, bias=True, rngs=rngs, dtype=dtype)


class BlipTextLayer(nnx.Module):
    """Self-attention, cross-attention to the image, MLP (each post-norm with a residual)."""

    def __init__(self, config: BlipTextConfig, *, rngs: nnx.Rngs, dtype: Any):
        c = config
        self.act = c.hidden_act
        self.attention = BlipTextAttention(c, c.hidden_size, rngs=rngs, dtype=dtype)
        self.crossattention = BlipTextAttention(c, c.encoder_hidden_size, rngs=rngs, dtype=dtype)
        self.intermediate = _Dense(c.hidden_size, c.intermediate_size, rngs=rngs, dtype=dtype)
        self.output = BlipTextSelfOutput(
            c.hidden_size, c.intermediate_size, c.layer_norm_eps, rngs=rngs, dtype=dtype
        )

    def __call__(self, x: Array, mask: Array | None, image: Array, image_mask: Array | None):
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image, image_mask)
        return self.output(ACTIVATIONS[self.act](self.intermediate.dense(x)), x)


class BlipTextEmbeddings(nnx.Module):
    """``LayerNorm(word + position)`` embeddings (absolute positions, no token types)."""

    def __init__(self, config: BlipTextConfig, *, rngs: nnx.Rngs, dtype: Any):
        c = config
        self.word_embeddings = Embedding(c.vocab_size, c.hidden_size, rngs=rngs, dtype=dtype)
        self.position_embeddings = Embedding(
            c.max_position_embeddings, c.hidden_size, rngs=rngs, dtype=dtype
        )
        self.LayerNorm = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)

    def __call__(self, input_ids: Array) -> Array:
        t = input_ids.shape[-1]
        x = self.word_embeddings(input_ids)
        x = x + jnp.broadcast_to(self.position_embeddings.weight[...][:t][None], x.shape)
        return self.LayerNorm(x)


class BlipTextEncoder(nnx.Module):
    """The stack of :class:`BlipTextLayer` (``layer``, BERT's name)."""

    def __init__(self, config: BlipTextConfig, *, rngs: nnx.Rngs, dtype: Any):
        n = config.num_hidden_layers
        self.layer = nnx.List([BlipTextLayer(config, rngs=rngs, dtype=dtype) for _ in range(n)])


class BlipTextModel(nnx.Module):
    """transformers' ``BlipTextModel(add_pooling_layer=False)``: ``embeddings``, ``encoder``."""

    def __init__(self, config: BlipTextConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        self.embeddings = BlipTextEmbeddings(config, rngs=rngs, dtype=dtype)
        self.encoder = BlipTextEncoder(config, rngs=rngs, dtype=dtype)


def blip_text_apply(
    model: BlipTextModel,
    input_ids: Array,
    attention_mask: Array | None,
    image_embeds: Array,
    image_mask: Array | None = None,
) -> Array:
    """``[B, T, D]`` text states cross-attending to the image (transformers'
    ``BlipTextModel(input_ids, attention_mask, encoder_hidden_states=image_embeds,
    encoder_attention_mask=image_mask).last_hidden_state``, bidirectional).

    Args:
        model: :class:`BlipTextModel`.
        input_ids: ``int32[B, T]`` (``T <= max_position_embeddings``).
        attention_mask: ``[B, T]`` 1 = token, 0 = padding, or ``None`` (all tokens).
        image_embeds: ``[B, S, encoder_hidden_size]`` (:func:`blip_vision_apply`).
        image_mask: ``[B, S]`` or ``None`` (all image tokens).
    """
    t = input_ids.shape[1]
    if t > model.config.max_position_embeddings:
        raise ValueError(
            f"sequence length {t} exceeds max_position_embeddings="
            f"{model.config.max_position_embeddings}"
        )
    mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
    img_mask = None if image_mask is None else jnp.asarray(image_mask).astype(bool)
    x = model.embeddings(input_ids)
    image = image_embeds.astype(x.dtype)
    for layer in model.encoder.layer:
        x = layer(x, mask, image, img_mask)
    return x


# --------------------------------------------------------------------------- timm names


def timm_vit_names(config: BlipVisionConfig) -> list[str]:
    """Every tensor name of BLIP's timm ViT (``visual_encoder`` without the prefix)."""
    names = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(config.num_hidden_layers):
        for part in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            names += [f"blocks.{i}.{part}.weight", f"blocks.{i}.{part}.bias"]
    return names + ["norm.weight", "norm.bias"]


_TIMM_BLOCK = {
    "norm1": "layer_norm1",
    "attn.qkv": "self_attn.qkv",
    "attn.proj": "self_attn.projection",
    "norm2": "layer_norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}


def timm_vit_name(name: str) -> str:
    """BLIP's timm ViT name -> transformers ``BlipVisionModel`` name (unknown names unchanged)."""
    fixed = {
        "cls_token": "embeddings.class_embedding",
        "pos_embed": "embeddings.position_embedding",
        "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
        "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
        "norm.weight": "post_layernorm.weight",
        "norm.bias": "post_layernorm.bias",
    }
    if name in fixed:
        return fixed[name]
    parts = name.split(".")
    if len(parts) >= 4 and parts[0] == "blocks":
        inner, leaf = ".".join(parts[2:-1]), parts[-1]
        if inner in _TIMM_BLOCK:
            return f"encoder.layers.{parts[1]}.{_TIMM_BLOCK[inner]}.{leaf}"
    return name


def timm_vit_to_transformers(tensors: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Renames BLIP's timm ViT tensors (no prefix) to :class:`BlipVisionModel` names."""
    return {timm_vit_name(k): v for k, v in tensors.items()}
