"""Parity of the T5 encoder port (tts_jax.models.t5) with transformers' PyTorch T5EncoderModel.

Tiny random configs (d_model 32, 2 heads of 12, 2 layers, vocab 100; 8 buckets up to distance
16 over 24 tokens so the logarithmic buckets are exercised), every parameter perturbed, saved
with ``save_pretrained``; nothing is downloaded.
"""

import functools
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from tts_jax.models import t5
from tts_jax.models.checkpoint import CheckpointConfigError, TensorMismatchError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 100
SEQ = 24
ATOL = 1e-4
# bfloat16 matmul weights (norms, residual stream, scores, softmax in float32) against float32
# PyTorch, measured on the gated model: last_hidden_state max |diff| 0.039, mean 0.006, for values
# up to 3.5 (bf16 relative step 2**-8 = 0.004, and the output itself is rounded to bf16);
# transformers' own bfloat16 T5 is off by max 0.044, mean 0.008 on the same inputs. The bounds
# leave ~2x headroom.
BF16_ATOL, BF16_MEAN = 0.08, 0.012

TINY = dict(
    vocab_size=VOCAB,
    d_model=32,
    d_kv=12,
    d_ff=48,
    num_layers=2,
    num_heads=2,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    decoder_start_token_id=0,
)
PROJ = {"gated": "gated-gelu", "relu": "relu"}

apply = jax.jit(t5.t5_encoder_apply)


@functools.cache
def _pair(kind, folder):
    torch.manual_seed(0)
    ref = transformers.T5EncoderModel(
        transformers.T5Config(**TINY, feed_forward_proj=PROJ[kind])
    ).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, folder


@pytest.fixture(scope="module", params=sorted(PROJ))
def pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory.getbasetemp() / f"t5_{request.param}")


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    return _pair("gated", tmp_path_factory.getbasetemp() / "t5_gated")


def _ids(seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(2, SEQ)).astype(np.int32)


def _ref(ref, ids, mask=None):
    kw = {} if mask is None else {"attention_mask": torch.from_numpy(mask).long()}
    with torch.no_grad():
        return ref(torch.from_numpy(ids).long(), output_hidden_states=True, **kw)


def test_buckets_match_transformers():
    attn = transformers.models.t5.modeling_t5.T5Attention
    for length, buckets, distance in ((SEQ, 8, 16), (300, 32, 128)):
        rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]
        want = attn._relative_position_bucket(rel, True, buckets, distance).numpy()
        got = t5.relative_position_buckets(length, buckets, distance)
        np.testing.assert_array_equal(got, want)


def test_encoder_parity(pair):
    ref, folder = pair
    model = t5.load_t5_encoder(folder)
    assert model.config.is_gated == (ref.config.feed_forward_proj == "gated-gelu")
    ids = _ids()
    want = _ref(ref, ids)
    got = apply(model, jnp.asarray(ids))
    np.testing.assert_allclose(got.last_hidden_state, want.last_hidden_state, atol=ATOL, rtol=0)
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for ours, theirs in zip(got.hidden_states, want.hidden_states, strict=True):
        np.testing.assert_allclose(ours, theirs, atol=ATOL, rtol=0)


def test_attention_mask(gated):
    ref, folder = gated
    ids = _ids(1)
    mask = (np.arange(SEQ)[None, :] < np.array([[SEQ], [13]])).astype(np.int32)
    got = apply(t5.load_t5_encoder(folder), jnp.asarray(ids), jnp.asarray(mask))
    want = _ref(ref, ids, mask)
    np.testing.assert_allclose(got.last_hidden_state, want.last_hidden_state, atol=ATOL, rtol=0)


def test_tied_embedding_spellings(gated, tmp_path):
    """Folders with only ``encoder.embed_tokens.weight``, or both spellings (older
    transformers), load as the ``shared.weight`` folder of transformers 5 does."""
    ref, folder = gated
    base = t5.load_t5_encoder(folder)
    tensors = load_file(folder / "model.safetensors")
    shared = tensors.pop("shared.weight")
    for name, extra in (("only", {}), ("both", {"shared.weight": shared})):
        dst = tmp_path / name
        dst.mkdir()
        shutil.copy(folder / "config.json", dst)
        all_ = {**tensors, "encoder.embed_tokens.weight": shared, **extra}
        save_file(all_, dst / "model.safetensors", metadata={"format": "pt"})
        model = t5.load_t5_encoder(dst)
        np.testing.assert_array_equal(model.shared.weight[...], base.shared.weight[...])


def test_encoder_of_seq2seq_folder(gated, tmp_path):
    """The encoder of a T5ForConditionalGeneration folder (decoder tensors skipped)."""
    ref, _ = gated
    torch.manual_seed(0)
    full = transformers.T5ForConditionalGeneration(ref.config)
    full.encoder.load_state_dict(ref.encoder.state_dict())
    full.shared.load_state_dict(ref.shared.state_dict())
    full.save_pretrained(tmp_path, safe_serialization=True)
    ids = _ids()
    got = apply(t5.load_t5_encoder(tmp_path), jnp.asarray(ids))
    want = _ref(ref, ids)
    np.testing.assert_allclose(got.last_hidden_state, want.last_hidden_state, atol=ATOL, rtol=0)


def test_bfloat16(gated):
    ref, folder = gated
    model = t5.load_t5_encoder(folder, jnp.bfloat16)
    block = model.encoder.block[0]
    assert block.layer[1].DenseReluDense.wo.weight.dtype == jnp.bfloat16
    assert block.layer[0].layer_norm.weight.dtype == jnp.float32
    ids = _ids()
    got = apply(model, jnp.asarray(ids)).last_hidden_state
    assert got.dtype == jnp.bfloat16
    err = np.abs(np.asarray(got, np.float32) - _ref(ref, ids).last_hidden_state.numpy())
    assert err.max() < BF16_ATOL and err.mean() < BF16_MEAN, (err.max(), err.mean())


def test_sharded_folder_loads_identically(gated, tmp_path):
    ref, folder = gated
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="10KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    a, b = t5.load_t5_encoder(folder), t5.load_t5_encoder(tmp_path)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _edited(folder, dst, **changes):
    shutil.copytree(folder, dst)
    config = json.loads((dst / "config.json").read_text()) | changes
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_errors(gated, tmp_path):
    _, folder = gated
    with pytest.raises(CheckpointConfigError, match="unsupported model_type 'bert'"):
        t5.load_t5_encoder(_edited(folder, tmp_path / "a", model_type="bert"))
    with pytest.raises(CheckpointConfigError, match="unsupported activation 'tanh'"):
        t5.load_t5_encoder(_edited(folder, tmp_path / "b", feed_forward_proj="gated-tanh"))
    with pytest.raises(CheckpointConfigError, match='"d_ff" must be an int'):
        t5.load_t5_encoder(_edited(folder, tmp_path / "c", d_ff=48.5))
    with pytest.raises(TensorMismatchError, match="DenseReluDense.wi_0.weight"):
        t5.load_t5_encoder(_edited(folder, tmp_path / "d", d_ff=40))
    with pytest.raises(TensorMismatchError, match="missing tensor"):  # gated weights, relu config
        t5.load_t5_encoder(_edited(folder, tmp_path / "e", feed_forward_proj="relu"))
