"""Pluggable step scorers for the LM steering samplers and PRM score aggregation.

A step scorer has the signature of :func:`tts_jax.models.lm_reward.prm_scores`::

    scorer(scorer_params, tokens int32[N, T], step_ends bool[N, T]) -> float32[N, T]

returning, at every marked step end, the probability in ``[0, 1]`` that the solution is correct
so far (values elsewhere are ignored). ``tokens`` are prompt + completion, right-padded.
``scorer_params`` is any pytree (e.g. the PRM module) passed as a traced argument, so one compiled
program serves any weights. Scorers are in-graph JAX; :func:`host_scorer` wraps a NumPy function
behind one explicit host boundary (``jax.pure_callback``). Scorers are static arguments of the
jitted runners, hashed by identity: define them once.

Aggregation of per-step scores into one score per partial solution (Puri et al. 2025, "A
Probabilistic Inference Approach to Inference-Time Scaling of LLMs using Particle-Based Monte
Carlo Methods", ALGORITHMS.md 4.1): ``last`` (the newest step's score, the default), ``min``,
``prod``, or ``model`` (only the final position is marked, so the PRM scores the whole response as
one step).

A PRM scorer re-reads the whole prompt + completion at every step (``[N, P + L]`` tokens per
call, quadratic in the number of steps). :data:`cached_prm_scorer` keeps the PRM's own KV cache in
each particle's state instead and feeds it only the tokens written since the last step, with the
same scores (causal attention). The step-level samplers (particle filters, best-of-N, beam
search, DVTS) feed it one step at a time through :func:`step_scores`; called directly it is
:func:`prm_scorer`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax.models.lm import KVCache, init_cache
from tts_jax.models.lm_reward import RewardModel, prm_scores, reward_logits
from tts_jax.particles import gather
from tts_jax.samplers.lm_state import LMState, prompt_length_row, sequences

Array = jax.Array
StepScorer = Callable[[Any, Array, Array], Array]
AGGREGATIONS = ("last", "min", "prod", "model")
SCORE_EPS = 1e-6  # scores are clipped to [eps, 1 - eps] before the logit


def prm_scorer(prm: RewardModel, tokens: Array, step_ends: Array) -> Array:
    """In-graph step scorer for a 2-label :class:`~tts_jax.models.lm_reward.RewardModel` PRM.

    A full PRM forward over ``[N, T]`` (no cache), read at the step ends.

    Args:
        prm: the PRM (``scorer_params``).
        tokens: ``int32[N, T]`` prompt + completion.
        step_ends: ``bool[N, T]``.

    Returns:
        ``float32[N, T]`` ``P(correct)`` at step ends, 0 elsewhere.
    """
    return prm_scores(prm, tokens, step_ends)


class PRMCache(NamedTuple):
    """Per-particle state of :class:`CachedPRMScorer` (leading axis ``N``).

    Attributes:
        cache: the PRM's :class:`~tts_jax.models.lm.KVCache` over the prompt and the fed tokens.
        fed: ``int32[N]`` completion tokens already fed.
        last: ``float32[N]`` score of the newest step end (0 before any).
        low: ``float32[N]`` minimum step score (``+inf`` before any).
        log_prod: ``float32[N]`` sum of the log step scores (0 before any).
    """

    cache: KVCache
    fed: Array
    last: Array
    low: Array
    log_prod: Array


class CachedPRMScorer:
    """Step scorer for a 2-label PRM that keeps the PRM's KV cache per particle.

    Called as a :data:`StepScorer` (``scorer(prm, tokens, step_ends)``) it is :func:`prm_scorer`.
    The step-level samplers of :mod:`~tts_jax.samplers.lm_smc` and
    :mod:`~tts_jax.samplers.lm_search` see ``incremental = True`` and instead call :meth:`init`
    once (prefill the prompt on one row, broadcast to ``N``) and :meth:`update` after every step
    (feed each row its new tokens, at most one step's worth): a PRM pass over ``window`` token
    positions per particle and step (each written token is fed once) instead of ``P + L``.
    The state is part of :class:`~tts_jax.samplers.lm_state.LMState` and is resampled with it.
    Use the module's instance :data:`cached_prm_scorer` (runners compile per scorer object).
    """

    incremental = True

    def __call__(self, prm: RewardModel, tokens: Array, step_ends: Array) -> Array:
        return prm_scores(prm, tokens, step_ends)

    @staticmethod
    def init(prm: RewardModel, prompt: Array, prompt_length: Array | None, num_particles: int,
             max_new_tokens: int) -> PRMCache:
        """Prefill ``prompt`` (``int32[P]``, right-padded to ``prompt_length``) once and
        broadcast it to ``num_particles`` rows of a cache for ``P + max_new_tokens`` tokens."""
        if prm.num_labels != 2:
            raise ValueError(f"cached_prm_scorer needs a 2-label PRM head, got num_labels="
                             f"{prm.num_labels}")
        rows = init_cache(prm.config, 1, prompt.shape[0] + max_new_tokens)
        _, cache = reward_logits(prm, prompt[None, :], rows,
                                 prompt_length_row(prompt, prompt_length))
        n = num_particles
        zeros = jnp.zeros((n,), jnp.float32)
        return PRMCache(gather(cache, jnp.zeros((n,), jnp.int32)), jnp.zeros((n,), jnp.int32),
                        zeros, jnp.full((n,), jnp.inf, jnp.float32), zeros)

    @staticmethod
    def update(prm: RewardModel, state: PRMCache, completion: Array, length: Array,
               step_ends: Array, window: int, how: str) -> tuple[Array, PRMCache]:
        """Feed every row its completion tokens ``[fed, length)`` and aggregate the new step
        ends' scores.

        Args:
            completion: ``int32[N, L]`` completion buffer; ``length``: ``int32[N]`` tokens written.
            step_ends: ``bool[N, L]`` step-end marks of the completion.
            window: static bound on the tokens a row writes between two updates (one step).
            how: aggregation (see :func:`aggregate`).

        Returns:
            ``(score float32[N], state)``: the same aggregate as :func:`score_sequences` with a
            PRM scorer over the whole prompt + completion.
        """
        positions = state.fed[:, None] + jnp.arange(window, dtype=jnp.int32)[None, :]
        safe = jnp.minimum(positions, completion.shape[1] - 1)
        tokens = jnp.take_along_axis(completion, safe, axis=1)
        ends = jnp.take_along_axis(step_ends, safe, axis=1) & (positions < length[:, None])
        logits, cache = reward_logits(prm, tokens, state.cache, length - state.fed)
        p = jax.nn.softmax(logits, axis=-1)[..., 1]
        newest = jnp.sum(jnp.where(last_step_only(ends), p, 0.0), axis=1)
        last = jnp.where(jnp.any(ends, axis=1), newest, state.last)
        low = jnp.minimum(state.low, jnp.min(jnp.where(ends, p, jnp.inf), axis=1))
        log_prod = state.log_prod + jnp.sum(jnp.where(ends, jnp.log(p), 0.0), axis=1)
        state = PRMCache(cache, length, last, low, log_prod)
        return CachedPRMScorer.read(state, how), state

    @staticmethod
    def read(state: PRMCache, how: str) -> Array:
        """The aggregate ``float32[N]`` of every step end fed so far (see :func:`aggregate`)."""
        return {"last": state.last, "model": state.last, "min": state.low,
                "prod": jnp.exp(state.log_prod)}[how]


cached_prm_scorer = CachedPRMScorer()


def host_scorer(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> StepScorer:
    """Wrap a host (NumPy / Python) step scorer behind ``jax.pure_callback``.

    Args:
        fn: ``(tokens int[N, T], step_ends bool[N, T]) -> float[N, T]``, e.g. an exact step
            checker on decoded text. It must be a pure function of its inputs.

    Returns:
        A :data:`StepScorer` ignoring ``scorer_params``. Create it once and reuse it: runners
        compile per scorer object.
    """
    def scorer(_params, tokens, step_ends):
        out = jax.ShapeDtypeStruct(tokens.shape, jnp.float32)
        return jax.pure_callback(lambda t, m: np.asarray(fn(t, m), np.float32), out, tokens,
                                 step_ends, vmap_method="sequential")

    return scorer


def last_step_only(step_ends: Array) -> Array:
    """Keep only the last marked position of each row of ``bool[N, T]``."""
    t = step_ends.shape[1]
    last = jnp.max(jnp.where(step_ends, jnp.arange(t)[None, :], -1), axis=1)
    return jnp.arange(t)[None, :] == last[:, None]


def aggregate(scores: Array, step_ends: Array, how: str) -> Array:
    """Aggregate per-step scores ``float32[N, T]`` over the marked ``bool[N, T]`` positions.

    Args:
        scores: scorer output.
        step_ends: positions to aggregate (at least one per row for a meaningful score).
        how: ``last`` | ``min`` | ``prod`` | ``model`` (``model`` reads the last position, like
            ``last``; the difference is in which positions the scorer was shown).

    Returns:
        ``float32[N]`` (NaN propagates so callers can report it).
    """
    if how in ("last", "model"):
        return jnp.sum(jnp.where(last_step_only(step_ends), scores, 0.0), axis=1)
    if how == "min":
        return jnp.min(jnp.where(step_ends, scores, jnp.inf), axis=1)
    if how == "prod":
        return jnp.exp(jnp.sum(jnp.where(step_ends, jnp.log(scores), 0.0), axis=1))
    raise ValueError(f"unknown aggregation {how!r}; known: {AGGREGATIONS}")


def score_sequences(scorer: StepScorer, scorer_params: Any, tokens: Array, step_ends: Array,
                    how: str) -> Array:
    """Aggregated score ``float32[N]`` of prompt + completion ``tokens`` (one scorer call).

    Args:
        scorer: :data:`StepScorer`.
        scorer_params: its parameters.
        tokens: ``int32[N, T]``.
        step_ends: ``bool[N, T]`` step ends of the completions.
        how: aggregation (see :func:`aggregate`).
    """
    if how not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {how!r}; known: {AGGREGATIONS}")
    ends = last_step_only(step_ends) if how == "model" else step_ends
    return aggregate(scorer(scorer_params, tokens, ends), ends, how)


def is_incremental(scorer: StepScorer) -> bool:
    """Whether the samplers should keep ``scorer``'s state in the particles and feed it one step
    at a time (:class:`CachedPRMScorer`) instead of rescoring whole sequences."""
    return getattr(scorer, "incremental", False)


def with_scorer_state(scorer: StepScorer, scorer_params: Any, state: LMState, prompt: Array,
                      prompt_length: Array | None) -> LMState:
    """``state`` (fresh from :func:`~tts_jax.samplers.lm_state.init_state`) with the incremental
    scorer's initial state; unchanged for other scorers."""
    if not is_incremental(scorer):
        return state
    n, max_new_tokens = state.tokens.shape
    return state._replace(scorer_state=scorer.init(scorer_params, prompt, prompt_length, n,
                                                   max_new_tokens))


def step_scores(scorer: StepScorer, scorer_params: Any, state: LMState, prompt: Array,
                prompt_length: Array | None, window: int, how: str,
                needed: Array) -> tuple[Array, LMState]:
    """Aggregated scores ``float32[N]`` of the particles after a step, and the state.

    A full-sequence scorer runs only when ``needed`` (traced bool; else the previous
    ``state.score`` is returned), inside a ``lax.cond``. An incremental scorer is fed every step
    (each token must reach its cache once; a row with no new tokens is left unchanged) and no
    conditional copies its cache; its scores replace ``state.score`` only when ``needed``.

    Args:
        window: static bound on the tokens a particle writes in one step.
    """
    if is_incremental(scorer):
        fresh, scorer_state = scorer.update(scorer_params, state.scorer_state, state.tokens,
                                            state.length, state.step_ends, window, how)
        return (jnp.where(needed, fresh, state.score),
                state._replace(scorer_state=scorer_state))
    return _rescored(scorer, scorer_params, state, prompt, prompt_length, how, needed), state


def final_scores(scorer: StepScorer, scorer_params: Any, state: LMState, prompt: Array,
                 prompt_length: Array | None, how: str, needed: Array) -> Array:
    """Aggregated scores ``float32[N]`` of the finished particles when ``needed`` (traced bool),
    else ``state.score``: for samplers that score only at the end. An incremental scorer, fed
    by :func:`step_scores` at every step, already holds them; others rescore once."""
    if is_incremental(scorer):
        return jnp.where(needed, scorer.read(state.scorer_state, how), state.score)
    return _rescored(scorer, scorer_params, state, prompt, prompt_length, how, needed)


def _rescored(scorer, scorer_params, state, prompt, prompt_length, how, needed) -> Array:
    """Full-sequence scores of ``state``'s particles inside a ``lax.cond`` on ``needed``."""

    def full(st):
        tokens, ends = sequences(prompt, st, prompt_length)
        return score_sequences(scorer, scorer_params, tokens, ends, how)

    return jax.lax.cond(needed, full, lambda st: st.score, state)


def log_odds(score: Array) -> Array:
    """``logit(r) = log r - log(1 - r)`` with ``r`` clipped to ``[eps, 1 - eps]`` (NaN stays)."""
    r = jnp.clip(score, SCORE_EPS, 1.0 - SCORE_EPS)
    return jnp.log(r) - jnp.log1p(-r)
