"""Memory plan of FK steering on a real text-to-image pipeline, without its weights, and the
``tts-jax plan`` command (which also plans LM policy + PRM pairs: :mod:`tts_jax.app.plan_lm`;
:func:`plan_kind` picks the planner from the config's layout).

``tts-jax plan --config flux-schnell --height 1024 --width 1024`` answers "how many particles fit on
my accelerator?" before anything is downloaded: the pipeline's networks are built from the configs
shipped in ``tts_jax/assets/configs/<name>/`` (the public diffusers ``config.json`` files of
FLUX.1-dev, FLUX.1-schnell, SD3.5-large and SD3.5-medium; no weights) as **abstract** modules
(``nnx.eval_shape``: every parameter a ``jax.ShapeDtypeStruct``, nothing materialised), and FK
steering (:mod:`tts_jax.samplers.image.fk_steering`) is lowered and compiled on those shapes for
each particle count. The compiled program's ``memory_analysis()`` gives the argument (weights, key),
output and temporary (activations, particle state) sizes.

Two programs can be compiled (``mode``):

* ``"run"``: the whole FK run, ``jax.jit(run, static_argnames="sampler").lower(key, sampler,
  params).compile()``: init (one velocity), the ``lax.scan`` of steps (its body, one velocity and
  one reward, compiles once whatever the step count), the last step and the result.
* ``"step"`` (default): one FK step, ``jax.jit(sampler.step)`` on the abstract state of
  ``sampler.init``: the transformer appears once instead of twice (init and scan body), so it
  compiles faster (12B FLUX at 1024 px: 60-95 s per particle count on a loaded 2-core CPU; the
  run was not timed at that size); its temporaries are those of the scan body, the peak of a
  run, and its arguments include the particle state the run carries.

Assumptions behind the "fits" columns (state them with the numbers):

* The compiled **CPU** memory analysis stands in for the accelerator's, with one correction
  (:meth:`MemoryPlan.accelerator_bytes`). XLA CPU multiplies bfloat16 matrices in float32 and
  keeps float32 copies of the weights among its temporaries (tens of GiB for FLUX), which a
  GPU or TPU does not: the estimate counts the arguments (weights, particle state), the
  outputs and ``N`` times the temporaries per particle (the slope between the particle
  counts), not the CPU's fixed temporaries. The CPU program also materialises each
  attention's logits ``[N, heads, L, L]`` (float32) where a flash-attention kernel does not,
  so the per-particle part is an upper bound there (the ``attention logits`` column is one
  layer's, the largest single buffer for long sequences).
* Resident during sampling: the transformer's weights, the VAE decoder's (when the reward
  decodes), the particle state and the temporaries of a step. The text encoders (CLIP-L,
  CLIP-G, T5-XXL) run once per prompt before sampling and can be freed; their weights are
  listed apart (T5-XXL alone is 9.5 GB in bfloat16, so encoding itself needs that much).
* Capacities: one 80 GiB GPU (A100 / H100 80GB) and one 16 GiB TPU chip (v5e), the whole of it
  (a real run keeps some for the runtime and fragmentation).

The rewards planned: ``"decoded"`` (default) decodes the particles with the VAE and scores the
images with a free function (the memory of any decoded-image reward minus its own network),
``"latent"`` scores the latents (the flow alone).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import tyro
from flax import nnx

from tts_jax import interpolants as I
from tts_jax.app import plan_lm
from tts_jax.models.clip import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
from tts_jax.models.flux import FluxConfig, FluxTransformer
from tts_jax.models.pipelines.prompts import TextCondition
from tts_jax.models.pipelines.schedule import FlowMatchConfig
from tts_jax.models.pipelines.text_to_image import (
    DEFAULT_MAX_SEQUENCE_LENGTH,
    TextToImagePipeline,
    decoded_reward,
)
from tts_jax.models.sd3 import SD3Config, SD3Transformer
from tts_jax.models.t5 import T5Config, T5EncoderModel
from tts_jax.models.vae import AutoencoderKL, VAEConfig
from tts_jax.rewards.base import Reward
from tts_jax.samplers.base import run
from tts_jax.samplers.image import fk_steering as fk

Array = jax.Array
CONFIGS = Path(__file__).resolve().parents[1] / "assets" / "configs"
"""Folder of the shipped pipeline configs, one sub-folder per name of :data:`PIPELINES`."""
PIPELINES = ("flux-dev", "flux-schnell", "sd35-large", "sd35-medium")
DEVICES = {"80 GiB GPU": 80 * 2**30, "16 GiB TPU": 16 * 2**30}
"""Capacities of the "fits" columns (bytes)."""
CLIP_LENGTH = 77
"""The real CLIP tokenizers' ``model_max_length`` (SD3's prompt is 77 CLIP + S T5 tokens)."""
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
GiB = 2**30


# --------------------------------------------------------------------------- abstract pipeline


def _bytes(tree: Any) -> int:
    """Total bytes of the array (or ``ShapeDtypeStruct``) leaves of ``tree``."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _abstract(build) -> tuple[nnx.GraphDef, nnx.State]:
    """``nnx.split`` of the module ``build()`` makes, built abstractly (ShapeDtypeStruct
    leaves, nothing allocated)."""
    return nnx.split(nnx.eval_shape(build))


def _read(folder: Path, name: str) -> dict[str, Any]:
    return json.loads((folder / name).read_text("utf-8"))


@dataclasses.dataclass(frozen=True, eq=False)
class AbstractPipeline:
    """A text-to-image pipeline's configs and abstract networks (no weights).

    Attributes:
        name: the config folder's name.
        pipeline: a :class:`~tts_jax.models.pipelines.text_to_image.TextToImagePipeline` whose
            transformer and VAE params are abstract (``flow``, ``grid``, ``latent_shape`` and
            :func:`~tts_jax.models.pipelines.text_to_image.decoded_reward` work; it has no
            folder and no prompt encoder).
        text_encoders: ``component -> abstract nnx.split`` of the text encoders.
        max_sequence_length: the T5 prompt length the condition is planned with.
    """

    name: str
    pipeline: TextToImagePipeline
    text_encoders: dict[str, tuple[nnx.GraphDef, nnx.State]]
    max_sequence_length: int

    @property
    def transformer_bytes(self) -> int:
        return _bytes(self.pipeline.transformer_params[1])

    @property
    def vae_bytes(self) -> int:
        """The VAE decoder's bytes (``decoder`` and ``post_quant_conv``: what decoding reads;
        the encoder is never called)."""
        state = self.pipeline.vae_params[1]
        return sum(_bytes(state[k]) for k in ("decoder", "post_quant_conv") if k in state)

    @property
    def text_encoder_bytes(self) -> dict[str, int]:
        return {name: _bytes(split[1]) for name, split in self.text_encoders.items()}

    def condition(self, cfg: bool) -> TextCondition:
        """The abstract ``cond`` of one prompt: SD3 ``[1, 77 + S, D]`` embeddings and ``[1, P]``
        pooled (and the negative prompt's when ``cfg``), FLUX ``[1, S, D]`` and ``[1, P]``."""
        pipe, dtype = self.pipeline, self.pipeline.dtype
        config = pipe.transformer_config
        seq = self.max_sequence_length + (CLIP_LENGTH if pipe.kind == "sd3" else 0)
        embeds = jax.ShapeDtypeStruct((1, seq, config.joint_attention_dim), dtype)
        pooled = jax.ShapeDtypeStruct((1, config.pooled_projection_dim), dtype)
        if pipe.kind == "sd3" and cfg:
            return TextCondition(embeds, pooled, embeds, pooled)
        return TextCondition(embeds, pooled)


def _text_encoder(folder: Path, dtype: Any) -> tuple[nnx.GraphDef, nnx.State]:
    raw = _read(folder, "config.json")
    if raw.get("model_type") == "t5":
        config = T5Config.from_hf_dict(raw)
        return _abstract(lambda: T5EncoderModel(config, rngs=nnx.Rngs(0), dtype=dtype))
    config = CLIPTextConfig.from_hf_dict(raw)
    projection = any(a.endswith("WithProjection") for a in raw.get("architectures") or ())
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _abstract(lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype))


def abstract_pipeline(
    config: str | Path,
    dtype: Any = jnp.bfloat16,
    *,
    max_sequence_length: int | None = None,
    text_encoders: bool = True,
) -> AbstractPipeline:
    """The abstract pipeline of a shipped config (a name of :data:`PIPELINES`) or of a folder
    laid out like a diffusers pipeline (``model_index.json``, ``transformer/config.json``,
    ``vae/config.json``, ``scheduler/scheduler_config.json``, ``text_encoder*/config.json``;
    weight files, if any, are not read).

    Args:
        config: name or folder.
        dtype: parameter dtype of every network (the VAE too, as ``load_vae`` casts it).
        max_sequence_length: T5 prompt length (default: the pipeline's, SD3 256, FLUX 512).
        text_encoders: also build the text encoders (only their sizes are reported).

    Raises:
        ValueError: an unknown name, or a config our classes refuse (``from_dict`` names it).
    """
    folder = Path(config)
    if not folder.is_dir():
        if str(config) not in PIPELINES:
            raise ValueError(f"unknown pipeline config {config!r}; shipped: {PIPELINES}")
        folder = CONFIGS / str(config)
    index = _read(folder, "model_index.json")
    kind = "flux" if index["_class_name"] == "FluxPipeline" else "sd3"
    raw = _read(folder, "transformer/config.json")
    if kind == "flux":
        t_config = FluxConfig.from_dict(raw)
        transformer = _abstract(lambda: FluxTransformer(t_config, dtype=dtype, rngs=nnx.Rngs(0)))
    else:
        t_config = SD3Config.from_dict(raw)
        transformer = _abstract(lambda: SD3Transformer(t_config, dtype=dtype, rngs=nnx.Rngs(0)))
    vae_config = VAEConfig.from_dict(_read(folder, "vae/config.json"))
    graph, state = _abstract(lambda: AutoencoderKL(vae_config, rngs=nnx.Rngs(0)))
    state = jax.tree.map(
        lambda x: (
            jax.ShapeDtypeStruct(x.shape, dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x
        ),
        state,
    )
    scheduler = FlowMatchConfig.from_dict(_read(folder, "scheduler/scheduler_config.json"))
    encoders = {}
    if text_encoders:
        for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if (folder / name / "config.json").exists():
                encoders[name] = _text_encoder(folder / name, dtype)
    pipeline = TextToImagePipeline(
        kind=kind,
        folder=None,
        dtype=dtype,
        transformer_config=t_config,
        transformer_params=transformer,
        vae_config=vae_config,
        vae_params=(graph, state),
        prompt_encoder=None,
        scheduler=scheduler,
    )
    length = DEFAULT_MAX_SEQUENCE_LENGTH[kind] if max_sequence_length is None else None
    length = max_sequence_length if length is None else length
    return AbstractPipeline(folder.name, pipeline, encoders, int(length))


# --------------------------------------------------------------------------- rewards


def mean_colour(params: Any, images: Array, cond: Any) -> Array:
    """A free image reward (minus the squared mean pixel): the planned reward's own cost is
    nil, the VAE decode before it is what :func:`decoded_reward` costs."""
    return -jnp.mean(jnp.square(images.mean(axis=(2, 3))), axis=-1)


def latent_energy(params: Any, x: Array, cond: Any) -> Array:
    """A free reward on the latents themselves (no decode)."""
    return -jnp.mean(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))


def plan_reward(pipe: AbstractPipeline, reward: Literal["decoded", "latent"]) -> Reward:
    """The reward FK steering is planned with (module docstring)."""
    if reward == "decoded":
        return decoded_reward(pipe.pipeline, mean_colour, None, "decoded")
    if reward == "latent":
        return Reward(None, latent_energy, "latent")
    raise ValueError(f"reward must be 'decoded' or 'latent', got {reward!r}")


# --------------------------------------------------------------------------- compiling


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """The compiled memory of FK steering at one particle count.

    Attributes:
        particles: ``N``.
        argument_bytes, output_bytes, temp_bytes, alias_bytes: ``memory_analysis()`` fields of
            the compiled program (arguments include the weights).
        weight_bytes: the flow's and reward's weights among the arguments (transformer, and
            the VAE when the reward decodes).
        attention_logits_bytes: float32 logits ``[B, heads, L, L]`` of one transformer layer
            (``B = 2N`` with classifier-free guidance): what a flash kernel does not store.
        compile_seconds: lowering plus compiling.
    """

    particles: int
    argument_bytes: int
    output_bytes: int
    temp_bytes: int
    alias_bytes: int
    weight_bytes: int
    attention_logits_bytes: int
    compile_seconds: float

    @property
    def peak_bytes(self) -> int:
        """Arguments + outputs + temporaries - aliased (donated) bytes: everything live at the
        CPU program's peak, as XLA counts it."""
        return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def attention_logits_bytes(
    pipe: AbstractPipeline, height: int, width: int, n: int, guidance_scale: float | None = None
) -> int:
    """Bytes of one layer's float32 attention logits for ``n`` particles (joint attention over
    image and text tokens; SD3 with CFG runs ``2n`` rows)."""
    p = pipe.pipeline
    _, h, w = p.latent_shape(height, width)
    patch = p.transformer_config.patch_size if p.kind == "sd3" else 2
    tokens = (h // patch) * (w // patch)
    text = pipe.max_sequence_length + (CLIP_LENGTH if p.kind == "sd3" else 0)
    rows = 2 * n if _cfg(p, guidance_scale) else n
    return rows * p.transformer_config.num_attention_heads * (tokens + text) ** 2 * 4


def _cfg(pipe: TextToImagePipeline, guidance_scale: float | None) -> bool:
    """Whether the flow runs classifier-free guidance (SD3 with a scale > 1, the default)."""
    if pipe.kind != "sd3":
        return False
    return guidance_scale is None or guidance_scale > 1


def fk_params(
    pipe: AbstractPipeline,
    height: int,
    width: int,
    num_steps: int,
    reward: Literal["decoded", "latent"] = "decoded",
    guidance_scale: float | None = None,
) -> fk.Params:
    """Abstract :class:`~tts_jax.samplers.image.fk_steering.Params` (weights are
    ``ShapeDtypeStruct``; the grid, ``lam``, schedule and diffusion are concrete, as small)."""
    p = pipe.pipeline
    flow = p.flow(height, width, guidance_scale=guidance_scale)
    cond = pipe.condition(_cfg(p, guidance_scale))
    grid = p.grid(num_steps, height, width)
    diffusion = I.diffusion("square", 1.0)
    return fk.make_params(flow, plan_reward(pipe, reward), grid, diffusion, 1.0, cond=cond)


def compile_fk(
    pipe: AbstractPipeline,
    height: int,
    width: int,
    n: int,
    num_steps: int,
    *,
    mode: Literal["step", "run"] = "step",
    reward: Literal["decoded", "latent"] = "decoded",
    guidance_scale: float | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> PlanRow:
    """Lower and compile FK steering (``mode``: one step or the whole run) for ``n`` particles
    on abstract weights; its :class:`PlanRow`."""
    params = fk_params(pipe, height, width, num_steps, reward, guidance_scale)
    sampler = fk.sampler(n, num_steps, "max", "multinomial")
    key = jax.random.key(0)
    start = time.perf_counter()
    if mode == "run":
        lowered = jax.jit(run, static_argnames="sampler").lower(key, sampler, params)
    elif mode == "step":
        state = jax.eval_shape(sampler.init, key, params)
        keys = jax.ShapeDtypeStruct((sampler.keys_per_step,), key.dtype)
        lowered = jax.jit(sampler.step).lower(keys, state, params)
    else:
        raise ValueError(f"mode must be 'step' or 'run', got {mode!r}")
    compiled = lowered.compile(compiler_options or {})
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    weights = pipe.transformer_bytes + (pipe.vae_bytes if reward == "decoded" else 0)
    return PlanRow(
        particles=n,
        argument_bytes=int(mem.argument_size_in_bytes),
        output_bytes=int(mem.output_size_in_bytes),
        temp_bytes=int(mem.temp_size_in_bytes),
        alias_bytes=int(mem.alias_size_in_bytes),
        weight_bytes=weights,
        attention_logits_bytes=attention_logits_bytes(pipe, height, width, n, guidance_scale),
        compile_seconds=seconds,
    )


# --------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """:func:`memory_plan`'s result: the pipeline, the conditions and one row per ``N``."""

    pipeline: AbstractPipeline
    height: int
    width: int
    num_steps: int
    dtype: str
    mode: str
    reward: str
    rows: tuple[PlanRow, ...]
    seconds: float

    @property
    def temp_per_particle(self) -> float:
        """Temporaries per particle: the slope between the smallest and the largest ``N``
        (``temp / N`` with one row, an upper bound)."""
        rows = sorted(self.rows, key=lambda r: r.particles)
        lo, hi = rows[0], rows[-1]
        if hi.particles == lo.particles:
            return hi.temp_bytes / hi.particles
        return (hi.temp_bytes - lo.temp_bytes) / (hi.particles - lo.particles)

    def accelerator_bytes(self, row: PlanRow) -> int:
        """Estimated bytes on a bfloat16 accelerator: arguments (weights, particle state) +
        outputs - aliased + ``N`` times :attr:`temp_per_particle`. The CPU program's fixed
        temporaries are left out: XLA CPU multiplies bfloat16 matrices in float32 and keeps
        float32 copies of the weights as temporaries (a lone bf16 ``4096 x 4096`` matmul: 64
        MiB of temporaries for its 32 MiB weight, 0 in float32), which a GPU or TPU does not;
        the rest of the fixed part (the prompt's stream at batch 1, tables) is small."""
        fixed = row.argument_bytes + row.output_bytes - row.alias_bytes
        return int(fixed + row.particles * self.temp_per_particle)

    def fits(self, row: PlanRow, capacity: int) -> bool:
        return self.accelerator_bytes(row) <= capacity

    def markdown(self) -> str:
        """The plan as markdown: the weights, then a table with one row per particle count."""
        p = self.pipeline
        c, h, w = p.pipeline.latent_shape(self.height, self.width)
        enc = ", ".join(f"{k} {v / GiB:.2f}" for k, v in p.text_encoder_bytes.items())
        lines = [
            f"**{p.name}**, {self.height}x{self.width} px (latents {c}x{h}x{w}), {self.dtype}, "
            f"FK steering ({self.mode}: {'one step' if self.mode == 'step' else 'whole run'} of "
            f"{self.num_steps}), reward `{self.reward}`; planned in {self.seconds:.0f} s.",
            "",
            f"Weights (GiB): transformer {p.transformer_bytes / GiB:.2f}, VAE decoder "
            f"{p.vae_bytes / GiB:.2f}; text encoders (run once per prompt, freed before "
            f"sampling): {enc or 'not built'}.",
            "",
            "| N | weights (GiB) | arguments (GiB) | CPU temporaries (GiB) | CPU peak (GiB) "
            "| accelerator estimate (GiB) | attention logits / layer (GiB) | "
            + " | ".join(f"fits {d}" for d in DEVICES)
            + " | compile (s) |",
            "|---" * (8 + len(DEVICES)) + "|",
        ]
        for r in self.rows:
            fits = " | ".join("yes" if self.fits(r, cap) else "no" for cap in DEVICES.values())
            lines.append(
                f"| {r.particles} | {r.weight_bytes / GiB:.2f} | {r.argument_bytes / GiB:.2f} "
                f"| {r.temp_bytes / GiB:.2f} | {r.peak_bytes / GiB:.2f} "
                f"| {self.accelerator_bytes(r) / GiB:.2f} "
                f"| {r.attention_logits_bytes / GiB:.2f} | {fits} | {r.compile_seconds:.0f} |"
            )
        lines += [
            "",
            f"Temporaries per particle {self.temp_per_particle / GiB:.2f} GiB (slope over N). "
            "Accelerator estimate = arguments + outputs + N x that slope: the CPU program's "
            "fixed temporaries (float32 copies of the bfloat16 weights XLA CPU makes for its "
            "matmuls) are left out; the slope still counts float32 attention logits that a "
            "flash-attention kernel does not store, so it is an upper bound there.",
        ]
        return "\n".join(lines)


def memory_plan(
    config: str | Path,
    height: int = 1024,
    width: int = 1024,
    particles: Sequence[int] = (1, 4, 8, 16),
    dtype: str = "bfloat16",
    num_steps: int = 4,
    *,
    mode: Literal["step", "run"] = "step",
    reward: Literal["decoded", "latent"] = "decoded",
    guidance_scale: float | None = None,
    max_sequence_length: int | None = None,
    compiler_options: dict[str, Any] | None = None,
) -> MemoryPlan:
    """Compile FK steering on the abstract pipeline ``config`` for each particle count.

    Args:
        config: a name of :data:`PIPELINES` or a pipeline folder (configs only).
        height, width: image size in pixels.
        particles: the particle counts ``N``.
        dtype: ``"bfloat16"`` or ``"float32"``.
        num_steps: FK steps (the run's scan body compiles once; ``mode="step"`` ignores it
            except in the grid).
        mode: ``"step"`` (one FK step) or ``"run"`` (the whole run).
        reward: ``"decoded"`` (VAE decode, then a free image reward) or ``"latent"``.
        guidance_scale: the pipeline's default if ``None`` (SD3 runs CFG, a ``2N`` batch).
        max_sequence_length: T5 prompt length (default the pipeline's).
        compiler_options: passed to XLA's ``compile``.

    Returns:
        :class:`MemoryPlan`.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    start = time.perf_counter()
    pipe = abstract_pipeline(config, DTYPES[dtype], max_sequence_length=max_sequence_length)
    rows = tuple(
        compile_fk(
            pipe,
            height,
            width,
            int(n),
            num_steps,
            mode=mode,
            reward=reward,
            guidance_scale=guidance_scale,
            compiler_options=compiler_options,
        )
        for n in particles
    )
    seconds = time.perf_counter() - start
    return MemoryPlan(pipe, height, width, num_steps, dtype, mode, reward, rows, seconds)


# --------------------------------------------------------------------------- command line

T2I_DEFAULTS = {
    "height": 1024,
    "width": 1024,
    "particles": (1, 4, 8, 16),
    "num_steps": 4,
    "mode": "step",
    "reward": "decoded",
}
"""Defaults of the text-to-image plan's options (:class:`Plan` leaves them ``None``)."""
LM_DEFAULTS = {
    "particles": (4, 16, 64),
    "max_new_tokens": 2048,
    "prompt_length": 512,
    "max_step_tokens": 256,
    "cache_dtype": "float32",
    "prm_scoring": "conversation",
    "prm_token_ratio": 2,
}
"""Defaults of the LM plan's options (:mod:`tts_jax.app.plan_lm`)."""
T2I_ONLY = ("height", "width", "num_steps", "mode", "reward", "guidance_scale")
LM_ONLY = (
    "max_new_tokens",
    "prompt_length",
    "max_step_tokens",
    "cache_dtype",
    "prm_scoring",
    "prm_token_ratio",
)


def plan_kind(config: str | Path) -> Literal["t2i", "lm"]:
    """Which planner a config is for: ``"t2i"`` (a diffusers pipeline layout with a
    ``model_index.json``) or ``"lm"`` (a policy + PRM pair with an ``lm_pair.json``).

    Raises:
        ValueError: a name that is neither shipped nor a folder of either layout.
    """
    folder = Path(config) if Path(config).is_dir() else CONFIGS / str(config)
    if (folder / "model_index.json").is_file():
        return "t2i"
    if (folder / plan_lm.PAIR_FILE).is_file():
        return "lm"
    raise ValueError(
        f"unknown plan config {config!r}; shipped: {PIPELINES + plan_lm.LM_PLANS}, or a folder "
        f"with model_index.json (text-to-image) or {plan_lm.PAIR_FILE} (LM policy + PRM)"
    )


_PER_KIND = tyro.conf.arg(help_behavior_hint="")
"""Options whose default depends on the config's kind (their help says it)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Plan:
    """Plan the memory of steering a real model from its shipped configs (no weights).

    Text-to-image configs (FLUX / SD3.5): builds the transformer and VAE abstractly, compiles
    FK steering on CPU for each particle count and prints the weights, the compiled CPU
    argument / temporary sizes and an accelerator estimate (without XLA CPU's float32 copies of
    bfloat16 weights; text encoders run once per prompt and are freed), and whether it fits one
    80 GiB GPU and one 16 GiB TPU chip. A 12B FLUX step takes a minute or more to compile.

    LM configs (a policy + PRM pair, e.g. qwen2.5-math-1.5b+prm-7b): compiles one step of
    step-level particle filtering with the cached PRM scorer and prints the weights, both KV
    caches (analytic, checked against the compiled step), temporaries, the fits columns and
    the largest particle count that fits each device (:mod:`tts_jax.app.plan_lm`).

    Options of the other kind are an error, never silently ignored.
    """

    config: Annotated[
        str,
        tyro.conf.arg(
            metavar="NAME|DIR",
            help="flux-dev | flux-schnell | sd35-large | sd35-medium | qwen2.5-math-1.5b+prm-7b, "
            "or a folder laid out as one of them (model_index.json or lm_pair.json, configs only)",
        ),
    ]
    particles: Annotated[tuple[int, ...] | None, _PER_KIND] = None
    """particle counts N to plan (default: 1 4 8 16 text-to-image, 4 16 64 LM)"""
    dtype: Literal["bfloat16", "float32"] = "bfloat16"
    """parameter and compute dtype"""
    height: Annotated[int | None, _PER_KIND] = None
    """text-to-image: image height in pixels (default 1024)"""
    width: Annotated[int | None, _PER_KIND] = None
    """text-to-image: image width in pixels (default 1024)"""
    num_steps: Annotated[int | None, _PER_KIND] = None
    """text-to-image: FK steps (the scan body compiles once; default 4)"""
    mode: Annotated[Literal["step", "run"] | None, _PER_KIND] = None
    """text-to-image: compile one FK step (default, faster) or the whole run"""
    reward: Annotated[Literal["decoded", "latent"] | None, _PER_KIND] = None
    """text-to-image: decoded (default): VAE decode + a free image reward; latent: a free
    reward on the latents"""
    guidance_scale: Annotated[float | None, _PER_KIND] = None
    """text-to-image: guidance scale (default: the pipeline's; SD3 > 1 runs CFG on 2N rows)"""
    max_new_tokens: Annotated[int | None, _PER_KIND] = None
    """LM: completion tokens per particle (default 2048; caches hold prompt + this)"""
    prompt_length: Annotated[int | None, _PER_KIND] = None
    """LM: prompt tokens (default 512)"""
    max_step_tokens: Annotated[int | None, _PER_KIND] = None
    """LM: token limit of one step, the PRM's window (default 256, the math runner's)"""
    cache_dtype: Annotated[Literal["bfloat16", "float32"] | None, _PER_KIND] = None
    """LM: dtype of both KV caches (default float32, what the samplers allocate today)"""
    prm_scoring: Annotated[Literal["conversation", "cached"] | None, _PER_KIND] = None
    """LM: how the PRM is fed: conversation (default; the model-card format, incrementally, as
    `tts-jax run lm-pf` does) or cached (the policy's own tokens)"""
    prm_token_ratio: Annotated[int | None, _PER_KIND] = None
    """LM: the conversation scorer's PRM tokens per policy token (default 2, the runner's)"""


def _resolved(cmd: Plan, kind: str) -> dict[str, Any]:
    """The options ``kind``'s planner reads, defaults filled in; an option of the other kind
    that was set is a ValueError naming it."""
    other, defaults = (LM_ONLY, T2I_DEFAULTS) if kind == "t2i" else (T2I_ONLY, LM_DEFAULTS)
    given = [f"--{name.replace('_', '-')}" for name in other if getattr(cmd, name) is not None]
    if given:
        raise ValueError(
            f"{', '.join(given)} do not apply to {cmd.config!r} (a "
            f"{'text-to-image' if kind == 't2i' else 'language-model'} plan)"
        )
    names = ("particles", "dtype") + (T2I_ONLY if kind == "t2i" else LM_ONLY)
    values = {name: getattr(cmd, name) for name in names}
    return {k: defaults.get(k) if v is None else v for k, v in values.items()}


def run_plan(cmd: Plan) -> MemoryPlan | plan_lm.LMMemoryPlan:
    """The handler of ``tts-jax plan``: choose the planner from the config's kind
    (:func:`plan_kind`), compute and print the plan (markdown)."""
    kind = plan_kind(cmd.config)
    o = _resolved(cmd, kind)
    if kind == "lm":
        result = plan_lm.memory_plan_lm(
            cmd.config,
            o["particles"],
            o["max_new_tokens"],
            o["dtype"],
            prompt_length=o["prompt_length"],
            max_step_tokens=o["max_step_tokens"],
            cache_dtype=o["cache_dtype"],
            scoring=dataclasses.replace(
                plan_lm.PRM_SCORINGS[o["prm_scoring"]], token_ratio=o["prm_token_ratio"]
            ),
        )
    else:
        result = memory_plan(
            cmd.config,
            o["height"],
            o["width"],
            o["particles"],
            o["dtype"],
            o["num_steps"],
            mode=o["mode"],
            reward=o["reward"],
            guidance_scale=o["guidance_scale"],
        )
    print(result.markdown())
    return result


def main(argv: list[str] | None = None) -> None:
    """``python -m tts_jax.app.plan --config NAME [options]`` (the same as ``tts-jax plan``)."""
    run_plan(tyro.cli(Plan, args=argv))


if __name__ == "__main__":
    main()
