"""Step scorers inside the LM steering samplers: scorer state, step and final scores, weights.

The samplers consume any :class:`~tts_jax.rewards.base.StepScorer` (``init`` / ``update`` /
``read`` over a per-particle state kept in ``LMState.scorer_state``) and its traced
``scorer_params``; a plain function ``scorer(scorer_params, tokens int32[N, T], step_ends
bool[N, T]) -> float32[N, T]`` of whole prompt + completion sequences (the probability that the
solution is correct so far at every marked step end) is accepted too and used as a
:class:`~tts_jax.rewards.base.RescoringScorer` (:func:`~tts_jax.rewards.base.as_step_scorer`).
Scorers are static arguments of the jitted runners, hashed: define them once. In-graph scorers
are JAX; :func:`host_scorer` wraps a NumPy function behind one explicit host boundary
(``jax.pure_callback``). The PRM scorers (:data:`~tts_jax.models.lm_reward.prm_scorer`, and
:data:`~tts_jax.models.lm_reward.cached_prm_scorer` that keeps the PRM's KV cache per particle)
live with the PRM in :mod:`tts_jax.models.lm_reward`; this module depends on no model.

Aggregation of per-step scores into one score per partial solution (Puri et al. 2025, "A
Probabilistic Inference Approach to Inference-Time Scaling of LLMs using Particle-Based Monte
Carlo Methods", docs/algorithms.md 4.1): ``last`` (the newest step's score, the default), ``min``,
``prod``, or ``model`` (only the final position is marked, so the PRM scores the whole response as
one step); see :func:`~tts_jax.rewards.base.aggregate`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax.rewards.base import (
    AGGREGATIONS,
    Aggregation,
    RescoringScorer,
    SequenceScoreFn,
    StepScorer,
    aggregate,
    as_step_scorer,
    last_step_only,
    score_sequences,
)
from tts_jax.samplers.lm.state import LMState

Array = jax.Array
SCORE_EPS = 1e-6  # scores are clipped to [eps, 1 - eps] before the logit

__all__ = [
    "AGGREGATIONS",
    "SCORE_EPS",
    "RescoringScorer",
    "SequenceScoreFn",
    "StepScorer",
    "aggregate",
    "as_step_scorer",
    "final_scores",
    "host_scorer",
    "last_step_only",
    "log_odds",
    "score_sequences",
    "step_scores",
    "with_scorer_state",
]


def host_scorer(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> RescoringScorer:
    """Wrap a host (NumPy / Python) sequence scorer behind ``jax.pure_callback``.

    Args:
        fn: ``(tokens int[N, T], step_ends bool[N, T]) -> float[N, T]``, e.g. an exact step
            checker on decoded text. It must be a pure function of its inputs.

    Returns:
        A :class:`~tts_jax.rewards.base.RescoringScorer` ignoring ``scorer_params`` (callable as
        ``scorer(params, tokens, step_ends)``). Create it once and reuse it: runners compile per
        scorer object.
    """

    def scorer(_params, tokens, step_ends):
        out = jax.ShapeDtypeStruct(tokens.shape, jnp.float32)
        return jax.pure_callback(
            lambda t, m: np.asarray(fn(t, m), np.float32),
            out,
            tokens,
            step_ends,
            vmap_method="sequential",
        )

    return RescoringScorer(scorer)


def with_scorer_state(
    scorer: StepScorer | SequenceScoreFn,
    scorer_params: Any,
    state: LMState,
    prompt: Array,
    prompt_length: Array | None,
) -> LMState:
    """``state`` (fresh from :func:`~tts_jax.samplers.lm.state.init_state`) with the scorer's
    initial state (:meth:`~tts_jax.rewards.base.StepScorer.init`)."""
    n, max_new_tokens = state.tokens.shape
    return state._replace(
        scorer_state=as_step_scorer(scorer).init(
            scorer_params, prompt, prompt_length, n, max_new_tokens
        )
    )


def step_scores(
    scorer: StepScorer | SequenceScoreFn,
    scorer_params: Any,
    state: LMState,
    window: int,
    how: Aggregation,
    needed: Array,
) -> tuple[Array, LMState]:
    """Aggregated scores ``float32[N]`` of the particles after a step, and the state.

    The scorer's :meth:`~tts_jax.rewards.base.StepScorer.update` runs every step (each token
    must reach an incremental scorer's state once; a row with no new tokens is left unchanged);
    its scores replace ``state.score`` only when ``needed`` (traced bool; a rescoring scorer
    then skips its work, inside a ``lax.cond``).

    Args:
        window: static bound on the tokens a particle writes in one step.
        how: an :class:`~tts_jax.rewards.base.Aggregation`.
    """
    fresh, scorer_state = as_step_scorer(scorer).update(
        scorer_params,
        state.scorer_state,
        state.tokens,
        state.length,
        state.step_ends,
        window,
        how,
        needed,
    )
    return jnp.where(needed, fresh, state.score), state._replace(scorer_state=scorer_state)


def final_scores(
    scorer: StepScorer | SequenceScoreFn,
    scorer_params: Any,
    state: LMState,
    how: Aggregation,
    needed: Array,
) -> Array:
    """Aggregated scores ``float32[N]`` of the finished particles when ``needed`` (traced bool),
    else ``state.score``: for samplers that score only at the end
    (:meth:`~tts_jax.rewards.base.StepScorer.read`; an incremental scorer fed by
    :func:`step_scores` at every step already holds them, a rescoring one scores once)."""
    fresh = as_step_scorer(scorer).read(
        scorer_params, state.scorer_state, state.tokens, state.length, state.step_ends, how, needed
    )
    return jnp.where(needed, fresh, state.score)


def log_odds(score: Array) -> Array:
    """``logit(r) = log r - log(1 - r)`` with ``r`` clipped to ``[eps, 1 - eps]`` (NaN stays)."""
    r = jnp.clip(score, SCORE_EPS, 1.0 - SCORE_EPS)
    return jnp.log(r) - jnp.log1p(-r)
