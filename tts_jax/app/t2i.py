"""The text-to-image task of the CLI: ``tts-jax run t2i-<method> --pipeline ... --prompt ...``.

A ``t2i`` run steers an SD3 / SD3.5 or FLUX.1 pipeline
(:mod:`tts_jax.models.pipelines.text_to_image`) toward rewards on the decoded images, with any
image method of :data:`tts_jax.app.experiment.METHODS`:

* the search methods (``single``, ``bon``, ``zo``, ``paths``) solve the probability-flow ODE on the
  pipeline's own time grid (its shifted sigmas: diffusers' Euler scheduler step for step);
* the SDE methods (``fk``, ``smc``, ``svdd``, ``code``, ``rbf``) run the flow converted to the VP
  path (:func:`tts_jax.models.base.linear_to_vp`, as for the digits model) on the VP times of the
  same signal-to-noise ratios as the pipeline's sigmas (:func:`vp_times`), ``g = norm t^2``.

Rewards come from ``--reward SPEC`` (:mod:`tts_jax.app.reward_specs`); every reward that reads
text gets the run's prompt. Several ``--reward`` form one steering reward, by ``--ensemble``:

* ``mean`` (default): the weighted mean ``sum_i w_i r_i(x) / sum_i w_i`` (``weight=`` in a spec,
  default 1) of the members' raw values, a fixed function of each image, so a valid potential for
  every method (FK / SMC weights included). Members on different scales (PickScore ~20, CLIPScore
  ~0.7) need weights to count alike.
* ``rank``: the mean within-batch rank (:func:`tts_jax.rewards.ensemble.mean_rank_ensemble`, Ma
  et al. 2025): scale-free but relative to the batch, so only for the methods whose selections
  compare scores of one reward call (``single``, ``bon``, ``zo``, ``paths``); refused otherwise.

Every member is also reported on its own in ``result.json`` (``reward_members``), and every
``--held-out SPEC`` (never optimized) as ``<name>_best`` / ``<name>_mean``.

Defaults follow the pipeline (read from its folder before anything is loaded): SD3 28 steps at
guidance 7.0; FLUX.1-dev (``guidance_embeds``) 28 steps at guidance 3.5; FLUX.1-schnell 4 steps
without guidance; the pipeline's default image size; the pipeline's T5 prompt length (SD3 256,
FLUX 512); a budget of 4 trajectories (8 for ``paths`` and ``rbf``, :data:`TRAJECTORIES`);
bfloat16 networks.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax import interpolants as I
from tts_jax.app import reward_specs
from tts_jax.app.experiment import Bundle, RunConfig
from tts_jax.rewards.base import Reward
from tts_jax.rewards.ensemble import mean_rank_ensemble

T2I = "t2i"
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ENSEMBLES = ("mean", "rank")
RANK_METHODS = frozenset({"single", "bon", "zo", "paths"})
"""Methods whose selections compare only scores of one reward call (a rank ensemble is valid)."""
OPTIONS = frozenset(
    {
        "pipeline",
        "prompt",
        "negative_prompt",
        "reward",
        "held_out",
        "ensemble",
        "height",
        "width",
        "guidance",
        "dtype",
        "max_sequence_length",
    }
)
"""Config fields every ``t2i-<method>`` preset reads (besides the method's)."""
TRAJECTORIES = {"single": 1, "paths": 8, "rbf": 8}
"""The default budget in trajectories of ``num_steps``: 4, but 8 for ``paths`` and ``rbf``
(their minimum exceeds 4 trajectories: 150 NFE at 28 steps for ``paths``, 20 at 4 for ``rbf``)."""
DEFAULT_STEPS = {"sd3": 28, "flux-dev": 28, "flux-schnell": 4}
DEFAULT_GUIDANCE = {"sd3": 7.0, "flux-dev": 3.5, "flux-schnell": None}
DEFAULT_MAX_SEQUENCE_LENGTH = {"sd3": 256, "flux": 512}
FLUX_DEFAULT_SAMPLE_SIZE = 128


@dataclasses.dataclass(frozen=True, kw_only=True)
class T2IRunConfig(RunConfig):
    """A text-to-image run: :class:`~tts_jax.app.experiment.RunConfig` plus the pipeline, the
    prompt and the rewards (resolved by :func:`resolve_config`; see the module docstring).

    Attributes:
        pipeline: a local pipeline folder (absolute) or a hub id.
        prompt: the text prompt (every text-reading reward gets it too).
        negative_prompt: SD3's negative prompt (``None``: ``""``, diffusers' default).
        reward: canonical steering reward specs (:mod:`tts_jax.app.reward_specs`).
        held_out: canonical held-out reward specs.
        ensemble: ``mean`` or ``rank`` (module docstring).
        height, width: image size in pixels.
        guidance: guidance scale (``None`` for FLUX.1-schnell, which has none).
        dtype: ``float32`` or ``bfloat16`` (the pipeline's and the rewards' networks).
        max_sequence_length: T5 prompt length.
    """

    model: str = T2I
    pipeline: str = ""
    prompt: str = ""
    negative_prompt: str | None = None
    reward: tuple[str, ...] = ()
    held_out: tuple[str, ...] = ()
    ensemble: str = "mean"
    height: int = 1024
    width: int = 1024
    guidance: float | None = None
    dtype: str = "bfloat16"
    max_sequence_length: int = 256

    def __post_init__(self):
        super().__post_init__()
        if not self.pipeline:
            raise ValueError("a t2i run needs --pipeline DIR_OR_HUB_ID")
        if not self.prompt:
            raise ValueError("a t2i run needs --prompt TEXT")
        if not self.reward:
            raise ValueError(f"a t2i run needs --reward SPEC; kinds: {reward_specs.kinds_text()}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"ensemble must be one of {ENSEMBLES}, got {self.ensemble!r}")
        if self.ensemble == "rank" and self.method not in RANK_METHODS:
            raise ValueError(
                f"--ensemble rank is relative to each reward batch, not a fixed potential; "
                f"{self.method} needs one: use --ensemble mean (rank works with "
                f"{', '.join(sorted(RANK_METHODS))})"
            )
        for name in ("height", "width", "max_sequence_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.guidance is not None and not np.isfinite(self.guidance):
            raise ValueError(f"guidance must be a finite number, got {self.guidance}")


# --------------------------------------------------------------------------- config


def pipeline_variant(path_or_hub_id: str) -> tuple[str, Path, int]:
    """``(variant, local folder, default image size)`` of a pipeline, read from its configs only.

    ``variant`` is ``sd3``, ``flux-dev`` (``guidance_embeds``) or ``flux-schnell``.

    Raises:
        CheckpointNotFoundError, NotAPipelineFolderError, HubUnreachableError, ...: the named
            errors of :mod:`tts_jax.models.pipelines.folder`.
    """
    from tts_jax.models.pipelines.folder import read_pipeline_folder, resolve_pipeline

    folder = read_pipeline_folder(resolve_pipeline(path_or_hub_id))
    transformer = json.loads((folder.transformer / "config.json").read_text())
    vae = json.loads((folder.vae / "config.json").read_text())
    scale = 2 ** (len(vae.get("block_out_channels", (0, 0, 0, 0))) - 1)
    if folder.kind == "sd3":
        return "sd3", folder.path, int(transformer.get("sample_size", 128)) * scale
    dev = bool(transformer.get("guidance_embeds", False))
    return ("flux-dev" if dev else "flux-schnell"), folder.path, FLUX_DEFAULT_SAMPLE_SIZE * scale


def resolve_config(method: str, given: dict[str, Any]) -> T2IRunConfig:
    """The resolved config of ``t2i-<method>``: RunConfig < the pipeline's defaults < flags.

    Raises:
        ValueError / FileNotFoundError: a missing option, a bad reward spec
            (:class:`~tts_jax.app.reward_specs.RewardSpecError`), a missing pipeline folder, an
            option the pipeline does not take (``--guidance`` for schnell, ``--negative-prompt``
            for FLUX, ``--ensemble`` with one reward).
    """
    given = dict(given)
    needs = {
        "pipeline": "--pipeline DIR_OR_HUB_ID (a diffusers SD3 / FLUX folder or hub id)",
        "prompt": "--prompt TEXT",
        "reward": f"--reward SPEC (kinds: {reward_specs.kinds_text()})",
    }
    for name, flag in needs.items():
        if not given.get(name):
            raise ValueError(f"t2i-{method} needs {flag}")
    steer = reward_specs.parse_specs(given["reward"], "--reward")
    held = reward_specs.parse_specs(given.get("held_out", ()), "--held-out")
    given["reward"] = tuple(s.text for s in steer)
    given["held_out"] = tuple(s.text for s in held)
    if "ensemble" in given and len(steer) < 2:
        raise ValueError("--ensemble combines several --reward specs; this run has one")
    variant, folder, size = pipeline_variant(given["pipeline"])
    if Path(given["pipeline"]).expanduser().exists():
        given["pipeline"] = str(folder.resolve())
    if variant == "flux-schnell" and given.get("guidance") is not None:
        raise ValueError("--guidance does not apply to FLUX.1-schnell (it has no guidance)")
    if variant != "sd3" and given.get("negative_prompt") is not None:
        raise ValueError("--negative-prompt does not apply to FLUX (it takes no negative prompt)")
    steps = given.get("num_steps", DEFAULT_STEPS[variant])
    defaults = {
        "num_steps": steps,
        "budget": TRAJECTORIES.get(method, 4) * steps,
        "guidance": DEFAULT_GUIDANCE[variant],
        "height": size,
        "width": size,
        "max_sequence_length": DEFAULT_MAX_SEQUENCE_LENGTH[variant.split("-")[0]],
    }
    return T2IRunConfig(**{**defaults, **given, "model": T2I, "method": method})


# --------------------------------------------------------------------------- the bundle


def vp_times(sigmas: Any, vp: I.VP = I.VP()) -> jax.Array:
    """VP times ``r`` with the signal-to-noise ratios of linear-path times ``sigmas``
    (``t = sigma_vp(r) / (alpha_vp(r) + sigma_vp(r))``, :class:`~tts_jax.interpolants.LinearToVP`):
    the grid of a VP-converted flow that visits the pipeline's noise levels.

    The VP path ends at ``r = 1`` (``t ~ 0.9935`` with the default ``VP``); the leading sigmas
    noisier than that (many steps with a large shift: FLUX.1-dev at 50 steps) would all map to 1,
    so they are spread evenly between 1 and the first time below it, keeping ``K`` steps.

    Raises:
        ValueError: ``sigmas`` not strictly decreasing.
    """
    t = np.asarray(sigmas, np.float64)
    if np.any(np.diff(t) >= 0):
        raise ValueError(f"sigmas must decrease strictly, got {t.round(4).tolist()}")
    with np.errstate(divide="ignore"):
        ratio = t / (1.0 - t)  # sigma / alpha on the VP path
    total = np.log1p(np.square(ratio))  # T(r) = -log alpha^2
    b = vp.b_max - vp.b_min
    r = np.minimum((-vp.b_min + np.sqrt(vp.b_min**2 + 2.0 * b * total)) / b, 1.0)
    first = int(np.argmax(r < 1.0))  # first time below the VP end (the data end 0 always is)
    if first > 1:
        r[:first] = np.linspace(1.0, r[first], first + 1)[:-1]
    return jnp.asarray(r, jnp.float32)


@dataclasses.dataclass(frozen=True)
class _WeightedMean:
    """Static apply of the ``mean`` ensemble: ``sum_i w_i r_i / sum_i w_i`` (weights a leaf)."""

    applies: tuple

    def __call__(self, params: tuple, x: jax.Array, cond: Any) -> jax.Array:
        weights, members = params
        values = jnp.stack([f(p, x, cond) for f, p in zip(self.applies, members, strict=True)])
        w = weights.astype(jnp.float32)
        return jnp.tensordot(w, values.astype(jnp.float32), axes=1) / jnp.sum(w)


def weighted_mean(rewards: list[Reward], weights: list[float], name: str = "mean") -> Reward:
    """The ``mean`` ensemble of ``rewards`` (module docstring)."""
    params = (jnp.asarray(weights, jnp.float32), tuple(r.params for r in rewards))
    return Reward(params, _WeightedMean(tuple(r.apply for r in rewards)), name)


def jitted(reward: Reward) -> Reward:
    """``reward`` with its apply jitted: evaluated eagerly (held-out rewards, ensemble members on
    the returned images) it compiles once instead of dispatching every op of its networks, and
    rewards of one apply and shapes (CLIPScore and PickScore of one CLIP size) share it."""
    return Reward(reward.params, _Jitted(reward.apply), reward.name)


@dataclasses.dataclass(frozen=True)
class _Jitted:
    """Static apply of :func:`jitted`."""

    apply: Any

    def __call__(self, params: Any, x: jax.Array, cond: Any) -> jax.Array:
        return _call(self.apply, params, x, cond)


@functools.partial(jax.jit, static_argnums=0)
def _call(apply: Any, params: Any, x: jax.Array, cond: Any) -> jax.Array:
    return apply(params, x, cond)


def steering_reward(members: list[Reward], specs, ensemble: str) -> Reward:
    """One reward on images from the members (itself when there is one)."""
    if len(members) == 1:
        return members[0]
    if ensemble == "rank":
        return mean_rank_ensemble(members, "mean_rank")
    return weighted_mean(members, [s.weight for s in specs])


def build_bundle(config: T2IRunConfig) -> Bundle:
    """Load the pipeline and the rewards of ``config`` (module docstring)."""
    from tts_jax.models.pipelines.text_to_image import decoded_reward, load_text_to_image

    dtype = DTYPES[config.dtype]
    pipe = load_text_to_image(
        config.pipeline, dtype, max_sequence_length=config.max_sequence_length
    )
    cond = pipe.encode_prompt(config.prompt, config.negative_prompt)
    flow = pipe.flow(config.height, config.width, guidance_scale=config.guidance)
    steer = [reward_specs.parse_spec(s) for s in config.reward]
    held = [reward_specs.parse_spec(s) for s in config.held_out]
    members = [
        reward_specs.build_image_reward(s, config.prompt, dtype, n)
        for s, n in zip(steer, reward_specs.unique_names(steer), strict=True)
    ]
    image_reward = steering_reward(members, steer, config.ensemble)

    held_out = {
        n: jitted(reward_specs.build_image_reward(s, config.prompt, dtype, n))
        for s, n in zip(held, reward_specs.unique_names(held), strict=True)
    }
    steering = decoded_reward(pipe, image_reward.apply, image_reward.params, image_reward.name)
    return Bundle(
        flow,
        steering,
        held_out,
        cond,
        grid=pipe.grid(config.num_steps, config.height, config.width),
        decode=pipe.decode,
        members={m.name: jitted(m) for m in members} if len(members) > 1 else {},
        record={
            "pipeline_kind": pipe.kind,
            "pipeline_folder": str(pipe.folder.path),
            "latent_shape": list(flow.sample_shape),
            "prompt": config.prompt,
            "reward_specs": list(config.reward),
            "held_out_specs": list(config.held_out),
            "ensemble": config.ensemble if len(members) > 1 else None,
        },
    )
