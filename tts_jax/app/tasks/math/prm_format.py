"""Solution steps and the input format of Qwen2.5-Math-PRM.

Steps. A solution is split into steps at a separator string, by default a blank line
(:data:`STEP_SEPARATOR` ``"\\n\\n"``, as its_hub and Puri et al. 2025 do). Byte-level BPE
vocabularies (Qwen2) merge the separator with what precedes it (``".\\n\\n"``, ``":\\n\\n"`` are
single tokens), so a step end is a *token whose text ends with the separator*:
:func:`separator_token_ids` lists them, the LM samplers' ``sep_ids`` (:func:`step_separator_id`
returns the bare separator's token alone).

The PRM input (the Qwen2.5-Math-PRM model card): the chat ``system`` (:data:`QWEN_MATH_SYSTEM`),
``user`` (the problem), ``assistant`` (the steps, each followed by :data:`PRM_STEP_TOKEN`
``"<extra_0>"``), rendered by the PRM tokenizer's chat template without a generation prompt and
tokenized; the reward of step ``k`` is ``softmax(logits)[1]`` at the ``k``-th ``<extra_0>``
(:func:`tts_jax.models.lm_reward.prm_scores` with the mask of :func:`prm_conversation`).

Policy completion -> PRM input, two ways with the same rewards:

* Incremental (:func:`conversation_prm_scorer`, the default of the math runner): the PRM's KV
  cache is kept per particle. The conversation's head (system, user, assistant header:
  :func:`conversation_parts`) is prefilled once per problem; after each step, the step's policy
  tokens are decoded, cut (:func:`step_text`) and encoded with the PRM tokenizer on the host
  (:func:`new_steps_to_prm`, one ``jax.pure_callback`` per step for all particles, no JAX inside
  it), and only those tokens and the step's ``<extra_0>`` are appended to the PRM cache; the
  reward is read at that marker. The PRM has then read exactly :func:`prm_conversation`'s tokens
  up to the last ``<extra_0>`` (the template's ``<|im_end|>`` after it never matters: attention
  is causal). Cost per step: one step's tokens per particle. The step is re-encoded even when
  policy and PRM share a vocabulary: the model card's steps are stripped of the separator,
  which byte-level BPE merged into the step's last policy token (``"$.\\n\\n"``), so the
  policy's tokens are not the PRM's.
* Host (:func:`prm_host_fn` in :func:`~tts_jax.samplers.lm.scoring.host_scorer`): each scoring
  decodes the whole completion, re-renders and re-tokenizes the ``P' + L'`` conversation and
  runs the PRM over all of it (quadratic in the number of steps, like
  :data:`~tts_jax.models.lm_reward.prm_scorer`), with the PRM's forward inside the callback.
  Kept as the reference and for chat formats the incremental head cannot be cut from.
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


def clean_step(step: str) -> str:
    """A step as the PRM conversation holds it: without marker text (a marker inside a step
    would be read as a step end)."""
    return step.replace(PRM_STEP_TOKEN, "")


def prm_text(
    tokenizer: Any, problem: str, steps: Sequence[str], system_prompt: str = QWEN_MATH_SYSTEM
) -> str:
    """The rendered PRM conversation: ``system``, ``user`` (problem), ``assistant`` (each step
    followed by ``<extra_0>``; marker text inside a step is removed), no generation prompt."""
    answer = "".join(clean_step(s) + PRM_STEP_TOKEN for s in steps)
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


def step_text(text: str, separator: str = STEP_SEPARATOR) -> str:
    """A step's decoded text (separator included) as the PRM reads it: stripped, ``separator``
    removed from its end."""
    return text.strip().removesuffix(separator.strip()).strip()


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
        steps.append(step_text(text, separator))
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


# --------------------------------------------------------------------------- incremental input


class ConversationParts(NamedTuple):
    """The PRM conversation of one problem around its steps: for any ``steps``,
    ``prm_conversation(tokenizer, problem, steps).ids == head + encode_step(s_1) + ... +
    encode_step(s_k) + tail`` (:func:`conversation_parts` checks the template's part of it).

    Attributes:
        head: ``int32[H]`` system, user and the assistant header (everything before the first
            step).
        tail: ``int32[T]`` what the template writes after the last step's marker (e.g.
            ``<|im_end|>\\n``); never fed to the PRM (attention is causal, so it does not change
            the step rewards).
        step_token: the id of :data:`PRM_STEP_TOKEN`.
    """

    head: np.ndarray
    tail: np.ndarray
    step_token: int


_PROBE_STEP = "Probe: $1 + 1 = 2$."


def encode_step(tokenizer: Any, step: str) -> list[int]:
    """The PRM tokens of one step text (already through :func:`step_text`) and its marker."""
    return encode(tokenizer, clean_step(step)) + [step_token_id(tokenizer)]


def conversation_parts(
    tokenizer: Any, problem: str, system_prompt: str = QWEN_MATH_SYSTEM
) -> ConversationParts:
    """Split the PRM conversation of ``problem`` into head, steps and tail.

    Why the steps can be encoded one at a time: each step is followed by the special token
    ``<extra_0>``, and a tokenizer splits its input at special tokens before the byte-level BPE
    runs, so the tokens of a step never depend on the text after its marker; the first step
    follows the assistant header's newline, which the Qwen2 pre-tokenizer never merges with a
    (stripped, so non-space) step. This function checks the template's side on a probe step
    (the steps are rendered verbatim between the head and the tail); the tests check the
    equality token for token at every step on a Qwen2 tokenizer.

    Raises:
        ValueError: the tokenizer has no ``<extra_0>``, or its chat template does not render the
            assistant content verbatim between a fixed head and tail.
    """
    marker = step_token_id(tokenizer)
    one = prm_conversation(tokenizer, problem, [""], system_prompt).ids
    cut = int(np.flatnonzero(one == marker)[0])
    head, tail = one[:cut], one[cut + 1 :]
    probe = prm_conversation(tokenizer, problem, [_PROBE_STEP, ""], system_prompt).ids
    expected = np.concatenate(
        [head, encode_step(tokenizer, _PROBE_STEP), encode_step(tokenizer, ""), tail]
    )
    if probe.tolist() != expected.tolist():
        raise ValueError(
            "the PRM tokenizer's chat template does not render the assistant's steps verbatim "
            "between a fixed head and tail: the PRM input cannot be built step by step (use "
            "the host scorer, prm_host_fn)"
        )
    return ConversationParts(head, tail.astype(np.int32), marker)


def incremental_ids(
    tokenizer: Any, problem: str, steps: Sequence[str], system_prompt: str = QWEN_MATH_SYSTEM
) -> np.ndarray:
    """``int32``: what the incremental scorer has fed the PRM after ``steps``: the head and
    each step with its marker (:func:`prm_conversation`'s tokens up to the last marker)."""
    parts = conversation_parts(tokenizer, problem, system_prompt)
    ids = list(parts.head) + [i for s in steps for i in encode_step(tokenizer, s)]
    return np.asarray(ids, np.int32)


def conversation_params(
    prm: Any,
    tokenizer: Any,
    problem: str,
    system_prompt: str = QWEN_MATH_SYSTEM,
    bucket: int = 64,
) -> Any:
    """The :class:`~tts_jax.models.lm_reward.PRMConversation` (``scorer_params`` of the
    incremental scorer) of one problem: the head of :func:`conversation_parts`, right-padded
    with the PRM's pad id to a multiple of ``bucket`` (one compiled sampler per width)."""
    import jax.numpy as jnp

    from tts_jax.models.lm_reward import PRMConversation

    parts = conversation_parts(tokenizer, problem, system_prompt)
    h = parts.head.shape[0]
    head = np.full((-(-h // bucket) * bucket,), tokenizer.pad_token_id or 0, np.int32)
    head[:h] = parts.head
    return PRMConversation(
        prm, jnp.asarray(head), jnp.asarray(h, jnp.int32), jnp.asarray(parts.step_token, jnp.int32)
    )


def new_steps_to_prm(
    policy_tokenizer: Any,
    prm_tokenizer: Any,
    completion: np.ndarray,
    step_ends: np.ndarray,
    fed: np.ndarray,
    length: np.ndarray,
    room: np.ndarray,
    width: int,
    separator: str = STEP_SEPARATOR,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The host side of :func:`conversation_step_encoder`: the PRM tokens of every row's steps
    completed since ``fed`` (a :data:`~tts_jax.models.lm_reward.StepEncoder`).

    Each step ``completion[i, start:end + 1]`` (``end`` a mark of ``step_ends`` before
    ``length[i]``) is decoded with the policy tokenizer (special tokens such as the stop token
    dropped), cut as :func:`completion_steps` does (:func:`step_text`) and encoded with its
    marker (:func:`encode_step`); all rows' steps in one batched decode and one batched encode.

    Returns:
        ``(ids int32[N, width], count int32[N], fed int32[N])``: right-padded PRM tokens, their
        number, and the position after each row's last completed step.

    Raises:
        ValueError: a row's new PRM tokens exceed ``width`` or its free cache positions
            ``room`` (naming the bound to raise), never truncated.
    """
    completion, step_ends = np.asarray(completion), np.asarray(step_ends, bool)
    fed, length, room = (np.asarray(a, np.int64) for a in (fed, length, room))
    n = completion.shape[0]
    ids = np.full((n, width), prm_tokenizer.pad_token_id or 0, np.int32)
    count = np.zeros((n,), np.int32)
    new_fed = fed.astype(np.int32)
    pieces, owners = [], []
    for i in range(n):
        start = int(fed[i])
        for end in np.flatnonzero(step_ends[i, start : length[i]]) + start:
            pieces.append(completion[i, start : end + 1].tolist())
            owners.append(i)
            start = int(end) + 1
        new_fed[i] = start
    if not pieces:
        return ids, count, new_fed
    marker = step_token_id(prm_tokenizer)
    texts = policy_tokenizer.batch_decode(pieces, skip_special_tokens=True)
    steps = [clean_step(step_text(t, separator)) for t in texts]
    encoded = prm_tokenizer(steps, add_special_tokens=False)["input_ids"]
    rows: dict[int, list[int]] = {}
    for i, step in zip(owners, encoded, strict=True):
        rows.setdefault(i, []).extend(list(step) + [marker])
    for i, row in rows.items():
        if len(row) > min(width, room[i]):
            raise ValueError(
                f"particle {i}: its new steps are {len(row)} PRM tokens, more than the "
                f"incremental PRM scorer's bound ({width} per step = token_ratio * "
                f"max_step_tokens, {int(room[i])} left in its PRM cache = token_ratio * "
                "max_new_tokens in all): raise ConversationPRMScorer.token_ratio"
            )
        ids[i, : len(row)] = row
        count[i] = len(row)
    return ids, count, new_fed


def conversation_step_encoder(
    policy_tokenizer: Any, prm_tokenizer: Any, separator: str = STEP_SEPARATOR
) -> Callable[..., tuple[Any, Any, Any]]:
    """The :data:`~tts_jax.models.lm_reward.StepEncoder` of Qwen2.5-Math-PRM's model-card
    input: :func:`new_steps_to_prm` behind one ``jax.pure_callback`` (host tokenizers, no JAX
    inside the callback). Build it once per tokenizer pair: the scorer is hashed by it."""
    import jax
    import jax.numpy as jnp

    def host(completion, step_ends, fed, length, room, *, width):
        return new_steps_to_prm(
            policy_tokenizer,
            prm_tokenizer,
            completion,
            step_ends,
            fed,
            length,
            room,
            width,
            separator,
        )

    def encode_steps(completion, step_ends, fed, length, room, width):
        n = completion.shape[0]
        out = (
            jax.ShapeDtypeStruct((n, width), jnp.int32),
            jax.ShapeDtypeStruct((n,), jnp.int32),
            jax.ShapeDtypeStruct((n,), jnp.int32),
        )
        return jax.pure_callback(
            functools.partial(host, width=width),
            out,
            completion,
            step_ends,
            fed,
            length,
            room,
            vmap_method="sequential",
        )

    return encode_steps


def conversation_prm_scorer(
    policy_tokenizer: Any,
    prm_tokenizer: Any,
    separator: str = STEP_SEPARATOR,
    token_ratio: int = 2,
) -> Any:
    """The incremental model-card PRM scorer
    (:class:`~tts_jax.models.lm_reward.ConversationPRMScorer` with
    :func:`conversation_step_encoder`); its ``scorer_params`` per problem are
    :func:`conversation_params`. Build it once per tokenizer pair (samplers compile per
    scorer)."""
    from tts_jax.models.lm_reward import ConversationPRMScorer

    encoder = conversation_step_encoder(policy_tokenizer, prm_tokenizer, separator)
    return ConversationPRMScorer(encoder, token_ratio)
