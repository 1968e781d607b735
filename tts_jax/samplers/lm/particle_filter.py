"""Step-level particle filtering of language models with a step scorer (plain, entropic,
particle Gibbs).

All of them run on :class:`~tts_jax.samplers.lm.state.LMState` particles (KV cache included, one
gather per resampling, prompt prefilled once) through the Feynman-Kac engine
:mod:`tts_jax.smc` inside one jitted program, and return an
:class:`~tts_jax.samplers.result.Result` with the budget spent (tokens, per-row LM forwards,
batched LM calls, scorer calls).

**Step-level particle filtering** (Puri et al. 2025, "A Probabilistic Inference Approach to
Inference-Time Scaling of LLMs using Particle-Based Monte Carlo Methods", docs/algorithms.md
4.1). One SMC step = every active particle generates up to its separator / stop token /
``max_step_tokens``, then the scorer (e.g. a PRM) scores the partial solutions, aggregated by
``last`` / ``min`` / ``prod`` / ``model``. Two weightings:

* ``weighting="puri"`` (the paper): after each step the weights are *absolute*,
  ``w = softmax(logit(r) / T_softmax)`` (odds to the power ``1 / T_softmax``), with multinomial
  resampling every step. These are **not** incremental importance ratios: a prefix's score is
  counted again at every step, so the particles do not target a fixed tilted distribution (and
  ``log_evidence`` is NaN). It is implemented in the engine by a cumulative potential
  ``phi_k = sum_{j <= k} logit(r_j) / T``, whose increments are exactly the absolute weights.
  Steps where every particle was already done change nothing. The weights hold no ``p / q``
  factor, so at a sampling ``temperature`` ``T != 1`` what they tilt is the tempered LM
  ``q_T(y | x) = prod_t softmax(logits_t / T)[y_t]`` (each next-token distribution tempered and
  renormalised), not ``p``: with one step (``max_steps = 1``) the weighted particles target
  ``q_T(y | x) (r(y) / (1 - r(y)))^(1 / T_softmax) / Z``; ``q_1 = p``.
* ``weighting="twisted"``: proper twisted SMC (docs/algorithms.md 0.5 / 4.2): the cumulative
  potential is ``phi_k = logit(r_k) / T_softmax`` and weights multiply by
  ``exp(phi_k - phi_{k-1})`` times the importance ratio
  ``prod_t p(y_t | x, y_<t) / q_T(y_t | x, y_<t)`` of the step's tokens (``q_T`` the
  proposal above, ``T > 0``; the ratio is 1 at ``T = 1``), so at any sampling
  temperature the final weighted particles target the untempered LM tilted by the last score,
  ``p(y | x) (r(y) / (1 - r(y)))^(1 / T_softmax) / Z``, with ``log_evidence`` estimating
  ``log Z``; ESS-triggered resampling (default 0.5 N). Particles not done after ``max_steps``
  steps are prefixes ``y`` and ``p(y | x)`` is then the prefix probability.

Finished particles (stop token, or buffer full) stay in the pool with their final score and their
copies stay finished ("resample inactive"). With ``weighting="puri"`` a resampling is skipped only
when the weights are exactly uniform (it would only lose diversity).

**Entropic PF** (:func:`entropic_particle_filter`): the absolute weights are tempered by
``T = max(1, (1 / ess_ratio) (1 - progress))`` when ``ess_ratio < 0.5`` and ``progress < 0.5``
(``ess_ratio`` of the untempered weights, ``progress = steps done / max_steps``), systematic
resampling, and the final answer is the untempered argmax.

**Particle Gibbs** (:func:`particle_gibbs`): several filter sweeps; from the second on, particle 0
replays a reference trajectory drawn by weight from the previous sweep and is never resampled
away (conditional resampling pins ancestor 0).

**Kernels** (:mod:`tts_jax.samplers.base`, issue 16). Each method is also a pure
:class:`~tts_jax.samplers.base.Sampler` built by a memoized factory of static configuration,
with an array pytree of params and host-side checks:

=========================  ==============================  ===================================
method                     factory (static)                params / checks / key layout
=========================  ==============================  ===================================
:func:`particle_filter`,   :func:`pf_sampler`              :class:`PFParams` (weighting,
:func:`entropic_particle_                                  annealing, reference: data),
filter`                                                    :func:`check_pf_params`,
                                                           :func:`pf_keys`
:func:`particle_gibbs`     :func:`gibbs_sampler`           :class:`PFParams`,
                                                           :func:`gibbs_keys`
=========================  ==============================  ===================================

``jax.jit(tts_jax.samplers.run, static_argnames="sampler")(key, sampler, params)`` runs one
(``vmap`` it over keys; a new temperature, threshold or weight of the same shapes reuses the
program). The convenience functions are the host checks, then
``run_with_keys(*<method>_keys(key, sampler), sampler, params)`` jitted (the key layout they
had before they were kernels: the same bits for the same key), then the NaN policy."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax import smc
from tts_jax.models.base import LanguageModel, as_language_model
from tts_jax.particles import ess
from tts_jax.resampling import Resampler, get_resampler
from tts_jax.rewards.base import Aggregation, StepScorer, as_aggregation, as_step_scorer
from tts_jax.samplers.base import Sampler, run_with_keys
from tts_jax.samplers.lm.checks import check_budget, check_nan, check_prompt, check_prompt_length
from tts_jax.samplers.lm.engine import run_jitted, smc_init
from tts_jax.samplers.lm.scoring import (
    log_odds,
    step_scores,
    with_scorer_state,
)
from tts_jax.samplers.lm.state import (
    DecodeConfig,
    add_budget,
    append_token,
    decode_config,
    init_state,
    make_result,
    sample_token,
    step_separators,
)
from tts_jax.samplers.result import Cost, Result

Array = jax.Array
WEIGHTINGS = ("puri", "twisted")
RESAMPLERS = ("multinomial", "stratified", "systematic")


# --------------------------------------------------------------------------------------------
# Step-level particle filtering
# --------------------------------------------------------------------------------------------
def entropic_temperature(log_weights: Array, progress: Array) -> Array:
    """Annealing temperature of entropic particle filtering.

    ``T = max(1, (1 / ess_ratio) (1 - progress))`` if ``ess_ratio < 0.5`` and ``progress < 0.5``,
    else 1, with ``ess_ratio = ESS(log_weights) / N`` (NaN weights count as zero).

    Args:
        log_weights: ``float32[N]`` untempered log-weights.
        progress: scalar in ``[0, 1]``.

    Returns:
        float32 scalar ``T >= 1``.
    """
    n = log_weights.shape[0]
    ratio = ess(jnp.where(jnp.isnan(log_weights), -jnp.inf, log_weights)) / n
    hot = (ratio < 0.5) & (progress < 0.5)
    return jnp.where(hot, jnp.maximum(1.0, (1.0 - progress) / jnp.maximum(ratio, 1e-30)), 1.0)


def _pinned_resampler(resampler: Resampler, pin: Array) -> Callable[[Array, Array, int], Array]:
    """``resampler``, or conditional resampling keeping ancestor 0 in slot 0 when ``pin``."""

    def conditional(key, log_weights, n):
        ancestors = resampler(key, log_weights, n)
        return ancestors.at[0].set(jnp.where(pin, 0, ancestors[0]))

    return conditional


def _best_alive(scores: Array, log_weights: Array) -> Array:
    alive = jnp.isfinite(log_weights) & ~jnp.isnan(scores)
    return jnp.argmax(jnp.where(alive, scores, -jnp.inf)).astype(jnp.int32)


def token_log_ratio(logits: Array, token: Array, temperature: Array) -> Array:
    """Importance ratio of a token drawn from the LM at ``temperature`` for the untempered LM.

    Args:
        logits: ``float32[N, V]`` next-token logits.
        token: ``int32[N]`` the drawn (or forced) tokens.
        temperature: scalar ``T > 0`` of the proposal ``q_T = softmax(logits / T)``.

    Returns:
        ``float32[N]`` ``log p(token) - log q_T(token)`` with ``p = softmax(logits)`` (0 when
        ``T = 1``; a non-positive ``T`` is read as 1).
    """
    safe = jnp.where(temperature > 0, temperature, 1.0)
    pick = token[:, None]
    scaled = logits / safe
    log_p = jnp.take_along_axis(logits, pick, axis=1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)
    log_q = jnp.take_along_axis(scaled, pick, axis=1)[:, 0] - jax.nn.logsumexp(scaled, axis=-1)
    return log_p - log_q


def _generate_step_weighted(model, state, key, cfg, max_step_tokens, forced, forced_tokens):
    """:func:`~tts_jax.samplers.lm.state.generate_step` (the same draws from the same key) that
    also returns the step's ``sum_t log p(y_t | ...) - log q_T(y_t | ...)`` ``float32[N]`` over
    the tokens each row wrote (forced tokens included; 0 for rows that wrote none)."""

    def cond(carry):
        i, _, paused, _ = carry
        return (i < max_step_tokens) & ~jnp.all(paused)

    def body(carry):
        i, s, paused, log_ratio = carry
        go = ~paused
        token = sample_token(jax.random.fold_in(key, i), s.logits, cfg.temperature)
        copied = jnp.take(forced_tokens, jnp.minimum(s.length, forced_tokens.shape[0] - 1))
        token = jnp.where(forced, copied, token)
        log_ratio = log_ratio + jnp.where(
            go, token_log_ratio(s.logits, token, cfg.temperature), 0.0
        )
        s, ended = append_token(
            model, s, token, go, jnp.broadcast_to(i + 1 >= max_step_tokens, go.shape), cfg
        )
        return i + 1, s, paused | ended, log_ratio

    init = (jnp.int32(0), state, state.done, jnp.zeros(state.done.shape, jnp.float32))
    _, state, _, log_ratio = jax.lax.while_loop(cond, body, init)
    return state, log_ratio


def _pf_callbacks(
    model, scorer, scorer_params, cfg, ref_tokens, *, max_steps, max_step_tokens, aggregation
):
    """``propagate`` / ``log_potential`` of step-level particle filtering (see module doc).

    ``hyper`` (traced, a :class:`PFParams`): ``softmax_temperature``, ``puri`` (absolute
    weights, else twisted), ``anneal`` (entropic tempering), ``has_ref`` (particle 0 replays
    ``ref_tokens``).
    """

    def propagate(key, s, k, hyper):
        all_done = jnp.all(s.done)
        was_done = s.done
        forced = (jnp.arange(s.done.shape[0]) == 0) & hyper.has_ref
        s, log_ratio = _generate_step_weighted(
            model, s, key, cfg, max_step_tokens, forced, ref_tokens
        )

        fresh, s = step_scores(scorer, scorer_params, s, max_step_tokens, aggregation, ~all_done)
        r = jnp.where(was_done, s.score, fresh)
        a = log_odds(r) / hyper.softmax_temperature
        a = a / jnp.where(hyper.anneal, entropic_temperature(a, (k + 1) / max_steps), 1.0)
        absolute = jnp.where(all_done, s.phi, s.phi + a)
        phi = jnp.where(hyper.puri, absolute, a)
        budget = add_budget(s.budget, prm_calls=jnp.where(all_done, 0, jnp.sum(~was_done)))
        s = s._replace(score=r, phi=phi, budget=budget)
        # Twisted: p / q_T of the step's tokens (Puri weights are not importance weights).
        return s, jnp.where(hyper.puri, 0.0, log_ratio)

    def log_potential(s, k, hyper):
        return s.phi

    return propagate, log_potential


class PFParams(NamedTuple):
    """Everything array-valued step-level particle filtering needs (a pytree: a jit argument,
    never static). The weighting is data too, so the plain, twisted, entropic and conditional
    (particle Gibbs) filters of one configuration share one compiled program.

    Attributes:
        model: :class:`~tts_jax.models.base.LanguageModel` or a model with a registered
            adapter (its weights are leaves).
        prompt: ``int32[P]`` prompt tokens, right-padded.
        prompt_length: int32 scalar, the real tokens of ``prompt`` (``1 <= . <= P``).
        scorer_params: parameters of the sampler's scorer (e.g. the PRM module).
        decode: :class:`~tts_jax.samplers.lm.state.DecodeConfig`: sampling ``temperature`` of
            the proposal ``q_T``, step separators ``sep_ids int32[S']`` (``[-1]``: none),
            ``stop_ids int32[S]``, ``pad_id``.
        softmax_temperature: float32 scalar ``T_softmax`` of the weights.
        ess_threshold: float32 scalar: resample when ``ESS < threshold * N``.
        puri: bool scalar: Puri et al.'s absolute weights (else twisted SMC).
        anneal: bool scalar: entropic tempering of the absolute weights.
        has_ref: bool scalar: particle 0 replays ``reference`` and is never resampled away.
        reference: ``int32[L]`` the reference completion of a conditional sweep.
    """

    model: Any
    prompt: Array
    prompt_length: Array
    scorer_params: Any
    decode: DecodeConfig
    softmax_temperature: Array
    ess_threshold: Array
    puri: Array
    anneal: Array
    has_ref: Array
    reference: Array


def make_pf_params(
    model,
    prompt,
    scorer_params,
    *,
    max_new_tokens: int,
    temperature=0.8,
    softmax_temperature=1.0,
    sep_id=None,
    sep_ids=None,
    stop_ids=None,
    pad_id=0,
    weighting: str = "puri",
    anneal=False,
    ess_threshold=None,
    prompt_length=None,
    reference=None,
) -> PFParams:
    """:class:`PFParams` from Python or array values. ``ess_threshold=None``: 1.0 for
    ``puri`` (every step unless the weights are exactly uniform), 0.5 for ``twisted``;
    ``prompt_length=None``: all of ``prompt``; ``reference=None``: an unconditional filter.
    No checks (:func:`check_pf_params`) beyond the weighting's name.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {weighting!r}; known: {WEIGHTINGS}")
    if ess_threshold is None:
        ess_threshold = 1.0 if weighting == "puri" else 0.5
    prompt = jnp.asarray(prompt, jnp.int32)
    length = prompt.shape[0] if prompt_length is None else prompt_length
    ref = jnp.zeros((max_new_tokens,), jnp.int32) if reference is None else reference
    return PFParams(
        model,
        prompt,
        jnp.asarray(length, jnp.int32),
        scorer_params,
        decode_config(temperature, step_separators(sep_id, sep_ids), stop_ids, pad_id),
        jnp.asarray(softmax_temperature, jnp.float32),
        jnp.asarray(ess_threshold, jnp.float32),
        jnp.asarray(weighting == "puri"),
        jnp.asarray(anneal),
        jnp.asarray(reference is not None),
        jnp.asarray(ref, jnp.int32),
    )


def check_pf_params(params: PFParams, sampler: Sampler, method: str = "particle_filter") -> None:
    """Host-side checks of ``params`` (values only when concrete: traced ones are skipped).

    Raises:
        ValueError: a bad prompt or prompt length, a reference that is not 1-D, a
            twisted weighting with a temperature ``<= 0`` (no ``p / q`` correction).
    """
    prompt = check_prompt(params.prompt)
    if not isinstance(params.prompt_length, jax.core.Tracer):
        check_prompt_length(prompt, params.prompt_length)
    if np.ndim(params.reference) != 1:
        raise ValueError(
            f"{method}: reference must be int32[L] (the completion buffer), "
            f"got shape {np.shape(params.reference)}"
        )
    concrete = not any(
        isinstance(v, jax.core.Tracer) for v in (params.puri, params.decode.temperature)
    )
    if concrete and not bool(params.puri) and np.any(np.asarray(params.decode.temperature) <= 0):
        raise ValueError(
            f"weighting='twisted' needs a temperature > 0 (a proposal with full "
            f"support for the p / q correction), got {params.decode.temperature}"
        )


def pf_sampler(
    num_particles: int,
    max_steps: int,
    max_step_tokens: int,
    max_new_tokens: int,
    scorer: StepScorer | Callable,
    aggregation: str | Aggregation = "last",
    resampler: str | Resampler = "multinomial",
) -> Sampler:
    """Step-level particle filtering (Puri et al. 2025, docs/algorithms.md 4.1; twisted
    weighting: 4.2) as a :class:`~tts_jax.samplers.base.Sampler` of static configuration only
    (memoized: equal arguments give the same sampler). The weighting (``puri`` / ``twisted``),
    entropic annealing and the Gibbs reference are data of :class:`PFParams`: one compiled
    program serves :func:`particle_filter`, :func:`entropic_particle_filter` and
    :func:`particle_gibbs` of one configuration.

    ``max_steps`` SMC steps (a ``lax.scan``: steps after every particle is done keep their
    particles; ``keys_per_step = 2``), never resampling after the last one. The state is an
    :class:`SMCCarry` (its ``key`` draws the next Gibbs reference in ``finalize``), the result
    the :class:`~tts_jax.samplers.result.Result` of :func:`particle_filter`, with
    ``info.num_nan`` and ``info.extra["next_reference"] int32[L]``. :func:`particle_filter` runs it
    with :func:`pf_keys`.

    Args:
        num_particles: N.
        max_steps: K SMC steps.
        max_step_tokens: token limit of one step.
        max_new_tokens: L, the completion buffer.
        scorer: :class:`~tts_jax.rewards.base.StepScorer` or a plain sequence scorer (hashed).
        aggregation: an :class:`~tts_jax.rewards.base.Aggregation` or its name: ``last`` |
            ``min`` | ``prod`` | ``model``.
        resampler: a name in :mod:`tts_jax.resampling` or any ``(key, log_weights [N], num) ->
            int32[num]`` function (pinned to keep particle 0 when ``params.has_ref``).

    Raises:
        ValueError: an empty budget, an unknown aggregation or resampler name.
    """
    check_budget(num_particles, max_new_tokens, max_steps, max_step_tokens)
    aggregation = as_aggregation(aggregation)
    if isinstance(resampler, str) and resampler not in RESAMPLERS:
        raise ValueError(f"unknown resampler {resampler!r}; known: {RESAMPLERS}")
    return _pf_sampler(
        int(num_particles),
        int(max_steps),
        int(max_step_tokens),
        int(max_new_tokens),
        scorer,
        aggregation,
        get_resampler(resampler),
    )


@functools.cache
def _pf_sampler(n, max_steps, max_step_tokens, length, scorer, aggregation, resampler):
    def callbacks(params):
        return _pf_callbacks(
            as_language_model(params.model),
            as_step_scorer(scorer),
            params.scorer_params,
            params.decode,
            params.reference,
            max_steps=max_steps,
            max_step_tokens=max_step_tokens,
            aggregation=aggregation,
        )

    def init(key, params):
        model = as_language_model(params.model)
        state = init_state(
            model,
            params.prompt,
            n,
            length,
            params.decode.pad_id,
            prompt_length=params.prompt_length,
        )
        state = with_scorer_state(
            as_step_scorer(scorer), params.scorer_params, state, params.prompt, params.prompt_length
        )
        return smc_init(key, state, callbacks(params)[1], params)

    def step(keys, carry, params):
        propagate, log_potential = callbacks(params)
        mask = jnp.arange(max_steps) < max_steps - 1  # never resample after the last step
        schedule = smc.ResampleSchedule(mask, params.ess_threshold)
        new, info = smc.step(
            keys,
            carry.smc,
            propagate,
            log_potential,
            schedule,
            params,
            _pinned_resampler(resampler, params.has_ref),
        )
        return carry._replace(smc=new), info

    def finalize(carry, infos, params):
        final = carry.smc
        state, lw = final.particles.state, final.particles.log_weights
        all_dead = ~jnp.isfinite(final.log_evidence)
        info = infos._asdict()
        del info["observed"]  # no per-step observation requested
        info["num_nan"] = jnp.sum(infos.num_nan_potentials) + carry.num_nan_initial
        # The reference of the next Gibbs sweep, drawn by final weight.
        ref = jax.random.categorical(carry.key, jnp.where(jnp.isnan(lw), -jnp.inf, lw))
        info["next_reference"] = state.tokens[ref]
        log_z = jnp.where(params.puri, jnp.nan, final.log_evidence)
        log_z = jnp.where(all_dead, -jnp.inf, log_z)
        return make_result(state, lw, _best_alive(state.score, lw), log_z, all_dead, info)

    return Sampler(init, step, finalize, max_steps, keys_per_step=2)


def pf_keys(key: Array, sampler: Sampler) -> tuple[Array, Array]:
    """``(init_key, step_keys Key[K, 2])`` of :func:`particle_filter`'s key layout (``k_run,
    k_ref = split(key)``; step ``k``: ``split(fold_in(k_run, k))``; ``k_ref`` draws the next
    Gibbs reference): with them, ``jax.jit(run_with_keys, static_argnames="sampler")(
    *pf_keys(key, sampler), sampler, params)`` is :func:`particle_filter` bit for bit (without
    its host-side checks)."""
    k_run, k_ref = jax.random.split(key)
    return k_ref, smc.step_keys(k_run, sampler.num_steps)


def _run_pf(
    key,
    model,
    prompt,
    scorer,
    scorer_params,
    *,
    num_particles,
    max_steps,
    max_step_tokens,
    max_new_tokens,
    temperature,
    softmax_temperature,
    sep_id,
    sep_ids,
    stop_ids,
    pad_id,
    aggregation,
    weighting,
    anneal,
    resampler,
    ess_threshold,
    nan_policy,
    prompt_length=None,
    reference=None,
    method="particle_filter",
):
    sampler = pf_sampler(
        num_particles, max_steps, max_step_tokens, max_new_tokens, scorer, aggregation, resampler
    )
    prompt = check_prompt(prompt)
    length = check_prompt_length(prompt, prompt_length)
    params = make_pf_params(
        model,
        prompt,
        scorer_params,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        softmax_temperature=softmax_temperature,
        sep_id=sep_id,
        sep_ids=sep_ids,
        stop_ids=stop_ids,
        pad_id=pad_id,
        weighting=weighting,
        anneal=anneal,
        ess_threshold=ess_threshold,
        prompt_length=length,
        reference=reference,
    )
    check_pf_params(params, sampler, method)
    result = run_jitted(*pf_keys(key, sampler), sampler, params)
    check_nan(int(result.info.num_nan), method, nan_policy)
    return result


def particle_filter(
    key: Array,
    model: LanguageModel,
    prompt,
    scorer: StepScorer,
    scorer_params: Any,
    *,
    num_particles: int,
    max_steps: int,
    max_step_tokens: int,
    max_new_tokens: int,
    temperature: float | Array = 0.8,
    softmax_temperature: float | Array = 1.0,
    sep_id: int | None = None,
    sep_ids: Sequence[int] | Array | None = None,
    stop_ids=None,
    pad_id: int = 0,
    aggregation: str | Aggregation = "last",
    weighting: str = "puri",
    resampler: str = "multinomial",
    ess_threshold: float | Array | None = None,
    nan_policy: str = "raise",
    prompt_length: int | None = None,
) -> Result:
    """Step-level particle filtering with a process reward model (Puri et al. 2025).

    Args:
        key: PRNG key.
        model: the policy, a :class:`~tts_jax.models.base.LanguageModel` or a model with a
            registered adapter (:func:`~tts_jax.models.base.as_language_model`; e.g. the
            transformer :class:`~tts_jax.models.lm.LM`).
        prompt: ``int[P]`` prompt tokens (prefilled once).
        scorer: :class:`~tts_jax.rewards.base.StepScorer` (e.g.
            :data:`~tts_jax.models.lm_reward.prm_scorer`, or
            :data:`~tts_jax.models.lm_reward.cached_prm_scorer`: the same scores from a PRM KV
            cache kept per particle, fed one step at a time), or a plain function of whole
            sequences (:mod:`~tts_jax.samplers.lm.scoring`); static, hashed.
        scorer_params: its parameters (e.g. the PRM module; traced).
        num_particles: N (static).
        max_steps: K SMC steps (static); particles not done after K steps are returned
            unfinished.
        max_step_tokens: token limit of one step (static).
        max_new_tokens: L, completion buffer (static; a full buffer finishes a particle).
        temperature: LM sampling temperature ``T`` of the proposal ``q_T`` (array; default 0.8
            as in the paper). ``twisted`` needs ``T > 0`` and corrects ``q_T`` back to the
            untempered LM; ``puri`` does not correct it (module docstring).
        softmax_temperature: ``T_softmax`` of the weights (array). ``T -> inf``: uniform weights,
            independent sampling; ``T -> 0``: greedy selection of the best-scored prefix.
        sep_id: step separator token (``None``: steps end only at ``max_step_tokens``).
        sep_ids: instead of ``sep_id``, a set of tokens that end a step (e.g. every token whose
            text ends with a blank line,
            :func:`~tts_jax.app.tasks.math.prm_format.separator_token_ids`); ``sep_id=s`` is
            ``sep_ids=[s]``, bit for bit.
        stop_ids: token id(s) that finish a particle (EOS, answer marker).
        pad_id: buffer filler.
        aggregation: an :class:`~tts_jax.rewards.base.Aggregation` or its name: ``last`` |
            ``min`` | ``prod`` | ``model``.
        weighting: ``puri`` (absolute softmax weights, tilting ``q_T``) or ``twisted``
            (incremental importance ratios targeting ``p(y | x) odds^(1 / T_softmax) / Z``; see
            the module docstring for both targets).
        resampler: ``multinomial`` (paper) | ``stratified`` | ``systematic``.
        ess_threshold: resample when ``ESS < threshold * N`` (array); default 1.0 for ``puri``
            (every step unless exactly uniform), 0.5 for ``twisted``.
        nan_policy: ``raise`` (NaN scores are an error) or ``drop`` (documented fallback: the
            particle gets weight zero).
        prompt_length: real tokens of a right-padded ``prompt`` (traced: prompts padded to one
            width share one compiled program); ``None``: all of ``prompt``.

    Returns:
        :class:`~tts_jax.samplers.result.Result` (``info`` holds the SMC diagnostics per
        step: ``ess``, ``resampled``, ``ancestors``, ``unique_ancestors``, ...).

    Raises:
        ValueError: empty budget, unknown options, bad prompt, NaN scores (``raise`` policy),
            ``twisted`` with a temperature ``<= 0``.
    """
    return _run_pf(
        key,
        model,
        prompt,
        scorer,
        scorer_params,
        num_particles=num_particles,
        max_steps=max_steps,
        max_step_tokens=max_step_tokens,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        softmax_temperature=softmax_temperature,
        sep_id=sep_id,
        sep_ids=sep_ids,
        stop_ids=stop_ids,
        pad_id=pad_id,
        aggregation=aggregation,
        weighting=weighting,
        anneal=False,
        resampler=resampler,
        ess_threshold=ess_threshold,
        nan_policy=nan_policy,
        prompt_length=prompt_length,
    )


def entropic_particle_filter(
    key: Array,
    model: LanguageModel,
    prompt,
    scorer: StepScorer,
    scorer_params: Any,
    *,
    num_particles: int,
    max_steps: int,
    max_step_tokens: int,
    max_new_tokens: int,
    temperature: float | Array = 0.8,
    softmax_temperature: float | Array = 1.0,
    sep_id: int | None = None,
    sep_ids: Sequence[int] | Array | None = None,
    stop_ids=None,
    pad_id: int = 0,
    aggregation: str | Aggregation = "last",
    nan_policy: str = "raise",
    prompt_length: int | None = None,
) -> Result:
    """Entropic particle filtering: Puri weights annealed by :func:`entropic_temperature` while
    the ESS is low early on (premature-exploitation fix), systematic resampling, untempered
    argmax (``best``). Arguments as :func:`particle_filter`.
    """
    return _run_pf(
        key,
        model,
        prompt,
        scorer,
        scorer_params,
        num_particles=num_particles,
        max_steps=max_steps,
        max_step_tokens=max_step_tokens,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        softmax_temperature=softmax_temperature,
        sep_id=sep_id,
        sep_ids=sep_ids,
        stop_ids=stop_ids,
        pad_id=pad_id,
        aggregation=aggregation,
        weighting="puri",
        anneal=True,
        resampler="systematic",
        ess_threshold=None,
        nan_policy=nan_policy,
        prompt_length=prompt_length,
        method="entropic_particle_filter",
    )


def particle_gibbs(
    key: Array,
    model: LanguageModel,
    prompt,
    scorer: StepScorer,
    scorer_params: Any,
    *,
    num_particles: int,
    num_sweeps: int,
    max_steps: int,
    max_step_tokens: int,
    max_new_tokens: int,
    temperature: float | Array = 0.8,
    softmax_temperature: float | Array = 1.0,
    sep_id: int | None = None,
    sep_ids: Sequence[int] | Array | None = None,
    stop_ids=None,
    pad_id: int = 0,
    aggregation: str | Aggregation = "last",
    weighting: str = "puri",
    nan_policy: str = "raise",
    prompt_length: int | None = None,
) -> Result:
    """Particle Gibbs over step-level particle filtering (Puri et al. 2025).

    The particle budget is split across sweeps: each sweep runs ``num_particles // num_sweeps``
    particles. Sweep 1 is a plain filter; every later sweep is conditional: particle 0 replays the
    reference trajectory (drawn by final weight from the previous sweep, its separators and stop
    token included, so its steps line up) and is never resampled away. Other arguments as
    :func:`particle_filter`.

    Returns:
        The last sweep's :class:`~tts_jax.samplers.result.Result`, with ``cost`` and
        ``info.num_nan`` summed over all sweeps and ``info.extra["references"]``
        (``int32[num_sweeps - 1, L]``) the reference of each conditional sweep. The kernel is
        :func:`gibbs_sampler` (one kernel step per sweep), run with :func:`gibbs_keys`.

    Raises:
        ValueError: fewer than 2 particles per sweep, or as :func:`particle_filter`.
    """
    sampler = gibbs_sampler(
        num_particles, num_sweeps, max_steps, max_step_tokens, max_new_tokens, scorer, aggregation
    )
    prompt = check_prompt(prompt)
    length = check_prompt_length(prompt, prompt_length)
    params = make_pf_params(
        model,
        prompt,
        scorer_params,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        softmax_temperature=softmax_temperature,
        sep_id=sep_id,
        sep_ids=sep_ids,
        stop_ids=stop_ids,
        pad_id=pad_id,
        weighting=weighting,
        prompt_length=length,
    )
    check_pf_params(params, sampler, "particle_gibbs")
    result = run_jitted(*gibbs_keys(key, sampler), sampler, params)
    check_nan(int(result.info.num_nan), "particle_gibbs", nan_policy)
    return result


class GibbsCarry(NamedTuple):
    """State of :func:`gibbs_sampler` between sweeps: the reference trajectory ``int32[L]`` of
    the next sweep and whether it is used (``False`` before the first sweep)."""

    reference: Array
    has_ref: Array


def gibbs_sampler(
    num_particles: int,
    num_sweeps: int,
    max_steps: int,
    max_step_tokens: int,
    max_new_tokens: int,
    scorer: StepScorer | Callable,
    aggregation: str | Aggregation = "last",
) -> Sampler:
    """Particle Gibbs over step-level particle filtering (Puri et al. 2025, docs/algorithms.md
    4.1) as a :class:`~tts_jax.samplers.base.Sampler` of static configuration (memoized).

    One kernel step is one whole sweep: the filter :func:`pf_sampler` (``num_particles //
    num_sweeps`` particles, multinomial resampling) run with ``params`` (a :class:`PFParams`;
    its ``reference`` / ``has_ref`` are replaced by the carried :class:`GibbsCarry`), whose
    ``next_reference`` becomes the next sweep's reference. The result is the last sweep's
    :class:`~tts_jax.samplers.result.Result` with ``cost`` and ``info.num_nan``
    summed over the sweeps and ``info.extra["references"] int32[num_sweeps - 1, L]``.
    :func:`particle_gibbs` runs it with :func:`gibbs_keys`.

    Raises:
        ValueError: fewer than 2 particles per sweep, or as :func:`pf_sampler`.
    """
    if num_sweeps < 1 or num_particles // max(num_sweeps, 1) < 2:
        raise ValueError(
            f"particle_gibbs needs num_sweeps >= 1 and at least 2 particles per "
            f"sweep, got num_particles={num_particles}, num_sweeps={num_sweeps}"
        )
    inner = pf_sampler(
        num_particles // num_sweeps,
        max_steps,
        max_step_tokens,
        max_new_tokens,
        scorer,
        aggregation,
        "multinomial",
    )
    return _gibbs_sampler(inner, int(num_sweeps), int(max_new_tokens))


@functools.cache
def _gibbs_sampler(inner: Sampler, num_sweeps: int, length: int) -> Sampler:
    def init(key, params):
        return GibbsCarry(jnp.zeros((length,), jnp.int32), jnp.asarray(False))

    def step(key, carry, params):
        sweep = params._replace(reference=carry.reference, has_ref=carry.has_ref)
        result = run_with_keys(*pf_keys(key, inner), inner, sweep)
        return GibbsCarry(result.info.extra["next_reference"], jnp.asarray(True)), result

    def finalize(carry, sweeps, params):
        last = jax.tree.map(lambda a: a[-1], sweeps)
        extra = {
            **last.info.extra,
            "references": sweeps.info.extra["next_reference"][:-1],
            "lm_calls": jnp.sum(sweeps.info.extra["lm_calls"], axis=0),
        }
        info = last.info._replace(num_nan=jnp.sum(sweeps.info.num_nan), extra=extra)
        cost = Cost(*(jnp.sum(c, axis=0) for c in sweeps.cost))
        return last._replace(cost=cost, info=info)

    return Sampler(init, step, finalize, num_sweeps)


def gibbs_keys(key: Array, sampler: Sampler) -> tuple[Array, Array]:
    """``(init_key, sweep_keys Key[S])`` of :func:`particle_gibbs`'s key layout (sweep ``s``:
    ``fold_in(key, s)``, then :func:`pf_keys`)."""
    return key, smc.step_keys_for(key, sampler.num_steps)
