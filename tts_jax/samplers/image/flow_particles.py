"""Particle sampling of flow models at a fixed NFE budget (Kim et al. 2025, docs/algorithms.md 3).

Kim, Yoon, Lee & Sung 2025, "Inference-Time Scaling for Flow Models via Stochastic Generation
and Rollover Budget Forcing". This module re-exports the methods so callers keep one import:

* :mod:`.flow_search`: :func:`smc` (FK steering's kernel, :func:`smc_sampler` /
  :func:`smc_params`), :func:`svdd` and :func:`code` (:func:`svdd_sampler`,
  :func:`code_sampler`), and what all of them share: :class:`Params`, :func:`make_params`,
  :func:`check_params`;
* :mod:`.rollover`: :func:`rbf` (:func:`rbf_sampler`, :func:`rbf_keys`).

The modules are not named ``svdd`` / ``rbf``: :mod:`tts_jax.samplers` re-exports the functions
``svdd`` and ``rbf``, which would shadow submodules of those names.

Kernels run with :func:`tts_jax.samplers.base.run` (``jax.jit(run, static_argnames="sampler")``,
``jax.vmap`` over keys); shapes, budgets and policies are documented in :mod:`.flow_search`.
"""

from tts_jax.samplers.image.flow_search import (
    Params,
    check_params,
    code,
    code_sampler,
    make_params,
    smc,
    smc_params,
    smc_sampler,
    svdd,
    svdd_sampler,
)
from tts_jax.samplers.image.rollover import rbf, rbf_keys, rbf_sampler

__all__ = [
    "Params",
    "check_params",
    "code",
    "code_sampler",
    "make_params",
    "rbf",
    "rbf_keys",
    "rbf_sampler",
    "smc",
    "smc_params",
    "smc_sampler",
    "svdd",
    "svdd_sampler",
]
