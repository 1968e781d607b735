"""Scaling of FK steering with the number of particles and steps, with compiled memory.

On the embedded digits DiT (the shipped 8x8 flow model and verifier reward): wall time (median
after warm-up), time per particle-step, and XLA's compiled memory footprint (arguments + outputs +
temporaries from ``memory_analysis``) versus N in 1..1024 and versus the number of steps.
Time per particle-step should flatten once the batch saturates the cores; memory should grow
linearly in N. Then the KV cache: its allocated size against the analytic formula, and XLA's
compiled memory of plain decoding (cache donated) and of token-level SMC, in units of the
analytic cache, to show that resampling adds no hidden copies beyond the one gather buffer.
Run: ``python -m benchmarks.scaling``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.lm_fixtures import even_token_tilt, small_qwen2, step_scorer
from benchmarks.timing import time_call
from tts_jax import interpolants as I
from tts_jax import smc
from tts_jax.models import lm
from tts_jax.models.zoo import load_digits_flow
from tts_jax.rewards.classifier import class_log_prob_reward, load_digits_verifier
from tts_jax.samplers import run as run_sampler
from tts_jax.samplers.image import fk_steering as fk
from tts_jax.samplers.lm import particle_filter, token_smc


def _compiled_bytes(model, reward, n, grid, diffusion, schedule) -> int:
    sampler = fk.sampler(n, grid.shape[0] - 1, potential="max", resampler="multinomial")
    params = fk.make_params(model, reward, grid, diffusion, 1.0, schedule)
    jitted = jax.jit(run_sampler, static_argnames="sampler")
    lowered = jitted.lower(jax.random.key(0), sampler, params)
    mem = lowered.compile().memory_analysis()
    if mem is None:
        return -1
    return mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes


def main() -> None:
    model = load_digits_flow()
    reward = class_log_prob_reward(load_digits_verifier(), 3)
    diffusion = I.diffusion("square", 3.0)

    def run(n, steps):
        grid = I.uniform_grid(steps)
        schedule = smc.every(steps, max(steps // 5, 1))
        return fk.fk_steering(
            jax.random.key(0), model, reward, n, grid, diffusion, 1.0, schedule=schedule
        )

    print("| N | steps | time (ms) | us per particle-step | compiled memory (MiB) |")
    print("|---|---|---|---|---|")
    for n, steps in [
        (1, 20),
        (4, 20),
        (16, 20),
        (64, 20),
        (256, 20),
        (1024, 20),
        (64, 10),
        (64, 40),
        (64, 80),
    ]:
        _, t = time_call(lambda n=n, steps=steps: run(n, steps), repeats=3)
        grid = I.uniform_grid(steps)
        mem = _compiled_bytes(
            model, reward, n, grid, diffusion, smc.every(steps, max(steps // 5, 1))
        )
        print(
            f"| {n} | {steps} | {t * 1e3:.1f} | {t / (n * steps) * 1e6:.1f} | {mem / 2**20:.2f} |"
        )

    print()
    kv_cache_memory()


def kv_cache_memory() -> None:
    """XLA's compiled memory of plain decoding and of the LM steering samplers, in KV caches.

    The analytic cache is ``2 layers N max_len kv_heads head_dim`` floats (+ ``N`` lengths).
    ``generate`` donates its cache: the output aliases it and nothing cache-sized is
    temporary. Token SMC and particle filtering build the cache inside the program; a
    resampling step gathers rows of it into a second buffer (a gather cannot run in place),
    so their temporaries should stay near two caches, whatever the number of tokens. (The
    programs are only compiled here, not run.)
    """
    model = small_qwen2()
    config = model.config
    prompt = jnp.arange(1, 9, dtype=jnp.int32)
    run_jit = jax.jit(run_sampler, static_argnames="sampler")
    print(
        "| program | N | new tokens | analytic KV cache (MiB) | allocated cache / analytic "
        "| donated (aliased) / cache | temporaries / cache |"
    )
    print("|---|---|---|---|---|---|---|")
    for n, new in ((16, 64), (64, 64), (64, 256), (256, 256)):
        max_len = prompt.shape[0] + new
        analytic = 2 * config.num_hidden_layers * n * max_len * config.num_key_value_heads
        analytic = analytic * config.head_dim * 4 + 4 * n
        cache = lm.init_cache(config, n, max_len)
        allocated = sum(leaf.nbytes for leaf in jax.tree.leaves(cache))
        programs = {
            "generate": lm.generate_program.lower(
                model,
                jnp.tile(prompt, (n, 1)),
                jnp.full((n,), 8, jnp.int32),
                cache,
                jax.random.key(0),
                jnp.float32(1.0),
                jnp.asarray([-1], jnp.int32),
                jnp.int32(0),
                max_new_tokens=new,
            ),
            "token_smc": run_jit.lower(
                jax.random.key(0),
                token_smc.token_smc_sampler(n, new, even_token_tilt, None, "systematic"),
                token_smc.make_token_smc_params(
                    model, prompt, temperature=1.0, potential_params=jnp.float32(0.3)
                ),
            ),
            "particle_filter": run_jit.lower(
                jax.random.key(0),
                particle_filter.pf_sampler(n, new // 8, 8, new, step_scorer, "last", "multinomial"),
                particle_filter.make_pf_params(
                    model, prompt, None, max_new_tokens=new, temperature=1.0, prompt_length=8
                ),
            ),
        }
        for name, lowered in programs.items():
            mem = lowered.compile().memory_analysis()
            print(
                f"| {name} | {n} | {new} | {analytic / 2**20:.2f} | {allocated / analytic:.3f} "
                f"| {mem.alias_size_in_bytes / analytic:.2f} "
                f"| {mem.temp_size_in_bytes / analytic:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
