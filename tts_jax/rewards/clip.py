"""CLIP-family rewards: CLIPScore, PickScore and the LAION aesthetic predictor, in-graph JAX.

Each reward maps decoded images ``x [N, 3, H, W]`` in ``[-1, 1]`` to ``float32[N]`` (higher is
better) inside the jitted sampler, differentiably (for gradient guidance): the images go through
:func:`preprocess` (CLIP's image processor as JAX ops) and the CLIP image tower
(:mod:`tts_jax.models.clip`). The prompt side is computed once, when the reward is built; only
the unit text embedding is kept in ``Reward.params``, so the particles are batched through the
image tower alone. The same NaN policy as :mod:`tts_jax.rewards.classifier`: pixels are clipped
to ``[-1, 1]``; a particle with a non-finite pixel gets ``-inf``.

- :func:`clip_score`: CLIPScore (Hessel et al. 2021, "CLIPScore: A Reference-free Evaluation
  Metric for Image Captioning"): ``w * max(cos(image, text), 0)`` with ``w = 2.5``. We keep the
  published form (not the ``exp(logit_scale)`` scaling of CLIP's logits) so values are
  comparable with the literature (a typical aligned pair scores 0.6-0.9); note the clamp at 0
  has zero gradient for anti-aligned pairs (``w=2.5, clamp=False`` gives ``w * cos``).
- :func:`pickscore`: PickScore (Kirstain et al. 2023, "Pick-a-Pic"): ``exp(logit_scale) *
  cos(image, text)`` with the PickScore CLIP checkpoint, as its reference code computes it.
- :func:`laion_aesthetic`: the LAION improved aesthetic predictor (Schuhmann 2022): an MLP
  (:class:`AestheticHead`, ``Linear(768, 1024), Dropout, Linear(1024, 128), Dropout,
  Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1)``, tensors ``layers.{0,2,4,6,7}``) on
  the unit CLIP ViT-L/14 image embedding.

**Preprocessing** (:func:`preprocess`, :class:`CLIPPreprocess`, read from the folder's
``preprocessor_config.json`` by :func:`load_preprocess`): ``[-1, 1] -> [0, 1]``, resize so the
shortest side is ``size`` with antialiased bicubic interpolation (``jax.image.resize``; Keys
cubic ``a = -0.5`` with the kernel widened by the downscale factor, as PIL does), clip to
``[0, 1]`` (PIL clips to uint8), center crop (offsets ``(H - h) // 2``, ``(W - w) // 2``) and
``(x - image_mean) / image_std``. transformers' processor resamples **uint8** images with PIL's
fixed-point arithmetic and rounds the result to uint8; the float pipeline here differs from it by
at most about one uint8 step after normalization (``1 / 255 / min(std) ~ 0.015``), see
tests/rewards/test_reward_clip.py.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.models.checkpoint import (
    Layout,
    load_params,
    read_config,
    read_tensors,
)
from tts_jax.models.clip import (
    CLIPModel,
    CLIPVisionModelWithProjection,
    clip_text_apply,
    clip_vision_apply,
    load_clip,
    split_clip,
)
from tts_jax.models.lm.modules import Linear
from tts_jax.rewards.base import Reward
from tts_jax.rewards.classifier import prepare_images

Array = jax.Array

PREPROCESSOR_NAME = "preprocessor_config.json"
CLIPSCORE_W = 2.5
_BICUBIC = 3  # PIL's resample code


# --------------------------------------------------------------------------- preprocessing


@dataclasses.dataclass(frozen=True)
class CLIPPreprocess:
    """CLIP's image processor as static settings (hashable: part of a reward's static apply).

    Attributes:
        shortest_edge: resize so the shorter side has this many pixels (keeping the aspect
            ratio, the longer side ``int(shortest_edge * long / short)``); ``None`` with
            ``size`` set resizes to ``size``; both ``None``: no resize.
        crop: ``(height, width)`` of the center crop, or ``None``.
        image_mean, image_std: per-channel normalization of ``[0, 1]`` pixels.
        size: ``(height, width)`` of a fixed-size resize (processors with ``size: {height,
            width}``), or ``None``.
    """

    shortest_edge: int | None = 224
    crop: tuple[int, int] | None = (224, 224)
    image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)
    image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
    size: tuple[int, int] | None = None

    def resized_shape(self, height: int, width: int) -> tuple[int, int]:
        """``(h, w)`` after the resize step (transformers' rule)."""
        if self.size is not None:
            return self.size
        if self.shortest_edge is None:
            return height, width
        s = self.shortest_edge
        if width <= height:
            return int(s * height / width), s
        return s, int(s * width / height)


PREPROCESSOR_TYPES: dict[str, Any] = {
    "do_resize": bool,
    "size": int | dict,
    "resample": int,
    "do_center_crop": bool,
    "crop_size": int | dict,
    "do_rescale": bool,
    "rescale_factor": float,
    "do_normalize": bool,
    "image_mean": list[float] | float,
    "image_std": list[float] | float,
}


def _hw(value: Any, key: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if set(value) >= {"height", "width"}:
        return int(value["height"]), int(value["width"])
    raise ValueError(f'"{key}" must be an int or {{"height", "width"}}, got {value}')


def preprocess_from_dict(d: dict[str, Any]) -> CLIPPreprocess:
    """:class:`CLIPPreprocess` from a ``preprocessor_config.json`` dict (transformers'
    ``CLIPImageProcessor`` defaults for missing keys).

    Raises:
        ValueError: a resample other than bicubic, ``do_rescale`` off or a rescale factor other
            than 1/255 (the inputs here are ``[-1, 1]`` images), or a malformed size.
    """
    if d.get("resample", _BICUBIC) != _BICUBIC:
        raise ValueError(f"only bicubic resampling (resample=3) is supported, got {d['resample']}")
    factor = d.get("rescale_factor", 1 / 255)
    if not d.get("do_rescale", True) or abs(factor - 1 / 255) > 1e-9:
        raise ValueError(
            f"only do_rescale with rescale_factor 1/255 is supported, got "
            f"do_rescale={d.get('do_rescale')}, rescale_factor={factor}"
        )
    shortest, size = None, None
    if d.get("do_resize", True):
        raw = d.get("size", {"shortest_edge": 224})
        if isinstance(raw, int):
            shortest = raw
        elif "shortest_edge" in raw and raw.get("longest_edge") is None:
            shortest = int(raw["shortest_edge"])
        else:
            size = _hw(raw, "size")
    crop = _hw(d.get("crop_size", 224), "crop_size") if d.get("do_center_crop", True) else None
    defaults = CLIPPreprocess()
    mean, std = defaults.image_mean, defaults.image_std
    if d.get("do_normalize", True):
        mean = tuple(np.broadcast_to(d.get("image_mean", mean), (3,)).tolist())
        std = tuple(np.broadcast_to(d.get("image_std", std), (3,)).tolist())
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return CLIPPreprocess(shortest, crop, mean, std, size)


def load_preprocess(folder: str | Path, *, loader: str = "load_preprocess") -> CLIPPreprocess:
    """The :class:`CLIPPreprocess` of a folder's ``preprocessor_config.json``.

    Raises:
        FileNotFoundError: the folder or the file is missing.
        ValueError: (:class:`~tts_jax.models.checkpoint.CheckpointConfigError`) invalid JSON, a
            wrongly typed key or an unsupported setting (see :func:`preprocess_from_dict`).
    """
    return read_config(
        folder, loader, preprocess_from_dict, schema=PREPROCESSOR_TYPES, name=PREPROCESSOR_NAME
    )


def preprocess(images: Array, config: CLIPPreprocess) -> Array:
    """Decoded images ``[N, 3, H, W]`` in ``[-1, 1]`` -> CLIP ``pixel_values [N, 3, h, w]``
    (float32, differentiable; see the module docstring).

    Raises:
        ValueError: the crop is larger than the resized image.
    """
    n, c, height, width = images.shape
    x = (images.astype(jnp.float32) + 1.0) * 0.5
    rh, rw = config.resized_shape(height, width)
    if (rh, rw) != (height, width):
        x = jax.image.resize(x, (n, c, rh, rw), method="bicubic", antialias=True)
    x = jnp.clip(x, 0.0, 1.0)
    if config.crop is not None:
        ch, cw = config.crop
        if ch > rh or cw > rw:
            raise ValueError(
                f"center crop {config.crop} is larger than the resized image {(rh, rw)}"
            )
        top, left = (rh - ch) // 2, (rw - cw) // 2
        x = x[:, :, top : top + ch, left : left + cw]
    mean = jnp.asarray(config.image_mean, jnp.float32)[None, :, None, None]
    std = jnp.asarray(config.image_std, jnp.float32)[None, :, None, None]
    return (x - jnp.broadcast_to(mean, x.shape)) / jnp.broadcast_to(std, x.shape)


# --------------------------------------------------------------------------- text side


def tokenize(tokenizer: Any, prompt: str, max_length: int) -> np.ndarray:
    """``int32[1, max_length]`` ids of ``prompt`` (padded to ``max_length``, truncated), with a
    transformers tokenizer or a folder holding one (``AutoTokenizer``)."""
    if isinstance(tokenizer, str | Path):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    out = tokenizer(
        [prompt], padding="max_length", max_length=max_length, truncation=True, return_tensors="np"
    )
    return np.asarray(out["input_ids"], np.int32)


def _prompt_ids(prompt: str | Any, tokenizer: Any, max_length: int) -> np.ndarray:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise ValueError("a text prompt needs a tokenizer (or pass token ids)")
        return tokenize(tokenizer, prompt, max_length)
    ids = np.asarray(prompt, np.int32)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[0] != 1:
        raise ValueError(f"prompt ids must be int[T] or int[1, T], got shape {ids.shape}")
    return ids


_text_embeds = jax.jit(lambda text, ids: clip_text_apply(text, ids).text_embeds)


def _unit(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


def _as_clip(clip: CLIPModel | str | Path, dtype: Any) -> tuple[CLIPModel, Path | None]:
    if isinstance(clip, CLIPModel):
        return clip, None
    return load_clip(clip, dtype), Path(clip)


def _image_embeds(vision: CLIPVisionModelWithProjection, x: Array, config: CLIPPreprocess):
    """``(unit image embeddings float32[N, P], finite bool[N])`` of ``[-1, 1]`` images."""
    x_safe, finite = prepare_images(x)
    pixels = preprocess(x_safe, config).astype(vision.visual_projection.weight.dtype)
    return _unit(clip_vision_apply(vision, pixels).image_embeds), finite


@dataclasses.dataclass(frozen=True)
class _CosineApply:
    """``scale * cos(image, text)``, clamped at 0 where ``params["clamp"]``; static and hashable
    (CLIPScore and PickScore rewards of one preprocessing share a compiled sampler)."""

    config: CLIPPreprocess

    def __call__(self, params: dict, x: Array, cond: Any) -> Array:
        del cond
        image, finite = _image_embeds(params["vision"], x, self.config)
        text = jnp.broadcast_to(params["text"][None], image.shape)
        cos = jnp.sum(image * text, axis=-1)
        cos = jnp.where(params["clamp"], jnp.maximum(cos, 0.0), cos)
        return jnp.where(finite, params["scale"] * cos, -jnp.inf)


def _cosine_reward(
    clip: CLIPModel | str | Path,
    prompt: str | Any,
    scale: Callable[[CLIPModel], Any],
    clamp: bool,
    name: str,
    preprocess_config: CLIPPreprocess | None,
    tokenizer: Any,
    dtype: Any,
) -> Reward:
    model, folder = _as_clip(clip, dtype)
    if preprocess_config is None:
        if folder is None:
            raise ValueError("pass preprocess_config with a loaded CLIPModel (or pass its folder)")
        preprocess_config = load_preprocess(folder)
    if tokenizer is None and folder is not None and isinstance(prompt, str):
        tokenizer = folder
    ids = _prompt_ids(prompt, tokenizer, model.config.text.max_position_embeddings)
    text, vision = split_clip(model)
    text_embed = _unit(_text_embeds(text, jnp.asarray(ids)))[0]
    params = {
        "vision": vision,
        "text": text_embed,
        "scale": jnp.asarray(scale(model), jnp.float32),
        "clamp": jnp.asarray(clamp),
    }
    return Reward(params, _CosineApply(preprocess_config), name)


def clip_score(
    clip: CLIPModel | str | Path,
    prompt: str | Sequence[int] | Array,
    *,
    w: float = CLIPSCORE_W,
    clamp: bool = True,
    preprocess_config: CLIPPreprocess | None = None,
    tokenizer: Any = None,
    dtype: Any = jnp.float32,
    name: str = "clip_score",
) -> Reward:
    """CLIPScore ``w * max(cos(E_image, E_text), 0)`` of the images against ``prompt``.

    Args:
        clip: a ``CLIPModel`` folder (its ``preprocessor_config.json`` and tokenizer are used)
            or a loaded :class:`~tts_jax.models.clip.CLIPModel` (then pass
            ``preprocess_config``, and ``tokenizer`` for a text prompt).
        prompt: text, or its token ids ``int[T]`` (padded as the pipeline pads, e.g. to 77).
        w: the CLIPScore weight (2.5 in Hessel et al. 2021).
        clamp: clamp the cosine at 0 (the published definition); ``False`` gives ``w * cos``,
            whose gradient does not vanish for anti-aligned images.
        preprocess_config: overrides the folder's image preprocessing.
        tokenizer: a transformers tokenizer or a folder holding one (default: the CLIP folder).
        dtype: CLIP parameter dtype.
        name: label in results.

    Returns:
        A :class:`~tts_jax.rewards.base.Reward` ``x [N, 3, H, W] in [-1, 1] -> float32[N]``
        (``cond`` ignored).
    """
    return _cosine_reward(
        clip, prompt, lambda _: w, clamp, name, preprocess_config, tokenizer, dtype
    )


def pickscore(
    folder: CLIPModel | str | Path,
    prompt: str | Sequence[int] | Array,
    *,
    preprocess_config: CLIPPreprocess | None = None,
    tokenizer: Any = None,
    dtype: Any = jnp.float32,
    name: str = "pickscore",
) -> Reward:
    """PickScore ``exp(logit_scale) * cos(E_image, E_text)`` (Kirstain et al. 2023) with the
    PickScore CLIP checkpoint in ``folder`` (e.g. ``yuvalkirstain/PickScore_v1``; its processor
    and tokenizer are those of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, pass them if the folder
    lacks them). Arguments as :func:`clip_score`."""

    def scale(model: CLIPModel) -> Array:
        return jnp.exp(model.logit_scale[...].astype(jnp.float32))

    return _cosine_reward(folder, prompt, scale, False, name, preprocess_config, tokenizer, dtype)


# --------------------------------------------------------------------------- aesthetic head

_HEAD_LINEARS = (0, 2, 4, 6, 7)  # layer indices of the Linear layers (others are Dropout)
HEAD_LAYOUT = Layout(rename=lambda n: "layers." + n.removeprefix("l"))
"""Head parameter ``l0.weight`` is tensor ``layers.0.weight`` (PyTorch ``nn.Sequential``)."""


class AestheticHead(nnx.Module):
    """The LAION improved aesthetic predictor MLP (inference: dropout is the identity, and there
    is no activation between layers, as in the reference ``MLP``): ``l0 -> l2 -> l4 -> l6 ->
    l7``, widths from ``widths`` (``(768, 1024, 128, 64, 16, 1)`` for ViT-L/14)."""

    def __init__(self, widths: Sequence[int], *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        if len(widths) != len(_HEAD_LINEARS) + 1:
            raise ValueError(
                f"the head has {len(_HEAD_LINEARS)} Linear layers, got widths {widths}"
            )
        for i, (a, b) in zip(_HEAD_LINEARS, zip(widths[:-1], widths[1:], strict=True), strict=True):
            setattr(self, f"l{i}", Linear(a, b, bias=True, rngs=rngs, dtype=dtype))

    def __call__(self, x: Array) -> Array:
        for i in _HEAD_LINEARS:
            x = getattr(self, f"l{i}")(x)
        return x


def load_aesthetic_head(
    file: str | Path, dtype: Any = jnp.float32, *, loader: str = "load_aesthetic_head"
) -> AestheticHead:
    """The aesthetic MLP from a safetensors file (tensors ``layers.{0,2,4,6,7}.{weight,bias}``;
    widths read from the shapes).

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: (:class:`~tts_jax.models.checkpoint.CheckpointError`) unreadable, missing,
            inconsistent or unexpected tensors.
    """
    file = Path(file)
    tensors = read_tensors(file.parent, loader, file.name)
    first = tensors.get("layers.0.weight")
    widths = [int(first.shape[1]) if first is not None and first.ndim == 2 else 768]
    for i in _HEAD_LINEARS:
        w = tensors.get(f"layers.{i}.weight")
        widths.append(int(w.shape[0]) if w is not None and w.ndim == 2 else 1)
    abstract = nnx.eval_shape(lambda: AestheticHead(widths, rngs=nnx.Rngs(0), dtype=dtype))
    return load_params(abstract, tensors, HEAD_LAYOUT)


@dataclasses.dataclass(frozen=True)
class _AestheticApply:
    config: CLIPPreprocess

    def __call__(self, params: dict, x: Array, cond: Any) -> Array:
        del cond
        image, finite = _image_embeds(params["vision"], x, self.config)
        head: AestheticHead = params["head"]
        score = head(image.astype(head.l0.weight.dtype))[:, 0].astype(jnp.float32)
        return jnp.where(finite, score, -jnp.inf)


def laion_aesthetic(
    clip_folder: CLIPModel | str | Path,
    head_file: str | Path | AestheticHead,
    *,
    preprocess_config: CLIPPreprocess | None = None,
    dtype: Any = jnp.float32,
    name: str = "laion_aesthetic",
) -> Reward:
    """The LAION aesthetic score (about 1-10) of the images: :class:`AestheticHead` on the unit
    CLIP image embedding (the predictor was trained on ``openai/clip-vit-large-patch14``).

    Args:
        clip_folder: the CLIP folder (or a loaded :class:`~tts_jax.models.clip.CLIPModel` with
            ``preprocess_config``); only its image tower is kept.
        head_file: the head's safetensors file (or a loaded :class:`AestheticHead`).
        preprocess_config, dtype, name: as :func:`clip_score`.
    """
    model, folder = _as_clip(clip_folder, dtype)
    if preprocess_config is None:
        if folder is None:
            raise ValueError("pass preprocess_config with a loaded CLIPModel (or pass its folder)")
        preprocess_config = load_preprocess(folder)
    head = head_file if isinstance(head_file, AestheticHead) else load_aesthetic_head(head_file)
    _, vision = split_clip(model)
    return Reward({"vision": vision, "head": head}, _AestheticApply(preprocess_config), name)
