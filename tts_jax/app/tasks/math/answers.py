"""Final answers of math solutions: ``\\boxed{}`` extraction, equivalence, votes over
equivalence classes.

Equivalence is decided by `math-verify` (Hugging Face's answer checker: LaTeX -> SymPy parsing
and comparison of numbers, expressions, intervals, sets, with units and ``\\text{}`` dropped):
a kept library rather than our own normalizer, because MATH answers need a LaTeX parser and a
CAS, and the same checker is what recent MATH500 numbers are reported with.

Parsing and comparison can hang on adversarial expressions. :func:`is_equivalent` bounds them:
on the main thread with math-verify's own ``signal.alarm`` timeouts; on any other thread (where
signals cannot be used, e.g. inside a ``jax.pure_callback``) in a daemon worker thread that is
abandoned after ``timeout`` seconds (it may keep running in the background). A timeout or an
error counts as "not equivalent".

The votes (:class:`EquivalenceVote`: :data:`majority`, :data:`weighted`,
:data:`weight_vote`) are selection rules of :mod:`tts_jax.samplers.lm.answers`
(``rule(result, answers, key) -> index``): answers are grouped into classes of equivalent
answers, not equal strings, so ``\\frac12``, ``0.5`` and ``\\dfrac{1}{2}`` vote together.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from tts_jax.samplers.result import Result

BOX_COMMANDS = ("\\boxed", "\\fbox")
DEFAULT_TIMEOUT = 5.0


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The balanced ``{...}`` group opening at ``text[start]`` and the index after it."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{" and text[i - 1 : i] != "\\":
            depth += 1
        elif text[i] == "}" and text[i - 1 : i] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i], i + 1
    return None


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, nested braces
    kept; also the brace-less form ``\\boxed 5``. ``None`` if there is none or it is unclosed."""
    best, where = None, -1
    for command in BOX_COMMANDS:
        at = text.rfind(command)
        while at >= 0:
            after = at + len(command)
            nxt = text[after : after + 1]
            if nxt.isalpha():  # e.g. \boxedx is another command
                at = text.rfind(command, 0, at)
                continue
            if at > where:
                best, where = (command, after), at
            break
    if best is None:
        return None
    _, after = best
    rest = text[after:]
    stripped = rest.lstrip()
    if stripped.startswith("{"):
        group = _braced(text, after + len(rest) - len(stripped))
        return None if group is None else group[0].strip()
    if rest[:1] == " ":  # "\boxed 5": up to the next "$" or whitespace
        token = stripped.split("$")[0].split()
        return token[0] if token else None
    return None


def completion_answer(tokenizer: Any, ids: Sequence[int] | np.ndarray) -> str | None:
    """:func:`extract_boxed` of a completion's decoded token ids (special tokens skipped)."""
    return extract_boxed(tokenizer.decode(np.asarray(ids, np.int64), skip_special_tokens=True))


@functools.lru_cache(maxsize=4096)
def _parsed(answer: str, timeout: int | None) -> tuple:
    from math_verify import parse

    return tuple(parse("\\boxed{" + answer + "}", parsing_timeout=timeout))


def _verify(gold: str, pred: str, timeout: int | None) -> bool:
    from math_verify import verify

    a, b = _parsed(gold, timeout), _parsed(pred, timeout)
    if not a or not b:
        return False
    return bool(verify(list(a), list(b), timeout_seconds=timeout))


def _in_worker(fn: Callable[[], bool], timeout: float) -> bool:
    out: list[bool] = []

    def run():
        try:
            out.append(fn())
        except Exception:  # a parser failure is "not equivalent"
            out.append(False)

    worker = threading.Thread(target=run, daemon=True, name="math-verify")
    worker.start()
    worker.join(timeout)
    return bool(out and out[0])


def is_equivalent(gold: str | None, pred: str | None, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """Whether answer ``pred`` equals reference ``gold`` mathematically (math-verify).

    Args:
        gold: the reference answer (LaTeX without the ``\\boxed``), ``None`` for none.
        pred: the answer to check.
        timeout: seconds allowed for parsing and for each comparison (see the module docstring).

    Returns:
        ``False`` for a missing answer, a parse failure or a timeout; ``True`` for equal
        stripped strings without calling math-verify.
    """
    if gold is None or pred is None:
        return False
    gold, pred = gold.strip(), pred.strip()
    if gold == pred:
        return bool(gold)
    if threading.current_thread() is threading.main_thread():
        try:
            return _verify(gold, pred, max(1, math.ceil(timeout)))
        except Exception:
            return False
    return _in_worker(lambda: _verify(gold, pred, None), timeout)


def is_correct(completion: str, gold: str, timeout: float = DEFAULT_TIMEOUT) -> bool:
    """The last boxed answer of ``completion`` is equivalent to ``gold``."""
    return is_equivalent(gold, extract_boxed(completion), timeout)


def group_answers(
    answers: Sequence[str | None], equivalent: Callable[[str, str], bool] = is_equivalent
) -> list[int | None]:
    """Equivalence class of every answer (``None`` stays ``None``).

    Classes are numbered by first appearance; an answer joins the first class whose
    representative (its first member) it is equivalent to. Equal strings are compared once.
    """
    reps: list[str] = []
    of_string: dict[str, int] = {}
    labels: list[int | None] = []
    for a in answers:
        if a is None:
            labels.append(None)
            continue
        if a not in of_string:
            match = next((k for k, r in enumerate(reps) if equivalent(r, a)), None)
            if match is None:
                reps.append(a)
                match = len(reps) - 1
            of_string[a] = match
        labels.append(of_string[a])
    return labels


def _weights(result: Result, weigh: str) -> np.ndarray:
    if weigh == "count":
        return np.ones(np.shape(result.rewards), np.float64)
    if weigh == "score":
        return np.nan_to_num(np.asarray(result.rewards, np.float64), nan=0.0)
    return np.exp(np.asarray(result.log_weights, np.float64))


WEIGHINGS = ("count", "score", "weight")


@dataclasses.dataclass(frozen=True)
class EquivalenceVote:
    """A selection rule ``rule(result, answers, key) -> index`` voting over equivalence classes.

    Attributes:
        weigh: what a particle adds to its class: ``"count"`` 1 (majority vote,
            self-consistency), ``"score"`` its final score, NaN as 0 (weighted best-of-N of
            Puri et al. 2025), ``"weight"`` its final particle weight ``exp(log_weights)``.
        equivalent: ``(a, b) -> bool``, default :func:`is_equivalent`.

    The winning class is the one with the largest total (ties: the first to appear); the rule
    returns its best-scoring particle (NaN scores last). ``None`` answers win only if every
    answer is ``None`` (then: the best-scoring particle).
    """

    weigh: str = "count"
    equivalent: Callable[[str, str], bool] = is_equivalent

    def __post_init__(self):
        if self.weigh not in WEIGHINGS:
            raise ValueError(f"unknown weighing {self.weigh!r}; known: {WEIGHINGS}")

    def __call__(
        self, result: Result, answers: Sequence[str | None] | None, key: Any = None
    ) -> int:
        weights = _weights(result, self.weigh)
        if answers is None or len(answers) != weights.shape[0]:
            raise ValueError(
                f"an equivalence vote needs one extracted answer per particle "
                f"({weights.shape[0]}), got {None if answers is None else len(answers)}"
            )
        labels = group_answers(answers, self.equivalent)
        scores = np.asarray(result.rewards, np.float64)
        rank = np.where(np.isnan(scores), -np.inf, scores)
        classes = sorted({c for c in labels if c is not None})
        if not classes:
            return int(np.argmax(rank))
        totals = [sum(w for w, c in zip(weights, labels, strict=True) if c == k) for k in classes]
        winner = classes[int(np.argmax(totals))]
        members = [i for i, c in enumerate(labels) if c == winner]
        return max(members, key=lambda i: (rank[i], -i))


majority = EquivalenceVote("count")
"""Majority vote over equivalence classes (self-consistency, Wang et al. 2023)."""
weighted = EquivalenceVote("score")
"""Weighted best-of-N: the class with the largest summed final score (Puri et al. 2025)."""
weight_vote = EquivalenceVote("weight")
"""The class with the largest total particle weight."""

SELECTIONS = {"math_majority": majority, "math_weighted": weighted, "math_weight": weight_vote}
"""The equivalence votes by name (for a command line, beside
:data:`tts_jax.samplers.lm.answers.SELECTIONS`)."""
