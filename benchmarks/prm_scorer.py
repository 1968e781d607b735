"""Model-card PRM scoring inside the LM samplers: per-step time of the incremental scorer (the
PRM's KV cache kept per particle, each step's re-encoded tokens and ``<extra_0>`` appended:
:func:`tts_jax.app.tasks.math.prm_format.conversation_prm_scorer`) vs the host scorer (the whole
conversation re-rendered, re-tokenized and re-read by the PRM at every step:
:func:`~tts_jax.app.tasks.math.prm_format.prm_host_fn` in
:func:`~tts_jax.samplers.lm.scoring.host_scorer`).

Setup: the tiny random Qwen2 policy and Qwen2.5-Math-PRM-format folders of the tests
(``tests/lm_folders.py``: hidden size 32, 2 layers, a 320-token byte-level BPE), ``N``
particles each holding a solution of ``S`` steps of ~15-25 tokens (different per particle), the
scorers' ``update`` jitted as the samplers call it, once per step with the completions grown by
one step (the same shapes every step: one compile). Reported: the median over ``--repeats``
sweeps of each step's time after a warm-up sweep (which compiles), the first and last step's
times and the mean over steps. Both scorers' rewards are checked equal (``<= 1e-5``) first.
The PRM is tiny, so the times are mostly the host work (tokenization, the callback round trip)
and the per-call overhead; a 7B PRM's forward would add ``O(new tokens)`` per step to the
incremental scorer and ``O(whole conversation)`` to the host one. A measurement, not a test.

    python -m benchmarks.prm_scorer [--particles 8] [--steps 8 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def solutions(n: int, steps: int) -> list[str]:
    """``n`` different solution texts of ``steps`` blank-line separated steps."""
    out = []
    for i in range(n):
        parts = [
            f"Step {k + 1}: add {i + k} and {2 * k + 1}, so the sum is ${3 * k + i + 1}$."
            if (k + i) % 2
            else f"Then $x = {k}$ and $2x = {2 * k}$; the area is {k * k} square units."
            for k in range(steps)
        ]
        out.append("\n\n".join(parts))
    return out


def measure(n: int, steps: int, repeats: int, folders: tuple[Path, Path]) -> None:
    from tts_jax.app.tasks.math import prm_format as F
    from tts_jax.app.tasks.math import prompting as P
    from tts_jax.models.lm_reward import load_reward_model
    from tts_jax.rewards.base import LAST
    from tts_jax.samplers.lm.scoring import host_scorer

    policy, prm_folder = folders
    policy_tok, prm_tok = P.load_tokenizer(policy), P.load_tokenizer(prm_folder)
    _, prm = load_reward_model(prm_folder)
    problem = "What is $1 + 2$? Compute the sum."
    prompt = np.asarray(P.build_prompt(policy_tok, problem), np.int32)
    enders = set(F.separator_token_ids(policy_tok))
    stop = policy_tok.convert_tokens_to_ids("<|im_end|>")
    rows = [P.encode(policy_tok, t) + [stop] for t in solutions(n, steps)]
    length = -(-max(len(r) for r in rows) // 64) * 64
    tokens = np.full((n, length), policy_tok.pad_token_id, np.int32)
    ends = np.zeros((n, length), bool)
    for i, r in enumerate(rows):
        tokens[i, : len(r)] = r
        ends[i, : len(r)] = [t in enders for t in r[:-1]] + [True]
    marks = [np.flatnonzero(e) for e in ends]
    assert all(len(m) == steps for m in marks), [len(m) for m in marks]
    window = int(max(np.diff(np.concatenate([[-1], m])).max() for m in marks))
    lengths = [np.asarray([m[k] + 1 for m in marks], np.int32) for k in range(steps)]
    # what the sampler's buffers hold after step k: nothing written past each row's length
    grown = []
    for k in range(steps):
        written = np.arange(length)[None, :] < lengths[k][:, None]
        step_tokens = np.where(written, tokens, policy_tok.pad_token_id).astype(np.int32)
        grown.append((jnp.asarray(step_tokens), jnp.asarray(ends & written)))

    scorers = {
        "host": (host_scorer(F.prm_host_fn(policy_tok, prm_tok, prm)), None),
        "incremental": (
            F.conversation_prm_scorer(policy_tok, prm_tok),
            F.conversation_params(prm, prm_tok, problem),
        ),
    }
    results, rewards = {}, {}
    for name, (scorer, params) in scorers.items():
        init = jax.jit(scorer.init, static_argnums=(3, 4))
        update = jax.jit(scorer.update, static_argnums=(5, 6))
        prompt_j = jnp.asarray(prompt)

        def sweep():
            state = init(params, prompt_j, None, n, length)
            jax.block_until_ready(state)
            times, scores = [], []
            for k in range(steps):
                start = time.perf_counter()
                tok, marked = grown[k]
                score, state = update(
                    params, state, tok, jnp.asarray(lengths[k]), marked, window, LAST
                )
                jax.block_until_ready((score, state))
                times.append(time.perf_counter() - start)
                scores.append(np.asarray(score))
            return times, np.stack(scores)

        start = time.perf_counter()
        sweep()
        warm = time.perf_counter() - start
        per_step = []
        for _ in range(repeats):
            times, rewards[name] = sweep()
            per_step.append(times)
        med = [statistics.median(t[k] for t in per_step) for k in range(steps)]
        results[name] = (warm, med)
    np.testing.assert_allclose(rewards["incremental"], rewards["host"], atol=1e-5, rtol=0)
    conv = len(F.conversation_parts(prm_tok, problem).head)
    print(
        f"N={n} particles x S={steps} steps, completion buffer {length} tokens, step window "
        f"{window}, PRM head {conv} tokens; rewards equal (<= 1e-5)"
    )
    for name, (warm, med) in results.items():
        print(
            f"  {name:12s} first sweep (compile) {warm:7.2f} s | per step: first "
            f"{1e3 * med[0]:7.2f} ms, last {1e3 * med[-1]:7.2f} ms, mean "
            f"{1e3 * statistics.mean(med):7.2f} ms"
        )
    ratio = statistics.mean(results["host"][1]) / statistics.mean(results["incremental"][1])
    print(f"  host / incremental mean per-step time: {ratio:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--particles", type=int, default=8)
    parser.add_argument("--steps", type=int, nargs="+", default=[8])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    import torch

    from tests.lm_folders import make_policy_folder, make_prm_folder

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        folders = make_policy_folder(Path(root) / "policy"), make_prm_folder(Path(root) / "prm")
        print(f"jax {jax.__version__}, backend {jax.default_backend()}")
        for steps in args.steps:
            measure(args.particles, steps, args.repeats, folders)


if __name__ == "__main__":
    main()
