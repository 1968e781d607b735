"""Math answers: \\boxed extraction, math-verify equivalence, votes over equivalence classes."""

import threading

import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax.app.tasks.math import answers as A
from tts_jax.samplers.lm import answers as selection
from tts_jax.samplers.result import Cost, Result, Text, make_info


@pytest.mark.parametrize(
    "text, expected",
    [
        ("so $\\boxed{5}$.", "5"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("first \\boxed{1} then \\boxed{\\{1, 2\\}} end", "\\{1, 2\\}"),
        ("\\boxed{ (-\\infty, 3] }", "(-\\infty, 3]"),
        ("answer: \\fbox{7}", "7"),
        ("\\fbox{1} and finally \\boxed{x^{2^{3}}}", "x^{2^{3}}"),
        ("$\\boxed 42$", "42"),
        ("no answer here", None),
        ("\\boxed{unclosed {", None),
        ("\\boxedx{3}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert A.extract_boxed(text) == expected


@pytest.mark.parametrize(
    "gold, pred",
    [
        ("\\frac{1}{2}", "\\dfrac{1}{2}"),
        ("\\frac{1}{2}", "\\dfrac12"),
        ("\\frac{1}{2}", "0.5"),
        ("16", "16 \\text{ square centimeters}"),
        ("120", "120^\\circ"),
        ("(-3, 3)", "(-3,3)"),
        ("[1, \\infty)", "[1,\\infty)"),
        ("5\\sqrt{2}", "\\sqrt{50}"),
        ("2, 3", "3, 2"),
        ("3", "x = 3"),
    ],
)
def test_equivalent_answers(gold, pred):
    assert A.is_equivalent(gold, pred)


@pytest.mark.parametrize(
    "gold, pred",
    [
        ("(-3, 3)", "[-3, 3]"),  # an interval with the wrong ends looks close
        ("\\frac{1}{3}", "0.33"),
        ("\\frac{5}{6}", "\\frac{6}{5}"),
        ("56", "65"),
        ("5", None),
        (None, "5"),
        ("5", ""),
    ],
)
def test_inequivalent_answers(gold, pred):
    assert not A.is_equivalent(gold, pred)


def test_is_equivalent_off_the_main_thread():
    """math-verify's signal timeouts work only on the main thread; elsewhere (a pure_callback)
    the wrapper runs it in a worker thread with a deadline."""
    out = {}

    def run():
        out["yes"] = A.is_equivalent("\\frac{3}{4}", "0.75")
        out["no"] = A.is_equivalent("\\frac{3}{4}", "0.7")

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert out == {"yes": True, "no": False}


def test_is_equivalent_gives_up_after_the_timeout(monkeypatch):
    import time

    def slow(gold, pred, timeout):
        time.sleep(5)
        return True

    monkeypatch.setattr(A, "_verify", slow)
    out = {}
    start = time.perf_counter()
    t = threading.Thread(target=lambda: out.setdefault("r", A.is_equivalent("1", "2", 0.2)))
    t.start()
    t.join(10)
    assert out["r"] is False and time.perf_counter() - start < 2


def test_is_correct():
    assert A.is_correct("Steps.\n\nThe final answer is $\\boxed{\\dfrac{5}{6}}$.", "\\frac{5}{6}")
    assert not A.is_correct("The final answer is 5/6.", "\\frac{5}{6}")


def _result(scores, log_weights=None):
    n = len(scores)
    scores = jnp.asarray(scores, jnp.float32)
    lw = jnp.zeros(n) if log_weights is None else jnp.asarray(log_weights, jnp.float32)
    text = Text(jnp.zeros((n, 1), jnp.int32), jnp.ones(n, jnp.int32), jnp.ones(n, bool))
    return Result(
        samples=text,
        rewards=scores,
        log_weights=lw,
        best=jnp.argmax(scores),
        log_evidence=jnp.nan,
        all_dead=jnp.asarray(False),
        cost=Cost(jnp.asarray(0), jnp.asarray(0), jnp.asarray(0)),
        info=make_info(n),
    )


def test_group_answers_by_equivalence():
    labels = A.group_answers(["\\frac12", "3", "0.5", None, "\\dfrac{1}{2}", "3.0", "7"])
    assert labels == [0, 1, 0, None, 0, 1, 2]


def test_majority_vote_groups_equivalent_answers():
    # as strings "3" wins 2 : 1 : 1 : 1; as numbers one half wins 3 : 2
    answers = ["3", "\\frac{1}{2}", "3", "0.5", "\\dfrac12"]
    scores = [0.9, 0.2, 0.8, 0.6, 0.1]
    result = _result(scores)
    assert selection.majority_vote(result, answers) == 0  # string equality: "3"
    assert selection.select(result, A.majority, answers) == 3  # best-scored one half
    assert A.majority(result, answers) == 3


def test_weighted_vote_sums_scores_of_equivalent_answers():
    answers = ["3", "\\frac{1}{2}", "0.5", "3.0"]
    result = _result([0.9, 0.5, 0.6, 0.1])  # one half 1.1 > three 1.0
    assert A.weighted(result, answers) == 2
    weights = np.log([0.7, 0.1, 0.1, 0.1])  # by particle weight three wins 0.8 : 0.2
    assert A.weight_vote(_result([0.9, 0.5, 0.6, 0.1], weights), answers) == 0


def test_votes_with_missing_answers():
    result = _result([0.1, 0.9, 0.5])
    assert A.majority(result, [None, None, "4"]) == 2
    assert A.majority(result, [None, None, None]) == 1
    with pytest.raises(ValueError, match="one extracted answer per particle"):
        A.majority(result, ["1"])
    with pytest.raises(ValueError, match="weighing"):
        A.EquivalenceVote("median")
