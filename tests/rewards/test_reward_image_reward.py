"""ImageReward (tts_jax.rewards.image_reward, tts_jax.models.blip) against transformers'
BlipVisionModel + BlipTextModel (the BLIP "med" architecture) and the package's MLP head on a
tiny random config: image tokens, text states and the normalized score; both checkpoint layouts;
named tensor errors; finite gradients. Nothing is downloaded."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax.models.blip import blip_text_apply, blip_vision_apply
from tts_jax.models.checkpoint import TensorMismatchError
from tts_jax.rewards import image_reward as ir
from tts_jax.rewards.clip import CLIPPreprocess, preprocess

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
torch.set_num_threads(1)

ATOL = 1e-4  # tokens / states
SCORE_ATOL = 1e-3
SIZE = 32
VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=SIZE,
    patch_size=8,
    layer_norm_eps=1e-6,
)
TEXT = dict(
    vocab_size=50,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=2,
    num_attention_heads=3,
    max_position_embeddings=16,
    encoder_hidden_size=32,
    layer_norm_eps=1e-12,
    pad_token_id=0,
    bos_token_id=1,
    sep_token_id=3,
)
HEAD = HEAD_V1 = (1024, 128, 64, 16, 1)
# [CLS]=2 ... [SEP]=3, padded with 0 to 10 tokens.
PROMPT = np.array([2, 11, 25, 7, 40, 3, 0, 0, 0, 0], np.int32)


@jax.jit
def _value_and_grad(reward, x):
    """``(reward(x), d sum(reward) / dx)``: one compilation shared by the tests."""
    r, pullback = jax.vjp(reward, x)
    return r, pullback(jnp.ones_like(r))[0]


def _images(seed):
    """``[3, 3, 40, 48]`` in ``[-1, 1]`` (resized and cropped to 32 x 32)."""
    return jax.random.uniform(jax.random.key(seed), (3, 3, 40, 48), minval=-1.0, maxval=1.0)


def _torch_head():
    widths = (TEXT["hidden_size"], *HEAD)
    layers = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
        layers.append(torch.nn.Linear(a, b))
        if i < 3:
            layers.append(torch.nn.Dropout(0.1))
    return torch.nn.Sequential(*layers).eval()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    vision = transformers.BlipVisionModel(transformers.BlipVisionConfig(**VISION)).eval()
    text_config = transformers.BlipTextConfig(**TEXT)  # is_decoder=True: with cross-attention
    text = transformers.BlipTextModel(text_config, add_pooling_layer=False).eval()
    head = _torch_head()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in (vision, text, head):
            for p in module.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    tensors = {f"vision_model.{k}": v for k, v in vision.state_dict().items()}
    tensors |= {f"text_encoder.{k}": v for k, v in text.state_dict().items()}
    tensors |= {f"mlp.layers.{k}": v for k, v in head.state_dict().items()}
    folder = tmp_path_factory.mktemp("image_reward")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    config = {"vision_config": VISION, "text_config": TEXT}
    (folder / "config.json").write_text(json.dumps(config))
    return vision, text, head, folder


def _reference(built, pixels, ids):
    vision, text, head, _ = built
    ids_t = torch.from_numpy(np.broadcast_to(ids, (len(pixels), ids.shape[-1])).copy()).long()
    with torch.no_grad():
        image = vision(torch.from_numpy(np.array(pixels))).last_hidden_state
        states = text(
            ids_t,
            attention_mask=(ids_t != 0).long(),
            encoder_hidden_states=image,
            encoder_attention_mask=torch.ones(image.shape[:-1], dtype=torch.long),
        ).last_hidden_state
        score = (head(states[:, 0]) - ir.MEAN) / ir.STD
    return image.numpy(), states.numpy(), score[:, 0].numpy()


def test_towers_and_score_match_transformers(built):
    model = ir.load_image_reward(built[3])
    pixels = np.random.default_rng(0).standard_normal((2, 3, SIZE, SIZE)).astype(np.float32)
    want_image, want_states, _ = _reference(built, pixels, PROMPT[None])
    image = jax.jit(blip_vision_apply)(model.vision_model, jnp.asarray(pixels))
    np.testing.assert_allclose(image, want_image, atol=ATOL, rtol=0)
    ids = jnp.broadcast_to(jnp.asarray(PROMPT), (2, len(PROMPT)))
    states = jax.jit(blip_text_apply)(model.text_encoder, ids, ids != 0, image)
    np.testing.assert_allclose(states, want_states, atol=ATOL, rtol=0)


def test_reward_matches_reference_and_gradient_is_finite(built):
    reward = ir.image_reward(built[3], PROMPT)
    x = _images(0)
    got, grad = _value_and_grad(reward, x)
    assert got.shape == (3,) and got.dtype == jnp.float32
    pixels = preprocess(x, CLIPPreprocess(shortest_edge=SIZE, crop=(SIZE, SIZE)))
    want = _reference(built, pixels, PROMPT[None])[2]
    np.testing.assert_allclose(got, want, atol=SCORE_ATOL, rtol=0)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0
    bad = np.asarray(_value_and_grad(reward, x.at[2, 1, 3, 3].set(jnp.inf))[0])
    assert bad[2] == -np.inf and np.isfinite(bad[:2]).all()


def test_original_imagereward_layout_loads(built, tmp_path):
    """blip.visual_encoder.* in timm's names, blip.text_encoder.*, unused contrastive heads."""
    from safetensors.numpy import load_file, save_file

    timm = {
        "embeddings.class_embedding": "cls_token",
        "embeddings.position_embedding": "pos_embed",
        "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
        "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
        "post_layernorm.weight": "norm.weight",
        "post_layernorm.bias": "norm.bias",
    }
    parts = {
        "layer_norm1": "norm1",
        "self_attn.qkv": "attn.qkv",
        "self_attn.projection": "attn.proj",
        "layer_norm2": "norm2",
    }
    tensors = load_file(str(built[3] / "model.safetensors"))
    original = {
        "blip.vision_proj.weight": np.zeros((4, 32), np.float32),
        "blip.text_encoder.embeddings.position_ids": np.arange(16)[None],
    }
    for name, value in tensors.items():
        if name.startswith("vision_model."):
            inner = name.removeprefix("vision_model.")
            if inner in timm:
                inner = timm[inner]
            else:
                _, _, i, *rest = inner.split(".")
                sub, leaf = ".".join(rest[:-1]), rest[-1]
                inner = f"blocks.{i}.{parts.get(sub, sub)}.{leaf}"
            original["blip.visual_encoder." + inner] = value
        elif name.startswith("text_encoder."):
            original["blip." + name] = value
        else:
            original[name] = value
    save_file(original, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((built[3] / "config.json").read_text())
    x = _images(1)
    want = _value_and_grad(ir.image_reward(built[3], PROMPT), x)[0]
    got = _value_and_grad(ir.image_reward(tmp_path, PROMPT), x)[0]
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_tensor_errors_are_named(built, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(built[3] / "model.safetensors"))
    tensors.pop("text_encoder.encoder.layer.1.crossattention.self.key.weight")
    tensors["mlp.layers.9.weight"] = np.zeros((1, 1), np.float32)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((built[3] / "config.json").read_text())
    with pytest.raises(TensorMismatchError) as err:
        ir.load_image_reward(tmp_path)
    assert "crossattention.self.key.weight" in str(err.value)
    assert err.value.unexpected == ["mlp.layers.9.weight"]
    with pytest.raises(ValueError, match="tokenizer"):
        ir.image_reward(ir.load_image_reward(built[3]), "a cat")


def test_imagereward_v1_names_match_transformers():
    """ImageReward-v1.0's architecture (the loader's defaults) has transformers' BLIP names and
    shapes (meta tensors, nothing allocated)."""
    from flax import nnx

    from tts_jax.models.blip import BlipTextConfig, BlipVisionConfig

    abstract = nnx.eval_shape(
        lambda: ir.ImageRewardModel(BlipVisionConfig(), BlipTextConfig(), rngs=nnx.Rngs(0))
    )
    got = {
        ir.LAYOUT.name(path): tuple(v.get_value().shape)
        for path, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param))
    }
    vision_config = transformers.BlipVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=224, patch_size=16,
    )  # fmt: skip
    text_config = transformers.BlipTextConfig(vocab_size=30524, encoder_hidden_size=1024)
    with torch.device("meta"):
        vision = transformers.BlipVisionModel(vision_config)
        text = transformers.BlipTextModel(text_config, add_pooling_layer=False)
    want = {f"vision_model.{k}": tuple(v.shape) for k, v in vision.state_dict().items()}
    want |= {f"text_encoder.{k}": tuple(v.shape) for k, v in text.state_dict().items()}
    widths = (768, *HEAD_V1)
    for i, (a, b) in zip((0, 2, 4, 6, 7), zip(widths[:-1], widths[1:], strict=True), strict=True):
        want |= {f"mlp.layers.{i}.weight": (b, a), f"mlp.layers.{i}.bias": (b,)}
    assert got == want
