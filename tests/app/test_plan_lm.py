"""The LM memory plan (tts_jax.app.plan_lm, ``tts-jax plan`` on a policy + PRM pair).

On a tiny Qwen2 pair (configs only, the layout of the shipped qwen2.5-math-1.5b+prm-7b) one
plan is made through the command line's parser and handler (unoptimised compiles: the numbers
checked do not depend on it): the planned weights and KV caches equal the bytes of the real
modules and of the caches the particle filter's ``init`` materialises; the compiled step's
arguments equal its inputs; the largest particle count that fits agrees with the per-N rows.
The shipped 1.5B / 7B configs parse and give the published parameter counts (no compile).
"""

import contextlib
import dataclasses
import io
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro
from flax import nnx

from tests.helpers import random_module
from tts_jax.app import plan as P
from tts_jax.app import plan_lm as L
from tts_jax.models.lm import LM, LMConfig, init_cache, read_lm_config
from tts_jax.models.lm_reward import REWARD_ARCHITECTURES, RewardModel

_FAST = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}
PARTICLES = (1, 2, 4)
PROMPT, NEW, STEP = 8, 16, 4
POLICY = LMConfig(
    model_type="qwen2",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    max_position_embeddings=64,
)
PRM = LMConfig(
    model_type="qwen2",
    vocab_size=64,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    max_position_embeddings=64,
)


def _write(folder, config, architecture):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config.to_hf_dict(architecture)))


@pytest.fixture(scope="module")
def pair_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plan_lm")
    _write(root / "policy", POLICY, "Qwen2ForCausalLM")
    _write(root / "prm", PRM, "Qwen2ForProcessRewardModel")
    pair = root / "pair"
    pair.mkdir()
    (pair / L.PAIR_FILE).write_text(json.dumps({"policy": "../policy", "prm": "../prm"}))
    return pair


@pytest.fixture(scope="module")
def tiny_plan(pair_dir):
    """The plan of the tiny pair through ``tts-jax plan``'s parser and handler, and what it
    printed."""
    args = ["--config", str(pair_dir), "--dtype", "float32", "--particles"]
    args += [str(n) for n in PARTICLES]
    args += ["--max-new-tokens", str(NEW), "--prompt-length", str(PROMPT)]
    args += ["--max-step-tokens", str(STEP)]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(L, "COMPILER_OPTIONS", _FAST)
        plan = P.run_plan(tyro.cli(P.Plan, args=args))
    return plan, out.getvalue()


def _nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def test_planned_bytes_equal_the_materialised_modules_and_caches(tiny_plan):
    plan, _ = tiny_plan
    policy = random_module(lambda: LM(POLICY, rngs=nnx.Rngs(0)), 0)
    prm = random_module(lambda: RewardModel(PRM, 2, rngs=nnx.Rngs(0)), 1)
    assert plan.policy_weight_bytes == _nbytes(nnx.state(policy, nnx.Param))
    assert plan.prm_weight_bytes == _nbytes(nnx.state(prm, nnx.Param))
    # The caches the particle filter's init really allocates, at the largest N.
    n = PARTICLES[-1]
    real = L.AbstractLMPair("real", policy, prm, jnp.float32)
    sampler, _, _, params = L.pf_step_inputs(real, n, PROMPT, NEW, STEP)
    init = jax.jit(sampler.init).lower(jax.random.key(0), params).compile(_FAST)
    state = init(jax.random.key(0), params).smc.particles.state
    row = plan.rows[-1]
    assert plan.kv_bytes(n) == (_nbytes(state.cache), _nbytes(state.scorer_state.cache))
    assert (row.policy_kv_bytes, row.prm_kv_bytes) == plan.kv_bytes(n)
    # The default PRM feeding is the model-card conversation: head + 2 x L positions.
    assert plan.prm_positions == PROMPT + 2 * NEW and row.prm_kv_bytes == L.kv_cache_bytes(
        PRM, n, PROMPT + 2 * NEW, jnp.float32
    )
    # Fed the policy's own tokens (cached_prm_scorer), the PRM cache has the policy's length.
    cached = dataclasses.replace(plan, scoring=L.PRM_SCORINGS["cached"])
    _, _, carry, _ = L.pf_step_inputs(plan.pair, n, PROMPT, NEW, STEP, scoring=cached.scoring)
    prm_cache = carry.smc.particles.state.scorer_state.cache
    assert (
        cached.kv_bytes(n)[1]
        == L._bytes(prm_cache)
        == L.kv_cache_bytes(PRM, n, PROMPT + NEW, jnp.float32)
    )
    # The analytic formula in another dtype against a cache allocated in it.
    assert L.kv_cache_bytes(PRM, 3, 10, jnp.bfloat16) == _nbytes(
        init_cache(PRM, 3, 10, jnp.bfloat16)
    )
    assert plan.checks() == {"weights": True, "kv": True, "arguments": True}
    for r in plan.rows:
        assert (
            r.argument_bytes == r.input_bytes >= plan.weight_bytes + sum(plan.kv_bytes(r.particles))
        )
        assert r.alias_bytes == r.state_bytes  # the donated carry is updated in place


def test_largest_particle_count_agrees_with_the_rows(tiny_plan):
    plan, _ = tiny_plan
    estimates = [plan.accelerator_bytes(r) for r in plan.rows]
    assert estimates == sorted(estimates) and estimates[0] < estimates[-1]
    for r in plan.rows:
        assert plan.estimate_at(r.particles) == plan.accelerator_bytes(r)
        # float32: the compiled weights are the planned ones; the donated state is in place
        assert plan.accelerator_bytes(r) == r.peak_bytes
    capacities = sorted({c + d for c in estimates for d in (-1, 0, 1)} | {plan.weight_bytes})
    capacities.append(10 * estimates[-1])
    largest = [plan.max_particles(c) for c in capacities]
    assert largest == sorted(largest)  # monotone in the capacity
    assert largest[0] == 0 and largest[-1] > PARTICLES[-1]  # extrapolated
    for cap, top in zip(capacities, largest, strict=True):
        for r in plan.rows:
            assert plan.fits(r, cap) == (r.particles <= top), (cap, r.particles, top)
        assert plan.estimate_at(top + 1) > cap
        assert top == 0 or plan.estimate_at(top) <= cap


def test_command_line_prints_the_table(tiny_plan):
    _, printed = tiny_plan
    assert printed.count("\n| ") == len(PARTICLES) + 1
    assert "fits 80 GiB GPU" in printed and "Largest N that fits" in printed
    assert "weights yes, kv yes, arguments yes" in printed


def test_bad_input_is_named(pair_dir):
    with pytest.raises(ValueError, match="unknown LM plan config 'qwen-9000'"):
        L.abstract_pair("qwen-9000")
    with pytest.raises(ValueError, match="unknown plan config 'qwen-9000'"):
        P.run_plan(P.Plan(config="qwen-9000"))
    with pytest.raises(ValueError, match="particles must be positive"):
        L.memory_plan_lm(pair_dir, (4, 0))
    with pytest.raises(ValueError, match="particles must be positive"):
        L.memory_plan_lm(pair_dir, ())
    with pytest.raises(ValueError, match="exceeds the policy's max_position_embeddings = 64"):
        L.memory_plan_lm(pair_dir, (1,), 60, prompt_length=8)
    with pytest.raises(ValueError, match="token_ratio must be >= 1"):
        L.PRMScoring(token_ratio=0)
    with pytest.raises(ValueError, match="--height do not apply"):
        P.run_plan(P.Plan(config=str(pair_dir), height=512))
    with pytest.raises(ValueError, match="--max-new-tokens, --prm-scoring do not apply"):
        P.run_plan(P.Plan(config="flux-dev", max_new_tokens=16, prm_scoring="cached"))


def test_prm_that_is_not_a_prm_is_refused(pair_dir, tmp_path):
    pair = tmp_path / "swapped"
    pair.mkdir()
    (pair / L.PAIR_FILE).write_text(
        json.dumps({"policy": str(pair_dir / "../policy"), "prm": str(pair_dir / "../policy")})
    )
    with pytest.raises(ValueError, match="unsupported architectures"):
        L.abstract_pair(pair)


def test_shipped_lm_configs_parse():
    """The shipped configs give the published sizes: 1,543,714,304 parameters for
    Qwen2.5(-Math)-1.5B; the PRM-7B is Qwen2.5-7B (7,615,616,512) without its LM head plus the
    two-layer score head; head_dim 128 for both."""
    folder = L.CONFIGS
    _, policy = read_lm_config(folder / "qwen2.5-math-1.5b-instruct", L.CAUSAL_LMS, loader="t")
    arch, prm = read_lm_config(folder / "qwen2.5-math-prm-7b", REWARD_ARCHITECTURES, loader="t")
    assert arch == "Qwen2ForProcessRewardModel" and REWARD_ARCHITECTURES[arch] == 2
    assert policy.head_dim == prm.head_dim == 128
    assert (policy.num_key_value_heads, prm.num_key_value_heads) == (2, 4)
    assert L.parameter_count(policy) == 1_543_714_304
    h, v = prm.hidden_size, prm.vocab_size
    assert L.parameter_count(prm, 2) == 7_615_616_512 - v * h + (h * h + h) + (2 * h + 2)
    assert P.plan_kind("qwen2.5-math-1.5b+prm-7b") == "lm" and P.plan_kind("flux-dev") == "t2i"
    # 2 x 28 layers x 2 kv heads x 128 x 2560 positions x 4 bytes (+ the int32 length).
    assert L.kv_cache_bytes(policy, 1, 2560, np.float32) == 2 * 28 * 2 * 128 * 2560 * 4 + 4


def test_bfloat16_plan_swaps_the_compiled_float32_weights(tiny_plan, pair_dir):
    """A bfloat16 plan compiles with float32 weights (no XLA CPU weight copies) and counts its
    own weights instead: the same rows, half the weight bytes."""
    plan, _ = tiny_plan
    half = L.abstract_pair(pair_dir, jnp.bfloat16)
    bf16 = dataclasses.replace(plan, pair=half, dtype="bfloat16")
    assert 2 * bf16.weight_bytes == plan.weight_bytes == plan.rows[0].compiled_weight_bytes
    assert bf16.checks()["weights"]
    for r in plan.rows:
        assert bf16.accelerator_bytes(r) == r.peak_bytes - bf16.weight_bytes
