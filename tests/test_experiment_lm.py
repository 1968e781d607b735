"""LM experiment runner: method adapters, budget accounting, the oracle scorer, resumable sweeps,
config validation.

A tiny random policy and PRM (1 layer, the real task tokenizer) keep compilation short; the
checks are about records and bookkeeping, not accuracy.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tts_jax.app import experiment_lm as E
from tts_jax.app import runs
from tts_jax.app.tasks.arith_models import eval_problems
from tts_jax.app.tasks.arith_tokenizer import ArithTokenizer
from tts_jax.models import lm
from tts_jax.models.lm_reward import RewardModel
from tts_jax.samplers.lm.state import sequences

N = 2
KEYS = {
    "method",
    "budget",
    "seed",
    "problem",
    "scorer",
    "correct",
    "valid",
    "answer",
    "expected",
    "completion",
    "finished",
    "tokens",
    "nfe",
    "lm_calls",
    "prm_calls",
    "wall_time_s",
}
SMALL = {"max_steps": 2, "max_step_tokens": 4, "max_new_tokens": 8}


def _random(make, seed):
    """``make()``'s module with N(0, 0.5^2) weights around unit norms, filled from NumPy."""
    graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        base = 1.0 if "norm" in jax.tree_util.keystr(path) else 0.0
        return jnp.asarray(base + 0.5 * rng.normal(size=leaf.shape), jnp.float32)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@pytest.fixture(scope="module")
def bundle():
    tokenizer = ArithTokenizer.load()
    config = lm.LMConfig(
        model_type="qwen2",
        vocab_size=tokenizer.vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    policy = _random(lambda: lm.LM(config, rngs=nnx.Rngs(0)), 0)
    prm = _random(lambda: RewardModel(config, 2, rngs=nnx.Rngs(0)), 1)
    return E.make_bundle(policy, tokenizer, prm)


def config(method, n=N, **kwargs):
    return E.LMRunConfig(method=method, num_particles=n, problems=(0, 2), **SMALL, **kwargs)


@pytest.mark.parametrize("method", sorted(E.LM_METHODS))
def test_adapters_return_records_with_budget_accounting(bundle, method):
    n = 2 * E.GIBBS_SWEEPS if method == "gibbs" else N
    summary = E.run_lm(config(method, n), bundle)
    assert [r["problem"] for r in summary["records"]] == [0, 1]
    for r in summary["records"]:
        assert KEYS <= set(r)
        assert r["method"] == method and r["seed"] == 0
        assert r["tokens"] > 0 and r["lm_calls"] > 0 and r["wall_time_s"] > 0
        assert isinstance(r["correct"], bool)
        if E.LM_METHODS[method].uses_scorer:
            assert r["scorer"] == "prm" and r["prm_calls"] >= n
        else:
            assert r["scorer"] == "none" and r["prm_calls"] == 0
    assert summary["budget"] == (1 if method == "greedy" else n)
    assert 0.0 <= summary["correct"] <= 1.0


def test_greedy_is_independent_of_n_and_sampled_methods_share_samples(bundle):
    def strip(records):
        return [{k: v for k, v in r.items() if k != "wall_time_s"} for r in records]

    a, b = (E.run_lm(config("greedy", n), bundle)["records"] for n in (2, 4))
    assert strip(a) == strip(b) and all(r["budget"] == 1 for r in a)
    bon, majority = (E.run_lm(config(m), bundle)["records"] for m in ("bon", "majority"))
    assert [r["tokens"] for r in bon] == [r["tokens"] for r in majority]
    assert all(r["prm_calls"] == N for r in bon)  # scored once at the end


def test_oracle_scores_correct_prefixes_high():
    tokenizer = ArithTokenizer.load()
    problem = eval_problems(1)[0]
    prompt = tokenizer.encode(problem.prompt)
    steps = problem.steps
    wrong = "\n".join([steps[0], steps[1] + "1", *steps[2:], problem.answer_line])
    rows = [
        prompt + tokenizer.encode(text) + [tokenizer.eos_id] for text in (problem.solution, wrong)
    ]
    width = max(map(len, rows))
    ids = np.asarray([r + [tokenizer.pad_id] * (width - len(r)) for r in rows])
    ends = tokenizer.step_end_mask(ids, len(prompt))
    scores = E.oracle_step_scores(tokenizer, ids, ends)
    hit, miss = E.ORACLE_HIT, E.ORACLE_MISS
    np.testing.assert_allclose(scores[0][ends[0]], hit)
    np.testing.assert_allclose(scores[1][ends[1]], [hit] + [miss] * (len(steps)))
    assert not scores[~ends].any()
    for p in eval_problems(50):
        assert E.problem_from_prompt(p.prompt) == p
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        E.problem_from_prompt("Q: 1+=?\n")


class _Completions(NamedTuple):
    """The two fields of an ``LMState`` that ``sequences`` reads."""

    tokens: jax.Array
    step_ends: jax.Array


def test_padded_prompt_sequences_match_the_unpadded_ones():
    prompt = jnp.asarray([5, 6, 7], jnp.int32)
    state = _Completions(
        tokens=jnp.asarray([[8, 9, 0, 0], [1, 2, 3, 4]], jnp.int32),
        step_ends=jnp.asarray([[0, 1, 0, 0], [1, 0, 0, 1]], bool),
    )
    tokens, ends = jax.jit(sequences)(prompt, state)
    padded = jnp.asarray([5, 6, 7, 0, 0], jnp.int32)
    tokens_p, ends_p = jax.jit(sequences)(padded, state, jnp.int32(3))
    np.testing.assert_array_equal(tokens_p[:, :7], tokens)
    np.testing.assert_array_equal(ends_p[:, :7], ends)
    assert not np.asarray(ends_p[:, 7:]).any()


def test_sweep_resumes_and_skips_a_truncated_line(bundle, tmp_path, monkeypatch):
    args = (["greedy", "bon"], [N], [0], [0, 1], tmp_path)
    base = E.LMRunConfig(**SMALL)
    first = E.sweep_lm(*args, base=base, bundle=bundle, progress=False)
    assert len(first) == 4  # greedy once per problem, bon per problem
    calls = []
    original = E.run_problem

    def counting(*a):
        calls.append(a[1])
        return original(*a)

    monkeypatch.setattr(E, "run_problem", counting)
    again = E.sweep_lm(*args, base=base, bundle=bundle, progress=False)
    assert calls == [] and again == first
    path = tmp_path / "runs.jsonl"
    path.write_bytes(path.read_bytes()[:-20])  # a run killed mid-write
    resumed = E.sweep_lm(*args, base=base, bundle=bundle, progress=False)
    assert calls == [1] and len(resumed) == 4 and len(runs.read_jsonl(path)) == 4


def test_bad_configs_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        E.LMRunConfig(method="nope")
    with pytest.raises(ValueError, match="num_particles"):
        E.LMRunConfig(num_particles=0)
    with pytest.raises(ValueError, match="unknown scorer"):
        E.LMRunConfig(scorer="orm")
    with pytest.raises(ValueError, match="gibbs"):
        E.LMRunConfig(method="gibbs", num_particles=2)
    with pytest.raises(ValueError, match="problems"):
        E.LMRunConfig(problems=(3, 3))
    with pytest.raises(ValueError, match="unknown method"):
        E.sweep_lm(["pf", "nope"], [2], [0], [0], tmp_path, progress=False)
    assert not (tmp_path / "runs.jsonl").exists()
