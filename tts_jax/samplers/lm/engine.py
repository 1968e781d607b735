"""The carry shared by the LM particle kernels on the Feynman-Kac engine :mod:`tts_jax.smc`
(:mod:`.particle_filter`, :mod:`.token_smc`): the SMC state over
:class:`~tts_jax.samplers.lm.state.LMState` particles, its initialisation (counting the NaN
initial potentials it drops) and the per-step diagnostics of a run that may stop early."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from tts_jax import smc
from tts_jax.particles import ess
from tts_jax.samplers.base import run_with_keys

Array = jax.Array


class SMCCarry(NamedTuple):
    """State of the LM particle kernels (:func:`token_smc_sampler`, :func:`pf_sampler`).

    Attributes:
        smc: :class:`~tts_jax.smc.SMCState` over :class:`~tts_jax.samplers.lm.state.LMState`
            particles (``N`` rows: tokens ``int32[N, L]``, KV cache, scores, budget, ...).
        num_nan_initial: int32 scalar, NaN potentials of the initial particles (dropped).
        key: PRNG key the kernel's ``init`` received, kept for ``finalize`` (the particle
            filter draws the next Gibbs reference with it; unused by token SMC).
    """

    smc: smc.SMCState
    num_nan_initial: Array
    key: Array


def smc_init(key, state, log_potential, params) -> SMCCarry:
    """:func:`tts_jax.smc.init` and the count of NaN initial potentials it dropped."""
    lp0 = log_potential(state, jnp.int32(0), params)
    num_nan = jnp.sum(jnp.isnan(lp0)).astype(jnp.int32)
    return SMCCarry(smc.init(state, log_potential, params), num_nan, key)


def smc_info(final: smc.SMCState, infos: smc.SMCInfo) -> dict[str, Array]:
    """The diagnostics ``dict`` of an LM result from a run that may have stopped early (rows of
    steps not run are zeros): those steps read as the no-ops they would have been, exactly as
    :func:`tts_jax.smc.run_until` records them (ESS of the final weights, no resampling,
    identity ancestors, zero evidence increment); ``observed`` is dropped."""
    lw = final.particles.log_weights
    n, num_steps = lw.shape[0], infos.ess.shape[0]
    not_run = jnp.arange(num_steps) >= final.step
    info = infos._replace(
        ess=jnp.where(not_run, ess(lw), infos.ess),
        ancestors=jnp.where(not_run[:, None], jnp.arange(n, dtype=jnp.int32), infos.ancestors),
        unique_ancestors=jnp.where(not_run, jnp.int32(n), infos.unique_ancestors),
        all_dead=jnp.where(not_run, ~jnp.isfinite(final.log_evidence), infos.all_dead),
    )._asdict()
    del info["observed"]  # no per-step observation requested
    return info


run_jitted = jax.jit(run_with_keys, static_argnames="sampler")
"""``jax.jit(run_with_keys, static_argnames="sampler")``, shared by the convenience functions."""
