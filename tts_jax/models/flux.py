"""The FLUX.1 transformer (Black Forest Labs 2024, "FLUX.1"; an MMDiT after Esser et al. 2024) in
Flax NNX, diffusers layout.

Mirrors diffusers' ``FluxTransformer2DModel`` with its parameter names, so a diffusers
``transformer/`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or its shards)
loads with :func:`load_flux` and :func:`save_flux` writes one back. Both published variants:
guidance-distilled (``guidance_embeds=True``, FLUX.1-dev: the guidance scale is an input embedded
like the timestep) and not (FLUX.1-schnell). Not supported: ControlNet residuals, IP-adapters.

Input is the **packed** latent sequence of diffusers' Flux pipeline: the VAE latent ``[N, C, H,
W]`` cut into ``2 x 2`` patches, ``packed [N, L, 4 C]`` with ``L = (H / 2)(W / 2)``, and the
position ids ``img_ids [L, 3]`` (``(0, row, col)``) and ``txt_ids [T, 3]`` (zeros), exactly as
``FluxTransformer2DModel.forward`` takes them. Forward pass:

    img = x_embedder(packed)                                  [N, L, D]
    txt = context_embedder(encoder_hidden_states)             [B, T, D], at the prompt batch B
    c   = MLP_t(freqs(1000 t)) [+ MLP_g(freqs(1000 g))] + MLP_p(pooled)                [N, D]
    rope tables of ids = [txt_ids; img_ids] (3 axes, theta 10000)
    double-stream blocks: adaLN-Zero per stream, joint attention over [txt, img] with per-head
        RMS-normalised queries and keys and RoPE, gated MLPs per stream
    single-stream blocks on x = [txt, img]: one adaLN-Zero, attention and an MLP in parallel,
        x += gate proj_out([attn(h), gelu(proj_mlp(h))])
    out = proj_out(LN(img)(1 + scale) + shift)                [N, L, p^2 out_channels]

Time convention (as ``forward``): ``timestep = sigma`` in ``[0, 1]`` (the pipeline passes ``t /
1000``; the model multiplies by 1000) on the rectified-flow path ``x_sigma = (1 - sigma) x_0 +
sigma eps``; the output is the velocity ``eps - x_0``. So a :class:`~tts_jax.FlowModel` apply on
the ``Linear`` interpolant is ``flux_apply(params, x, t, guidance, *cond)`` (the schedule's shift
is the sampler's business). ``guidance`` is the raw scale (e.g. 3.5), also multiplied by 1000.
Prompts are shared by the particles (see :mod:`tts_jax.models.mmdit_layers`).

Pure use inside ``jax.jit``: ``params = nnx.split(model)`` and ``flux_apply(params, ...)``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from tts_jax.models import checkpoint
from tts_jax.models.mmdit_layers import (
    AdaModulation,
    Attention,
    DType,
    FeedForward,
    TimeTextEmbedding,
    diffusers_name,
    expand_batch,
    gated_add,
    layer_norm,
    modulate,
    rope_tables,
)

Array = jax.Array
CLASS_NAME = "FluxTransformer2DModel"
ROPE_THETA = 10000.0
_EPS = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class FluxConfig:
    """``FluxTransformer2DModel`` config: diffusers field names and defaults."""

    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = None
    num_layers: int = 19
    num_single_layers: int = 38
    attention_head_dim: int = 128
    num_attention_heads: int = 24
    joint_attention_dim: int = 4096
    pooled_projection_dim: int = 768
    guidance_embeds: bool = False
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)

    def __post_init__(self):
        object.__setattr__(self, "axes_dims_rope", tuple(self.axes_dims_rope))
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(
                f"axes_dims_rope {list(self.axes_dims_rope)} must sum to attention_head_dim "
                f"({self.attention_head_dim})"
            )
        if any(d <= 0 or d % 2 for d in self.axes_dims_rope):
            raise ValueError(f"axes_dims_rope {list(self.axes_dims_rope)} must be positive evens")
        if min(self.patch_size, self.in_channels, self.num_attention_heads) < 1:
            raise ValueError("patch_size, in_channels and num_attention_heads must be positive")
        if min(self.num_layers, self.num_single_layers) < 0:
            raise ValueError("num_layers and num_single_layers must be >= 0")

    @property
    def inner_dim(self) -> int:
        """Model width ``D = num_attention_heads * attention_head_dim``."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        """Features per output token: ``patch_size^2 * (out_channels or in_channels)``."""
        return self.patch_size**2 * (self.out_channels or self.in_channels)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FluxConfig:
        """Parse a diffusers ``config.json`` dict (keys starting with ``_`` are ignored).

        Raises:
            ValueError: another ``_class_name`` (e.g. ``FluxControlNetModel``), a key this port
                does not know (e.g. a ControlNet's ``num_mode``), or an inconsistent value,
                naming it.
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
        out["axes_dims_rope"] = list(self.axes_dims_rope)
        return {"_class_name": CLASS_NAME, **out}


# --------------------------------------------------------------------------- blocks


class FluxTransformerBlock(nnx.Module):
    """Double-stream block (diffusers ``FluxTransformerBlock``): adaLN-Zero on each stream
    (``norm1``, ``norm1_context``), joint attention over ``[text, image]`` with RoPE, gated MLPs
    ``ff`` / ``ff_context``."""

    def __init__(self, config: FluxConfig, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        dim = config.inner_dim
        self.norm1 = AdaModulation(dim, 6, dtype=dtype, rngs=rngs)
        self.norm1_context = AdaModulation(dim, 6, dtype=dtype, rngs=rngs)
        self.attn = Attention(
            dim,
            config.num_attention_heads,
            config.attention_head_dim,
            joint=True,
            qk_norm=True,
            eps=_EPS,
            dtype=dtype,
            rngs=rngs,
        )
        self.ff = FeedForward(dim, dtype=dtype, rngs=rngs)
        self.ff_context = FeedForward(dim, dtype=dtype, rngs=rngs)

    def __call__(
        self, img: Array, txt: Array, temb: Array, rope: tuple[Array, Array]
    ) -> tuple[Array, Array]:
        """One block.

        Args:
            img: ``[N, L, D]`` image tokens.
            txt: ``[B, T, D]`` text tokens, ``B`` dividing ``N`` (``B < N`` only before the first
                block has mixed them with the particles' images).
            temb: ``[N, D]`` conditioning.
            rope: ``(cos, sin)`` tables ``[T + L, Dh]``.

        Returns:
            ``(img [N, L, D], txt [N, T, D])``.
        """
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.norm1(temb)
        c_shift_a, c_scale_a, c_gate_a, c_shift_m, c_scale_m, c_gate_m = self.norm1_context(temb)
        attn_img, attn_txt = self.attn(
            modulate(layer_norm(img, _EPS), shift_a, scale_a),
            modulate(layer_norm(txt, _EPS), c_shift_a, c_scale_a),
            context_first=True,
            rope=rope,
        )
        img = gated_add(img, gate_a, attn_img)
        img = gated_add(img, gate_m, self.ff(modulate(layer_norm(img, _EPS), shift_m, scale_m)))
        txt = gated_add(txt, c_gate_a, attn_txt)
        h = self.ff_context(modulate(layer_norm(txt, _EPS), c_shift_m, c_scale_m))
        return img, gated_add(txt, c_gate_m, h)


class FluxSingleTransformerBlock(nnx.Module):
    """Single-stream block (diffusers ``FluxSingleTransformerBlock``) on the joint sequence:
    ``h = adaLN(x)``, ``x += gate proj_out([attn(h), gelu_tanh(proj_mlp(h))])``; the attention
    (``attn``: RMS-normalised queries and keys, RoPE) has no output projection of its own."""

    def __init__(self, config: FluxConfig, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        dim, mlp = config.inner_dim, 4 * config.inner_dim
        self.norm = AdaModulation(dim, 3, dtype=dtype, rngs=rngs)
        self.proj_mlp = nnx.Linear(dim, mlp, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.proj_out = nnx.Linear(dim + mlp, dim, dtype=dtype, param_dtype=dtype, rngs=rngs)
        self.attn = Attention(
            dim,
            config.num_attention_heads,
            config.attention_head_dim,
            out_proj=False,
            qk_norm=True,
            eps=_EPS,
            dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x: Array, temb: Array, rope: tuple[Array, Array]) -> Array:
        """``x [N, T + L, D]`` (text then image tokens), ``temb [N, D]`` -> ``[N, T + L, D]``."""
        shift, scale, gate = self.norm(temb)
        h = modulate(layer_norm(x, _EPS), shift, scale)
        attn, _ = self.attn(h, rope=rope)
        mlp = jax.nn.gelu(self.proj_mlp(h), approximate=True)
        return gated_add(x, gate, self.proj_out(jnp.concatenate([attn, mlp], axis=-1)))


class FluxTransformer(nnx.Module):
    """FLUX.1 with diffusers ``FluxTransformer2DModel`` parameter names.

    Args:
        config: the architecture.
        dtype: parameter and activation dtype (norms, softmax, sinusoidal features and the rotary
            tables stay float32).
        rngs: initialisation keys (use ``nnx.eval_shape`` to build an abstract model to load).
    """

    def __init__(self, config: FluxConfig, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        dim = config.inner_dim

        def linear(d_in: int, d_out: int) -> nnx.Linear:
            return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=dtype, rngs=rngs)

        self.time_text_embed = TimeTextEmbedding(
            dim,
            config.pooled_projection_dim,
            guidance=config.guidance_embeds,
            dtype=dtype,
            rngs=rngs,
        )
        self.context_embedder = linear(config.joint_attention_dim, dim)
        self.x_embedder = linear(config.in_channels, dim)
        self.transformer_blocks = nnx.List(
            [FluxTransformerBlock(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)]
        )
        self.single_transformer_blocks = nnx.List(
            [
                FluxSingleTransformerBlock(config, dtype=dtype, rngs=rngs)
                for _ in range(config.num_single_layers)
            ]
        )
        self.norm_out = AdaModulation(dim, 2, dtype=dtype, rngs=rngs)
        self.proj_out = linear(dim, config.output_channels)

    def __call__(
        self,
        packed: Array,
        timestep: Array,
        guidance: Array | None,
        pooled_projections: Array,
        encoder_hidden_states: Array,
        txt_ids: Array,
        img_ids: Array,
    ) -> Array:
        """The velocity at the packed noisy latents.

        Args:
            packed: ``[N, L, in_channels]`` packed latents (``2 x 2`` patches of the VAE latent).
            timestep: ``[N]`` or scalar ``sigma`` in ``[0, 1]`` (multiplied by 1000 here).
            guidance: ``[N]`` or scalar guidance scale (multiplied by 1000 here) for a
                ``guidance_embeds`` model, else ``None``.
            pooled_projections: ``[B, pooled_projection_dim]`` pooled CLIP-L embeddings, ``B``
                dividing ``N``: particle ``i`` uses prompt ``i // (N // B)``.
            encoder_hidden_states: ``[B, T, joint_attention_dim]`` T5 prompt tokens.
            txt_ids: ``[T, 3]`` text position ids (zeros in the pipeline); a leading batch axis
                is dropped, as by diffusers.
            img_ids: ``[L, 3]`` image position ids ``(0, row, col)``.

        Returns:
            ``[N, L, patch_size^2 out_channels]`` in ``packed.dtype`` (computed in the model
            dtype).

        Raises:
            ValueError: ``guidance`` given to a model without guidance embedding or missing for
                one with it; ``B`` not dividing ``N``.
        """
        n, seq, _ = packed.shape
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        if img_ids.shape[0] != seq or txt_ids.shape[0] != encoder_hidden_states.shape[1]:
            raise ValueError(
                f"img_ids {tuple(img_ids.shape)} / txt_ids {tuple(txt_ids.shape)} do not match "
                f"{seq} image and {encoder_hidden_states.shape[1]} text tokens"
            )

        def scaled(v: Array) -> Array:  # 1000 v in float32 (diffusers: in the model dtype)
            return jnp.broadcast_to(jnp.asarray(v, jnp.float32), (n,)) * 1000.0

        temb = self.time_text_embed(
            scaled(timestep), pooled_projections, None if guidance is None else scaled(guidance)
        )
        img = self.x_embedder(packed.astype(self.dtype))
        txt = self.context_embedder(encoder_hidden_states.astype(self.dtype))
        rope = rope_tables(jnp.concatenate([txt_ids, img_ids], axis=0), self.config.axes_dims_rope)
        for block in self.transformer_blocks:
            img, txt = block(img, txt, temb, rope)
        x = jnp.concatenate([expand_batch(txt, n), img], axis=1)
        for block in self.single_transformer_blocks:
            x = block(x, temb, rope)
        img = x[:, x.shape[1] - seq :]
        scale, shift = self.norm_out(temb)
        out = self.proj_out(modulate(layer_norm(img, _EPS), shift, scale))
        return out.astype(packed.dtype)


# --------------------------------------------------------------------------- functional use


def flux_apply(
    params: tuple[nnx.GraphDef, nnx.State],
    packed: Array,
    timestep: Array,
    guidance: Array | None,
    pooled_projections: Array,
    encoder_hidden_states: Array,
    txt_ids: Array,
    img_ids: Array,
) -> Array:
    """Pure forward pass for ``jax.jit``; ``params = nnx.split(model)``.

    Args:
        params: ``nnx.split`` of a :class:`FluxTransformer`.
        packed: ``[N, L, C4]`` packed noisy latents.
        timestep: ``[N]`` (or scalar) ``sigma`` in ``[0, 1]`` (diffusers' Flux convention: the
            pipeline passes ``t / 1000``, the model multiplies by 1000).
        guidance: ``[N]`` (or scalar) guidance scale for FLUX.1-dev, ``None`` for schnell.
        pooled_projections: ``[B, D_pooled]``, ``B`` dividing ``N`` (shared by the particles of a
            prompt; broadcast inside, after the text projections).
        encoder_hidden_states: ``[B, T, D_joint]``.
        txt_ids: ``[T, 3]``; img_ids: ``[L, 3]``.

    Returns:
        ``[N, L, C4_out]`` velocity ``eps - x_0`` (rectified flow) in the packed layout.
    """
    graphdef, state = params
    model = nnx.merge(graphdef, state)
    return model(
        packed, timestep, guidance, pooled_projections, encoder_hidden_states, txt_ids, img_ids
    )


# --------------------------------------------------------------------------- checkpoints

# diffusers names and PyTorch kernel layouts (docs/design.md, "Models we ship").
LAYOUT = dataclasses.replace(checkpoint.TORCH, rename=diffusers_name)


def load_flux(path: str | Path, dtype: DType = jnp.float32) -> tuple[FluxConfig, FluxTransformer]:
    """Load a diffusers ``FluxTransformer2DModel`` folder (safetensors only).

    Args:
        path: folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or its
            shards listed by ``diffusion_pytorch_model.safetensors.index.json``), e.g. the
            ``transformer/`` folder of a diffusers FLUX.1 pipeline.
        dtype: parameter and activation dtype (e.g. ``jnp.bfloat16``).

    Returns:
        ``(config, model)``.

    Raises:
        CheckpointNotFoundError: the folder, its config or weights are missing.
        CheckpointConfigError: invalid JSON, a wrongly typed key, another ``_class_name`` or an
            unsupported setting (naming the file and the key).
        TensorMismatchError: tensors missing, unexpected or of the wrong shape (all named).
    """
    loader = "load_flux"
    config = checkpoint.read_config(path, loader, FluxConfig.from_dict, schema=FluxConfig)
    abstract = nnx.eval_shape(lambda: FluxTransformer(config, dtype=dtype, rngs=nnx.Rngs(0)))
    tensors = checkpoint.read_tensors(
        path, loader, checkpoint.DIFFUSERS_WEIGHTS_NAME, hint="only safetensors are supported"
    )
    return config, checkpoint.load_params(abstract, tensors, LAYOUT)


def save_flux(
    path: str | Path,
    config: FluxConfig,
    model: FluxTransformer,
    *,
    max_shard_size: int | None = None,
) -> None:
    """Write a diffusers folder that ``FluxTransformer2DModel.from_pretrained`` and
    :func:`load_flux` load (parameters in the model dtype; shards over ``max_shard_size`` bytes).
    """
    checkpoint.save_folder(
        path,
        config.to_dict(),
        checkpoint.export_params(model, LAYOUT),
        checkpoint.DIFFUSERS_WEIGHTS_NAME,
        max_shard_size=max_shard_size,
    )
