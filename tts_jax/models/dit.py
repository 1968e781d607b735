"""DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers") in Flax NNX.

The network is diffusers' ``DiTTransformer2DModel`` (class-conditional, adaLN-Zero blocks) with the
same parameter names, so checkpoints load from and save to the diffusers folder layout
(``config.json`` + ``diffusion_pytorch_model.safetensors``).

Layout: images are **NCHW** like diffusers, ``x [N, C, H, W]`` with the particle axis first; the
output is ``[N, out_channels, H, W]`` (``out_channels = 2 C`` for learned-sigma checkpoints, where
the first ``C`` channels are the prediction). ``timestep [N]`` is the diffusers timestep (float,
e.g. 0..999) and ``class_labels [N]`` are ints in ``[0, num_classes]``, the index ``num_classes``
(``= num_embeds_ada_norm``) being the null / unconditional label used for classifier-free guidance.

Forward pass (per sample):
    tokens = conv_patch(x) + sincos2d            [T, D], T = (H / p)^2, positions rescaled to
                                                 the sample_size / p training grid
    c_l    = MLP_l(timestep_freqs(t)) + E_l[y]   one conditioning embedding per block l
    block: h = LN(x) (1 + scale) + shift; x += gate * Attn(h); same for the MLP
    out    = Linear(LN(x) (1 + scale) + shift) with (shift, scale) from c_0; unpatchify.
Dropout (and the label dropout of training) is not applied: this is the inference network.

Precision: parameters and activations in the ``dtype`` chosen at construction or load (e.g.
``bfloat16``); the sinusoidal timestep features and positional table are computed in float32,
layer-norm statistics and the attention softmax in float32 (``jax.nn.dot_product_attention``
accumulates bfloat16 scores in float32); the output is returned in the input's dtype
(docs/precision.md).

Pure use inside ``jax.jit``: ``params = nnx.split(model)`` and ``dit_apply(params, x, t, y)``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.models import dit_checkpoint as ckpt

Array = jax.Array
DType = Any
CLASS_NAMES = ("DiTTransformer2DModel", "Transformer2DModel")
_TIME_FREQ_DIM = 256
_ACTIVATIONS = {"gelu": False, "gelu-approximate": True}  # name -> tanh approximation
_ZERO = nnx.initializers.zeros_init()  # adaLN-Zero: modulation and output layers start at zero


@dataclasses.dataclass(frozen=True, kw_only=True)
class DiTConfig:
    """``DiTTransformer2DModel`` config: diffusers field names, defaults of DiT-XL/2 (256 px)."""

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = None
    num_layers: int = 28
    dropout: float = 0.0
    norm_num_groups: int = 32
    attention_bias: bool = True
    sample_size: int = 32
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int = 1000
    upcast_attention: bool = False
    norm_type: str = "ada_norm_zero"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.norm_type != "ada_norm_zero":
            raise ValueError(f"DiT needs norm_type 'ada_norm_zero', got {self.norm_type!r}")
        if self.activation_fn not in _ACTIVATIONS:
            raise ValueError(f"activation_fn must be one of {sorted(_ACTIVATIONS)}")
        if self.sample_size % self.patch_size:
            raise ValueError("sample_size must be a multiple of patch_size")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        return self.in_channels if self.out_channels is None else self.out_channels

    @property
    def learned_sigma(self) -> bool:
        return self.output_channels == 2 * self.in_channels

    @property
    def null_class(self) -> int:
        """The label index of the unconditional (dropped-label) embedding."""
        return self.num_embeds_ada_norm

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DiTConfig:
        """Parse a diffusers ``config.json`` dict (``DiTTransformer2DModel`` or the older
        ``Transformer2DModel`` layout of the published DiT checkpoints); unrelated keys are ignored,
        keys that would change the architecture are checked.

        A legacy config's ``interpolation_scale`` is ignored, as diffusers' ``from_pretrained``
        does: it builds a ``DiTTransformer2DModel`` (no such field) for an ``ada_norm_zero``
        ``Transformer2DModel``, whose positional embedding then always has scale 1."""
        name = raw.get("_class_name", CLASS_NAMES[0])
        if name not in CLASS_NAMES:
            raise ValueError(f"not a DiT config: _class_name {name!r}")
        if raw.get("cross_attention_dim") is not None or raw.get("patch_size") is None:
            raise ValueError("not a DiT config: needs patch_size and no cross_attention_dim")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        """The diffusers ``config.json`` content of ``DiTTransformer2DModel``."""
        return {"_class_name": CLASS_NAMES[0], **dataclasses.asdict(self)}


# --------------------------------------------------------------------------- embeddings


def timestep_frequencies(timestep: Array, dim: int = _TIME_FREQ_DIM) -> Array:
    """Sinusoidal timestep features ``[cos(t w_k), sin(t w_k)]``, ``w_k = 10^(-4 k / (dim/2 - 1))``.

    Args:
        timestep: ``[N]`` float timesteps (may be fractional).
    Returns:
        ``[N, dim]`` float32, as diffusers ``Timesteps(256, flip_sin_to_cos=True,
        downscale_freq_shift=1)``.
    """
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1)).astype(np.float32)
    args = timestep.astype(jnp.float32)[:, None] * jnp.asarray(freqs)[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


@functools.lru_cache(maxsize=16)
def sincos_2d(embed_dim: int, grid_h: int, grid_w: int, base_size: int) -> np.ndarray:
    """Fixed 2-D sine-cosine positional embedding ``[grid_h * grid_w, embed_dim]`` (row-major).

    As diffusers' ``get_2d_sincos_pos_embed(embed_dim, (grid_h, grid_w), base_size=base_size,
    interpolation_scale=1)`` (the embedding of its ``PatchEmbed``, Peebles & Xie 2023 after
    MAE): the positions of each axis are rescaled to span ``[0, base_size)``, ``pos_i = i /
    (grid / base_size)`` in float32, so a grid of ``base_size`` (the training resolution) uses
    the integer positions and a larger or smaller grid interpolates between them. The first half
    of the channels encodes the column, the second half the row, each as ``[sin(pos w_k),
    cos(pos w_k)]`` with ``w_k = 10^(-4 k / (D/4))`` (computed in float64).

    Args:
        embed_dim: ``D``, a multiple of 4.
        grid_h, grid_w: patch rows and columns.
        base_size: patches per side at the training resolution (``sample_size // patch_size``).

    Returns:
        ``float32[grid_h * grid_w, D]``.
    """
    if embed_dim % 4:
        raise ValueError("the DiT hidden size must be a multiple of 4")

    def positions(grid: int) -> np.ndarray:
        return np.arange(grid, dtype=np.float32) / np.float32(grid / base_size)

    def one_axis(pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(embed_dim // 4, dtype=np.float64) / (embed_dim / 4))
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(positions(grid_h), positions(grid_w), indexing="ij")
    return np.concatenate([one_axis(cols), one_axis(rows)], axis=1).astype(np.float32)


def _layer_norm(x: Array, eps: float) -> Array:
    """LayerNorm over the last axis without affine parameters, computed in float32 and returned
    in ``x.dtype``."""
    xf = x.astype(jnp.float32)
    mean = xf.mean(-1, keepdims=True)
    var = jnp.square(xf - mean).mean(-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _linear(d_in: int, d_out: int, dtype: DType, rngs: nnx.Rngs, **kwargs) -> nnx.Linear:
    """``nnx.Linear`` with parameters and computation in ``dtype``."""
    return nnx.Linear(d_in, d_out, dtype=dtype, param_dtype=dtype, rngs=rngs, **kwargs)


def _modulate(x: Array, shift: Array, scale: Array) -> Array:
    """adaLN modulation ``x (1 + scale) + shift``; ``x [N, T, D]``, ``shift, scale [N, D]``."""
    return x * (1.0 + scale[:, None, :]) + shift[:, None, :]


class TimestepEmbedder(nnx.Module):
    """Two-layer SiLU MLP on the sinusoidal timestep features (``linear_1``, ``linear_2``)."""

    def __init__(self, dim: int, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.linear_1 = _linear(_TIME_FREQ_DIM, dim, dtype, rngs)
        self.linear_2 = _linear(dim, dim, dtype, rngs)

    def __call__(self, timestep: Array) -> Array:
        features = timestep_frequencies(timestep).astype(self.linear_1.param_dtype)
        return self.linear_2(jax.nn.silu(self.linear_1(features)))


class LabelEmbedder(nnx.Module):
    """Class-label table with one extra (null) row for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.embedding_table = nnx.Embed(
            num_classes + 1,
            dim,
            dtype=dtype,
            param_dtype=dtype,
            embedding_init=nnx.initializers.normal(0.02),
            rngs=rngs,
        )

    def __call__(self, labels: Array) -> Array:
        return self.embedding_table(labels)


class ConditionEmbedder(nnx.Module):
    """``c = MLP(timestep) + E[label]`` (diffusers ``CombinedTimestepLabelEmbeddings``)."""

    def __init__(self, num_classes: int, dim: int, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.timestep_embedder = TimestepEmbedder(dim, dtype=dtype, rngs=rngs)
        self.class_embedder = LabelEmbedder(num_classes, dim, dtype=dtype, rngs=rngs)

    def __call__(self, timestep: Array, labels: Array) -> Array:
        return self.timestep_embedder(timestep) + self.class_embedder(labels)


class AdaLayerNormZero(nnx.Module):
    """Per-block conditioning -> six modulation vectors (shift/scale/gate for attention, MLP)."""

    def __init__(self, num_classes: int, dim: int, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.emb = ConditionEmbedder(num_classes, dim, dtype=dtype, rngs=rngs)
        self.linear = _linear(dim, 6 * dim, dtype, rngs, kernel_init=_ZERO)

    def __call__(self, timestep: Array, labels: Array) -> list[Array]:
        """Returns six ``[N, D]`` arrays: shift/scale/gate (attention), shift/scale/gate (MLP)."""
        return jnp.split(self.linear(jax.nn.silu(self.emb(timestep, labels))), 6, axis=-1)


class Attention(nnx.Module):
    """Multi-head self-attention with separate q/k/v projections and an output projection."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        bias: bool,
        *,
        dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = _linear(dim, inner, dtype, rngs, use_bias=bias)
        self.to_k = _linear(dim, inner, dtype, rngs, use_bias=bias)
        self.to_v = _linear(dim, inner, dtype, rngs, use_bias=bias)
        self.to_out = _linear(inner, dim, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        """``x [N, T, D] -> [N, T, D]``."""
        n, t, _ = x.shape
        split = (n, t, self.heads, self.head_dim)
        q, k, v = (proj(x).reshape(split) for proj in (self.to_q, self.to_k, self.to_v))
        out = jax.nn.dot_product_attention(q, k, v)
        return self.to_out(out.reshape(n, t, self.heads * self.head_dim))


class FeedForward(nnx.Module):
    """``Linear(D, 4D) -> GELU -> Linear(4D, D)``."""

    def __init__(self, dim: int, approximate: bool, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.approximate = approximate
        self.proj_in = _linear(dim, 4 * dim, dtype, rngs)
        self.proj_out = _linear(4 * dim, dim, dtype, rngs)

    def __call__(self, x: Array) -> Array:
        return self.proj_out(jax.nn.gelu(self.proj_in(x), approximate=self.approximate))


class DiTBlock(nnx.Module):
    """Transformer block with adaLN-Zero conditioning (diffusers ``BasicTransformerBlock``)."""

    def __init__(self, config: DiTConfig, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        dim = config.inner_dim
        self.norm1 = AdaLayerNormZero(config.num_embeds_ada_norm, dim, dtype=dtype, rngs=rngs)
        self.attn1 = Attention(
            dim,
            config.num_attention_heads,
            config.attention_head_dim,
            config.attention_bias,
            dtype=dtype,
            rngs=rngs,
        )
        affine = config.norm_elementwise_affine
        self.norm3 = nnx.LayerNorm(
            dim,
            epsilon=config.norm_eps,
            use_bias=affine,
            use_scale=affine,
            use_fast_variance=False,
            dtype=dtype,
            param_dtype=dtype,
            rngs=rngs,
        )
        self.ff = FeedForward(dim, _ACTIVATIONS[config.activation_fn], dtype=dtype, rngs=rngs)

    def __call__(self, x: Array, timestep: Array, labels: Array) -> Array:
        """``x [N, T, D]``, ``timestep [N]``, ``labels [N]`` -> ``[N, T, D]``."""
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.norm1(timestep, labels)
        x = x + gate_a[:, None, :] * self.attn1(_modulate(_layer_norm(x, 1e-6), shift_a, scale_a))
        h = _modulate(self.norm3(x), shift_m, scale_m)
        return x + gate_m[:, None, :] * self.ff(h)


class PatchEmbed(nnx.Module):
    """Non-overlapping ``p x p`` patch projection (a strided convolution) plus sincos positions
    rescaled to the training grid of ``base_size`` patches per side (diffusers ``PatchEmbed``)."""

    def __init__(
        self,
        in_channels: int,
        dim: int,
        patch: int,
        base_size: int,
        *,
        dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.base_size = base_size
        self.proj = nnx.Conv(
            in_channels,
            dim,
            (patch, patch),
            strides=(patch, patch),
            padding="VALID",
            dtype=dtype,
            param_dtype=dtype,
            rngs=rngs,
        )

    def __call__(self, x: Array) -> Array:
        """``x [N, C, H, W] -> tokens [N, (H//p)(W//p), D]`` in row-major patch order (in the
        layer dtype; the float32 positional table is added in float32)."""
        h = self.proj(jnp.transpose(x, (0, 2, 3, 1)).astype(self.proj.param_dtype))
        n, gh, gw, d = h.shape
        pos = jnp.asarray(sincos_2d(d, gh, gw, self.base_size))[None]
        return (h.reshape(n, gh * gw, d).astype(jnp.float32) + pos).astype(h.dtype)


class DiT(nnx.Module):
    """Class-conditional DiT (Peebles & Xie 2023) with diffusers ``DiTTransformer2DModel`` names.

    Args:
        config: the architecture.
        dtype: parameter and activation dtype (e.g. ``jnp.bfloat16``; timestep features,
            positional table, layer-norm statistics and softmax stay float32).
    """

    def __init__(self, config: DiTConfig, *, dtype: DType = jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        dim = config.inner_dim
        self.pos_embed = PatchEmbed(
            config.in_channels,
            dim,
            config.patch_size,
            config.sample_size // config.patch_size,
            dtype=dtype,
            rngs=rngs,
        )
        self.transformer_blocks = nnx.List(
            [DiTBlock(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)]
        )
        self.proj_out_1 = _linear(dim, 2 * dim, dtype, rngs, kernel_init=_ZERO)
        patch_out = config.patch_size**2 * config.output_channels
        self.proj_out_2 = _linear(dim, patch_out, dtype, rngs, kernel_init=_ZERO)

    def __call__(self, x: Array, timestep: Array, class_labels: Array) -> Array:
        """Predict from noisy images.

        Any square patch grid is accepted, as by diffusers: a size other than ``sample_size``
        rescales the positional embedding to the training grid (:func:`sincos_2d`), and pixels
        beyond the last whole patch are dropped by the strided patch convolution.

        Args:
            x: ``[N, C, H, W]`` with ``H // p == W // p >= 1`` (``p`` the patch size).
            timestep: ``[N]`` (or scalar) diffusers timestep, float.
            class_labels: ``[N]`` (or scalar) int labels; ``config.null_class`` = unconditional.

        Returns:
            ``[N, out_channels, (H // p) p, (W // p) p]`` in ``x.dtype`` (computed in the model
            dtype).

        Raises:
            ValueError: naming the size, for an input smaller than one patch or a non-square
                patch grid (diffusers' ``DiTTransformer2DModel`` unpatchifies a square grid only:
                it fails or returns a wrongly shaped output on those).
        """
        n, _, height, width = x.shape
        p = self.config.patch_size
        if min(height, width) < p or height // p != width // p:
            raise ValueError(
                f"DiT input of {height}x{width} pixels: needs a square grid of at least one "
                f"{p}x{p} patch (H // {p} == W // {p} >= 1), as diffusers' DiTTransformer2DModel"
            )
        timestep = jnp.broadcast_to(jnp.asarray(timestep, jnp.float32), (n,))
        labels = jnp.broadcast_to(jnp.asarray(class_labels, jnp.int32), (n,))
        h = self.pos_embed(x)
        for block in self.transformer_blocks:
            h = block(h, timestep, labels)
        cond = self.transformer_blocks[0].norm1.emb(timestep, labels)
        shift, scale = jnp.split(self.proj_out_1(jax.nn.silu(cond)), 2, axis=-1)
        h = self.proj_out_2(_modulate(_layer_norm(h, 1e-6), shift, scale))
        out = _unpatchify(h, height // p, width // p, p, self.config.output_channels)
        return out.astype(x.dtype)


def _unpatchify(h: Array, grid_h: int, grid_w: int, p: int, channels: int) -> Array:
    """``[N, gh * gw, p * p * C] -> [N, C, gh * p, gw * p]``."""
    n = h.shape[0]
    h = h.reshape(n, grid_h, grid_w, p, p, channels)
    return jnp.einsum("nhwpqc->nchpwq", h).reshape(n, channels, grid_h * p, grid_w * p)


# --------------------------------------------------------------------------- functional use


def dit_apply(params: tuple[nnx.GraphDef, nnx.State], x: Array, timestep: Array, labels: Array):
    """Pure forward pass for ``jax.jit``; ``params = nnx.split(model)`` (weights as an argument)."""
    graphdef, state = params
    return nnx.merge(graphdef, state)(x, timestep, labels)


# --------------------------------------------------------------------------- checkpoints


def _torch_key(dotted: str) -> str:
    """Diffusers names for the parts our modules name differently."""
    return (
        dotted.replace(".ff.proj_in.", ".ff.net.0.proj.")
        .replace(".ff.proj_out.", ".ff.net.2.")
        .replace(".attn1.to_out.", ".attn1.to_out.0.")
    )


def init_dit(config: DiTConfig, key: Array | int = 0, *, dtype: DType = jnp.float32) -> DiT:
    """A freshly initialised DiT for training: adaLN-Zero init as in Peebles & Xie 2023 (zero
    modulation and output layers, so every block starts as the identity and the output is 0),
    label table ~ N(0, 0.02^2), other kernels LeCun-normal. Initialisation runs jitted."""
    key = jax.random.key(key) if isinstance(key, int) else key
    return _jit_init(config, jnp.dtype(dtype), key)


@functools.partial(nnx.jit, static_argnums=(0, 1))
def _jit_init(config: DiTConfig, dtype: DType, key: Array) -> DiT:
    return DiT(config, dtype=dtype, rngs=nnx.Rngs(key))


def load_dit(path: str | Path, *, dtype: DType = jnp.float32) -> tuple[DiTConfig, DiT]:
    """Load a diffusers DiT folder (``config.json`` + ``diffusion_pytorch_model.safetensors``).

    Args:
        path: the folder.
        dtype: parameter and activation dtype (e.g. ``jnp.bfloat16``); the weights are cast to
            it whatever the file stores.

    Raises:
        ValueError: naming the tensor when the weights do not match the config.
    """
    config = DiTConfig.from_dict(ckpt.read_config(path, DiTConfig, required=("patch_size",)))
    abstract = nnx.eval_shape(lambda: DiT(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return config, ckpt.load_state(abstract, ckpt.load_tensors(path), _torch_key, dtype=dtype)


def save_dit(path: str | Path, config: DiTConfig, model: DiT) -> None:
    """Write a diffusers folder that ``DiTTransformer2DModel.from_pretrained`` loads."""
    ckpt.save_folder(path, config.to_dict(), ckpt.export_state(model, _torch_key))
