"""Every steering method, built on the shared particles / resampling / SMC machinery.

The kernel shape (:mod:`.base`): a method's factory returns a :class:`Sampler` of pure
``init`` / ``step`` / ``finalize`` functions from its static configuration, and :func:`run` runs
it on a key and a pytree of ``params``: jit it with ``static_argnames="sampler"``, vmap it over
keys, shard it. Every method is built this way (e.g. :func:`.image.fk_steering.sampler`).

Image and flow models (:mod:`.image`): :mod:`.image.noise_search` (Ma et al. 2025),
:mod:`.image.fk_steering` (Singhal et al. 2025), :mod:`.image.flow_particles` (Kim et al. 2025).
Language models (:mod:`.lm`): :mod:`.lm.particle_filter` (Puri et al. 2025),
:mod:`.lm.token_smc` (Lew et al. 2023) and :mod:`.lm.search` (best-of-N, beam search, DVTS).
Both return the one :class:`~tts_jax.samplers.result.Result` type.

Functions named like their module (``fk_steering``) or like the SMC engine (``flow_particles.smc``)
are not re-exported here: import them from their module.
"""

from tts_jax.samplers.base import Sampler, run, run_with_keys
from tts_jax.samplers.image.flow_particles import code, rbf, svdd
from tts_jax.samplers.image.noise_search import best_of_n, search_over_paths, zero_order_search
from tts_jax.samplers.lm.particle_filter import (
    entropic_particle_filter,
    particle_filter,
    particle_gibbs,
)
from tts_jax.samplers.lm.search import beam_search, dvts, majority_vote, weighted_best_of_n
from tts_jax.samplers.lm.search import best_of_n as lm_best_of_n
from tts_jax.samplers.lm.token_smc import token_smc
from tts_jax.samplers.result import Cost, Info, Result, Text

__all__ = [
    "Cost",
    "Info",
    "Result",
    "Text",
    "Sampler",
    "beam_search",
    "best_of_n",
    "code",
    "dvts",
    "entropic_particle_filter",
    "lm_best_of_n",
    "majority_vote",
    "particle_filter",
    "particle_gibbs",
    "rbf",
    "run",
    "run_with_keys",
    "search_over_paths",
    "svdd",
    "token_smc",
    "weighted_best_of_n",
    "zero_order_search",
]
