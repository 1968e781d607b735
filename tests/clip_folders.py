"""Tiny random CLIP reward folders for tests, built offline with transformers (PyTorch, CPU).

:func:`make_tiny_clip` writes what :func:`tts_jax.rewards.clip.clip_score`,
:func:`~tts_jax.rewards.clip.pickscore` and :func:`~tts_jax.rewards.clip.laion_aesthetic` read:
a ``CLIPModel`` folder (``config.json`` + ``model.safetensors``, 32 x 32 images in 8 x 8 patches,
projection 24), its ``preprocessor_config.json``, a CLIP BPE tokenizer of single letters
(``<|startoftext|>`` 96, ``<|endoftext|>`` 97, also the pad token; 16 positions) and, with
``head``, a LAION aesthetic head ``head.safetensors`` (``layers.{0,2,4,6,7}``, input width 24).
The sizes are those of tests/rewards/test_reward_clip.py. Nothing is downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

SIZE = 32
PROJECTION = 24
TEXT = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=16,
    eos_token_id=97,
    bos_token_id=0,
    pad_token_id=1,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=SIZE,
    patch_size=8,
)
HEAD_NAME = "head.safetensors"


def write_letter_tokenizer(folder: Path) -> None:
    """A tiny CLIP BPE tokenizer: single letters, no merges; ``<|startoftext|>`` = 96 and
    ``<|endoftext|>`` = 97 (also the pad token), matching :data:`TEXT`'s ``eos_token_id``."""
    import transformers

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = [*letters, *(c + "</w>" for c in letters)]
    tokens += [f"unused{i}" for i in range(96 - len(tokens))]
    vocab = {t: i for i, t in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer.save_pretrained(folder)


def make_tiny_clip(folder: str | Path, head: bool = True, seed: int = 0) -> Path:
    """Write a tiny random CLIP folder (module docstring) and return it.

    Args:
        folder: created if missing.
        head: also write an aesthetic head :data:`HEAD_NAME`.
        seed: seeds the initialisation and a weight perturbation (transformers' init leaves
            some parameters at constants).
    """
    import torch
    import transformers
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = transformers.CLIPConfig(
        text_config=TEXT, vision_config=VISION, projection_dim=PROJECTION
    )
    model = transformers.CLIPModel(config).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(folder, safe_serialization=True)
    transformers.CLIPImageProcessor(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
    ).save_pretrained(folder)
    write_letter_tokenizer(folder)
    if head:
        widths = (PROJECTION, 1024, 128, 64, 16, 1)
        layers = {}
        for i, (a, b) in zip(
            (0, 2, 4, 6, 7), zip(widths[:-1], widths[1:], strict=False), strict=True
        ):
            linear = torch.nn.Linear(a, b)
            layers[f"layers.{i}.weight"] = linear.weight.detach().contiguous()
            layers[f"layers.{i}.bias"] = linear.bias.detach().contiguous()
        save_file(layers, folder / HEAD_NAME)
    return folder
