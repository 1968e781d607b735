"""CLIP-family rewards (tts_jax.rewards.clip): preprocessing vs transformers' CLIP image
processor, CLIPScore / PickScore / LAION aesthetic vs a PyTorch reference, finite gradients.

A tiny random CLIPModel (32 x 32 images in 8 x 8 patches, projection 24) stands in for the real
checkpoints; nothing is downloaded.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax.models.checkpoint import CheckpointConfigError
from tts_jax.rewards import clip as rclip

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

# Our float pipeline vs the PIL processor on the same uint8 images: PIL resamples uint8 images in
# two passes (horizontal, then vertical) and rounds each pass to uint8, so its result carries up
# to ~1.5 uint8 steps of rounding (half a step per pass, the first amplified by the bicubic
# filter's negative lobes); one step is 1 / 255 / std = 0.015 after normalization (std ~0.26).
# Measured on smooth random images (downscale 1.33x to 8x, upscale 1.6x, no resize): max |diff|
# 0.011-0.023, mean 0.004, mean signed difference < 2e-4 (no bias). The bound is two
# uint8 steps, 2 / 255 / 0.2613 = 0.030.
PIL_ATOL, PIL_MEAN = 0.03, 0.006
REWARD_ATOL = 1e-3
SIZE = 32

TEXT = dict(
    vocab_size=100,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=16,
    eos_token_id=97,
    bos_token_id=0,
    pad_token_id=1,
)
VISION = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=SIZE,
    patch_size=8,
)
PROMPT = np.array([0, 5, 17, 33, 8, 97, 1, 1, 1, 1, 1, 1], np.int32)
HEAD_WIDTHS = (24, 1024, 128, 64, 16, 1)


def _processor():
    return transformers.CLIPImageProcessorPil(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
    )


def _save_tokenizer(folder):
    """A tiny CLIP BPE tokenizer: single letters, no merges; <|startoftext|> = 96 and
    <|endoftext|> = 97 (also the pad token), matching the model's eos_token_id."""
    import json

    letters = "abcdefghijklmnopqrstuvwxyz"
    tokens = [*letters, *(c + "</w>" for c in letters)]
    tokens += [f"unused{i}" for i in range(96 - len(tokens))]
    vocab = {t: i for i, t in enumerate([*tokens, "<|startoftext|>", "<|endoftext|>"])}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = transformers.CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    tokenizer.save_pretrained(folder)


@functools.cache
def _build(folder):
    torch.manual_seed(0)
    config = transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=24)
    ref = transformers.CLIPModel(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    ref.save_pretrained(folder, safe_serialization=True)
    _processor().save_pretrained(folder)
    _save_tokenizer(folder)
    head = torch.nn.Sequential(
        torch.nn.Linear(24, 1024),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(1024, 128),
        torch.nn.Dropout(0.2),
        torch.nn.Linear(128, 64),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(64, 16),
        torch.nn.Linear(16, 1),
    ).eval()
    from safetensors.torch import save_file

    save_file({f"layers.{k}": v for k, v in head.state_dict().items()}, folder / "head.safetensors")
    return ref, head, folder


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return _build(tmp_path_factory.getbasetemp() / "reward_clip")


def _smooth_images(n, h, w, seed):
    """uint8 [n, h, w, 3]: low-frequency random images plus mild noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.uniform(0, 1, size=(n, 3, 5, 6)).astype(np.float32)
    up = F.interpolate(torch.from_numpy(coarse), size=(h, w), mode="bilinear", align_corners=True)
    img = up.numpy() + 0.03 * rng.standard_normal((n, 3, h, w))
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)


def test_preprocess_matches_pil_processor(built):
    _, _, folder = built
    config = rclip.load_preprocess(folder)
    assert config.shortest_edge == SIZE and config.crop == (SIZE, SIZE)
    processor = _processor()
    for (h, w), seed in (((48, 64), 0), ((200, 150), 1), ((20, 28), 2)):
        images = _smooth_images(2, h, w, seed)
        want = processor(images=list(images), return_tensors="np")["pixel_values"]
        x = jnp.asarray(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
        got = np.asarray(jax.jit(rclip.preprocess, static_argnums=1)(x, config))
        assert got.shape == want.shape == (2, 3, SIZE, SIZE)
        np.testing.assert_allclose(got, want, atol=PIL_ATOL, rtol=0)
        assert np.abs(got - want).mean() < PIL_MEAN


def test_preprocessor_config_errors(built, tmp_path):
    (tmp_path / rclip.PREPROCESSOR_NAME).write_text('{"resample": 2}')
    with pytest.raises(CheckpointConfigError, match="only bicubic"):
        rclip.load_preprocess(tmp_path)
    (tmp_path / rclip.PREPROCESSOR_NAME).write_text('{"crop_size": "big"}')
    with pytest.raises(CheckpointConfigError, match='"crop_size" must be'):
        rclip.load_preprocess(tmp_path)


def _torch_image_embeds(ref, x):
    """The reference: processor-like float preprocessing in PyTorch, then CLIP."""
    x01 = (torch.from_numpy(x) + 1) / 2
    h, w = x.shape[2:]
    size = (SIZE, int(SIZE * w / h)) if h <= w else (int(SIZE * h / w), SIZE)
    x01 = F.interpolate(x01, size=size, mode="bicubic", antialias=True, align_corners=False)
    x01 = x01.clamp(0, 1)
    top, left = (size[0] - SIZE) // 2, (size[1] - SIZE) // 2
    x01 = x01[:, :, top : top + SIZE, left : left + SIZE]
    mean = torch.tensor(transformers.image_utils.OPENAI_CLIP_MEAN)[None, :, None, None]
    std = torch.tensor(transformers.image_utils.OPENAI_CLIP_STD)[None, :, None, None]
    with torch.no_grad():
        emb = ref.get_image_features(pixel_values=(x01 - mean) / std).pooler_output
    return emb / emb.norm(dim=-1, keepdim=True)


def _images():
    """Three [-1, 1] images of 40 x 52 (resized to 32 x 41, cropped) and one with a NaN."""
    x = _smooth_images(4, 40, 52, 3).transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0
    x[3, 1, 5, 7] = np.nan
    return x


@jax.jit
def _value_and_grad_jit(reward, x):
    def total(x):
        r = reward(x)
        return jnp.sum(jnp.where(jnp.isfinite(r), r, 0.0)), r

    (_, r), g = jax.value_and_grad(total, has_aux=True)(x)
    return r, g


def _value_and_grad(reward, x):
    """Rewards and the gradient of their finite sum (one compile per reward structure: the
    CLIPScore and PickScore rewards share it)."""
    r, g = _value_and_grad_jit(reward, jnp.asarray(x))
    return np.asarray(r), np.asarray(g)


def _check(r, g, want):
    np.testing.assert_allclose(r[:3], want, atol=REWARD_ATOL, rtol=0)
    assert r[3] == -np.inf  # the particle with a NaN pixel
    assert np.isfinite(g).all() and np.abs(g[:3]).max() > 0


def test_clip_score_and_pickscore(built):
    ref, _, folder = built
    x = _images()
    image = _torch_image_embeds(ref, x[:3])
    with torch.no_grad():
        text = ref.get_text_features(input_ids=torch.from_numpy(PROMPT[None]).long()).pooler_output
    cos = (image @ (text / text.norm(dim=-1, keepdim=True)).T)[:, 0].numpy()

    # Unclamped CLIPScore (w * cos, tests every particle's gradient) and the clamped form.
    r, g = _value_and_grad(rclip.clip_score(folder, PROMPT, clamp=False), x)
    _check(r, g, 2.5 * cos)
    assert (cos > 0).all()
    clamped = rclip.clip_score(folder, PROMPT)
    r, g = _value_and_grad(clamped, x)
    np.testing.assert_allclose(r[:3], 2.5 * cos, atol=REWARD_ATOL, rtol=0)
    # The opposite text direction: every cosine negative, clamped to 0 (zero gradient).
    flipped = clamped.replace(params={**clamped.params, "text": -clamped.params["text"]})
    r, g = _value_and_grad(flipped, x)
    assert (r[:3] == 0).all() and (g == 0).all()

    r, g = _value_and_grad(rclip.pickscore(folder, PROMPT), x)
    _check(r, g, ref.logit_scale.exp().item() * cos)


def test_text_prompt_uses_the_folder_tokenizer(built):
    ref, _, folder = built
    ids = rclip.tokenize(folder, "a cat", 16)
    assert ids.tolist() == [[96, 26, 2, 0, 45, 97] + [97] * 10]
    reward = rclip.pickscore(folder, "a cat")
    with torch.no_grad():
        text = ref.get_text_features(input_ids=torch.from_numpy(ids).long()).pooler_output[0]
    want = (text / text.norm()).numpy()
    np.testing.assert_allclose(reward.params["text"], want, atol=1e-5, rtol=0)


def test_laion_aesthetic(built):
    ref, head, folder = built
    x = _images()
    with torch.no_grad():
        want = head(_torch_image_embeds(ref, x[:3]))[:, 0].numpy()
    reward = rclip.laion_aesthetic(folder, folder / "head.safetensors")
    widths = [reward.params["head"].l0.weight.shape[1]] + [
        getattr(reward.params["head"], f"l{i}").weight.shape[0] for i in (0, 2, 4, 6, 7)
    ]
    assert tuple(widths) == HEAD_WIDTHS
    r, g = _value_and_grad(reward, x)
    _check(r, g, want)
