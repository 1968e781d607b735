"""Synthetic multi-step arithmetic with worked solutions and an exact step checker.

This is the reasoning task of the embedded policy LM and process reward model
(docs/design.md "Models we ship"), the testbed for step-level particle filtering (Puri et al.
2025, docs/algorithms.md 4.1).

A problem is a left-to-right chain ``v0 op1 a1 op2 a2 ...`` with ``op`` in ``+ - *``; the prompt
writes it with the parentheses that make standard precedence agree with left-to-right order::

    Q: (12+7)*3-5=?

and the worked solution has one step per line, then the answer line::

    12+7=19
    19*3=57
    57-5=52
    Answer: 52

Every step re-uses the previous result, so one wrong line spoils every later one: per-step errors
compound with the number of operations, which is what makes search over samples pay off.

Text handed to the checker is the *completion* (what follows the prompt), decoded with special
tokens skipped; anything from a literal ``EOS_TOKEN`` on is ignored. Lines after the first answer
line are ignored too (generation stops at the answer marker). No function here raises on model
output.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence

import numpy as np

STEP_DELIMITER = "\n"
ANSWER_PREFIX = "Answer: "
PROMPT_PREFIX = "Q: "
PROMPT_SUFFIX = "=?" + STEP_DELIMITER
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"

_OPS = ("+", "-", "*")
# At most 18 digits: int() of longer digit strings can hit Python's int-parsing limit.
_INT_RE = re.compile(r"-?\d{1,18}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArithConfig:
    """Difficulty of generated problems.

    Attributes:
        min_ops: fewest operations (= solution steps before the answer line).
        max_ops: most operations.
        max_operand: largest added/subtracted operand (and the largest first number); operands
            are drawn uniformly from ``1..max_operand``.
        mul_prob: probability that an operation is a multiplication by a digit in ``2..9``.
            Multiplications only happen while the running value is at most ``max_value // 9``.
        max_value: every intermediate result stays in ``0..max_value``; subtraction is only
            drawn when the result stays non-negative and addition only when it stays in range.
    """

    min_ops: int = 3
    max_ops: int = 6
    max_operand: int = 99
    mul_prob: float = 0.1
    max_value: int = 999

    def __post_init__(self):
        if not 1 <= self.min_ops <= self.max_ops:
            raise ValueError(f"need 1 <= min_ops <= max_ops, got {self.min_ops}, {self.max_ops}")
        if not 1 <= self.max_operand <= self.max_value:
            raise ValueError(f"need 1 <= max_operand <= max_value, got {self.max_operand}")
        if not 0.0 <= self.mul_prob <= 1.0:
            raise ValueError(f"mul_prob must be in [0, 1], got {self.mul_prob}")


@dataclasses.dataclass(frozen=True)
class Problem:
    """A chain ``first op1 a1 op2 a2 ...`` evaluated left to right.

    Attributes:
        first: the starting number.
        ops: ``(operator, operand)`` pairs, operator in ``"+-*"``.
    """

    first: int
    ops: tuple[tuple[str, int], ...]

    @property
    def values(self) -> list[int]:
        """Running values: ``[first, after op 1, ..., answer]`` (Python ints)."""
        values = [self.first]
        for op, operand in self.ops:
            values.append(_apply(values[-1], op, operand))
        return values

    @property
    def answer(self) -> int:
        """The value of the expression."""
        return self.values[-1]

    @property
    def expression(self) -> str:
        """The chain with the parentheses standard precedence needs, e.g. ``(12+7)*3-5``."""
        text, top_level_sum = str(self.first), False
        for op, operand in self.ops:
            if op == "*" and top_level_sum:
                text = f"({text})"
            text = f"{text}{op}{operand}"
            top_level_sum = op != "*"
        return text

    @property
    def prompt(self) -> str:
        """``"Q: <expression>=?\\n"``."""
        return f"{PROMPT_PREFIX}{self.expression}{PROMPT_SUFFIX}"

    @property
    def steps(self) -> list[str]:
        """The canonical worked steps, e.g. ``["12+7=19", "19*3=57"]`` (no delimiters)."""
        values = self.values
        return [
            f"{values[i]}{op}{operand}={values[i + 1]}" for i, (op, operand) in enumerate(self.ops)
        ]

    @property
    def answer_line(self) -> str:
        """``"Answer: <answer>"``."""
        return f"{ANSWER_PREFIX}{self.answer}"

    @property
    def solution(self) -> str:
        """The canonical completion: steps and answer line joined by ``STEP_DELIMITER``."""
        return STEP_DELIMITER.join([*self.steps, self.answer_line])


def _apply(value: int, op: str, operand: int) -> int:
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    return value * operand


def generate_problem(rng: np.random.Generator, config: ArithConfig) -> Problem:
    """Draw one problem.

    Args:
        rng: numpy generator (consumed).
        config: difficulty.

    Returns:
        A problem whose running values all lie in ``0..config.max_value``.
    """
    n_ops = int(rng.integers(config.min_ops, config.max_ops + 1))
    value = int(rng.integers(1, config.max_operand + 1))
    first, ops = value, []
    for _ in range(n_ops):
        op, operand = _draw_op(rng, value, config)
        ops.append((op, operand))
        value = _apply(value, op, operand)
    return Problem(first, tuple(ops))


def _draw_op(rng: np.random.Generator, value: int, config: ArithConfig) -> tuple[str, int]:
    """One ``(op, operand)`` keeping the running value in ``0..max_value``."""
    if value <= config.max_value // 9 and rng.random() < config.mul_prob:
        return "*", int(rng.integers(2, 10))
    operand = int(rng.integers(1, config.max_operand + 1))
    can_add = value + operand <= config.max_value
    can_sub = value - operand >= 0
    if can_add and can_sub:
        return ("+" if rng.random() < 0.5 else "-"), operand
    return ("+" if can_add else "-"), operand


def generate_problems(n: int, seed: int, config: ArithConfig | None = None) -> list[Problem]:
    """``n`` problems, deterministic in ``(seed, config)``.

    Args:
        n: how many problems.
        seed: integer seed of ``np.random.default_rng``.
        config: difficulty (default ``ArithConfig()``).

    Returns:
        A list of ``n`` problems (duplicates possible).
    """
    config = config or ArithConfig()
    rng = np.random.default_rng(seed)
    return [generate_problem(rng, config) for _ in range(n)]


def _completion(text: str) -> str:
    """The text before a literal EOS token, if any."""
    return text.split(EOS_TOKEN, 1)[0]


def split_steps(text: str) -> list[str]:
    """Completed steps of a completion: lines split at ``STEP_DELIMITER``.

    A trailing empty piece (text ending with the delimiter) is not a step; everything from a
    literal ``EOS_TOKEN`` on is dropped.

    Args:
        text: a (partial) completion.

    Returns:
        The step lines, without delimiters.
    """
    lines = _completion(text).split(STEP_DELIMITER)
    return lines[:-1] if lines[-1] == "" else lines


def _parse_answer_line(line: str) -> int | None:
    """The integer of an ``Answer: <int>`` line, or None."""
    line = line.strip()
    marker = ANSWER_PREFIX.strip()
    if not line.startswith(marker):
        return None
    rest = line[len(marker) :].strip()
    return int(rest) if _INT_RE.fullmatch(rest) else None


def _is_answer_line(line: str) -> bool:
    return line.strip().startswith(ANSWER_PREFIX.strip())


def check_lines(problem: Problem, lines: Sequence[str]) -> list[bool]:
    """Prefix correctness of each line; stops after the first answer line.

    Line ``i < n_ops`` is correct iff every earlier line is and it equals the canonical step ``i``
    up to surrounding whitespace; line ``n_ops`` is correct iff every earlier line is and it is an
    answer line with the right value. An answer line ends the solution: later lines are not
    judged (the returned list is shorter than ``lines``).

    Args:
        problem: the problem.
        lines: step lines without delimiters (empty lines are wrong steps).

    Returns:
        One bool per judged line; once False, every later entry is False.
    """
    expected = problem.steps
    flags, ok = [], True
    for i, line in enumerate(lines):
        if i < len(expected):
            ok = ok and line.strip() == expected[i]
        else:
            ok = ok and _parse_answer_line(line) == problem.answer
        flags.append(ok)
        if _is_answer_line(line):
            break
    return flags


def check_step(problem: Problem, previous_steps: Sequence[str], step_text: str) -> bool:
    """Is ``step_text`` a correct next step after ``previous_steps``?

    True iff ``previous_steps + [step_text]`` is a correct solution prefix: every earlier step is
    correct and ``step_text`` (whitespace-stripped; may be the answer line) is the next one.

    Args:
        problem: the problem.
        previous_steps: earlier step lines, without delimiters.
        step_text: the candidate line.

    Returns:
        Whether the extended prefix is correct.
    """
    flags = check_lines(problem, [*previous_steps, step_text])
    return len(flags) == len(previous_steps) + 1 and flags[-1]


def check_solution_prefix(problem: Problem, text: str) -> list[bool]:
    """Per-step prefix correctness of a (partial) completion.

    Args:
        problem: the problem.
        text: completion text (see :func:`split_steps`).

    Returns:
        ``flags[i]`` is True iff steps ``0..i`` are all correct; ends at the first answer line.
    """
    return check_lines(problem, split_steps(text))


def extract_answer(text: str) -> int | None:
    """The integer on the first ``Answer:`` line of a completion.

    Args:
        text: completion text (may be garbage).

    Returns:
        The answer, or None if there is no answer line or it does not hold exactly one integer.
    """
    for line in split_steps(text):
        if _is_answer_line(line):
            return _parse_answer_line(line)
    return None


def is_correct(problem: Problem, text: str) -> bool:
    """Outcome correctness: the extracted final answer equals the problem's answer.

    Args:
        problem: the problem.
        text: completion text.

    Returns:
        Whether the answer is right (the steps are not checked; see :func:`is_valid_solution`).
    """
    return extract_answer(text) == problem.answer


def is_valid_solution(problem: Problem, text: str) -> bool:
    """Process correctness: every step and the answer line are correct.

    Args:
        problem: the problem.
        text: completion text.

    Returns:
        Whether the completion is a complete, fully correct worked solution.
    """
    flags = check_solution_prefix(problem, text)
    return len(flags) == len(problem.ops) + 1 and all(flags)
