"""The result every LM steering sampler returns, final-answer selection and shared host checks.

Selection rules (Puri et al. 2025, docs/algorithms.md 4.1 / 4.3) run on the host after the jitted
sampler, because answers are extracted from decoded text by a Python function:

* ``argmax``: the particle with the highest final score (``best``);
* ``weighted_sample``: one particle drawn from the final weights;
* ``weighted_vote``: the answer with the largest total weight (``weights="scores"`` sums the
  final scores of equal answers instead: weighted best-of-N);
* ``majority_vote``: the most frequent answer (self-consistency).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np

from tts_jax.samplers.lm.state import Budget, LMState

Array = jax.Array
SELECTIONS = ("argmax", "weighted_sample", "weighted_vote", "majority_vote")


class LMResult(NamedTuple):
    """Output of every LM sampler (``N`` final particles of one prompt).

    Attributes:
        tokens: ``int32[N, L]`` completions (``pad_id`` after ``lengths``).
        lengths: ``int32[N]``.
        finished: ``bool[N]`` a stop token was generated (else truncated or out of steps).
        scores: ``float32[N]`` final aggregated score (PRM methods) or final log potential
            (token-level SMC).
        log_weights: ``float32[N]`` normalized final log-weights (uniform for search methods).
        best: int32 index of the highest-scoring live particle.
        log_evidence: ``log Z_hat`` for proper SMC weightings, NaN otherwise, ``-inf`` when every
            particle died.
        all_dead: True when every particle has zero weight (then ``best`` is meaningless).
        budget: :class:`~tts_jax.samplers.lm.state.Budget` of scalar totals.
        info: per-step diagnostics (arrays with a leading step axis, e.g. ``ess``,
            ``unique_ancestors``, ``ancestors``, ``resampled``).
    """

    tokens: Array
    lengths: Array
    finished: Array
    scores: Array
    log_weights: Array
    best: Array
    log_evidence: Array
    all_dead: Array
    budget: Budget
    info: dict[str, Any]


def make_result(
    state: LMState,
    log_weights: Array,
    best: Array,
    log_evidence: Array,
    all_dead: Array,
    info: dict[str, Any],
) -> LMResult:
    """Pack a final :class:`LMState` (budget rows reduced to scalars)."""
    budget = Budget(*(b[0] for b in state.budget))
    return LMResult(
        state.tokens,
        state.length,
        state.finished,
        state.score,
        log_weights,
        best,
        log_evidence,
        all_dead,
        budget,
        info,
    )


def check_budget(
    num_particles: int, max_new_tokens: int, max_steps: int, max_step_tokens: int
) -> None:
    """Reject empty budgets with a clear error (host side).

    Raises:
        ValueError: any of the sizes below 1.
    """
    sizes = {
        "num_particles": num_particles,
        "max_new_tokens": max_new_tokens,
        "max_steps": max_steps,
        "max_step_tokens": max_step_tokens,
    }
    bad = {k: v for k, v in sizes.items() if v < 1}
    if bad:
        raise ValueError(f"empty budget: {bad} (every size must be >= 1)")


def check_prompt(prompt) -> np.ndarray:
    """The prompt as ``int32[P]`` with ``P >= 1`` (host side)."""
    prompt = np.asarray(prompt)
    if prompt.ndim != 1 or prompt.shape[0] == 0 or not np.issubdtype(prompt.dtype, np.integer):
        raise ValueError(
            f"prompt must be a non-empty int vector [P], got {prompt.dtype} {prompt.shape}"
        )
    return prompt.astype(np.int32)


def check_prompt_length(prompt: np.ndarray, prompt_length: int | None) -> np.ndarray:
    """The real length of a right-padded prompt as an int32 scalar (default: all of it).

    Raises:
        ValueError: ``prompt_length`` outside ``[1, P]``.
    """
    p = prompt.shape[0]
    length = p if prompt_length is None else int(prompt_length)
    if not 1 <= length <= p:
        raise ValueError(f"prompt_length must lie in [1, {p}], got {prompt_length}")
    return np.int32(length)


def check_nan(num_nan: int, method: str, nan_policy: str) -> None:
    """Raise for NaN scores unless ``nan_policy == "drop"`` (NaN-scored particles got weight 0)."""
    if nan_policy not in ("raise", "drop"):
        raise ValueError(f"nan_policy must be 'raise' or 'drop', got {nan_policy!r}")
    if num_nan and nan_policy == "raise":
        raise ValueError(
            f"{method}: the scorer returned NaN for {num_nan} particle evaluations "
            "(pass nan_policy='drop' to give such particles zero weight instead)"
        )


def _answer_weights(result: LMResult, weights: str) -> np.ndarray:
    if weights == "scores":
        return np.nan_to_num(np.asarray(result.scores, np.float64), nan=0.0)
    return np.exp(np.asarray(result.log_weights, np.float64))


def select(
    result: LMResult,
    rule: str = "argmax",
    answers: Sequence[Any] | None = None,
    key: Array | None = None,
    weights: str = "log_weights",
) -> int:
    """Index of the particle chosen as the final answer.

    Args:
        result: :class:`LMResult`.
        rule: one of :data:`SELECTIONS`.
        answers: the extracted answer of each particle (votes only; ``None`` answers never win
            unless every answer is ``None``).
        key: PRNG key for ``weighted_sample``.
        weights: ``log_weights`` (the particle weights) or ``scores`` (sum of final scores, the
            weighted best-of-N of Puri et al.) for ``weighted_vote``.

    Returns:
        The index of the chosen particle (for votes, the best-scoring particle with the winning
        answer).

    Raises:
        ValueError: unknown rule, missing answers or key, or every particle dead.
    """
    if rule not in SELECTIONS:
        raise ValueError(f"unknown selection rule {rule!r}; known: {SELECTIONS}")
    if bool(result.all_dead):
        raise ValueError("no answer to select: every particle is dead (all_dead)")
    if rule == "argmax":
        return int(result.best)
    w = _answer_weights(result, weights)
    if rule == "weighted_sample":
        if key is None:
            raise ValueError("weighted_sample needs a PRNG key")
        return int(jax.random.choice(key, w.shape[0], p=w / w.sum()))
    if answers is None or len(answers) != w.shape[0]:
        raise ValueError(f"{rule} needs one extracted answer per particle ({w.shape[0]})")
    totals = collections.defaultdict(float)
    for a, wi in zip(answers, w if rule == "weighted_vote" else np.ones_like(w), strict=True):
        totals[a] += wi
    valid = {a: t for a, t in totals.items() if a is not None} or totals
    winner = max(valid, key=valid.get)
    scores = np.asarray(result.scores, np.float64)
    members = [i for i, a in enumerate(answers) if a == winner]
    return max(members, key=lambda i: scores[i])


def extract_answers(result: LMResult, decode: Callable[[np.ndarray], Any]) -> list[Any]:
    """Apply a host answer extractor to every particle's completion tokens ``[:length]``."""
    tokens, lengths = np.asarray(result.tokens), np.asarray(result.lengths)
    return [decode(tokens[i, : lengths[i]]) for i in range(tokens.shape[0])]
