"""The KL autoencoder of latent diffusion (Rombach et al. 2022) in Flax NNX, diffusers layout.

Mirrors diffusers' ``AutoencoderKL`` (``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` blocks, a
resnet-attention-resnet middle block, GroupNorm + SiLU) with the same parameter names, so a
diffusers folder (``config.json`` + ``diffusion_pytorch_model.safetensors``) loads directly.

Layout: inputs and outputs are **NCHW** like diffusers and our DiT (the particle axis first);
the convolutions run NHWC internally.

Scaling: a latent diffusion model works on *scaled* latents ``(z - shift_factor) *
scaling_factor`` (``shift_factor`` is 0 when the config has none; DiT/SD use
``scaling_factor = 0.18215``). :meth:`AutoencoderKL.decode` takes raw latents ``z``;
:meth:`AutoencoderKL.decode_latents` takes the diffusion model's scaled latents and undoes the
scaling first; :meth:`AutoencoderKL.encode_latents` gives the scaled posterior mean. Images are in
``[-1, 1]``. ``latents_mean``/``latents_std`` configs (per-channel normalisation) are not supported.

SD3 / SD3.5 / FLUX use a 16-channel VAE without quant convs (``use_quant_conv`` and
``use_post_quant_conv`` false) and a ``shift_factor`` (SD3 0.0609 / 1.5305, FLUX 0.1159 / 0.3611);
their ``config.json`` files load as they are (``force_upcast``, ``mid_block_add_attention``,
``latents_mean: null`` are accepted; ``force_upcast`` changes nothing here: the compute dtype is the
one :func:`load_vae` is given).

Precision: the model computes in its parameters' dtype (inputs are cast to it; GroupNorm statistics
are reduced in float32 by Flax). Measured on the tiny random 2-block 16-channel test VAE
(tests/models/test_vae.py, outputs of about unit scale): bfloat16 parameters and compute decode
within 0.038 (max abs; mean abs 0.0067) of the float32 decode; the test allows 0.06. That is
bfloat16's 8-bit mantissa (2^-8 relative per operation) accumulated over ~15 layers; a real 4-block
VAE has ~3x more layers, so expect a few times more: decode in float32 where pixels are scored.
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

Array = jax.Array
_EPS = 1e-6


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """diffusers ``AutoencoderKL`` config (field names and defaults as in diffusers)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if self.down_block_types != ("DownEncoderBlock2D",) * n:
            raise ValueError(
                f"only DownEncoderBlock2D blocks are supported: {self.down_block_types}"
            )
        if self.up_block_types != ("UpDecoderBlock2D",) * n:
            raise ValueError(f"only UpDecoderBlock2D blocks are supported: {self.up_block_types}")
        if self.act_fn not in ("silu", "swish"):
            raise ValueError(f"only the SiLU activation is supported, got {self.act_fn!r}")
        if self.latents_mean is not None or self.latents_std is not None:
            raise ValueError("per-channel latents_mean/latents_std are not supported")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VAEConfig:
        """Parse a diffusers ``config.json`` dict; keys starting with ``_`` are ignored."""
        name = raw.get("_class_name", "AutoencoderKL")
        if name != "AutoencoderKL":
            raise ValueError(f"not an AutoencoderKL config: _class_name {name!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if k not in fields and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unsupported AutoencoderKL config keys: {unknown}")
        tuples = {k: tuple(v) for k, v in raw.items() if isinstance(v, list)}
        return cls(**{k: v for k, v in {**raw, **tuples}.items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": "AutoencoderKL", **dataclasses.asdict(self)}


# --------------------------------------------------------------------------- layers (NHWC)


def _conv(c_in: int, c_out: int, k: int, rngs: nnx.Rngs, **kw) -> nnx.Conv:
    return nnx.Conv(c_in, c_out, (k, k), padding=((k // 2, k // 2),) * 2, rngs=rngs, **kw)


def _group_norm(channels: int, groups: int, rngs: nnx.Rngs) -> nnx.GroupNorm:
    return nnx.GroupNorm(channels, groups, epsilon=_EPS, use_fast_variance=False, rngs=rngs)


class ResnetBlock(nnx.Module):
    """``x + conv(silu(gn(conv(silu(gn(x))))))`` with a 1x1 shortcut when channels change."""

    def __init__(self, c_in: int, c_out: int, groups: int, *, rngs: nnx.Rngs):
        self.norm1 = _group_norm(c_in, groups, rngs)
        self.conv1 = _conv(c_in, c_out, 3, rngs)
        self.norm2 = _group_norm(c_out, groups, rngs)
        self.conv2 = _conv(c_out, c_out, 3, rngs)
        self.conv_shortcut = _conv(c_in, c_out, 1, rngs) if c_in != c_out else None

    def __call__(self, x: Array) -> Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class SpatialAttention(nnx.Module):
    """Single-head self-attention over the ``H W`` positions with a GroupNorm and a residual."""

    def __init__(self, channels: int, groups: int, *, rngs: nnx.Rngs):
        self.group_norm = _group_norm(channels, groups, rngs)
        self.to_q = nnx.Linear(channels, channels, rngs=rngs)
        self.to_k = nnx.Linear(channels, channels, rngs=rngs)
        self.to_v = nnx.Linear(channels, channels, rngs=rngs)
        self.to_out = nnx.Linear(channels, channels, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        n, h, w, c = x.shape
        seq = self.group_norm(x.reshape(n, h * w, c))
        q, k, v = (proj(seq)[:, :, None, :] for proj in (self.to_q, self.to_k, self.to_v))
        out = self.to_out(jax.nn.dot_product_attention(q, k, v)[:, :, 0, :])
        return x + out.reshape(n, h, w, c)


class MidBlock(nnx.Module):
    """resnet -> (attention) -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, attention: bool, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, rngs=rngs) for _ in "ab"])
        attn = SpatialAttention(channels, groups, rngs=rngs) if attention else None
        self.attentions = nnx.List([attn] if attention else [])

    def __call__(self, x: Array) -> Array:
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nnx.Module):
    """Zero-pad right/bottom by one, then a stride-2 3x3 convolution."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(channels, channels, (3, 3), strides=(2, 2), padding="VALID", rngs=rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 convolution."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.conv = _conv(channels, channels, 3, rngs)

    def __call__(self, x: Array) -> Array:
        return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class EncoderBlock(nnx.Module):
    """``DownEncoderBlock2D``: resnets, then a downsampler except in the last block."""

    def __init__(self, c_in, c_out, layers, groups, downsample, *, rngs: nnx.Rngs):
        chans = [c_in] + [c_out] * layers
        self.resnets = nnx.List([ResnetBlock(a, c_out, groups, rngs=rngs) for a in chans[:layers]])
        self.downsampler = Downsample(c_out, rngs=rngs) if downsample else None

    def __call__(self, x: Array) -> Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsampler is None else self.downsampler(x)


class DecoderBlock(nnx.Module):
    """``UpDecoderBlock2D``: resnets, then an upsampler except in the last block."""

    def __init__(self, c_in, c_out, layers, groups, upsample, *, rngs: nnx.Rngs):
        chans = [c_in] + [c_out] * layers
        self.resnets = nnx.List([ResnetBlock(a, c_out, groups, rngs=rngs) for a in chans[:layers]])
        self.upsampler = Upsample(c_out, rngs=rngs) if upsample else None

    def __call__(self, x: Array) -> Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsampler is None else self.upsampler(x)


class Encoder(nnx.Module):
    """Images ``[N, H, W, C]`` -> posterior moments ``[N, H / 2^(B-1), W / 2^(B-1), 2 L]``."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        chans, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = _conv(config.in_channels, chans[0], 3, rngs)
        self.down_blocks = nnx.List(
            [
                EncoderBlock(
                    chans[max(i - 1, 0)],
                    c,
                    config.layers_per_block,
                    groups,
                    i < len(chans) - 1,
                    rngs=rngs,
                )
                for i, c in enumerate(chans)
            ]
        )
        self.mid_block = MidBlock(chans[-1], groups, config.mid_block_add_attention, rngs=rngs)
        self.conv_norm_out = _group_norm(chans[-1], groups, rngs)
        self.conv_out = _conv(chans[-1], 2 * config.latent_channels, 3, rngs)

    def __call__(self, x: Array) -> Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents ``[N, h, w, L]`` -> images ``[N, h 2^(B-1), w 2^(B-1), C]``."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        chans, groups = config.block_out_channels[::-1], config.norm_num_groups
        self.conv_in = _conv(config.latent_channels, chans[0], 3, rngs)
        self.mid_block = MidBlock(chans[0], groups, config.mid_block_add_attention, rngs=rngs)
        self.up_blocks = nnx.List(
            [
                DecoderBlock(
                    chans[max(i - 1, 0)],
                    c,
                    config.layers_per_block + 1,
                    groups,
                    i < len(chans) - 1,
                    rngs=rngs,
                )
                for i, c in enumerate(chans)
            ]
        )
        self.conv_norm_out = _group_norm(chans[-1], groups, rngs)
        self.conv_out = _conv(chans[-1], config.out_channels, 3, rngs)

    def __call__(self, z: Array) -> Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def _nhwc(x: Array) -> Array:
    return jnp.transpose(x, (0, 2, 3, 1))


def _nchw(x: Array) -> Array:
    return jnp.transpose(x, (0, 3, 1, 2))


class AutoencoderKL(nnx.Module):
    """KL-regularised autoencoder with diffusers ``AutoencoderKL`` parameter names (NCHW API)."""

    def __init__(self, config: VAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        lat = config.latent_channels
        self.encoder = Encoder(config, rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)
        self.quant_conv = _conv(2 * lat, 2 * lat, 1, rngs) if config.use_quant_conv else None
        self.post_quant_conv = _conv(lat, lat, 1, rngs) if config.use_post_quant_conv else None

    @property
    def dtype(self) -> jnp.dtype:
        """The parameters' dtype, in which the model computes (inputs are cast to it)."""
        return self.decoder.conv_in.kernel.get_value().dtype

    def encode(self, images: Array) -> tuple[Array, Array]:
        """Posterior ``(mean, logvar)``, each ``[N, L, h, w]``, of images ``[N, C, H, W]``.

        ``logvar`` is clipped to ``[-30, 20]`` as in diffusers' ``DiagonalGaussianDistribution``.
        Outputs are in :attr:`dtype`.
        """
        moments = self.encoder(_nhwc(images.astype(self.dtype)))
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(_nchw(moments), 2, axis=1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: Array) -> Array:
        """Raw (unscaled) latents ``[N, L, h, w]`` -> images ``[N, C, H, W]`` (about [-1, 1]),
        computed and returned in :attr:`dtype`."""
        h = _nhwc(z.astype(self.dtype))
        if self.post_quant_conv is not None:
            h = self.post_quant_conv(h)
        return _nchw(self.decoder(h))

    @property
    def _shift(self) -> float:
        return self.config.shift_factor or 0.0

    def encode_latents(self, images: Array) -> Array:
        """Scaled diffusion latents ``(mean - shift_factor) * scaling_factor`` of images."""
        mean, _ = self.encode(images)
        return (mean - self._shift) * self.config.scaling_factor

    def decode_latents(self, latents: Array) -> Array:
        """Images from the diffusion model's scaled latents: ``decode(latents / scale + shift)``
        (the unscaling runs in the latents' dtype, as diffusers' pipelines do)."""
        return self.decode(latents / self.config.scaling_factor + self._shift)


# ------------------------------------------------------------------- functional use, checkpoints


def vae_decode(params: tuple[nnx.GraphDef, nnx.State], latents: Array) -> Array:
    """Pure ``decode_latents`` for ``jax.jit``; ``params = nnx.split(vae)``."""
    graphdef, state = params
    return nnx.merge(graphdef, state).decode_latents(latents)


def _torch_key(dotted: str) -> str:
    return (
        dotted.replace(".downsampler.", ".downsamplers.0.")
        .replace(".upsampler.", ".upsamplers.0.")
        .replace(".to_out.", ".to_out.0.")
    )


# diffusers names and PyTorch kernel layouts (docs/design.md, "Models we ship").
LAYOUT = dataclasses.replace(checkpoint.TORCH, rename=_torch_key)
# Keys a usable AutoencoderKL config.json must set: the defaults would silently build another
# network (the other keys default as in diffusers).
VAE_REQUIRED_KEYS = ("block_out_channels", "latent_channels")


def load_vae(path: str | Path, dtype: Any = jnp.float32) -> tuple[VAEConfig, AutoencoderKL]:
    """Load a diffusers ``AutoencoderKL`` folder (safetensors only).

    Args:
        path: folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or its
            shards listed by ``diffusion_pytorch_model.safetensors.index.json``); the tensors may
            be stored in any float dtype (float32, float16, bfloat16).
        dtype: parameter and compute dtype, ``jnp.float32`` or ``jnp.bfloat16`` (any float
            dtype is accepted); see the module docstring for the measured bfloat16 error.

    Returns:
        ``(config, model)`` with ``dtype`` parameters.

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or its
            ``diffusion_pytorch_model.safetensors`` is missing (all named).
        ValueError: invalid JSON, a missing (:data:`VAE_REQUIRED_KEYS`) or wrongly typed config
            key, an unsupported config (naming the file and the key), or weights that do not
            match the config (naming the tensor).
    """
    loader = "load_vae"
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{loader}: dtype must be a float dtype, got {np.dtype(dtype).name}")
    config = checkpoint.read_config(
        path, loader, VAEConfig.from_dict, schema=VAEConfig, required=VAE_REQUIRED_KEYS
    )
    abstract = nnx.eval_shape(lambda: AutoencoderKL(config, rngs=nnx.Rngs(0)))
    tensors = checkpoint.read_tensors(
        path, loader, checkpoint.DIFFUSERS_WEIGHTS_NAME, hint="only safetensors are supported"
    )
    return config, checkpoint.load_params(abstract, tensors, LAYOUT, dtype=dtype)


def save_vae(path: str | Path, config: VAEConfig, model: AutoencoderKL) -> None:
    """Write a diffusers folder that ``AutoencoderKL.from_pretrained`` loads."""
    tensors = checkpoint.export_params(model, LAYOUT, np.float32)
    checkpoint.save_folder(path, config.to_dict(), tensors, checkpoint.DIFFUSERS_WEIGHTS_NAME)
