"""A tiny random ``AutoencoderKLWan`` (Wan 2.1 video VAE) folder for tests, built with diffusers.

:func:`make_tiny_wan_vae` writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` with
``save_pretrained``, the layout of the ``vae/`` sub-folder of the hub's
``Wan-AI/Wan2.1-T2V-*-Diffusers`` repositories. The network has Wan 2.1's structure (4 levels,
``temperal_downsample`` [False, True, True]: spatial factor 8, temporal factor 4, so the config's
default ``scale_factor_*`` hold) at tiny widths: :data:`TINY_WAN_VAE` (``base_dim`` 8, ``z_dim``
:data:`Z_DIM`, one resnet per level). Every parameter is perturbed with ``seed`` (diffusers
initialises the RMS gains to one and the biases to zero). ``latents_mean`` / ``latents_std`` are
given non-trivial values so a test notices a missing or reversed normalisation.

Video of ``1 + 4 (F - 1)`` frames of ``8 h x 8 w`` pixels <-> ``F`` latent frames of
``h x w`` (e.g. 5 frames of 16 x 16 <-> 2 latent frames of 2 x 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

Z_DIM = 4
TINY_WAN_VAE: dict[str, Any] = {
    "base_dim": 8,
    "z_dim": Z_DIM,
    "dim_mult": [1, 2, 2, 2],
    "num_res_blocks": 1,
    "temperal_downsample": [False, True, True],
    "latents_mean": [0.3, -0.5, 0.1, 0.8],
    "latents_std": [1.7, 0.6, 2.2, 1.1],
}


def tiny_wan_vae(seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A perturbed random diffusers ``AutoencoderKLWan`` of :data:`TINY_WAN_VAE` (plus
    ``overrides``), in eval mode."""
    import diffusers

    torch.manual_seed(seed)
    model = diffusers.AutoencoderKLWan(**{**TINY_WAN_VAE, **overrides})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.eval()


def make_tiny_wan_vae(folder: str | Path, seed: int = 0, **overrides: Any) -> Path:
    """Writes :func:`tiny_wan_vae` to ``folder`` (created) with ``save_pretrained``."""
    folder = Path(folder)
    tiny_wan_vae(seed, **overrides).save_pretrained(folder, safe_serialization=True)
    return folder
