"""FK steering overhead: sampler wall time over bare batched model forwards + reward calls.

The baseline does the same work with no particles machinery: one ``lax.scan`` of K Euler-Maruyama
steps (one velocity call each) on N states, plus the same number of Tweedie reward evaluations.
The ratio isolates what weighting, resampling and bookkeeping cost. Target <= 1.10.
Run: ``python -m benchmarks.fk_overhead``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from benchmarks.timing import time_call
from tts_jax import interpolants as I
from tts_jax import smc
from tts_jax.models import gmm as G
from tts_jax.rewards.analytic import linear_reward
from tts_jax.samplers.fk_steering import fk_steering
from tts_jax.samplers.integrate import tweedie

STEPS = 50


@functools.partial(jax.jit, static_argnames=("n",))
def bare_forwards(key, model, reward, grid, diffusion, n):
    """K SDE steps with one velocity and one Tweedie reward per step: the work FK must do."""
    x = jax.random.normal(key, (n, *model.sample_shape))

    def body(carry, k):
        x, acc = carry
        u = model.velocity(x, grid[k])
        g = diffusion(jnp.broadcast_to(grid[k], x.shape[:1]), model.interpolant)
        x = I.sde_step(jax.random.fold_in(key, k), model.interpolant, u, x, grid[k], grid[k + 1], g)
        return (x, acc + reward(tweedie(model, x, grid[k + 1], u)).sum()), None

    (x, acc), _ = jax.lax.scan(body, (x, 0.0), jnp.arange(grid.shape[0] - 1))
    return x, acc


def main() -> None:
    gmm = G.asymmetric_gmm_2d()
    model, reward = G.flow_model(gmm), linear_reward([1.0, -0.5])
    grid, diffusion = I.uniform_grid(STEPS), I.diffusion("square", 3.0)
    print("| N | schedule | bare forwards (ms) | FK steering (ms) | ratio | FK compile (s) |")
    print("|---|---|---|---|---|---|")
    for n in (8, 64, 256, 1024):
        _, bare = time_call(
            lambda: bare_forwards(jax.random.key(0), model, reward, grid, diffusion, n)
        )
        for name, schedule in (
            ("every 10", smc.every(STEPS, 10)),
            ("adaptive", smc.adaptive(STEPS)),
        ):
            first, fk = time_call(
                lambda: fk_steering(
                    jax.random.key(0),
                    model,
                    reward,
                    n,
                    grid,
                    diffusion,
                    2.0,
                    schedule=schedule,
                    potential="diff",
                )
            )
            print(
                f"| {n} | {name} | {bare * 1e3:.2f} | {fk * 1e3:.2f} | {fk / bare:.2f} "
                f"| {first:.1f} |"
            )


if __name__ == "__main__":
    main()
