"""Batched decode throughput: tts-jax ``generate`` vs transformers ``generate`` on CPU.

Both sides run the same random tiny-ish Qwen2 weights (built from a config with a fixed seed,
saved with ``save_pretrained`` and loaded by :func:`tts_jax.models.lm.load_lm`). Each of ``N``
rows samples ``--new-tokens`` tokens at temperature 1 from one shared prompt (transformers:
``num_return_sequences=N``), with no stop token so every row does the full budget. Reported:
median wall time over ``--repeats`` runs after one warm-up (which includes our compile), and
generated tokens per second. A measurement, not a test.

    python benchmarks/lm_decode.py [--batches 1 8 64] [--new-tokens 64] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
import transformers

from tts_jax.models import lm


def make_models(folder: str, args: argparse.Namespace) -> tuple[torch.nn.Module, lm.LM]:
    """The transformers model and ours, with identical weights."""
    config = transformers.Qwen2Config(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=3 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config).float().eval()
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, lm.load_lm(folder)[1]


def median_seconds(run, repeats: int) -> float:
    run()  # warm-up (compiles our program)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_ours(model: lm.LM, prompt: np.ndarray, n: int, new_tokens: int, repeats: int) -> float:
    prompts = np.repeat(prompt, n, axis=0)
    keys = iter(jax.random.split(jax.random.key(0), repeats + 1))

    def run():
        out = lm.generate(model, prompts, next(keys), max_new_tokens=new_tokens, temperature=1.0)
        out.tokens.block_until_ready()

    return median_seconds(run, repeats)


def time_transformers(
    ref: torch.nn.Module, prompt: np.ndarray, n: int, new_tokens: int, repeats: int
) -> float:
    ids = torch.from_numpy(prompt).long()

    def run():
        with torch.no_grad():
            ref.generate(
                ids,
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                num_return_sequences=n,
                pad_token_id=0,
            )

    return median_seconds(run, repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as folder:
        ref, model = make_models(folder, args)
    prompt = np.random.default_rng(0).integers(1, args.vocab, (1, args.prompt_len))
    print(
        f"Qwen2 layout: hidden={args.hidden} layers={args.layers} vocab={args.vocab}; "
        f"prompt={args.prompt_len} new={args.new_tokens}; jax {jax.__version__} "
        f"({jax.default_backend()}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}"
    )
    print(f"{'N':>4} {'tts-jax tok/s':>14} {'transformers tok/s':>19} {'ratio':>7}")
    for n in args.batches:
        tokens = n * args.new_tokens
        ours = tokens / time_ours(model, prompt, n, args.new_tokens, args.repeats)
        theirs = tokens / time_transformers(ref, prompt, n, args.new_tokens, args.repeats)
        print(f"{n:>4} {ours:>14.0f} {theirs:>19.0f} {ours / theirs:>6.2f}x", flush=True)


if __name__ == "__main__":
    main()
