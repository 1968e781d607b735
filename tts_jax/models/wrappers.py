"""DiT networks as :class:`~tts_jax.models.base.FlowModel` velocities (t = 1 noise, t = 0 data).

Two checkpoint conventions, both with class labels as ``cond`` (``[N]`` ints, or ``None`` for
unconditional sampling; the label ``config.null_class`` is the unconditional embedding):

* :func:`velocity_dit_flow` - our own flow-matching DiT (e.g. the embedded digits model), trained
  on the linear path to predict the velocity ``eps - x0``. The network's timestep input is
  ``timestep = t * FLOW_TIMESTEP_SCALE`` (= 1000 t), so the usual DiT frequency range is used.
* :func:`ddpm_dit_flow` - the published class-conditional ImageNet layout (Peebles & Xie 2023):
  an eps-prediction network with learned sigma (the first ``C`` of ``2C`` output channels are
  kept), trained on a discrete DDPM schedule. :class:`DDPMInterpolant` makes that schedule a
  continuous-time interpolant and the eps prediction is converted to a velocity
  (docs/algorithms.md 0.1, ``tts_jax.interpolants.eps_to_velocity``).

Particle chunking of any flow model, reward, language model or step scorer (:func:`chunked`,
:func:`chunked_reward`, :func:`chunked_language_model`, :func:`chunked_scorer`) lives in
:mod:`tts_jax.models.chunking` and is re-exported here.

Classifier-free guidance (Ho & Salimans 2022): with ``guided=True`` and labels given, the model is
evaluated on a ``2N`` batch (labels and null labels) and returns ``u + w (c - u)`` of the two
predictions (eps for DDPM models, velocity for flow models). The scale ``w`` is an array leaf of
``params`` (:class:`DiTFlowParams`), so sweeping it never recompiles (:func:`with_guidance`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.interpolants import Interpolant, Linear, eps_to_velocity
from tts_jax.models.base import FlowModel
from tts_jax.models.checkpoint import (
    CheckpointConfigError,
    CheckpointNotFoundError,
    check_config,
    read_json_file,
    require_file,
    require_folder,
)
from tts_jax.models.chunking import (
    chunked,
    chunked_language_model,
    chunked_reward,
    chunked_scorer,
)
from tts_jax.models.dit import DiT, load_dit
from tts_jax.models.vae import load_vae

__all__ = [
    "DDPMInterpolant",
    "DiTFlowParams",
    "EpsAsVelocity",
    "chunked",
    "chunked_language_model",
    "chunked_reward",
    "chunked_scorer",
    "ddpm_dit_flow",
    "decode_images",
    "load_ddpm_dit_pipeline",
    "velocity_dit_flow",
    "with_guidance",
]

Array = jax.Array
FLOW_TIMESTEP_SCALE = 1000.0
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# Types of the scheduler_config.json keys DDPMInterpolant.from_scheduler_config reads.
SCHEDULER_CONFIG_TYPES: dict[str, Any] = {
    "num_train_timesteps": int,
    "beta_start": float,
    "beta_end": float,
    "beta_schedule": str,
    "prediction_type": str,
    "trained_betas": list[float] | None,
    "rescale_betas_zero_snr": bool,
}


# --------------------------------------------------------------------------- DDPM interpolant


@functools.lru_cache(maxsize=8)
def _log_alphas_cumprod(
    schedule: str, beta_start: float, beta_end: float, steps: int
) -> np.ndarray:
    """``[steps + 1]`` table ``log alphabar`` at ``t_k = k / steps`` (``alphabar = 1`` at k = 0).

    Betas are built in float32 as diffusers' ``DDPMScheduler`` does; the product is in float64.
    """
    if schedule == "linear":
        betas = np.linspace(beta_start, beta_end, steps, dtype=np.float32)
    elif schedule == "scaled_linear":
        betas = np.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=np.float32) ** 2
    elif schedule == "squaredcos_cap_v2":

        def alphabar(s):
            return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

        grid = [(i / steps, (i + 1) / steps) for i in range(steps)]
        betas = np.array([min(1 - alphabar(b) / alphabar(a), 0.999) for a, b in grid], np.float32)
    else:
        raise ValueError(f"unsupported beta_schedule {schedule!r}; known: {BETA_SCHEDULES}")
    log_abar = np.cumsum(np.log1p(-betas.astype(np.float64)))
    return np.concatenate([[0.0], log_abar])


@dataclasses.dataclass(frozen=True)
class DDPMInterpolant(Interpolant):
    """A discrete DDPM noise schedule (Ho et al. 2020) as a continuous-time VP interpolant.

    Training step ``i`` (0-based, ``alphabar_i = prod_{j <= i} (1 - beta_j)``) sits at
    ``t_i = (i + 1) / T``, and ``t = 0`` is clean data (``alphabar = 1``). In between,
    ``L(t) = log alphabar`` is interpolated linearly, so ``alpha = exp(L / 2)``,
    ``sigma = sqrt(1 - exp(L))`` with closed-form derivatives from the piecewise-constant ``L'``
    (right derivative at the grid points). The network's timestep for time ``t`` is
    :meth:`timestep` ``= clip(t T - 1, 0, T - 1)``, exact at every ``t_i``.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"

    def __post_init__(self):
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"unsupported beta_schedule {self.beta_schedule!r}")

    @classmethod
    def from_scheduler_config(cls, config: dict[str, Any] | str | Path) -> DDPMInterpolant:
        """From a diffusers ``scheduler_config.json`` (a dict or its path): DDPM/DDIM/... with
        eps prediction, no ``trained_betas`` and no zero-terminal-SNR rescaling.

        Raises:
            FileNotFoundError: the file or its folder does not exist.
            ValueError: invalid JSON, a wrongly typed key (:data:`SCHEDULER_CONFIG_TYPES`) or an
                unsupported schedule; for a path, naming the folder, the file and the key.
        """
        if isinstance(config, dict):
            where = "DDPMInterpolant.from_scheduler_config: scheduler config"
        else:
            file = Path(config)
            config = read_json_file(file, "DDPMInterpolant.from_scheduler_config")
            where = f"DDPMInterpolant.from_scheduler_config: {file.name} in {file.parent}"
        check_config(config, SCHEDULER_CONFIG_TYPES, (), where)
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise CheckpointConfigError(
                f'{where}: "prediction_type" must be "epsilon" (an eps-prediction schedule), '
                f"got {config['prediction_type']!r}"
            )
        if config.get("trained_betas") is not None or config.get("rescale_betas_zero_snr"):
            raise CheckpointConfigError(
                f'{where}: "trained_betas" and "rescale_betas_zero_snr" are not supported'
            )
        schedule = config.get("beta_schedule", "linear")
        if schedule not in BETA_SCHEDULES:
            raise CheckpointConfigError(
                f'{where}: unsupported "beta_schedule" {schedule!r}; known: {BETA_SCHEDULES}'
            )
        return cls(
            num_train_timesteps=config.get("num_train_timesteps", 1000),
            beta_start=float(config.get("beta_start", 0.0001)),
            beta_end=float(config.get("beta_end", 0.02)),
            beta_schedule=schedule,
        )

    def _table(self) -> np.ndarray:
        return _log_alphas_cumprod(
            self.beta_schedule, self.beta_start, self.beta_end, self.num_train_timesteps
        )

    def log_alphabar(self, t: Array) -> Array:
        """``L(t) = log alphabar(t)``, same shape as ``t``."""
        grid = jnp.linspace(0.0, 1.0, self.num_train_timesteps + 1)
        return jnp.interp(t, grid, jnp.asarray(self._table(), jnp.float32))

    def log_alphabar_dot(self, t: Array) -> Array:
        """``dL/dt`` (the slope of the segment right of ``t``; the last segment at ``t = 1``)."""
        steps = self.num_train_timesteps
        slopes = jnp.asarray(np.diff(self._table()) * steps, jnp.float32)  # float64 differences
        idx = jnp.clip(jnp.floor(t * steps).astype(jnp.int32), 0, steps - 1)
        return slopes[idx]

    def timestep(self, t: Array) -> Array:
        """The network's (fractional) DDPM timestep for time ``t``."""
        steps = self.num_train_timesteps
        return jnp.clip(t * steps - 1.0, 0.0, steps - 1.0)

    def alpha(self, t):
        return jnp.exp(0.5 * self.log_alphabar(t))

    def sigma(self, t):
        return jnp.sqrt(-jnp.expm1(self.log_alphabar(t)))

    def alpha_dot(self, t):
        return 0.5 * self.log_alphabar_dot(t) * self.alpha(t)

    def sigma_dot(self, t):
        return -0.5 * jnp.exp(self.log_alphabar(t)) * self.log_alphabar_dot(t) / self.sigma(t)


# --------------------------------------------------------------------------- DiT flow models


class DiTFlowParams(NamedTuple):
    """Dynamic part of a DiT flow model.

    Attributes:
        net: ``nnx.split(dit)`` - graph definition (static) and weights.
        guidance: float32 scalar classifier-free guidance scale ``w`` (1 = plain conditional).
    """

    net: tuple[nnx.GraphDef, nnx.State]
    guidance: Array


def _prediction(params: DiTFlowParams, x: Array, timestep: Array, cond, guided: bool) -> Array:
    """DiT output (first ``C`` channels) at ``x [N, C, H, W]``, ``timestep [N]``, labels ``cond``.

    ``cond=None`` is unconditional; with ``guided`` the labels' and the null label's predictions
    are combined as ``u + w (c - u)`` in one ``2N`` batch.
    """
    net = nnx.merge(*params.net)
    n, channels = x.shape[:2]
    null = jnp.full((n,), net.config.null_class, jnp.int32)
    if cond is None:
        return net(x, timestep, null)[:, :channels]
    labels = jnp.asarray(cond, jnp.int32)
    if not guided:
        return net(x, timestep, labels)[:, :channels]
    twice = net(
        jnp.concatenate([x, x]),
        jnp.concatenate([timestep, timestep]),
        jnp.concatenate([labels, null]),
    )[:, :channels]
    conditional, unconditional = twice[:n], twice[n:]
    return unconditional + params.guidance * (conditional - unconditional)


@dataclasses.dataclass(frozen=True)
class _VelocityDiT:
    """Static apply of :func:`velocity_dit_flow` (hashable by value: rebuilding never retraces)."""

    timestep_scale: float
    guided: bool

    def __call__(self, params: DiTFlowParams, x: Array, t: Array, cond=None) -> Array:
        return _prediction(params, x, t * self.timestep_scale, cond, self.guided)


@dataclasses.dataclass(frozen=True)
class EpsAsVelocity:
    """Apply of an eps-prediction model as a velocity field on ``interpolant``.

    Attributes:
        eps_apply: ``(params, x [N, ...], t [N], cond) -> eps_hat [N, ...]`` in continuous ``t``.
        interpolant: the path ``x_t = alpha x0 + sigma eps`` the model was trained on.
    """

    eps_apply: Callable[[Any, Array, Array, Any], Array]
    interpolant: Interpolant

    def __call__(self, params, x: Array, t: Array, cond=None) -> Array:
        eps = self.eps_apply(params, x, t, cond)
        return eps_to_velocity(self.interpolant, eps, x, t)


@dataclasses.dataclass(frozen=True)
class _EpsDiT:
    """eps prediction of a DDPM DiT in continuous time (timestep from the interpolant)."""

    interpolant: DDPMInterpolant
    guided: bool

    def __call__(self, params: DiTFlowParams, x: Array, t: Array, cond=None) -> Array:
        return _prediction(params, x, self.interpolant.timestep(t), cond, self.guided)


def _sample_shape(model: DiT) -> tuple[int, int, int]:
    c = model.config
    return (c.in_channels, c.sample_size, c.sample_size)


def _params(model: DiT, guidance: float) -> DiTFlowParams:
    return DiTFlowParams(nnx.split(model), jnp.asarray(guidance, jnp.float32))


def velocity_dit_flow(
    model: DiT, *, guided: bool = False, guidance: float = 1.0, timestep_scale: float = 1000.0
) -> FlowModel:
    """A velocity-predicting DiT on the linear path as a :class:`FlowModel`.

    Args:
        model: the DiT (``out_channels`` = ``in_channels``; a learned-sigma head is cut to ``C``).
        guided: use classifier-free guidance when labels are given (costs a ``2N`` batch).
        guidance: initial guidance scale (an array leaf; change it with :func:`with_guidance`).
        timestep_scale: network timestep = ``t * timestep_scale`` (training must match).

    Returns:
        ``FlowModel`` on the :class:`~tts_jax.interpolants.Linear` path, ``sample_shape (C, H, W)``
        (NCHW).
    """
    apply = _VelocityDiT(float(timestep_scale), guided)
    return FlowModel(_params(model, guidance), apply, Linear(), _sample_shape(model))


def ddpm_dit_flow(
    model: DiT, interpolant: DDPMInterpolant, *, guided: bool = True, guidance: float = 4.0
) -> FlowModel:
    """An eps-predicting (learned-sigma) DDPM DiT as a velocity :class:`FlowModel`.

    Args:
        model: the DiT, e.g. the published ImageNet DiT-XL/2 (latents ``[N, 4, 32, 32]``).
        interpolant: its training schedule (:meth:`DDPMInterpolant.from_scheduler_config`).
        guided, guidance: classifier-free guidance (DiT's default scale is 4).
    """
    apply = EpsAsVelocity(_EpsDiT(interpolant, guided), interpolant)
    return FlowModel(_params(model, guidance), apply, interpolant, _sample_shape(model))


def with_guidance(flow: FlowModel, guidance: float | Array) -> FlowModel:
    """The same DiT flow model with guidance scale ``guidance`` (no recompilation)."""
    return flow.replace(params=flow.params._replace(guidance=jnp.asarray(guidance, jnp.float32)))


# --------------------------------------------------------------------------- pipeline folders


def decode_images(vae_params: tuple[nnx.GraphDef, nnx.State], latents: Array) -> Array:
    """Scaled latents ``[N, L, h, w]`` -> images ``[N, 3, H, W]`` in ``[0, 1]`` (pure, jittable).

    ``vae_params = nnx.split(vae)``; undoes the VAE scaling factor (see ``tts_jax.models.vae``).
    The images are in ``latents.dtype`` whatever the VAE's dtype.
    """
    graphdef, state = vae_params
    vae = nnx.merge(graphdef, state)
    images = vae.decode_latents(latents.astype(vae.dtype)).astype(latents.dtype)
    return jnp.clip(images * 0.5 + 0.5, 0.0, 1.0)


def load_ddpm_dit_pipeline(
    path: str | Path, *, guided: bool = True, guidance: float = 4.0, dtype: Any = jnp.float32
) -> tuple[FlowModel, tuple[nnx.GraphDef, nnx.State] | None]:
    """Load a diffusers DiT pipeline folder (``transformer/``, ``scheduler/``, optional ``vae/``).

    ``dtype`` is the networks' parameter and activation dtype (e.g. ``jnp.bfloat16``); the flow's
    velocity and the decoded images keep the dtype of their inputs (float32 particles stay
    float32).

    Returns:
        ``(flow model on the DDPM interpolant, vae_params for decode_images or None)``.

    Raises:
        FileNotFoundError: the folder, ``transformer/``, ``scheduler/scheduler_config.json`` or a
            file of a sub-model is missing (all named).
        ValueError: a broken config (naming the folder, the file and the key) or weights that do
            not match their config (naming the tensor).
    """
    loader = "load_ddpm_dit_pipeline"
    path = require_folder(path, loader)
    for sub in ("transformer", "scheduler"):
        if not (path / sub).is_dir():
            raise CheckpointNotFoundError(
                f"{loader}: folder {path} has no {sub}/ sub-folder (a diffusers DiT pipeline has "
                "transformer/, scheduler/ and optionally vae/)"
            )
    scheduler = require_file(path / "scheduler", "scheduler_config.json", loader)
    _, dit = load_dit(path / "transformer", dtype=dtype)
    interp = DDPMInterpolant.from_scheduler_config(scheduler)
    has_vae = (path / "vae").exists()
    vae_params = nnx.split(load_vae(path / "vae", dtype=dtype)[1]) if has_vae else None
    return ddpm_dit_flow(dit, interp, guided=guided, guidance=guidance), vae_params
