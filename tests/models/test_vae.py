"""Parity of the NNX AutoencoderKL against diffusers' PyTorch model on a tiny random config."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tts_jax.models import checkpoint
from tts_jax.models.vae import (
    VAE_REQUIRED_KEYS,
    VAEConfig,
    load_vae,
    save_vae,
    vae_decode,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    block_out_channels=(8, 16),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=4,
    sample_size=16,
)
# SD3 / FLUX style: 16 latent channels, no quant convs, shift and scale as SD3's, the keys their
# config.json files set.
SD3_STYLE = dict(
    TINY,
    latent_channels=16,
    shift_factor=0.0609,
    scaling_factor=1.5305,
    use_quant_conv=False,
    use_post_quant_conv=False,
    force_upcast=True,
    mid_block_add_attention=True,
    latents_mean=None,
    latents_std=None,
)
# The SD3-style case also covers a shift_factor and absent quant convs (it replaced a 4-channel
# "shifted_no_quant" case: each case costs two compiles, the file must stay fast).
CONFIGS = {"default": TINY, "sd3_style_16ch": SD3_STYLE}
# vae/config.json of the hub's FLUX.1-dev and stable-diffusion-3-medium-diffusers.
_REAL_BLOCKS = dict(
    block_out_channels=[128, 256, 512, 512],
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
)
REAL_CONFIGS = {
    "flux": {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.30.0.dev0",
        "_name_or_path": "../checkpoints/flux-dev",
        "act_fn": "silu",
        **_REAL_BLOCKS,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 16,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": 2,
        "mid_block_add_attention": True,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 1024,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    },
    "sd3": {
        "_class_name": "AutoencoderKL",
        "_diffusers_version": "0.29.0.dev0",
        "act_fn": "silu",
        **_REAL_BLOCKS,
        "force_upcast": True,
        "in_channels": 3,
        "latent_channels": 16,
        "latents_mean": None,
        "latents_std": None,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "out_channels": 3,
        "sample_size": 1024,
        "scaling_factor": 1.5305,
        "shift_factor": 0.0609,
        "use_post_quant_conv": False,
        "use_quant_conv": False,
    },
}
# bfloat16 parameters and compute against float32, max abs over the decoded images: measured
# 0.038 (mean 0.0067) on the tiny 16-channel VAE, documented in tts_jax/models/vae.py.
BF16_DECODE_ATOL = 0.06


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**CONFIGS[request.param]).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _images():
    return np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)


def _latents(channels=4):
    return np.random.default_rng(1).standard_normal((2, channels, 8, 8)).astype(np.float32)


@pytest.fixture(scope="module")
def loaded(saved):
    """``(config, vae)`` of the saved folder, loaded once per config."""
    return load_vae(saved[1])


@jax.jit
def _encode(params, images):
    """``(mean, logvar, encode_latents)``, one compile per config (eager NNX dispatch is slower
    than one compile)."""
    vae = nnx.merge(*params)
    return *vae.encode(images), vae.encode_latents(images)


_decode_jit = jax.jit(vae_decode)


def _decode(vae, latents):
    return np.asarray(_decode_jit(nnx.split(vae), jnp.asarray(latents)), np.float32)


def test_encoder_parity(saved, loaded):
    torch_model, _ = saved
    _, vae = loaded
    with torch.no_grad():
        post = torch_model.encode(torch.tensor(_images())).latent_dist
    mean, logvar, _ = _encode(nnx.split(vae), jnp.asarray(_images()))
    np.testing.assert_allclose(np.asarray(mean), post.mean.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logvar), post.logvar.numpy(), atol=1e-4, rtol=0)


def test_decoder_parity_with_scaling(saved, loaded):
    torch_model, _ = saved
    config, vae = loaded
    latents = _latents(config.latent_channels)
    shift = config.shift_factor or 0.0
    with torch.no_grad():
        raw = torch.tensor(latents / config.scaling_factor + shift)
        ref = torch_model.decode(raw).sample.numpy()
    ours = _decode(vae, latents)
    assert ours.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_encode_latents_inverts_scaling(loaded):
    config, vae = loaded
    mean, _, scaled = _encode(nnx.split(vae), jnp.asarray(_images()))
    expected = (mean - (config.shift_factor or 0.0)) * config.scaling_factor
    np.testing.assert_allclose(np.asarray(scaled), np.asarray(expected), rtol=1e-6)


def test_save_then_diffusers_from_pretrained(saved, loaded, tmp_path):
    torch_model, _ = saved
    config, vae = loaded
    save_vae(tmp_path, config, vae)
    reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    z = torch.tensor(_latents(config.latent_channels))
    with torch.no_grad():
        np.testing.assert_array_equal(
            reloaded.decode(z).sample.numpy(), torch_model.decode(z).sample.numpy()
        )
    assert load_vae(tmp_path)[0] == config


def test_missing_tensor_is_named(saved, tmp_path):
    _, folder = saved
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    name = "decoder.up_blocks.0.upsamplers.0.conv.weight"
    del tensors[name]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_vae(tmp_path)


def test_config_rejects_unsupported_blocks():
    with pytest.raises(ValueError):
        VAEConfig(down_block_types=("AttnDownEncoderBlock2D",))


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_real_sd3_and_flux_configs_are_accepted(name, tmp_path):
    raw = REAL_CONFIGS[name]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = checkpoint.read_config(
        tmp_path, "load_vae", VAEConfig.from_dict, schema=VAEConfig, required=VAE_REQUIRED_KEYS
    )
    assert config.latent_channels == 16 and config.block_out_channels == (128, 256, 512, 512)
    assert config.shift_factor == raw["shift_factor"]
    assert config.scaling_factor == raw["scaling_factor"]
    assert not config.use_quant_conv and not config.use_post_quant_conv
    assert config.latents_mean is None and config.force_upcast


@pytest.fixture(scope="module")
def sd3_style(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**SD3_STYLE).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("sd3_style")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def test_bfloat16_decode_close_to_float32(sd3_style):
    _, folder = sd3_style
    _, vae32 = load_vae(folder)
    _, vae16 = load_vae(folder, dtype=jnp.bfloat16)
    assert vae16.dtype == jnp.bfloat16 and vae32.dtype == jnp.float32
    latents = _latents(16)
    out16 = _decode_jit(nnx.split(vae16), jnp.asarray(latents))
    assert out16.dtype == jnp.bfloat16
    ref = _decode(vae32, latents)
    err = np.abs(np.asarray(out16, np.float32) - ref)
    print(f"bf16 vs fp32 decode: max {err.max():.4f}, mean {err.mean():.5f}")
    assert err.max() < BF16_DECODE_ATOL, f"max {err.max():.4f}, mean {err.mean():.4f}"


def test_bfloat16_stored_weights_load(sd3_style, tmp_path):
    """A folder stored in bfloat16 (as FLUX's is) loads in float32 and matches diffusers' own
    float32 load of it."""
    _, folder = sd3_style
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    bf16 = {k: v.astype(jnp.bfloat16) for k, v in tensors.items()}
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(bf16, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    config, vae = load_vae(tmp_path)
    assert vae.dtype == jnp.float32
    reference = diffusers.AutoencoderKL.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    latents = _latents(16)
    with torch.no_grad():
        raw = torch.tensor(latents / config.scaling_factor + config.shift_factor)
        ref = reference.decode(raw).sample.numpy()
    np.testing.assert_allclose(_decode(vae, latents), ref, atol=1e-4, rtol=0)


def test_load_vae_refuses_non_float_dtype(sd3_style):
    with pytest.raises(ValueError, match="float dtype"):
        load_vae(sd3_style[1], dtype=jnp.int32)
