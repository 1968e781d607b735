"""tts-jax: JAX-native inference-time scaling and steering on one particle abstraction."""

from tts_jax import interpolants, resampling, smc
from tts_jax.particles import (
    Particles,
    check_log_weights,
    ess,
    gather,
    log_mean_exp,
    log_normalize,
    make_particles,
)
from tts_jax.smc import ResampleSchedule, SMCInfo, SMCResult

__all__ = [
    "Particles",
    "ResampleSchedule",
    "SMCInfo",
    "SMCResult",
    "check_log_weights",
    "ess",
    "gather",
    "interpolants",
    "log_mean_exp",
    "log_normalize",
    "make_particles",
    "resampling",
    "smc",
]
__version__ = "0.1.0"
