"""Solution steps and the input format of Qwen2.5-Math-PRM.

Steps. A solution is split into steps at a separator string, by default a blank line
(:data:`STEP_SEPARATOR` ``"\\n\\n"``, as its_hub and Puri et al. 2025 do). Byte-level BPE
vocabularies (Qwen2) merge the separator with what precedes it (``".\\n\\n"``, ``":\\n\\n"`` are
single tokens), so a step end is a *token whose text ends with the separator*:
:func:`separator_token_ids` lists them; the LM samplers take one ``sep_id`` and
:func:`step_separator_id` returns the bare separator's token.

The PRM input (the Qwen2.5-Math-PRM model card): the chat ``system`` (:data:`QWEN_MATH_SYSTEM`),
``user`` (the problem), ``assistant`` (the steps, each followed by :data:`PRM_STEP_TOKEN`
``"<extra_0>"``), rendered by the PRM tokenizer's chat template without a generation prompt and
tokenized; the reward of step ``k`` is ``softmax(logits)[1]`` at the ``k``-th ``<extra_0>``
(:func:`tts_jax.models.lm_reward.prm_scores` with the mask of :func:`prm_conversation`).

Policy completion -> PRM input (:func:`policy_to_prm`): the completion's token ids are decoded
with the policy tokenizer, cut into steps at the sampler's step-end marks, and re-rendered and
re-tokenized with the PRM tokenizer, on the host. Cost per scoring of one particle: a decode of
its ``L`` completion tokens, a chat-template render and a tokenization of the ``P' + L'``
conversation (pure Python / Rust, roughly tens of microseconds per hundred tokens), and a PRM
forward over all ``P' + L'`` positions: the PRM's KV cache cannot be kept across steps because
the input is rebuilt, so a step-level method re-reads the prefix at every step (quadratic in the
number of steps, like :data:`~tts_jax.models.lm_reward.prm_scorer`), plus one device -> host ->
device round trip per scoring when it runs behind :func:`~tts_jax.samplers.lm.scoring.host_scorer`.
When policy and PRM share a vocabulary and a format, the in-graph
:data:`~tts_jax.models.lm_reward.cached_prm_scorer` avoids all of this.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import numpy as np

from tts_jax.app.tasks.math.prompting import QWEN_MATH_SYSTEM, encode, messages

STEP_SEPARATOR = "\n\n"
"""Default step separator: a blank line."""
PRM_STEP_TOKEN = "<extra_0>"
"""The step marker of Qwen2.5-Math-PRM (an added special token of its tokenizer)."""


class PRMInput(NamedTuple):
    """One PRM conversation.

    Attributes:
        ids: ``int32[T]`` token ids.
        step_mask: ``bool[T]`` true at each step's :data:`PRM_STEP_TOKEN` (one per step).
    """

    ids: np.ndarray
    step_mask: np.ndarray


def split_steps(text: str, separator: str = STEP_SEPARATOR) -> list[str]:
    """Steps of a solution text: split at ``separator``, each stripped, empty ones dropped."""
    return [s.strip() for s in text.split(separator) if s.strip()]


def step_separator_id(tokenizer: Any, separator: str = STEP_SEPARATOR) -> int:
    """The token id of ``separator`` alone (the ``sep_id`` of the LM samplers).

    Raises:
        ValueError: ``separator`` is not a single token of ``tokenizer``.
    """
    ids = encode(tokenizer, separator)
    if len(ids) != 1:
        raise ValueError(
            f"the step separator {separator!r} is {len(ids)} tokens {ids} in this tokenizer; "
            "the samplers need a single-token separator"
        )
    return ids[0]


def separator_token_ids(tokenizer: Any, separator: str = STEP_SEPARATOR) -> tuple[int, ...]:
    """Every token id whose decoded text ends with ``separator`` (e.g. ``"\\n\\n"``,
    ``".\\n\\n"``, ``":\\n\\n"`` in Qwen2): the tokens that end a step when steps are cut at
    ``separator`` in the text. Special tokens are excluded."""
    special = set(getattr(tokenizer, "all_special_ids", ()))
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])  # ~1 s for 150k ids
    return tuple(i for i, t in enumerate(texts) if i not in special and t.endswith(separator))


def step_token_id(tokenizer: Any) -> int:
    """The id of :data:`PRM_STEP_TOKEN` in the PRM tokenizer.

    Raises:
        ValueError: the tokenizer does not have it as one token (not a Qwen2.5-Math-PRM one).
    """
    ids = encode(tokenizer, PRM_STEP_TOKEN)
    if len(ids) != 1:
        raise ValueError(
            f"the PRM tokenizer has no {PRM_STEP_TOKEN!r} token (it encodes to {ids}); "
            "a Qwen2.5-Math-PRM tokenizer adds it as a special token"
        )
    return ids[0]


def prm_text(
    tokenizer: Any, problem: str, steps: Sequence[str], system_prompt: str = QWEN_MATH_SYSTEM
) -> str:
    """The rendered PRM conversation: ``system``, ``user`` (problem), ``assistant`` (each step
    followed by ``<extra_0>``; marker text inside a step is removed), no generation prompt."""
    clean = [s.replace(PRM_STEP_TOKEN, "") for s in steps]
    answer = "".join(s + PRM_STEP_TOKEN for s in clean)
    chat = messages(problem, system_prompt) + [{"role": "assistant", "content": answer}]
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=False)


def prm_conversation(
    tokenizer: Any, problem: str, steps: Sequence[str], system_prompt: str = QWEN_MATH_SYSTEM
) -> PRMInput:
    """Token ids and step-end mask of the PRM input for ``problem`` and solution ``steps``.

    Args:
        tokenizer: the PRM's ``transformers`` tokenizer (with a chat template and
            ``<extra_0>``).
        problem: the problem statement.
        steps: the solution steps (texts without separators).
        system_prompt: the system message.

    Returns:
        :class:`PRMInput` with exactly ``len(steps)`` marked positions.
    """
    marker = step_token_id(tokenizer)
    ids = np.asarray(encode(tokenizer, prm_text(tokenizer, problem, steps, system_prompt)))
    mask = ids == marker
    if int(mask.sum()) != len(steps):  # the template dropped or added markers
        raise ValueError(
            f"the PRM conversation has {int(mask.sum())} {PRM_STEP_TOKEN} tokens for "
            f"{len(steps)} steps: check the PRM tokenizer's chat template"
        )
    return PRMInput(ids.astype(np.int32), mask)


def completion_steps(
    tokenizer: Any,
    completion: Sequence[int] | np.ndarray,
    step_ends: Sequence[bool] | np.ndarray | None = None,
    *,
    include_tail: bool = False,
    separator: str = STEP_SEPARATOR,
) -> list[str]:
    """The steps of a policy completion, as texts.

    Args:
        tokenizer: the policy tokenizer.
        completion: the completion's token ids (without padding).
        step_ends: ``bool`` per completion token, true at the last token of each step (the
            samplers' ``step_ends``); ``None``: cut the decoded text with :func:`split_steps`.
        include_tail: with ``step_ends``, the tokens after the last mark form one more step
            (a finished solution's final step, which ends at EOS rather than a separator).
        separator: removed from the end of each step before stripping.

    Returns:
        One text per marked step (kept even when empty, so steps and marks stay aligned), plus
        the tail if asked for and not blank.
    """
    ids = np.asarray(completion, np.int64)
    if step_ends is None:
        return split_steps(tokenizer.decode(ids, skip_special_tokens=True), separator)
    ends = np.flatnonzero(np.asarray(step_ends, bool)[: ids.shape[0]])
    steps, start = [], 0
    for end in ends:
        text = tokenizer.decode(ids[start : end + 1], skip_special_tokens=True)
        steps.append(text.strip().removesuffix(separator.strip()).strip())
        start = int(end) + 1
    if include_tail:
        tail = tokenizer.decode(ids[start:], skip_special_tokens=True).strip()
        if tail:
            steps.append(tail)
    return steps


def policy_to_prm(
    policy_tokenizer: Any,
    prm_tokenizer: Any,
    problem: str,
    completion: Sequence[int] | np.ndarray,
    step_ends: Sequence[bool] | np.ndarray | None = None,
    *,
    include_tail: bool = False,
    separator: str = STEP_SEPARATOR,
    system_prompt: str = QWEN_MATH_SYSTEM,
) -> PRMInput:
    """A policy completion (token ids) as the PRM's input (re-tokenized on the host).

    :func:`completion_steps` with the policy tokenizer, then :func:`prm_conversation` with the
    PRM tokenizer; the ``k``-th marked PRM position scores the ``k``-th step end of
    ``step_ends`` (see the module docstring for the cost).
    """
    steps = completion_steps(
        policy_tokenizer, completion, step_ends, include_tail=include_tail, separator=separator
    )
    return prm_conversation(prm_tokenizer, problem, steps, system_prompt)


def pad_batch(
    inputs: Sequence[PRMInput], pad_id: int, multiple: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad PRM inputs to one ``[N, T]`` batch, ``T`` rounded up to ``multiple`` (so a
    jitted PRM compiles once per length bucket). Padding is never marked; attention is causal,
    so it does not change the scores.

    Returns:
        ``(ids int32[N, T], step_mask bool[N, T])``.
    """
    longest = max(int(x.ids.shape[0]) for x in inputs)
    width = -(-longest // multiple) * multiple
    ids = np.full((len(inputs), width), pad_id, np.int32)
    mask = np.zeros((len(inputs), width), bool)
    for i, x in enumerate(inputs):
        ids[i, : x.ids.shape[0]] = x.ids
        mask[i, : x.ids.shape[0]] = x.step_mask
    return ids, mask


def step_rewards(prm: Any, inputs: Sequence[PRMInput], pad_id: int = 0) -> list[np.ndarray]:
    """Per-step PRM rewards of each conversation (``float32[num_steps]`` each): one jitted
    :func:`~tts_jax.models.lm_reward.prm_scores` call on the padded batch."""
    ids, mask = pad_batch(inputs, pad_id)
    scores = np.asarray(_jitted_prm_scores()(prm, ids, mask))
    return [scores[i][mask[i]] for i in range(len(inputs))]


@functools.cache
def _jitted_prm_scores():
    import jax

    from tts_jax.models.lm_reward import prm_scores

    return jax.jit(prm_scores)


def problem_from_chat_prompt(tokenizer: Any, prompt: Sequence[int] | np.ndarray) -> str:
    """The user message of a ChatML prompt (``<|im_start|>user\\n...<|im_end|>``), read back
    from its token ids (a host scorer that sees only token rows recovers the problem this way).

    Raises:
        ValueError: no ChatML user message in the prompt.
    """
    text = tokenizer.decode(np.asarray(prompt, np.int64), skip_special_tokens=False)
    head = "<|im_start|>user\n"
    start = text.rfind(head)
    end = text.find("<|im_end|>", start + len(head))
    if start < 0 or end < 0:
        raise ValueError("not a ChatML prompt: no '<|im_start|>user ... <|im_end|>' message")
    return text[start + len(head) : end]


def _completion_start(header: Sequence[int], row: np.ndarray, before: int) -> int:
    """Index after the last occurrence of ``header`` in ``row[:before]``."""
    h = len(header)
    for s in range(before - h, -1, -1):
        if row[s : s + h].tolist() == list(header):
            return s + h
    raise ValueError("no assistant header before the first step end: not a chat-prompt row")


def prm_host_fn(
    policy_tokenizer: Any,
    prm_tokenizer: Any,
    prm: Any,
    *,
    separator: str = STEP_SEPARATOR,
    system_prompt: str = QWEN_MATH_SYSTEM,
    assistant_header: str = "<|im_start|>assistant\n",
) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """A host sequence scorer ``fn(tokens int[N, T], step_ends bool[N, T]) -> float32[N, T]``
    that scores policy rows with a PRM reading its own format (for
    :func:`~tts_jax.samplers.lm.scoring.host_scorer`).

    Each row is a ChatML prompt + completion (what the samplers pass a scorer): the problem is
    read back from the prompt (:func:`problem_from_chat_prompt`), the completion starts after
    the last ``assistant_header`` before the first step end, its steps are cut at the marks
    (the stop token of a finished particle is a mark too) and re-tokenized for the PRM
    (:func:`policy_to_prm`); the ``k``-th PRM reward is written at the row's ``k``-th mark.
    All rows go through the PRM in one batch (:func:`step_rewards`, lengths bucketed by 64).
    The problem is not a closure variable, so one compiled sampler serves every problem.
    Cost: see the module docstring (a full PRM pass over every row at every scoring).

    The PRM's (jitted JAX) forward runs inside the sampler's ``jax.pure_callback``: tested on
    CPU; JAX does not promise that calling back into JAX from a callback works on every
    backend, so on an accelerator prefer scoring outside the sampler (e.g. best-of-N:
    sample with a constant scorer, then :func:`step_rewards` on the final completions).
    """
    header = encode(policy_tokenizer, assistant_header)
    pad = prm_tokenizer.pad_token_id or 0

    def fn(tokens: np.ndarray, step_ends: np.ndarray) -> np.ndarray:
        tokens, step_ends = np.asarray(tokens), np.asarray(step_ends, bool)
        out = np.zeros(tokens.shape, np.float32)
        rows, inputs = [], []
        for i, (row, ends) in enumerate(zip(tokens, step_ends, strict=True)):
            marks = np.flatnonzero(ends)
            if marks.size == 0:
                continue
            start = _completion_start(header, row, int(marks[0]) + 1)
            problem = problem_from_chat_prompt(policy_tokenizer, row[:start])
            stop = int(marks[-1]) + 1
            prm_input = policy_to_prm(
                policy_tokenizer,
                prm_tokenizer,
                problem,
                row[start:stop],
                ends[start:stop],
                separator=separator,
                system_prompt=system_prompt,
            )
            rows.append((i, marks))
            inputs.append(prm_input)
        if inputs:
            for (i, marks), rewards in zip(rows, step_rewards(prm, inputs, pad), strict=True):
                out[i, marks] = rewards
        return out

    return fn
