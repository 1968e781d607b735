"""Tiny random SD3 / SD3.5 / FLUX pipeline folders for tests, built offline with diffusers and
transformers (PyTorch, CPU), and diffusers' own outputs on them as references.

:func:`make_tiny_sd3` and :func:`make_tiny_flux` write a folder laid out like the hub's
``stabilityai/stable-diffusion-3*-diffusers`` and ``black-forest-labs/FLUX.1-*`` repositories
(``model_index.json``; ``transformer/``, ``vae/``, ``text_encoder*/`` with
``config.json`` + safetensors; ``tokenizer*/``; ``scheduler/scheduler_config.json``), with every
network a 1-2 layer random model whose weights are perturbed with ``seed`` (diffusers zero-inits
several output layers; the perturbation makes every parameter matter in a parity test).

Sizes (the module constants): VAE ``block_out_channels`` (8, 8, 16), so ``vae_scale_factor`` is 4
(not the real 8: code that hard-codes 8 fails); 16 latent channels; images :data:`IMAGE_SIZE` =
32 px, latents 8 x 8; SD3 patch 2 (16 image tokens), FLUX 2 x 2 packing (16 tokens).

Tokenizers are written by hand (no hub access): the CLIP ones as ``vocab.json`` + ``merges.txt``
+ ``tokenizer_config.json`` + ``special_tokens_map.json`` (byte-level BPE with ``</w>`` word ends,
``<|startoftext|>`` / ``<|endoftext|>`` the last two ids, no ``tokenizer.json``: the layout of the
real SD3 / FLUX ``tokenizer`` folders), ``model_max_length`` :data:`CLIP_MAX_LENGTH` = 16 (not
77); SD3's ``tokenizer_2`` pads with ``"!"`` (id 0) like the real one, the others with
``<|endoftext|>``. The T5 one is a ``tokenizers`` Unigram ``tokenizer.json`` (``<pad>`` 0, ``</s>``
1, ``<unk>`` 2, a ``</s>`` appended to every sequence). The CLIP text configs keep the legacy
``eos_token_id = 2`` of the real ones (transformers then pools at the argmax id, i.e. the first
``<|endoftext|>``).

References: :func:`reference_images` runs the diffusers pipeline from given initial latents and
:func:`reference_prompt_embeds` returns ``pipe.encode_prompt``'s outputs, both as numpy. On a
shared 2-core machine call ``torch.set_num_threads(1)`` in the test module first (see
tests/models/test_t2i_folders.py): the tiny models gain nothing from threads and a multi-threaded
torch under load made one reference run take seconds instead of ~0.1 s.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import Unigram

IMAGE_SIZE = 32
"""Height and width (px) of the tiny pipelines' images."""
LATENT_CHANNELS = 16
VAE_SCALE_FACTOR = 4
LATENT_SIZE = IMAGE_SIZE // VAE_SCALE_FACTOR
CLIP_MAX_LENGTH = 16
"""``model_max_length`` of the tiny CLIP tokenizers (the pipelines pad CLIP prompts to it)."""
T5_MAX_LENGTH = 32
"""``model_max_length`` of the tiny T5 tokenizer (the pipelines pad T5 prompts to the call's
``max_sequence_length``, default :data:`MAX_SEQUENCE_LENGTH` in the helpers here)."""
MAX_SEQUENCE_LENGTH = 24
"""T5 prompt length the reference helpers pass to the pipelines (their defaults, 256 / 512, are
far too long for tests)."""

SD3_VAE = {"shift_factor": 0.0609, "scaling_factor": 1.5305}
FLUX_VAE = {"shift_factor": 0.1159, "scaling_factor": 0.3611}

# Words the tiny tokenizers know whole (others fall back to characters / bytes).
WORDS = (
    "a photo of cat dog red blue green an astronaut riding horse on the moon painting "
    "small large tree house car in with"
).split()

# Text encoder sizes: CLIP-L-like, CLIP-G-like (SD3's second CLIP), T5-XXL-like. SD3 pads the
# concatenated CLIP features (16 + 24) to the T5 width (48); FLUX's pooled input is CLIP's width.
CLIP_L = {"hidden_size": 16, "heads": 2, "hidden_act": "quick_gelu"}
CLIP_G = {"hidden_size": 24, "heads": 2, "hidden_act": "gelu"}
T5_D_MODEL = 48


# --------------------------------------------------------------------------- tokenizers


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def clip_vocab_and_merges(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary like CLIP's: the 256 byte characters, the same with ``</w>``,
    one merge chain per word (left to right), then ``<|startoftext|>``, ``<|endoftext|>``."""
    chars = list(_bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge, merged = f"{pieces[0]} {pieces[1]}", pieces[0] + pieces[1]
            if merge not in merges:
                merges.append(merge)
                tokens.append(merged)
            pieces = [merged, *pieces[2:]]
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _write_json(file: Path, content: Any) -> None:
    file.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> int:
    """Writes a CLIP tokenizer folder (vocab.json, merges.txt, configs); returns the vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = clip_vocab_and_merges()
    _write_json(folder / "vocab.json", vocab)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", "utf-8")
    special = {
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": pad_token,
    }
    _write_json(folder / "special_tokens_map.json", special)
    config = {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": CLIP_MAX_LENGTH,
        "do_lower_case": True,
        "clean_up_tokenization_spaces": True,
        "errors": "replace",
    }
    _write_json(folder / "tokenizer_config.json", config)
    return len(vocab)


def t5_vocab(words: tuple[str, ...] = WORDS) -> list[tuple[str, float]]:
    """Unigram pieces like T5's: ``<pad>``, ``</s>``, ``<unk>``, then ``"▁"``, whole words with a
    leading ``"▁"`` and single characters (so any lowercase text tokenizes without ``<unk>``)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0 - 0.01 * i) for i, w in enumerate(words)]
    pieces += [(c, -8.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"]
    pieces += [("▁" + c, -7.0) for c in "abcdefghijklmnopqrstuvwxyz"]
    first: dict[str, float] = {}
    for piece, score in pieces:
        first.setdefault(piece, score)  # "▁a" is a word and a letter: keep the word's entry
    return list(first.items())


def write_t5_tokenizer(folder: Path) -> int:
    """Writes a T5 tokenizer folder (tokenizer.json with a Unigram model, configs); returns the
    vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    pieces = t5_vocab()
    tok = Tokenizer(Unigram(pieces, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.WhitespaceSplit(),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        ]
    )
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)]
    )
    tok.add_special_tokens(["<pad>", "</s>", "<unk>"])
    tok.save(str(folder / "tokenizer.json"))
    special = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    _write_json(folder / "special_tokens_map.json", special)
    config = {
        **special,
        "tokenizer_class": "T5Tokenizer",
        "model_max_length": T5_MAX_LENGTH,
        "extra_ids": 0,
        "additional_special_tokens": [],
        "clean_up_tokenization_spaces": True,
    }
    _write_json(folder / "tokenizer_config.json", config)
    return len(pieces)


# --------------------------------------------------------------------------- models


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.1) -> torch.nn.Module:
    """Adds ``scale * N(0, 1)`` (seeded) to every parameter; returns the module in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module.eval()


def _clip(kind: str, vocab_size: int, spec: dict[str, Any], seed: int) -> torch.nn.Module:
    import transformers

    config = transformers.CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=spec["hidden_size"],
        intermediate_size=2 * spec["hidden_size"] + 5,
        num_hidden_layers=2,
        num_attention_heads=spec["heads"],
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=spec["hidden_act"],
        projection_dim=spec["hidden_size"],
        # The real SD3 / FLUX CLIP configs carry these legacy ids (pooling takes the argmax id).
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    cls = getattr(transformers, kind)
    return _perturb(cls(config), seed)


def _t5(vocab_size: int, seed: int) -> torch.nn.Module:
    import transformers

    config = transformers.T5Config(
        vocab_size=vocab_size + 5,  # like the real 32128 > 32100: rows no token reaches
        d_model=T5_D_MODEL,
        d_kv=8,
        d_ff=40,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    torch.manual_seed(seed)
    return _perturb(transformers.T5EncoderModel(config), seed)


def tiny_vae_config(shift_factor: float, scaling_factor: float) -> dict[str, Any]:
    """A 16-channel SD3 / FLUX style ``AutoencoderKL`` config (no quant convs), tiny."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [8, 8, 16],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": LATENT_CHANNELS,
        "norm_num_groups": 4,
        "sample_size": IMAGE_SIZE,
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "latents_mean": None,
        "latents_std": None,
        "force_upcast": True,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


def _vae(factors: dict[str, float], seed: int) -> torch.nn.Module:
    import diffusers

    torch.manual_seed(seed)
    return _perturb(diffusers.AutoencoderKL(**tiny_vae_config(**factors)), seed)


def _load_tokenizers(folder: Path, names: dict[str, str]) -> dict[str, Any]:
    import transformers

    return {
        name: getattr(transformers, cls).from_pretrained(folder / name)
        for name, cls in names.items()
    }


def _replace_tokenizer_folders(folder: Path, written: Path, names: tuple[str, ...]) -> None:
    """Puts the hand-written tokenizer folders in place of what ``save_pretrained`` wrote (the
    real repositories' file layout, e.g. no ``tokenizer.json`` for CLIP) and names the T5
    tokenizer class ``T5TokenizerFast`` in ``model_index.json`` as the real folders do."""
    for name in names:
        for old in (folder / name).iterdir():
            old.unlink()
        for new in (written / name).iterdir():
            (folder / name / new.name).write_bytes(new.read_bytes())
    index = json.loads((folder / "model_index.json").read_text("utf-8"))
    for name in names:
        if index[name] == ["transformers", "T5Tokenizer"]:
            index[name] = ["transformers", "T5TokenizerFast"]
    _write_json(folder / "model_index.json", index)


def make_tiny_sd3(
    folder: str | Path,
    variant: str = "sd3",
    seed: int = 0,
    dual_attention_layers: tuple[int, ...] | None = None,
) -> Path:
    """Writes a tiny random ``StableDiffusion3Pipeline`` folder.

    Args:
        folder: created (must not hold a pipeline already).
        variant: ``"sd3"`` (SD3 Medium: no QK norm, no dual attention) or ``"sd35"`` (SD3.5:
            ``qk_norm="rms_norm"`` and, by default, dual attention in layer 0 as in SD3.5 Medium;
            SD3.5 Large has QK norm only: pass ``dual_attention_layers=()``).
        seed: seeds the initialisation and the weight perturbation.
        dual_attention_layers: overrides the variant's default.

    Returns:
        The folder. Transformer: 2 layers, 2 heads of 8, ``caption_projection_dim`` 16,
        ``joint_attention_dim`` 48 (T5 width), ``pooled_projection_dim`` 40 (16 + 24, the two CLIP
        projections), ``sample_size`` 8, patch 2, ``pos_embed_max_size`` 8. Scheduler: ``shift``
        3.0. VAE: :data:`SD3_VAE` factors.
    """
    import diffusers

    if variant not in ("sd3", "sd35"):
        raise ValueError(f"variant must be 'sd3' or 'sd35', got {variant!r}")
    if dual_attention_layers is None:
        dual_attention_layers = (0,) if variant == "sd35" else ()
    folder = Path(folder)
    scratch = folder / "_tokenizers"
    v_l = write_clip_tokenizer(scratch / "tokenizer")
    v_g = write_clip_tokenizer(scratch / "tokenizer_2", pad_token="!")
    v_t5 = write_t5_tokenizer(scratch / "tokenizer_3")
    classes = {"tokenizer": "CLIPTokenizer", "tokenizer_2": "CLIPTokenizer"}
    tokenizers = _load_tokenizers(scratch, {**classes, "tokenizer_3": "T5Tokenizer"})
    torch.manual_seed(seed)
    transformer = diffusers.SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_D_MODEL,
        caption_projection_dim=16,
        pooled_projection_dim=CLIP_L["hidden_size"] + CLIP_G["hidden_size"],
        out_channels=LATENT_CHANNELS,
        pos_embed_max_size=LATENT_SIZE,
        dual_attention_layers=tuple(dual_attention_layers),
        qk_norm="rms_norm" if variant == "sd35" else None,
    )
    pipe = diffusers.StableDiffusion3Pipeline(
        transformer=_perturb(transformer, seed + 1),
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(SD3_VAE, seed + 2),
        text_encoder=_clip("CLIPTextModelWithProjection", v_l, CLIP_L, seed + 3),
        text_encoder_2=_clip("CLIPTextModelWithProjection", v_g, CLIP_G, seed + 4),
        text_encoder_3=_t5(v_t5, seed + 5),
        **tokenizers,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    _replace_tokenizer_folders(folder, scratch, tuple(tokenizers))
    _rmtree(scratch)
    return folder


def make_tiny_flux(folder: str | Path, guidance_embeds: bool = True, seed: int = 0) -> Path:
    """Writes a tiny random ``FluxPipeline`` folder.

    Args:
        folder: created (must not hold a pipeline already).
        guidance_embeds: ``True`` like FLUX.1-dev (a guidance embedding), ``False`` like
            FLUX.1-schnell.
        seed: seeds the initialisation and the weight perturbation.

    Returns:
        The folder. Transformer: 1 double + 1 single block, 2 heads of 8, RoPE axes (2, 2, 4),
        ``in_channels`` 64 (16 latent channels x 2 x 2 packing), ``joint_attention_dim`` 48,
        ``pooled_projection_dim`` 16 (CLIP width). Scheduler: dynamic shifting (base 0.5, max
        1.15, sequence lengths 256 .. 4096, ``shift`` 3.0 as in FLUX.1-dev's config). VAE:
        :data:`FLUX_VAE` factors.
    """
    import diffusers

    folder = Path(folder)
    scratch = folder / "_tokenizers"
    v_l = write_clip_tokenizer(scratch / "tokenizer")
    v_t5 = write_t5_tokenizer(scratch / "tokenizer_2")
    tokenizers = _load_tokenizers(
        scratch, {"tokenizer": "CLIPTokenizer", "tokenizer_2": "T5Tokenizer"}
    )
    torch.manual_seed(seed)
    transformer = diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=T5_D_MODEL,
        pooled_projection_dim=CLIP_L["hidden_size"],
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4),
    )
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipe = diffusers.FluxPipeline(
        transformer=_perturb(transformer, seed + 1),
        scheduler=scheduler,
        vae=_vae(FLUX_VAE, seed + 2),
        text_encoder=_clip("CLIPTextModel", v_l, CLIP_L, seed + 3),
        text_encoder_2=_t5(v_t5, seed + 5),
        **tokenizers,
    )
    pipe.save_pretrained(folder, safe_serialization=True)
    _replace_tokenizer_folders(folder, scratch, tuple(tokenizers))
    _rmtree(scratch)
    return folder


def _rmtree(folder: Path) -> None:
    for p in sorted(folder.rglob("*"), key=lambda p: -len(p.parts)):
        p.rmdir() if p.is_dir() else p.unlink()
    folder.rmdir()


# --------------------------------------------------------------------------- references


def load_reference(folder: str | Path):
    """diffusers' own pipeline for a folder (float32, CPU, progress bars off)."""
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def is_flux(pipe) -> bool:
    return type(pipe).__name__ == "FluxPipeline"


def pack_flux_latents(latents: np.ndarray) -> np.ndarray:
    """``[B, C, h, w]`` -> FLUX's packed ``[B, (h/2)(w/2), 4 C]`` (2 x 2 patches, channel-major
    inside a patch), as ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    x = latents.reshape(b, c, h // 2, 2, w // 2, 2).transpose(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_flux_latents(packed: np.ndarray, height: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_flux_latents`: ``[B, (h/2)(w/2), 4 C]`` -> ``[B, C, h, w]``."""
    b, _, c4 = packed.shape
    x = packed.reshape(b, height // 2, width // 2, c4 // 4, 2, 2).transpose(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c4 // 4, height, width)


def reference_images(
    pipe,
    prompt: str | list[str],
    latents: np.ndarray,
    num_steps: int = 2,
    guidance_scale: float = 3.5,
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    output_type: str = "np",
    **kwargs: Any,
) -> np.ndarray:
    """diffusers' pipeline run from given initial latents.

    Args:
        pipe: :func:`load_reference`'s pipeline.
        prompt: one prompt per image, or one for all ``B``.
        latents: initial noise ``[B, 16, h, w]`` (unpacked, also for FLUX: packed here); the image
            is ``h * vae_scale_factor`` high.
        num_steps: Euler steps.
        guidance_scale: SD3: classifier-free guidance weight (> 1 runs the unconditional branch
            with the empty negative prompt); FLUX: the guidance embedding's value (ignored
            without ``guidance_embeds``).
        max_sequence_length: T5 prompt length.
        output_type: ``"np"`` (``[B, H, W, 3]`` in [0, 1]), ``"pt"`` or ``"latent"`` (the final
            latents: FLUX's packed).
        kwargs: passed to the pipeline (e.g. ``negative_prompt``).

    Returns:
        The images (or latents) as a numpy array.
    """
    b, _, h, w = latents.shape
    scale = pipe.vae_scale_factor
    prompt = [prompt] * b if isinstance(prompt, str) else list(prompt)
    x = pack_flux_latents(latents) if is_flux(pipe) else latents
    out = pipe(
        prompt=prompt,
        num_inference_steps=num_steps,
        height=h * scale,
        width=w * scale,
        latents=torch.from_numpy(np.ascontiguousarray(x, np.float32)),
        guidance_scale=guidance_scale,
        max_sequence_length=max_sequence_length,
        output_type=output_type,
        **kwargs,
    ).images
    return out.numpy() if isinstance(out, torch.Tensor) else np.asarray(out)


def reference_prompt_embeds(
    pipe,
    prompt: str | list[str],
    negative_prompt: str | list[str] = "",
    max_sequence_length: int = MAX_SEQUENCE_LENGTH,
) -> dict[str, np.ndarray]:
    """``pipe.encode_prompt`` as numpy.

    Returns:
        SD3: ``prompt_embeds`` ``[B, CLIP_MAX_LENGTH + max_sequence_length, 48]`` (the two CLIP
        penultimate hidden states side by side, zero-padded to the T5 width, then T5's),
        ``pooled_prompt_embeds`` ``[B, 40]`` (the two CLIP projections) and the same two for
        ``negative_prompt`` (``negative_*``). FLUX: ``prompt_embeds`` ``[B, max_sequence_length,
        48]`` (T5), ``pooled_prompt_embeds`` ``[B, 16]`` (CLIP's pooled output), ``text_ids``
        ``[max_sequence_length, 3]`` (zeros).
    """
    with torch.no_grad():
        if is_flux(pipe):
            embeds, pooled, ids = pipe.encode_prompt(
                prompt=prompt, prompt_2=None, max_sequence_length=max_sequence_length
            )
            out = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled, "text_ids": ids}
        else:
            embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
                prompt=prompt,
                prompt_2=None,
                prompt_3=None,
                negative_prompt=negative_prompt,
                do_classifier_free_guidance=True,
                max_sequence_length=max_sequence_length,
            )
            out = {
                "prompt_embeds": embeds,
                "pooled_prompt_embeds": pooled,
                "negative_prompt_embeds": neg,
                "negative_pooled_prompt_embeds": neg_pooled,
            }
    return {k: v.numpy() for k, v in out.items()}
