"""Compile time of every sampler's first call, and proof that hyper-parameter sweeps compile once.

Issue 8, benchmark 4. XLA reports each backend compilation through ``jax.monitoring``
(``/jax/core/compile/backend_compile_duration``); this script counts those events and sums
their durations while it (a) calls each sampler for the first time, (b) calls it again with the
same arguments (steady state), and (c) sweeps one or two hyper-parameters over three new values
each. A sweep that triggers zero compilations proves the hyper-parameter travels as an array
argument of the one compiled program. A first call with zero compilations reuses the program of
a row above (beam search and DVTS run the LM best-of-N program with other group sizes, which
are array arguments; adaptive and scheduled FK differ only in the schedule array).

Image samplers run on the embedded digits DiT (N = 8, 10 steps) with the verifier reward; LM
samplers on a 2-layer random Qwen2 (N = 8, 32 new tokens, steps of 8 tokens) with a free
in-graph step scorer.

Run: ``python -m benchmarks.compile_time``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import monitoring

from benchmarks.lm_fixtures import even_token_tilt, small_qwen2, step_scorer
from tts_jax import interpolants as I
from tts_jax import smc
from tts_jax.models.zoo import load_digits_flow
from tts_jax.rewards.classifier import class_log_prob_reward, load_digits_verifier
from tts_jax.samplers.image import flow_particles, noise_search
from tts_jax.samplers.image.fk_steering import fk_steering
from tts_jax.samplers.lm import particle_filter, token_smc
from tts_jax.samplers.lm import search as lm_search

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
SWEEP = (0.5, 0.8, 0.9)
N, STEPS = 8, 10


class CompileCounter:
    """Counts backend compilations and their total seconds (a ``jax.monitoring`` listener)."""

    def __init__(self):
        self.count, self.seconds = 0, 0.0
        monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_kwargs) -> None:
        if event == COMPILE_EVENT:
            self.count += 1
            self.seconds += duration

    def measure(self, fn: Callable[[], object]) -> tuple[float, int, float]:
        """``(wall seconds, compilations, compile seconds)`` of ``fn()`` run to completion."""
        count, seconds = self.count, self.seconds
        start = time.perf_counter()
        jax.block_until_ready(fn())
        return time.perf_counter() - start, self.count - count, self.seconds - seconds


def image_samplers() -> dict[str, tuple[str, Callable[..., object]]]:
    """``name -> (swept hyper-parameters, call(value))``; ``value`` is the swept setting."""
    model = load_digits_flow()
    reward = class_log_prob_reward(load_digits_verifier(), 3)
    grid, key = I.uniform_grid(STEPS), jax.random.key(0)

    def sde(v):
        return I.diffusion("square", 3.0 * v)

    def samples(result):
        return result.samples

    return {
        "best_of_n (SDE)": (
            "diffusion norm",
            lambda v: samples(noise_search.best_of_n(key, model, reward, N * STEPS, grid, sde(v))),
        ),
        "zero_order_search": (
            "lambda_cos",
            lambda v: samples(
                noise_search.zero_order_search(
                    key, model, reward, 4 * N * STEPS, grid, lambda_cos=v
                )
            ),
        ),
        "search_over_paths": (
            "diffusion norm",
            lambda v: samples(
                noise_search.search_over_paths(key, model, reward, 6 * N * STEPS, grid, sde(v))
            ),
        ),
        "fk_steering": (
            "lambda, diffusion norm",
            lambda v: samples(
                fk_steering(
                    key, model, reward, N, grid, sde(v), 10.0 * v, schedule=smc.every(STEPS, 2)
                )
            ),
        ),
        "fk_steering (adaptive)": (
            "lambda",
            lambda v: samples(fk_steering(key, model, reward, N, grid, sde(1.0), 10.0 * v)),
        ),
        "flow smc": (
            "lambda, diffusion norm",
            lambda v: samples(
                flow_particles.smc(key, model, reward, grid, sde(v), N * STEPS, lam=10.0 * v)
            ),
        ),
        "svdd": (
            "diffusion norm",
            lambda v: samples(flow_particles.svdd(key, model, reward, grid, sde(v), N * STEPS)),
        ),
        "code": (
            "diffusion norm",
            lambda v: samples(flow_particles.code(key, model, reward, grid, sde(v), N * STEPS)),
        ),
        "rbf": (
            "diffusion norm",
            lambda v: samples(
                flow_particles.rbf(key, model, reward, grid, sde(v), 4 * N * STEPS, num_init=4)
            ),
        ),
    }


def lm_samplers() -> dict[str, tuple[str, Callable[..., object]]]:
    model = small_qwen2()
    prompt, key = np.arange(1, 9, dtype=np.int32), jax.random.key(0)
    steps = dict(num_particles=N, max_steps=4, max_step_tokens=8, max_new_tokens=32)

    def tokens(result):
        return result.samples.tokens

    return {
        "particle_filter": (
            "temperature, softmax T",
            lambda v: tokens(
                particle_filter.particle_filter(
                    key,
                    model,
                    prompt,
                    step_scorer,
                    None,
                    temperature=v,
                    softmax_temperature=v,
                    **steps,
                )
            ),
        ),
        "entropic_particle_filter": (
            "temperature",
            lambda v: tokens(
                particle_filter.entropic_particle_filter(
                    key, model, prompt, step_scorer, None, temperature=v, **steps
                )
            ),
        ),
        "particle_gibbs": (
            "temperature",
            lambda v: tokens(
                particle_filter.particle_gibbs(
                    key, model, prompt, step_scorer, None, num_sweeps=2, temperature=v, **steps
                )
            ),
        ),
        "token_smc": (
            "lambda, ESS threshold",
            lambda v: tokens(
                token_smc.token_smc(
                    key,
                    model,
                    prompt,
                    num_particles=N,
                    max_new_tokens=32,
                    potential=even_token_tilt,
                    potential_params=jnp.float32(v),
                    ess_threshold=v,
                )
            ),
        ),
        "best_of_n (LM)": (
            "temperature",
            lambda v: tokens(
                lm_search.best_of_n(key, model, prompt, step_scorer, None, temperature=v, **steps)
            ),
        ),
        "beam_search": (
            "temperature",
            lambda v: tokens(
                lm_search.beam_search(
                    key, model, prompt, step_scorer, None, beam_width=4, temperature=v, **steps
                )
            ),
        ),
        "dvts": (
            "temperature",
            lambda v: tokens(
                lm_search.dvts(
                    key, model, prompt, step_scorer, None, beam_width=4, temperature=v, **steps
                )
            ),
        ),
    }


def main() -> None:
    counter = CompileCounter()
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}; image samplers on the digits "
        f"DiT (N={N}, {STEPS} steps), LM samplers on a 2x64 random Qwen2 (N={N}, 32 tokens)\n"
    )
    print(
        "| sampler | first call (s) | compilations | compile (s) | steady call (s) "
        "| swept | sweep values | compilations in sweep |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for group in (image_samplers, lm_samplers):
        for name, (swept, call) in group().items():
            first, compiles, compile_seconds = counter.measure(lambda call=call: call(1.0))
            steady, _, _ = counter.measure(lambda call=call: call(1.0))
            sweep = sum(counter.measure(lambda call=call, v=v: call(v))[1] for v in SWEEP)
            shared = " (program shared with a row above)" if compiles == 0 else ""
            print(
                f"| {name} | {first:.2f} | {compiles}{shared} | {compile_seconds:.2f} "
                f"| {steady:.3f} | {swept} | {len(SWEEP)} | {sweep} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
