"""CLIP (Radford et al. 2021) text and vision towers in Flax NNX, read from transformers folders.

The text tower is the prompt encoder of the SD3 and FLUX pipelines; the two towers together are
the backbone of the CLIP-family rewards (CLIPScore, PickScore, the LAION aesthetic predictor,
:mod:`tts_jax.rewards.clip`). Every parameter is stored under its transformers name and PyTorch
shape (``Linear.weight`` is ``[out, in]``, the patch convolution ``[D, C, p, p]``), so loading is
a name-for-name copy through :mod:`tts_jax.models.checkpoint` (see docs/design.md, "Models we
ship").

Modules (parameters only) and what a folder's ``architectures`` loads as:

- :class:`CLIPTextModel` (``text_model``), :class:`CLIPTextModelWithProjection` (plus
  ``text_projection``), read by :func:`load_clip_text`;
- :class:`CLIPVisionModel` (``vision_model``), :class:`CLIPVisionModelWithProjection` (plus
  ``visual_projection``), read by :func:`load_clip_vision`;
- :class:`CLIPModel` (both towers, both projections, ``logit_scale``), read by :func:`load_clip`.

The forward passes are pure functions of a module (a pytree) and arrays, to be jitted by the
caller: :func:`clip_text_apply` (``input_ids int32[B, T]`` -> :class:`CLIPTextOutput`),
:func:`clip_vision_apply` (``pixel_values [B, C, H, W]`` -> :class:`CLIPVisionOutput`) and
:func:`clip_apply` (both, -> :class:`CLIPOutput` with the image-text logits).

What the pipelines read from the text outputs (diffusers' ``_get_clip_prompt_embeds``): SD3 takes
``hidden_states[-2]`` (the input of the last layer, no final norm) as the token embeddings and
``text_embeds`` of the projection model as the pooled embedding; FLUX takes ``pooler_output`` of
:class:`CLIPTextModel`. The pooled token is the end-of-text token, found as transformers does:
with ``eos_token_id == 2`` (configs written before the tokenizer fix) the position of the largest
token id (the end-of-text id is the largest in CLIP's vocabulary), otherwise the first position
of ``eos_token_id``.

Precision: parameters and matmuls are in the load ``dtype``; layer-norm statistics, attention
scores and the softmax are float32 (as transformers does in bfloat16).

Folders written by transformers 5 for the bare towers (``CLIPTextModel``, ``CLIPVisionModel``)
have no ``text_model.`` / ``vision_model.`` prefix, those of earlier versions (e.g. the SD3 and
FLUX text encoders on the Hub) do; both load.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from tts_jax.models.checkpoint import (
    IDENTITY,
    WEIGHTS_NAME,
    ConfigFile,
    Layout,
    check_config,
    load_params,
    read_config_file,
    read_tensors,
)
from tts_jax.models.lm.modules import Embedding, Linear

Array = jax.Array


def _quick_gelu(x: Array) -> Array:
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "quick_gelu": _quick_gelu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}
"""transformers' ``ACT2FN`` names we implement (``gelu`` is the exact erf form, ``gelu_new`` /
``gelu_pytorch_tanh`` / ``gelu_fast`` the tanh approximation)."""

CLIP_ACTIVATIONS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast")
TEXT_MODEL_TYPE = "clip_text_model"
VISION_MODEL_TYPE = "clip_vision_model"
CLIP_MODEL_TYPE = "clip"
TEXT_ARCHITECTURES = ("CLIPTextModel", "CLIPTextModelWithProjection")
VISION_ARCHITECTURES = ("CLIPVisionModel", "CLIPVisionModelWithProjection")
LEGACY_EOS_TOKEN_ID = 2


def require_multiple(config: Any, name: str, of: str) -> None:
    """Raise ``ValueError`` naming both fields unless ``config.<name>`` is a multiple of
    ``config.<of>`` (e.g. the width of a tower and its attention heads)."""
    value, divisor = getattr(config, name), getattr(config, of)
    if value % divisor:
        raise ValueError(f"{name}={value} is not a multiple of {of}={divisor}")


def activation(name: str, allowed: tuple[str, ...] = CLIP_ACTIVATIONS) -> Callable[[Array], Array]:
    """The activation function of transformers' name ``name``.

    Raises:
        ValueError: ``name`` is not in ``allowed``.
    """
    if name not in allowed:
        raise ValueError(f"unsupported activation {name!r}; supported: {allowed}")
    return ACTIVATIONS[name]


# --------------------------------------------------------------------------- configs


def _positive(obj: Any, names: tuple[str, ...]) -> None:
    for name in names:
        if getattr(obj, name) <= 0:
            raise ValueError(
                f"{type(obj).__name__}.{name} must be positive, got {getattr(obj, name)}"
            )


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPTextConfig:
    """The text tower (transformers' ``CLIPTextConfig`` field names and defaults).

    Attributes:
        vocab_size, hidden_size, intermediate_size: widths.
        num_hidden_layers, num_attention_heads: depth and heads.
        max_position_embeddings: longest sequence (77 for CLIP).
        hidden_act: MLP activation, one of :data:`CLIP_ACTIVATIONS`.
        layer_norm_eps: LayerNorm epsilon.
        eos_token_id: end-of-text id; ``2`` selects the legacy argmax pooling.
        projection_dim: width of ``text_projection`` (projection models only).
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    projection_dim: int = 512

    def __post_init__(self):
        activation(self.hidden_act)
        _positive(
            self,
            (
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "max_position_embeddings",
                "projection_dim",
            ),
        )
        require_multiple(self, "hidden_size", "num_attention_heads")

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> CLIPTextConfig:
        """From a transformers ``CLIPTextConfig`` dict (missing keys take the defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names and v is not None}
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPVisionConfig:
    """The vision tower (transformers' ``CLIPVisionConfig`` field names and defaults).

    Attributes:
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads: as for text.
        image_size: input side in pixels (inputs must have exactly this size).
        patch_size: side of the square patches (the convolution's kernel and stride).
        num_channels: input channels.
        hidden_act, layer_norm_eps, projection_dim: as for text.
    """

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512

    def __post_init__(self):
        activation(self.hidden_act)
        _positive(
            self,
            (
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "image_size",
                "patch_size",
                "num_channels",
                "projection_dim",
            ),
        )
        require_multiple(self, "hidden_size", "num_attention_heads")
        require_multiple(self, "image_size", "patch_size")

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> CLIPVisionConfig:
        """From a transformers ``CLIPVisionConfig`` dict (missing keys take the defaults)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPConfig:
    """Both towers of a ``CLIPModel`` and the shared embedding space.

    Attributes:
        text, vision: the towers.
        projection_dim: width of the joint embedding space.
        logit_scale_init_value: recorded (the loaded ``logit_scale`` tensor is used).
    """

    text: CLIPTextConfig
    vision: CLIPVisionConfig
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592


TEXT_CONFIG_TYPES: dict[str, Any] = {
    "model_type": str,
    "architectures": list[str] | None,
    "vocab_size": int,
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "max_position_embeddings": int,
    "hidden_act": str,
    "layer_norm_eps": float,
    "eos_token_id": int | None,
    "projection_dim": int,
}
VISION_CONFIG_TYPES: dict[str, Any] = {
    "model_type": str,
    "architectures": list[str] | None,
    "hidden_size": int,
    "intermediate_size": int,
    "num_hidden_layers": int,
    "num_attention_heads": int,
    "image_size": int,
    "patch_size": int,
    "num_channels": int,
    "hidden_act": str,
    "layer_norm_eps": float,
    "projection_dim": int,
}
CLIP_CONFIG_TYPES: dict[str, Any] = {
    "model_type": str,
    "architectures": list[str] | None,
    "text_config": dict,
    "vision_config": dict,
    "projection_dim": int,
    "logit_scale_init_value": float,
}


def _check_model_type(raw: Mapping[str, Any], allowed: tuple[str, ...]) -> str:
    model_type = raw.get("model_type")
    if model_type not in allowed:
        raise ValueError(f"unsupported model_type {model_type!r}; expected one of {allowed}")
    return model_type


def _read_folder_config(path: str | Path, loader: str, allowed: tuple[str, ...]) -> ConfigFile:
    """Reads ``config.json`` and checks its ``model_type`` against ``allowed``."""
    config_file = read_config_file(path, loader)
    config_file.check({"model_type": str}, ("model_type",))
    with config_file.errors():
        _check_model_type(config_file.raw, allowed)
    return config_file


def _parse_clip(config_file: ConfigFile) -> CLIPConfig:
    """The :class:`CLIPConfig` of a ``"clip"`` config file (nested towers type-checked)."""
    raw = config_file.check(CLIP_CONFIG_TYPES)
    text_raw, vision_raw = raw.get("text_config") or {}, raw.get("vision_config") or {}
    check_config(text_raw, TEXT_CONFIG_TYPES, (), f'{config_file.where}, "text_config"')
    check_config(vision_raw, VISION_CONFIG_TYPES, (), f'{config_file.where}, "vision_config"')
    projection_dim = raw.get("projection_dim", 512)
    with config_file.errors():
        return CLIPConfig(
            text=CLIPTextConfig.from_hf_dict({**text_raw, "projection_dim": projection_dim}),
            vision=CLIPVisionConfig.from_hf_dict({**vision_raw, "projection_dim": projection_dim}),
            projection_dim=projection_dim,
            logit_scale_init_value=raw.get("logit_scale_init_value", 2.6592),
        )


# --------------------------------------------------------------------------- modules


class LayerNorm(nnx.Module):
    """LayerNorm (Ba et al. 2016) with ``weight`` and ``bias``; statistics in float32."""

    def __init__(self, features: int, *, eps: float, dtype: Any = jnp.float32):
        self.weight = nnx.Param(jnp.ones((features,), dtype))
        self.bias = nnx.Param(jnp.zeros((features,), dtype))
        self.eps = eps

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        centred = xf - mean
        var = jnp.mean(jnp.square(centred), axis=-1, keepdims=True)
        y = centred * jax.lax.rsqrt(var + self.eps)
        w = jnp.broadcast_to(self.weight[...].astype(jnp.float32), y.shape)
        b = jnp.broadcast_to(self.bias[...].astype(jnp.float32), y.shape)
        return (y * w + b).astype(x.dtype)


class CLIPAttention(nnx.Module):
    """Multi-head self-attention with biased q/k/v/out projections, scaled by ``head_dim**-0.5``."""

    def __init__(self, hidden: int, heads: int, *, rngs: nnx.Rngs, dtype: Any):
        self.num_heads, self.head_dim = heads, hidden // heads
        self.q_proj = Linear(hidden, hidden, bias=True, rngs=rngs, dtype=dtype)
        self.k_proj = Linear(hidden, hidden, bias=True, rngs=rngs, dtype=dtype)
        self.v_proj = Linear(hidden, hidden, bias=True, rngs=rngs, dtype=dtype)
        self.out_proj = Linear(hidden, hidden, bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array, mask: Array | None) -> Array:
        """``x: [B, T, D]``, ``mask: bool[B, T, T]`` (query, key) or ``None`` -> ``[B, T, D]``."""
        b, t, d = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q = self.q_proj(x).reshape(shape)
        k = self.k_proj(x).reshape(shape)
        v = self.v_proj(x).reshape(shape)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores * self.head_dim**-0.5
        if mask is not None:
            full = jnp.broadcast_to(mask[:, None], scores.shape)
            scores = jnp.where(full, scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(x.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, d)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    """``fc2(act(fc1(x)))``."""

    def __init__(self, hidden: int, inner: int, act: str, *, rngs: nnx.Rngs, dtype: Any):
        self.act = act
        self.fc1 = Linear(hidden, inner, bias=True, rngs=rngs, dtype=dtype)
        self.fc2 = Linear(inner, hidden, bias=True, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array) -> Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Any):
        c = config
        self.layer_norm1 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
        self.self_attn = CLIPAttention(c.hidden_size, c.num_attention_heads, rngs=rngs, dtype=dtype)
        self.layer_norm2 = LayerNorm(c.hidden_size, eps=c.layer_norm_eps, dtype=dtype)
        self.mlp = CLIPMLP(c.hidden_size, c.intermediate_size, c.hidden_act, rngs=rngs, dtype=dtype)

    def __call__(self, x: Array, mask: Array | None) -> Array:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nnx.Module):
    """The stack of :class:`CLIPEncoderLayer` (``layers``)."""

    def __init__(self, config: CLIPTextConfig | CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Any):
        self.layers = nnx.List(
            [
                CLIPEncoderLayer(config, rngs=rngs, dtype=dtype)
                for _ in range(config.num_hidden_layers)
            ]
        )

    def __call__(self, x: Array, mask: Array | None) -> tuple[Array, ...]:
        """Every hidden state: ``(x, after layer 1, ..., after layer L)``."""
        states = [x]
        for layer in self.layers:
            states.append(layer(states[-1], mask))
        return tuple(states)


class CLIPTextEmbeddings(nnx.Module):
    """Token plus learned absolute position embeddings."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any):
        h = config.hidden_size
        self.token_embedding = Embedding(config.vocab_size, h, rngs=rngs, dtype=dtype)
        self.position_embedding = Embedding(
            config.max_position_embeddings, h, rngs=rngs, dtype=dtype
        )

    def __call__(self, input_ids: Array) -> Array:
        t = input_ids.shape[-1]
        tokens = self.token_embedding(input_ids)
        positions = self.position_embedding.weight[...][:t]
        return tokens + jnp.broadcast_to(positions[None], tokens.shape)


class CLIPTextTransformer(nnx.Module):
    """transformers' text tower: ``embeddings``, causal ``encoder``, ``final_layer_norm``."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        self.embeddings = CLIPTextEmbeddings(config, rngs=rngs, dtype=dtype)
        self.encoder = CLIPEncoder(config, rngs=rngs, dtype=dtype)
        self.final_layer_norm = LayerNorm(
            config.hidden_size, eps=config.layer_norm_eps, dtype=dtype
        )


class CLIPVisionEmbeddings(nnx.Module):
    """Class token, non-overlapping patch projection (``patch_embedding.weight: [D, C, p, p]``,
    no bias) and learned position embeddings."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Any):
        c = config
        d, p = c.hidden_size, c.patch_size
        keys = jax.random.split(rngs.params(), 2)
        self.class_embedding = nnx.Param(jax.random.normal(keys[0], (d,)).astype(dtype))
        w = 0.02 * jax.random.normal(keys[1], (d, c.num_channels, p, p))
        self.patch_embedding = _Weight(w.astype(dtype))
        self.position_embedding = Embedding(c.num_positions, d, rngs=rngs, dtype=dtype)
        self.patch_size = p

    def __call__(self, pixel_values: Array) -> Array:
        w = self.patch_embedding.weight[...]
        b, c, h, wd = pixel_values.shape
        p = self.patch_size
        patches = pixel_values.astype(w.dtype).reshape(b, c, h // p, p, wd // p, p)
        emb = jnp.einsum("bcipjq,dcpq->bijd", patches, w, preferred_element_type=jnp.float32)
        emb = emb.astype(w.dtype).reshape(b, (h // p) * (wd // p), w.shape[0])
        cls = jnp.broadcast_to(self.class_embedding[...][None, None], (b, 1, w.shape[0]))
        x = jnp.concatenate([cls, emb], axis=1)
        return x + jnp.broadcast_to(self.position_embedding.weight[...][None], x.shape)


class _Weight(nnx.Module):
    """A bare ``weight`` parameter (the patch convolution, applied as a patch matmul)."""

    def __init__(self, weight: Array):
        self.weight = nnx.Param(weight)


class CLIPVisionTransformer(nnx.Module):
    """transformers' vision tower: ``embeddings``, ``pre_layrnorm`` (sic), ``encoder``,
    ``post_layernorm`` (applied to the class token only)."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        eps = config.layer_norm_eps
        self.embeddings = CLIPVisionEmbeddings(config, rngs=rngs, dtype=dtype)
        self.pre_layrnorm = LayerNorm(config.hidden_size, eps=eps, dtype=dtype)
        self.encoder = CLIPEncoder(config, rngs=rngs, dtype=dtype)
        self.post_layernorm = LayerNorm(config.hidden_size, eps=eps, dtype=dtype)


def _projection(features: int, dim: int, rngs: nnx.Rngs, dtype: Any) -> Linear:
    return Linear(features, dim, bias=False, rngs=rngs, dtype=dtype)


class CLIPTextModel(nnx.Module):
    """The bare text tower (``text_model``): FLUX's pooled prompt embedding."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        self.text_model = CLIPTextTransformer(config, rngs=rngs, dtype=dtype)


class CLIPTextModelWithProjection(nnx.Module):
    """Text tower plus ``text_projection`` (bias-free): SD3's CLIP text encoders."""

    def __init__(self, config: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        self.text_model = CLIPTextTransformer(config, rngs=rngs, dtype=dtype)
        self.text_projection = _projection(config.hidden_size, config.projection_dim, rngs, dtype)


class CLIPVisionModel(nnx.Module):
    """The bare vision tower (``vision_model``)."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, rngs=rngs, dtype=dtype)


class CLIPVisionModelWithProjection(nnx.Module):
    """Vision tower plus ``visual_projection`` (bias-free)."""

    def __init__(self, config: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        self.vision_model = CLIPVisionTransformer(config, rngs=rngs, dtype=dtype)
        self.visual_projection = _projection(config.hidden_size, config.projection_dim, rngs, dtype)


class CLIPModel(nnx.Module):
    """Both towers, both projections and the learned temperature ``logit_scale`` (a scalar; the
    logits are multiplied by ``exp(logit_scale)``)."""

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        self.text_model = CLIPTextTransformer(config.text, rngs=rngs, dtype=dtype)
        self.vision_model = CLIPVisionTransformer(config.vision, rngs=rngs, dtype=dtype)
        pd = config.projection_dim
        self.text_projection = _projection(config.text.hidden_size, pd, rngs, dtype)
        self.visual_projection = _projection(config.vision.hidden_size, pd, rngs, dtype)
        # Kept in float32 at any dtype: exp() of a bfloat16 scale would be ~2% off.
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, jnp.float32))


# Non-parameter buffers older checkpoints carry (transformers < 4.31 saved them); recomputed.
_BUFFER_SUFFIXES = ("embeddings.position_ids",)

TextModel = CLIPTextModel | CLIPTextModelWithProjection | CLIPModel
VisionModel = CLIPVisionModel | CLIPVisionModelWithProjection | CLIPModel


# --------------------------------------------------------------------------- forward passes


class CLIPTextOutput(NamedTuple):
    """Outputs of :func:`clip_text_apply` (transformers' names).

    Attributes:
        last_hidden_state: ``[B, T, D]`` after ``final_layer_norm``.
        pooler_output: ``[B, D]`` the end-of-text token of ``last_hidden_state`` (FLUX's pooled
            prompt embedding).
        hidden_states: ``L + 1`` arrays ``[B, T, D]``: the embeddings, then the output of every
            layer (no final norm); ``hidden_states[-2]`` is SD3's prompt embedding.
        text_embeds: ``[B, P]`` ``text_projection(pooler_output)`` (SD3's pooled embedding), or
            ``None`` for :class:`CLIPTextModel`.
    """

    last_hidden_state: Array
    pooler_output: Array
    hidden_states: tuple[Array, ...]
    text_embeds: Array | None


class CLIPVisionOutput(NamedTuple):
    """Outputs of :func:`clip_vision_apply` (transformers' names).

    Attributes:
        last_hidden_state: ``[B, 1 + patches, D]`` the last layer's output (no final norm).
        pooler_output: ``[B, D]`` ``post_layernorm`` of the class token.
        hidden_states: ``L + 1`` arrays: the embeddings after ``pre_layrnorm``, then every layer.
        image_embeds: ``[B, P]`` ``visual_projection(pooler_output)``, or ``None`` for
            :class:`CLIPVisionModel`.
    """

    last_hidden_state: Array
    pooler_output: Array
    hidden_states: tuple[Array, ...]
    image_embeds: Array | None


class CLIPOutput(NamedTuple):
    """Outputs of :func:`clip_apply`.

    Attributes:
        logits_per_image: ``[B_image, B_text]`` ``exp(logit_scale) * cos(image, text)``.
        logits_per_text: its transpose.
        text_embeds: ``[B_text, P]`` unit-norm projected text embeddings.
        image_embeds: ``[B_image, P]`` unit-norm projected image embeddings.
        text_model_output, vision_model_output: the towers' outputs (embeds unnormalized).
    """

    logits_per_image: Array
    logits_per_text: Array
    text_embeds: Array
    image_embeds: Array
    text_model_output: CLIPTextOutput
    vision_model_output: CLIPVisionOutput


def eos_positions(input_ids: Array, eos_token_id: int) -> Array:
    """``int32[B]`` the pooled position of each row (see the module docstring): the largest id's
    position when ``eos_token_id == 2``, else the first ``eos_token_id`` (0 if absent)."""
    if eos_token_id == LEGACY_EOS_TOKEN_ID:
        return jnp.argmax(input_ids, axis=-1).astype(jnp.int32)
    return jnp.argmax((input_ids == eos_token_id).astype(jnp.int32), axis=-1).astype(jnp.int32)


def _text_mask(input_ids: Array, attention_mask: Array | None) -> Array:
    """``bool[B, T, T]``: causal, and no attention to padding keys (``attention_mask == 0``)."""
    b, t = input_ids.shape
    causal = jnp.tril(jnp.ones((t, t), bool))
    mask = jnp.broadcast_to(causal[None], (b, t, t))
    if attention_mask is not None:
        keys = jnp.asarray(attention_mask).astype(bool)
        mask = mask & jnp.broadcast_to(keys[:, None, :], (b, t, t))
    return mask


def clip_text_apply(
    model: TextModel, input_ids: Array, attention_mask: Array | None = None
) -> CLIPTextOutput:
    """The text tower of ``model`` on ``input_ids int32[B, T]`` (``T <= max_position_embeddings``).

    Args:
        model: :class:`CLIPTextModel`, :class:`CLIPTextModelWithProjection` or
            :class:`CLIPModel` (``text_embeds`` via ``text_projection`` for the last two).
        input_ids: token ids (CLIP pipelines pad to 77 with the tokenizer's pad token).
        attention_mask: optional ``[B, T]`` 1 = token, 0 = padding (SD3 and FLUX pass none).

    Returns:
        :class:`CLIPTextOutput`.
    """
    tower: CLIPTextTransformer = model.text_model
    config = tower.config
    input_ids = jnp.asarray(input_ids)
    b, t = input_ids.shape
    if t > config.max_position_embeddings:
        raise ValueError(
            f"sequence length {t} exceeds max_position_embeddings={config.max_position_embeddings}"
        )
    x = tower.embeddings(input_ids)
    states = tower.encoder(x, _text_mask(input_ids, attention_mask))
    last = tower.final_layer_norm(states[-1])
    pos = eos_positions(input_ids, config.eos_token_id)
    pooled = jnp.take_along_axis(last, pos[:, None, None], axis=1)[:, 0]
    projection = getattr(model, "text_projection", None)
    embeds = None if projection is None else projection(pooled)
    return CLIPTextOutput(last, pooled, states, embeds)


def sd3_prompt_embeds(output: CLIPTextOutput, clip_skip: int | None = None) -> Array:
    """The token embeddings SD3 takes from a CLIP text encoder: ``hidden_states[-2]`` (the input
    of the last layer), or ``hidden_states[-(clip_skip + 2)]`` (diffusers' ``clip_skip``)."""
    return output.hidden_states[-((clip_skip or 0) + 2)]


def clip_vision_apply(model: VisionModel, pixel_values: Array) -> CLIPVisionOutput:
    """The vision tower of ``model`` on normalized ``pixel_values [B, C, S, S]`` (``S`` the
    config's ``image_size``; see :mod:`tts_jax.rewards.clip` for the preprocessing).

    Raises:
        ValueError: the images are not ``num_channels x image_size x image_size``.
    """
    tower: CLIPVisionTransformer = model.vision_model
    c = tower.config
    want = (c.num_channels, c.image_size, c.image_size)
    if tuple(pixel_values.shape[1:]) != want:
        raise ValueError(
            f"pixel_values must be [B, {', '.join(map(str, want))}], got {pixel_values.shape}"
        )
    x = tower.pre_layrnorm(tower.embeddings(pixel_values))
    states = tower.encoder(x, None)
    last = states[-1]
    pooled = tower.post_layernorm(last[:, 0])
    projection = getattr(model, "visual_projection", None)
    embeds = None if projection is None else projection(pooled)
    return CLIPVisionOutput(last, pooled, states, embeds)


def _unit(x: Array) -> Array:
    xf = x.astype(jnp.float32)
    return xf * jax.lax.rsqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))


def get_text_features(
    model: CLIPModel, input_ids: Array, attention_mask: Array | None = None
) -> Array:
    """``[B, P]`` projected (unnormalized) text embeddings, transformers' ``get_text_features``."""
    return clip_text_apply(model, input_ids, attention_mask).text_embeds


def get_image_features(model: CLIPModel, pixel_values: Array) -> Array:
    """``[B, P]`` projected (unnormalized) image embeddings, transformers'
    ``get_image_features``."""
    return clip_vision_apply(model, pixel_values).image_embeds


def clip_apply(
    model: CLIPModel, input_ids: Array, pixel_values: Array, attention_mask: Array | None = None
) -> CLIPOutput:
    """Both towers and the image-text logits ``exp(logit_scale) * cos`` (float32)."""
    text = clip_text_apply(model, input_ids, attention_mask)
    vision = clip_vision_apply(model, pixel_values)
    t, v = _unit(text.text_embeds), _unit(vision.image_embeds)
    scale = jnp.exp(model.logit_scale[...].astype(jnp.float32))
    per_text = jnp.einsum("tp,ip->ti", t, v) * scale
    return CLIPOutput(per_text.T, per_text, t, v, text, vision)


# --------------------------------------------------------------------------- loading


def _prefixed(prefix: str, tensors: Mapping[str, Any], probe: str) -> Layout:
    """The layout of a bare tower: names as they are if the file has ``prefix + probe``, else
    with ``prefix`` stripped (the transformers 5 layout of ``CLIPTextModel`` /
    ``CLIPVisionModel``)."""
    if prefix + probe in tensors:
        return IDENTITY
    return dataclasses.replace(IDENTITY, rename=lambda n: n.removeprefix(prefix))


def _architecture(raw: Mapping[str, Any], allowed: tuple[str, ...]) -> str | None:
    archs = raw.get("architectures") or []
    if not archs:
        return None
    if len(archs) != 1 or archs[0] not in allowed:
        raise ValueError(f"unsupported architectures {archs}; expected one of {allowed}")
    return archs[0]


_TEXT_PARTS = ("text_model.", "text_projection.")
_VISION_PARTS = ("vision_model.", "visual_projection.")


def _other_tower(tensors: Mapping[str, Any], keep: tuple[str, ...]) -> list[str]:
    """Names of a ``CLIPModel`` file that a single-tower load leaves unread."""
    return [k for k in tensors if not k.startswith(keep)]


def load_clip_text(
    path: str | Path, dtype: Any = jnp.float32, *, loader: str = "load_clip_text"
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """Loads a CLIP text encoder from a transformers folder.

    A ``clip_text_model`` folder loads as its ``architectures`` say (``CLIPTextModel`` or
    ``CLIPTextModelWithProjection``; without ``architectures``, a projection model iff the file
    has ``text_projection.weight``). A full ``clip`` folder loads its text tower and
    ``text_projection`` as a :class:`CLIPTextModelWithProjection` (vision tensors skipped).

    Args:
        path: folder with ``config.json`` and ``model.safetensors`` (or its shards).
        dtype: parameter and compute dtype (``jnp.float32`` or ``jnp.bfloat16``).

    Raises:
        FileNotFoundError: the folder, its config or its weights are missing.
        ValueError: (named subclasses of
            :class:`~tts_jax.models.checkpoint.CheckpointError`) a wrong ``model_type`` or
            architecture, an unsupported activation, a wrongly typed key, or missing /
            mis-shaped / unexpected tensors.
    """
    config_file = _read_folder_config(path, loader, (TEXT_MODEL_TYPE, CLIP_MODEL_TYPE))
    tensors = read_tensors(path, loader, WEIGHTS_NAME)
    raw = config_file.raw
    if raw["model_type"] == CLIP_MODEL_TYPE:
        config = _parse_clip(config_file).text
        cls, ignore = CLIPTextModelWithProjection, _other_tower(tensors, _TEXT_PARTS)
    else:
        config_file.check(TEXT_CONFIG_TYPES)
        with config_file.errors():
            arch = _architecture(raw, TEXT_ARCHITECTURES)
            config = CLIPTextConfig.from_hf_dict(raw)
        projection = (
            arch == "CLIPTextModelWithProjection" if arch else "text_projection.weight" in tensors
        )
        cls = CLIPTextModelWithProjection if projection else CLIPTextModel
        ignore = []
    layout = _prefixed("text_model.", tensors, "final_layer_norm.weight")
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype))
    return load_params(abstract, tensors, layout, ignore=ignore, ignore_suffixes=_BUFFER_SUFFIXES)


def load_clip_vision(
    path: str | Path, dtype: Any = jnp.float32, *, loader: str = "load_clip_vision"
) -> CLIPVisionModel | CLIPVisionModelWithProjection:
    """Loads a CLIP image encoder from a transformers folder (``clip_vision_model`` folders as
    their ``architectures`` say; a full ``clip`` folder as :class:`CLIPVisionModelWithProjection`,
    text tensors skipped). Arguments and errors as :func:`load_clip_text`."""
    config_file = _read_folder_config(path, loader, (VISION_MODEL_TYPE, CLIP_MODEL_TYPE))
    tensors = read_tensors(path, loader, WEIGHTS_NAME)
    raw = config_file.raw
    if raw["model_type"] == CLIP_MODEL_TYPE:
        config = _parse_clip(config_file).vision
        cls, ignore = CLIPVisionModelWithProjection, _other_tower(tensors, _VISION_PARTS)
    else:
        config_file.check(VISION_CONFIG_TYPES)
        with config_file.errors():
            arch = _architecture(raw, VISION_ARCHITECTURES)
            config = CLIPVisionConfig.from_hf_dict(raw)
        projection = (
            arch == "CLIPVisionModelWithProjection"
            if arch
            else "visual_projection.weight" in tensors
        )
        cls = CLIPVisionModelWithProjection if projection else CLIPVisionModel
        ignore = []
    layout = _prefixed("vision_model.", tensors, "post_layernorm.weight")
    abstract = nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype))
    return load_params(abstract, tensors, layout, ignore=ignore, ignore_suffixes=_BUFFER_SUFFIXES)


def load_clip(
    path: str | Path, dtype: Any = jnp.float32, *, loader: str = "load_clip"
) -> CLIPModel:
    """Loads a full ``CLIPModel`` (both towers, projections, ``logit_scale``) from a transformers
    folder whose ``config.json`` has ``model_type: "clip"`` with ``text_config`` and
    ``vision_config``. Arguments and errors as :func:`load_clip_text`."""
    config_file = _read_folder_config(path, loader, (CLIP_MODEL_TYPE,))
    with config_file.errors():
        _architecture(config_file.raw, ("CLIPModel",))
    config = _parse_clip(config_file)
    tensors = read_tensors(path, loader, WEIGHTS_NAME)
    abstract = nnx.eval_shape(lambda: CLIPModel(config, rngs=nnx.Rngs(0), dtype=dtype))
    return load_params(abstract, tensors, IDENTITY, ignore_suffixes=_BUFFER_SUFFIXES)


def split_clip(
    model: CLIPModel,
) -> tuple[CLIPTextModelWithProjection, CLIPVisionModelWithProjection]:
    """The two towers of a :class:`CLIPModel` as projection models sharing its parameters (no
    copy), e.g. to keep only the image side inside a jitted reward."""
    config = model.config
    text = nnx.eval_shape(lambda: CLIPTextModelWithProjection(config.text, rngs=nnx.Rngs(0)))
    text.text_model, text.text_projection = model.text_model, model.text_projection
    vision = nnx.eval_shape(lambda: CLIPVisionModelWithProjection(config.vision, rngs=nnx.Rngs(0)))
    vision.vision_model, vision.visual_projection = model.vision_model, model.visual_projection
    return text, vision
