"""Benchmark: our jitted DiT denoising loop vs diffusers' PyTorch DiT called step by step.

Both run 50 Euler steps of the same (random) weights on the same digits-sized config; JAX runs
one ``lax.scan`` inside ``jax.jit`` (compile time reported separately), PyTorch calls the model
once per step under ``torch.inference_mode``. Prints wall times and the PyTorch/JAX ratio.
Not a test: ``python benchmarks/dit_denoise.py``.
"""

from __future__ import annotations

import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from diffusers import DiTTransformer2DModel

from tts_jax.models.dit import load_dit
from tts_jax.models.wrappers import velocity_dit_flow

STEPS = 50
CONFIG = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=1,
    num_layers=4,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
)


@jax.jit
def jax_denoise(flow, x, labels):
    """50 Euler steps from t = 1 to 0 as one scan."""
    grid = jnp.linspace(1.0, 0.0, STEPS + 1)

    def body(x, ts):
        t = jnp.broadcast_to(ts[0], x.shape[:1])
        return x + flow.velocity(x, t, labels) * (ts[1] - ts[0]), None

    return jax.lax.scan(body, x, jnp.stack([grid[:-1], grid[1:]], 1))[0]


@torch.inference_mode()
def torch_denoise(model, x, labels):
    grid = torch.linspace(1.0, 0.0, STEPS + 1)
    for t, t_next in zip(grid[:-1], grid[1:], strict=True):
        timestep = torch.full((x.shape[0],), float(t) * 1000.0)
        x = x + model(x, timestep, labels).sample * (t_next - t)
    return x


def _best_of(fn, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    torch.manual_seed(0)
    torch_model = DiTTransformer2DModel(**CONFIG).eval()
    with tempfile.TemporaryDirectory() as folder:
        torch_model.save_pretrained(folder, safe_serialization=True)
        _, dit = load_dit(folder)
    flow = velocity_dit_flow(dit)
    print(f"DiT {CONFIG}, {STEPS} Euler steps, jax {jax.__version__}, torch {torch.__version__}")
    for n in (8, 64):
        noise = np.random.default_rng(0).standard_normal((n, 1, 8, 8)).astype(np.float32)
        labels = np.arange(n) % 10
        x_j, y_j = jnp.asarray(noise), jnp.asarray(labels)
        x_t, y_t = torch.tensor(noise), torch.tensor(labels)
        start = time.perf_counter()
        out_j = jax_denoise(flow, x_j, y_j).block_until_ready()
        compile_s = time.perf_counter() - start
        t_jax = _best_of(lambda: jax_denoise(flow, x_j, y_j).block_until_ready())
        t_torch = _best_of(lambda: torch_denoise(torch_model, x_t, y_t))
        diff = np.abs(np.asarray(out_j) - torch_denoise(torch_model, x_t, y_t).numpy()).max()
        print(
            f"N={n:3d}: jax {t_jax * 1e3:8.1f} ms (first call incl. compile {compile_s:.1f} s), "
            f"torch {t_torch * 1e3:8.1f} ms, torch/jax = {t_torch / t_jax:5.2f}, "
            f"max |diff| = {diff:.1e}"
        )


if __name__ == "__main__":
    main()
