"""Chat-template prompts of the math task and the policy's generation settings.

The policy (e.g. Qwen2.5-Math-*-Instruct) is prompted as in Puri et al. 2025 and the Qwen2.5-Math
evaluation: a system message :data:`QWEN_MATH_SYSTEM` and the problem as the user message,
rendered by the folder's own chat template with ``add_generation_prompt=True`` (so the prompt
ends with the assistant header and the sampled completion is the assistant's answer).

A tokenizer is a ``transformers`` tokenizer (:func:`load_tokenizer`). A folder without a chat
template is refused with :class:`MissingChatTemplateError`, unless ``plain=True`` asks for the
documented plain format :data:`PLAIN_FORMAT` (for base models that were never chat-tuned).

:func:`read_generation_settings` reads ``generation_config.json``: the EOS id(s) (an int or a
list), ``stop_strings`` mapped to stop token ids where a string is one token of the vocabulary,
the token budget (``max_new_tokens``) and the sampling temperature.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence
from typing import Any, NamedTuple

QWEN_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
"""The system prompt of Qwen2.5-Math's chain-of-thought evaluation (and of its PRM's inputs)."""

PLAIN_FORMAT = "{system}\n\n{problem}\n\n"
"""Prompt text without a chat template (``plain=True``): the system prompt, a blank line, the
problem, a blank line; the completion follows directly."""


class MissingChatTemplateError(ValueError):
    """The tokenizer has no chat template (and the plain format was not asked for)."""


def load_tokenizer(path: str | pathlib.Path) -> Any:
    """The ``transformers`` tokenizer of a local folder (``tokenizer.json`` /
    ``tokenizer_config.json``); never downloads.

    Raises:
        FileNotFoundError: the folder does not exist.
    """
    import transformers

    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"load_tokenizer: no tokenizer folder at {folder}")
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def messages(problem: str, system_prompt: str | None = QWEN_MATH_SYSTEM) -> list[dict[str, str]]:
    """The chat of one problem: ``[system, user]`` (no system message when ``None``)."""
    chat = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return chat + [{"role": "user", "content": problem}]


def prompt_text(
    tokenizer: Any, problem: str, system_prompt: str | None = QWEN_MATH_SYSTEM, *, plain=False
) -> str:
    """The rendered prompt string (see :func:`build_prompt`)."""
    if plain:
        return PLAIN_FORMAT.format(system=system_prompt or "", problem=problem).lstrip("\n")
    if not has_chat_template(tokenizer):
        name = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        raise MissingChatTemplateError(
            f"the tokenizer of {name!r} has no chat template (tokenizer_config.json "
            "'chat_template' or chat_template.jinja): use an instruct / chat model folder, or "
            "pass plain=True for the plain format (tts_jax.app.tasks.math.prompting.PLAIN_FORMAT)"
        )
    return tokenizer.apply_chat_template(
        messages(problem, system_prompt), tokenize=False, add_generation_prompt=True
    )


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` with no extra special tokens (the template already has them)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def build_prompt(
    tokenizer: Any,
    problem: str,
    system_prompt: str | None = QWEN_MATH_SYSTEM,
    *,
    plain: bool = False,
) -> list[int]:
    """Prompt token ids of one problem.

    Args:
        tokenizer: a ``transformers`` tokenizer with a chat template.
        problem: the problem statement (the user message).
        system_prompt: the system message (``None``: none; the template may add its default).
        plain: use :data:`PLAIN_FORMAT` instead of the chat template.

    Returns:
        The ids of ``apply_chat_template([system, user], add_generation_prompt=True)``.

    Raises:
        MissingChatTemplateError: no chat template and ``plain`` is false.
    """
    return encode(tokenizer, prompt_text(tokenizer, problem, system_prompt, plain=plain))


class GenerationSettings(NamedTuple):
    """What the samplers take from ``generation_config.json`` (and the tokenizer).

    Attributes:
        stop_ids: token ids that finish a completion: the EOS id(s), then the single-token stop
            strings, without duplicates.
        eos_ids: the EOS id(s) alone.
        pad_id: filler token (``pad_token_id``, else the tokenizer's pad, else the first EOS).
        max_new_tokens: token budget (``max_new_tokens``; ``None`` if the file sets none).
        temperature: the sampling temperature the model was released with (``None``: unset).
        multi_token_stops: stop strings that are several tokens; the samplers stop on ids only,
            so these are checked on the decoded text afterwards (or not at all).
        unsupported: sampling settings of the file that the LM samplers do not implement
            (``top_p`` < 1, ``top_k`` > 0, ``repetition_penalty`` != 1, ``min_p`` > 0), with
            their values: a run samples at ``temperature`` alone and should record these.
    """

    stop_ids: tuple[int, ...]
    eos_ids: tuple[int, ...]
    pad_id: int
    max_new_tokens: int | None
    temperature: float | None
    multi_token_stops: tuple[str, ...]
    unsupported: dict[str, float]


# setting -> value at which it does nothing
_NEUTRAL = {"top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0, "min_p": 0.0}


def _as_ids(value: int | Sequence[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def single_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of ``text`` if it is exactly one token of ``tokenizer`` (else ``None``)."""
    ids = encode(tokenizer, text)
    return ids[0] if len(ids) == 1 else None


def read_generation_settings(path: str | pathlib.Path, tokenizer: Any) -> GenerationSettings:
    """Read a folder's ``generation_config.json`` (missing file: the tokenizer's EOS only).

    Args:
        path: the policy folder.
        tokenizer: its tokenizer (maps stop strings to ids, supplies defaults).

    Raises:
        ValueError: invalid JSON, or no EOS id in the file or the tokenizer.
    """
    file = pathlib.Path(path) / "generation_config.json"
    raw: dict[str, Any] = {}
    if file.exists():
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{file}: invalid JSON ({err})") from err
    eos = _as_ids(raw.get("eos_token_id"))
    if not eos and getattr(tokenizer, "eos_token_id", None) is not None:
        eos = (int(tokenizer.eos_token_id),)
    if not eos:
        raise ValueError(f"{file}: no eos_token_id, and the tokenizer has no EOS token")
    strings = raw.get("stop_strings") or ()
    strings = (strings,) if isinstance(strings, str) else tuple(strings)
    single = {s: single_token_id(tokenizer, s) for s in strings}
    stops = tuple(dict.fromkeys(eos + tuple(i for i in single.values() if i is not None)))
    pad = raw.get("pad_token_id")
    if pad is None:
        pad = getattr(tokenizer, "pad_token_id", None)
    temperature = raw.get("temperature") if raw.get("do_sample", True) else 0.0
    return GenerationSettings(
        stop_ids=stops,
        eos_ids=eos,
        pad_id=int(eos[0] if pad is None else pad),
        max_new_tokens=raw.get("max_new_tokens"),
        temperature=None if temperature is None else float(temperature),
        multi_token_stops=tuple(s for s, i in single.items() if i is None),
        unsupported={
            k: raw[k]
            for k, neutral in _NEUTRAL.items()
            if raw.get(k) is not None and raw[k] != neutral
        },
    )
