"""Building blocks shared by the SD3 and FLUX.1 transformers (:mod:`~tts_jax.models.sd3`,
:mod:`~tts_jax.models.flux`) in Flax NNX.

Both are multimodal diffusion transformers: image tokens and text tokens keep separate weights but
meet in one joint attention (MMDiT, Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis"; FLUX.1, Black Forest Labs 2024). This module holds what both
share, each layer named after the diffusers attribute it mirrors so that the diffusers checkpoint
names map onto the NNX paths with :data:`tts_jax.models.checkpoint.TORCH` and a few renames:

- conditioning: :func:`timestep_embedding` (sinusoidal features), :class:`TimestepEmbedding`,
  :class:`TextProjection`, :class:`TimeTextEmbedding` (diffusers'
  ``CombinedTimestep[Guidance]TextProjEmbeddings``);
- adaptive norms: :func:`layer_norm` (no affine, in float32) and :class:`AdaModulation`, the
  ``SiLU -> Linear -> chunks`` head of diffusers' ``AdaLayerNormZero`` (6 chunks),
  ``SD35AdaLayerNormZeroX`` (9), ``AdaLayerNormZeroSingle`` (3) and ``AdaLayerNormContinuous``
  (2, scale before shift); :func:`modulate` and :func:`gated_add` apply them;
- :class:`RMSNorm` (the per-head query/key norm), :class:`Attention` (self or joint attention
  with optional second-stream projections and rotary embedding), :class:`FeedForward` (GELU-tanh
  MLP), :func:`rope_tables` / :func:`apply_rope` (FLUX's multi-axis rotary embedding).

**Shared prompts.** A steering run holds ``N`` particles (image latents) but few prompts. Text
arrays may have a batch ``B`` that divides ``N``; particle ``i`` then uses prompt ``i // (N //
B)`` (the order of diffusers' ``num_images_per_prompt`` repeats). The text-side work that does not
depend on the particle (the context embedding, the pooled projection, the first layer norm of the
text stream) runs at batch ``B``; :func:`expand_batch` broadcasts to ``N`` only where a
per-particle quantity (the timestep modulation) first meets the text tokens.

**Precision.** Parameters and activations are in the model ``dtype`` (e.g. ``bfloat16``); layer
and RMS norms, the attention softmax (``jax.nn.dot_product_attention`` computes its logits in
float32), the sinusoidal features and the rotary tables are computed in float32.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

Array = jax.Array
DType = Any
TIME_FREQ_DIM = 256  # sinusoidal timestep features of both models


# --------------------------------------------------------------------------- shared prompts


def expand_batch(x: Array, n: int) -> Array:
    """Rows of ``x [B, ...]`` repeated to ``[n, ...]``: row ``i`` is ``x[i // (n // B)]``.

    Args:
        x: array whose leading axis ``B`` divides ``n`` (``B == n`` returns ``x`` itself).
        n: the number of particles.

    Raises:
        ValueError: ``B`` does not divide ``n``.
    """
    b = x.shape[0]
    if b == n:
        return x
    if b == 0 or n % b:
        raise ValueError(
            f"a text batch of {b} does not divide the {n} particles (give one prompt, or one per "
            "group of N // B particles)"
        )
    return jnp.repeat(x, n // b, axis=0)


# --------------------------------------------------------------------------- conditioning


def timestep_embedding(
    timestep: Array, dim: int = TIME_FREQ_DIM, *, freq_shift: float = 0.0, max_period: float = 1e4
) -> Array:
    """Sinusoidal features ``[cos(t w_k), sin(t w_k)]``, ``w_k = max_period^(-k / (dim/2 -
    freq_shift))``, as diffusers' ``Timesteps(dim, flip_sin_to_cos=True, freq_shift)``.

    Args:
        timestep: ``[N]`` timesteps (any float scale; SD3 and FLUX use 0..1000).
        dim: feature size (even).
        freq_shift: diffusers' ``downscale_freq_shift`` (0 for SD3 and FLUX).
        max_period: the longest period.

    Returns:
        ``float32[N, dim]``.
    """
    half = dim // 2
    exponent = -math.log(max_period) * np.arange(half, dtype=np.float32) / (half - freq_shift)
    # exp in float64, rounded once: the float32 frequencies PyTorch's exp gives (bar an ulp, which
    # at t = 5000 would already move the features by 3e-4).
    freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = timestep.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def _linear(
    d_in: int, d_out: int, dtype: DType, rngs: nnx.Rngs, *, bias: bool = True
) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=bias, dtype=dtype, param_dtype=dtype, rngs=rngs)


class TimestepEmbedding(nnx.Module):
    """``linear_2(silu(linear_1(features)))``: 256 sinusoidal features -> ``[N, D]``."""

    def __init__(self, dim: int, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.linear_1 = _linear(TIME_FREQ_DIM, dim, dtype, rngs)
        self.linear_2 = _linear(dim, dim, dtype, rngs)

    def __call__(self, features: Array) -> Array:
        """``features [N, 256] -> [N, D]`` (in the layer dtype)."""
        h = self.linear_1(features.astype(self.linear_1.param_dtype))
        return self.linear_2(jax.nn.silu(h))


class TextProjection(nnx.Module):
    """``linear_2(silu(linear_1(pooled)))``: the pooled text embedding ``[B, P] -> [B, D]``
    (diffusers' ``PixArtAlphaTextProjection`` with ``act_fn="silu"``)."""

    def __init__(self, d_in: int, dim: int, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.linear_1 = _linear(d_in, dim, dtype, rngs)
        self.linear_2 = _linear(dim, dim, dtype, rngs)

    def __call__(self, pooled: Array) -> Array:
        h = self.linear_1(pooled.astype(self.linear_1.param_dtype))
        return self.linear_2(jax.nn.silu(h))


class TimeTextEmbedding(nnx.Module):
    """The conditioning vector ``c = MLP_t(t) [+ MLP_g(g)] + MLP_text(pooled)`` of every block.

    diffusers' ``CombinedTimestepTextProjEmbeddings`` (SD3, FLUX.1-schnell) or, with
    ``guidance=True``, ``CombinedTimestepGuidanceTextProjEmbeddings`` (guidance-distilled
    FLUX.1-dev, where the guidance scale is embedded like a timestep).
    """

    def __init__(
        self,
        dim: int,
        pooled_dim: int,
        *,
        guidance: bool = False,
        dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.timestep_embedder = TimestepEmbedding(dim, dtype=dtype, rngs=rngs)
        self.guidance_embedder = (
            TimestepEmbedding(dim, dtype=dtype, rngs=rngs) if guidance else None
        )
        self.text_embedder = TextProjection(pooled_dim, dim, dtype=dtype, rngs=rngs)

    def __call__(self, timestep: Array, pooled: Array, guidance: Array | None = None) -> Array:
        """Args:
            timestep: ``[N]`` float timesteps (0..1000 scale).
            pooled: ``[B, P]`` pooled text embeddings, ``B`` dividing ``N`` (projected at ``B``).
            guidance: ``[N]`` embedded guidance scales (0..1000 scale), only with ``guidance``.

        Returns:
            ``[N, D]``.
        """
        emb = self.timestep_embedder(timestep_embedding(timestep))
        if self.guidance_embedder is not None:
            if guidance is None:
                raise ValueError("this model embeds a guidance scale: pass guidance [N]")
            emb = emb + self.guidance_embedder(timestep_embedding(guidance))
        elif guidance is not None:
            raise ValueError("this model has no guidance embedding (guidance_embeds=False)")
        return emb + expand_batch(self.text_embedder(pooled), emb.shape[0])


# --------------------------------------------------------------------------- norms, modulation


def layer_norm(x: Array, eps: float = 1e-6) -> Array:
    """LayerNorm over the last axis without affine parameters, computed in float32 and returned
    in ``x.dtype``."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` over the last axis (Zhang & Sennrich 2019), in float32; the
    ``scale`` parameter is diffusers' ``weight``."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype: DType = jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype))

    def __call__(self, x: Array) -> Array:
        xf = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        return (xf * inv * scale).astype(x.dtype)


class AdaModulation(nnx.Module):
    """``chunks`` modulation vectors ``split(Linear(silu(c)))`` from the conditioning ``c``.

    The parameter head of diffusers' adaptive norms (its ``linear``): ``AdaLayerNormZero`` (6:
    shift, scale, gate of the attention, then of the MLP), ``SD35AdaLayerNormZeroX`` (9: those
    six, then shift, scale, gate of the second attention), ``AdaLayerNormZeroSingle`` (3) and
    ``AdaLayerNormContinuous`` (2: **scale, then shift**). Their layer norms have no parameters
    and are applied by the caller (:func:`layer_norm`, :func:`modulate`).
    """

    def __init__(self, dim: int, chunks: int, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.chunks = chunks
        self.linear = _linear(dim, chunks * dim, dtype, rngs)

    def __call__(self, emb: Array) -> list[Array]:
        """``emb [N, D]`` -> ``chunks`` arrays ``[N, D]``."""
        return jnp.split(self.linear(jax.nn.silu(emb)), self.chunks, axis=-1)


def modulate(x: Array, shift: Array, scale: Array) -> Array:
    """``x (1 + scale) + shift`` per particle.

    Args:
        x: ``[B, T, D]`` (normalised) tokens, ``B`` dividing ``N`` (text tokens may still be
            shared by the particles of a prompt; they are broadcast here).
        shift, scale: ``[N, D]``.

    Returns:
        ``[N, T, D]``.
    """
    x = expand_batch(x, shift.shape[0])
    return x * (1 + scale[:, None, :]) + shift[:, None, :]


def gated_add(x: Array, gate: Array, y: Array) -> Array:
    """The gated residual ``x + gate y``; ``x [B, T, D]`` (``B`` dividing ``N``), ``gate [N, D]``,
    ``y [N, T, D]`` -> ``[N, T, D]``."""
    return expand_batch(x, y.shape[0]) + gate[:, None, :] * y


# --------------------------------------------------------------------------- attention


def rope_tables(
    ids: Array, axes_dims: Sequence[int], theta: float = 10000.0
) -> tuple[Array, Array]:
    """Cosine and sine tables of the multi-axis rotary embedding of FLUX.1 (Su et al. 2021 RoPE,
    one frequency band per position axis).

    Axis ``a`` of the ids rotates ``axes_dims[a]`` consecutive channels of every head, in pairs
    ``(2j, 2j + 1)`` with angle ``ids[:, a] theta^(-2j / axes_dims[a])`` (diffusers'
    ``FluxPosEmbed``; the angles are computed in float32 here, in float64 there).

    Args:
        ids: ``[S, A]`` positions (FLUX: ``A = 3``; ``(0, row, col)`` for image tokens, zeros for
            text tokens).
        axes_dims: ``A`` even channel counts summing to the head size ``Dh``.
        theta: the base period.

    Returns:
        ``(cos, sin)``, each ``float32[S, Dh]`` with every value repeated for its channel pair.
    """
    cos, sin = [], []
    pos = ids.astype(jnp.float32)
    for a, d in enumerate(axes_dims):
        freqs = (1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d)).astype(np.float32)
        angles = pos[:, a, None] * jnp.asarray(freqs)[None, :]
        cos.append(jnp.repeat(jnp.cos(angles), 2, axis=-1))
        sin.append(jnp.repeat(jnp.sin(angles), 2, axis=-1))
    return jnp.concatenate(cos, axis=-1), jnp.concatenate(sin, axis=-1)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates the channel pairs of ``x [N, S, H, Dh]`` by the tables ``[S, Dh]`` (float32 math,
    result in ``x.dtype``): ``(a, b) -> (a cos - b sin, b cos + a sin)``."""
    xf = x.astype(jnp.float32)
    pairs = xf.reshape(*x.shape[:-1], -1, 2)
    rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
    out = xf * cos[None, :, None, :] + rotated * sin[None, :, None, :]
    return out.astype(x.dtype)


class Attention(nnx.Module):
    """Multi-head attention over one stream, or jointly over two (MMDiT).

    Parameter names are diffusers' (``Attention`` with ``JointAttnProcessor2_0`` for SD3,
    ``FluxAttention`` for FLUX): ``to_q``/``to_k``/``to_v`` and ``to_out`` (``to_out.0`` in the
    file) for the image stream; with ``joint``, ``add_q_proj``/``add_k_proj``/``add_v_proj`` and,
    unless ``context_pre_only``, ``to_add_out`` for the text stream; with ``qk_norm``, per-head
    RMS norms ``norm_q``/``norm_k`` (and ``norm_added_q``/``norm_added_k``).

    Args:
        dim: model width ``D``.
        heads, head_dim: ``H``, ``Dh`` (``H Dh = D``).
        joint: has the text-stream projections.
        context_pre_only: the text stream's output is not needed (SD3's last block): no
            ``to_add_out``, and text queries are not computed.
        out_proj: has ``to_out`` (FLUX's single-stream blocks have none).
        qk_norm: RMS-normalise queries and keys per head.
        eps: the RMS norms' epsilon.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        joint: bool = False,
        context_pre_only: bool = False,
        out_proj: bool = True,
        qk_norm: bool = False,
        eps: float = 1e-6,
        dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.context_pre_only = context_pre_only
        self.to_q = _linear(dim, inner, dtype, rngs)
        self.to_k = _linear(dim, inner, dtype, rngs)
        self.to_v = _linear(dim, inner, dtype, rngs)
        self.norm_q = RMSNorm(head_dim, eps, dtype=dtype) if qk_norm else None
        self.norm_k = RMSNorm(head_dim, eps, dtype=dtype) if qk_norm else None
        self.to_out = _linear(inner, dim, dtype, rngs) if out_proj else None
        if joint:
            self.add_q_proj = _linear(dim, inner, dtype, rngs)
            self.add_k_proj = _linear(dim, inner, dtype, rngs)
            self.add_v_proj = _linear(dim, inner, dtype, rngs)
            self.norm_added_q = RMSNorm(head_dim, eps, dtype=dtype) if qk_norm else None
            self.norm_added_k = RMSNorm(head_dim, eps, dtype=dtype) if qk_norm else None
            self.to_add_out = None if context_pre_only else _linear(inner, dim, dtype, rngs)

    def _heads(self, proj: nnx.Linear, norm: RMSNorm | None, x: Array) -> Array:
        h = proj(x).reshape(*x.shape[:2], self.heads, self.head_dim)
        return h if norm is None else norm(h)

    def __call__(
        self,
        x: Array,
        context: Array | None = None,
        *,
        context_first: bool = False,
        rope: tuple[Array, Array] | None = None,
    ) -> tuple[Array, Array | None]:
        """Attention of the image tokens (and text tokens) over both.

        Args:
            x: ``[N, L, D]`` image tokens (FLUX single blocks: the whole text + image sequence).
            context: ``[N, T, D]`` text tokens for joint attention, or ``None``.
            context_first: order of the joint sequence: ``[text, image]`` (FLUX) or ``[image,
                text]`` (SD3).
            rope: ``(cos, sin)`` tables ``[S, Dh]`` of the whole sequence (in its order).

        Returns:
            ``(image output [N, L, D], text output [N, T, D] or None)``; the text output is
            ``None`` without ``context`` or with ``context_pre_only``.
        """
        q = self._heads(self.to_q, self.norm_q, x)
        k = self._heads(self.to_k, self.norm_k, x)
        v = self._heads(self.to_v, None, x)
        n_img = x.shape[1]
        if context is not None:
            cq = self._heads(self.add_q_proj, self.norm_added_q, context)
            ck = self._heads(self.add_k_proj, self.norm_added_k, context)
            cv = self._heads(self.add_v_proj, None, context)

            def join(a: Array, b: Array) -> Array:
                return jnp.concatenate([b, a] if context_first else [a, b], axis=1)

            q, k, v = join(q, cq), join(k, ck), join(v, cv)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        n_txt = q.shape[1] - n_img
        img = slice(n_txt, None) if context_first else slice(0, n_img)
        txt = slice(0, n_txt) if context_first else slice(n_img, None)
        if context is not None and self.context_pre_only:
            q = q[:, img]  # the text queries' outputs would be discarded
        out = jax.nn.dot_product_attention(q, k, v)
        out = out.reshape(*out.shape[:2], self.heads * self.head_dim)
        if context is None:
            return (out if self.to_out is None else self.to_out(out)), None
        if self.context_pre_only:
            return self.to_out(out), None
        return self.to_out(out[:, img]), self.to_add_out(out[:, txt])


class FeedForward(nnx.Module):
    """``Linear(D, 4D) -> GELU(tanh) -> Linear(4D, D)`` (diffusers ``FeedForward(dim,
    activation_fn="gelu-approximate")``; ``proj_in``/``proj_out`` are its ``net.0.proj`` /
    ``net.2``)."""

    def __init__(self, dim: int, *, mult: int = 4, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.proj_in = _linear(dim, mult * dim, dtype, rngs)
        self.proj_out = _linear(mult * dim, dim, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        return self.proj_out(jax.nn.gelu(self.proj_in(x), approximate=True))


# --------------------------------------------------------------------------- checkpoint names

_FF = re.compile(r"\.(ff|ff_context)\.proj_(in|out)\.")


def diffusers_name(dotted: str) -> str:
    """Our dotted parameter name -> the diffusers tensor name: ``ff.proj_in`` ->
    ``ff.net.0.proj``, ``ff.proj_out`` -> ``ff.net.2`` (also ``ff_context``), ``attn.to_out`` ->
    ``attn.to_out.0``."""
    dotted = _FF.sub(
        lambda m: f".{m.group(1)}.net.0.proj." if m.group(2) == "in" else f".{m.group(1)}.net.2.",
        dotted,
    )
    return re.sub(r"\.(attn2?)\.to_out\.", r".\1.to_out.0.", dotted)
