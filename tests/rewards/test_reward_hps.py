"""HPSv2 (tts_jax.rewards.hps): the open_clip state dict mapped onto the NNX CLIP against
open_clip's PyTorch ``CLIP`` on a tiny random config, the preprocessing, the score, named layout
errors and finite gradients.

open_clip's package ``__init__`` imports its torchvision transforms, and its ``utils`` module
imports ``torchvision.ops.misc.FrozenBatchNorm2d`` (unused by a ViT CLIP). Without torchvision
(it is not installed with the CPU torch here: resolving it would replace torch), the model
modules are imported under a stub package and a stub ``torchvision.ops.misc``, both removed from
``sys.modules`` again afterwards.
"""

import functools
import importlib
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax.models.checkpoint import CheckpointError
from tts_jax.models.clip import clip_text_apply, clip_vision_apply
from tts_jax.rewards import hps

torch = pytest.importorskip("torch")
torch.set_num_threads(1)

EMBED_ATOL = 1e-4
SCORE_ATOL = 1e-3
SIZE, CTX = 28, 12
MODEL_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": SIZE, "layers": 2, "width": 32, "head_width": 8, "patch_size": 7},
    "text_cfg": {"context_length": CTX, "vocab_size": 64, "width": 24, "heads": 3, "layers": 2},
}
# Token ids: start 61, words, end-of-text 63 (the largest id, pooled by argmax), padding 0.
PROMPT = np.array([61, 5, 17, 33, 8, 63, 0, 0, 0, 0, 0, 0], np.int32)


@functools.cache
def _open_clip_model_module():
    """``open_clip.model`` (with a stub package / torchvision when torchvision is missing)."""
    if importlib.util.find_spec("torchvision") is not None:
        return importlib.import_module("open_clip.model")
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip is not installed")
    # Settle transformers' (cached) torchvision check first, so the stub never reaches it.
    from transformers import AutoConfig, AutoModel, AutoTokenizer  # noqa: F401
    from transformers.utils.import_utils import is_torchvision_available

    assert not is_torchvision_available()
    before = set(sys.modules)
    package = types.ModuleType("open_clip")
    package.__path__ = list(spec.submodule_search_locations)
    misc = types.ModuleType("torchvision.ops.misc")
    misc.FrozenBatchNorm2d = type("FrozenBatchNorm2d", (torch.nn.Module,), {})
    stubs = {"open_clip": package, "torchvision": types.ModuleType("torchvision")}
    stubs |= {"torchvision.ops": types.ModuleType("torchvision.ops"), "torchvision.ops.misc": misc}
    sys.modules.update(stubs)
    try:
        return importlib.import_module("open_clip.model")
    finally:
        for name in set(sys.modules) - before:
            if name.startswith(("open_clip", "torchvision")):
                del sys.modules[name]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    oc = _open_clip_model_module()
    torch.manual_seed(0)
    ref = oc.CLIP(
        embed_dim=MODEL_CONFIG["embed_dim"],
        vision_cfg=oc.CLIPVisionCfg(**MODEL_CONFIG["vision_cfg"]),
        text_cfg=oc.CLIPTextCfg(**MODEL_CONFIG["text_cfg"]),
    ).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    from safetensors.torch import save_file

    file = tmp_path_factory.mktemp("hps") / "hps_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, str(file))
    model = hps.load_open_clip(file, MODEL_CONFIG)
    return ref, model, file


_call = jax.jit(lambda reward, x: reward(x))


@jax.jit
def _value_and_grad(reward, x):
    """``(reward(x), d sum(reward) / dx)`` in one compilation."""
    r, pullback = jax.vjp(reward, x)
    return r, pullback(jnp.ones_like(r))[0]


def _images(n, h, w, seed):
    return jax.random.uniform(jax.random.key(seed), (n, 3, h, w), minval=-1.0, maxval=1.0)


def test_towers_match_open_clip(built):
    ref, model, _ = built
    pixels = np.random.default_rng(0).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    ids = np.stack([PROMPT, np.roll(PROMPT, 1), PROMPT[::-1].copy()])
    with torch.no_grad():
        want_img = ref.encode_image(torch.from_numpy(pixels)).numpy()
        want_txt = ref.encode_text(torch.from_numpy(ids).long()).numpy()
    got_img = jax.jit(clip_vision_apply)(model, jnp.asarray(pixels)).image_embeds
    got_txt = jax.jit(clip_text_apply)(model, jnp.asarray(ids)).text_embeds
    np.testing.assert_allclose(got_img, want_img, atol=EMBED_ATOL, rtol=0)
    np.testing.assert_allclose(got_txt, want_txt, atol=EMBED_ATOL, rtol=0)
    np.testing.assert_allclose(model.logit_scale[...], ref.logit_scale.item(), rtol=1e-6)


def _reference_score(ref, images):
    """The hpsv2 ``score`` computation on our preprocessed pixels (unit features, diagonal)."""
    pixels = np.array(hps.preprocess(jnp.asarray(images), hps.HPSPreprocess(SIZE)))
    with torch.no_grad():
        img = torch.nn.functional.normalize(ref.encode_image(torch.from_numpy(pixels)), dim=-1)
        txt = torch.nn.functional.normalize(
            ref.encode_text(torch.from_numpy(PROMPT[None]).long()), dim=-1
        )
    return (img @ txt.T)[:, 0].numpy()


def test_score_matches_reference_and_scale(built):
    ref, _, file = built
    images = _images(4, SIZE, SIZE, 1)
    reward = hps.hps_v2(file, PROMPT, model_config=MODEL_CONFIG)
    got = _call(reward, images)
    assert got.shape == (4,) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, _reference_score(ref, images), atol=SCORE_ATOL, rtol=0)
    percent = hps.hps_v2(built[1], PROMPT, scale=100.0)
    np.testing.assert_allclose(_call(percent, images), 100 * np.asarray(got), rtol=1e-5, atol=1e-4)


def test_preprocess_resizes_longest_side_and_pads_black():
    config = hps.HPSPreprocess(size=20)
    x = jnp.ones((1, 3, 10, 40))  # white, 4:1 -> resized to 5 x 20, padded 7 / 8 rows
    out = np.asarray(hps.preprocess(x, config))
    assert out.shape == (1, 3, 20, 20)
    mean = np.asarray(hps.OPENAI_MEAN)[:, None]
    std = np.asarray(hps.OPENAI_STD)[:, None]
    black, white = -mean / std, (1 - mean) / std
    np.testing.assert_allclose(out[0, :, :7, 0], np.broadcast_to(black, (3, 7)), atol=1e-6)
    np.testing.assert_allclose(out[0, :, 7:12, 5], np.broadcast_to(white, (3, 5)), atol=1e-5)
    np.testing.assert_allclose(out[0, :, 12:, 0], np.broadcast_to(black, (3, 8)), atol=1e-6)
    same = hps.preprocess(jnp.zeros((2, 3, 20, 20)), config)  # no resize at the target size
    np.testing.assert_allclose(
        same[:, :, 0, 0], np.broadcast_to((0.5 - mean[:, 0]) / std[:, 0], (2, 3)), atol=1e-6
    )


def test_gradient_finite_and_nan_particle_gets_minus_inf(built):
    _, model, _ = built
    reward = hps.hps_v2(model, PROMPT)
    images = _images(3, 32, 24, 2)  # non-square: resize + pad path
    _, grad = _value_and_grad(reward, images)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).sum() > 0
    bad = images.at[1, 0, 0, 0].set(jnp.nan)
    r = np.asarray(_value_and_grad(reward, bad)[0])
    assert r[1] == -np.inf and np.isfinite(r[[0, 2]]).all()


def test_layout_errors_name_the_keys(built, tmp_path):
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(built[2]))
    tensors.pop("visual.ln_post.weight")
    tensors["visual.extra"] = np.zeros(2, np.float32)
    tensors["text_projection"] = tensors["text_projection"].T.copy()
    save_file(tensors, str(tmp_path / "bad.safetensors"))
    with pytest.raises(hps.OpenCLIPLayoutError) as err:
        hps.load_open_clip(tmp_path / "bad.safetensors", MODEL_CONFIG)
    message = str(err.value)
    for key in (
        "visual.ln_post.weight",
        "visual.extra",
        "text_projection",
        "open_clip model config",
    ):
        assert key in message
    assert err.value.unexpected == ["visual.extra"]
    with pytest.raises(CheckpointError, match="pickle"):
        hps.load_open_clip(tmp_path / "HPS_v2_compressed.pt", MODEL_CONFIG)
    with pytest.raises(ValueError, match="ls_init_value"):
        hps.clip_config_from_open_clip({"vision_cfg": {"ls_init_value": 1e-5}})


def test_text_prompt_needs_a_tokenizer(built):
    with pytest.raises(ValueError, match="tokenizer"):
        hps.hps_v2(built[1], "a cat")


def test_vit_h_14_layout_matches_open_clip():
    """The names and shapes expected for HPSv2's ViT-H-14 are open_clip's (meta tensors)."""
    oc = _open_clip_model_module()
    with torch.device("meta"):
        ref = oc.CLIP(
            embed_dim=hps.VIT_H_14["embed_dim"],
            vision_cfg=oc.CLIPVisionCfg(**hps.VIT_H_14["vision_cfg"]),
            text_cfg=oc.CLIPTextCfg(**hps.VIT_H_14["text_cfg"]),
        )
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    config = hps.clip_config_from_open_clip(hps.VIT_H_14)
    assert hps.open_clip_names(config) == want
    assert (config.vision.num_attention_heads, config.text.num_attention_heads) == (16, 16)
