"""Parity of the NNX AutoencoderKL against diffusers' PyTorch model on a tiny random config."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tts_jax.models.vae import VAEConfig, load_vae, save_vae, vae_decode

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
CONFIGS = {"default": TINY, "shifted_no_quant": dict(TINY, shift_factor=0.25, use_quant_conv=False)}


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


def _latents():
    return np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)


def test_encoder_parity(saved):
    torch_model, folder = saved
    _, vae = load_vae(folder)
    with torch.no_grad():
        post = torch_model.encode(torch.tensor(_images())).latent_dist
    mean, logvar = vae.encode(jnp.asarray(_images()))
    np.testing.assert_allclose(np.asarray(mean), post.mean.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logvar), post.logvar.numpy(), atol=1e-4, rtol=0)


def test_decoder_parity_with_scaling(saved):
    torch_model, folder = saved
    config, vae = load_vae(folder)
    latents = _latents()
    shift = config.shift_factor or 0.0
    with torch.no_grad():
        raw = torch.tensor(latents / config.scaling_factor + shift)
        ref = torch_model.decode(raw).sample.numpy()
    ours = jax.jit(vae_decode)(nnx.split(vae), jnp.asarray(latents))
    assert ours.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_encode_latents_inverts_scaling(saved):
    _, folder = saved
    config, vae = load_vae(folder)
    mean, _ = vae.encode(jnp.asarray(_images()))
    scaled = vae.encode_latents(jnp.asarray(_images()))
    expected = (mean - (config.shift_factor or 0.0)) * config.scaling_factor
    np.testing.assert_allclose(np.asarray(scaled), np.asarray(expected), rtol=1e-6)


def test_save_then_diffusers_from_pretrained(saved, tmp_path):
    torch_model, folder = saved
    config, vae = load_vae(folder)
    save_vae(tmp_path, config, vae)
    reloaded = diffusers.AutoencoderKL.from_pretrained(tmp_path).eval()
    z = torch.tensor(_latents())
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
