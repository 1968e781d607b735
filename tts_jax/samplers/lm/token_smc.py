"""Token-level SMC of language models with twisted potentials and hard constraints.

**Token-level SMC** (:func:`token_smc`, Lew et al. 2023, "Sequential Monte Carlo Steering of
Large Language Models using Probabilistic Programs", llamppl / genlm-control style,
docs/algorithms.md 4.2): propose
each token from ``q`` = the LM at ``temperature``, optionally restricted by a constraint mask;
weight by ``p / q`` times ``psi(prefix_t) / psi(prefix_{t-1})`` for a user twist ``log psi``
(whose value at a done particle is the final potential). ESS-triggered resampling. Hard
constraints: a potential of ``-inf`` or a prefix with no allowed next token kills the particle;
if every particle dies the result says so (``all_dead``, ``log_evidence = -inf``) rather than
raising.

**Kernel** (:mod:`tts_jax.samplers.base`): :func:`token_smc_sampler` (static: particles, length,
potential, constraint, resampler), :class:`TokenSMCParams` (arrays: model, prompt, decoding,
threshold, potential and constraint parameters), :func:`check_token_smc_params` (host
checks), :func:`token_smc_keys` (the key layout of :func:`token_smc`: the same bits for the same
key). The run stops once every particle is done (:attr:`~tts_jax.samplers.base.Sampler.done`).
Particles are :class:`~tts_jax.samplers.lm.state.LMState` rows on the Feynman-Kac engine
:mod:`tts_jax.smc` (:mod:`.engine`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax import smc
from tts_jax.models.base import LanguageModel, as_language_model
from tts_jax.resampling import Resampler, get_resampler
from tts_jax.samplers.base import Sampler
from tts_jax.samplers.lm.checks import check_budget, check_nan, check_prompt
from tts_jax.samplers.lm.engine import run_jitted, smc_info, smc_init
from tts_jax.samplers.lm.state import (
    DecodeConfig,
    append_token,
    decode_config,
    init_state,
    make_result,
)
from tts_jax.samplers.result import Result

Array = jax.Array
# potential(params, tokens int32[N, L], lengths int32[N], done bool[N]) -> log psi float32[N]
Potential = Callable[[Any, Array, Array, Array], Array]
# constraint(params, tokens int32[N, L], lengths int32[N]) -> allowed next tokens bool[N, V]
Constraint = Callable[[Any, Array, Array], Array]


def _token_callbacks(model, cfg, potential, constraint):
    """``propagate`` / ``log_potential`` of token-level SMC (see module doc); their ``params``
    is a :class:`TokenSMCParams`."""

    def propagate(key, s, k, params):
        """One token for every row not done (done rows are left as they are)."""
        go = ~s.done
        logp = jax.nn.log_softmax(s.logits, axis=-1)
        allowed = (
            jnp.ones(s.logits.shape, bool)
            if constraint is None
            else constraint(params.constraint, s.tokens, s.length)
        )
        any_ok = jnp.any(allowed, axis=-1)
        prop = jnp.where(allowed, s.logits / params.decode.temperature, -jnp.inf)
        prop = jnp.where(any_ok[:, None], prop, 0.0)  # rows with no allowed token die below
        token = jax.random.categorical(key, prop, axis=-1).astype(jnp.int32)
        logq = jax.nn.log_softmax(prop, axis=-1)
        pick = token[:, None]
        log_ratio = (
            jnp.take_along_axis(logp, pick, axis=1) - jnp.take_along_axis(logq, pick, axis=1)
        )[:, 0]
        correction = jnp.where(go, jnp.where(any_ok, log_ratio, -jnp.inf), 0.0)
        dead = go & ~any_ok
        none = jnp.zeros(go.shape, bool)
        s, _ = append_token(model, s, jnp.where(dead, cfg.pad_id, token), go & any_ok, none, cfg)
        return s._replace(done=s.done | dead), correction

    def log_potential(s, k, params):
        if potential is None:
            return jnp.zeros(s.done.shape, jnp.float32)
        return potential(params.potential, s.tokens, s.length, s.done)

    return propagate, log_potential


class TokenSMCParams(NamedTuple):
    """Everything array-valued token-level SMC needs (a pytree: a jit argument, never static).

    Attributes:
        model: :class:`~tts_jax.models.base.LanguageModel` or a model with a registered
            adapter (its weights are leaves).
        prompt: ``int32[P]`` prompt tokens.
        decode: :class:`~tts_jax.samplers.lm.state.DecodeConfig`: proposal ``temperature``
            (> 0), ``stop_ids int32[S]``, ``pad_id`` (``sep_ids`` unused, ``[-1]``).
        ess_threshold: resample when ``ESS < threshold * N`` (float32 scalar).
        potential: parameters of the sampler's ``potential`` (any pytree, or ``None``).
        constraint: parameters of the sampler's ``constraint`` (any pytree, or ``None``).
    """

    model: Any
    prompt: Array
    decode: DecodeConfig
    ess_threshold: Array
    potential: Any = None
    constraint: Any = None


def make_token_smc_params(
    model,
    prompt,
    *,
    temperature=1.0,
    stop_ids=None,
    pad_id=0,
    ess_threshold=0.5,
    potential_params=None,
    constraint_params=None,
) -> TokenSMCParams:
    """:class:`TokenSMCParams` from Python or array values (no checks: see
    :func:`check_token_smc_params`)."""
    return TokenSMCParams(
        model,
        jnp.asarray(prompt, jnp.int32),
        decode_config(temperature, None, stop_ids, pad_id),
        jnp.asarray(ess_threshold, jnp.float32),
        potential_params,
        constraint_params,
    )


def check_token_smc_params(
    params: TokenSMCParams, sampler: Sampler, method: str = "token_smc"
) -> None:
    """Host-side checks of ``params`` (values only when concrete: traced ones are skipped).

    Raises:
        ValueError: a bad prompt (:func:`~tts_jax.samplers.lm.checks.check_prompt`), a
            non-positive temperature.
    """
    check_prompt(params.prompt)
    temperature = params.decode.temperature
    if not isinstance(temperature, jax.core.Tracer) and np.any(np.asarray(temperature) <= 0):
        raise ValueError(
            f"{method} needs a temperature > 0 (a proposal with full support), got {temperature}"
        )


def token_smc_sampler(
    num_particles: int,
    max_new_tokens: int,
    potential: Potential | None = None,
    constraint: Constraint | None = None,
    resampler: str | Resampler = "systematic",
) -> Sampler:
    """Token-level SMC (Lew et al. 2023, docs/algorithms.md 4.2) as a
    :class:`~tts_jax.samplers.base.Sampler` of static configuration only (memoized: equal
    arguments give the same sampler, one compilation of ``jax.jit(run,
    static_argnames="sampler")`` per configuration and shapes).

    One step per token (``max_new_tokens`` steps at most, ``keys_per_step = 2``: proposal and
    resampler); the run stops once every particle is done (:attr:`Sampler.done`; steps not run
    read as no-ops in ``info``). Its params are a :class:`TokenSMCParams`, its state an
    :class:`SMCCarry` and its result the :class:`~tts_jax.samplers.result.Result` of
    :func:`token_smc` (``info.num_nan``: NaN potentials dropped; the host-side NaN policy
    is the entry point's). :func:`token_smc` runs it with :func:`token_smc_keys`.

    Args:
        num_particles: N.
        max_new_tokens: L, the token budget per particle (and the number of steps).
        potential: ``(potential_params, tokens int32[N, L], lengths int32[N], done bool[N]) ->
            log psi float32[N]`` or ``None`` (0).
        constraint: ``(constraint_params, tokens int32[N, L], lengths int32[N]) -> bool[N, V]``
            or ``None`` (every token allowed).
        resampler: a name in :mod:`tts_jax.resampling` or any ``(key, log_weights [N], num) ->
            int32[num]`` function.

    Raises:
        ValueError: an empty budget, an unknown resampler name.
    """
    check_budget(num_particles, max_new_tokens, 1, 1)
    return _token_smc_sampler(
        int(num_particles), int(max_new_tokens), potential, constraint, get_resampler(resampler)
    )


@functools.cache
def _token_smc_sampler(n, length, potential, constraint, resampler) -> Sampler:
    def callbacks(params):
        return _token_callbacks(
            as_language_model(params.model), params.decode, potential, constraint
        )

    def schedule(params):
        return smc.ResampleSchedule(jnp.arange(length) < length - 1, params.ess_threshold)

    def init(key, params):
        state = init_state(
            as_language_model(params.model), params.prompt, n, length, params.decode.pad_id
        )
        return smc_init(key, state, callbacks(params)[1], params)

    def step(keys, carry, params):
        propagate, log_potential = callbacks(params)
        new, info = smc.step(
            keys, carry.smc, propagate, log_potential, schedule(params), params, resampler
        )
        return carry._replace(smc=new), info

    def done(carry, params):
        return jnp.all(carry.smc.particles.state.done)

    def finalize(carry, infos, params):
        final = carry.smc
        state, lw = final.particles.state, final.particles.log_weights
        state = state._replace(score=callbacks(params)[1](state, jnp.int32(length), params))
        info = smc_info(final, infos)
        info["num_nan"] = jnp.sum(info["num_nan_potentials"]) + carry.num_nan_initial
        best = jnp.argmax(jnp.where(jnp.isnan(lw), -jnp.inf, lw)).astype(jnp.int32)
        all_dead = ~jnp.isfinite(final.log_evidence)
        return make_result(state, lw, best, final.log_evidence, all_dead, info)

    return Sampler(init, step, finalize, length, keys_per_step=2, done=done)


def token_smc_keys(key: Array, sampler: Sampler) -> tuple[Array, Array]:
    """``(init_key, step_keys Key[L, 2])`` of :func:`token_smc`'s key layout (step ``k``:
    ``split(fold_in(key, k))``, as :func:`tts_jax.smc.run_until` derived them): with them,
    ``jax.jit(run_with_keys, static_argnames="sampler")(*token_smc_keys(key, sampler),
    sampler, params)`` is :func:`token_smc` bit for bit (without its host-side checks)."""
    return key, smc.step_keys(key, sampler.num_steps)


def token_smc(
    key: Array,
    model: LanguageModel,
    prompt,
    *,
    num_particles: int,
    max_new_tokens: int,
    potential: Potential | None = None,
    potential_params: Any = None,
    constraint: Constraint | None = None,
    constraint_params: Any = None,
    temperature: float | Array = 1.0,
    stop_ids=None,
    pad_id: int = 0,
    ess_threshold: float | Array = 0.5,
    resampler: str = "systematic",
    nan_policy: str = "raise",
) -> Result:
    """Token-level SMC with twisted potentials and hard constraints (docs/algorithms.md 4.2).

    Target: ``p(y | prompt) * psi_final(y) / Z`` over completions ``y`` that end with a stop token
    or fill the ``max_new_tokens`` buffer, restricted to completions whose every token the
    constraint allows (``Z`` is then the probability of the constraint times the mean final
    potential). One SMC step per token (at most ``max_new_tokens`` steps; the loop ends once
    every particle is done and the remaining steps' diagnostics read as no-ops); the proposal
    is the LM at ``temperature`` with disallowed tokens masked out, and the incremental
    log-weight is ``log p(t) - log q(t) + log psi(prefix_t) - log psi(prefix_{t-1})``.

    Args:
        key: PRNG key.
        model: a :class:`~tts_jax.models.base.LanguageModel` or a model with a registered
            adapter (e.g. the transformer :class:`~tts_jax.models.lm.LM`).
        prompt: ``int[P]`` prompt tokens (prefilled once).
        num_particles: N (static).
        max_new_tokens: L, token budget per particle (static).
        potential: ``(potential_params, tokens int32[N, L], lengths int32[N], done bool[N]) ->
            log psi float32[N]``, cumulative: the twist of a running prefix and the final
            potential of a done one (``-inf`` kills a particle); ``None``: 0. Static.
        potential_params: traced parameters of ``potential`` (e.g. ``lambda``).
        constraint: ``(constraint_params, tokens int32[N, L], lengths int32[N]) -> bool[N, V]``
            allowed next tokens; ``None``: every token. Static.
        constraint_params: traced parameters of ``constraint``.
        temperature: proposal temperature (array, > 0; the target stays the untempered LM).
        stop_ids: token id(s) that end a completion (EOS).
        pad_id: buffer filler.
        ess_threshold: resample when ``ESS < threshold * N`` (array).
        resampler: ``systematic`` | ``stratified`` | ``multinomial`` | ``residual``.
        nan_policy: ``raise`` or ``drop`` (a NaN potential gives weight zero).

    Returns:
        :class:`~tts_jax.samplers.result.Result`: ``scores`` are the final log potentials,
        ``log_evidence`` the estimate of ``log Z`` (``-inf`` with ``all_dead`` when every
        particle died), ``info`` the per-token SMC diagnostics (``ess``, ``unique_ancestors``,
        ``resampled``, ``ancestors``, ``log_evidence_increment``, ``all_dead``).

    Raises:
        ValueError: empty budget, bad prompt, non-positive temperature, NaN potentials (``raise``).
    """
    sampler = token_smc_sampler(num_particles, max_new_tokens, potential, constraint, resampler)
    params = make_token_smc_params(
        model,
        check_prompt(prompt),
        temperature=temperature,
        stop_ids=stop_ids,
        pad_id=pad_id,
        ess_threshold=ess_threshold,
        potential_params=potential_params,
        constraint_params=constraint_params,
    )
    check_token_smc_params(params, sampler)
    result = run_jitted(*token_smc_keys(key, sampler), sampler, params)
    check_nan(int(result.info.num_nan), "token_smc", nan_policy)
    return result
