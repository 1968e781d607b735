"""Datasets of the arithmetic task: train/eval splits, policy (SFT) batches, PRM batches.

Sequences are ``prompt ids + completion ids (+ EOS)``, right-padded with the PAD id. Masks are
aligned with the tokens they mark: ``loss_mask[b, t]`` says token ``t`` is a target, so a next-token
loss uses ``logits[:, :-1]`` against ``input_ids[:, 1:]`` weighted by ``loss_mask[:, 1:]``. PRM
labels sit on step-end tokens (delimiters and EOS, see ``ArithTokenizer.step_end_mask``): the PRM
reads the prefix up to and including that token and predicts whether it is still correct
(Puri et al. 2025 score partial solutions at step boundaries).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from tts_jax.app.tasks.arith_tokenizer import ArithTokenizer
from tts_jax.app.tasks.arithmetic import (
    STEP_DELIMITER,
    ArithConfig,
    Problem,
    check_lines,
    check_solution_prefix,
    generate_problem,
    generate_problems,
)

TRAIN_SEED = 0
EVAL_SEED = 1


class SFTBatch(NamedTuple):
    """Policy training batch (numpy).

    Attributes:
        input_ids: ``[B, L]`` int32, PAD after the EOS.
        loss_mask: ``[B, L]`` bool, True on completion tokens and the EOS.
        attention_mask: ``[B, L]`` bool, True on non-pad tokens.
    """

    input_ids: np.ndarray
    loss_mask: np.ndarray
    attention_mask: np.ndarray


class PRMBatch(NamedTuple):
    """Process-reward-model training batch (numpy).

    Attributes:
        input_ids: ``[B, L]`` int32 (prompt + sampled completion), PAD-padded.
        attention_mask: ``[B, L]`` bool, True on non-pad tokens.
        step_mask: ``[B, L]`` bool, True on the step-end tokens that carry a label.
        labels: ``[B, L]`` int32, 1 where the prefix up to that step end is correct, else 0.
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    step_mask: np.ndarray
    labels: np.ndarray


def make_splits(
    n_train: int,
    n_eval: int,
    config: ArithConfig | None = None,
    train_seed: int = TRAIN_SEED,
    eval_seed: int = EVAL_SEED,
) -> tuple[list[Problem], list[Problem]]:
    """Train and held-out eval problems from disjoint seeds, with no eval prompt in train.

    Args:
        n_train: number of training problems.
        n_eval: number of eval problems.
        config: difficulty (default ``ArithConfig()``).
        train_seed: seed of the training stream.
        eval_seed: seed of the eval stream (must differ from ``train_seed``).

    Returns:
        ``(train, eval)``; training draws that collide with an eval prompt are skipped.
    """
    if train_seed == eval_seed:
        raise ValueError("train_seed and eval_seed must differ")
    config = config or ArithConfig()
    eval_problems = generate_problems(n_eval, eval_seed, config)
    held_out = {p.prompt for p in eval_problems}
    rng = np.random.default_rng(train_seed)
    train_problems: list[Problem] = []
    while len(train_problems) < n_train:
        problem = generate_problem(rng, config)
        if problem.prompt not in held_out:
            train_problems.append(problem)
    return train_problems, eval_problems


def encode_sft_example(tokenizer: ArithTokenizer, problem: Problem) -> tuple[list[int], list[bool]]:
    """Token ids of ``prompt + solution + EOS`` and the mask of the target tokens.

    Prompt and solution are encoded separately (as at generation time); the prompt ends with the
    isolated delimiter token, so this equals encoding the concatenated text.

    Args:
        tokenizer: the task tokenizer.
        problem: the problem.

    Returns:
        ``(ids, loss_mask)`` of equal length; the mask is True on solution tokens and the EOS.
    """
    prompt_ids = tokenizer.encode(problem.prompt)
    target_ids = [*tokenizer.encode(problem.solution), tokenizer.eos_id]
    return prompt_ids + target_ids, [False] * len(prompt_ids) + [True] * len(target_ids)


def _pad(rows: Sequence[Sequence[int]], length: int, value: int, dtype) -> np.ndarray:
    out = np.full((len(rows), length), value, dtype=dtype)
    for b, row in enumerate(rows):
        out[b, : len(row)] = row
    return out


def make_sft_batch(
    tokenizer: ArithTokenizer, problems: Sequence[Problem], max_len: int
) -> SFTBatch:
    """Right-padded policy training batch.

    Args:
        tokenizer: the task tokenizer.
        problems: ``B`` problems.
        max_len: padded length ``L``.

    Returns:
        An :class:`SFTBatch`.

    Raises:
        ValueError: if an example is longer than ``max_len`` (truncation would drop the EOS).
    """
    examples = [encode_sft_example(tokenizer, p) for p in problems]
    longest = max(len(ids) for ids, _ in examples)
    if longest > max_len:
        raise ValueError(f"example of {longest} tokens exceeds max_len={max_len}")
    input_ids = _pad([ids for ids, _ in examples], max_len, tokenizer.pad_id, np.int32)
    loss_mask = _pad([mask for _, mask in examples], max_len, False, bool)
    attention_mask = _pad([[True] * len(ids) for ids, _ in examples], max_len, False, bool)
    return SFTBatch(input_ids, loss_mask, attention_mask)


def prm_step_labels(problem: Problem, text: str) -> list[int]:
    """Per-step PRM labels of a sampled completion.

    Args:
        problem: the problem.
        text: the sampled completion (see ``arithmetic.split_steps``).

    Returns:
        ``labels[i] = 1`` iff steps ``0..i`` are all correct (ends at the first answer line).
    """
    return [int(ok) for ok in check_solution_prefix(problem, text)]


def encode_prm_example(
    tokenizer: ArithTokenizer, problem: Problem, completion_ids: Sequence[int] | np.ndarray
) -> tuple[list[int], list[bool], list[int]]:
    """Label the step ends of one sampled completion.

    The completion is cut after its first EOS (later tokens, e.g. padding, are dropped). Line
    ``i`` of the decoded completion ends at the ``i``-th step-end token; an unterminated last line
    (no delimiter, no EOS) carries no label, and neither do step ends after the first answer line.

    Args:
        tokenizer: the task tokenizer.
        problem: the problem the completion answers.
        completion_ids: sampled token ids after the prompt.

    Returns:
        ``(ids, step_mask, labels)`` over ``prompt + completion``, of equal length.
    """
    completion = [int(i) for i in completion_ids]
    if tokenizer.eos_id in completion:
        completion = completion[: completion.index(tokenizer.eos_id) + 1]
    ends = np.flatnonzero(tokenizer.step_end_mask(np.asarray(completion, np.int64)))
    lines = tokenizer.decode(completion).split(STEP_DELIMITER)[: len(ends)]
    flags = check_lines(problem, lines)
    prompt_ids = tokenizer.encode(problem.prompt)
    step_mask = [False] * (len(prompt_ids) + len(completion))
    labels = [0] * len(step_mask)
    for position, ok in zip(ends, flags, strict=False):
        step_mask[len(prompt_ids) + position] = True
        labels[len(prompt_ids) + position] = int(ok)
    return prompt_ids + completion, step_mask, labels


def make_prm_batch(
    tokenizer: ArithTokenizer,
    problems: Sequence[Problem],
    completions: Sequence[Sequence[int] | np.ndarray],
    max_len: int,
) -> PRMBatch:
    """Right-padded PRM training batch from the policy's own samples.

    Args:
        tokenizer: the task tokenizer.
        problems: ``B`` problems.
        completions: ``B`` sampled completions as token ids (may contain EOS and padding).
        max_len: padded length ``L``; longer examples are truncated (their late labels dropped).

    Returns:
        A :class:`PRMBatch`.
    """
    examples = [
        encode_prm_example(tokenizer, p, c) for p, c in zip(problems, completions, strict=True)
    ]
    ids = [e[0][:max_len] for e in examples]
    return PRMBatch(
        input_ids=_pad(ids, max_len, tokenizer.pad_id, np.int32),
        attention_mask=_pad([[True] * len(row) for row in ids], max_len, False, bool),
        step_mask=_pad([e[1][:max_len] for e in examples], max_len, False, bool),
        labels=_pad([e[2][:max_len] for e in examples], max_len, 0, np.int32),
    )
