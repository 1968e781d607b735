"""Byte-level BPE tokenizer of the arithmetic task, and its step-boundary helpers.

The tokenizer is a Qwen2-style byte-level BPE (``ByteLevel`` pre-tokenizer and decoder, no
normalizer) over printable ASCII plus tab/newline/carriage return, with pre-tokenization that
keeps the tokens arithmetic needs atomic:

- every newline (``STEP_DELIMITER``) is its own pre-token, so one token id marks a step end and no
  other token contains a newline;
- every digit is its own pre-token (``Digits(individual_digits=True)``), so numbers are spelled
  digit by digit;
- each of ``+ - * = ( ) ?`` is its own pre-token.

BPE merges therefore only build the words of the template (``"Q: "``, ``"Answer: "``). The
special tokens are ``PAD_TOKEN`` (id 0) and ``EOS_TOKEN`` (id 1); there is no BOS (sequences start
with the prompt). Bytes outside the alphabet have no token and are dropped when encoding; every
token sequence decodes losslessly.

The trained tokenizer ships in ``tts_jax/assets/arith-lm/`` and loads with
``transformers.AutoTokenizer.from_pretrained`` (``tts-jax train arith-tokenizer``).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Iterable, Sequence

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from tts_jax.app.tasks.arithmetic import EOS_TOKEN, PAD_TOKEN, STEP_DELIMITER
from tts_jax.models.zoo import asset_dir

# The embedded policy folder, which holds the tokenizer (located by the asset registry).
ARITH_LM_DIR = asset_dir("arith-lm")
SPECIAL_TOKENS = (PAD_TOKEN, EOS_TOKEN)
MAX_LENGTH = 256
_ALPHABET_BYTES = bytes([9, 10, 13, *range(32, 127)])
_ATOMIC_SYMBOLS = r"[\n+\-*=()?]"


def _byte_level() -> pre_tokenizers.ByteLevel:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)


def _initial_alphabet() -> list[str]:
    """The characters the ByteLevel pre-tokenizer maps ``_ALPHABET_BYTES`` to."""
    byte_level = _byte_level()
    return [byte_level.pre_tokenize_str(chr(b))[0][0] for b in _ALPHABET_BYTES]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 128) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on task text.

    Args:
        texts: training corpus (prompts and solutions).
        vocab_size: upper bound on the vocabulary; training stops earlier once no pair repeats.

    Returns:
        A transformers fast tokenizer with ``eos_token`` / ``pad_token`` set.
    """
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_ATOMIC_SYMBOLS), behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            _byte_level(),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=_initial_alphabet(),
        limit_alphabet=len(_ALPHABET_BYTES),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=MAX_LENGTH,
        clean_up_tokenization_spaces=False,
        padding_side="right",
    )


@dataclasses.dataclass(frozen=True)
class ArithTokenizer:
    """The task tokenizer plus the token ids the samplers need.

    Attributes:
        hf: the transformers tokenizer (what ``AutoTokenizer`` loads from the asset folder).
    """

    hf: PreTrainedTokenizerBase

    @classmethod
    def load(cls, path: str | pathlib.Path = ARITH_LM_DIR) -> ArithTokenizer:
        """Load from a folder holding ``tokenizer.json`` + ``tokenizer_config.json``."""
        return cls(AutoTokenizer.from_pretrained(str(path)))

    @property
    def vocab_size(self) -> int:
        """Number of token ids (special tokens included)."""
        return len(self.hf)

    @property
    def eos_id(self) -> int:
        return self.hf.eos_token_id

    @property
    def pad_id(self) -> int:
        return self.hf.pad_token_id

    @functools.cached_property
    def delimiter_id(self) -> int:
        """The id of the single token that ``STEP_DELIMITER`` encodes to."""
        (token_id,) = self.encode(STEP_DELIMITER)
        return token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        return self.hf.encode(text, add_special_tokens=False)

    def decode(self, ids: Sequence[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; special tokens (EOS, PAD) are dropped by default."""
        return self.hf.decode(
            [int(i) for i in ids],
            skip_special_tokens=skip_special_tokens,
            clean_up_tokenization_spaces=False,
        )

    def step_end_mask(self, ids: np.ndarray, start: int | np.ndarray = 0) -> np.ndarray:
        """Positions that end a step: delimiter tokens and EOS, at or after ``start``.

        The prompt ends with the delimiter too; pass its length as ``start`` to mark only steps of
        the completion. A complete solution with ``k`` steps plus the answer line has ``k + 1``
        step ends (``k`` delimiters, then EOS after the answer line).

        Args:
            ids: token ids ``[..., L]``.
            start: first position that may be marked, a scalar or ``[...]`` (e.g. prompt lengths).

        Returns:
            Bool mask ``[..., L]``.
        """
        ids = np.asarray(ids)
        is_end = (ids == self.delimiter_id) | (ids == self.eos_id)
        positions = np.arange(ids.shape[-1])
        return is_end & (positions >= np.asarray(start)[..., None])
