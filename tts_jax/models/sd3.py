"""The Stable Diffusion 3 / 3.5 MMDiT (Esser et al. 2024, "Scaling Rectified Flow Transformers for
High-Resolution Image Synthesis") in Flax NNX, diffusers layout.

Mirrors diffusers' ``SD3Transformer2DModel`` with its parameter names, so a diffusers
``transformer/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or its shards)
loads with :func:`load_sd3` and :func:`save_sd3` writes one back. Supported: SD3 (joint blocks,
the last one "context pre-only") and the SD3.5 variants ``qk_norm="rms_norm"`` and
``dual_attention_layers`` (a second, image-only self-attention in those blocks, modulated by
diffusers' ``SD35AdaLayerNormZeroX``). Not supported: ControlNet residuals, IP-adapters,
skip-layer guidance.

Forward pass, latents ``x [N, C, H, W]`` (NCHW, the particle axis first):
    img = conv_patch(x) + crop(sincos pos_embed, centred)    [N, L, D], L = (H / p)(W / p)
    txt = context_embedder(encoder_hidden_states)            [B, T, D], at the prompt batch B
    c   = MLP_t(timestep_freqs(t)) + MLP_p(pooled)           [N, D]
    block: adaLN-Zero on both streams, joint attention over [img, txt] (each stream its own
           q/k/v and output projections), gated MLPs; the last block updates the image only
    out = proj_out(LN(img)(1 + scale) + shift); unpatchify   [N, out_channels, H, W]

The timestep is diffusers' ``timestep = 1000 sigma`` of the rectified-flow path ``x_sigma = (1 -
sigma) x_0 + sigma eps`` and the output is the velocity ``eps - x_0``, i.e. the ``Linear``
interpolant of :mod:`tts_jax.interpolants` at ``t = sigma``: a :class:`~tts_jax.FlowModel` apply
is ``sd3_apply(params, x, 1000 t, *cond)`` (the shift of the sigma schedule is the sampler's
business). Prompts are shared by the particles (see :mod:`tts_jax.models.mmdit_layers`).

Pure use inside ``jax.jit``: ``params = nnx.split(model)`` and ``sd3_apply(params, ...)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.models import checkpoint
from tts_jax.models.mmdit_layers import (
    AdaModulation,
    Attention,
    DType,
    FeedForward,
    TimeTextEmbedding,
    diffusers_name,
    gated_add,
    layer_norm,
    modulate,
)

Array = jax.Array
CLASS_NAME = "SD3Transformer2DModel"
QK_NORMS = (None, "rms_norm")
_EPS = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class SD3Config:
    """``SD3Transformer2DModel`` config: diffusers field names and defaults."""

    sample_size: int = 128
    patch_size: int = 2
    in_channels: int = 16
    num_layers: int = 18
    attention_head_dim: int = 64
    num_attention_heads: int = 18
    joint_attention_dim: int = 4096
    caption_projection_dim: int = 1152
    pooled_projection_dim: int = 2048
    out_channels: int | None = 16
    pos_embed_max_size: int = 96
    dual_attention_layers: tuple[int, ...] = ()
    qk_norm: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "dual_attention_layers", tuple(self.dual_attention_layers))
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be null or 'rms_norm', got {self.qk_norm!r}")
        if self.caption_projection_dim != self.inner_dim:
            raise ValueError(
                f"caption_projection_dim ({self.caption_projection_dim}) must equal "
                f"num_attention_heads * attention_head_dim ({self.inner_dim}), as in every SD3 "
                "checkpoint (the joint attention reads both streams at that width)"
            )
        bad = [i for i in self.dual_attention_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"dual_attention_layers {bad} are not block indices < num_layers")
        if self.pos_embed_max_size is None or self.pos_embed_max_size < 1:
            raise ValueError("pos_embed_max_size must be a positive int (SD3's cropped embedding)")
        if min(self.patch_size, self.num_layers, self.sample_size) < 1:
            raise ValueError("patch_size, num_layers and sample_size must be positive")
        if self.inner_dim % 4:
            raise ValueError("the width (heads * head dim) must be a multiple of 4")

    @property
    def inner_dim(self) -> int:
        """Model width ``D = num_attention_heads * attention_head_dim``."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> SD3Config:
        """Parse a diffusers ``config.json`` dict (keys starting with ``_`` are ignored).

        Raises:
            ValueError: another ``_class_name``, a key this port does not know (e.g. a
                ControlNet's), or an unsupported value (``qk_norm`` other than null /
                ``"rms_norm"``, ...), naming it.
        """
        name = raw.get("_class_name", CLASS_NAME)
        if name != CLASS_NAME:
            raise ValueError(f"not an {CLASS_NAME} config: _class_name {name!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if k not in fields and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unsupported {CLASS_NAME} config keys: {unknown}")
        return cls(**{k: v for k, v in raw.items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        """The diffusers ``config.json`` content."""
        out = dataclasses.asdict(self)
        out["dual_attention_layers"] = list(self.dual_attention_layers)
        return {"_class_name": CLASS_NAME, **out}


# --------------------------------------------------------------------------- patch embedding


class PosEmbedBuffer(nnx.Variable):
    """A fixed (non-trained) array stored in the checkpoint, like a persistent PyTorch buffer."""


def sincos_grid(embed_dim: int, grid: int, base_size: int) -> Array:
    """The 2-D sine-cosine table ``float32[grid * grid, D]`` of diffusers'
    ``get_2d_sincos_pos_embed(D, grid, base_size)`` (positions ``i / (grid / base_size)``; first
    half of the channels the column, second half the row, each ``[sin, cos]``).

    Used only to initialise a fresh model (float32 math; loading reads the checkpoint's table).
    """
    pos = jnp.arange(grid, dtype=jnp.float32) / (grid / base_size)
    omega = 1.0 / 10000 ** (jnp.arange(embed_dim // 4, dtype=jnp.float32) / (embed_dim / 4))

    def one_axis(p: Array) -> Array:
        out = p.reshape(-1)[:, None] * omega[None, :]
        return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=1)

    rows, cols = jnp.meshgrid(pos, pos, indexing="ij")
    return jnp.concatenate([one_axis(cols), one_axis(rows)], axis=1)


class PatchEmbed(nnx.Module):
    """``p x p`` patches (a strided convolution) plus the centre crop of a fixed
    ``pos_embed_max_size^2`` sincos table (diffusers ``PatchEmbed`` with ``pos_embed_max_size``).

    ``pos_embed [1, M^2, D]`` is float32 in every model dtype.
    """

    def __init__(self, config: SD3Config, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        p, d = config.patch_size, config.inner_dim
        self.patch, self.max_size = p, config.pos_embed_max_size
        self.proj = nnx.Conv(
            config.in_channels,
            d,
            (p, p),
            strides=(p, p),
            padding="VALID",
            dtype=dtype,
            param_dtype=dtype,
            rngs=rngs,
        )
        table = sincos_grid(d, self.max_size, config.sample_size // p)
        self.pos_embed = PosEmbedBuffer(table[None])

    def __call__(self, x: Array) -> Array:
        """``x [N, C, H, W] -> [N, (H // p)(W // p), D]`` in row-major patch order."""
        h = self.proj(jnp.transpose(x, (0, 2, 3, 1)).astype(self.proj.param_dtype))
        n, gh, gw, d = h.shape
        if max(gh, gw) > self.max_size:
            raise ValueError(
                f"a latent grid of {gh}x{gw} patches exceeds pos_embed_max_size {self.max_size}"
            )
        top, left = (self.max_size - gh) // 2, (self.max_size - gw) // 2
        table = self.pos_embed[...].reshape(self.max_size, self.max_size, d)
        pos = table[top : top + gh, left : left + gw].reshape(1, gh * gw, d)
        return (h.reshape(n, gh * gw, d).astype(jnp.float32) + pos).astype(h.dtype)


# --------------------------------------------------------------------------- blocks


class JointTransformerBlock(nnx.Module):
    """MMDiT block (diffusers ``JointTransformerBlock``).

    Image stream: adaLN-Zero (``norm1``), joint attention, with ``use_dual_attention`` a second
    image-only attention ``attn2`` (``norm1`` then gives 9 vectors), gated MLP ``ff``. Text
    stream: adaLN-Zero (``norm1_context``), the same joint attention, gated MLP ``ff_context``;
    with ``context_pre_only`` (the last block) only the adaptive norm ``norm1_context`` (an
    ``AdaLayerNormContinuous``) feeds the attention, and the text stream ends.
    """

    def __init__(
        self,
        config: SD3Config,
        *,
        context_pre_only: bool,
        dual: bool,
        dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        dim, heads, hd = config.inner_dim, config.num_attention_heads, config.attention_head_dim
        qk_norm = config.qk_norm == "rms_norm"
        self.context_pre_only, self.dual = context_pre_only, dual
        self.norm1 = AdaModulation(dim, 9 if dual else 6, dtype=dtype, rngs=rngs)
        self.norm1_context = AdaModulation(
            dim, 2 if context_pre_only else 6, dtype=dtype, rngs=rngs
        )
        self.attn = Attention(
            dim,
            heads,
            hd,
            joint=True,
            context_pre_only=context_pre_only,
            qk_norm=qk_norm,
            dtype=dtype,
            rngs=rngs,
        )
        self.attn2 = (
            Attention(dim, heads, hd, qk_norm=qk_norm, dtype=dtype, rngs=rngs) if dual else None
        )
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)
        self.ff_context = None if context_pre_only else FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(self, img: Array, txt: Array, temb: Array) -> tuple[Array, Array | None]:
        """One block.

        Args:
            img: ``[N, L, D]`` image tokens.
            txt: ``[B, T, D]`` text tokens, ``B`` dividing ``N`` (``B < N`` only before the
                first block has mixed them with the particles' images).
            temb: ``[N, D]`` conditioning.

        Returns:
            ``(img [N, L, D], txt [N, T, D] or None after a context-pre-only block)``.
        """
        mods = self.norm1(temb)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mods[:6]
        img_norm = layer_norm(img, _EPS)
        txt_norm = layer_norm(txt, _EPS)
        if self.context_pre_only:
            c_scale, c_shift = self.norm1_context(temb)
            txt_in = modulate(txt_norm, c_shift, c_scale)
        else:
            c_shift_a, c_scale_a, c_gate_a, c_shift_m, c_scale_m, c_gate_m = self.norm1_context(
                temb
            )
            txt_in = modulate(txt_norm, c_shift_a, c_scale_a)
        attn_img, attn_txt = self.attn(modulate(img_norm, shift_a, scale_a), txt_in)
        img = gated_add(img, gate_a, attn_img)
        if self.attn2 is not None:
            shift_2, scale_2, gate_2 = mods[6:]
            attn2, _ = self.attn2(modulate(img_norm, shift_2, scale_2))
            img = gated_add(img, gate_2, attn2)
        img = gated_add(img, gate_m, self.ff(modulate(layer_norm(img, _EPS), shift_m, scale_m)))
        if self.context_pre_only:
            return img, None
        txt = gated_add(txt, c_gate_a, attn_txt)
        h = self.ff_context(modulate(layer_norm(txt, _EPS), c_shift_m, c_scale_m))
        return img, gated_add(txt, c_gate_m, h)


class SD3Transformer(nnx.Module):
    """The SD3 MMDiT with diffusers ``SD3Transformer2DModel`` parameter names.

    Args:
        config: the architecture.
        dtype: parameter and activation dtype (norms, softmax and the positional table stay
            float32).
        rngs: initialisation keys (use ``nnx.eval_shape`` to build an abstract model to load).
    """

    def __init__(self, config: SD3Config, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        dim = config.inner_dim
        self.pos_embed = PatchEmbed(config, dtype=dtype, rngs=rngs)
        self.time_text_embed = TimeTextEmbedding(
            dim, config.pooled_projection_dim, dtype=dtype, rngs=rngs
        )
        self.context_embedder = nnx.Linear(
            config.joint_attention_dim,
            config.caption_projection_dim,
            dtype=dtype,
            param_dtype=dtype,
            rngs=rngs,
        )
        last = config.num_layers - 1
        self.transformer_blocks = nnx.List(
            [
                JointTransformerBlock(
                    config,
                    context_pre_only=i == last,
                    dual=i in config.dual_attention_layers,
                    dtype=dtype,
                    rngs=rngs,
                )
                for i in range(config.num_layers)
            ]
        )
        self.norm_out = AdaModulation(dim, 2, dtype=dtype, rngs=rngs)
        p = config.patch_size
        self.proj_out = nnx.Linear(
            dim, p * p * config.output_channels, dtype=dtype, param_dtype=dtype, rngs=rngs
        )

    def __call__(
        self,
        latents: Array,
        timestep: Array,
        encoder_hidden_states: Array,
        pooled_projections: Array,
    ) -> Array:
        """The velocity at the noisy latents.

        Args:
            latents: ``[N, C, H, W]``; ``H // p`` and ``W // p`` at most ``pos_embed_max_size``
                (pixels beyond the last whole patch are dropped, as by diffusers).
            timestep: ``[N]`` or scalar, diffusers' ``1000 sigma`` (float).
            encoder_hidden_states: ``[B, T, joint_attention_dim]`` prompt tokens (CLIP-L/G +
                T5 in SD3), ``B`` dividing ``N``: particle ``i`` uses prompt ``i // (N // B)``.
            pooled_projections: ``[B, pooled_projection_dim]`` pooled CLIP embeddings.

        Returns:
            ``[N, out_channels, (H // p) p, (W // p) p]`` in ``latents.dtype`` (computed in the
            model dtype).
        """
        n, _, height, width = latents.shape
        p = self.config.patch_size
        if min(height, width) < p:
            raise ValueError(f"SD3 latents of {height}x{width} are smaller than one {p}x{p} patch")
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (n,))
        img = self.pos_embed(latents)
        temb = self.time_text_embed(timestep, pooled_projections)
        txt = self.context_embedder(encoder_hidden_states.astype(self.dtype))
        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb)
        scale, shift = self.norm_out(temb)
        out = self.proj_out(modulate(layer_norm(img, _EPS), shift, scale))
        c = self.config.output_channels
        gh, gw = height // p, width // p
        out = out.reshape(n, gh, gw, p, p, c)
        out = jnp.einsum("nhwpqc->nchpwq", out).reshape(n, c, gh * p, gw * p)
        return out.astype(latents.dtype)


# --------------------------------------------------------------------------- functional use


def sd3_apply(
    params: tuple[nnx.GraphDef, nnx.State],
    latents: Array,
    timestep: Array,
    encoder_hidden_states: Array,
    pooled_projections: Array,
) -> Array:
    """Pure forward pass for ``jax.jit``; ``params = nnx.split(model)``.

    Args:
        params: ``nnx.split`` of an :class:`SD3Transformer`.
        latents: ``[N, C, H, W]`` noisy latents.
        timestep: ``[N]`` (or scalar) diffusers timesteps ``1000 sigma``.
        encoder_hidden_states: ``[B, T, joint_attention_dim]``, ``B`` dividing ``N`` (shared by
            the particles of a prompt; broadcast inside, after the text projections).
        pooled_projections: ``[B, pooled_projection_dim]``.

    Returns:
        ``[N, C_out, H, W]`` velocity ``eps - x_0`` (Esser et al. 2024 rectified flow).
    """
    graphdef, state = params
    model = nnx.merge(graphdef, state)
    return model(latents, timestep, encoder_hidden_states, pooled_projections)


# --------------------------------------------------------------------------- checkpoints

# diffusers names and PyTorch kernel layouts (docs/design.md, "Models we ship").
LAYOUT = dataclasses.replace(checkpoint.TORCH, rename=diffusers_name)
_POS = "pos_embed.pos_embed"


def load_sd3(path: str | Path, dtype: DType = jnp.float32) -> tuple[SD3Config, SD3Transformer]:
    """Load a diffusers ``SD3Transformer2DModel`` folder (safetensors only).

    Args:
        path: folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or its
            shards listed by ``diffusion_pytorch_model.safetensors.index.json``), e.g. the
            ``transformer/`` folder of a diffusers SD3 / SD3.5 pipeline.
        dtype: parameter and activation dtype (e.g. ``jnp.bfloat16``); the positional table
            stays float32.

    Returns:
        ``(config, model)``.

    Raises:
        CheckpointNotFoundError: the folder, its config or weights are missing.
        CheckpointConfigError: invalid JSON, a wrongly typed key, another ``_class_name`` or an
            unsupported setting (naming the file and the key).
        TensorMismatchError: tensors missing, unexpected or of the wrong shape (all named).
    """
    loader = "load_sd3"
    config = checkpoint.read_config(path, loader, SD3Config.from_dict, schema=SD3Config)
    abstract = nnx.eval_shape(lambda: SD3Transformer(config, dtype=dtype, rngs=nnx.Rngs(0)))
    tensors = checkpoint.read_tensors(
        path, loader, checkpoint.DIFFUSERS_WEIGHTS_NAME, hint="only safetensors are supported"
    )
    return config, checkpoint.load_params(abstract, tensors, LAYOUT)


def save_sd3(
    path: str | Path,
    config: SD3Config,
    model: SD3Transformer,
    *,
    max_shard_size: int | None = None,
) -> None:
    """Write a diffusers folder that ``SD3Transformer2DModel.from_pretrained`` and
    :func:`load_sd3` load (parameters in the model dtype; shards over ``max_shard_size`` bytes).
    """
    tensors = checkpoint.export_params(model, LAYOUT)
    tensors[_POS] = np.asarray(jax.device_get(model.pos_embed.pos_embed[...]), np.float32)
    checkpoint.save_folder(
        path,
        config.to_dict(),
        tensors,
        checkpoint.DIFFUSERS_WEIGHTS_NAME,
        max_shard_size=max_shard_size,
    )
