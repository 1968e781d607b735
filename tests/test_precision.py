"""bfloat16 models: weights, rewards, ESS and log Z stay float32 whatever the model dtype, a
bfloat16 KV cache is lossless for a bfloat16 LM, and each model's bfloat16 outputs are close to
its float32 outputs (docs/precision.md).

Parity metric: ``max |y_bf16 - y_fp32| / max |y_fp32|`` over a batch of inputs, the bfloat16
model holding the float32 weights rounded to bfloat16. bfloat16 keeps 8 significant bits, so one
rounding moves a value by up to ``2^-9 = 0.002`` of itself; a forward pass compounds tens of them
(weights, inputs and outputs of every matmul, residual adds), and the measured errors are 0.3-2%
(``MEASURED``, printed with ``-s``). Each bound is 3x the measured value rounded up: loose enough
for other inputs or XLA versions, tight enough to fail if any part silently ran in the wrong
dtype (a float32 norm or softmax done in bfloat16, or a bfloat16 model secretly computing in
float32, which would give 0).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.tiny_models import filled, tiny_dit, tiny_lm
from tts_jax import interpolants as I
from tts_jax import smc
from tts_jax.models import blip
from tts_jax.models.classifier import load_classifier
from tts_jax.models.dit import load_dit
from tts_jax.models.lm import forward, init_cache, language_model, load_lm
from tts_jax.models.lm_reward import load_reward_model, reward_logits
from tts_jax.models.wrappers import velocity_dit_flow
from tts_jax.models.zoo import asset_path
from tts_jax.rewards.base import Reward
from tts_jax.samplers.image import fk_steering as fk
from tts_jax.samplers.lm import particle_filter

BF16, F32 = jnp.bfloat16, jnp.float32

# model -> (measured max relative error, bound); see the module docstring.
MEASURED = {}
BOUNDS = {  # (max, mean): 3x the measured values, rounded up
    "digits-dit": (0.04, 0.006),  # measured 0.0134, 0.00174
    "arith-lm (llama)": (0.15, 0.01),  # measured 0.0488, 0.00310 (transformers' bf16: 0.03-0.23)
    "arith-prm (qwen2)": (0.05, 0.007),  # measured 0.0144, 0.00217
    "digits-verifier (cnn)": (0.025, 0.008),  # measured 0.0079, 0.00239
    "digits-heldout (mlp)": (0.02, 0.006),  # measured 0.0065, 0.00168
    "blip-vision": (0.02, 0.004),  # measured 0.0059, 0.00110
    "blip-text": (0.025, 0.003),  # measured 0.0078, 0.00091
}


def _rel(low, high) -> tuple[float, float]:
    """(max, mean) of ``|low - high|`` over ``max |high|``."""
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    diff = np.abs(low - high) / np.abs(high).max()
    return float(diff.max()), float(diff.mean())


def _dtypes(module) -> set:
    return {leaf.dtype for leaf in jax.tree.leaves(nnx.state(module))}


def _dit_out(dtype):
    model = load_dit(asset_path("digits-dit"), dtype=dtype)[1]
    size = model.config.sample_size
    x = jax.random.normal(jax.random.key(0), (8, 1, size, size))
    t = jnp.linspace(10.0, 990.0, 8)
    labels = jnp.arange(8) % model.config.null_class
    return model, jax.jit(lambda m, x, t, y: m(x, t, y))(model, x, t, labels)


def _lm_out(dtype, name: str):
    if name == "arith-lm (llama)":
        model = load_lm(asset_path("arith-lm"), dtype=dtype)[1]
    else:
        model = load_reward_model(asset_path("arith-prm"), dtype=dtype)[1]
    n, t = 4, 12
    tokens = jax.random.randint(jax.random.key(1), (n, t), 0, model.config.vocab_size)
    fn = reward_logits if name.startswith("arith-prm") else forward

    @jax.jit
    def run(m, tokens):
        return fn(m, tokens, init_cache(m.config, n, t, dtype))[0]

    return model, run(model, tokens)


def _classifier_out(dtype, name: str):
    clf = load_classifier(asset_path(name.split()[0]), dtype=dtype)
    x = jax.random.uniform(jax.random.key(2), (16, *clf.config.image_shape), minval=-1.0)
    logits, _ = jax.jit(lambda c, x: c(x))(clf, x)
    assert logits.dtype == F32  # outputs are float32 whatever the dtype
    return clf.params, logits


VISION = blip.BlipVisionConfig(
    hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
    image_size=16, patch_size=8,
)  # fmt: skip
TEXT = blip.BlipTextConfig(
    vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
    num_attention_heads=4, max_position_embeddings=16, encoder_hidden_size=32,
)  # fmt: skip


@jax.jit
def _blip(vision, text, pixels, ids, mask):
    image = blip.blip_vision_apply(vision, pixels)
    return image, blip.blip_text_apply(text, ids, mask, image)


def _blip_out(dtype):
    """BLIP's image tokens and the text states cross-attending to them (ImageReward's towers)."""
    vision = filled(lambda: blip.BlipVisionModel(VISION, rngs=nnx.Rngs(0), dtype=dtype), 3, 0.1)
    text = filled(lambda: blip.BlipTextModel(TEXT, rngs=nnx.Rngs(0), dtype=dtype), 4, 0.1)
    pixels = jax.random.normal(jax.random.key(3), (2, 3, 16, 16))
    ids = jax.random.randint(jax.random.key(4), (2, 10), 1, 50)
    mask = jnp.array([[1] * 10, [1] * 7 + [0] * 3])
    return (vision, text), _blip(vision, text, pixels, ids, mask)


def _outputs(name: str, dtype):
    if name == "digits-dit":
        return _dit_out(dtype)
    if name.startswith("arith-"):
        return _lm_out(dtype, name)
    if name.startswith("digits-"):
        return _classifier_out(dtype, name)
    return _blip_out(dtype)


def _check(name: str, low_params, low, high) -> None:
    leaves = low_params if isinstance(low_params, dict) else nnx.state(low_params)
    assert {leaf.dtype for leaf in jax.tree.leaves(leaves)} == {jnp.dtype(BF16)}
    assert np.all(np.isfinite(np.asarray(low, np.float32)))
    MEASURED[name] = worst, mean = _rel(low, high)
    print(f"\n{name}: bf16 vs fp32 relative error max {worst:.4f} mean {mean:.5f}")
    assert 0.0 < worst < BOUNDS[name][0] and mean < BOUNDS[name][1]


@pytest.mark.parametrize("name", [n for n in BOUNDS if not n.startswith("blip")])
def test_bfloat16_outputs_are_close_to_float32(name):
    low_model, low = _outputs(name, BF16)
    _, high = _outputs(name, F32)
    _check(name, low_model, low, high)


def test_bfloat16_blip_towers_are_close_to_float32():
    (vision, text), (image, states) = _blip_out(BF16)
    _, (image32, states32) = _blip_out(F32)
    _check("blip-vision", vision, image, image32)
    _check("blip-text", text, states, states32)


# --------------------------------------------------------------------------- samplers


def _energy(params, x, cond=None):
    """``-scale * mean(x^2)`` per particle (a reward on the float32 samples)."""
    return -params["scale"] * jnp.mean(jnp.square(x.reshape(x.shape[0], -1)), axis=-1)


def _check_float32_and_finite(result):
    for name in ("log_weights", "rewards", "log_evidence"):
        value = getattr(result, name)
        assert value.dtype == F32, name
        assert np.all(np.isfinite(value)), name
    assert result.info.ess.dtype == F32 and np.all(np.isfinite(result.info.ess))


def test_fk_steering_on_a_bfloat16_dit_weights_in_float32_at_lambda_1e4():
    """A bfloat16 DiT steered at lambda = 1e4: the samples (the particle state) stay float32 and
    the log-weights, rewards, ESS and log Z are float32 and finite."""
    flow = velocity_dit_flow(tiny_dit(BF16))
    reward = Reward({"scale": jnp.float32(1.0)}, _energy, "energy")
    result = fk.fk_steering(
        jax.random.key(0),
        flow,
        reward,
        8,
        I.uniform_grid(4),
        I.diffusion("square", 1.0),
        1e4,
        schedule=smc.every(4, 1),
    )
    assert result.samples.dtype == F32 and np.all(np.isfinite(result.samples))
    _check_float32_and_finite(result)


def _first_token_scorer(table, tokens, step_ends):
    return jnp.where(step_ends, table[tokens[:, 2]][:, None], 0.0)


def test_particle_filter_on_a_bfloat16_lm_with_a_bfloat16_cache_weights_in_float32():
    """A bfloat16 LM with a bfloat16 KV cache under the twisted particle filter at softmax
    temperature 1e-4 (potentials ``odds^(1 / 1e-4)``, lambda = 1e4): float32, finite weights,
    rewards and log Z."""
    policy = language_model(tiny_lm("qwen2", BF16), cache_dtype=BF16)
    assert policy.init_cache(2, 4, F32).k[0].dtype == BF16  # the samplers ask for float32
    result = particle_filter.particle_filter(
        jax.random.key(1),
        policy,
        np.array([2, 3], np.int32),
        _first_token_scorer,
        jnp.array([0.2, 0.5, 0.8, 0.35, 0.65], F32),
        num_particles=8,
        max_steps=2,
        max_step_tokens=1,
        max_new_tokens=2,
        softmax_temperature=1e-4,
        weighting="twisted",
        sep_id=1,
        stop_ids=[0],
        pad_id=0,
    )
    _check_float32_and_finite(result)


def test_bfloat16_cache_is_lossless_for_a_bfloat16_lm():
    """Keys and values are computed in the model dtype and read back in it (a prefill writes the
    cache and attends over it), so a bfloat16 LM gives bit-identical logits with a float32 or a
    bfloat16 cache (half the memory)."""
    model = tiny_lm("qwen2", BF16)
    tokens = jax.random.randint(jax.random.key(5), (3, 5), 0, 5)

    @jax.jit
    def run(policy, tokens):
        cache = policy.init_cache(3, 8, F32)
        return policy.prefill(tokens, cache, jnp.array([5, 2, 4], jnp.int32))

    wide, wide_cache = run(language_model(model), tokens)
    narrow, narrow_cache = run(language_model(model, cache_dtype=BF16), tokens)
    assert wide_cache.k[0].dtype == F32 and narrow_cache.k[0].dtype == BF16
    np.testing.assert_array_equal(wide, narrow)
    assert wide.dtype == F32  # logits accumulate in float32
