"""Image sampler overhead on the embedded digits DiT: sampler time / (bare forwards + rewards).

Issue 8, benchmark 1. Every image sampler runs on the shipped digits flow DiT (4 layers, 8x8
latent) with the shipped verifier as reward, at a batch width of ``N`` particles in
{8, 64, 256} on a ``S``-step grid. Each sampler reports the NFE and reward calls it spent
(counted per particle); the reference does exactly that work with no sampler machinery, in its
most parallel form: ``ceil(nfe / N)`` sequential forwards of an ``[N, 1, 8, 8]`` batch (Euler
updates, one ``lax.scan``) plus ``ceil(reward_calls / N)`` verifier calls on ``[N, 1, 8, 8]``
batches. ``ratio = sampler / reference``, medians of repetitions after a warm-up call, both timed
in alternating calls in one process (the ratio is the median of the per-pair ratios); the
warm-up (first call incl. compilation) is reported apart.

How ``N`` maps onto each method (its width of parallel model calls):

* ``best_of_n``: N candidates, budget ``N S``;
* ``zero_order``: ``M = N`` neighbours per iteration, 3 iterations (the pivot's first
  trajectory is a batch of 1);
* ``paths``: ``N / 4`` paths x 4 branches, start at ``S / 2``;
* ``fk``: N particles, ``diff`` potential, resampling every 2 steps;
* ``svdd``: ``N / 8`` chains x 8 proposals per step;
* ``rbf``: ``N`` chains, 4 initial noises and a quota of 4 proposals per step and chain (chains
  advance one proposal at a time, asynchronously).

Run: ``python -m benchmarks.sampler_overhead``.
"""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp

from benchmarks.timing import time_pair
from tts_jax import interpolants as I
from tts_jax import smc
from tts_jax.models.zoo import load_digits_flow
from tts_jax.rewards.classifier import class_log_prob_reward, load_digits_verifier
from tts_jax.samplers import flow_particles, noise_search
from tts_jax.samplers.fk_steering import fk_steering

STEPS = 10
WIDTHS = (8, 64, 256)
TARGET_CLASS = 3
REPEATS = 7


@functools.partial(jax.jit, static_argnames=("width", "num_forwards", "num_reward_calls"))
def reference(key, model, reward, grid, width, num_forwards, num_reward_calls):
    """``num_forwards`` batched forwards of ``width`` rows + ``num_reward_calls`` reward calls."""
    x = jax.random.normal(key, (width, *model.sample_shape))
    k = jnp.arange(num_forwards) % (grid.shape[0] - 1)

    def forward(x, k):
        return x + model.velocity(x, grid[k]) * (grid[k + 1] - grid[k]), None

    x = jax.lax.scan(forward, x, k)[0]

    def score(total, i):
        return total + reward(x + i).sum(), None

    return jax.lax.scan(score, 0.0, jnp.arange(num_reward_calls, dtype=jnp.float32))[0]


def samplers(width: int, grid):
    """``name -> call(key, model, reward)`` for every image sampler at batch width ``width``."""
    sde = I.diffusion("square", 3.0)
    paths_budget = (width // 4) * noise_search.paths_plan(STEPS, 4, STEPS // 2, 1, 2).nfe_per_path
    svdd_chains, svdd_proposals = max(width // 8, 1), 8
    rbf_init, rbf_quota = 4, 4
    return {
        "best_of_n": lambda k, m, r: noise_search.best_of_n(k, m, r, width * STEPS, grid),
        "zero_order": lambda k, m, r: noise_search.zero_order_search(
            k, m, r, STEPS * (1 + 3 * width), grid, num_neighbours=width
        ),
        "paths": lambda k, m, r: noise_search.search_over_paths(
            k,
            m,
            r,
            paths_budget,
            grid,
            num_paths=width // 4,
            num_branches=4,
            start_step=STEPS // 2,
            forward_steps=1,
            backward_steps=2,
        ),
        "fk": lambda k, m, r: fk_steering(
            k, m, r, width, grid, sde, 10.0, schedule=smc.every(STEPS, 2), potential="diff"
        ),
        "svdd": lambda k, m, r: flow_particles.svdd(
            k,
            m,
            r,
            grid,
            sde,
            svdd_chains * (1 + svdd_proposals * (STEPS - 1)),
            num_chains=svdd_chains,
        ),
        "rbf": lambda k, m, r: flow_particles.rbf(
            k,
            m,
            r,
            grid,
            sde,
            width * (rbf_init + rbf_quota * (STEPS - 1)),
            num_chains=width,
            num_init=rbf_init,
        ),
    }


def main() -> None:
    model = load_digits_flow()
    reward = class_log_prob_reward(load_digits_verifier(), TARGET_CLASS)
    grid = I.uniform_grid(STEPS)
    key = jax.random.key(0)
    print(
        f"digits DiT {model.sample_shape}, verifier reward, {STEPS}-step uniform grid; "
        f"median of {REPEATS} alternating pairs after a warm-up call; reference = the same NFE as "
        f"ceil(nfe / N) forwards of N rows + ceil(reward calls / N) reward calls of N rows\n"
    )
    print(
        "| sampler | N | NFE | reward calls | reference (ms) | sampler (ms) | ratio "
        "| first call (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for width in WIDTHS:
        for name, run in samplers(width, grid).items():
            start = time.perf_counter()
            out = jax.block_until_ready(run(key, model, reward))
            first = time.perf_counter() - start
            forwards = math.ceil(int(out.nfe) / width)
            reward_batches = math.ceil(int(out.reward_calls) / width)
            _, took, ref, ratio = time_pair(
                lambda run=run: run(key, model, reward),
                lambda f=forwards, r=reward_batches: reference(
                    key, model, reward, grid, width, f, r
                ),
                REPEATS,
            )
            print(
                f"| {name} | {width} | {int(out.nfe)} | {int(out.reward_calls)} "
                f"| {ref * 1e3:.1f} | {took * 1e3:.1f} | {ratio:.2f} | {first:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
