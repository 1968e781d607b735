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
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax.models.lm_reward import RewardModel, prm_scores

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


def log_odds(score: Array) -> Array:
    """``logit(r) = log r - log(1 - r)`` with ``r`` clipped to ``[eps, 1 - eps]`` (NaN stays)."""
    r = jnp.clip(score, SCORE_EPS, 1.0 - SCORE_EPS)
    return jnp.log(r) - jnp.log1p(-r)
