"""Parity of the CLIP port (tts_jax.models.clip) with transformers' PyTorch CLIP.

Tiny random configs (hidden 32, 2 layers, 2 heads, vocab 100, 32 x 32 images in 8 x 8 patches),
every parameter perturbed so no norm is trivially 1 / 0, saved with ``save_pretrained`` and read
by our loaders; nothing is downloaded. float32 outputs agree with PyTorch within 1e-4.
"""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax.models import clip
from tts_jax.models.checkpoint import CheckpointConfigError, TensorMismatchError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 100
SEQ = 12
ATOL = 1e-4
# bfloat16 (parameters and matmuls; norms, scores and softmax in float32) against float32
# PyTorch, measured on these tiny models: hidden_states[-2] 0.017, text_embeds 0.019,
# image_embeds 0.014 (values of size ~1-2: bf16 keeps 8 significant bits, relative step
# 2**-8 = 0.004, compounded over 2 layers); logits_per_image 0.05 (they are multiplied by
# exp(logit_scale) ~ 14). The bounds leave about 2x headroom.
BF16_ATOL = {"hidden[-2]": 0.04, "text_embeds": 0.04, "image_embeds": 0.04, "logits": 0.1}

TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=16,
    projection_dim=24,
    bos_token_id=0,
    pad_token_id=1,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=32,
    patch_size=8,
    projection_dim=24,
)
EOS = 97  # the first-occurrence rule (any id but 2)

apply_text = jax.jit(clip.clip_text_apply)
apply_vision = jax.jit(clip.clip_vision_apply)
apply_clip = jax.jit(clip.clip_apply)


def _perturb(module, seed):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _save(model, folder, **kw):
    _perturb(model, 1)
    model.eval().save_pretrained(folder, safe_serialization=True, **kw)
    return model


def _ids(eos, seed=0):
    """Rows of ordinary ids in [3, 90) with an end-of-text token at various positions, padded
    after it with the pad id (legacy: the end-of-text id is the largest id, 99)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 90, size=(3, SEQ))
    for row, end in enumerate((SEQ - 1, 4, 7)):
        ids[row, end] = eos
        ids[row, end + 1 :] = 1
    if eos != 2:
        ids[2, 9] = eos  # a second occurrence: the first one is pooled
    return ids.astype(np.int32)


@functools.cache
def _text_pair(kind, folder):
    torch.manual_seed(0)
    if kind == "bare_legacy":  # FLUX-style CLIPTextModel, eos_token_id 2, quick_gelu
        config = transformers.CLIPTextConfig(**TEXT, eos_token_id=2, hidden_act="quick_gelu")
        ref = _save(transformers.CLIPTextModel(config), folder)
    else:  # SD3-style projection model, first-occurrence eos, exact gelu
        config = transformers.CLIPTextConfig(**TEXT, eos_token_id=EOS, hidden_act="gelu")
        ref = _save(transformers.CLIPTextModelWithProjection(config), folder)
    return ref, folder


@pytest.fixture(scope="module", params=["bare_legacy", "projection"])
def text_pair(request, tmp_path_factory):
    return _text_pair(request.param, tmp_path_factory.getbasetemp() / f"clip_{request.param}")


@functools.cache
def _clip_pair(folder):
    torch.manual_seed(0)
    # The towers' configs equal those of the single-tower tests, so compiles are shared.
    config = transformers.CLIPConfig(
        text_config=dict(TEXT, eos_token_id=EOS, hidden_act="gelu"),
        vision_config=dict(VISION, hidden_act="gelu"),
        projection_dim=24,
    )
    return _save(transformers.CLIPModel(config), folder), folder


@pytest.fixture(scope="module")
def clip_pair(tmp_path_factory):
    return _clip_pair(tmp_path_factory.getbasetemp() / "clip_full")


def _pixels(seed=0):
    return np.random.default_rng(seed).standard_normal((2, 3, 32, 32)).astype(np.float32)


def _close(ours, ref, atol=ATOL):
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    np.testing.assert_allclose(np.asarray(ours, np.float32), ref, atol=atol, rtol=0)


def test_text_parity(text_pair):
    ref, folder = text_pair
    eos = ref.config.eos_token_id
    ids = _ids(eos)
    model = clip.load_clip_text(folder)
    projection = isinstance(ref, transformers.CLIPTextModelWithProjection)
    assert isinstance(model, clip.CLIPTextModelWithProjection) == projection
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long(), output_hidden_states=True)
    got = apply_text(model, jnp.asarray(ids))
    _close(got.last_hidden_state, want.last_hidden_state)
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    _close(clip.sd3_prompt_embeds(got), want.hidden_states[-2])  # SD3's prompt embedding
    _close(clip.sd3_prompt_embeds(got, clip_skip=1), want.hidden_states[-3])
    for ours, theirs in zip(got.hidden_states, want.hidden_states, strict=True):
        _close(ours, theirs)
    if projection:
        _close(got.text_embeds, want.text_embeds)  # SD3's pooled embedding
        pooled = ref.text_model(torch.from_numpy(ids).long()).pooler_output
    else:
        assert got.text_embeds is None
        pooled = want.pooler_output  # FLUX's pooled embedding
    _close(got.pooler_output, pooled)
    positions = np.asarray(clip.eos_positions(jnp.asarray(ids), eos))
    expected = [SEQ - 1, 4, 7] if eos != 2 else list(np.argmax(ids, axis=1))
    assert positions.tolist() == expected


def test_text_attention_mask(tmp_path_factory):
    ref, folder = _text_pair("projection", tmp_path_factory.getbasetemp() / "clip_projection")
    ids = _ids(ref.config.eos_token_id, seed=1)
    mask = (np.arange(SEQ)[None, :] <= np.array([[SEQ - 1], [4], [7]])).astype(np.int32)
    model = clip.load_clip_text(folder)
    with torch.no_grad():
        want = ref(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())
    got = apply_text(model, jnp.asarray(ids), jnp.asarray(mask))
    _close(got.last_hidden_state, want.last_hidden_state)


def test_clip_model_parity(clip_pair):
    ref, folder = clip_pair
    ids, pixels = _ids(EOS), _pixels()
    model = clip.load_clip(folder)
    with torch.no_grad():
        want = ref(
            input_ids=torch.from_numpy(ids).long(),
            pixel_values=torch.from_numpy(pixels),
            output_hidden_states=True,
        )
    got = apply_clip(model, jnp.asarray(ids), jnp.asarray(pixels))
    assert got.logits_per_image.shape == (2, 3)
    _close(got.logits_per_image, want.logits_per_image)
    _close(got.logits_per_text, want.logits_per_text)
    _close(got.text_embeds, want.text_embeds)
    _close(got.image_embeds, want.image_embeds)
    vision, vision_ref = got.vision_model_output, want.vision_model_output
    _close(vision.last_hidden_state, vision_ref.last_hidden_state)
    _close(vision.hidden_states[0], vision_ref.hidden_states[0])
    # transformers 5 replaces CLIPModel's tower pooler_output by the projected embedding.
    _close(vision.image_embeds, vision_ref.pooler_output)
    _close(got.text_model_output.text_embeds, want.text_model_output.pooler_output)


def test_single_towers_from_clip_folder(clip_pair):
    """load_clip_text / load_clip_vision read one tower (and its projection) of a CLIPModel."""
    ref, folder = clip_pair
    ids, pixels = _ids(EOS), _pixels()
    text = clip.load_clip_text(folder)
    vision = clip.load_clip_vision(folder)
    assert isinstance(text, clip.CLIPTextModelWithProjection)
    assert isinstance(vision, clip.CLIPVisionModelWithProjection)
    with torch.no_grad():
        t = ref.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output
        v = ref.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output
    _close(apply_text(text, jnp.asarray(ids)).text_embeds, t)
    _close(apply_vision(vision, jnp.asarray(pixels)).image_embeds, v)


def test_vision_model_folders(tmp_path):
    """Bare (unprefixed in transformers 5) and projection vision folders."""
    torch.manual_seed(0)
    config = transformers.CLIPVisionConfig(**VISION, hidden_act="gelu")
    pixels = _pixels(1)
    for cls in (transformers.CLIPVisionModel, transformers.CLIPVisionModelWithProjection):
        folder = tmp_path / cls.__name__
        ref = _save(cls(config), folder)
        model = clip.load_clip_vision(folder)
        assert type(model).__name__ == cls.__name__
        with torch.no_grad():
            want = ref(torch.from_numpy(pixels))
        got = apply_vision(model, jnp.asarray(pixels))
        _close(got.last_hidden_state, want.last_hidden_state)
        if cls is transformers.CLIPVisionModel:
            _close(got.pooler_output, want.pooler_output)
        else:
            _close(got.image_embeds, want.image_embeds)


def test_bfloat16(clip_pair):
    ref, folder = clip_pair
    ids, pixels = _ids(EOS), _pixels()
    model = clip.load_clip(folder, jnp.bfloat16)
    assert model.text_model.encoder.layers[0].mlp.fc1.weight.dtype == jnp.bfloat16
    assert model.logit_scale.dtype == jnp.float32
    with torch.no_grad():
        want = ref(
            input_ids=torch.from_numpy(ids).long(),
            pixel_values=torch.from_numpy(pixels),
            output_hidden_states=True,
        )
    got = apply_clip(model, jnp.asarray(ids), jnp.asarray(pixels))
    text = got.text_model_output
    errors = {
        "hidden[-2]": np.abs(
            np.asarray(text.hidden_states[-2], np.float32)
            - want.text_model_output.hidden_states[-2].numpy()
        ).max(),
        "text_embeds": np.abs(
            np.asarray(text.text_embeds, np.float32) - want.text_model_output.pooler_output.numpy()
        ).max(),
        "image_embeds": np.abs(
            np.asarray(got.vision_model_output.image_embeds, np.float32)
            - want.vision_model_output.pooler_output.numpy()
        ).max(),
        "logits": np.abs(np.asarray(got.logits_per_image) - want.logits_per_image.numpy()).max(),
    }
    assert all(errors[k] < BF16_ATOL[k] for k in errors), errors


def test_legacy_position_ids_buffers(clip_pair, tmp_path):
    """Files of transformers < 4.31 carry the position_ids buffers; they are skipped."""
    import shutil

    from safetensors.numpy import load_file, save_file

    _, folder = clip_pair
    shutil.copy(folder / "config.json", tmp_path)
    tensors = load_file(folder / "model.safetensors")
    tensors["text_model.embeddings.position_ids"] = np.arange(16)[None]
    tensors["vision_model.embeddings.position_ids"] = np.arange(17)[None]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    a, b = clip.load_clip(folder), clip.load_clip(tmp_path)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert isinstance(clip.load_clip_text(tmp_path), clip.CLIPTextModelWithProjection)


def test_sharded_folder_loads_identically(clip_pair, tmp_path):
    ref, folder = clip_pair
    ref.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    a, b = clip.load_clip(folder), clip.load_clip(tmp_path)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _edit_config(folder, dst, **changes):
    import shutil

    shutil.copytree(folder, dst)
    config = json.loads((dst / "config.json").read_text())
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_config_errors(text_pair, clip_pair, tmp_path):
    _, folder = text_pair
    bad = _edit_config(folder, tmp_path / "t5", model_type="t5")
    with pytest.raises(CheckpointConfigError, match="unsupported model_type 't5'"):
        clip.load_clip_text(bad)
    bad = _edit_config(folder, tmp_path / "act", hidden_act="swish")
    with pytest.raises(CheckpointConfigError, match="unsupported activation 'swish'"):
        clip.load_clip_text(bad)
    bad = _edit_config(folder, tmp_path / "layers", num_hidden_layers="two")
    with pytest.raises(CheckpointConfigError, match='"num_hidden_layers" must be an int'):
        clip.load_clip_text(bad)
    with pytest.raises(CheckpointConfigError, match="unsupported model_type 'clip_text_model'"):
        clip.load_clip(folder)
    _, full = clip_pair
    bad = _edit_config(full, tmp_path / "nested", **{"vision_config.hidden_act": "tanh"})
    with pytest.raises(CheckpointConfigError, match="unsupported activation 'tanh'"):
        clip.load_clip(bad)


def test_tensor_shape_mismatch(clip_pair, tmp_path):
    _, folder = clip_pair
    bad = _edit_config(folder, tmp_path / "wide", projection_dim=16)
    with pytest.raises(TensorMismatchError, match="text_projection.weight"):
        clip.load_clip(bad)
