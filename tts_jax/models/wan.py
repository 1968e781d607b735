"""The Wan 2.1 video diffusion transformer (Wan Team 2025, "Wan: Open and Advanced Large-Scale
Video Generative Models") in Flax NNX, diffusers layout.

Mirrors diffusers' ``WanTransformer3DModel`` with its parameter names, so the ``transformer/``
folder of a diffusers Wan 2.1 text-to-video pipeline (``config.json`` +
``diffusion_pytorch_model.safetensors`` or its shards) loads with :func:`load_wan`. Supported:
the text-to-video models (Wan2.1-T2V-1.3B and -14B). Not supported (refused by the config
parser, naming the key): the image-conditioning parts of the image-to-video and first-last-frame
models (``image_dim``, ``added_kv_proj_dim``, ``pos_embed_seq_len``: a CLIP image embedder and
extra key/value projections in the cross-attention), and Wan 2.2's per-token timesteps
(``timestep [N, L]``).

Forward pass, video latents ``x [N, C, F, H, W]`` (the particle axis first):
    tokens = Conv3d_patch(x)                     [N, L, D], L = (F / pt)(H / ph)(W / pw), D = H Dh
    temb   = MLP_t(sincos(timestep))             [N, D]   (float32 layers)
    mods   = Linear(silu(temb))                  [N, 6, D]
    ctx    = MLP_text(encoder_hidden_states)     [B, T, D] (UMT5 states, at the prompt batch B)
    block: (shift, scale, gate, c_shift, c_scale, c_gate) = table [6, D] + mods
           h += gate  * SelfAttn(LN(h)(1 + scale) + shift, 3-D RoPE)
           h += CrossAttn(LN_affine(h), ctx)
           h += c_gate * FFN(LN(h)(1 + c_scale) + c_shift)
    out = proj_out(LN(h)(1 + scale) + shift), (shift, scale) = table [2, D] + temb; unpatchify
          -> [N, out_channels, F, H, W]

Attention: queries and keys are RMS-normalised over the whole width (all heads together,
diffusers' ``rms_norm_across_heads``) before the heads are split; self-attention rotates them
with a 3-D rotary embedding (Su et al. 2021) whose head channels are split into a frame, a row
and a column band (``Dh - 4 (Dh // 6)``, ``2 (Dh // 6)``, ``2 (Dh // 6)`` channels, consecutive
pairs rotated, angle ``position * 10000^(-2j / band)``); the scale is ``1 / sqrt(Dh)``.

The timestep is the scheduler's ``1000 sigma`` on the rectified-flow path ``x_sigma = (1 - sigma)
x_0 + sigma eps`` and the output is the velocity ``eps - x_0`` (the ``Linear`` interpolant of
:mod:`tts_jax.interpolants` at ``t = sigma``). Prompts are shared by the particles: the text
states have a batch ``B`` dividing ``N`` (particle ``i`` uses prompt ``i // (N / B)``), are
projected at ``B`` and broadcast only in the cross-attention (see
:mod:`tts_jax.models.mmdit_layers`).

Precision (``dtype`` at construction and load): parameters and activations in ``dtype``; as in
diffusers, the time embedder, the modulation tables, the layer norms (statistics and affine
parameters), the RMS norm statistics, the rotary angles (computed in float64 on the host, used
in float32), the modulation arithmetic and the softmax stay float32. The residual stream is in
``dtype`` (as diffusers keeps it). The output is returned in the latents' dtype.

Pure use inside ``jax.jit``: ``params = nnx.split(model)`` and ``wan_apply(params, ...)``.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.models import checkpoint
from tts_jax.models.lm.modules import Linear
from tts_jax.models.mmdit_layers import apply_rope, expand_batch, timestep_embedding

Array = jax.Array
DType = Any
CLASS_NAME = "WanTransformer3DModel"
QK_NORMS = ("rms_norm_across_heads",)
ROPE_THETA = 10000.0
_UNSUPPORTED = {
    "image_dim": "the image-to-video CLIP image embedder",
    "added_kv_proj_dim": "the image-to-video key/value projections",
    "pos_embed_seq_len": "the first-last-frame image position embedding",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class WanConfig:
    """``WanTransformer3DModel`` config: diffusers field names and defaults (Wan2.1-T2V-14B)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    image_dim: int | None = None
    added_kv_proj_dim: int | None = None
    rope_max_seq_len: int = 1024
    pos_embed_seq_len: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (t, h, w), got {self.patch_size}")
        for key, what in _UNSUPPORTED.items():
            if getattr(self, key) is not None:
                raise ValueError(
                    f"{key}={getattr(self, key)!r}: {what} is not supported (text-to-video only)"
                )
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {QK_NORMS}, got {self.qk_norm!r}")
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "text_dim",
                     "freq_dim", "ffn_dim", "num_layers", "rope_max_seq_len"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.freq_dim % 2:
            raise ValueError(f"freq_dim must be even, got {self.freq_dim}")
        if self.attention_head_dim < 6 or self.attention_head_dim % 2:
            raise ValueError(
                "attention_head_dim must be even and >= 6 (three rotary bands), got "
                f"{self.attention_head_dim}"
            )

    @property
    def inner_dim(self) -> int:
        """Model width ``D = num_attention_heads * attention_head_dim``."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.out_channels or self.in_channels

    @property
    def rope_axes(self) -> tuple[int, int, int]:
        """Head channels of the frame, row and column rotary bands."""
        hw = 2 * (self.attention_head_dim // 6)
        return (self.attention_head_dim - 2 * hw, hw, hw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WanConfig:
        """Parse a diffusers ``config.json`` dict (keys starting with ``_`` are ignored).

        Raises:
            ValueError: another ``_class_name``, an unknown key, or an unsupported value
                (image conditioning, another ``qk_norm``), naming it.
        """
        name = raw.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise ValueError(f"not a {CLASS_NAME} config: _class_name {name!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if k not in fields and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unsupported {CLASS_NAME} config keys: {unknown}")
        return cls(**{k: v for k, v in raw.items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        """The diffusers ``config.json`` content."""
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        return {"_class_name": CLASS_NAME, **out}


# --------------------------------------------------------------------------- layers


def _linear(d_in: int, d_out: int, dtype: DType, rngs: nnx.Rngs) -> Linear:
    return Linear(d_in, d_out, bias=True, rngs=rngs, dtype=dtype)


def layer_norm(x: Array, eps: float, weight: Array | None = None, bias: Array | None = None):
    """LayerNorm over the last axis in float32 (diffusers' ``FP32LayerNorm``), returned in
    float32 (the caller modulates, then casts)."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + eps)
    if weight is not None:
        shape = (1,) * (x.ndim - 1) + (-1,)
        y = y * weight.astype(jnp.float32).reshape(shape) + bias.astype(jnp.float32).reshape(shape)
    return y


class AffineLayerNorm(nnx.Module):
    """``FP32LayerNorm(dim, eps, elementwise_affine=True)``: ``weight``, ``bias`` float32."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((dim,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        y = layer_norm(x, self.eps, self.weight[...], self.bias[...])
        return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """``torch.nn.RMSNorm(dim, eps)``: ``x / rms(x) * weight`` over the last axis (statistics
    float32, the result in ``x.dtype``); ``weight`` float32."""

    def __init__(self, dim: int, eps: float):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        return (y * self.weight[...].reshape((1,) * (x.ndim - 1) + (-1,))).astype(x.dtype)


class PatchEmbedding(nnx.Module):
    """diffusers' ``Conv3d(C, D, kernel_size=patch, stride=patch)`` as a patch matmul;
    ``weight [D, C, pt, ph, pw]`` and ``bias [D]`` in PyTorch's layout."""

    def __init__(self, config: WanConfig, *, dtype: DType, rngs: nnx.Rngs):
        d, c, (pt, ph, pw) = config.inner_dim, config.in_channels, config.patch_size
        fan_in = c * pt * ph * pw
        w = jax.random.normal(rngs.params(), (d, c, pt, ph, pw)) / np.sqrt(fan_in)
        self.patch = config.patch_size
        self.weight = nnx.Param(w.astype(dtype))
        self.bias = nnx.Param(jnp.zeros((d,), dtype))

    def __call__(self, x: Array) -> Array:
        """``x [N, C, F, H, W]`` (sizes multiples of the patch) -> ``[N, L, D]``, tokens in
        (frame, row, column) row-major order."""
        n, c, f, h, w = x.shape
        pt, ph, pw = self.patch
        x = x.astype(self.weight.dtype).reshape(n, c, f // pt, pt, h // ph, ph, w // pw, pw)
        out = jnp.einsum("ncfahbwe->nfhwcabe", x).reshape(n, -1, c * pt * ph * pw)
        kernel = self.weight[...].reshape(self.weight.shape[0], -1)
        return jnp.einsum("nlk,dk->nld", out, kernel) + self.bias[...][None, None, :]


def rope_tables(config: WanConfig, frames: int, height: int, width: int) -> tuple[Array, Array]:
    """The 3-D rotary tables of a token grid ``frames x height x width`` (patches).

    Channel pair ``j`` of band ``a`` (frame, row, column) is rotated by ``pos_a theta^(-2j /
    d_a)``. The per-axis angles are computed on the host in float64, as diffusers'
    ``WanRotaryPosEmbed`` does, and rounded once to float32 (small constants ``[n_a, d_a]``);
    the full tables are broadcast from them in the graph.

    Returns:
        ``(cos, sin)``, each ``float32[frames * height * width, Dh]``.
    """
    sizes = (frames, height, width)
    tables: tuple[list[Array], list[Array]] = ([], [])
    for axis, (n, d) in enumerate(zip(sizes, config.rope_axes, strict=True)):
        freqs = 1.0 / ROPE_THETA ** (np.arange(0, d, 2, dtype=np.float64) / d)
        angles = np.arange(n, dtype=np.float64)[:, None] * freqs[None, :]
        view = [1, 1, 1, d]
        view[axis] = n
        for out, fn in zip(tables, (np.cos, np.sin), strict=True):
            band = jnp.asarray(np.repeat(fn(angles), 2, axis=-1).astype(np.float32))
            out.append(jnp.broadcast_to(band.reshape(view), (*sizes, d)))
    cos, sin = (jnp.concatenate(t, axis=-1).reshape(frames * height * width, -1) for t in tables)
    return cos, sin


class WanAttention(nnx.Module):
    """Self- or cross-attention with across-heads RMS-normalised queries and keys (diffusers'
    ``WanAttention``: ``to_q``, ``to_k``, ``to_v``, ``to_out`` (``to_out.0`` in the file),
    ``norm_q``, ``norm_k``)."""

    def __init__(self, config: WanConfig, *, dtype: DType, rngs: nnx.Rngs):
        d = config.inner_dim
        self.heads, self.head_dim = config.num_attention_heads, config.attention_head_dim
        self.to_q = _linear(d, d, dtype, rngs)
        self.to_k = _linear(d, d, dtype, rngs)
        self.to_v = _linear(d, d, dtype, rngs)
        self.to_out = _linear(d, d, dtype, rngs)
        self.norm_q = RMSNorm(d, config.eps)
        self.norm_k = RMSNorm(d, config.eps)

    def _split(self, x: Array) -> Array:
        return x.reshape(*x.shape[:2], self.heads, self.head_dim)

    def __call__(
        self, x: Array, context: Array | None = None, rope: tuple[Array, Array] | None = None
    ) -> Array:
        """Args:
            x: ``[N, L, D]`` video tokens (the queries; also keys and values without
                ``context``).
            context: ``[B, T, D]`` projected text tokens, ``B`` dividing ``N`` (cross-attention;
                keys and values are computed at ``B`` and broadcast to ``N``).
            rope: ``(cos, sin) [L, Dh]`` (self-attention only).

        Returns:
            ``[N, L, D]``.
        """
        source = x if context is None else context
        q = self._split(self.norm_q(self.to_q(x)))
        k = self._split(self.norm_k(self.to_k(source)))
        v = self._split(self.to_v(source))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if context is not None:
            k, v = expand_batch(k, x.shape[0]), expand_batch(v, x.shape[0])
        out = jax.nn.dot_product_attention(q, k, v)
        return self.to_out(out.reshape(*x.shape[:2], self.heads * self.head_dim))


class FeedForward(nnx.Module):
    """``Linear(D, ffn_dim) -> GELU(tanh) -> Linear(ffn_dim, D)``; ``proj_in`` / ``proj_out``
    are diffusers' ``net.0.proj`` / ``net.2``."""

    def __init__(self, config: WanConfig, *, dtype: DType, rngs: nnx.Rngs):
        self.proj_in = _linear(config.inner_dim, config.ffn_dim, dtype, rngs)
        self.proj_out = _linear(config.ffn_dim, config.inner_dim, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        return self.proj_out(jax.nn.gelu(self.proj_in(x), approximate=True))


class WanTransformerBlock(nnx.Module):
    """One block (diffusers' ``WanTransformerBlock``): modulated self-attention, cross-attention
    to the text after an affine layer norm (``norm2``, or none without ``cross_attn_norm``),
    modulated feed-forward; ``scale_shift_table [1, 6, D]`` float32."""

    def __init__(self, config: WanConfig, *, dtype: DType, rngs: nnx.Rngs):
        d = config.inner_dim
        self.eps = config.eps
        self.attn1 = WanAttention(config, dtype=dtype, rngs=rngs)
        self.attn2 = WanAttention(config, dtype=dtype, rngs=rngs)
        self.norm2 = AffineLayerNorm(d, config.eps) if config.cross_attn_norm else None
        self.ffn = FeedForward(config, dtype=dtype, rngs=rngs)
        table = jax.random.normal(rngs.params(), (1, 6, d)) / np.sqrt(d)
        self.scale_shift_table = nnx.Param(table.astype(jnp.float32))

    def __call__(self, h: Array, context: Array, mods: Array, rope: tuple[Array, Array]) -> Array:
        """``h [N, L, D]`` (dtype), ``context [B, T, D]``, ``mods float32[N, 6, D]``."""
        table = self.scale_shift_table[...] + mods
        shift, scale, gate, c_shift, c_scale, c_gate = (table[:, i][:, None, :] for i in range(6))
        dtype = h.dtype
        x = (layer_norm(h, self.eps) * (1 + scale) + shift).astype(dtype)
        h = (h.astype(jnp.float32) + self.attn1(x, rope=rope) * gate).astype(dtype)
        x = h if self.norm2 is None else self.norm2(h)
        h = h + self.attn2(x, context)
        x = (layer_norm(h, self.eps) * (1 + c_scale) + c_shift).astype(dtype)
        ff = self.ffn(x).astype(jnp.float32)
        return (h.astype(jnp.float32) + ff * c_gate).astype(dtype)


class TimeEmbedder(nnx.Module):
    """``linear_2(silu(linear_1(features)))`` (diffusers' ``TimestepEmbedding``), float32."""

    def __init__(self, freq_dim: int, dim: int, *, rngs: nnx.Rngs):
        self.linear_1 = _linear(freq_dim, dim, jnp.float32, rngs)
        self.linear_2 = _linear(dim, dim, jnp.float32, rngs)

    def __call__(self, features: Array) -> Array:
        return self.linear_2(jax.nn.silu(self.linear_1(features.astype(jnp.float32))))


class TextEmbedder(nnx.Module):
    """``linear_2(gelu_tanh(linear_1(states)))`` (diffusers' ``PixArtAlphaTextProjection`` with
    ``act_fn="gelu_tanh"``): UMT5 states ``[B, T, text_dim] -> [B, T, D]``."""

    def __init__(self, text_dim: int, dim: int, *, dtype: DType, rngs: nnx.Rngs):
        self.linear_1 = _linear(text_dim, dim, dtype, rngs)
        self.linear_2 = _linear(dim, dim, dtype, rngs)

    def __call__(self, states: Array) -> Array:
        h = self.linear_1(states.astype(self.linear_1.weight.dtype))
        return self.linear_2(jax.nn.gelu(h, approximate=True))


class ConditionEmbedder(nnx.Module):
    """diffusers' ``WanTimeTextImageEmbedding`` without the image part: ``time_embedder``,
    ``time_proj`` (``D -> 6 D``) and ``text_embedder``."""

    def __init__(self, config: WanConfig, *, dtype: DType, rngs: nnx.Rngs):
        d = config.inner_dim
        self.freq_dim = config.freq_dim
        self.time_embedder = TimeEmbedder(config.freq_dim, d, rngs=rngs)
        self.time_proj = _linear(d, 6 * d, dtype, rngs)
        self.text_embedder = TextEmbedder(config.text_dim, d, dtype=dtype, rngs=rngs)


class WanTransformer(nnx.Module):
    """The Wan 2.1 transformer with diffusers ``WanTransformer3DModel`` parameter names.

    Args:
        config: the architecture.
        dtype: parameter and activation dtype (see the module docstring for what stays float32).
        rngs: initialisation keys (use ``nnx.eval_shape`` to build an abstract model to load).
    """

    def __init__(self, config: WanConfig, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = jnp.dtype(dtype).name
        d = config.inner_dim
        self.patch_embedding = PatchEmbedding(config, dtype=dtype, rngs=rngs)
        self.condition_embedder = ConditionEmbedder(config, dtype=dtype, rngs=rngs)
        self.blocks = nnx.List(
            [WanTransformerBlock(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)]
        )
        out = config.output_channels * int(np.prod(config.patch_size))
        self.proj_out = _linear(d, out, dtype, rngs)
        table = jax.random.normal(rngs.params(), (1, 2, d)) / np.sqrt(d)
        self.scale_shift_table = nnx.Param(table.astype(jnp.float32))

    def check_latents(self, shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The token grid ``(F / pt, H / ph, W / pw)`` of latents ``[N, C, F, H, W]``.

        Raises:
            ValueError: not 5-D, the wrong channel count, a size that is not a positive multiple
                of the patch, or a grid longer than ``rope_max_seq_len`` on an axis.
        """
        c = self.config
        if len(shape) != 5:
            raise ValueError(f"Wan latents must be [N, C, F, H, W], got shape {tuple(shape)}")
        if shape[1] != c.in_channels:
            raise ValueError(f"Wan latents need {c.in_channels} channels, got shape {tuple(shape)}")
        sizes = shape[2:]
        bad = [
            f"{axis} {s} (patch {p})"
            for axis, s, p in zip(("frames", "height", "width"), sizes, c.patch_size, strict=True)
            if s < p or s % p
        ]
        if bad:
            raise ValueError(
                "Wan latent sizes must be positive multiples of the patch size "
                f"{c.patch_size}: " + ", ".join(bad)
            )
        grid = tuple(s // p for s, p in zip(sizes, c.patch_size, strict=True))
        if max(grid) > c.rope_max_seq_len:
            raise ValueError(
                f"a token grid of {grid} exceeds rope_max_seq_len {c.rope_max_seq_len} on an axis"
            )
        return grid

    def __call__(self, latents: Array, timestep: Array, encoder_hidden_states: Array) -> Array:
        """The velocity at the noisy latents.

        Args:
            latents: ``[N, C, F, H, W]`` (sizes multiples of ``patch_size``).
            timestep: ``[N]`` or scalar, the scheduler's ``1000 sigma`` (float).
            encoder_hidden_states: ``[B, T, text_dim]`` UMT5 states, ``B`` dividing ``N``.

        Returns:
            ``[N, out_channels, F, H, W]`` in ``latents.dtype``.
        """
        c = self.config
        gf, gh, gw = self.check_latents(latents.shape)
        n = latents.shape[0]
        timestep = jnp.asarray(timestep, jnp.float32)
        if timestep.ndim > 1:
            raise ValueError(
                f"timestep must be [N] or a scalar (per-token timesteps, Wan 2.2, are not "
                f"supported), got shape {timestep.shape}"
            )
        timestep = jnp.broadcast_to(timestep, (n,))
        dtype = jnp.dtype(self.dtype)
        rope = rope_tables(c, gf, gh, gw)
        h = self.patch_embedding(latents)
        emb = self.condition_embedder
        temb = emb.time_embedder(timestep_embedding(timestep, c.freq_dim)).astype(dtype)
        mods = emb.time_proj(jax.nn.silu(temb)).astype(jnp.float32).reshape(n, 6, -1)
        context = emb.text_embedder(encoder_hidden_states)
        for block in self.blocks:
            h = block(h, context, mods, rope)
        table = self.scale_shift_table[...] + temb.astype(jnp.float32)[:, None, :]
        shift, scale = table[:, 0][:, None, :], table[:, 1][:, None, :]
        h = (layer_norm(h, c.eps) * (1 + scale) + shift).astype(dtype)
        out = self.proj_out(h)
        pt, ph, pw = c.patch_size
        out = out.reshape(n, gf, gh, gw, pt, ph, pw, c.output_channels)
        out = jnp.transpose(out, (0, 7, 1, 4, 2, 5, 3, 6))
        return out.reshape(n, c.output_channels, gf * pt, gh * ph, gw * pw).astype(latents.dtype)


# --------------------------------------------------------------------------- functional use


def wan_apply(
    params: tuple[nnx.GraphDef, nnx.State],
    latents: Array,
    timestep: Array,
    encoder_hidden_states: Array,
) -> Array:
    """Pure forward pass for ``jax.jit``; ``params = nnx.split(model)``.

    Args:
        params: ``nnx.split`` of a :class:`WanTransformer`.
        latents: ``[N, C, F, H, W]`` noisy video latents.
        timestep: ``[N]`` (or scalar) scheduler timesteps ``1000 sigma``.
        encoder_hidden_states: ``[B, T, text_dim]``, ``B`` dividing ``N`` (shared by the
            particles of a prompt).

    Returns:
        ``[N, C_out, F, H, W]`` velocity ``eps - x_0``.
    """
    graphdef, state = params
    return nnx.merge(graphdef, state)(latents, timestep, encoder_hidden_states)


# --------------------------------------------------------------------------- checkpoints

_NAMES = (
    (re.compile(r"\.(attn[12])\.to_out\."), r".\1.to_out.0."),
    (re.compile(r"\.ffn\.proj_in\."), ".ffn.net.0.proj."),
    (re.compile(r"\.ffn\.proj_out\."), ".ffn.net.2."),
)


def diffusers_name(dotted: str) -> str:
    """Our dotted parameter name -> the diffusers tensor name (``attn1.to_out`` ->
    ``attn1.to_out.0``, ``ffn.proj_in`` -> ``ffn.net.0.proj``, ``ffn.proj_out`` ->
    ``ffn.net.2``)."""
    for pattern, repl in _NAMES:
        dotted = pattern.sub(repl, dotted)
    return dotted


LAYOUT = dataclasses.replace(checkpoint.IDENTITY, rename=diffusers_name)
"""PyTorch names and shapes (the modules store ``[out, in]`` weights), diffusers' renames."""


def load_wan(path: str | Path, dtype: DType = jnp.float32) -> tuple[WanConfig, WanTransformer]:
    """Load a diffusers ``WanTransformer3DModel`` folder (safetensors only).

    Args:
        path: folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or its
            shards), e.g. the ``transformer/`` folder of ``Wan-AI/Wan2.1-T2V-1.3B-Diffusers``.
        dtype: parameter and activation dtype (``jnp.float32`` or ``jnp.bfloat16``).

    Returns:
        ``(config, model)``.

    Raises:
        CheckpointNotFoundError: the folder, its config or weights are missing.
        CheckpointConfigError: invalid JSON, a wrongly typed key, another ``_class_name`` or an
            unsupported setting (image conditioning), naming the file and the key.
        TensorMismatchError: tensors missing, unexpected or of the wrong shape (all named).
    """
    loader = "load_wan"
    config = checkpoint.read_config(path, loader, WanConfig.from_dict, schema=WanConfig)
    abstract = nnx.eval_shape(lambda: WanTransformer(config, dtype=dtype, rngs=nnx.Rngs(0)))
    tensors = checkpoint.read_tensors(
        path, loader, checkpoint.DIFFUSERS_WEIGHTS_NAME, hint="only safetensors are supported"
    )
    # diffusers itself ignores a stray "norm_added_q" (its _keys_to_ignore_on_load_unexpected).
    model = checkpoint.load_params(
        abstract, tensors, LAYOUT, ignore_suffixes=("norm_added_q.weight",)
    )
    return config, model
