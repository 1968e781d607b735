"""ImageReward (Xu et al. 2023, "ImageReward: Learning and Evaluating Human Preferences for
Text-to-Image Generation"), in-graph JAX.

The model (the ``ImageReward`` package's ``ImageReward.score``): BLIP's ViT-L/16 encodes the
image into tokens (:func:`~tts_jax.models.blip.blip_vision_apply`), the BLIP text encoder (BERT
with cross-attention to those tokens, :func:`~tts_jax.models.blip.blip_text_apply`) reads the
prompt, and an MLP head (:class:`~tts_jax.rewards.clip.AestheticHead`'s shape: ``Linear(768,
1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16),
Linear(16, 1)``, no activations, tensors ``mlp.layers.{0,2,4,6,7}``) maps the ``[CLS]`` state
to a score, normalized as ``(score - 0.16717362830052426) / 1.0333394966054072`` (the package's
``mean`` / ``std``). The text side depends on the image (cross-attention), so the whole text
encoder runs per particle; the prompt's token ids are kept in ``Reward.params``.

**Folder layout** (``model.safetensors``, optional ``config.json``, and a BERT tokenizer for
text prompts): either

- transformers names: ``vision_model.*`` (``BlipVisionModel``), ``text_encoder.*``
  (``BlipTextModel`` without pooler), ``mlp.layers.*``; or
- the original ImageReward names (``ImageReward.pt`` converted to safetensors, e.g.
  ``save_file({k: v.contiguous() for k, v in torch.load(pt, map_location="cpu").items()},
  ...)``): ``blip.visual_encoder.*`` (timm ViT names, renamed by
  :func:`~tts_jax.models.blip.timm_vit_to_transformers`), ``blip.text_encoder.*``,
  ``mlp.layers.*``; ``blip.vision_proj.*`` / ``blip.text_proj.*`` (contrastive heads the score
  does not use) and the ``embeddings.position_ids`` buffer are skipped.

``config.json``: ``{"vision_config": {...}, "text_config": {...}}`` in transformers' BLIP field
names; without it, ImageReward-v1.0's architecture (:class:`~tts_jax.models.blip.BlipVisionConfig`
and :class:`~tts_jax.models.blip.BlipTextConfig` defaults). Any other tensor, or a missing or
mis-shaped one, raises :class:`~tts_jax.models.checkpoint.TensorMismatchError` naming them.

**Preprocessing**: the package's ``Resize(224, BICUBIC), CenterCrop(224)`` and the OpenAI CLIP
mean / std, i.e. :func:`tts_jax.rewards.clip.preprocess` with
``CLIPPreprocess(shortest_edge=224, crop=(224, 224))`` (differentiable; within about one uint8
step of the PIL pipeline, see :mod:`tts_jax.rewards.clip`). **Prompt**: BLIP's tokenizer
(``bert-base-uncased`` plus ``[DEC]`` / ``[ENC]``), ``padding="max_length", max_length=35``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.models.blip import (
    BlipTextConfig,
    BlipTextModel,
    BlipVisionConfig,
    BlipVisionModel,
    blip_text_apply,
    blip_vision_apply,
    timm_vit_to_transformers,
)
from tts_jax.models.checkpoint import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    CheckpointConfigError,
    Layout,
    TensorFile,
    load_params,
    read_config_file,
    read_tensors,
)
from tts_jax.rewards.base import Reward
from tts_jax.rewards.classifier import prepare_images
from tts_jax.rewards.clip import AestheticHead, CLIPPreprocess, preprocess

Array = jax.Array

MEAN = 0.16717362830052426
STD = 1.0333394966054072
MAX_LENGTH = 35
_HEAD_LINEARS = (0, 2, 4, 6, 7)
_ORIGINAL_SKIPPED = ("blip.vision_proj.", "blip.text_proj.")
# Non-parameter buffer older BERT code saved (BLIP's med.py, transformers < 4.31); recomputed.
_BUFFER_SUFFIXES = ("embeddings.position_ids",)


class ImageRewardModel(nnx.Module):
    """``vision_model`` (:class:`~tts_jax.models.blip.BlipVisionModel`), ``text_encoder``
    (:class:`~tts_jax.models.blip.BlipTextModel`) and the ``mlp`` head."""

    def __init__(
        self,
        vision: BlipVisionConfig,
        text: BlipTextConfig,
        head_widths: Sequence[int] = (1024, 128, 64, 16, 1),
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
    ):
        self.vision_model = BlipVisionModel(vision, rngs=rngs, dtype=dtype)
        self.text_encoder = BlipTextModel(text, rngs=rngs, dtype=dtype)
        self.mlp = AestheticHead((text.hidden_size, *head_widths), rngs=rngs, dtype=dtype)


def _rename(name: str) -> str:
    """NNX path -> file name: the head's ``mlp.l{i}`` is ``mlp.layers.{i}``."""
    return name.replace("mlp.l", "mlp.layers.", 1) if name.startswith("mlp.l") else name


LAYOUT = Layout(rename=_rename)
"""transformers names, the head as ``mlp.layers.{0,2,4,6,7}``."""


def from_original(tensors: TensorFile) -> TensorFile:
    """The original ImageReward names (``blip.visual_encoder.*`` timm ViT, ``blip.text_encoder.*``)
    as :data:`LAYOUT` names; ``blip.vision_proj.*`` / ``blip.text_proj.*`` dropped, anything else
    kept as is (so it is reported as unexpected)."""
    out: dict[str, Any] = {}
    vision = {}
    for name, value in tensors.items():
        if name.startswith("blip.visual_encoder."):
            vision[name.removeprefix("blip.visual_encoder.")] = value
        elif name.startswith("blip.text_encoder."):
            out["text_encoder." + name.removeprefix("blip.text_encoder.")] = value
        elif not name.startswith(_ORIGINAL_SKIPPED):
            out[name] = value
    out |= {"vision_model." + k: v for k, v in timm_vit_to_transformers(vision).items()}
    return TensorFile(out, tensors.source, tensors.loader)


def _head_widths(tensors: TensorFile) -> tuple[int, ...]:
    widths = []
    for i in _HEAD_LINEARS:
        w = tensors.get(f"mlp.layers.{i}.weight")
        widths.append(int(w.shape[0]) if w is not None and np.ndim(w) == 2 else 1)
    return tuple(widths)


def _configs(path: Path, loader: str) -> tuple[BlipVisionConfig, BlipTextConfig]:
    if not (path / CONFIG_NAME).is_file():
        return BlipVisionConfig(), BlipTextConfig()
    config_file = read_config_file(path, loader)
    raw = config_file.check({"vision_config": dict, "text_config": dict})
    with config_file.errors():
        vision = BlipVisionConfig.from_hf_dict(raw.get("vision_config") or {})
        text_raw = {"encoder_hidden_size": vision.hidden_size, **(raw.get("text_config") or {})}
        text = BlipTextConfig.from_hf_dict(text_raw)
    if text.encoder_hidden_size != vision.hidden_size:
        raise CheckpointConfigError(
            f"{config_file.where}: text_config.encoder_hidden_size={text.encoder_hidden_size} "
            f"differs from vision_config.hidden_size={vision.hidden_size}"
        )
    return vision, text


def load_image_reward(
    path: str | Path, dtype: Any = jnp.float32, *, loader: str = "load_image_reward"
) -> ImageRewardModel:
    """The ImageReward model of a folder (see the module docstring for the layouts).

    Raises:
        FileNotFoundError: (:class:`~tts_jax.models.checkpoint.CheckpointNotFoundError`) no
            folder or no ``model.safetensors``.
        ValueError: (:class:`~tts_jax.models.checkpoint.CheckpointError` subclasses) a bad
            ``config.json``, or missing / mis-shaped / unexpected tensors (named).
    """
    path = Path(path)
    tensors = read_tensors(path, loader, WEIGHTS_NAME)
    vision, text = _configs(path, loader)
    if "blip.visual_encoder.cls_token" in tensors:
        tensors = from_original(tensors)
    widths = _head_widths(tensors)
    abstract = nnx.eval_shape(
        lambda: ImageRewardModel(vision, text, widths, rngs=nnx.Rngs(0), dtype=dtype)
    )
    return load_params(abstract, tensors, LAYOUT, ignore_suffixes=_BUFFER_SUFFIXES)


def image_reward_apply(
    model: ImageRewardModel, pixel_values: Array, input_ids: Array, attention_mask: Array
) -> Array:
    """``float32[B]`` normalized ImageReward scores of normalized ``pixel_values [B, 3, S, S]``
    against one prompt ``input_ids, attention_mask [1, T]`` (or ``[B, T]``)."""
    image = blip_vision_apply(model.vision_model, pixel_values)
    b = image.shape[0]
    ids = jnp.broadcast_to(input_ids, (b, input_ids.shape[-1]))
    mask = jnp.broadcast_to(attention_mask, ids.shape)
    states = blip_text_apply(model.text_encoder, ids, mask, image)
    head: AestheticHead = model.mlp
    raw = head(states[:, 0].astype(head.l0.weight.dtype))[:, 0].astype(jnp.float32)
    return (raw - MEAN) / STD


@dataclasses.dataclass(frozen=True)
class _ImageRewardApply:
    config: CLIPPreprocess

    def __call__(self, params: dict, x: Array, cond: Any) -> Array:
        del cond
        model: ImageRewardModel = params["model"]
        x_safe, finite = prepare_images(x)
        dtype = model.vision_model.post_layernorm.weight.dtype
        pixels = preprocess(x_safe, self.config).astype(dtype)
        score = image_reward_apply(model, pixels, params["input_ids"], params["attention_mask"])
        return jnp.where(finite, score, -jnp.inf)


def _tokenize(prompt: Any, tokenizer: Any, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (or pass token ids)")
        if isinstance(tokenizer, str | Path):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        out = tokenizer(
            [prompt], padding="max_length", truncation=True, max_length=MAX_LENGTH,
            return_tensors="np",
        )  # fmt: skip
        return np.asarray(out["input_ids"], np.int32), np.asarray(out["attention_mask"], np.int32)
    ids = np.asarray(prompt, np.int32)
    ids = ids[None] if ids.ndim == 1 else ids
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"prompt ids must be int[T] or int[1, T], got shape {ids.shape}")
    return ids, (ids != pad_id).astype(np.int32)


def image_reward(
    folder: str | Path | ImageRewardModel,
    prompt: str | Sequence[int] | Array,
    *,
    tokenizer: Any = None,
    preprocess_config: CLIPPreprocess | None = None,
    dtype: Any = jnp.float32,
    name: str = "image_reward",
) -> Reward:
    """The normalized ImageReward score of the images against ``prompt`` (Xu et al. 2023).

    Args:
        folder: an ImageReward folder (see the module docstring) or a loaded
            :class:`ImageRewardModel`.
        prompt: text, or BLIP token ids ``int[T]`` (``[CLS] ... [SEP]`` padded with 0 to 35;
            the attention mask is ``ids != pad_token_id``).
        tokenizer: a transformers BERT tokenizer or a folder holding one (default: ``folder``
            for a text prompt).
        preprocess_config: default resize-shortest-side + center crop to the image size, OpenAI
            mean / std.
        dtype: parameter dtype.
        name: label in results.

    Returns:
        A :class:`~tts_jax.rewards.base.Reward` ``x [N, 3, H, W] in [-1, 1] -> float32[N]``,
        differentiable; non-finite particles get ``-inf``.
    """
    if isinstance(folder, ImageRewardModel):
        model = folder
    else:
        model = load_image_reward(folder, dtype)
        if tokenizer is None and isinstance(prompt, str):
            tokenizer = folder
    size = model.vision_model.config.image_size
    if preprocess_config is None:
        preprocess_config = CLIPPreprocess(shortest_edge=size, crop=(size, size))
    ids, mask = _tokenize(prompt, tokenizer, model.text_encoder.config.pad_token_id)
    params = {"model": model, "input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask)}
    return Reward(params, _ImageRewardApply(preprocess_config), name)
