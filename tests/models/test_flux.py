"""Parity of the NNX FLUX.1 transformer against diffusers' PyTorch ``FluxTransformer2DModel``.

Tiny configs (one double-stream and one single-stream block, head size 8 split (2, 2, 4) over the
three RoPE axes), with and without the guidance embedding (FLUX.1-dev / schnell). Weights are
perturbed so that diffusers' zero-initialised layers are exercised.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tts_jax.models.checkpoint import CheckpointConfigError, TensorMismatchError
from tts_jax.models.flux import FluxConfig, flux_apply, load_flux, save_flux

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(
    patch_size=1,
    in_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=8,
    num_attention_heads=2,
    joint_attention_dim=12,  # text widths differ from the model width (16): see
    pooled_projection_dim=20,  # test_text_projections_run_once_per_prompt
    axes_dims_rope=(2, 2, 4),
)
CONFIGS = {"dev": dict(TINY, guidance_embeds=True), "schnell": dict(TINY, guidance_embeds=False)}
N, T = 4, 5  # particles, text tokens
# bf16 parameters and activations against the fp32 model, max |diff| / max |fp32 output|:
# measured 0.0093 on the dev config (0.007-0.008 on earlier variants of these configs; bf16 keeps
# 8 bits of mantissa, ~0.4% per rounding); the bound leaves ~3x headroom.
BF16_REL_TOL = 0.03

# Unoptimised XLA compiles ~3x faster; these tiny programs run in milliseconds either way.
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
_apply = jax.jit(flux_apply, compiler_options=_FAST_COMPILE)


def _torch_model(kwargs):
    torch.manual_seed(0)
    model = diffusers.FluxTransformer2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _image_ids(h, w):
    """The pipeline's ``(0, row, col)`` ids of an ``h x w`` grid of packed tokens."""
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _inputs(name, n=N, h=4, w=4, prompts=1):
    """(packed, timestep, guidance, pooled, text, txt_ids, img_ids)."""
    config = CONFIGS[name]
    rng = np.random.default_rng(1)
    packed = rng.standard_normal((n, h * w, config["in_channels"])).astype(np.float32)
    timestep = np.linspace(0.0, 1.0, n).astype(np.float32)
    guidance = np.linspace(1.0, 5.0, n).astype(np.float32) if config["guidance_embeds"] else None
    pooled = rng.standard_normal((prompts, config["pooled_projection_dim"])).astype(np.float32)
    text = rng.standard_normal((prompts, T, config["joint_attention_dim"])).astype(np.float32)
    return packed, timestep, guidance, pooled, text, np.zeros((T, 3), np.float32), _image_ids(h, w)


def _jnp(inputs):
    return [None if a is None else jnp.asarray(a) for a in inputs]


def _repeat(a, n):
    return np.repeat(a, n // a.shape[0], axis=0)


def _torch_out(model, packed, timestep, guidance, pooled, text, txt_ids, img_ids):
    n = packed.shape[0]
    with torch.no_grad():
        out = model(
            hidden_states=torch.tensor(packed),
            encoder_hidden_states=torch.tensor(_repeat(text, n)),
            pooled_projections=torch.tensor(_repeat(pooled, n)),
            timestep=torch.tensor(timestep),
            img_ids=torch.tensor(img_ids),
            txt_ids=torch.tensor(txt_ids),
            guidance=None if guidance is None else torch.tensor(guidance),
        ).sample
    return out.numpy()


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    """(name, torch model, folder written by diffusers' save_pretrained, loaded fp32 params)."""
    model = _torch_model(CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    _, ours = load_flux(folder)
    return request.param, model, folder, nnx.split(ours)


@pytest.fixture(scope="module")
def outputs(saved):
    """Ours (one shared prompt) and diffusers' (the prompt repeated) on a 4x4 packed grid."""
    name, model, _, params = saved
    inputs = _inputs(name)
    ours = np.asarray(_apply(params, *_jnp(inputs)))
    return inputs, ours, _torch_out(model, *inputs)


def _tol(ref):
    return 1e-4 * max(1.0, np.abs(ref).max())


def test_parity_with_a_shared_prompt(outputs):
    _, ours, ref = outputs
    assert ours.shape == ref.shape == (N, 16, 16)
    np.testing.assert_allclose(ours, ref, atol=_tol(ref), rtol=0)


@pytest.mark.parametrize("saved", ["schnell"], indirect=True)
def test_parity_non_square_with_two_prompts(saved):
    """A 3x5 packed grid (positions up to 4 on the column axis) and one prompt per pair."""
    name, model, _, params = saved
    inputs = _inputs(name, h=3, w=5, prompts=2)
    ours = np.asarray(_apply(params, *_jnp(inputs)))
    ref = _torch_out(model, *inputs)
    assert ours.shape == ref.shape == (N, 15, 16)
    np.testing.assert_allclose(ours, ref, atol=_tol(ref), rtol=0)


def test_parity_at_large_positions(saved, outputs):
    """Position ids of a 128 x 128-token image's corner (and non-zero text ids, as FLUX Kontext
    style pipelines pass): the rotary angles are float32 here, float64 in diffusers."""
    name, model, _, params = saved
    (packed, timestep, guidance, pooled, text, txt_ids, img_ids), _, _ = outputs
    img_ids = img_ids + np.array([1.0, 124.0, 124.0], np.float32)
    txt_ids = txt_ids + np.arange(T, dtype=np.float32)[:, None]
    inputs = (packed, timestep, guidance, pooled, text, txt_ids, img_ids)
    ours = np.asarray(_apply(params, *_jnp(inputs)))
    ref = _torch_out(model, *inputs)
    np.testing.assert_allclose(ours, ref, atol=_tol(ref), rtol=0)


def test_shared_prompt_equals_repeated_prompt(saved, outputs):
    _, _, _, params = saved
    (packed, timestep, guidance, pooled, text, txt_ids, img_ids), ours, _ = outputs
    inputs = (packed, timestep, guidance, _repeat(pooled, N), _repeat(text, N), txt_ids, img_ids)
    repeated = _apply(params, *_jnp(inputs))
    np.testing.assert_allclose(np.asarray(repeated), ours, atol=1e-5, rtol=0)


@pytest.mark.parametrize("saved", ["dev"], indirect=True)
def test_bf16_close_to_fp32(saved, outputs):
    _, _, folder, _ = saved
    inputs, ours, _ = outputs
    _, model16 = load_flux(folder, dtype=jnp.bfloat16)
    state = nnx.state(model16, nnx.Param)
    assert {v.dtype for v in jax.tree.leaves(state)} == {jnp.dtype(jnp.bfloat16)}
    out16 = np.asarray(_apply(nnx.split(model16), *_jnp(inputs)))
    assert out16.dtype == np.float32  # returned in the packed latents' dtype
    rel = np.abs(out16 - ours).max() / np.abs(ours).max()
    assert rel < BF16_REL_TOL, rel


def test_round_trip_and_diffusers_reload(saved, outputs, tmp_path):
    _, _, folder, _ = saved
    inputs, _, ref = outputs
    config, loaded = load_flux(folder)
    save_flux(tmp_path, config, loaded)
    assert load_flux(tmp_path)[0] == config
    theirs = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    mine = load_file(str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert sorted(theirs) == sorted(mine)
    for k in theirs:
        np.testing.assert_array_equal(mine[k], theirs[k], err_msg=k)
    reloaded = diffusers.FluxTransformer2DModel.from_pretrained(tmp_path).eval()
    np.testing.assert_array_equal(_torch_out(reloaded, *inputs), ref)


def test_sharded_save_loads_the_same(saved, outputs, tmp_path):
    _, _, folder, _ = saved
    inputs, ours, _ = outputs
    config, loaded = load_flux(folder)
    save_flux(tmp_path, config, loaded, max_shard_size=20_000)
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    _, sharded = load_flux(tmp_path)
    out = np.asarray(_apply(nnx.split(sharded), *_jnp(inputs)))
    np.testing.assert_array_equal(out, ours)


def test_diffusers_sharded_save_loads_the_same(saved, tmp_path):
    """A folder diffusers' ``save_pretrained(max_shard_size=...)`` shards (and its index)."""
    _, model, folder, params = saved
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _, sharded = load_flux(tmp_path)
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
    bad = _copy_with(folder, tmp_path, lambda c: c.update(_class_name="FluxControlNetModel"))
    with pytest.raises(CheckpointConfigError, match="FluxControlNetModel"):
        load_flux(bad)


def test_mismatched_tensor_shape_is_named(saved, tmp_path):
    _, _, folder, _ = saved
    name = "single_transformer_blocks.0.proj_out.weight"

    def edit(t):
        t[name] = t[name][:, :-1]

    with pytest.raises(TensorMismatchError, match=name.replace(".", r"\.")):
        load_flux(_copy_with(folder, tmp_path, tensor_edit=edit))


@pytest.mark.parametrize(
    "edit, match",
    [
        (dict(axes_dims_rope=(2, 2, 2)), "axes_dims_rope"),
        (dict(axes_dims_rope=(3, 1, 4)), "axes_dims_rope"),
        (dict(num_mode=4), "num_mode"),
        (dict(conditioning_embedding_channels=16), "conditioning_embedding_channels"),
        (dict(_class_name="FluxControlNetModel"), "FluxControlNetModel"),
    ],
)
def test_config_refuses_unsupported_settings(edit, match):
    with pytest.raises(ValueError, match=match):
        FluxConfig.from_dict({"_class_name": "FluxTransformer2DModel", **TINY, **edit})


def test_guidance_must_match_the_config(saved):
    name, _, _, params = saved
    packed, timestep, guidance, *rest = _jnp(_inputs(name))
    wrong = None if guidance is not None else jnp.ones(N)
    with pytest.raises(ValueError, match="guidance"):
        jax.eval_shape(flux_apply, params, packed, timestep, wrong, *rest)


def test_text_projections_run_once_per_prompt(saved):
    """With one prompt for N particles, the prompt tokens ``[1, T, 12]`` and the pooled
    embedding ``[1, 20]`` are projected at batch 1: no ``[N, T, 12]`` / ``[N, 20]`` copy exists."""
    name, _, _, params = saved
    text = str(jax.make_jaxpr(flux_apply)(params, *_inputs(name)))
    assert f"f32[1,{T},12]" in text and "f32[1,20]" in text
    assert f"f32[{N},{T},12]" not in text and f"f32[{N},20]" not in text
