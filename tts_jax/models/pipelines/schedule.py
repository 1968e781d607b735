"""The flow-matching time grid of diffusers' SD3 and FLUX pipelines, as pure numpy functions.

Reproduces ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (diffusers 0.3x-0.4x) as
``StableDiffusion3Pipeline`` and ``FluxPipeline`` call it, dtype for dtype, so the grid equals
the scheduler's ``sigmas`` / ``timesteps`` (see tests/models/test_t2i_schedule.py):

* **SD3 / SD3.5** (:func:`sd3_grid`): no custom sigmas. The scheduler's constructor shifts its
  1000 training sigmas ``s' = shift s / (1 + (shift - 1) s)`` (``shift`` 3.0 for SD3 / SD3.5);
  ``set_timesteps`` spaces ``K`` timesteps linearly between the first and last *shifted* training
  sigmas (times 1000) and shifts them again: the double shift is diffusers' behaviour and kept.
  With ``use_dynamic_shifting`` the pipeline computes ``mu`` from the latent token count
  ``(h / patch) (w / patch)`` (:func:`calculate_shift`) and the exponential time shift
  ``exp(mu) / (exp(mu) + (1 / s - 1))`` replaces the static one.
* **FLUX** (:func:`flux_grid`): custom sigmas ``linspace(1, 1 / K, K)`` and ``mu`` from the packed
  token count ``(h / 2) (w / 2)``; the exponential time shift with ``use_dynamic_shifting``
  (FLUX.1-dev), else the static shift (FLUX.1-schnell, ``shift`` 1.0: no shift).

Then, in both: ``shift_terminal`` (if set) stretches the sigmas so the last equals it, the sigmas
are cast to float32, ``timesteps = sigmas * num_train_timesteps`` (float32) and a terminal 0 is
appended. The Euler step from ``sigmas[i]`` to ``sigmas[i + 1]`` is ``x + (s_{i+1} - s_i) v``;
the SD3 transformer takes ``timesteps[i]`` (0..1000), FLUX's ``timesteps[i] / 1000``.

Config options the grid cannot reproduce (Karras / exponential / beta sigmas, ``invert_sigmas``,
``stochastic_sampling``, unknown keys) raise :class:`UnsupportedSchedulerError`.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np

from tts_jax.models import checkpoint

SCHEDULER_CONFIG_NAME = "scheduler_config.json"
SCHEDULER_CLASS = "FlowMatchEulerDiscreteScheduler"


class UnsupportedSchedulerError(checkpoint.CheckpointConfigError):
    """A scheduler config asks for a scheduler or an option the grid does not reproduce."""


class FlowGrid(NamedTuple):
    """The time grid of a ``K``-step sampling run.

    Attributes:
        sigmas: ``[K + 1]`` float32, decreasing from about 1 to the terminal 0: the noise level
            (flow time, data at 0) before each step and after the last.
        timesteps: ``[K]`` float32, ``sigmas[:-1] * num_train_timesteps`` (what the transformer is
            conditioned on; FLUX divides it by 1000 again).
    """

    sigmas: np.ndarray
    timesteps: np.ndarray


@dataclasses.dataclass(frozen=True, kw_only=True)
class FlowMatchConfig:
    """``FlowMatchEulerDiscreteScheduler``'s config (names and defaults as in diffusers).

    The last five fields are accepted only at their defaults (the grid or the deterministic
    Euler sampler would differ).
    """

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    base_shift: float | None = 0.5
    max_shift: float | None = 1.15
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    invert_sigmas: bool = False
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    stochastic_sampling: bool = False

    def __post_init__(self):
        refused = [
            f"{k}={getattr(self, k)!r}"
            for k in (
                "invert_sigmas",
                "use_karras_sigmas",
                "use_exponential_sigmas",
                "use_beta_sigmas",
                "stochastic_sampling",
            )
            if getattr(self, k)
        ]
        if refused:
            raise UnsupportedSchedulerError(
                f"unsupported {SCHEDULER_CLASS} option(s) {', '.join(refused)}: only the plain "
                "(optionally shifted) flow-matching Euler grid of the SD3 / FLUX pipelines is "
                "reproduced"
            )
        if self.time_shift_type not in ("exponential", "linear"):
            raise UnsupportedSchedulerError(
                f'"time_shift_type" must be "exponential" or "linear", got {self.time_shift_type!r}'
            )
        if self.num_train_timesteps < 1:
            raise UnsupportedSchedulerError(
                f'"num_train_timesteps" must be positive, got {self.num_train_timesteps}'
            )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> FlowMatchConfig:
        """Parses a ``scheduler_config.json`` dict; keys starting with ``_`` are ignored.

        Raises:
            UnsupportedSchedulerError: another ``_class_name``, an unknown key or an option
                refused by :meth:`__post_init__`.
        """
        name = raw.get("_class_name", SCHEDULER_CLASS)
        if name != SCHEDULER_CLASS:
            raise UnsupportedSchedulerError(
                f"_class_name is {name!r}; only {SCHEDULER_CLASS} (the scheduler of the SD3 and "
                "FLUX pipelines) is supported"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in raw if k not in fields and not k.startswith("_"))
        if unknown:
            raise UnsupportedSchedulerError(f"unsupported {SCHEDULER_CLASS} config keys {unknown}")
        return cls(**{k: v for k, v in raw.items() if k in fields})


def read_scheduler_config(
    path: str | Path, loader: str = "read_scheduler_config"
) -> FlowMatchConfig:
    """Reads a pipeline's ``scheduler/`` folder (its ``scheduler_config.json``).

    Raises:
        CheckpointNotFoundError: the folder or the file does not exist.
        CheckpointConfigError: invalid JSON or a wrongly typed key;
            :class:`UnsupportedSchedulerError` for an unsupported scheduler or option; every
            message names the file and the folder.
    """
    file = checkpoint.read_config_file(path, loader, SCHEDULER_CONFIG_NAME)
    file.check(checkpoint.field_types(FlowMatchConfig))
    try:
        return FlowMatchConfig.from_dict(file.raw)
    except UnsupportedSchedulerError as e:
        raise UnsupportedSchedulerError(f"{file.where}: {e}") from e


# --------------------------------------------------------------------------- the grid


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """The pipelines' ``mu``: linear in the image token count, ``base_shift`` at ``base_seq_len``
    and ``max_shift`` at ``max_seq_len`` (extrapolated outside)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


def time_shift(config: FlowMatchConfig, mu: float, sigmas: np.ndarray) -> np.ndarray:
    """Resolution-dependent shift: ``exp(mu) / (exp(mu) + (1 / s - 1))`` (``"exponential"``) or
    ``mu / (mu + (1 / s - 1))`` (``"linear"``), in ``sigmas``' dtype."""
    if config.time_shift_type == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1) ** 1.0)
    return mu / (mu + (1 / sigmas - 1) ** 1.0)


def _static_shift(shift: float, sigmas: np.ndarray) -> np.ndarray:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def _training_sigma_range(config: FlowMatchConfig) -> tuple[float, float]:
    """``(sigma_max, sigma_min)`` of the scheduler's constructor (float32 training sigmas,
    statically shifted unless dynamic shifting is on)."""
    n = config.num_train_timesteps
    ends = np.array([n, 1], np.float32) / n
    if not config.use_dynamic_shifting:
        ends = _static_shift(config.shift, ends).astype(np.float32)
    return float(ends[0]), float(ends[1])


def flow_grid(
    config: FlowMatchConfig,
    num_steps: int | None = None,
    *,
    sigmas: np.ndarray | list[float] | None = None,
    mu: float | None = None,
) -> FlowGrid:
    """``FlowMatchEulerDiscreteScheduler.set_timesteps(num_steps, sigmas=sigmas, mu=mu)``.

    Args:
        config: the scheduler config.
        num_steps: ``K``; with ``sigmas``, ``None`` or ``len(sigmas)``.
        sigmas: ``[K]`` custom sigmas before shifting (FLUX's ``linspace(1, 1 / K, K)``);
            ``None`` spaces the timesteps linearly between the shifted training sigmas.
        mu: the dynamic shift (required with ``use_dynamic_shifting``; ignored without).

    Returns:
        :class:`FlowGrid` (``sigmas`` ``[K + 1]``, ``timesteps`` ``[K]``, float32).

    Raises:
        ValueError: no steps, a length mismatch, ``mu`` missing with dynamic shifting, or
            ``shift_terminal`` with a single step at sigma 1 (diffusers returns NaN there).
    """
    if config.use_dynamic_shifting and mu is None:
        raise ValueError("mu must be given when the scheduler config sets use_dynamic_shifting")
    n = config.num_train_timesteps
    if sigmas is None:
        if num_steps is None or num_steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps}")
        sigma_max, sigma_min = _training_sigma_range(config)
        s = np.linspace(sigma_max * n, sigma_min * n, num_steps) / n  # float64, as diffusers
    else:
        s = np.array(sigmas).astype(np.float32)
        if s.ndim != 1 or len(s) < 1:
            raise ValueError(f"sigmas must be a non-empty 1-D sequence, got shape {s.shape}")
        if num_steps is not None and num_steps != len(s):
            raise ValueError(f"num_steps {num_steps} != len(sigmas) {len(s)}")
    if config.use_dynamic_shifting:
        s = time_shift(config, mu, s)
    else:
        s = _static_shift(config.shift, s)
    if config.shift_terminal:
        one_minus = 1 - s
        if one_minus[-1] == 0:  # diffusers divides by zero here (a NaN grid)
            raise ValueError(
                f"shift_terminal {config.shift_terminal} cannot stretch a grid whose last sigma "
                "is 1 (a single step starting at sigma 1); use more steps"
            )
        s = 1 - one_minus / (one_minus[-1] / (1 - config.shift_terminal))
    s32 = s.astype(np.float32)
    timesteps = s32 * np.float32(n)
    return FlowGrid(np.concatenate([s32, np.zeros(1, np.float32)]), timesteps)


def _dynamic_mu(config: FlowMatchConfig, image_seq_len: int) -> float:
    if config.base_shift is None or config.max_shift is None:
        raise UnsupportedSchedulerError(
            "base_shift and max_shift must be numbers to compute the resolution-dependent mu"
        )
    return calculate_shift(
        image_seq_len,
        config.base_image_seq_len,
        config.max_image_seq_len,
        config.base_shift,
        config.max_shift,
    )


def sd3_grid(
    config: FlowMatchConfig,
    num_steps: int,
    latent_height: int,
    latent_width: int,
    patch_size: int = 2,
    *,
    sigmas: np.ndarray | list[float] | None = None,
    mu: float | None = None,
) -> FlowGrid:
    """The grid ``StableDiffusion3Pipeline.__call__`` sets.

    Args:
        config: the pipeline's scheduler config.
        num_steps: ``K``.
        latent_height, latent_width: latent size ``h, w`` (image size / ``vae_scale_factor``).
        patch_size: the transformer's ``patch_size`` (token count ``(h / p) (w / p)`` for
            ``mu``).
        sigmas: the pipeline call's custom ``sigmas`` (default ``None``).
        mu: the pipeline call's ``mu``; ``None`` computes it with dynamic shifting.
    """
    if config.use_dynamic_shifting and mu is None:
        mu = _dynamic_mu(config, (latent_height // patch_size) * (latent_width // patch_size))
    return flow_grid(config, None if sigmas is not None else num_steps, sigmas=sigmas, mu=mu)


def flux_grid(
    config: FlowMatchConfig,
    num_steps: int,
    latent_height: int,
    latent_width: int,
    *,
    sigmas: np.ndarray | list[float] | None = None,
) -> FlowGrid:
    """The grid ``FluxPipeline.__call__`` sets.

    Args:
        config: the pipeline's scheduler config.
        num_steps: ``K``.
        latent_height, latent_width: unpacked latent size ``h, w`` (even; the pipeline uses
            ``2 (H // (2 vae_scale_factor))``); ``mu`` comes from the ``(h / 2) (w / 2)`` packed
            tokens.
        sigmas: the call's custom sigmas; default ``linspace(1, 1 / K, K)``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be a positive int, got {num_steps}")
    if sigmas is None:
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
    mu = _dynamic_mu(config, (latent_height // 2) * (latent_width // 2))
    return flow_grid(config, sigmas=sigmas, mu=mu)


def pipeline_grid(
    kind: Literal["sd3", "flux"],
    config: FlowMatchConfig,
    num_steps: int,
    latent_height: int,
    latent_width: int,
    patch_size: int = 2,
) -> FlowGrid:
    """:func:`sd3_grid` or :func:`flux_grid` by pipeline kind (``patch_size`` is SD3's)."""
    if kind == "sd3":
        return sd3_grid(config, num_steps, latent_height, latent_width, patch_size)
    if kind == "flux":
        return flux_grid(config, num_steps, latent_height, latent_width)
    raise ValueError(f"kind must be 'sd3' or 'flux', got {kind!r}")
