"""Text-to-video pipelines (Wan 2.1, ``WanPipeline``) as prompt-conditioned flow models.

:func:`load_text_to_video` reads a local diffusers Wan 2.1 text-to-video folder (or a hub id,
through :func:`~tts_jax.models.pipelines.folder.resolve_pipeline`) and returns a
:class:`TextToVideoPipeline` with the interface of the text-to-image one
(:mod:`~tts_jax.models.pipelines.text_to_image`): the transformer (:mod:`tts_jax.models.wan`),
the UMT5 text encoder (:mod:`tts_jax.models.t5`, ``model_type = "umt5"``) and its tokenizer, the
causal video VAE (:mod:`tts_jax.models.wan_vae`) and the scheduler config. Every image sampler of
:mod:`tts_jax.samplers.image` steers it unchanged, the particle axis first on ``[N, C, F, h, w]``
latents::

    pipe = load_text_to_video("path/to/Wan2.1-T2V-1.3B-Diffusers", jnp.bfloat16)
    cond = pipe.encode_prompt("a cat surfing a wave")          # TextCondition, leaves [1, ...]
    flow = pipe.flow(81, 480, 832, guidance_scale=5.0)         # a FlowModel on [N, 16, 21, 60, 104]
    grid = pipe.grid(50)                                       # the scheduler's sigmas [51]
    result = fk_steering(key, flow, reward, 4, grid, diffusion, lam, cond=cond)
    video = pipe.decode(result.samples)                        # [N, 3, 81, 480, 832] in [-1, 1]

Conventions (those of the text-to-image pipelines, see that module):

* **Time** is the flow-matching sigma (``x_t = (1 - t) x0 + t eps``, the ``Linear`` path, data at
  0); the transformer is conditioned on ``1000 t`` and predicts ``eps - x0``.
  :meth:`TextToVideoPipeline.grid` is ``FlowMatchEulerDiscreteScheduler.set_timesteps(K)`` as
  ``WanPipeline`` calls it (no ``mu``: the static ``shift`` of the config, applied twice as
  diffusers does, see :mod:`~tts_jax.models.pipelines.schedule`). The real Wan folders ship a
  ``UniPCMultistepScheduler`` config instead: with ``use_flow_sigmas`` its grid is read too
  (:func:`unipc_flow_grid`, the same sigmas UniPC steps through); the samplers integrate on it
  with their own solvers (Euler / SDE), not UniPC's multistep predictor-corrector, and the
  transformer sees ``1000 t`` where UniPC passes the integer part of it.
* **Latents** are ``[N, C, F, h, w]`` normalised as the transformer sees them (``(z - mean) /
  std`` of the VAE's per-channel ``latents_mean`` / ``latents_std``); ``F = 1 + (frames - 1) /
  s_t``, ``h = height / s_s`` (Wan 2.1: ``s_t = 4``, ``s_s = 8``).
  :meth:`TextToVideoPipeline.latent_shape` refuses a frame count other than ``1 + s_t k`` and a
  size that is not a multiple of ``s_s`` times the patch (naming the valid values; diffusers
  rounds them with a warning).
* **Conditioning**: :meth:`TextToVideoPipeline.encode_prompt` gives a
  :class:`~tts_jax.models.pipelines.prompts.TextCondition` (``embeds`` and ``negative_embeds``
  ``[B, S, text_dim]``, ``pooled`` ``None``), as ``WanPipeline.encode_prompt``: the prompt
  cleaned (HTML entities, whitespace; ``ftfy`` when installed, as diffusers), padded to
  ``max_sequence_length`` with its mask, UMT5's ``last_hidden_state`` with the padding positions
  zeroed. The transformer projects it at ``B`` and broadcasts to the particles.
* **Guidance**: true classifier-free guidance (Ho & Salimans 2022) as ``WanPipeline`` does it,
  ``v = v_neg + w (v_pos - v_neg)``, computed in one ``2N`` batch; on when the scale is ``> 1``
  (diffusers' rule) or as ``cfg=`` says; the scale is the array leaf ``flow.params.guidance``
  (:func:`~tts_jax.models.pipelines.text_to_image.with_guidance` changes it without recompiling).
  Wan 2.2's two-transformer folders (``transformer_2``, ``boundary_ratio``) and image
  conditioning are refused.
* **Decoding**: :meth:`TextToVideoPipeline.decode` is ``vae.decode(latents * std + mean)``,
  clipped to ``[-1, 1]`` (diffusers' ``output_type="np"`` video is ``(decode + 1) / 2`` in
  ``[N, F, H, W, 3]``); :func:`decoded_video_reward` turns a reward on decoded videos into one
  on latents, the decoder inside the sampler's graph.

Precision: ``dtype`` (float32 or bfloat16) is the parameter and compute dtype of every network
(norms, softmax, rotary angles and the time embedding stay float32, see the model modules); the
latents the samplers carry and the velocity returned are float32.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import re
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.interpolants import Linear
from tts_jax.models import checkpoint
from tts_jax.models.base import FlowModel
from tts_jax.models.pipelines import folder as F
from tts_jax.models.pipelines.prompts import TextCondition, load_tokenizer
from tts_jax.models.pipelines.schedule import (
    SCHEDULER_CONFIG_NAME,
    FlowMatchConfig,
    UnsupportedSchedulerError,
    flow_grid,
    read_scheduler_config,
)
from tts_jax.models.pipelines.text_to_image import T2IFlowParams
from tts_jax.models.t5 import load_t5_encoder, t5_encoder_apply
from tts_jax.models.wan import WanConfig, load_wan, wan_apply
from tts_jax.models.wan_vae import WanVAEConfig, load_wan_vae
from tts_jax.rewards.base import Reward

Array = jax.Array
Split = tuple[nnx.GraphDef, nnx.State]

PIPELINE_CLASS = "WanPipeline"
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
DEFAULT_GUIDANCE = 5.0
"""``WanPipeline``'s default ``guidance_scale``."""
DEFAULT_MAX_SEQUENCE_LENGTH = 512
"""``WanPipeline.__call__``'s default UMT5 prompt length."""
DEFAULT_SIZE = (81, 480, 832)
"""``WanPipeline``'s default ``(num_frames, height, width)``."""
TIMESTEP_SCALE = 1000.0
_LOADER = "load_text_to_video"

_wan = jax.jit(wan_apply)


# --------------------------------------------------------------------------- velocity


def _check_cond(cond: Any) -> None:
    if not isinstance(cond, TextCondition):
        raise ValueError(
            "a text-to-video flow needs cond = pipeline.encode_prompt(prompts) (a "
            f"TextCondition), got {type(cond).__name__}"
        )


@dataclasses.dataclass(frozen=True)
class WanVelocity:
    """Apply of a Wan 2.1 flow (hashable by value: rebuilding it never retraces).

    Attributes:
        cfg: classifier-free guidance (a ``2N`` batch with the negative prompts).
    """

    cfg: bool

    def __call__(self, params: T2IFlowParams, x: Array, t: Array, cond: TextCondition) -> Array:
        """``x [N, C, F, h, w]``, ``t [N]`` (sigma in ``[0, 1]``), ``cond`` leaves ``[B, ...]``
        with ``B`` dividing ``N`` -> velocity ``[N, C, F, h, w]``."""
        _check_cond(cond)
        timestep = t.astype(jnp.float32) * TIMESTEP_SCALE  # the scheduler's float32 timesteps
        if not self.cfg:
            return _wan(params.transformer, x, timestep, cond.embeds)
        if cond.negative_embeds is None:
            raise ValueError("classifier-free guidance needs the negative prompt's embeddings")
        n = x.shape[0]
        both = _wan(
            params.transformer,
            jnp.concatenate([x, x]),
            jnp.concatenate([timestep, timestep]),
            jnp.concatenate([cond.negative_embeds, cond.embeds]),
        )
        uncond, text = both[:n], both[n:]
        return uncond + params.guidance.astype(both.dtype) * (text - uncond)


# --------------------------------------------------------------------------- prompts


def prompt_clean(text: str) -> str:
    """``WanPipeline``'s prompt cleaning: ``ftfy.fix_text`` when ftfy is installed, HTML entities
    unescaped twice, whitespace runs collapsed to one space, stripped."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@jax.jit
def _encode(encoder: Split, ids: Array, mask: Array) -> Array:
    """UMT5 ``last_hidden_state`` with the padding positions zeroed, ``[B, S, D]``."""
    states = t5_encoder_apply(nnx.merge(*encoder), ids, mask).last_hidden_state
    return states * mask[:, :, None].astype(states.dtype)


@dataclasses.dataclass(frozen=True, eq=False)
class UMT5PromptEncoder:
    """The tokenizer and UMT5 encoder of a Wan pipeline.

    Attributes:
        tokenizer: transformers' ``T5TokenizerFast`` of the folder.
        encoder: ``nnx.split`` of the UMT5 encoder.
        max_sequence_length: padding length ``S``.
    """

    tokenizer: Any
    encoder: Split
    max_sequence_length: int

    def encode(
        self, prompts: str | list[str], negative_prompts: str | list[str] | None = None
    ) -> TextCondition:
        """Encode ``B`` prompts and their negative prompts (default ``""``) in one jitted call.

        Raises:
            ValueError: no prompt, or a negative prompt count other than 1 or ``B``.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a string or a non-empty list of strings: {prompts}")
        b = len(prompts)
        negative = "" if negative_prompts is None else negative_prompts
        negative = [negative] * b if isinstance(negative, str) else list(negative)
        if len(negative) != b:
            raise ValueError(f"{len(negative)} negative prompts for {b} prompts (give 1 or {b})")
        tokens = self.tokenizer(
            [prompt_clean(p) for p in prompts + negative],
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="np",
        )
        ids = np.asarray(tokens.input_ids, np.int32)
        mask = np.asarray(tokens.attention_mask, np.int32)
        embeds = _encode(self.encoder, ids, mask)
        return TextCondition(embeds[:b], None, embeds[b:], None)


# --------------------------------------------------------------------------- folder, schedule


@dataclasses.dataclass(frozen=True)
class VideoFolder:
    """A checked Wan pipeline folder (nothing loaded yet): the folder and its component
    sub-folders."""

    path: Path
    transformer: Path
    vae: Path
    text_encoder: Path
    tokenizer: Path
    scheduler: Path


def read_video_folder(path: str | Path) -> VideoFolder:
    """Checks a local ``WanPipeline`` folder.

    Raises:
        NotAPipelineFolderError: no ``model_index.json``.
        UnsupportedPipelineError: another pipeline class, or a Wan 2.2 two-stage folder
            (``transformer_2`` / ``boundary_ratio``) or ``expand_timesteps``.
        MissingComponentError: a component not listed or without its sub-folder.
        PickleWeightsError, CheckpointNotFoundError: a model component's weights or config.
    """
    folder = checkpoint.require_folder(path, _LOADER)
    if not (folder / F.MODEL_INDEX_NAME).is_file():
        raise F.NotAPipelineFolderError(
            f"{_LOADER}: folder {folder} has no {F.MODEL_INDEX_NAME}: not a diffusers pipeline "
            "folder (expected what WanPipeline.save_pretrained writes)"
        )
    index = checkpoint.read_config_file(folder, _LOADER, F.MODEL_INDEX_NAME)
    index.check({"_class_name": str}, ("_class_name",))
    name = index.raw["_class_name"]
    if name != PIPELINE_CLASS:
        raise F.UnsupportedPipelineError(
            f"{index.where}: pipeline class {name!r} is not a text-to-video pipeline; supported: "
            f"{PIPELINE_CLASS} (Wan 2.1 T2V)"
        )
    second = index.raw.get("transformer_2")
    if (second is not None and second != [None, None]) or index.raw.get("boundary_ratio"):
        raise F.UnsupportedPipelineError(
            f"{index.where}: a two-stage Wan 2.2 pipeline (transformer_2, boundary_ratio) is not "
            "supported; Wan 2.1 T2V folders have one transformer"
        )
    if index.raw.get("expand_timesteps"):
        raise F.UnsupportedPipelineError(
            f"{index.where}: expand_timesteps (Wan 2.2 TI2V per-token timesteps) is not supported"
        )
    paths = {}
    for component in COMPONENTS:
        entry = index.raw.get(component)
        if not (isinstance(entry, list) and len(entry) == 2 and all(entry)):
            raise F.MissingComponentError(
                f"{index.where} lists no {component!r} component; a {PIPELINE_CLASS} needs "
                + ", ".join(COMPONENTS)
            )
        sub = folder / component
        if not sub.is_dir():
            raise F.MissingComponentError(
                f"{_LOADER}: pipeline folder {folder} has no {component}/ sub-folder, which "
                f"{F.MODEL_INDEX_NAME} lists as {entry[1]}; download the whole pipeline"
            )
        if component in ("transformer", "vae", "text_encoder"):
            checkpoint.require_file(sub, checkpoint.CONFIG_NAME, _LOADER)
            F.find_component_weights(sub, entry[0], _LOADER)
        paths[component] = sub
    return VideoFolder(path=folder, **paths)


@dataclasses.dataclass(frozen=True, kw_only=True)
class UniPCFlowConfig:
    """The parts of a ``UniPCMultistepScheduler`` config with ``use_flow_sigmas`` (the
    scheduler of the hub's Wan 2.1 folders) that set its sigmas."""

    num_train_timesteps: int = 1000
    flow_shift: float = 1.0
    final_sigmas_type: str = "zero"


def unipc_flow_grid(config: UniPCFlowConfig, num_steps: int) -> np.ndarray:
    """``float32[K + 1]`` the sigmas of ``UniPCMultistepScheduler.set_timesteps(K)`` with
    ``use_flow_sigmas`` (diffusers 0.4x): ``linspace(1, 1 / T, K + 1)[:-1]`` statically shifted
    by ``flow_shift`` (a first sigma within 1e-6 of 1 lowered by 1e-6, as diffusers does), then
    the final sigma (0 for ``final_sigmas_type = "zero"``, else the last one)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps}")
    n, shift = config.num_train_timesteps, config.flow_shift
    sigmas = np.linspace(1, 1 / n, num_steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if np.fabs(sigmas[0] - 1) < 1e-6:
        sigmas[0] -= 1e-6
    last = 0.0 if config.final_sigmas_type == "zero" else sigmas[-1]
    return np.concatenate([sigmas, [last]]).astype(np.float32)


_UNIPC_IGNORED = {
    # Keys that do not change the flow sigmas (the solver's own settings, VP betas it ignores
    # with use_flow_sigmas).
    "beta_end", "beta_schedule", "beta_start", "disable_corrector", "dynamic_thresholding_ratio",
    "lower_order_final", "predict_x0", "prediction_type", "rescale_betas_zero_snr",
    "sample_max_value", "solver_order", "solver_p", "solver_type", "steps_offset",
    "thresholding", "timestep_spacing", "trained_betas", "use_flow_sigmas",
}  # fmt: skip
_UNIPC_REFUSED = (
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_dynamic_shifting",
    "shift_terminal", "sigma_min", "sigma_max",
)  # fmt: skip


def read_video_scheduler(path: Path) -> FlowMatchConfig | UniPCFlowConfig:
    """A Wan folder's scheduler: ``FlowMatchEulerDiscreteScheduler`` (static shift) or
    ``UniPCMultistepScheduler`` with ``use_flow_sigmas``.

    Raises:
        UnsupportedSchedulerError: another scheduler, a UniPC config without flow sigmas or with
            options that move them, or dynamic shifting (``WanPipeline`` passes no ``mu``).
    """
    file = checkpoint.read_config_file(path, _LOADER, SCHEDULER_CONFIG_NAME)
    name = file.raw.get("_class_name")
    if name == "UniPCMultistepScheduler":
        raw = file.raw
        refused = [k for k in _UNIPC_REFUSED if raw.get(k)]
        if not raw.get("use_flow_sigmas") or raw.get("prediction_type") != "flow_prediction":
            refused.append("use_flow_sigmas false or prediction_type not flow_prediction")
        fields = {f.name for f in dataclasses.fields(UniPCFlowConfig)}
        known = fields | _UNIPC_IGNORED | set(_UNIPC_REFUSED) | {"time_shift_type"}
        unknown = sorted(k for k in raw if not k.startswith("_") and k not in known)
        refused += [f"unknown key {k!r}" for k in unknown]
        if raw.get("final_sigmas_type", "zero") not in ("zero", "sigma_min"):
            refused.append(f"final_sigmas_type {raw['final_sigmas_type']!r}")
        if refused:
            raise UnsupportedSchedulerError(
                f"{file.where}: only UniPC's flow-matching sigmas with a static flow_shift are "
                f"reproduced; refused: {', '.join(refused)}"
            )
        file.check({"num_train_timesteps": int, "flow_shift": float, "final_sigmas_type": str})
        return UniPCFlowConfig(**{k: v for k, v in raw.items() if k in fields})
    config = read_scheduler_config(path, _LOADER)
    if config.use_dynamic_shifting:
        raise UnsupportedSchedulerError(
            f"{file.where}: use_dynamic_shifting needs a mu that WanPipeline never passes (its "
            "scheduler call would fail); use a static shift"
        )
    return config


# --------------------------------------------------------------------------- the pipeline


@dataclasses.dataclass(frozen=True)
class VideoLatents:
    """How video sizes map to latent sizes (from the VAE's config).

    Attributes:
        channels: ``z_dim``.
        temporal: ``s_t``, frames per latent frame after the first.
        spatial: ``s_s``, pixels per latent pixel.
        mean, std: per-channel ``latents_mean`` / ``latents_std``.
    """

    channels: int
    temporal: int
    spatial: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


def video_latents(config: WanVAEConfig) -> VideoLatents:
    """The latent geometry and normalisation of a Wan VAE config."""
    return VideoLatents(
        config.z_dim,
        config.temporal_factor,
        config.spatial_factor,
        tuple(float(m) for m in config.latents_mean),
        tuple(float(v) for v in config.latents_std),
    )


Stats = tuple[tuple[float, ...], tuple[float, ...]]


@functools.partial(jax.jit, static_argnames="stats")
def _decode(vae: Split, latents: Array, stats: Stats) -> Array:
    """Normalised latents -> ``float32`` video in ``[-1, 1]`` (``stats`` = mean, std)."""
    shape = (1, len(stats[0]), 1, 1, 1)
    mean = jnp.asarray(stats[0], latents.dtype).reshape(shape)
    std = jnp.asarray(stats[1], latents.dtype).reshape(shape)
    video = nnx.merge(*vae).decode(latents * std + mean)
    return jnp.clip(video.astype(jnp.float32), -1.0, 1.0)


class DecodedVideoRewardParams(NamedTuple):
    """``vae``: ``nnx.split`` of the video VAE; ``video``: the video reward's own params."""

    vae: Split
    video: Any


@dataclasses.dataclass(frozen=True)
class DecodedVideoReward:
    """Apply of :func:`decoded_video_reward`: ``video_apply(params.video, decode(x), cond)``.

    Attributes:
        video_apply: the reward on decoded videos.
        stats: the VAE's ``(latents_mean, latents_std)`` (static, hashable).
    """

    video_apply: Any
    stats: Stats

    def __call__(self, params: DecodedVideoRewardParams, x: Array, cond: Any = None) -> Array:
        return self.video_apply(params.video, _decode(params.vae, x, self.stats), cond)


def decoded_video_reward(
    pipeline: TextToVideoPipeline, video_apply: Any, video_params: Any = None, name: str = "video"
) -> Reward:
    """A :class:`~tts_jax.rewards.base.Reward` on video latents from a reward on decoded videos
    (the video counterpart of :func:`~tts_jax.models.pipelines.text_to_image.decoded_reward`).

    Args:
        pipeline: gives the VAE (its weights become leaves of the reward's params).
        video_apply: ``(video_params, video float32[N, 3, T, H, W] in [-1, 1], cond) -> [N]``, a
            module-level function or frozen dataclass.
        video_params: its params pytree.
        name: the reward's name.
    """
    stats = (pipeline.latents.mean, pipeline.latents.std)
    params = DecodedVideoRewardParams(pipeline.vae_params, video_params)
    return Reward(params, DecodedVideoReward(video_apply, stats), name)


@dataclasses.dataclass(frozen=True, eq=False)
class TextToVideoPipeline:
    """A loaded Wan 2.1 text-to-video pipeline (module docstring).

    Attributes:
        folder: the checked :class:`VideoFolder`.
        dtype: parameter and compute dtype of every network.
        transformer_config: :class:`~tts_jax.models.wan.WanConfig`.
        transformer_params: ``nnx.split`` of the transformer.
        latents: :class:`VideoLatents` (the VAE's geometry and normalisation).
        vae_params: ``nnx.split`` of the video VAE (:class:`~tts_jax.models.wan_vae.WanVAE`).
        prompt_encoder: :class:`UMT5PromptEncoder`.
        scheduler: the scheduler config.
    """

    folder: VideoFolder
    dtype: Any
    transformer_config: WanConfig
    transformer_params: Split
    latents: VideoLatents
    vae_params: Split
    prompt_encoder: UMT5PromptEncoder
    scheduler: FlowMatchConfig | UniPCFlowConfig

    @property
    def latent_channels(self) -> int:
        return self.latents.channels

    @property
    def max_sequence_length(self) -> int:
        return self.prompt_encoder.max_sequence_length

    def latent_shape(
        self, frames: int | None = None, height: int | None = None, width: int | None = None
    ) -> tuple[int, int, int, int]:
        """``(C, F, h, w)`` of the latents of a video ``frames x height x width`` (defaults
        :data:`DEFAULT_SIZE`): ``F = 1 + (frames - 1) / s_t``, ``h = height / s_s``.

        Raises:
            ValueError: a frame count other than ``1 + s_t k`` or a height / width that is not a
                multiple of ``s_s`` times the transformer's patch (naming the nearest valid
                values).
        """
        d_frames, d_height, d_width = DEFAULT_SIZE
        frames = d_frames if frames is None else frames
        height = d_height if height is None else height
        width = d_width if width is None else width
        g = self.latents
        if not isinstance(frames, (int, np.integer)) or frames < 1 or (frames - 1) % g.temporal:
            k = max(0, (int(frames) - 1) // g.temporal) if isinstance(frames, int) else 0
            near = ", ".join(str(1 + g.temporal * i) for i in range(max(0, k - 1), k + 3))
            raise ValueError(
                f"a Wan video has 1 + {g.temporal} k frames (the VAE's temporal factor is "
                f"{g.temporal}); valid counts: 1, {1 + g.temporal}, ... (near it: {near}), "
                f"got {frames!r}"
            )
        _, ph, pw = self.transformer_config.patch_size
        for axis, size, patch in (("height", height, ph), ("width", width, pw)):
            step = g.spatial * patch
            if not isinstance(size, (int, np.integer)) or size < step or size % step:
                low = max(step, int(size) // step * step) if isinstance(size, int) else step
                raise ValueError(
                    f"the video {axis} must be a positive multiple of {step} (VAE factor "
                    f"{g.spatial} x patch {patch}), e.g. {low} or {low + step}; got {size!r}"
                )
        f = 1 + (int(frames) - 1) // g.temporal
        return (g.channels, f, int(height) // g.spatial, int(width) // g.spatial)

    def encode_prompt(
        self, prompts: str | list[str], negative_prompts: str | list[str] | None = None
    ) -> TextCondition:
        """The ``cond`` of :meth:`flow` for ``B`` prompts (leading axis ``B``), as
        ``WanPipeline.encode_prompt`` builds it (:meth:`UMT5PromptEncoder.encode`)."""
        return self.prompt_encoder.encode(prompts, negative_prompts)

    def flow(
        self,
        frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
        *,
        guidance_scale: float | None = None,
        cfg: bool | None = None,
    ) -> FlowModel:
        """The prompt-conditioned flow for videos ``frames x height x width`` (defaults
        :data:`DEFAULT_SIZE`).

        Args:
            frames, height, width: video size (the latent size is :meth:`latent_shape`).
            guidance_scale: default :data:`DEFAULT_GUIDANCE` (5.0).
            cfg: run classifier-free guidance (default: ``guidance_scale > 1``).

        Returns:
            :class:`~tts_jax.models.base.FlowModel` on the ``Linear`` path, ``apply(params, x
            [N, C, F, h, w], t [N], cond: TextCondition) -> [N, C, F, h, w]``.
        """
        scale = DEFAULT_GUIDANCE if guidance_scale is None else guidance_scale
        apply = WanVelocity(bool(scale > 1) if cfg is None else bool(cfg))
        params = T2IFlowParams(self.transformer_params, jnp.asarray(scale, jnp.float32))
        return FlowModel(params, apply, Linear(), self.latent_shape(frames, height, width))

    def grid(
        self,
        num_steps: int,
        frames: int | None = None,
        height: int | None = None,
        width: int | None = None,
    ) -> Array:
        """``float32[K + 1]`` the scheduler's sigmas for ``K = num_steps`` steps, decreasing to
        0 (Wan's shift does not depend on the size; the sizes are checked and otherwise
        unused)."""
        if frames is not None or height is not None or width is not None:
            self.latent_shape(frames, height, width)
        if isinstance(self.scheduler, UniPCFlowConfig):
            return jnp.asarray(unipc_flow_grid(self.scheduler, int(num_steps)))
        return jnp.asarray(flow_grid(self.scheduler, int(num_steps)).sigmas, jnp.float32)

    def decode(self, latents: Array) -> Array:
        """Latents ``[N, C, F, h, w]`` -> video ``float32[N, 3, 1 + s_t (F - 1), s_s h, s_s w]``
        in ``[-1, 1]``: ``vae.decode(latents * std + mean)`` (jitted; the VAE decodes one latent
        frame at a time with its causal caches)."""
        stats = (self.latents.mean, self.latents.std)
        return _decode(self.vae_params, jnp.asarray(latents), stats)


def load_text_to_video(
    path_or_hub_id: str | Path,
    dtype: Any = jnp.float32,
    *,
    max_sequence_length: int = DEFAULT_MAX_SEQUENCE_LENGTH,
) -> TextToVideoPipeline:
    """Load a Wan 2.1 text-to-video (``WanPipeline``) diffusers folder.

    Args:
        path_or_hub_id: a local pipeline folder, or a hub id fetched with
            :func:`~tts_jax.models.pipelines.folder.resolve_pipeline`.
        dtype: parameter and compute dtype (``jnp.float32`` or ``jnp.bfloat16``) of the
            transformer, the UMT5 encoder and the VAE.
        max_sequence_length: UMT5 prompt length (``WanPipeline``'s default 512); it must match
            the diffusers call's to reproduce its videos.

    Returns:
        :class:`TextToVideoPipeline`.

    Raises:
        NotAPipelineFolderError, UnsupportedPipelineError, MissingComponentError,
        PickleWeightsError, HubUnreachableError: the folder (see :func:`read_video_folder`).
        UnsupportedSchedulerError: a scheduler the grid does not reproduce.
        CheckpointNotFoundError, CheckpointConfigError, TensorMismatchError: a component's
            files, config or tensors (named by the component loaders).
    """
    if max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be positive, got {max_sequence_length}")
    folder = read_video_folder(F.resolve_pipeline(path_or_hub_id))
    scheduler = read_video_scheduler(folder.scheduler)
    config, transformer = load_wan(folder.transformer, dtype)
    vae = load_wan_vae(folder.vae, dtype)
    latents = video_latents(vae.config)
    if latents.channels != config.in_channels:
        raise checkpoint.CheckpointConfigError(
            f"{_LOADER}: the VAE's z_dim {latents.channels} differs from the transformer's "
            f"in_channels {config.in_channels} in {folder.path}"
        )
    encoder = load_t5_encoder(folder.text_encoder, dtype, loader=_LOADER)
    if encoder.config.d_model != config.text_dim:
        raise checkpoint.CheckpointConfigError(
            f"{_LOADER}: the text encoder's d_model {encoder.config.d_model} differs from the "
            f"transformer's text_dim {config.text_dim} in {folder.path}"
        )
    prompt_encoder = UMT5PromptEncoder(
        load_tokenizer(folder.tokenizer, "t5"), nnx.split(encoder), int(max_sequence_length)
    )
    return TextToVideoPipeline(
        folder=folder,
        dtype=dtype,
        transformer_config=config,
        transformer_params=nnx.split(transformer),
        latents=latents,
        vae_params=nnx.split(vae),
        prompt_encoder=prompt_encoder,
        scheduler=scheduler,
    )
