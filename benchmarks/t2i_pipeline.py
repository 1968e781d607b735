"""Text-to-image pipelines: tts-jax vs diffusers PyTorch, and FK / best-of-N overhead.

On the tiny random SD3 and FLUX folders of tests/t2i_folders.py (32 x 32 px images, 8 x 8 x 16
latents, 1-2 layer networks; no weights downloaded):

1. **Full sampling run**, tts-jax vs the diffusers pipeline: the same prompt, the same initial
   latents, ``K`` Euler steps, ``N`` images per prompt (``num_images_per_prompt``), the VAE
   decode at the end; SD3 at guidance 3.5 (classifier-free guidance, a ``2N`` batch), FLUX.1-dev
   style at embedded guidance 3.5. tts-jax's call is what a user runs: ``encode_prompt`` (host
   tokenization + one jitted encoder call), then one jitted program (``lax.scan`` of Euler steps,
   then ``decode``); diffusers' is ``pipe(prompt, num_images_per_prompt=N, latents=...,
   output_type="pt")`` under ``torch.inference_mode``, timed with ``torch.set_num_threads`` at
   the CPU count XLA's thread pool uses and, alternately, at 1 thread (on a loaded machine
   PyTorch's thread pool can lose more to waiting than it gains). The images are compared (max
   abs difference on [0, 1]).
2. **Sampler overhead** over bare batched forwards, as benchmarks/fk_overhead.py: FK steering
   (adaptive resampling, so a reward call after every step) vs one ``lax.scan`` of ``K``
   Euler-Maruyama steps with a Tweedie reward after each, same model and reward calls; best-of-N
   (``noise_search``'s kernel: ODE solves then one reward call) vs one batched ODE solve and one
   reward call. The reward decodes the latents with the VAE and scores the mean colour.

Timing: the programs of a row run in alternating rounds in one process (median per round,
median over rounds; :func:`benchmarks.timing.interleaved`), so load from other processes hits
both sides alike. Run: ``python -m benchmarks.t2i_pipeline``.
"""

from __future__ import annotations

import functools
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

from benchmarks.timing import interleaved, median_ratio
from tests import t2i_folders as T
from tts_jax import interpolants as I
from tts_jax import smc
from tts_jax.models.pipelines.text_to_image import (
    decode_latents,
    decoded_reward,
    load_text_to_image,
)
from tts_jax.samplers.base import run
from tts_jax.samplers.image import fk_steering as fk
from tts_jax.samplers.image import noise_search as ns
from tts_jax.samplers.image.integrate import solve, tweedie

PROMPT = "a photo of a red car"
STEPS = 10
GUIDANCE = 3.5
SIZE = T.IMAGE_SIZE
PIPELINE_N = (1, 4, 16)
OVERHEAD_N = (4, 16)
THREADS = os.cpu_count() or 1

_run = jax.jit(run, static_argnames="sampler")


def mean_colour(params, images, cond):
    """A reward on decoded images: minus the squared mean colour (its own cost is nil)."""
    return -jnp.mean(jnp.square(images.mean(axis=(2, 3))), axis=-1)


@jax.jit
def jax_sample(flow, cond, x, grid, vae):
    """The deterministic pipeline: Euler steps on the scheduler's grid, then the VAE decode."""
    x = solve(jax.random.key(0), flow, x, grid, I.ode(), cond)
    return decode_latents(vae, x)


@functools.partial(jax.jit, static_argnames="n")
def bare_forwards(key, flow, reward, grid, diffusion, cond, n):
    """K SDE steps on N states, one velocity each, and a Tweedie reward after each: the model
    and reward work of FK steering with adaptive resampling, with no particle machinery."""
    num_steps = grid.shape[0] - 1
    x = jax.random.normal(key, (n, *flow.sample_shape))
    keys = smc.step_keys_for(key, num_steps)
    u = flow.velocity(x, grid[0], cond)

    def body(carry, k):
        x, u, acc = carry
        g = diffusion(jnp.broadcast_to(grid[k], x.shape[:1]), flow.interpolant)
        x = I.sde_step(keys[k], flow.interpolant, u, x, grid[k], grid[k + 1], g)
        u = flow.velocity(x, grid[k + 1], cond)
        return (x, u, acc + reward(tweedie(flow, x, grid[k + 1], u), cond).sum()), None

    (x, _, acc), _ = jax.lax.scan(body, (x, u, jnp.float32(0.0)), jnp.arange(num_steps))
    return x, acc


@functools.partial(jax.jit, static_argnames="n")
def bare_best_of_n(key, flow, reward, grid, cond, n):
    """One batched ODE solve of N noises (the prompt shared, B = 1) and one reward call."""
    x = jax.random.normal(key, (n, *flow.sample_shape))
    x = solve(key, flow, x, grid, I.ode(), cond)
    r = reward(x, cond)
    return x[jnp.argmax(r)], r


def torch_sample(ref, n: int, latents: torch.Tensor) -> torch.Tensor:
    """diffusers' pipeline: N images of one prompt from the given (packed for FLUX) latents."""
    with torch.inference_mode():
        return ref(
            prompt=PROMPT,
            num_images_per_prompt=n,
            num_inference_steps=STEPS,
            height=SIZE,
            width=SIZE,
            latents=latents,
            guidance_scale=GUIDANCE,
            max_sequence_length=T.MAX_SEQUENCE_LENGTH,
            output_type="pt",
        ).images


def pipeline_rows(kind: str, folder: Path) -> list[str]:
    """Full sampling runs, tts-jax vs diffusers, at each N of :data:`PIPELINE_N`."""
    pipe = load_text_to_image(folder, max_sequence_length=T.MAX_SEQUENCE_LENGTH)
    ref = T.load_reference(folder)
    flow = pipe.flow(SIZE, SIZE, guidance_scale=GUIDANCE)
    grid = pipe.grid(STEPS, SIZE, SIZE)
    rows = []
    for n in PIPELINE_N:
        noise = np.random.default_rng(n).standard_normal((n, *flow.sample_shape), np.float32)
        x = jnp.asarray(noise)
        packed = T.pack_flux_latents(noise) if kind == "flux" else noise
        latents = torch.from_numpy(np.ascontiguousarray(packed))

        def ours(x=x):
            return jax_sample(flow, pipe.encode_prompt(PROMPT), x, grid, pipe.vae_params)

        def theirs(n=n, latents=latents):
            torch.set_num_threads(THREADS)
            return torch_sample(ref, n, latents)

        def theirs_1(n=n, latents=latents):
            torch.set_num_threads(1)
            return torch_sample(ref, n, latents)

        start = time.perf_counter()
        got = np.asarray(jax.block_until_ready(ours()))
        first = time.perf_counter() - start
        diff = np.abs((got + 1) / 2 - theirs().numpy()).max()
        med, per_round = interleaved(
            {"jax": ours, "torch": theirs, "torch-1": theirs_1}, rounds=7, budget=0.2
        )
        rows.append(
            f"| {kind} | {n} | {med['torch'] * 1e3:.1f} | {med['torch-1'] * 1e3:.1f} "
            f"| {med['jax'] * 1e3:.1f} | {median_ratio(per_round, 'torch', 'jax'):.2f} "
            f"| {median_ratio(per_round, 'torch-1', 'jax'):.2f} | {first:.1f} | {diff:.1e} |"
        )
        print(rows[-1], flush=True)
    return rows


def overhead_rows(kind: str, folder: Path) -> list[str]:
    """FK steering and best-of-N over bare batched forwards at each N of :data:`OVERHEAD_N`."""
    pipe = load_text_to_image(folder, max_sequence_length=T.MAX_SEQUENCE_LENGTH)
    cond = pipe.encode_prompt(PROMPT)
    flow = pipe.flow(SIZE, SIZE, guidance_scale=GUIDANCE)
    grid = pipe.grid(STEPS, SIZE, SIZE)
    reward = decoded_reward(pipe, mean_colour, None, "colour")
    diffusion = I.diffusion("square", 1.0)
    key = jax.random.key(0)
    rows = []
    for n in OVERHEAD_N:
        fk_sampler = fk.sampler(n, STEPS, "max", "multinomial")
        fk_params = fk.make_params(flow, reward, grid, diffusion, 1.0, cond=cond)
        fk.check_params(fk_params, fk_sampler)
        bon_sampler = ns.best_of_n_sampler(n)
        bon_params = ns.make_params(flow, reward, grid, cond=cond)
        ns.check_params(bon_params, bon_sampler)
        fns = {
            "bare SDE + reward": lambda n=n: bare_forwards(
                key, flow, reward, grid, diffusion, cond, n
            ),
            "fk": lambda s=fk_sampler, p=fk_params: _run(key, s, p),
            "bare ODE + reward": lambda n=n: bare_best_of_n(key, flow, reward, grid, cond, n),
            "bon": lambda s=bon_sampler, p=bon_params: _run(key, s, p),
        }
        med, per_round = interleaved(fns, rounds=7, budget=0.2)
        for name, base in (
            ("FK steering", "bare SDE + reward"),
            ("best-of-N", "bare ODE + reward"),
        ):
            mine = "fk" if name == "FK steering" else "bon"
            rows.append(
                f"| {kind} | {name} | {n} | {med[base] * 1e3:.1f} | {med[mine] * 1e3:.1f} "
                f"| {median_ratio(per_round, mine, base):.3f} |"
            )
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    torch.set_num_threads(THREADS)
    import diffusers

    with tempfile.TemporaryDirectory() as tmp:
        folders = {
            "sd3": T.make_tiny_sd3(Path(tmp) / "sd3"),
            "flux": T.make_tiny_flux(Path(tmp) / "flux"),
        }
        print(
            f"Tiny random pipelines of tests/t2i_folders.py ({SIZE} x {SIZE} px, latents 16 x "
            f"{T.LATENT_SIZE} x {T.LATENT_SIZE}), {STEPS} Euler steps, guidance {GUIDANCE} (SD3: "
            f"CFG, 2N rows), T5 length {T.MAX_SEQUENCE_LENGTH}; jax {jax.__version__} "
            f"({jax.default_backend()}), torch {torch.__version__} with torch.set_num_threads("
            f"{THREADS}) (XLA's CPU thread pool uses the {THREADS} cores), diffusers "
            f"{diffusers.__version__}. Medians of 7 alternating rounds in one process (diffusers "
            "also timed with 1 thread); the machine is shared with other jobs, so absolute "
            "times are noisy, the ratios less."
        )
        print()
        print("Full sampling run (prompt encoding, K steps, VAE decode), N images of one prompt:")
        print()
        print(
            f"| pipeline | N | diffusers, {THREADS} threads (ms) | diffusers, 1 thread (ms) "
            f"| tts-jax (ms) | diffusers ({THREADS} threads) / tts-jax "
            "| diffusers (1 thread) / tts-jax | tts-jax first call (s) | max abs image diff |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for kind, folder in folders.items():
            pipeline_rows(kind, folder)
        print()
        print(
            "Sampler over bare batched forwards (same model forwards and reward calls; FK: "
            "adaptive resampling, SDE, a decoded reward after every step; best-of-N: ODE, one "
            "reward call):"
        )
        print()
        print("| pipeline | sampler | N | bare (ms) | sampler (ms) | ratio |")
        print("|---|---|---|---|---|---|")
        for kind, folder in folders.items():
            overhead_rows(kind, folder)


if __name__ == "__main__":
    main()
