"""Text-to-image pipelines (SD3 / SD3.5, FLUX.1) as prompt-conditioned flow models.

:func:`load_text_to_image` reads a local diffusers pipeline folder (or a hub id, through
:func:`~tts_jax.models.pipelines.folder.resolve_pipeline`) and returns a
:class:`TextToImagePipeline`: the transformer (Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis"; Black Forest Labs 2024, FLUX.1), the VAE, the
text encoders with their tokenizers (:mod:`~tts_jax.models.pipelines.prompts`) and the scheduler
config. Every image sampler of :mod:`tts_jax.samplers.image` steers it::

    pipe = load_text_to_image("path/to/stable-diffusion-3.5-medium", jnp.bfloat16)
    cond = pipe.encode_prompt("a photo of a cat")              # TextCondition, leaves [1, ...]
    flow = pipe.flow(1024, 1024, guidance_scale=4.5)           # a FlowModel
    grid = pipe.grid(28, 1024, 1024)                           # the scheduler's sigmas [29]
    reward = decoded_reward(pipe, my_image_reward, my_params)  # r(decode(x), cond)
    result = fk_steering(key, flow, reward, 8, grid, diffusion, lam, cond=cond)
    images = pipe.decode(result.samples)                       # [N, 3, H, W] in [-1, 1]

Conventions (those of :class:`~tts_jax.models.base.FlowModel`):

* **Time** is the diffusers flow-matching sigma: ``x_t = (1 - t) x0 + t eps`` (the
  :class:`~tts_jax.interpolants.Linear` path), ``t = 1`` noise, ``t = 0`` data; the transformers
  predict the velocity ``eps - x0``. :meth:`TextToImagePipeline.grid` is the scheduler's
  ``sigmas`` ``[K + 1]`` (shifted as the pipeline shifts them, ending at 0), so the Euler solve
  :func:`tts_jax.samplers.image.integrate.solve` with ``ode()`` on that grid is
  ``FlowMatchEulerDiscreteScheduler.step`` (``x + (sigma_{k+1} - sigma_k) v``) step for step.
* **Latents** are ``[N, C, h, w]`` (NCHW, scaled by the VAE's ``scaling_factor`` and
  ``shift_factor``) for both kinds: :meth:`TextToImagePipeline.latent_shape` is the flow's
  ``sample_shape``, what the samplers draw noise for and what the rewards decode. FLUX's
  transformer works on packed ``2 x 2`` patches ``[N, (h / 2)(w / 2), 4 C]``: the flow packs
  on the way in and unpacks on the way out (a permutation, so the Gaussian noise is the same;
  diffusers' packed initial latents are ``pack(x)`` of ours).
* **Conditioning**: ``cond`` is the :class:`~tts_jax.models.pipelines.prompts.TextCondition`
  of :meth:`TextToImagePipeline.encode_prompt`, prompt batch ``B`` first (``B = 1``: one prompt
  shared by every particle, the shape the samplers expect). It is never materialised per
  particle: the transformers project the prompt tokens and the pooled embedding at ``B`` and
  broadcast after (particle ``i`` uses prompt ``i // (N / B)``). A sampler that broadcasts a
  shared ``cond`` to its rows itself (noise search does) hands the flow ``B = N`` copies: the
  result is the same, at the cost of projecting the copies.
* **Guidance**: the scale is the array leaf ``flow.params.guidance``, so changing it
  (:func:`with_guidance`) reuses the compiled sampler. SD3 runs true classifier-free guidance
  (Ho & Salimans 2022) as the pipeline does: one ``2N`` batch of negative and positive prompts,
  ``v = v_neg + w (v_pos - v_neg)``; it is on when the scale given to
  :meth:`TextToImagePipeline.flow` is ``> 1`` (diffusers' rule; a static choice, as it halves the
  cost), or as ``cfg=`` says. Guidance-distilled FLUX (``guidance_embeds``, FLUX.1-dev) embeds the
  scale; FLUX.1-schnell has no guidance (the leaf is ignored). FLUX's ``true_cfg_scale`` with a
  negative prompt, SD3's skip-layer guidance, IP adapters and ``clip_skip`` are not supported.
* **Decoding**: :func:`decode_latents` (pure, jittable) is the pipelines' last step, ``vae.decode
  (x / scaling_factor + shift_factor)``, clipped to ``[-1, 1]``; diffusers' ``output_type="np"``
  image is ``(decode + 1) / 2`` in NHWC.

Precision: ``dtype`` (float32 or bfloat16) is the parameter and compute dtype of every network;
norms, softmaxes, positional tables and the time embeddings stay float32 (see the model
modules). The latents the samplers carry and the velocity returned are float32 (diffusers'
bfloat16 pipelines carry bfloat16 latents; each Euler step is float32 in both). Measured on the
tiny test pipelines, a bfloat16 pipeline's 2-step image is within 0.03 (FLUX) and 0.07 (SD3) of
float32's on ``[-1, 1]``; the float32 images equal diffusers' to 3e-6.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.interpolants import Linear
from tts_jax.models.base import FlowModel
from tts_jax.models.flux import FluxConfig, flux_apply, load_flux
from tts_jax.models.pipelines.folder import (
    PipelineFolder,
    read_pipeline_folder,
    resolve_pipeline,
)
from tts_jax.models.pipelines.prompts import (
    PromptEncoder,
    TextCondition,
    load_prompt_encoder,
)
from tts_jax.models.pipelines.schedule import (
    FlowMatchConfig,
    pipeline_grid,
    read_scheduler_config,
)
from tts_jax.models.sd3 import SD3Config, load_sd3, sd3_apply
from tts_jax.models.vae import VAEConfig, load_vae
from tts_jax.rewards.base import Reward

Array = jax.Array
Split = tuple[nnx.GraphDef, nnx.State]

DEFAULT_GUIDANCE = {"sd3": 7.0, "flux": 3.5}
"""The pipelines' default ``guidance_scale``."""
DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}
"""The pipelines' default T5 prompt length ``max_sequence_length``."""
FLUX_DEFAULT_SAMPLE_SIZE = 128
"""``FluxPipeline.default_sample_size`` (latent pixels; images 1024 px with the real VAE)."""
TIMESTEP_SCALE = 1000.0

# The networks as nested jits: a sampler that calls the model or the reward at several places
# traces and lowers each network once (XLA still inlines every call site).
_sd3 = jax.jit(sd3_apply)
_flux = jax.jit(flux_apply)


# --------------------------------------------------------------------------- velocities


class T2IFlowParams(NamedTuple):
    """Dynamic part of a text-to-image flow.

    Attributes:
        transformer: ``nnx.split`` of the SD3 or FLUX transformer.
        guidance: float32 scalar guidance scale (SD3: classifier-free guidance weight, read only
            when the flow was built with ``cfg``; FLUX.1-dev: the embedded guidance; schnell:
            ignored).
    """

    transformer: Split
    guidance: Array


def _check_cond(cond: Any) -> None:
    if not isinstance(cond, TextCondition):
        raise ValueError(
            "a text-to-image flow needs cond = pipeline.encode_prompt(prompts) (a TextCondition), "
            f"got {type(cond).__name__}"
        )


@dataclasses.dataclass(frozen=True)
class SD3Velocity:
    """Apply of an SD3 / SD3.5 flow (hashable by value: rebuilding it never retraces).

    Attributes:
        cfg: classifier-free guidance (a ``2N`` batch with the negative prompts).
    """

    cfg: bool

    def __call__(self, params: T2IFlowParams, x: Array, t: Array, cond: TextCondition) -> Array:
        """``x [N, C, h, w]``, ``t [N]`` (sigma in ``[0, 1]``), ``cond`` leaves ``[B, ...]`` with
        ``B`` dividing ``N`` -> velocity ``[N, C, h, w]``."""
        _check_cond(cond)
        timestep = t.astype(jnp.float32) * TIMESTEP_SCALE  # the scheduler's float32 timesteps
        if not self.cfg:
            return _sd3(params.transformer, x, timestep, cond.embeds, cond.pooled)
        if cond.negative_embeds is None:
            raise ValueError("classifier-free guidance needs the negative prompt's embeddings")
        n = x.shape[0]
        both = _sd3(
            params.transformer,
            jnp.concatenate([x, x]),
            jnp.concatenate([timestep, timestep]),
            jnp.concatenate([cond.negative_embeds, cond.embeds]),
            jnp.concatenate([cond.negative_pooled, cond.pooled]),
        )
        uncond, text = both[:n], both[n:]
        return uncond + params.guidance.astype(both.dtype) * (text - uncond)


def pack_latents(x: Array) -> Array:
    """``[N, C, h, w]`` -> FLUX's packed ``[N, (h / 2)(w / 2), 4 C]`` (diffusers'
    ``FluxPipeline._pack_latents``: 2 x 2 patches in row-major order, channel-major inside)."""
    n, c, h, w = x.shape
    x = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // 2) * (w // 2), 4 * c)


def unpack_latents(packed: Array, height: int, width: int) -> Array:
    """Inverse of :func:`pack_latents` for latents ``height x width``."""
    n, _, c4 = packed.shape
    x = packed.reshape(n, height // 2, width // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(n, c4 // 4, height, width)


def flux_image_ids(height: int, width: int) -> np.ndarray:
    """``float32[(h / 2)(w / 2), 3]`` position ids ``(0, row, col)`` of the packed tokens
    (diffusers' ``_prepare_latent_image_ids``)."""
    rows, cols = np.meshgrid(np.arange(height // 2), np.arange(width // 2), indexing="ij")
    ids = np.stack([np.zeros_like(rows), rows, cols], axis=-1).reshape(-1, 3)
    return ids.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FluxVelocity:
    """Apply of a FLUX.1 flow on unpacked latents (hashable by value).

    Attributes:
        guidance_embeds: the transformer embeds the guidance scale (FLUX.1-dev); ``False`` for
            schnell.
    """

    guidance_embeds: bool

    def __call__(self, params: T2IFlowParams, x: Array, t: Array, cond: TextCondition) -> Array:
        """``x [N, C, h, w]`` (``h``, ``w`` even), ``t [N]``, ``cond`` leaves ``[B, ...]`` ->
        velocity ``[N, C, h, w]``.

        The time goes through the scheduler's timestep and back, ``(1000 t) / 1000`` in float32,
        as the pipeline passes ``timesteps / 1000`` to the transformer.
        """
        _check_cond(cond)
        n, _, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"FLUX latents need an even height and width, got {h}x{w}")
        timestep = (t.astype(jnp.float32) * TIMESTEP_SCALE) / TIMESTEP_SCALE
        guidance = None
        if self.guidance_embeds:
            guidance = jnp.broadcast_to(params.guidance.astype(jnp.float32), (n,))
        seq = cond.embeds.shape[1]
        out = _flux(
            params.transformer,
            pack_latents(x),
            timestep,
            guidance,
            cond.pooled,
            cond.embeds,
            jnp.zeros((seq, 3), jnp.float32),
            jnp.asarray(flux_image_ids(h, w)),
        )
        return unpack_latents(out, h, w)


def with_guidance(flow: FlowModel, guidance_scale: float | Array) -> FlowModel:
    """The same text-to-image flow with another guidance scale (reuses compiled programs)."""
    scale = jnp.asarray(guidance_scale, jnp.float32)
    return flow.replace(params=flow.params._replace(guidance=scale))


# --------------------------------------------------------------------------- decoding, rewards


@jax.jit
def decode_latents(vae: Split, latents: Array) -> Array:
    """Latents ``[N, C, h, w]`` -> images ``float32[N, 3, H, W]`` in ``[-1, 1]`` (pure, jittable).

    ``vae = nnx.split(AutoencoderKL)``: ``decode(latents / scaling_factor + shift_factor)``, the
    pipelines' last step, clipped as their post-processing clips.
    """
    images = nnx.merge(*vae).decode_latents(latents)
    return jnp.clip(images.astype(jnp.float32), -1.0, 1.0)


class DecodedRewardParams(NamedTuple):
    """``vae``: ``nnx.split`` of the VAE; ``image``: the image reward's own params."""

    vae: Split
    image: Any


@dataclasses.dataclass(frozen=True)
class DecodedReward:
    """Apply of :func:`decoded_reward`: ``image_apply(params.image, decode(x), cond)``."""

    image_apply: Any

    def __call__(self, params: DecodedRewardParams, x: Array, cond: Any = None) -> Array:
        return self.image_apply(params.image, decode_latents(params.vae, x), cond)


def decoded_reward(
    pipeline: TextToImagePipeline, image_apply: Any, image_params: Any = None, name: str = "image"
) -> Reward:
    """A :class:`~tts_jax.rewards.base.Reward` on latents from a reward on decoded images.

    Args:
        pipeline: gives the VAE (its weights become leaves of the reward's params).
        image_apply: ``(image_params, images float32[N, 3, H, W] in [-1, 1], cond) -> [N]``, a
            module-level function or frozen dataclass; ``cond`` is the sampler's (the
            :class:`~tts_jax.models.pipelines.prompts.TextCondition`, or whatever the caller
            passes, e.g. tokenized prompts for a CLIP score).
        image_params: its params pytree.
        name: the reward's name.
    """
    params = DecodedRewardParams(pipeline.vae_params, image_params)
    return Reward(params, DecodedReward(image_apply), name)


# --------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass(frozen=True, eq=False)
class TextToImagePipeline:
    """A loaded SD3 / SD3.5 or FLUX.1 pipeline (module docstring).

    Attributes:
        kind: ``"sd3"`` or ``"flux"``.
        folder: the checked :class:`~tts_jax.models.pipelines.folder.PipelineFolder`.
        dtype: parameter and compute dtype of every network.
        transformer_config: :class:`~tts_jax.models.sd3.SD3Config` or
            :class:`~tts_jax.models.flux.FluxConfig`.
        transformer_params: ``nnx.split`` of the transformer.
        vae_config, vae_params: the VAE's config and ``nnx.split``.
        prompt_encoder: tokenizers and text encoders
            (:class:`~tts_jax.models.pipelines.prompts.PromptEncoder`).
        scheduler: the ``FlowMatchEulerDiscreteScheduler`` config.
    """

    kind: Literal["sd3", "flux"]
    folder: PipelineFolder
    dtype: Any
    transformer_config: SD3Config | FluxConfig
    transformer_params: Split
    vae_config: VAEConfig
    vae_params: Split
    prompt_encoder: PromptEncoder
    scheduler: FlowMatchConfig

    # ----------------------------------------------------------------- sizes

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel, ``2 ** (len(block_out_channels) - 1)``."""
        return 2 ** (len(self.vae_config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae_config.latent_channels

    @property
    def default_size(self) -> int:
        """The pipeline's default image height and width in pixels."""
        if self.kind == "sd3":
            return self.transformer_config.sample_size * self.vae_scale_factor
        return FLUX_DEFAULT_SAMPLE_SIZE * self.vae_scale_factor

    @property
    def max_sequence_length(self) -> int:
        return self.prompt_encoder.max_sequence_length

    def latent_shape(
        self, height: int | None = None, width: int | None = None
    ) -> tuple[int, int, int]:
        """``(C, h, w)`` of the latents for an image ``height x width`` (default
        :attr:`default_size`): SD3 ``H // f``; FLUX ``2 (H // 2f)`` (even, as the pipeline
        rounds), ``f`` the VAE scale factor.

        Raises:
            ValueError: a size that gives no latent pixel (SD3: not one transformer patch).
        """
        height = self.default_size if height is None else int(height)
        width = self.default_size if width is None else int(width)
        f = self.vae_scale_factor
        if self.kind == "sd3":
            h, w = height // f, width // f
            minimum = self.transformer_config.patch_size
        else:
            h, w = 2 * (height // (2 * f)), 2 * (width // (2 * f))
            minimum = 2
        if min(h, w) < minimum:
            raise ValueError(
                f"an image of {height}x{width} px gives {h}x{w} latents, below the minimum "
                f"{minimum}x{minimum} of this {self.kind} pipeline (VAE scale factor {f})"
            )
        return (self.latent_channels, h, w)

    # ----------------------------------------------------------------- the model

    def encode_prompt(
        self, prompts: str | list[str], negative_prompts: str | list[str] | None = None
    ) -> TextCondition:
        """The ``cond`` of :meth:`flow` for ``B`` prompts (leading axis ``B``; 1 for one prompt),
        as the diffusers pipeline's ``encode_prompt`` builds it
        (:meth:`~tts_jax.models.pipelines.prompts.PromptEncoder.encode`)."""
        return self.prompt_encoder.encode(prompts, negative_prompts)

    def flow(
        self,
        height: int | None = None,
        width: int | None = None,
        *,
        guidance_scale: float | None = None,
        cfg: bool | None = None,
    ) -> FlowModel:
        """The prompt-conditioned flow for images ``height x width`` (default
        :attr:`default_size`).

        Args:
            height, width: image size in pixels (the latent size is :meth:`latent_shape`).
            guidance_scale: default :data:`DEFAULT_GUIDANCE` (SD3 7.0, FLUX 3.5); change it
                later with :func:`with_guidance` without recompiling.
            cfg: SD3: run classifier-free guidance (default: ``guidance_scale > 1``, diffusers'
                rule). Ignored by FLUX.

        Returns:
            :class:`~tts_jax.models.base.FlowModel` on the ``Linear`` path, ``apply(params, x
            [N, C, h, w], t [N], cond: TextCondition) -> [N, C, h, w]``, ``sample_shape``
            :meth:`latent_shape`.
        """
        scale = DEFAULT_GUIDANCE[self.kind] if guidance_scale is None else guidance_scale
        if self.kind == "sd3":
            apply = SD3Velocity(bool(scale > 1) if cfg is None else bool(cfg))
        else:
            apply = FluxVelocity(bool(self.transformer_config.guidance_embeds))
        params = T2IFlowParams(self.transformer_params, jnp.asarray(scale, jnp.float32))
        return FlowModel(params, apply, Linear(), self.latent_shape(height, width))

    def grid(self, num_steps: int, height: int | None = None, width: int | None = None) -> Array:
        """``float32[K + 1]`` the scheduler's sigmas for ``K = num_steps`` steps at this image
        size, decreasing to the data end 0: the time grid of the samplers, exactly the one the
        diffusers pipeline steps through (:func:`~tts_jax.models.pipelines.schedule.
        pipeline_grid`)."""
        _, h, w = self.latent_shape(height, width)
        patch = self.transformer_config.patch_size  # SD3's token count for mu; FLUX packs 2 x 2
        grid = pipeline_grid(self.kind, self.scheduler, int(num_steps), h, w, patch)
        return jnp.asarray(grid.sigmas, jnp.float32)

    def decode(self, latents: Array) -> Array:
        """Latents ``[N, C, h, w]`` -> images ``float32[N, 3, H, W]`` in ``[-1, 1]``
        (:func:`decode_latents` with this pipeline's VAE; jittable)."""
        return decode_latents(self.vae_params, latents)


def load_text_to_image(
    path_or_hub_id: str | Path,
    dtype: Any = jnp.float32,
    *,
    max_sequence_length: int | None = None,
) -> TextToImagePipeline:
    """Load an SD3 / SD3.5 (``StableDiffusion3Pipeline``) or FLUX.1 (``FluxPipeline``) diffusers
    folder.

    Args:
        path_or_hub_id: a local pipeline folder, or a hub id fetched with
            :func:`~tts_jax.models.pipelines.folder.resolve_pipeline`.
        dtype: parameter and compute dtype (``jnp.float32`` or ``jnp.bfloat16``) of the
            transformer, the VAE and the text encoders.
        max_sequence_length: T5 prompt length (default :data:`DEFAULT_MAX_SEQUENCE_LENGTH`: SD3
            256, FLUX 512); it must match the diffusers call's to reproduce its images.

    Returns:
        :class:`TextToImagePipeline`.

    Raises:
        NotAPipelineFolderError, UnsupportedPipelineError, MissingComponentError,
        PickleWeightsError, HubUnreachableError: from
            :mod:`~tts_jax.models.pipelines.folder` (named, with what to do).
        UnsupportedSchedulerError: a scheduler option the grid does not reproduce.
        CheckpointNotFoundError, CheckpointConfigError, TensorMismatchError: a component's
            files, config or tensors (named by the component loaders).
    """
    folder = read_pipeline_folder(resolve_pipeline(path_or_hub_id))
    kind = folder.kind
    scheduler = read_scheduler_config(folder.scheduler, "load_text_to_image")
    load = load_sd3 if kind == "sd3" else load_flux
    config, transformer = load(folder.transformer, dtype)
    vae_config, vae = load_vae(folder.vae, dtype)
    if max_sequence_length is None:
        max_sequence_length = DEFAULT_MAX_SEQUENCE_LENGTH[kind]
    slots = 3 if kind == "sd3" else 2
    encoder = load_prompt_encoder(
        kind,
        (folder.tokenizer, folder.tokenizer_2, folder.tokenizer_3)[:slots],
        (folder.text_encoder, folder.text_encoder_2, folder.text_encoder_3)[:slots],
        dtype,
        max_sequence_length,
        config.joint_attention_dim,
    )
    return TextToImagePipeline(
        kind=kind,
        folder=folder,
        dtype=dtype,
        transformer_config=config,
        transformer_params=nnx.split(transformer),
        vae_config=vae_config,
        vae_params=nnx.split(vae),
        prompt_encoder=encoder,
        scheduler=scheduler,
    )
