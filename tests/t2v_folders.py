"""A tiny random Wan 2.1 text-to-video pipeline folder for tests, built offline with diffusers and
transformers (PyTorch, CPU), and the PyTorch modules it was saved from as references.

:func:`tiny_wan` writes, once per test session, a folder laid out like the hub's
``Wan-AI/Wan2.1-T2V-*-Diffusers`` repositories (``model_index.json``; ``transformer/``,
``vae/``, ``text_encoder/`` with ``config.json`` + safetensors; ``tokenizer/``;
``scheduler/scheduler_config.json``) with every network a 1-2 layer random model whose weights
are perturbed with a seed (diffusers zero-inits several layers; the perturbation makes every
parameter matter in a parity test).

Sizes: transformer width 16 (2 heads of 8: rotary bands of 4, 2, 2 channels), ``ffn_dim`` 40,
``freq_dim`` 16, ``text_dim`` 32 (the UMT5 width), 4 latent channels, patch (1, 2, 2); UMT5
d_model 32, 4 heads of 8, 2 layers, 8 position buckets (each layer its own table);
``AutoencoderKLWan`` ``base_dim`` 8, ``z_dim`` 4, three down-samplings, the temporal ones in
the last two (scale factors 8 spatial, 4 temporal, as the real one), so a 5-frame 32 x 32 px
video has latents ``[4, 2, 4, 4]``. Scheduler: ``FlowMatchEulerDiscreteScheduler(shift=3.0)``.
The tokenizer is the hand-written T5 Unigram tokenizer of tests/t2i_folders.py.

diffusers' ``from_pretrained`` of these components wants ``accelerate`` (not installed), so the
references are the PyTorch modules the folder was saved from (:class:`TinyWan`), and the
diffusers pipeline is constructed from them directly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

from tests import t2i_folders as T2I

LATENT_CHANNELS = 4
TEXT_DIM = 32
MAX_SEQUENCE_LENGTH = 16
"""UMT5 prompt length passed to the pipelines in tests (WanPipeline's default 512 is far too
long)."""
FRAMES, HEIGHT, WIDTH = 5, 32, 32
"""A video size the tiny pipeline takes: latents ``[4, 2, 4, 4]``."""
LATENTS_MEAN = [0.1, -0.2, 0.3, -0.05]
LATENTS_STD = [1.5, 0.8, 2.0, 1.1]


class TinyWan(NamedTuple):
    """The folder and the PyTorch modules saved in it (float32, eval mode)."""

    folder: Path
    transformer: Any
    text_encoder: Any
    vae: Any
    tokenizer: Any
    scheduler: Any

    def pipeline(self):
        """diffusers' ``WanPipeline`` on these modules (progress bar off)."""
        import diffusers

        pipe = diffusers.WanPipeline(
            tokenizer=self.tokenizer,
            text_encoder=self.text_encoder,
            vae=self.vae,
            scheduler=self.scheduler,
            transformer=self.transformer,
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe


def tiny_transformer_config() -> dict[str, Any]:
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "text_dim": TEXT_DIM,
        "freq_dim": 16,
        "ffn_dim": 40,
        "num_layers": 2,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": 1e-6,
        "rope_max_seq_len": 64,
    }


def _umt5(vocab_size: int, seed: int):
    import transformers

    config = transformers.UMT5Config(
        vocab_size=vocab_size + 5,  # rows no token reaches, like the real 256384 > vocabulary
        d_model=TEXT_DIM,
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
    return T2I._perturb(transformers.UMT5EncoderModel(config), seed)


def _vae(seed: int):
    import diffusers

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLWan(
        base_dim=8,
        z_dim=LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
    )
    return T2I._perturb(vae, seed, scale=0.05)


_CACHE: dict[str, TinyWan] = {}


def make_tiny_wan(folder: str | Path, seed: int = 0) -> TinyWan:
    """Writes a tiny random ``WanPipeline`` folder; returns it with its PyTorch modules."""
    import diffusers
    import transformers

    folder = Path(folder)
    scratch = folder / "_tokenizer"
    vocab = T2I.write_t5_tokenizer(scratch / "tokenizer")
    tokenizer = transformers.T5TokenizerFast.from_pretrained(scratch / "tokenizer")
    torch.manual_seed(seed)
    transformer = T2I._perturb(
        diffusers.WanTransformer3DModel(**tiny_transformer_config()), seed + 1
    )
    parts = TinyWan(
        folder=folder,
        transformer=transformer,
        text_encoder=_umt5(vocab, seed + 2),
        vae=_vae(seed + 3),
        tokenizer=tokenizer,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    parts.pipeline().save_pretrained(folder, safe_serialization=True)
    T2I._replace_tokenizer_folders(folder, scratch, ("tokenizer",))
    T2I._rmtree(scratch)
    return parts


def tiny_wan(tmp_path_factory) -> TinyWan:
    """:func:`make_tiny_wan` once per test session (under pytest's ``tmp_path_factory``)."""
    if "wan" not in _CACHE:
        _CACHE["wan"] = make_tiny_wan(tmp_path_factory.mktemp("t2v") / "wan")
    return _CACHE["wan"]


def model_index(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "model_index.json").read_text("utf-8"))


def torch_velocity(
    transformer, latents: np.ndarray, timestep: np.ndarray, states: np.ndarray
) -> np.ndarray:
    """``transformer(latents, timestep, states)`` as numpy (float32, no grad)."""
    with torch.no_grad():
        out = transformer(
            hidden_states=torch.from_numpy(np.ascontiguousarray(latents, np.float32)),
            timestep=torch.from_numpy(np.asarray(timestep, np.float32)),
            encoder_hidden_states=torch.from_numpy(np.ascontiguousarray(states, np.float32)),
            return_dict=False,
        )[0]
    return out.numpy()
