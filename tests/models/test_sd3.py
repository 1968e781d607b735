"""Parity of the NNX SD3 MMDiT against diffusers' PyTorch ``SD3Transformer2DModel`` (tiny configs).

Two configs: SD3 (plain joint blocks) and SD3.5 (``qk_norm="rms_norm"`` and a dual-attention
first block). Weights are perturbed so that diffusers' zero-initialised layers are exercised.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tts_jax.models.checkpoint import CheckpointConfigError, TensorMismatchError
from tts_jax.models.sd3 import SD3Config, load_sd3, save_sd3, sd3_apply, sincos_grid

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(
    sample_size=8,
    patch_size=2,
    in_channels=4,
    out_channels=4,
    num_layers=2,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,  # text widths differ from the model width (16): see
    caption_projection_dim=16,
    pooled_projection_dim=20,  # test_text_projections_run_once_per_prompt
    pos_embed_max_size=16,
)
CONFIGS = {
    "sd3": TINY,
    "sd35": dict(
        TINY, in_channels=16, out_channels=16, qk_norm="rms_norm", dual_attention_layers=(0,)
    ),
}
N, T = 4, 5  # particles, text tokens
# bf16 parameters and activations against the fp32 model, max |diff| / max |fp32 output|:
# measured 0.0104 on the sd35 config (0.007-0.009 on earlier variants of these configs; bf16
# keeps 8 bits of mantissa, ~0.4% per rounding); the bound leaves ~3x headroom.
BF16_REL_TOL = 0.03

# Unoptimised XLA compiles ~3x faster; these tiny programs run in milliseconds either way.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_apply = jax.jit(sd3_apply, compiler_options=_FAST_COMPILE)


def _torch_model(kwargs):
    torch.manual_seed(0)
    model = diffusers.SD3Transformer2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _inputs(config, n=N, height=8, width=8, prompts=1):
    rng = np.random.default_rng(1)
    latents = rng.standard_normal((n, config["in_channels"], height, width)).astype(np.float32)
    timestep = np.linspace(0.0, 1000.0, n).astype(np.float32)
    text = rng.standard_normal((prompts, T, config["joint_attention_dim"])).astype(np.float32)
    pooled = rng.standard_normal((prompts, config["pooled_projection_dim"])).astype(np.float32)
    return latents, timestep, text, pooled


def _repeat(a, n):
    return np.repeat(a, n // a.shape[0], axis=0)


def _torch_out(model, latents, timestep, text, pooled):
    n = latents.shape[0]
    with torch.no_grad():
        out = model(
            hidden_states=torch.tensor(latents),
            encoder_hidden_states=torch.tensor(_repeat(text, n)),
            pooled_projections=torch.tensor(_repeat(pooled, n)),
            timestep=torch.tensor(timestep),
        ).sample
    return out.numpy()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    """(name, torch model, folder written by diffusers' save_pretrained, loaded fp32 params)."""
    model = _torch_model(CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    config, ours = load_sd3(folder)
    return request.param, model, folder, nnx.split(ours)


@pytest.fixture(scope="module")
def outputs(saved):
    """Ours (one shared prompt) and diffusers' (the prompt repeated) on 8x8 latents."""
    name, model, _, params = saved
    inputs = _inputs(CONFIGS[name])
    ours = np.asarray(_apply(params, *map(jnp.asarray, inputs)))
    return inputs, ours, _torch_out(model, *inputs)


def test_parity_with_a_shared_prompt(outputs):
    _, ours, ref = outputs
    assert ours.shape == ref.shape == (N, ref.shape[1], 8, 8)
    np.testing.assert_allclose(ours, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)


@pytest.mark.parametrize("saved", ["sd3"], indirect=True)
def test_parity_non_square_and_cropped(saved):
    """A 6x10 latent (3x5 patches, cropped off-centre from the 16x16 table) and one prompt per
    pair of particles."""
    name, model, _, params = saved
    inputs = _inputs(CONFIGS[name], height=6, width=10, prompts=2)
    ours = np.asarray(_apply(params, *map(jnp.asarray, inputs)))
    ref = _torch_out(model, *inputs)
    assert ours.shape == ref.shape == (N, ref.shape[1], 6, 10)
    np.testing.assert_allclose(ours, ref, atol=1e-4 * max(1.0, np.abs(ref).max()), rtol=0)


def test_shared_prompt_equals_repeated_prompt(saved, outputs):
    _, _, _, params = saved
    (latents, timestep, text, pooled), ours, _ = outputs
    repeated = _apply(params, latents, timestep, _repeat(text, N), _repeat(pooled, N))
    np.testing.assert_allclose(np.asarray(repeated), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("saved", ["sd35"], indirect=True)
def test_bf16_close_to_fp32(saved, outputs):
    _, _, folder, _ = saved
    inputs, ours, _ = outputs
    _, model16 = load_sd3(folder, dtype=jnp.bfloat16)
    state = nnx.state(model16, nnx.Param)
    assert {v.dtype for v in jax.tree.leaves(state)} == {jnp.dtype(jnp.bfloat16)}
    out16 = np.asarray(_apply(nnx.split(model16), *map(jnp.asarray, inputs)))
    assert out16.dtype == np.float32  # returned in the latents' dtype
    rel = np.abs(out16 - ours).max() / np.abs(ours).max()
    assert rel < BF16_REL_TOL, rel


def test_round_trip_and_diffusers_reload(saved, outputs, tmp_path):
    name, model, folder, params = saved
    inputs, ours, ref = outputs
    config, loaded = load_sd3(folder)
    save_sd3(tmp_path, config, loaded)
    assert load_sd3(tmp_path)[0] == config
    theirs, mine = (
        load_file(str(folder / "diffusion_pytorch_model.safetensors")),
        load_file(str(tmp_path / "diffusion_pytorch_model.safetensors")),
    )
    assert sorted(theirs) == sorted(mine)
    for k in theirs:
        np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)
    reloaded = diffusers.SD3Transformer2DModel.from_pretrained(tmp_path).eval()
    np.testing.assert_array_equal(_torch_out(reloaded, *inputs), ref)


def test_sharded_save_loads_the_same(saved, outputs, tmp_path):
    _, _, folder, params = saved
    inputs, ours, _ = outputs
    config, loaded = load_sd3(folder)
    save_sd3(tmp_path, config, loaded, max_shard_size=20_000)
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    _, sharded = load_sd3(tmp_path)
    out = np.asarray(_apply(nnx.split(sharded), *map(jnp.asarray, inputs)))
    np.testing.assert_array_equal(out, ours)


def test_diffusers_sharded_save_loads_the_same(saved, tmp_path):
    """A folder diffusers' ``save_pretrained(max_shard_size=...)`` shards (and its index)."""
    _, model, folder, params = saved
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _, sharded = load_sd3(tmp_path)
    for a, b in zip(jax.tree.leaves(nnx.state(sharded)), jax.tree.leaves(params[1]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _copy_with(folder, tmp_path, config_edit=None, tensor_edit=None):
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    if config_edit:
        config_edit(config)
    if tensor_edit:
        tensor_edit(tensors)
    (tmp_path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    return tmp_path


def test_unknown_class_name_is_refused(saved, tmp_path):
    _, _, folder, _ = saved
    bad = _copy_with(folder, tmp_path, lambda c: c.update(_class_name="FluxTransformer2DModel"))
    with pytest.raises(CheckpointConfigError, match="FluxTransformer2DModel"):
        load_sd3(bad)


def test_mismatched_tensor_shape_is_named(saved, tmp_path):
    _, _, folder, _ = saved
    name = "transformer_blocks.0.attn.add_k_proj.weight"

    def edit(t):
        t[name] = t[name][:-1]

    with pytest.raises(TensorMismatchError, match=name.replace(".", r"\.")):
        load_sd3(_copy_with(folder, tmp_path, tensor_edit=edit))


@pytest.mark.parametrize(
    "edit, match",
    [
        (dict(qk_norm="layer_norm"), "qk_norm"),
        (dict(caption_projection_dim=32), "caption_projection_dim"),
        (dict(dual_attention_layers=[5]), "dual_attention_layers"),
        (dict(controlnet_conditioning_channels=16), "controlnet_conditioning_channels"),
        (dict(_class_name="SD3ControlNetModel"), "SD3ControlNetModel"),
    ],
)
def test_config_refuses_unsupported_settings(edit, match):
    with pytest.raises(ValueError, match=match):
        SD3Config.from_dict({"_class_name": "SD3Transformer2DModel", **TINY, **edit})


def test_too_many_particles_per_prompt_group_is_refused(saved):
    name, _, _, params = saved
    latents, timestep, text, pooled = _inputs(CONFIGS[name], n=3, prompts=2)
    with pytest.raises(ValueError, match="does not divide"):
        sd3_apply(params, latents, timestep, text, pooled)


def test_text_projections_run_once_per_prompt(saved):
    """With one prompt for N particles, the prompt tokens ``[1, T, 12]`` and the pooled
    embedding ``[1, 20]`` are projected at batch 1: no ``[N, T, 12]`` / ``[N, 20]`` copy exists."""
    name, _, _, params = saved
    inputs = _inputs(CONFIGS[name])
    text = str(jax.make_jaxpr(sd3_apply)(params, *inputs))
    assert f"f32[1,{T},12]" in text and "f32[1,20]" in text
    assert f"f32[{N},{T},12]" not in text and f"f32[{N},20]" not in text


def test_positional_table_is_diffusers():
    """The table a fresh model starts from (loading reads the checkpoint's)."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ref = get_2d_sincos_pos_embed(16, 16, base_size=4, output_type="pt").float().numpy()
    np.testing.assert_allclose(np.asarray(sincos_grid(16, 16, 4)), ref, atol=1e-5, rtol=0)
