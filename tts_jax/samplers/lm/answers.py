"""Final-answer selection: which of the ``N`` returned completions is the answer.

Selection rules (Puri et al. 2025, docs/algorithms.md 4.1 / 4.3) run on the host after the jitted
sampler, because answers are extracted from decoded text by a Python function. A rule is a value,
any function ``rule(result, answers, key) -> int`` (the index of the chosen particle); the
built-in ones, named in :data:`SELECTIONS` for the command line:

* :func:`argmax`: the particle with the highest final score (``result.best``);
* :func:`weighted_sample`: one particle drawn from the final weights (needs ``key``);
* :func:`weighted_vote`: the answer with the largest total particle weight;
* :func:`score_vote`: the answer with the largest sum of final scores (the weighted best-of-N of
  Puri et al.);
* :func:`majority_vote`: the most frequent answer (self-consistency, Wang et al. 2023).

A vote returns the best-scoring particle with the winning answer; ``None`` answers (nothing
extracted) never win unless every answer is ``None``.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from tts_jax.samplers.result import Result

Array = jax.Array
# rule(result, answers (one per particle, or None), key (or None)) -> chosen particle index
Selection = Callable[[Result, "Sequence[Any] | None", "Array | None"], int]


def argmax(result: Result, answers: Sequence[Any] | None = None, key: Array | None = None) -> int:
    """The highest-scoring live particle (``result.best``)."""
    return int(result.best)


def weighted_sample(
    result: Result, answers: Sequence[Any] | None = None, key: Array | None = None
) -> int:
    """One particle drawn from the final weights ``exp(result.log_weights)``."""
    if key is None:
        raise ValueError("weighted_sample needs a PRNG key")
    w = _particle_weights(result)
    return int(jax.random.choice(key, w.shape[0], p=w / w.sum()))


def weighted_vote(result: Result, answers: Sequence[Any] | None, key: Array | None = None) -> int:
    """The answer whose particles carry the largest total weight."""
    return _vote(result, answers, _particle_weights(result), "weighted_vote")


def score_vote(result: Result, answers: Sequence[Any] | None, key: Array | None = None) -> int:
    """The answer whose particles have the largest sum of final scores (NaN counts 0): the
    weighted best-of-N of Puri et al. 2025."""
    scores = np.nan_to_num(np.asarray(result.rewards, np.float64), nan=0.0)
    return _vote(result, answers, scores, "score_vote")


def majority_vote(result: Result, answers: Sequence[Any] | None, key: Array | None = None) -> int:
    """The most frequent answer (self-consistency)."""
    return _vote(result, answers, np.ones(np.shape(result.rewards)), "majority_vote")


SELECTIONS: dict[str, Selection] = {
    "argmax": argmax,
    "weighted_sample": weighted_sample,
    "weighted_vote": weighted_vote,
    "score_vote": score_vote,
    "majority_vote": majority_vote,
}
"""The built-in rules by name (the command line's choices)."""


def select(
    result: Result,
    rule: str | Selection = argmax,
    answers: Sequence[Any] | None = None,
    key: Array | None = None,
) -> int:
    """Index of the particle chosen as the final answer by ``rule``.

    Args:
        result: an LM sampler's :class:`~tts_jax.samplers.result.Result`.
        rule: a :data:`Selection` function, or the name of a built-in one in :data:`SELECTIONS`.
        answers: the extracted answer of each particle (votes only).
        key: PRNG key (:func:`weighted_sample` only).

    Raises:
        ValueError: an unknown rule name, missing answers or key, or every particle dead.
    """
    if isinstance(rule, str):
        if rule not in SELECTIONS:
            raise ValueError(f"unknown selection rule {rule!r}; known: {sorted(SELECTIONS)}")
        rule = SELECTIONS[rule]
    if bool(result.all_dead):
        raise ValueError("no answer to select: every particle is dead (all_dead)")
    return rule(result, answers, key)


def _particle_weights(result: Result) -> np.ndarray:
    return np.exp(np.asarray(result.log_weights, np.float64))


def _vote(result: Result, answers: Sequence[Any] | None, weights: np.ndarray, name: str) -> int:
    if answers is None or len(answers) != weights.shape[0]:
        raise ValueError(f"{name} needs one extracted answer per particle ({weights.shape[0]})")
    totals = collections.defaultdict(float)
    for a, w in zip(answers, weights, strict=True):
        totals[a] += w
    valid = {a: t for a, t in totals.items() if a is not None} or totals
    winner = max(valid, key=valid.get)
    scores = np.asarray(result.rewards, np.float64)
    members = [i for i, a in enumerate(answers) if a == winner]
    return max(members, key=lambda i: scores[i])


def extract_answers(result: Result, decode: Callable[[np.ndarray], Any]) -> list[Any]:
    """Apply a host answer extractor to every particle's completion tokens ``[:length]``."""
    tokens, lengths = np.asarray(result.samples.tokens), np.asarray(result.samples.lengths)
    return [decode(tokens[i, : lengths[i]]) for i in range(tokens.shape[0])]
