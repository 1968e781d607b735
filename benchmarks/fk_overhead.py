"""FK steering overhead: sampler wall time over bare batched model forwards + reward calls.

The baseline does the same model and reward work with no particle machinery, written as the
tightest loop we know: one ``lax.scan`` of K Euler-Maruyama steps (one velocity call each) on N
states, the per-step keys derived before the loop as FK steering does, and a Tweedie reward call
exactly where FK steering makes one (every step for adaptive resampling, every 10th for the
``every 10`` schedule, whose reward-free steps are an inner scan). So both sides make K N model
forwards and the same number of reward calls; the ratio isolates what weighting, resampling,
diagnostics and the host-side checks of ``fk_steering`` cost. Target <= 1.10. Neither side
unrolls its scan (``unroll=2`` or ``5`` was not faster for either on CPU).

Two FK columns: the **kernel** (``jax.jit(run)`` on a sampler and params built once, as a
user jitting or vmapping the run calls it) and the **call** (``fk_steering``: params built and
checked on the host, the kernel, the finished run's checks). Their difference is the host
work of one call, tens of microseconds, which shows only where a whole run takes well under a
millisecond.

Timing: the three programs run in alternating rounds in one process; each round takes the
median of several calls, and the table reports the median over rounds of the time and of the
per-round ratio, so load from other processes hits all sides alike. Why the ratio exceeds 1.10
at small N:
``python -m benchmarks.overhead_profile``. Run: ``python -m benchmarks.fk_overhead``.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from benchmarks.timing import interleaved, median_ratio
from tts_jax import interpolants as I
from tts_jax import smc
from tts_jax.models import gmm as G
from tts_jax.rewards.analytic import linear_reward
from tts_jax.samplers.base import run
from tts_jax.samplers.image import fk_steering as fk
from tts_jax.samplers.image.integrate import tweedie

STEPS = 50
RUN = jax.jit(run, static_argnames="sampler")
SCHEDULES = {"every 10": (lambda k: smc.every(k, 10), 10), "adaptive": (smc.adaptive, 1)}


@functools.partial(jax.jit, static_argnames=("n", "reward_every"))
def bare_forwards(key, model, reward, grid, diffusion, n, reward_every=1):
    """K SDE steps, one velocity each, and a Tweedie reward every ``reward_every`` steps.

    That is the model and reward work of FK steering (whose reward calls follow the resampling
    schedule, plus the last step); ``reward_every`` must divide K.
    """
    num_steps = grid.shape[0] - 1
    x = jax.random.normal(key, (n, *model.sample_shape))
    keys = smc.step_keys_for(key, num_steps)

    def move(x, k):
        u = model.velocity(x, grid[k])
        g = diffusion(jnp.broadcast_to(grid[k], x.shape[:1]), model.interpolant)
        return I.sde_step(keys[k], model.interpolant, u, x, grid[k], grid[k + 1], g), u

    def block(carry, first):  # reward_every steps, the reward after the last one
        x, acc = carry
        if reward_every > 1:
            x, _ = jax.lax.scan(
                lambda x, k: (move(x, k)[0], None), x, first + jnp.arange(reward_every - 1)
            )
        k = first + reward_every - 1
        x, u = move(x, k)
        return (x, acc + reward(tweedie(model, x, grid[k + 1], u)).sum()), None

    starts = jnp.arange(0, num_steps, reward_every)
    (x, acc), _ = jax.lax.scan(block, (x, jnp.float32(0.0)), starts)
    return x, acc


def gmm_setup():
    gmm = G.asymmetric_gmm_2d()
    return G.flow_model(gmm), linear_reward([1.0, -0.5])


def main() -> None:
    model, reward = gmm_setup()
    grid, diffusion = I.uniform_grid(STEPS), I.diffusion("square", 3.0)
    key = jax.random.key(0)
    print(
        f"jax {jax.__version__}, {jax.default_backend()}, K = {STEPS} steps, 2-D exact GMM, "
        "linear reward; median of 7 alternating rounds"
    )
    print()
    print(
        "| N | schedule | reward calls / particle | bare forwards (ms) | FK kernel (ms) "
        "| FK call (ms) | ratio kernel | ratio call | FK compile (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for n in (8, 64, 256, 1024):
        for name, (make, every) in SCHEDULES.items():
            schedule = make(STEPS)
            start = time.perf_counter()
            call = functools.partial(
                fk.fk_steering,
                key,
                model,
                reward,
                n,
                grid,
                diffusion,
                2.0,
                schedule=schedule,
                potential="diff",
            )
            calls = int(jax.block_until_ready(call()).cost.reward_calls) // n
            compile_s = time.perf_counter() - start
            sampler = fk.sampler(n, STEPS, potential="diff")
            params = fk.make_params(model, reward, grid, diffusion, 2.0, schedule)
            med, per_round = interleaved(
                {
                    "bare": lambda: bare_forwards(key, model, reward, grid, diffusion, n, every),
                    "kernel": lambda: RUN(key, sampler, params),
                    "call": call,
                }
            )
            print(
                f"| {n} | {name} | {calls} | {med['bare'] * 1e3:.2f} | {med['kernel'] * 1e3:.2f} "
                f"| {med['call'] * 1e3:.2f} | {median_ratio(per_round, 'kernel', 'bare'):.2f} "
                f"| {median_ratio(per_round, 'call', 'bare'):.2f} | {compile_s:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
