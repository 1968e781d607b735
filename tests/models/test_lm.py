"""Tests for the Qwen2/Llama LM, its KV cache, generation, checkpoints and reward heads.

Parity references are transformers PyTorch models built from tiny random configs (fixed seeds,
saved with ``save_pretrained(safe_serialization=True)``); nothing is downloaded.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file
from safetensors.numpy import save_file as save_numpy

from tts_jax.models import lm
from tts_jax.models.lm_reward import (
    RewardModel,
    load_reward_model,
    outcome_scores,
    prm_scores,
    save_reward_model,
)

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 96
TINY = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    initializer_range=0.1,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
HF_CONFIGS = {
    # GQA 4:2, tied embeddings, q/k/v bias, non-default rope_theta.
    "qwen2": lambda: transformers.Qwen2Config(
        **TINY,
        intermediate_size=64,
        num_key_value_heads=2,
        rope_theta=1e6,
        tie_word_embeddings=True,
    ),
    # GQA 4:1, head_dim != hidden / heads, all biases, untied head.
    "llama": lambda: transformers.LlamaConfig(
        **TINY,
        intermediate_size=48,
        num_key_value_heads=1,
        head_dim=16,
        rope_theta=5e5,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
    ),
}


def _perturb_torch(module, seed):
    """Random biases and norm weights too, so no parameter is trivially 0 or 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


# Library functions are un-jitted; tests jit them as a sampler would (eager op-by-op is slow).
# Shapes are shared across tests so that each program compiles once.
forward = jax.jit(lm.forward)
hidden_states = jax.jit(lm.hidden_states)
decode_step = jax.jit(lm.decode_step, donate_argnames="cache")


def _tokens(seed, n, t):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, t)).astype(np.int32)


def _full_logits(model, tokens):
    """Logits of a whole batch without a prior cache (right padding is harmless: causal)."""
    n, t = tokens.shape
    hidden, _ = hidden_states(model, jnp.asarray(tokens), lm.init_cache(model.config, n, t))
    return np.asarray(lm.lm_logits(model, hidden))


def _random_model(config, seed=0):
    """Our model with every parameter perturbed (non-trivial biases and norms)."""
    model = lm.LM(config, rngs=nnx.Rngs(seed))
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
    nnx.update(model, jax.tree.unflatten(treedef, noisy))
    return model


@functools.cache
def _build(kind, folder):
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[kind]()).float().eval()
    _perturb_torch(ref, 1)
    ref.save_pretrained(folder, safe_serialization=True)
    config, model = lm.load_lm(folder)
    return ref, folder, config, model


@pytest.fixture(scope="module", params=sorted(HF_CONFIGS))
def hf_pair(request, tmp_path_factory):
    """(torch model, folder, our config, our model) for each architecture."""
    return _build(request.param, tmp_path_factory.getbasetemp() / f"lm_{request.param}")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """The Qwen2 model of ``hf_pair`` (cache mechanics are architecture-independent)."""
    return _build("qwen2", tmp_path_factory.getbasetemp() / "lm_qwen2")[2:]


# ------------------------------------------------------------------ parity with transformers
def test_logits_and_hidden_states_match_transformers(hf_pair):
    ref, _, config, model = hf_pair
    tokens = _tokens(0, 3, 11)
    with torch.no_grad():
        out = ref(torch.from_numpy(tokens).long(), output_hidden_states=True)
    hidden, cache = hidden_states(model, jnp.asarray(tokens), lm.init_cache(config, 3, 11))
    np.testing.assert_allclose(hidden, out.hidden_states[-1].numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(lm.lm_logits(model, hidden), out.logits.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(cache.length, [11, 11, 11])


def test_greedy_generation_matches_transformers(hf_pair):
    ref, _, _, model = hf_pair
    prompt = _tokens(1, 3, 6)
    with torch.no_grad():
        expected = ref.generate(
            torch.from_numpy(prompt).long(), max_new_tokens=32, do_sample=False, pad_token_id=0
        )[:, 6:].numpy()
    out = lm.generate(model, prompt, jax.random.key(0), max_new_tokens=32, temperature=0.0)
    np.testing.assert_array_equal(out.tokens, expected)
    np.testing.assert_array_equal(out.num_tokens, [32, 32, 32])
    assert not out.finished.any()


def test_save_lm_loads_in_transformers(hf_pair, tmp_path):
    _, _, config, _ = hf_pair
    model = _random_model(config)
    lm.save_lm(tmp_path, config, model)
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    tokens = _tokens(2, 3, 11)
    with torch.no_grad():
        expected = ref(torch.from_numpy(tokens).long()).logits.numpy()
    np.testing.assert_allclose(_full_logits(model, tokens), expected, atol=1e-4, rtol=0)
    assert lm.load_lm(tmp_path)[0] == config


# ------------------------------------------------------------------------------ KV cache
def test_incremental_decoding_equals_full_forward_and_skips_inactive_rows(qwen):
    config, model = qwen
    tokens = _tokens(3, 3, 12)
    full = _full_logits(model, tokens)
    cache = lm.init_cache(config, 3, 16)
    chunk, cache = forward(model, jnp.asarray(tokens[:, :4]), cache)
    steps = [chunk]
    for t in range(4, 12):
        logits, cache = decode_step(model, jnp.asarray(tokens[:, t]), cache, jnp.ones((3,), bool))
        steps.append(logits[:, None])
    np.testing.assert_allclose(np.concatenate(steps, axis=1), full, atol=1e-5, rtol=0)
    before = jax.tree.map(np.asarray, cache)
    _, cache = decode_step(model, jnp.zeros((3,), jnp.int32), cache, jnp.array([1, 0, 1], bool))
    np.testing.assert_array_equal(cache.length, [13, 12, 13])
    for got, want in zip(
        jax.tree.leaves((cache.k, cache.v)), jax.tree.leaves((before.k, before.v)), strict=True
    ):
        np.testing.assert_array_equal(got[1], want[1])


def test_gathered_row_continues_exactly_as_its_ancestor(qwen):
    config, model = qwen
    prompt = _tokens(5, 3, 4)
    _, cache = forward(
        model, jnp.asarray(prompt), lm.init_cache(config, 3, 16), jnp.array([4, 2, 3])
    )
    ancestors = jnp.array([2, 2, 0])
    gathered = jax.tree.map(lambda x: x[ancestors], cache)
    cont = jnp.asarray(_tokens(6, 3, 4))
    logits, _ = forward(model, cont, cache)
    logits_g, _ = forward(model, cont[ancestors], gathered)
    np.testing.assert_allclose(logits_g, logits[ancestors], atol=1e-6, rtol=0)
    # And through generate (greedy) from the gathered caches (both caches are donated).
    last = jnp.asarray(prompt[[0, 1, 2], [3, 1, 2]][:, None])
    a = lm.generate(
        model,
        last,
        jax.random.key(0),
        max_new_tokens=6,
        temperature=0.0,
        cache=jax.tree.map(jnp.copy, cache),
    )
    b = lm.generate(
        model, last[ancestors], jax.random.key(0), max_new_tokens=6, temperature=0.0, cache=gathered
    )
    np.testing.assert_array_equal(b.tokens, np.asarray(a.tokens)[np.asarray(ancestors)])


def test_ragged_num_new_matches_per_row_and_leaves_idle_rows_untouched(qwen):
    config, model = qwen
    prefix, chunk = _tokens(7, 3, 4), _tokens(8, 3, 4)
    cache = lm.init_cache(config, 3, 16)
    _, cache = forward(model, jnp.asarray(prefix), cache, jnp.array([2, 4, 3]))
    logits, new = forward(model, jnp.asarray(chunk), cache, jnp.array([4, 2, 0]))
    np.testing.assert_array_equal(new.length, [6, 6, 3])
    for got, want in zip(
        jax.tree.leaves((new.k, new.v)), jax.tree.leaves((cache.k, cache.v)), strict=True
    ):
        np.testing.assert_array_equal(got[2], want[2])
    seqs = np.zeros((3, 12), np.int32)
    for row, (p, c) in enumerate([(2, 4), (4, 2)]):
        seqs[row, : p + c] = np.concatenate([prefix[row, :p], chunk[row, :c]])
    full = _full_logits(model, seqs)
    np.testing.assert_allclose(logits[0], full[0, 2:6], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[1, :2], full[1, 4:6], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- generation
def _generate(model, seed, **kwargs):
    """Every generation test uses these shapes, so generate compiles once for all of them."""
    kwargs = dict(max_new_tokens=32, prompt_lengths=jnp.array([6, 3, 1])) | kwargs
    return lm.generate(model, _tokens(seed, 3, 6), jax.random.key(seed), **kwargs)


def test_ragged_prompts_log_probs_and_pending_token(qwen):
    _, model = qwen
    out = _generate(model, 9, temperature=1.0)
    prompt, lengths = _tokens(9, 3, 6), [6, 3, 1]
    seqs = np.zeros((3, 6 + 32), np.int32)
    for row, p in enumerate(lengths):
        seqs[row, : p + 32] = np.concatenate([prompt[row, :p], np.asarray(out.tokens[row])])
    logp = np.asarray(jax.nn.log_softmax(_full_logits(model, seqs)))
    for row, p in enumerate(lengths):
        expected = logp[row, np.arange(p - 1, p + 31), seqs[row, p : p + 32]]
        np.testing.assert_allclose(out.log_probs[row], expected, atol=1e-5, rtol=0)
    # The cache holds each prompt and all but the pending last token.
    np.testing.assert_array_equal(out.cache.length, np.array(lengths) - 1 + 32)


def test_stop_token_pads_and_leaves_the_stop_token_pending(qwen):
    _, model = qwen
    free = np.asarray(_generate(model, 10, temperature=0.0).tokens)
    # A token whose first occurrence in row 0 is at index k > 0 (tiny random models repeat).
    k = next(i for i in range(1, 32) if free[0, i] not in free[0, :i])
    out = _generate(model, 10, temperature=0.0, eos_id=int(free[0, k]), pad_id=-7)
    assert out.finished[0] and out.num_tokens[0] == k + 1
    np.testing.assert_array_equal(out.tokens[0, : k + 1], free[0, : k + 1])
    assert np.all(np.asarray(out.tokens[0, k + 1 :]) == -7)
    assert out.cache.length[0] == 6 - 1 + k + 1


def test_new_temperature_key_or_eos_compiles_nothing(qwen):
    _, model = qwen
    _generate(model, 11, temperature=0.7, eos_id=3)
    size = lm.generate_program._cache_size()
    _generate(model, 12, temperature=1.3, eos_id=5)
    _generate(model, 13, temperature=0.0, eos_id=5).tokens.block_until_ready()
    assert lm.generate_program._cache_size() == size


def test_sample_token_matches_tempered_softmax_and_is_greedy_at_zero():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=8) * 2.0, jnp.float32)
    tiled = jnp.tile(logits[None], (4000, 1))
    sample = jax.jit(lm.sample_token)
    for temperature in (0.3, 1.0, 2.0):
        tokens = sample(jax.random.key(3), tiled, jnp.float32(temperature))
        freq = np.bincount(np.asarray(tokens), minlength=8) / 4000
        probs = np.asarray(jax.nn.softmax(logits / temperature))
        assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / 4000) + 1e-3)
    per_row = jnp.where(jnp.arange(4000) < 2000, 0.0, 1.0)
    tokens = np.asarray(sample(jax.random.key(4), tiled, per_row))
    assert np.all(tokens[:2000] == int(jnp.argmax(logits)))
    assert len(np.unique(tokens[2000:])) > 1


# ---------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise(qwen):
    config, model = qwen
    with pytest.raises(ValueError, match="do not fit"):
        lm.forward(model, jnp.zeros((1, 9), jnp.int32), lm.init_cache(config, 1, 8))
    cache = lm.init_cache(config, 2, 8)._replace(length=jnp.array([0, 6], jnp.int32))
    with pytest.raises(ValueError, match="overflow"):
        lm.forward(model, jnp.zeros((2, 3), jnp.int32), cache)
    with pytest.raises(ValueError, match="cache slots"):
        lm.generate(
            model,
            jnp.zeros((1, 5), jnp.int32),
            jax.random.key(0),
            max_new_tokens=4,
            cache=lm.init_cache(config, 1, 7),
        )
    with pytest.raises(ValueError, match="P >= 1"):
        lm.generate(model, jnp.zeros((2, 0), jnp.int32), jax.random.key(0), max_new_tokens=4)
    with pytest.raises(ValueError, match="empty prompts"):
        lm.generate(
            model,
            jnp.zeros((2, 3), jnp.int32),
            jax.random.key(0),
            max_new_tokens=4,
            prompt_lengths=jnp.array([3, 0]),
        )


def test_missing_or_mismatched_tensor_is_named(hf_pair, tmp_path):
    path = hf_pair[1]
    tensors = load_file(path / "model.safetensors")
    config_json = (path / "config.json").read_text()
    name = "model.layers.1.mlp.up_proj.weight"
    cases = {
        "missing": {k: v for k, v in tensors.items() if k != name},
        "has shape": tensors | {name: tensors[name][:-1]},
        "unexpected": tensors | {"model.layers.9.mlp.up_proj.weight": tensors[name]},
    }
    for message, broken in cases.items():
        folder = tmp_path / message.replace(" ", "_")
        folder.mkdir()
        (folder / "config.json").write_text(config_json)
        save_numpy(broken, folder / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(ValueError, match=message) as err:
            lm.load_lm(folder)
        assert "layers.1.mlp.up_proj.weight" in str(err.value) or "layers.9" in str(err.value)


def test_pickle_only_folder_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(HF_CONFIGS["qwen2"]().to_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        lm.load_lm(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "gpt2"}, "model_type"),
        ({"use_sliding_window": True, "sliding_window": 16}, "sliding"),
        ({"num_experts": 8}, "mixture-of-experts"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "RoPE"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE"),
        ({"hidden_act": "gelu"}, "silu"),
        ({"architectures": ["Qwen2ForSequenceClassification"]}, "architectures"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, change, message):
    raw = HF_CONFIGS["qwen2"]().to_dict() | {"architectures": ["Qwen2ForCausalLM"]} | change
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=message):
        lm.load_lm(tmp_path)


# ---------------------------------------------------------------------------- reward heads
@pytest.mark.parametrize(
    "architecture, num_labels", [("Qwen2ForProcessRewardModel", 2), ("Qwen2ForRewardModel", 1)]
)
def test_reward_heads_match_a_torch_reference_and_round_trip(tmp_path, architecture, num_labels):
    from safetensors.torch import save_file as save_torch

    hf_config = HF_CONFIGS["qwen2"]()
    torch.manual_seed(0)
    backbone = transformers.Qwen2Model(hf_config).float().eval()
    score = torch.nn.Sequential(
        torch.nn.Linear(32, 32), torch.nn.ReLU(), torch.nn.Linear(32, num_labels)
    )
    _perturb_torch(backbone, 2)
    tensors = {f"model.{k}": v for k, v in backbone.state_dict().items()}
    tensors |= {f"score.{k}": v for k, v in score.state_dict().items()}
    save_torch(
        {k: v.contiguous() for k, v in tensors.items()},
        tmp_path / "model.safetensors",
        metadata={"format": "pt"},
    )
    raw = hf_config.to_dict() | {"architectures": [architecture]}
    (tmp_path / "config.json").write_text(json.dumps(raw))

    tokens = _tokens(13, 2, 10)
    with torch.no_grad():
        ref = score(backbone(torch.from_numpy(tokens).long()).last_hidden_state).numpy()
    config, rm = load_reward_model(tmp_path)
    assert rm.num_labels == num_labels
    if num_labels == 2:
        sep = np.zeros((2, 10), bool)
        sep[:, [3, 9]] = True
        expected = np.where(sep, torch.softmax(torch.from_numpy(ref), -1)[..., 1].numpy(), 0.0)
        got = jax.jit(prm_scores)(rm, jnp.asarray(tokens), jnp.asarray(sep))
    else:
        lengths = np.array([10, 6])
        expected = ref[[0, 1], lengths - 1, 0]
        got = jax.jit(outcome_scores)(rm, jnp.asarray(tokens), jnp.asarray(lengths))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)

    save_reward_model(tmp_path / "saved", config, rm)
    _, again = load_reward_model(tmp_path / "saved")
    assert isinstance(again, RewardModel) and again.num_labels == num_labels
    with pytest.raises(ValueError, match="architectures"):
        lm.load_lm(tmp_path / "saved")
