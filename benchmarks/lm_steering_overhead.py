"""LM steering overhead: tokens/s of particle filtering and token-level SMC vs plain batched
KV-cache decoding (:func:`tts_jax.models.lm.generate`) of the same model and N.

Every method generates the same number of tokens per row (no stop token, so each row does the
full budget) from one shared prompt. Step-level particle filtering uses a free in-graph oracle
scorer, so its ratio isolates step segmentation, weighting, resampling (a gather of the whole KV
cache every step) and bookkeeping; the same filter with a PRM (a random
:class:`~tts_jax.models.lm_reward.RewardModel` of the same size) is reported separately, twice:
``+PRM`` runs a full PRM forward over prompt + completion at every step (``P + L`` tokens per
row and step), ``+cached PRM`` keeps the PRM's KV cache in the particle state and feeds it only
each step's new tokens (:data:`~tts_jax.models.lm_reward.cached_prm_scorer`, same scores).
Token-level SMC resamples by ESS with a tilting potential. Reported: median wall time over
``--repeats`` runs after one warm-up call (which compiles), tokens/s, and the tokens/s ratio to
``generate`` (the median over calls alternating with ``generate``, which cancels slow changes of
the load).
A measurement, not a test.

    python -m benchmarks.lm_steering_overhead [--sizes 16x64,64x256]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.lm_fixtures import even_token_tilt, small_qwen2, step_scorer
from benchmarks.timing import time_call, time_pair
from tts_jax.models import lm
from tts_jax.models.lm_reward import RewardModel, cached_prm_scorer, prm_scorer
from tts_jax.samplers.lm import particle_filter, token_smc


def measure(n: int, new: int, args: argparse.Namespace) -> None:
    """Print the table for ``n`` particles and ``new`` tokens per row."""
    step = args.step_tokens
    model = small_qwen2(args.hidden, args.layers, args.vocab)
    config = model.config
    prm = RewardModel(config, 2, rngs=nnx.Rngs(1))
    prompt = np.arange(1, 9, dtype=np.int32)
    keys = iter(jax.random.split(jax.random.key(0), 10 * (args.repeats + 1)))
    pf_kwargs = dict(
        num_particles=n,
        max_steps=new // step,
        max_step_tokens=step,
        max_new_tokens=new,
        temperature=1.0,
    )

    runs = {
        "generate": lambda: (
            lm.generate(
                model, np.tile(prompt, (n, 1)), next(keys), max_new_tokens=new, temperature=1.0
            ).tokens
        ),
        "particle_filter": lambda: (
            particle_filter.particle_filter(
                next(keys), model, prompt, step_scorer, None, **pf_kwargs
            ).samples.tokens
        ),
        "token_smc": lambda: (
            token_smc.token_smc(
                next(keys),
                model,
                prompt,
                num_particles=n,
                max_new_tokens=new,
                potential=even_token_tilt,
                potential_params=jnp.float32(0.3),
            ).samples.tokens
        ),
        "particle_filter+PRM": lambda: (
            particle_filter.particle_filter(
                next(keys), model, prompt, prm_scorer, prm, **pf_kwargs
            ).samples.tokens
        ),
        "particle_filter+cached PRM": lambda: (
            particle_filter.particle_filter(
                next(keys), model, prompt, cached_prm_scorer, prm, **pf_kwargs
            ).samples.tokens
        ),
    }
    print(
        f"\nN={n}, {new} new tokens per row, steps of {step} tokens, model "
        f"{config.num_hidden_layers}x{config.hidden_size}, vocab {config.vocab_size}, "
        f"backend {jax.default_backend()}"
    )
    generate = runs.pop("generate")
    first, base = time_call(generate, args.repeats)
    print(
        f"{'generate':>26}: {base * 1e3:8.1f} ms  {n * new / base:9.0f} tok/s  "
        f"(first call {first:.1f} s)",
        flush=True,
    )
    for name, run in runs.items():
        first, median, _, ratio = time_pair(run, generate, args.repeats)
        extra = f", {n * (new // step)} PRM scorings per run" if "PRM" in name else ""
        print(
            f"{name:>26}: {median * 1e3:8.1f} ms  {n * new / median:9.0f} tok/s  "
            f"tokens/s ratio to generate {1 / ratio:5.2f}  (first call {first:.1f} s{extra})",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sizes",
        default="16x64,64x256",
        help="comma-separated NxT: particles x new tokens per row",
    )
    parser.add_argument("--step-tokens", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    for size in args.sizes.split(","):
        n, new = (int(v) for v in size.split("x"))
        measure(n, new, args)


if __name__ == "__main__":
    main()
