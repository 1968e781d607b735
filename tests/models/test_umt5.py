"""UMT5 (models.t5 with model_type "umt5": a relative position bias table in every block)
against transformers' UMT5EncoderModel on the tiny Wan text encoder of tests/t2v_folders.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tts_jax.models.t5 import T5Config, load_t5_encoder, t5_encoder_apply

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from tests import t2v_folders as T  # noqa: E402

_FAST = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}


@functools.partial(jax.jit, compiler_options=_FAST)
def _hidden(model_split, ids, mask):
    return t5_encoder_apply(nnx.merge(*model_split), ids, mask).last_hidden_state


@pytest.fixture(scope="session")
def wan(tmp_path_factory):
    return T.tiny_wan(tmp_path_factory)


def test_umt5_matches_transformers_float32_and_bfloat16(wan):
    rng = np.random.default_rng(1)
    vocab = wan.text_encoder.config.vocab_size
    ids = rng.integers(0, vocab, (2, 20)).astype(np.int32)  # 20 tokens: every bucket is used
    mask = np.ones_like(ids)
    mask[1, 9:] = 0  # right padding, as the Wan pipeline pads
    with torch.no_grad():
        ref = wan.text_encoder(
            torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
        ).last_hidden_state.numpy()
    model = load_t5_encoder(wan.folder / "text_encoder")
    assert model.config.position_bias_per_layer
    tables = [b.layer[0].SelfAttention.relative_attention_bias for b in model.encoder.block]
    assert all(t is not None for t in tables)
    out = np.asarray(_hidden(nnx.split(model), ids, mask))
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # T5's rule (the first block's table in every block) is far off: the tables matter.
    for t in tables[1:]:
        t.weight[...] = tables[0].weight[...]
    wrong = np.asarray(_hidden(nnx.split(model), ids, mask))
    assert np.abs(wrong - ref).max() > 1e-2
    # bfloat16 matmuls (norms, bias tables, residual stream and softmax float32): measured
    # 0.040 max abs error on states of max |h| 2.8.
    model16 = load_t5_encoder(wan.folder / "text_encoder", jnp.bfloat16)
    out16 = np.asarray(_hidden(nnx.split(model16), ids, mask)).astype(np.float32)
    err = np.abs(out16 - ref).max()
    assert 0 < err < 0.1, err


def test_model_type_sets_the_per_layer_bias():
    base = {"d_model": 8, "d_kv": 4, "num_heads": 2, "num_layers": 2, "d_ff": 16}
    assert T5Config.from_hf_dict({**base, "model_type": "umt5"}).position_bias_per_layer
    assert not T5Config.from_hf_dict({**base, "model_type": "t5"}).position_bias_per_layer
    with pytest.raises(ValueError, match="unsupported model_type 'bert'"):
        T5Config.from_hf_dict({**base, "model_type": "bert"})
