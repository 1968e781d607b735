"""Benchmark: overhead of each flow particle sampler over bare batched model forwards.

For a budget of ``budget`` NFE on an ``S``-step grid, the reference is the same number of model
forward passes in their most parallel form: ``S`` sequential forwards of a batch of
``budget // S`` (one jitted ``lax.scan``, no reward). Each method (BoN, SMC, SVDD, CoDe, RBF of
:mod:`tts_jax.samplers.flow_particles`) is timed end to end at that budget, median of a few
repetitions after a warm-up call (compilation excluded), and reported as a ratio to the
reference. Ratios above 1 come from reward calls, resampling/selection and, for the chain
methods, smaller batches run for more sequential steps (RBF advances ``B = 2`` chains one
proposal at a time). Models: the exact GMM velocity and a small random DiT.

Not a test: ``python benchmarks/flow_particles_overhead.py``.
"""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp

from tts_jax import interpolants as I
from tts_jax.models import gmm as G
from tts_jax.models.dit import DiTConfig, init_dit
from tts_jax.models.wrappers import velocity_dit_flow
from tts_jax.rewards.analytic import distance_reward
from tts_jax.samplers import flow_particles as fp

REPEATS = 5
STEPS = 10


@functools.partial(jax.jit, static_argnames=("num",))
def bare_forwards(model, key, grid, num):
    """``len(grid) - 1`` sequential batched forwards of ``num`` particles (Euler steps)."""
    x = jax.random.normal(key, (num, *model.sample_shape))

    def body(x, k):
        return x + model.velocity(x, grid[k]) * (grid[k + 1] - grid[k]), None

    return jax.lax.scan(body, x, jnp.arange(grid.shape[0] - 1))[0]


def median_time(fn) -> float:
    jax.block_until_ready(fn())  # warm-up / compile
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def methods(budget: int):
    sde = I.diffusion("square", 3.0)
    return {
        "bon": functools.partial(fp.bon, diffusion=I.ode(), budget=budget),
        "smc": functools.partial(fp.smc, diffusion=sde, lam=10.0, budget=budget),
        "svdd": functools.partial(fp.svdd, diffusion=sde, budget=budget),
        "code": functools.partial(fp.code, diffusion=sde, budget=budget),
        "rbf": functools.partial(fp.rbf, diffusion=sde, budget=budget),
    }


def report(label: str, model, reward, budget: int) -> None:
    grid = I.sqrt_grid(STEPS)
    key = jax.random.key(0)
    base = median_time(lambda: bare_forwards(model, key, grid, budget // STEPS))
    print(f"{label}: budget {budget} NFE, {STEPS} steps; bare forwards {base * 1e3:.2f} ms")
    for name, run in methods(budget).items():
        out = run(key, model, reward, grid)
        t = median_time(lambda run=run: run(key, model, reward, grid).samples)
        print(f"  {name:5s} nfe {int(out.nfe):4d}  {t * 1e3:8.2f} ms  ratio {t / base:6.2f}")


def main():
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, median of {REPEATS}")
    gmm = G.asymmetric_gmm_2d()
    report("GMM (exact velocity)", G.flow_model(gmm), distance_reward(gmm.means[2]), 500)
    config = DiTConfig(
        num_attention_heads=4,
        attention_head_dim=16,
        in_channels=1,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    dit = velocity_dit_flow(init_dit(config, 0))
    report("DiT 2x64 on 1x8x8", dit, distance_reward(jnp.zeros(64)), 200)


if __name__ == "__main__":
    main()
