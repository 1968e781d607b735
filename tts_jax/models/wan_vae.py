"""Wan 2.1's causal 3D video VAE (``AutoencoderKLWan``), Flax NNX, diffusers layout.

Reference: Wan Team, "Wan: Open and Advanced Large-Scale Video Generative Models" (2025), the
Wan-VAE section; the layer-by-layer behaviour and names follow diffusers' ``AutoencoderKLWan``.

Interface (what the text-to-video pipeline calls)::

    vae = load_wan_vae(folder, dtype=jnp.float32)      # -> WanVAE (an nnx.Module)
    video = vae.decode(z)            # z [N, z_dim, F, h, w] raw latents
                                     #  -> [N, 3, 1 + s_t (F - 1), s_s h, s_s w] in [-1, 1]
    video = vae.decode_latents(x)    # x: the transformer's normalised latents (see below)
    mean = vae.encode(video)         # video [N, 3, T, H, W], T = 4k + 1 -> [N, z_dim, F, h, w]
    latents = vae.encode_latents(video)   # normalised posterior mean

``s_t`` = :attr:`WanVAEConfig.temporal_factor` (4 for Wan 2.1: one temporal halving in each of
its last two down levels) and ``s_s`` = :attr:`WanVAEConfig.spatial_factor` (8). Frame counts:
latent frame 0 decodes to 1 frame and every later latent frame to ``s_t`` frames, so ``F``
latent frames give ``1 + s_t (F - 1)`` frames (Wan 2.1: 1 + 4 (F - 1); 21 latent frames -> 81
frames); the encoder takes ``T = 4k + 1`` frames (the first frame, then chunks of 4) and gives
``F = 1 + k (4 / s_t)`` latent frames. :meth:`WanVAEConfig.latent_frames` and
:meth:`WanVAEConfig.video_frames` do this arithmetic and name the valid counts for a bad one.

Latent normalisation: Wan's transformer works on ``(z - latents_mean) / latents_std``
(per-channel vectors of the config, as ``WanPipeline`` applies them); :meth:`WanVAE.decode` and
:meth:`WanVAE.encode` take and give raw ``z`` like diffusers' ``AutoencoderKLWan.decode`` /
``.encode(...).latent_dist.mean``; :meth:`WanVAE.decode_latents` and
:meth:`WanVAE.encode_latents` work on the normalised latents.

Architecture (same parameter names as diffusers, so a folder's safetensors load name for name):
every convolution that sees time is *causal*: a 3x3x3 kernel whose time window is the current
frame and the two before it (the past is zero-padded, the future never seen); residual blocks
``x + conv(silu(rms(conv(silu(rms(x))))))`` with RMS norms over channels (``F.normalize`` times
``sqrt(C)`` times a learned gain); a resnet-attention-resnet middle block whose attention is
single-head over the ``H W`` positions of each frame; spatial down/upsampling by stride-2
convolutions / nearest 2x upsampling with a 3x3 conv, and in the levels that also resample time,
a causal time convolution: ``(3, 1, 1)`` stride 2 downsampling, and for upsampling a ``(3, 1, 1)``
convolution to twice the channels whose two halves become two consecutive frames.

Chunked, cached temporal processing (how diffusers runs it, reproduced exactly): the decoder
sees one latent frame at a time, the encoder the first frame and then chunks of 4 frames. Each
causal convolution keeps the last two frames of its input (its ``feat_cache``) from one chunk to
the next, so running chunk by chunk gives what convolving the whole sequence at once would, at a
fraction of the memory.
Here the caches are an explicit pytree (nested tuples of arrays mirroring the modules, see
:class:`CausalConv3d`); the first chunk runs with ``cache=None`` (zeros: the causal padding) and
the rest in one ``jax.lax.scan`` whose carry is the cache, so the program holds two copies of the
network (first chunk, scan body) whatever the number of frames and the activations alive at once
are those of one chunk.
The first chunk is separate because its shapes differ: the temporal upsamplers pass the first
latent frame through without doubling it (diffusers' ``"Rep"`` case), and the temporal
downsamplers only store it. Measured (XLA's memory analysis of the compiled CPU decode, tiny
test-sized VAE, 8 x 8 latents): scratch memory 2.7, 5.0 and 7.8 MB for 2, 6 and 21 latent frames
(5, 21, 81 frames; outputs 0.23, 0.98, 3.8 MB), i.e. it grows only by buffers the size of the
output video (the scan's stacked chunks before the final transpose), about 1.5x the output's
growth, not with the network's activations.

Layout: inputs and outputs are ``[N, C, T, H, W]`` like diffusers; the convolutions run
channels-last ``[N, T, H, W, C]`` inside.

Supported: the Wan 2.1 VAE (``is_residual`` false, no ``patch_size``, no ``attn_scales``: diffusers'
encoder cannot run attention inside its down blocks with the feature cache), at most two
temporal halvings (the 4-frame encoder chunks must divide). Wan 2.2's residual VAE is refused
with a named error.

Precision: the model computes in its parameters' dtype (inputs are cast to it); the
convolutions accumulate in float32 and round their outputs to that dtype, the RMS norms
normalise in float32. Measured on the tiny random test VAE (tests/models/test_wan_vae.py), max /
mean abs error against diffusers' float32 decode: bfloat16 0.075 / 0.0080 on 2 latent frames
(5 frames of 16 x 16; diffusers' own bfloat16 decode of the same latents: 0.068 / 0.0084) and
0.042 / 0.0063 on 1; float32 within 1e-5. A real VAE is deeper: decode in float32 where pixels
are scored.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.models import checkpoint

Array = jax.Array
Cache = Any
"""A module's feature cache: an array, a tuple of caches, or ``()`` for a module without one."""

CACHE_FRAMES = 2
"""Frames a causal 3x3x3 convolution keeps of its input between chunks (its kernel's past)."""
ENCODER_CHUNK = 4
"""Frames per encoder chunk after the first frame (as diffusers' ``AutoencoderKLWan._encode``)."""
_NORM_EPS = 1e-12  # F.normalize's eps
_LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamp

# AutoencoderKLWan's defaults (the Wan 2.1 statistics of its 16 latent channels).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class WanVAEConfig:
    """diffusers ``AutoencoderKLWan`` config (field names, spellings and defaults as diffusers').

    ``temperal_downsample[i]`` says whether down level ``i`` also halves time (the decoder
    mirrors it); ``dim_mult`` gives the channels ``base_dim * m`` per level.
    """

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    is_residual: bool = False
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None
    scale_factor_temporal: int | None = 4
    scale_factor_spatial: int | None = 8

    def __post_init__(self):
        levels = len(self.dim_mult)
        if self.is_residual:
            raise ValueError(
                "is_residual=true (the Wan 2.2 VAE with residual up/down blocks) is not supported"
            )
        if self.patch_size is not None:
            raise ValueError(f"patch_size={self.patch_size} (Wan 2.2) is not supported")
        if self.attn_scales:
            raise ValueError(
                f"attn_scales={list(self.attn_scales)} is not supported (diffusers' cached "
                "encoder cannot run attention inside the down blocks); Wan 2.1 uses []"
            )
        if levels < 1 or len(self.temperal_downsample) != levels - 1:
            raise ValueError(
                f"temperal_downsample needs one entry per down level (len(dim_mult) - 1 = "
                f"{levels - 1}), got {list(self.temperal_downsample)}"
            )
        if ENCODER_CHUNK % self.temporal_factor:
            raise ValueError(
                f"at most two temporal halvings are supported (the encoder's {ENCODER_CHUNK}-frame "
                f"chunks must divide), got temperal_downsample={list(self.temperal_downsample)}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"latents_mean and latents_std need z_dim = {self.z_dim} entries, got "
                f"{len(self.latents_mean)} and {len(self.latents_std)}"
            )
        for key, declared, actual in (
            ("scale_factor_temporal", self.scale_factor_temporal, self.temporal_factor),
            ("scale_factor_spatial", self.scale_factor_spatial, self.spatial_factor),
        ):
            if declared is not None and declared != actual:
                raise ValueError(
                    f"{key}={declared} disagrees with the network's factor {actual} "
                    f"(dim_mult={list(self.dim_mult)}, "
                    f"temperal_downsample={list(self.temperal_downsample)})"
                )

    @property
    def temporal_factor(self) -> int:
        """``s_t``: video frames per latent frame after the first (2 per temporal halving)."""
        return 2 ** sum(bool(t) for t in self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        """``s_s``: pixels per latent pixel along height and width (2 per down level)."""
        return 2 ** (len(self.dim_mult) - 1)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames ``1 + (T - 1) / s_t`` of a ``T``-frame video.

        Raises:
            ValueError: ``T`` is not ``1 + s_t k`` (the message lists the nearest valid counts).
        """
        s = self.temporal_factor
        if not isinstance(num_frames, (int, np.integer)) or num_frames < 1 or (num_frames - 1) % s:
            raise ValueError(
                f"a Wan VAE with temporal factor {s} takes 1 + {s} k frames "
                f"({_valid_counts(s, num_frames)}), got {num_frames!r}"
            )
        return 1 + (int(num_frames) - 1) // s

    def video_frames(self, latent_frames: int) -> int:
        """Frames ``1 + s_t (F - 1)`` decoded from ``F >= 1`` latent frames."""
        if latent_frames < 1:
            raise ValueError(f"need at least one latent frame, got {latent_frames}")
        return 1 + self.temporal_factor * (int(latent_frames) - 1)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> WanVAEConfig:
        """Parse a diffusers ``config.json`` dict; keys starting with ``_`` are ignored."""
        name = raw.get("_class_name", "AutoencoderKLWan")
        if name != "AutoencoderKLWan":
            raise ValueError(f"not an AutoencoderKLWan config: _class_name {name!r}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if k not in fields and not k.startswith("_"))
        if unknown:
            raise ValueError(f"unsupported AutoencoderKLWan config keys: {unknown}")
        tuples = {k: tuple(v) for k, v in raw.items() if isinstance(v, list)}
        return cls(**{k: v for k, v in {**raw, **tuples}.items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        return {"_class_name": "AutoencoderKLWan", **dataclasses.asdict(self)}


def _valid_counts(step: int, near: Any) -> str:
    """``"valid: 1, 5, 9, ..."`` around ``near``."""
    try:
        k = max(0, (int(near) - 1) // step)
    except (TypeError, ValueError):
        k = 0
    lo = max(0, k - 1)
    counts = [1 + step * i for i in range(lo, lo + 4)]
    head = "" if lo == 0 else "1, ..., "
    return "valid: " + head + ", ".join(map(str, counts)) + ", ..."


# --------------------------------------------------------------------------- layers (channels-last)


def _channel_vector(v: Array, ndim: int) -> Array:
    """A per-channel vector shaped ``[1, ..., 1, C]`` to broadcast against channels-last data."""
    return v.reshape((1,) * (ndim - 1) + (-1,))


class Conv(nnx.Module):
    """A 2D or 3D convolution on channels-last input with a ``(*kernel, in, out)`` kernel.

    ``padding`` is one ``(low, high)`` pair per spatial axis (for a causal 3D convolution the time
    pair is ``(0, 0)``: the past comes from the cache, see :class:`CausalConv3d`).
    """

    def __init__(self, c_in, c_out, kernel, *, strides=None, padding=None, rngs: nnx.Rngs):
        kernel = tuple(kernel)
        self.strides = tuple(strides or (1,) * len(kernel))
        self.padding = tuple(padding or ((k // 2, k // 2) for k in kernel))
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(init(rngs.params(), (*kernel, c_in, c_out)))
        self.bias = nnx.Param(jnp.zeros((c_out,)))

    def __call__(self, x: Array) -> Array:
        kernel = self.kernel.get_value()
        spatial = "DHW"[-(kernel.ndim - 2) :]
        dims = (f"N{spatial}C", f"{spatial}IO", f"N{spatial}C")
        y = jax.lax.conv_general_dilated(
            x,
            kernel,
            self.strides,
            self.padding,
            dimension_numbers=dims,
            preferred_element_type=jnp.float32,
        )
        y = y + _channel_vector(self.bias.get_value().astype(jnp.float32), y.ndim)
        return y.astype(x.dtype)


class CausalConv3d(Conv):
    """diffusers' ``WanCausalConv3d``: time is padded on the past side only.

    ``conv(x, cache)`` with ``x [N, T, H, W, C]`` and ``cache [N, 2, H, W, C]`` (the last two
    input frames of the previous chunk; ``None`` for the first chunk = zeros, the causal padding)
    returns ``(y, new_cache)`` where ``y`` equals the corresponding frames of the convolution of
    the whole sequence. A kernel of temporal size 1 needs no cache (call it as ``conv.pointwise``).
    """

    def __init__(self, c_in, c_out, kernel, *, rngs: nnx.Rngs):
        _, kh, kw = kernel
        super().__init__(
            c_in, c_out, kernel, padding=((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)), rngs=rngs
        )

    def pointwise(self, x: Array) -> Array:
        """The convolution of a kernel with temporal size 1 (no time padding)."""
        return Conv.__call__(self, x)

    def __call__(self, x: Array, cache: Array | None) -> tuple[Array, Array]:
        if cache is None:
            cache = jnp.zeros((x.shape[0], CACHE_FRAMES, *x.shape[2:]), x.dtype)
        full = jnp.concatenate([cache, x], axis=1)
        return Conv.__call__(self, full), full[:, -CACHE_FRAMES:]


class RMSNorm(nnx.Module):
    """``F.normalize(x, dim=channels) * sqrt(C) * gamma`` (normalised in float32).

    ``gamma`` keeps diffusers' shape ``(C, 1, 1, 1)`` (video) or ``(C, 1, 1)`` (per-frame
    attention) so the tensor loads as it is.
    """

    def __init__(self, channels: int, trailing: int):
        self.gamma = nnx.Param(jnp.ones((channels,) + (1,) * trailing))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True))
        normalized = (x32 / jnp.maximum(norm, _NORM_EPS)).astype(x.dtype)
        gamma = _channel_vector(self.gamma.get_value().astype(x.dtype), x.ndim)
        return normalized * math.sqrt(x.shape[-1]) * gamma


class ResidualBlock(nnx.Module):
    """``WanResidualBlock``: ``shortcut(x) + conv2(silu(rms(conv1(silu(rms(x))))))``.

    Cache: ``(conv1 cache, conv2 cache)``.
    """

    def __init__(self, c_in: int, c_out: int, *, rngs: nnx.Rngs):
        self.norm1 = RMSNorm(c_in, 3)
        self.conv1 = CausalConv3d(c_in, c_out, (3, 3, 3), rngs=rngs)
        self.norm2 = RMSNorm(c_out, 3)
        self.conv2 = CausalConv3d(c_out, c_out, (3, 3, 3), rngs=rngs)
        self.conv_shortcut = (
            CausalConv3d(c_in, c_out, (1, 1, 1), rngs=rngs) if c_in != c_out else None
        )

    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        c1, c2 = (None, None) if cache is None else cache
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut.pointwise(x)
        h, c1 = self.conv1(jax.nn.silu(self.norm1(x)), c1)
        h, c2 = self.conv2(jax.nn.silu(self.norm2(h)), c2)
        return shortcut + h, (c1, c2)


class AttentionBlock(nnx.Module):
    """``WanAttentionBlock``: single-head self-attention over each frame's ``H W`` positions,
    with an RMS norm and a residual. Frames do not interact, so it has no cache (``()``)."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(channels, 2)
        self.to_qkv = Conv(channels, 3 * channels, (1, 1), rngs=rngs)
        self.proj = Conv(channels, channels, (1, 1), rngs=rngs)

    def __call__(self, x: Array, cache: Cache = None) -> tuple[Array, Cache]:
        n, t, h, w, c = x.shape
        frames = x.reshape(n * t, h, w, c)
        qkv = self.to_qkv(self.norm(frames)).reshape(n * t, h * w, 1, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        out = jax.nn.dot_product_attention(q, k, v).reshape(n * t, h, w, c)
        return x + self.proj(out).reshape(n, t, h, w, c), ()


class Resample(nnx.Module):
    """``WanResample``: spatial 2x down/upsampling, in the ``3d`` modes with a causal time conv.

    * ``downsample2d``: zero-pad right/bottom by one, stride-2 3x3 conv, per frame.
    * ``downsample3d``: the same, then a ``(3, 1, 1)`` stride-2 time conv over the previous
      chunk's last frame and this chunk (cache: that last frame ``[N, 1, h, w, C]``); the first
      chunk is only stored, not convolved (``T`` frames in, ``T`` out; later chunks ``T -> T/2``).
    * ``upsample2d``: nearest 2x, 3x3 conv to ``out`` channels, per frame.
    * ``upsample3d``: first a causal ``(3, 1, 1)`` conv to ``2 C`` channels whose halves become
      frames ``2i`` and ``2i + 1`` (cache: the conv's, two frames); the first chunk skips it, so
      the first latent frame stays one frame. Then as ``upsample2d``.
    """

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, channels: int, mode: str, out_channels: int, *, rngs: nnx.Rngs):
        if mode not in self.MODES:
            raise ValueError(f"unknown resample mode {mode!r}; expected one of {self.MODES}")
        self.mode = mode
        if mode.startswith("down"):
            self.resample = Conv(
                channels, channels, (3, 3), strides=(2, 2), padding=((0, 1), (0, 1)), rngs=rngs
            )
        else:
            self.resample = Conv(channels, out_channels, (3, 3), rngs=rngs)
        time_conv = None
        if mode == "downsample3d":
            time_conv = Conv(
                channels, channels, (3, 1, 1), strides=(2, 1, 1), padding=((0, 0),) * 3, rngs=rngs
            )
        elif mode == "upsample3d":
            time_conv = CausalConv3d(channels, 2 * channels, (3, 1, 1), rngs=rngs)
        self.time_conv = nnx.data(time_conv)

    def _per_frame(self, x: Array) -> Array:
        n, t, h, w, c = x.shape
        frames = x.reshape(n * t, h, w, c)
        if self.mode.startswith("up"):
            frames = jnp.repeat(jnp.repeat(frames, 2, axis=1), 2, axis=2)
        y = self.resample(frames)
        return y.reshape(n, t, *y.shape[1:])

    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        if self.mode == "upsample3d":
            if cache is None:  # first chunk: no temporal doubling (diffusers' "Rep")
                new = jnp.zeros((x.shape[0], CACHE_FRAMES, *x.shape[2:]), x.dtype)
            else:
                n, t, h, w, c = x.shape
                y, new = self.time_conv(x, cache)
                # channels [2, C] -> frames (2i, 2i + 1)
                y = y.reshape(n, t, h, w, 2, c)
                x = jnp.moveaxis(y, 4, 2).reshape(n, 2 * t, h, w, c)
            return self._per_frame(x), new
        x = self._per_frame(x)
        if self.mode == "downsample3d":
            last = x[:, -1:]
            if cache is not None:
                x = self.time_conv(jnp.concatenate([cache, x], axis=1))
            return x, last
        return x, ()


class MidBlock(nnx.Module):
    """``WanMidBlock``: resnet -> attention -> resnet. Cache: ``(resnet0, resnet1)``."""

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        self.attentions = nnx.List([AttentionBlock(channels, rngs=rngs)])
        self.resnets = nnx.List([ResidualBlock(channels, channels, rngs=rngs) for _ in "ab"])

    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        c0, c1 = (None, None) if cache is None else cache
        x, c0 = self.resnets[0](x, c0)
        x, _ = self.attentions[0](x)
        x, c1 = self.resnets[1](x, c1)
        return x, (c0, c1)


def _run(layers, x: Array, cache: Cache) -> tuple[Array, Cache]:
    """Runs cached layers in order; ``cache`` is their tuple of caches or ``None``."""
    caches = (None,) * len(layers) if cache is None else cache
    new = []
    for layer, c in zip(layers, caches, strict=True):
        x, c = layer(x, c)
        new.append(c)
    return x, tuple(new)


class UpBlock(nnx.Module):
    """``WanUpBlock``: ``num_res_blocks + 1`` resnets, then an optional :class:`Resample`."""

    def __init__(self, c_in, c_out, num_resnets, mode, *, rngs: nnx.Rngs):
        chans = [c_in] + [c_out] * num_resnets
        self.resnets = nnx.List([ResidualBlock(a, c_out, rngs=rngs) for a in chans[:num_resnets]])
        up = [Resample(c_out, mode, c_out // 2, rngs=rngs)] if mode else []
        self.upsamplers = nnx.List(up)

    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        return _run([*self.resnets, *self.upsamplers], x, cache)


class Encoder(nnx.Module):
    """``WanEncoder3d``: video chunk ``[N, T, H, W, C]`` -> moments ``[N, T', H/s_s, W/s_s, 2 z]``.

    Cache: ``(conv_in, (down layers...), mid block, conv_out)``.
    """

    def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs):
        dims = [config.base_dim * m for m in (1, *config.dim_mult)]
        self.conv_in = CausalConv3d(config.in_channels, dims[0], (3, 3, 3), rngs=rngs)
        layers = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(config.num_res_blocks):
                layers.append(ResidualBlock(c_in, c_out, rngs=rngs))
                c_in = c_out
            if i != len(config.dim_mult) - 1:
                mode = "downsample3d" if config.temperal_downsample[i] else "downsample2d"
                layers.append(Resample(c_out, mode, c_out, rngs=rngs))
        self.down_blocks = nnx.List(layers)
        self.mid_block = MidBlock(dims[-1], rngs=rngs)
        self.norm_out = RMSNorm(dims[-1], 3)
        self.conv_out = CausalConv3d(dims[-1], 2 * config.z_dim, (3, 3, 3), rngs=rngs)

    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        c_in, c_down, c_mid, c_out = (None,) * 4 if cache is None else cache
        x, c_in = self.conv_in(x, c_in)
        x, c_down = _run(self.down_blocks, x, c_down)
        x, c_mid = self.mid_block(x, c_mid)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), c_out)
        return x, (c_in, c_down, c_mid, c_out)


class Decoder(nnx.Module):
    """``WanDecoder3d``: latent chunk ``[N, F, h, w, z]`` -> video ``[N, T, s_s h, s_s w, 3]``
    (``T = F`` for the first chunk, ``s_t F`` after).

    Cache: ``(conv_in, mid block, (up blocks...), conv_out)``.
    """

    def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs):
        base = config.decoder_base_dim or config.base_dim
        mult = config.dim_mult
        dims = [base * m for m in (mult[-1], *mult[::-1])]
        temporal_up = config.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(config.z_dim, dims[0], (3, 3, 3), rngs=rngs)
        self.mid_block = MidBlock(dims[0], rngs=rngs)
        blocks = []
        for i, (c_in, c_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                c_in //= 2  # the previous upsampler halved the channels
            mode = None
            if i != len(mult) - 1:
                mode = "upsample3d" if temporal_up[i] else "upsample2d"
            blocks.append(UpBlock(c_in, c_out, config.num_res_blocks + 1, mode, rngs=rngs))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], 3)
        self.conv_out = CausalConv3d(dims[-1], config.out_channels, (3, 3, 3), rngs=rngs)

    def __call__(self, x: Array, cache: Cache) -> tuple[Array, Cache]:
        c_in, c_mid, c_up, c_out = (None,) * 4 if cache is None else cache
        x, c_in = self.conv_in(x, c_in)
        x, c_mid = self.mid_block(x, c_mid)
        x, c_up = _run(self.up_blocks, x, c_up)
        x, c_out = self.conv_out(jax.nn.silu(self.norm_out(x)), c_out)
        return x, (c_in, c_mid, c_up, c_out)


# --------------------------------------------------------------------------- chunked runs


def _channels_last(x: Array) -> Array:
    return jnp.transpose(x, (0, 2, 3, 4, 1))


def _channels_first(x: Array) -> Array:
    return jnp.transpose(x, (0, 4, 1, 2, 3))


def _decode_step(decoder: Decoder, cache: Cache, z_frame: Array) -> tuple[Cache, Array]:
    """One later latent frame ``[N, h, w, z]`` -> ``(cache, [N, s_t, H, W, C])``: the body of
    the decoder's scan (module level so tests can count its traces)."""
    y, cache = decoder(z_frame[:, None], cache)
    return cache, y


def _encode_step(encoder: Encoder, cache: Cache, chunk: Array) -> tuple[Cache, Array]:
    """One 4-frame chunk ``[N, 4, H, W, C]`` -> ``(cache, [N, 4 / s_t, h, w, 2 z])``: the body
    of the encoder's scan."""
    y, cache = encoder(chunk, cache)
    return cache, y


def _scan_chunks(step, module, first_out, cache, chunks: Array) -> Array:
    """``first_out`` followed by ``step`` scanned over ``chunks`` (leading axis), the per-chunk
    outputs ``[N, t, ...]`` concatenated along time."""
    if chunks.shape[0] == 0:
        return first_out
    _, ys = jax.lax.scan(lambda c, x: step(module, c, x), cache, chunks)
    ys = jnp.moveaxis(ys, 0, 1)  # [N, chunks, t, ...]
    ys = ys.reshape(ys.shape[0], -1, *ys.shape[3:])
    return jnp.concatenate([first_out, ys], axis=1)


class WanVAE(nnx.Module):
    """``AutoencoderKLWan`` (Wan 2.1) with diffusers parameter names; ``[N, C, T, H, W]`` API."""

    def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        z = config.z_dim
        self.encoder = Encoder(config, rngs=rngs)
        self.quant_conv = CausalConv3d(2 * z, 2 * z, (1, 1, 1), rngs=rngs)
        self.post_quant_conv = CausalConv3d(z, z, (1, 1, 1), rngs=rngs)
        self.decoder = Decoder(config, rngs=rngs)

    @property
    def dtype(self) -> jnp.dtype:
        """The parameters' dtype, in which the model computes (inputs are cast to it)."""
        return self.decoder.conv_in.kernel.get_value().dtype

    # ---------------------------------------------------------------- decode

    def decode(self, z: Array) -> Array:
        """Raw latents ``[N, z_dim, F, h, w]`` -> video ``[N, C, 1 + s_t (F - 1), s_s h, s_s w]``
        clipped to ``[-1, 1]`` (as diffusers' ``AutoencoderKLWan.decode``), in :attr:`dtype`.

        Latent frame 0 is decoded alone; frames ``1..F-1`` one at a time in a ``lax.scan``
        carrying the causal convolutions' caches.

        Raises:
            ValueError: ``z`` is not 5-D with ``z_dim`` channels.
        """
        self._check_latents(z)
        x = self.post_quant_conv.pointwise(_channels_last(z.astype(self.dtype)))
        first, cache = self.decoder(x[:, :1], None)
        out = _scan_chunks(_decode_step, self.decoder, first, cache, jnp.moveaxis(x[:, 1:], 1, 0))
        return jnp.clip(_channels_first(out), -1.0, 1.0)

    def decode_latents(self, latents: Array) -> Array:
        """Video from the transformer's normalised latents:
        ``decode(denormalize_latents(latents))``, as ``WanPipeline`` decodes."""
        return self.decode(self.denormalize_latents(latents))

    def normalize_latents(self, z: Array) -> Array:
        """Raw latents ``[N, z_dim, ...]`` -> the transformer's ``(z - latents_mean) /
        latents_std`` (per channel, in ``z``'s dtype)."""
        mean, std = self._latent_stats(z)
        return (z - mean) / std

    def denormalize_latents(self, latents: Array) -> Array:
        """The inverse of :meth:`normalize_latents`: ``latents * latents_std + latents_mean``."""
        mean, std = self._latent_stats(latents)
        return latents * std + mean

    # ---------------------------------------------------------------- encode

    def encode_posterior(self, video: Array) -> tuple[Array, Array]:
        """Posterior ``(mean, logvar)`` of a video ``[N, C, T, H, W]`` (``T = 4k + 1``), each
        ``[N, z_dim, 1 + k 4 / s_t, H / s_s, W / s_s]``; ``logvar`` clipped to ``[-30, 20]`` as
        diffusers' ``DiagonalGaussianDistribution``. Frame 0 is encoded alone, then chunks of 4
        frames in a ``lax.scan`` carrying the caches.

        Raises:
            ValueError: a frame count other than ``4k + 1`` (naming the valid ones), a height or
                width not divisible by ``s_s``, or the wrong number of channels.
        """
        self._check_video(video)
        n, _, frames, h, w = video.shape
        x = _channels_last(video.astype(self.dtype))
        first, cache = self.encoder(x[:, :1], None)
        chunks = x[:, 1:].reshape(n, (frames - 1) // ENCODER_CHUNK, ENCODER_CHUNK, *x.shape[2:])
        out = _scan_chunks(_encode_step, self.encoder, first, cache, jnp.moveaxis(chunks, 1, 0))
        moments = _channels_first(self.quant_conv.pointwise(out))
        mean, logvar = jnp.split(moments, 2, axis=1)
        return mean, jnp.clip(logvar, *_LOGVAR_RANGE)

    def encode(self, video: Array) -> Array:
        """Raw posterior mean ``[N, z_dim, F, h, w]`` of a video (see :meth:`encode_posterior`);
        diffusers' ``encode(video).latent_dist.mean``."""
        return self.encode_posterior(video)[0]

    def encode_latents(self, video: Array) -> Array:
        """The normalised posterior mean ``normalize_latents(encode(video))``."""
        return self.normalize_latents(self.encode(video))

    # ---------------------------------------------------------------- checks

    def _latent_stats(self, z: Array) -> tuple[Array, Array]:
        """``latents_mean`` and ``latents_std`` shaped to broadcast against ``z``."""
        if z.ndim < 2 or z.shape[1] != self.config.z_dim:
            raise ValueError(
                f"WanVAE: latents must be [N, z_dim={self.config.z_dim}, ...], "
                f"got shape {tuple(z.shape)}"
            )
        shape = (1, self.config.z_dim) + (1,) * (z.ndim - 2)
        mean = jnp.asarray(self.config.latents_mean, z.dtype).reshape(shape)
        std = jnp.asarray(self.config.latents_std, z.dtype).reshape(shape)
        return mean, std

    def _check_latents(self, z: Array) -> None:
        if z.ndim != 5 or z.shape[1] != self.config.z_dim or z.shape[2] < 1:
            raise ValueError(
                f"WanVAE.decode: latents must be [N, z_dim={self.config.z_dim}, F >= 1, h, w], "
                f"got shape {tuple(z.shape)}"
            )

    def _check_video(self, video: Array) -> None:
        c, s = self.config, self.config.spatial_factor
        if video.ndim != 5 or video.shape[1] != c.in_channels:
            raise ValueError(
                f"WanVAE.encode: video must be [N, {c.in_channels}, T, H, W], "
                f"got shape {tuple(video.shape)}"
            )
        frames, h, w = video.shape[2:]
        if (frames - 1) % ENCODER_CHUNK:
            raise ValueError(
                f"WanVAE.encode: the encoder takes 1 + {ENCODER_CHUNK} k frames (the first frame, "
                f"then chunks of {ENCODER_CHUNK}; {_valid_counts(ENCODER_CHUNK, frames)}), "
                f"got {frames}"
            )
        if h % s or w % s:
            raise ValueError(
                f"WanVAE.encode: height and width must be multiples of {s}, got {h} x {w}"
            )


# ------------------------------------------------------------------- functional use, checkpoints


def wan_vae_decode(params: tuple[nnx.GraphDef, nnx.State], latents: Array) -> Array:
    """Pure :meth:`WanVAE.decode_latents` (normalised latents) for ``jax.jit``;
    ``params = nnx.split(vae)``."""
    graphdef, state = params
    return nnx.merge(graphdef, state).decode_latents(latents)


def _axes(leaf: str, ndim: int) -> tuple[int, ...] | None:
    """PyTorch ``Conv3d`` kernels ``[out, in, t, h, w]`` vs ours ``[t, h, w, in, out]``; 2D as
    :func:`checkpoint.torch_axes`."""
    if leaf == "kernel" and ndim == 5:
        return (4, 3, 0, 1, 2)
    return checkpoint.torch_axes(leaf, ndim)


def _torch_key(dotted: str) -> str:
    return dotted.replace(".resample.", ".resample.1.")  # nn.Sequential(pad or upsample, conv)


LAYOUT = dataclasses.replace(checkpoint.TORCH, axes=_axes, rename=_torch_key)
"""diffusers ``AutoencoderKLWan`` names and PyTorch kernel layouts."""
WAN_VAE_REQUIRED_KEYS = ("base_dim", "z_dim")
"""Keys a usable config.json must set (the others default as in diffusers)."""


def load_wan_vae(path: str | Path, dtype: Any = jnp.float32) -> WanVAE:
    """Load a diffusers ``AutoencoderKLWan`` folder (safetensors only).

    Args:
        path: folder with ``config.json`` and ``diffusion_pytorch_model.safetensors`` (or its
            shards and their index); tensors in any float dtype.
        dtype: parameter and compute dtype, ``jnp.float32`` or ``jnp.bfloat16``.

    Returns:
        The :class:`WanVAE` (its config at ``.config``).

    Raises:
        FileNotFoundError: the folder, ``config.json`` or the weights are missing (named).
        ValueError: invalid JSON, a missing or wrongly typed key, an unsupported config (Wan 2.2,
            scale factors disagreeing with the network), or weights not matching the config
            (naming the tensor); a non-float ``dtype``.
    """
    loader = "load_wan_vae"
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{loader}: dtype must be a float dtype, got {np.dtype(dtype).name}")
    config = checkpoint.read_config(
        path,
        loader,
        WanVAEConfig.from_dict,
        schema=WanVAEConfig,
        required=WAN_VAE_REQUIRED_KEYS,
    )
    abstract = nnx.eval_shape(lambda: WanVAE(config, rngs=nnx.Rngs(0)))
    tensors = checkpoint.read_tensors(
        path, loader, checkpoint.DIFFUSERS_WEIGHTS_NAME, hint="only safetensors are supported"
    )
    return checkpoint.load_params(abstract, tensors, LAYOUT, dtype=dtype)


def save_wan_vae(path: str | Path, model: WanVAE) -> None:
    """Write a diffusers folder that ``AutoencoderKLWan.from_pretrained`` loads."""
    tensors = checkpoint.export_params(model, LAYOUT, np.float32)
    checkpoint.save_folder(path, model.config.to_dict(), tensors, checkpoint.DIFFUSERS_WEIGHTS_NAME)
