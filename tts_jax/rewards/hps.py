"""HPSv2, the Human Preference Score v2 (Wu et al. 2023, "Human Preference Score v2: A Solid
Benchmark for Evaluating Human Preferences of Text-to-Image Synthesis"), in-graph JAX.

HPSv2 is an open_clip ViT-H-14 (``laion2B-s32B-b79K``) fine-tuned on human preference pairs.
Its checkpoint is an open_clip state dict; :func:`load_open_clip` maps it onto the NNX
:class:`~tts_jax.models.clip.CLIPModel` (transformers' names), so the reward shares the CLIP
towers of :mod:`tts_jax.rewards.clip`. The score, as the reference ``hpsv2`` package computes it
(``score.py`` / ``img_score.py``: ``diag(image_features @ text_features.T)`` of the unit
embeddings, no ``logit_scale``), is the cosine ``cos(E_image, E_text)`` (about 0.2-0.35 for
real generations; papers quote it as is, e.g. 0.27, or times 100). :func:`hps_v2` takes
``scale`` (default 1, the reference value; 100 gives the percent form).

**Checkpoint layout** (a safetensors file; the released ``HPS_v2_compressed.pt`` /
``HPS_v2.1_compressed.pt`` are pickles and are refused: convert once with
``safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, "hps_v2.safetensors")``
where ``sd = torch.load(pt, map_location="cpu")`` and ``sd = sd.get("state_dict", sd)``). open_clip
names (``L`` blocks per tower):

- ``visual.conv1.weight [W, 3, p, p]`` (no bias), ``visual.class_embedding [W]``,
  ``visual.positional_embedding [1 + (S/p)^2, W]``, ``visual.ln_pre.{weight,bias}``,
  ``visual.transformer.resblocks.{i}.{ln_1, attn.in_proj_weight [3W, W] / in_proj_bias [3W]
  (fused q, k, v), attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``visual.ln_post``,
  ``visual.proj [W, E]`` (applied as ``x @ proj``);
- ``token_embedding.weight [V, D]``, ``positional_embedding [T, D]``, ``transformer.resblocks.
  {i}...`` (as the visual blocks), ``ln_final``, ``text_projection [D, E]``;
- ``logit_scale`` (a scalar; unused by the score).

The attention heads are not in the tensors: they come from the open_clip model config
(:data:`VIT_H_14`, open_clip's ``model_configs/ViT-H-14.json``: vision heads ``width //
head_width = 1280 // 80``, text heads 16). Activations are exact GELU (open_clip's ViT-H-14 has
no ``quick_gelu``); the text embedding is the end-of-text token, found by argmax of the token ids
(open_clip's ``text_global_pool(..., "argmax")``).

**Preprocessing** (:class:`HPSPreprocess`): HPSv2's ``preprocess_val`` is open_clip's
``ResizeMaxSize(224)`` (resize the longest side to 224, bicubic with antialiasing, then pad to a
square with black, centered) and the OpenAI CLIP mean / std. Here the same as JAX ops on
``[-1, 1]`` images, differentiable (for square images it is a plain resize; the float pipeline
differs from the PIL one on uint8 images by about one uint8 step, see
:mod:`tts_jax.rewards.clip`).

**Prompt**: tokenized once when the reward is built, with a transformers tokenizer (open_clip's
ViT-H-14 tokenizer is OpenAI's CLIP BPE: ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``'s tokenizer
files give the same ids; pad ids do not matter, the text tower is causal and pools at the
end-of-text token) or as token ids padded to 77.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from tts_jax.models.checkpoint import (
    IDENTITY,
    CheckpointError,
    TensorFile,
    TensorMismatchError,
    load_params,
    read_tensors,
)
from tts_jax.models.clip import (
    LEGACY_EOS_TOKEN_ID,
    CLIPConfig,
    CLIPModel,
    CLIPTextConfig,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    clip_text_apply,
    clip_vision_apply,
    split_clip,
)
from tts_jax.rewards.base import Reward
from tts_jax.rewards.classifier import prepare_images
from tts_jax.rewards.clip import _prompt_ids

Array = jax.Array

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

VIT_H_14: dict[str, Any] = {
    "embed_dim": 1024,
    "vision_cfg": {
        "image_size": 224,
        "layers": 32,
        "width": 1280,
        "head_width": 80,
        "patch_size": 14,
    },
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 1024,
        "heads": 16,
        "layers": 24,
    },
}
"""open_clip's ``ViT-H-14`` model config (HPSv2's backbone)."""


class OpenCLIPLayoutError(TensorMismatchError):
    """An open_clip checkpoint's tensor names or shapes do not match the model config (names the
    missing, mis-shaped and unexpected open_clip keys)."""

    def __init__(self, where, missing, misshaped, unexpected):
        super().__init__(where, missing, misshaped, unexpected)
        message = str(self).replace("config.json", "the open_clip model config", 1)
        self.args = (message,)


# --------------------------------------------------------------------------- config


def clip_config_from_open_clip(
    model_config: Mapping[str, Any], act: str = "gelu", layer_norm_eps: float = 1e-5
) -> CLIPConfig:
    """The :class:`~tts_jax.models.clip.CLIPConfig` of an open_clip model config dict
    (``{"embed_dim", "vision_cfg": {...}, "text_cfg": {...}}``, open_clip's field names and
    defaults: vision ``head_width`` 64, ``mlp_ratio`` 4; text ``heads`` 8, ``mlp_ratio`` 4).

    Raises:
        ValueError: a feature we do not implement (layer scale, attentional pooling, a timm or
            Hugging Face tower, a non-argmax text pool, ``no_ln_pre``, ...).
    """
    v, t = dict(model_config.get("vision_cfg", {})), dict(model_config.get("text_cfg", {}))
    unsupported = {
        "vision_cfg.timm_model_name": v.get("timm_model_name"),
        "vision_cfg.ls_init_value": v.get("ls_init_value"),
        "vision_cfg.attentional_pool": v.get("attentional_pool"),
        "vision_cfg.no_ln_pre": v.get("no_ln_pre"),
        "vision_cfg.final_ln_after_pool": v.get("final_ln_after_pool"),
        "text_cfg.hf_model_name": t.get("hf_model_name"),
        "text_cfg.ls_init_value": t.get("ls_init_value"),
        "text_cfg.embed_cls": t.get("embed_cls"),
        "text_cfg.no_causal_mask": t.get("no_causal_mask"),
        "text_cfg.final_ln_after_pool": t.get("final_ln_after_pool"),
    }
    bad = {k: val for k, val in unsupported.items() if val}
    if v.get("pool_type", "tok") != "tok":
        bad["vision_cfg.pool_type"] = v["pool_type"]
    if t.get("pool_type", "argmax") != "argmax":
        bad["text_cfg.pool_type"] = t["pool_type"]
    if not isinstance(v.get("layers", 12), int):
        bad["vision_cfg.layers"] = v["layers"]
    if bad:
        raise ValueError(f"unsupported open_clip model config settings: {bad}")
    embed = int(model_config.get("embed_dim", 512))
    vw = int(v.get("width", 768))
    size = v.get("image_size", 224)
    if not isinstance(size, int):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"only square images are supported, got image_size {size}")
        size = size[0]
    vision = CLIPVisionConfig(
        hidden_size=vw,
        intermediate_size=int(vw * v.get("mlp_ratio", 4.0)),
        num_hidden_layers=int(v.get("layers", 12)),
        num_attention_heads=vw // int(v.get("head_width", 64)),
        image_size=int(size),
        patch_size=int(v.get("patch_size", 16)),
        hidden_act=act,
        layer_norm_eps=layer_norm_eps,
        projection_dim=embed,
    )
    tw = int(t.get("width", 512))
    text = CLIPTextConfig(
        vocab_size=int(t.get("vocab_size", 49408)),
        hidden_size=tw,
        intermediate_size=int(tw * t.get("mlp_ratio", 4.0)),
        num_hidden_layers=int(t.get("layers", 12)),
        num_attention_heads=int(t.get("heads", 8)),
        max_position_embeddings=int(t.get("context_length", 77)),
        hidden_act=act,
        layer_norm_eps=layer_norm_eps,
        eos_token_id=LEGACY_EOS_TOKEN_ID,  # argmax pooling
        projection_dim=embed,
    )
    return CLIPConfig(text=text, vision=vision, projection_dim=embed)


# --------------------------------------------------------------------------- names


def _block_names(prefix: str, width: int, inner: int) -> dict[str, tuple[int, ...]]:
    """open_clip names and shapes of one residual attention block."""
    return {
        f"{prefix}.ln_1.weight": (width,),
        f"{prefix}.ln_1.bias": (width,),
        f"{prefix}.attn.in_proj_weight": (3 * width, width),
        f"{prefix}.attn.in_proj_bias": (3 * width,),
        f"{prefix}.attn.out_proj.weight": (width, width),
        f"{prefix}.attn.out_proj.bias": (width,),
        f"{prefix}.ln_2.weight": (width,),
        f"{prefix}.ln_2.bias": (width,),
        f"{prefix}.mlp.c_fc.weight": (inner, width),
        f"{prefix}.mlp.c_fc.bias": (inner,),
        f"{prefix}.mlp.c_proj.weight": (width, inner),
        f"{prefix}.mlp.c_proj.bias": (width,),
    }


def open_clip_names(config: CLIPConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name (and shape) of an open_clip CLIP state dict for ``config``."""
    v, t, e = config.vision, config.text, config.projection_dim
    vw, tw, p = v.hidden_size, t.hidden_size, v.patch_size
    names: dict[str, tuple[int, ...]] = {
        "visual.conv1.weight": (vw, v.num_channels, p, p),
        "visual.class_embedding": (vw,),
        "visual.positional_embedding": (v.num_positions, vw),
        "visual.ln_pre.weight": (vw,),
        "visual.ln_pre.bias": (vw,),
        "visual.ln_post.weight": (vw,),
        "visual.ln_post.bias": (vw,),
        "visual.proj": (vw, e),
        "token_embedding.weight": (t.vocab_size, tw),
        "positional_embedding": (t.max_position_embeddings, tw),
        "ln_final.weight": (tw,),
        "ln_final.bias": (tw,),
        "text_projection": (tw, e),
        "logit_scale": (),
    }
    for i in range(v.num_hidden_layers):
        names |= _block_names(f"visual.transformer.resblocks.{i}", vw, v.intermediate_size)
    for i in range(t.num_hidden_layers):
        names |= _block_names(f"transformer.resblocks.{i}", tw, t.intermediate_size)
    return names


def _convert_block(src: str, dst: str, tensors: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """open_clip block ``src`` -> transformers ``CLIPEncoderLayer`` names under ``dst``."""
    out = {}
    w = np.asarray(tensors[f"{src}.attn.in_proj_weight"])
    b = np.asarray(tensors[f"{src}.attn.in_proj_bias"])
    for name, wi, bi in zip(("q", "k", "v"), np.split(w, 3), np.split(b, 3), strict=True):
        out[f"{dst}.self_attn.{name}_proj.weight"] = wi
        out[f"{dst}.self_attn.{name}_proj.bias"] = bi
    pairs = {
        "attn.out_proj": "self_attn.out_proj",
        "ln_1": "layer_norm1",
        "ln_2": "layer_norm2",
        "mlp.c_fc": "mlp.fc1",
        "mlp.c_proj": "mlp.fc2",
    }
    for a, c in pairs.items():
        for leaf in ("weight", "bias"):
            out[f"{dst}.{c}.{leaf}"] = tensors[f"{src}.{a}.{leaf}"]
    return out


def open_clip_to_transformers(
    tensors: Mapping[str, np.ndarray], config: CLIPConfig
) -> dict[str, np.ndarray]:
    """An open_clip state dict (already checked against :func:`open_clip_names`) under
    transformers' ``CLIPModel`` names: fused q/k/v split, ``proj`` / ``text_projection``
    transposed to ``Linear`` ``[out, in]``."""
    out: dict[str, Any] = {
        "vision_model.embeddings.patch_embedding.weight": tensors["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": tensors["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": tensors["visual.positional_embedding"],
        "vision_model.pre_layrnorm.weight": tensors["visual.ln_pre.weight"],
        "vision_model.pre_layrnorm.bias": tensors["visual.ln_pre.bias"],
        "vision_model.post_layernorm.weight": tensors["visual.ln_post.weight"],
        "vision_model.post_layernorm.bias": tensors["visual.ln_post.bias"],
        "visual_projection.weight": np.asarray(tensors["visual.proj"]).T,
        "text_model.embeddings.token_embedding.weight": tensors["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": tensors["positional_embedding"],
        "text_model.final_layer_norm.weight": tensors["ln_final.weight"],
        "text_model.final_layer_norm.bias": tensors["ln_final.bias"],
        "text_projection.weight": np.asarray(tensors["text_projection"]).T,
        "logit_scale": tensors["logit_scale"],
    }
    for i in range(config.vision.num_hidden_layers):
        src, dst = f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}"
        out |= _convert_block(src, dst, tensors)
    for i in range(config.text.num_hidden_layers):
        src, dst = f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}"
        out |= _convert_block(src, dst, tensors)
    return out


def check_open_clip_layout(
    tensors: Mapping[str, Any], config: CLIPConfig, where: str = "the tensors"
) -> None:
    """Checks that ``tensors`` is exactly the open_clip state dict of ``config``.

    Raises:
        OpenCLIPLayoutError: naming every missing, mis-shaped and unexpected open_clip key (the
            non-parameter buffer ``attn_mask``, if saved, is allowed).
    """
    want = open_clip_names(config)
    missing = [(n, s) for n, s in want.items() if n not in tensors]
    misshaped = [
        (n, f"has shape {tuple(np.shape(tensors[n]))}", str(s))
        for n, s in want.items()
        if n in tensors and tuple(np.shape(tensors[n])) != s
    ]
    unexpected = sorted(k for k in tensors if k not in want and not k.endswith("attn_mask"))
    if missing or misshaped or unexpected:
        raise OpenCLIPLayoutError(where, missing, misshaped, unexpected)


def load_open_clip(
    file: str | Path,
    model_config: Mapping[str, Any] = VIT_H_14,
    dtype: Any = jnp.float32,
    *,
    act: str = "gelu",
    loader: str = "load_open_clip",
) -> CLIPModel:
    """An open_clip CLIP state dict in a safetensors file as the NNX
    :class:`~tts_jax.models.clip.CLIPModel` (see the module docstring for the layout).

    Args:
        file: the ``.safetensors`` file (e.g. HPSv2 converted from its ``.pt``).
        model_config: the open_clip model config (default :data:`VIT_H_14`).
        dtype: parameter dtype.
        act: MLP activation (``"gelu"``; ``"quick_gelu"`` for open_clip's ``-quickgelu``
            models and OpenAI's checkpoints).
        loader: first word of error messages.

    Raises:
        FileNotFoundError: (:class:`~tts_jax.models.checkpoint.CheckpointNotFoundError`) no such
            file.
        ValueError: (:class:`~tts_jax.models.checkpoint.CheckpointError`) not a safetensors
            file, a pickle (``.pt`` / ``.bin``), or (:class:`OpenCLIPLayoutError`) keys that are
            not the open_clip layout of ``model_config``; an unsupported model config.
    """
    file = Path(file)
    if file.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        raise CheckpointError(
            f"{loader}: {file} is a pickle checkpoint, refused; convert it to safetensors (see "
            "tts_jax.rewards.hps)"
        )
    config = clip_config_from_open_clip(model_config, act=act)
    tensors = read_tensors(file.parent, loader, file.name)
    where = tensors.where
    if np.shape(tensors.get("logit_scale")) == (1,):  # open_clip's nonscalar_logit_scale
        tensors["logit_scale"] = np.asarray(tensors["logit_scale"]).reshape(())
    check_open_clip_layout(tensors, config, where)
    converted = TensorFile(open_clip_to_transformers(tensors, config), str(file), loader)
    abstract = nnx.eval_shape(lambda: CLIPModel(config, rngs=nnx.Rngs(0), dtype=dtype))
    return load_params(abstract, converted, IDENTITY)


# --------------------------------------------------------------------------- preprocessing


@dataclasses.dataclass(frozen=True)
class HPSPreprocess:
    """HPSv2's ``preprocess_val`` as static settings: resize the longest side to ``size``
    (bicubic, antialiased), pad to ``size x size`` with black (centered: left / top get half
    the padding rounded down), normalize by ``mean`` / ``std``."""

    size: int = 224
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD


def preprocess(images: Array, config: HPSPreprocess = HPSPreprocess()) -> Array:
    """``[N, 3, H, W]`` in ``[-1, 1]`` -> ``float32[N, 3, size, size]`` normalized pixels
    (differentiable)."""
    n, c, h, w = images.shape
    s = config.size
    x = (images.astype(jnp.float32) + 1.0) * 0.5
    scale = s / max(h, w)
    rh, rw = (s, round(w * scale)) if h >= w else (round(h * scale), s)
    if (rh, rw) != (h, w):
        x = jax.image.resize(x, (n, c, rh, rw), method="bicubic", antialias=True)
    x = jnp.clip(x, 0.0, 1.0)
    ph, pw = s - rh, s - rw
    if ph or pw:
        x = jnp.pad(x, ((0, 0), (0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)))
    mean = jnp.asarray(config.mean, jnp.float32)[None, :, None, None]
    std = jnp.asarray(config.std, jnp.float32)[None, :, None, None]
    return (x - mean) / std


# --------------------------------------------------------------------------- reward


def _unit(x: Array) -> Array:
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True))


_text_embeds = jax.jit(lambda text, ids: clip_text_apply(text, ids).text_embeds)


@dataclasses.dataclass(frozen=True)
class _HPSApply:
    """``scale * cos(image, text)`` with HPSv2's preprocessing (static, hashable)."""

    config: HPSPreprocess

    def __call__(self, params: dict, x: Array, cond: Any) -> Array:
        del cond
        vision: CLIPVisionModelWithProjection = params["vision"]
        x_safe, finite = prepare_images(x)
        pixels = preprocess(x_safe, self.config).astype(vision.visual_projection.weight.dtype)
        image = _unit(clip_vision_apply(vision, pixels).image_embeds)
        cos = jnp.sum(image * jnp.broadcast_to(params["text"][None], image.shape), axis=-1)
        return jnp.where(finite, params["scale"] * cos, -jnp.inf)


def hps_v2(
    path: str | Path | CLIPModel,
    prompt: str | Sequence[int] | Array,
    *,
    tokenizer: Any = None,
    model_config: Mapping[str, Any] = VIT_H_14,
    scale: float = 1.0,
    preprocess_config: HPSPreprocess | None = None,
    dtype: Any = jnp.float32,
    name: str = "hps_v2",
) -> Reward:
    """HPSv2 ``scale * cos(E_image, E_text)`` of the images against ``prompt`` (Wu et al. 2023).

    Args:
        path: the HPSv2 (v2.0 or v2.1) state dict as a safetensors file, or a loaded
            :class:`~tts_jax.models.clip.CLIPModel` (e.g. from :func:`load_open_clip`).
        prompt: text (needs ``tokenizer``), or its token ids ``int[T]`` (``T`` = 77, padded).
        tokenizer: a transformers CLIP tokenizer or a folder holding one (e.g.
            ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
        model_config: the open_clip model config (default :data:`VIT_H_14`).
        scale: 1 gives the reference ``hpsv2`` score; 100 the percent form.
        preprocess_config: default :class:`HPSPreprocess` with the vision tower's image size.
        dtype: CLIP parameter dtype.
        name: label in results.

    Returns:
        A :class:`~tts_jax.rewards.base.Reward` ``x [N, 3, H, W] in [-1, 1] -> float32[N]``,
        differentiable; non-finite particles get ``-inf``. Only the unit text embedding and the
        image tower are kept in its params.
    """
    model = path if isinstance(path, CLIPModel) else load_open_clip(path, model_config, dtype)
    if preprocess_config is None:
        preprocess_config = HPSPreprocess(size=model.config.vision.image_size)
    ids = _prompt_ids(prompt, tokenizer, model.config.text.max_position_embeddings)
    text, vision = split_clip(model)
    text_embed = _unit(_text_embeds(text, jnp.asarray(ids)))[0]
    params = {"vision": vision, "text": text_embed, "scale": jnp.asarray(scale, jnp.float32)}
    return Reward(params, _HPSApply(preprocess_config), name)
