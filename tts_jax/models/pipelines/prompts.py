"""Prompt encoding of the SD3 / SD3.5 and FLUX.1 pipelines: host tokenizers, jitted text encoders.

Reproduces diffusers' ``StableDiffusion3Pipeline.encode_prompt`` and ``FluxPipeline.encode_prompt``
(no ``clip_skip``, no LoRA scale, no per-encoder prompts ``prompt_2`` / ``prompt_3``):

* **SD3** (Esser et al. 2024): both CLIP encoders (``text_encoder`` CLIP-L, ``text_encoder_2``
  CLIP-G, ``CLIPTextModelWithProjection``) read the prompt padded to the first CLIP tokenizer's
  ``model_max_length`` (77; each tokenizer its own pad token). Their penultimate hidden states
  (``hidden_states[-2]``) are concatenated along features, zero-padded to the T5 width and
  followed, along tokens, by T5's ``last_hidden_state`` on the prompt padded to
  ``max_sequence_length`` (zeros of the transformer's ``joint_attention_dim`` when the folder has
  no T5): ``embeds [B, 77 + S, D_t5]``. ``pooled [B, P_l + P_g]`` is the concatenation of the two
  ``text_embeds``. The negative prompt (default ``""``) is encoded the same way, for
  classifier-free guidance.
* **FLUX** (Black Forest Labs 2024): ``pooled [B, P]`` is CLIP-L's ``pooler_output``
  (``CLIPTextModel``), ``embeds [B, S, D_t5]`` T5's ``last_hidden_state``. The text position ids
  are zeros ``[S, 3]`` and are built by the transformer wrapper, not stored. No negative prompt.

Tokenizers run on the host (transformers' ``CLIPTokenizer`` from ``vocab.json`` +
``merges.txt``, ``T5TokenizerFast``; ids as int32 numpy); the encoders run in one jitted call per
:meth:`PromptEncoder.encode` (prompts and negative prompts in one batch), compiled once per
pipeline kind and token shape. The result is a :class:`TextCondition`, the ``cond`` of
:mod:`tts_jax.models.pipelines.text_to_image`: every leaf has the prompt batch ``B`` first (1 for
one prompt), never the particle count.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.models import checkpoint
from tts_jax.models.clip import clip_text_apply, load_clip_text, sd3_prompt_embeds
from tts_jax.models.t5 import load_t5_encoder, t5_encoder_apply

Array = jax.Array
Split = tuple[nnx.GraphDef, nnx.State]
_LOADER = "load_text_to_image"


class TextCondition(NamedTuple):
    """Encoded prompts: the ``cond`` pytree of a text-to-image flow (prompt batch ``B`` first).

    Attributes:
        embeds: ``[B, T, D]`` token embeddings (SD3: ``T = 77 + S`` CLIP then T5 tokens; FLUX:
            ``T = S`` T5 tokens), in the text encoders' dtype.
        pooled: ``[B, P]`` pooled embedding (SD3: CLIP-L and CLIP-G projections; FLUX: CLIP-L).
        negative_embeds: ``[B, T, D]`` the negative prompt's (SD3), or ``None`` (FLUX).
        negative_pooled: ``[B, P]`` likewise.
        extra: anything else the rewards read from ``cond`` (e.g. a CLIP reward's token ids,
            ``cond._replace(extra=ids)``), leaves with the prompt batch ``B`` first; ignored by
            the flow.
    """

    embeds: Array
    pooled: Array
    negative_embeds: Array | None = None
    negative_pooled: Array | None = None
    extra: Any = None


# --------------------------------------------------------------------------- tokenizers


def load_tokenizer(folder: str | Path, family: Literal["clip", "t5"]) -> Any:
    """A transformers tokenizer from a pipeline's ``tokenizer*/`` folder: ``CLIPTokenizer``
    (``vocab.json`` + ``merges.txt``, as diffusers loads it) or ``T5TokenizerFast``.

    Raises:
        CheckpointNotFoundError: the folder is missing or transformers cannot read it.
    """
    import transformers

    folder = checkpoint.require_folder(folder, _LOADER)
    cls = transformers.CLIPTokenizer if family == "clip" else transformers.T5TokenizerFast
    try:
        return cls.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as e:
        raise checkpoint.CheckpointNotFoundError(
            f"{_LOADER}: transformers' {cls.__name__} cannot read tokenizer folder {folder} "
            f"({type(e).__name__}: {e})"
        ) from e


def tokenize(tokenizer: Any, prompts: Sequence[str], max_length: int) -> np.ndarray:
    """``int32[B, max_length]`` ids, padded to ``max_length`` and truncated, with the special
    tokens (``padding="max_length", truncation=True``, as both pipelines call their tokenizers)."""
    ids = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="np",
    ).input_ids
    return np.asarray(ids, np.int32)


# --------------------------------------------------------------------------- jitted encoders


@functools.partial(jax.jit, static_argnames="t5_shape")
def _sd3_encode(
    clip_l: Split,
    clip_g: Split,
    t5: Split | None,
    ids_l: Array,
    ids_g: Array,
    ids_t5: Array | None,
    t5_shape: tuple[int, int] | None = None,
) -> tuple[Array, Array]:
    """SD3's ``(embeds [B, L + S, D], pooled [B, P_l + P_g])`` (module docstring).

    ``t5_shape = (S, D)`` gives zeros for a folder without T5 (then ``t5`` and ``ids_t5`` are
    ``None``).
    """
    out_l = clip_text_apply(nnx.merge(*clip_l), ids_l)
    out_g = clip_text_apply(nnx.merge(*clip_g), ids_g)
    clip_embeds = jnp.concatenate([sd3_prompt_embeds(out_l), sd3_prompt_embeds(out_g)], axis=-1)
    if t5 is None:
        seq, width = t5_shape
        t5_embeds = jnp.zeros((ids_l.shape[0], seq, width), clip_embeds.dtype)
    else:
        t5_embeds = t5_encoder_apply(nnx.merge(*t5), ids_t5).last_hidden_state
    pad = t5_embeds.shape[-1] - clip_embeds.shape[-1]
    if pad < 0:
        raise ValueError(
            f"the CLIP features ({clip_embeds.shape[-1]}) are wider than the T5 ones "
            f"({t5_embeds.shape[-1]}): not an SD3 text stack"
        )
    clip_embeds = jnp.pad(clip_embeds, ((0, 0), (0, 0), (0, pad)))
    embeds = jnp.concatenate([clip_embeds, t5_embeds.astype(clip_embeds.dtype)], axis=1)
    pooled = jnp.concatenate([out_l.text_embeds, out_g.text_embeds], axis=-1)
    return embeds, pooled


@jax.jit
def _flux_encode(clip: Split, t5: Split, ids_clip: Array, ids_t5: Array) -> tuple[Array, Array]:
    """FLUX's ``(embeds [B, S, D_t5], pooled [B, D_clip])`` (module docstring)."""
    pooled = clip_text_apply(nnx.merge(*clip), ids_clip).pooler_output
    embeds = t5_encoder_apply(nnx.merge(*t5), ids_t5).last_hidden_state
    return embeds, pooled


# --------------------------------------------------------------------------- the encoder


@dataclasses.dataclass(frozen=True, eq=False)
class PromptEncoder:
    """The tokenizers and text encoders of one pipeline.

    Attributes:
        kind: ``"sd3"`` or ``"flux"``.
        tokenizers: CLIP-L, then CLIP-G (SD3), then T5 (``None`` for an SD3 folder without T5).
        encoders: ``nnx.split`` of the matching text encoders (same order, ``None`` alike).
        clip_length: CLIP padding length (the first CLIP tokenizer's ``model_max_length``).
        max_sequence_length: T5 padding length ``S``.
        t5_width: SD3's transformer ``joint_attention_dim`` (the zero T5 part's width).
    """

    kind: Literal["sd3", "flux"]
    tokenizers: tuple[Any, ...]
    encoders: tuple[Split | None, ...]
    clip_length: int
    max_sequence_length: int
    t5_width: int

    def _sd3(self, texts: list[str]) -> tuple[Array, Array]:
        tok_l, tok_g, tok_t5 = self.tokenizers
        clip_l, clip_g, t5 = self.encoders
        ids_l = tokenize(tok_l, texts, self.clip_length)
        ids_g = tokenize(tok_g, texts, self.clip_length)
        if t5 is None:
            shape = (self.max_sequence_length, self.t5_width)
            return _sd3_encode(clip_l, clip_g, None, ids_l, ids_g, None, t5_shape=shape)
        ids_t5 = tokenize(tok_t5, texts, self.max_sequence_length)
        return _sd3_encode(clip_l, clip_g, t5, ids_l, ids_g, ids_t5)

    def encode(
        self, prompts: str | Sequence[str], negative_prompts: str | Sequence[str] | None = None
    ) -> TextCondition:
        """Encode ``B`` prompts (and, for SD3, their negative prompts) in one jitted call.

        Args:
            prompts: one prompt or ``B``.
            negative_prompts: SD3 only: one for all, ``B``, or ``None`` (``""``, diffusers'
                default). FLUX has no negative prompt (it must be ``None``).

        Returns:
            :class:`TextCondition` with leading axis ``B``.

        Raises:
            ValueError: no prompt, a negative prompt count other than 1 or ``B``, or a negative
                prompt for FLUX.
        """
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a string or a non-empty list of strings: {prompts}")
        b = len(prompts)
        if self.kind == "flux":
            if negative_prompts is not None:
                raise ValueError(
                    "FLUX pipelines take no negative prompt (guidance-distilled models embed "
                    "the guidance scale instead)"
                )
            tok_clip, tok_t5 = self.tokenizers
            ids_clip = tokenize(tok_clip, prompts, self.clip_length)
            ids_t5 = tokenize(tok_t5, prompts, self.max_sequence_length)
            embeds, pooled = _flux_encode(*self.encoders[:2], ids_clip, ids_t5)
            return TextCondition(embeds, pooled)
        negative = negative_prompts if negative_prompts is not None else ""
        negative = [negative] * b if isinstance(negative, str) else list(negative)
        if len(negative) != b:
            raise ValueError(f"{len(negative)} negative prompts for {b} prompts (give 1 or {b})")
        embeds, pooled = self._sd3(prompts + negative)
        return TextCondition(embeds[:b], pooled[:b], embeds[b:], pooled[b:])


def load_prompt_encoder(
    kind: Literal["sd3", "flux"],
    tokenizer_folders: Sequence[Path | None],
    encoder_folders: Sequence[Path | None],
    dtype: Any,
    max_sequence_length: int,
    t5_width: int,
) -> PromptEncoder:
    """Load a pipeline's tokenizers and text encoders (CLIP, [CLIP,] T5) in ``dtype``.

    ``None`` folders (SD3 without T5) stay ``None``; ``t5_width`` is SD3's transformer
    ``joint_attention_dim``.
    """
    families = ("clip", "clip", "t5") if kind == "sd3" else ("clip", "t5")
    tokenizers, encoders = [], []
    for family, tok, enc in zip(families, tokenizer_folders, encoder_folders, strict=True):
        if enc is None:
            tokenizers.append(None)
            encoders.append(None)
            continue
        tokenizers.append(load_tokenizer(tok, family))
        model = (
            load_clip_text(enc, dtype, loader=_LOADER)
            if family == "clip"
            else load_t5_encoder(enc, dtype, loader=_LOADER)
        )
        encoders.append(nnx.split(model))
    if max_sequence_length < 1:
        raise ValueError(f"max_sequence_length must be positive, got {max_sequence_length}")
    return PromptEncoder(
        kind=kind,
        tokenizers=tuple(tokenizers),
        encoders=tuple(encoders),
        clip_length=int(tokenizers[0].model_max_length),
        max_sequence_length=int(max_sequence_length),
        t5_width=int(t5_width),
    )
