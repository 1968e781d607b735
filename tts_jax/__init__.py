"""tts-jax: JAX-native inference-time scaling and steering on one particle abstraction."""

from tts_jax import interpolants, resampling, samplers, sharding, smc
from tts_jax.models.base import FlowModel, linear_to_vp
from tts_jax.particles import (
    Particles,
    check_log_weights,
    ess,
    gather,
    log_mean_exp,
    log_normalize,
    make_particles,
)
from tts_jax.rewards.base import Reward
from tts_jax.smc import ResampleSchedule, SMCInfo, SMCResult

__all__ = [
    "FlowModel",
    "Particles",
    "Reward",
    "ResampleSchedule",
    "SMCInfo",
    "SMCResult",
    "check_log_weights",
    "ess",
    "gather",
    "interpolants",
    "linear_to_vp",
    "log_mean_exp",
    "log_normalize",
    "make_particles",
    "resampling",
    "samplers",
    "sharding",
    "smc",
]
__version__ = "0.1.0"
