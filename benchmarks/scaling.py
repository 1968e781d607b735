"""Scaling of FK steering with the number of particles and steps, with compiled memory.

On the embedded digits DiT (the shipped 8x8 flow model and verifier reward): wall time (median
after warm-up), time per particle-step, and XLA's compiled memory footprint (arguments + outputs +
temporaries from ``memory_analysis``) versus N in 1..1024 and versus the number of steps.
Time per particle-step should flatten once the batch saturates the cores; memory should grow
linearly in N. Also checks the KV-cache size against its analytic formula.
Run: ``python -m benchmarks.scaling``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from benchmarks.timing import time_call
from tts_jax import interpolants as I
from tts_jax import smc
from tts_jax.models import lm
from tts_jax.models.zoo import load_digits_flow
from tts_jax.rewards.classifier import class_log_prob_reward, load_digits_verifier
from tts_jax.samplers import fk_steering as fk


def _compiled_bytes(model, reward, n, grid, diffusion, schedule) -> int:
    lowered = fk._fk_steering.lower(
        jax.random.key(0),
        model,
        reward,
        grid,
        diffusion,
        jnp.float32(1.0),
        schedule,
        None,
        n,
        "max",
        "multinomial",
    )
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

    config = lm.LMConfig.from_hf_dict(
        {
            "model_type": "qwen2",
            "vocab_size": 128,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
        }
    )
    n, max_len = 64, 256
    cache = lm.init_cache(config, n, max_len)
    actual = sum(leaf.nbytes for leaf in jax.tree.leaves(cache))
    head_dim = config.hidden_size // config.num_attention_heads
    analytic = (
        2 * n * config.num_hidden_layers * max_len * config.num_key_value_heads * head_dim * 4
    )
    analytic += n * 4  # int32 lengths
    print(
        f"\nKV cache for N={n}, max_len={max_len}: {actual} bytes; analytic {analytic} bytes "
        f"({'equal' if actual == analytic else 'DIFFERENT'})"
    )


if __name__ == "__main__":
    main()
