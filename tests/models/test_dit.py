"""Parity of the NNX DiT against diffusers' PyTorch ``DiTTransformer2DModel`` on tiny configs."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tts_jax.models.dit import DiTConfig, dit_apply, init_dit, load_dit, save_dit, sincos_2d

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

TINY = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=3,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
)
CONFIGS = {
    "learned_sigma": dict(TINY, out_channels=6),
    "plain": dict(TINY, activation_fn="gelu", norm_elementwise_affine=True, patch_size=4),
}


def _torch_dit(kwargs, seed=0):
    """A tiny diffusers DiT with perturbed weights (so zero-initialised layers are exercised)."""
    torch.manual_seed(seed)
    model = diffusers.DiTTransformer2DModel(**kwargs).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def _torch_out(model, x, timestep, labels):
    with torch.no_grad():
        out = model(torch.tensor(x), torch.tensor(timestep), torch.tensor(labels)).sample
    return out.numpy()


def _inputs(n=4, size=8):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 3, size, size)).astype(np.float32)
    timestep = np.array([0.0, 17.5, 500.0, 999.0], np.float32)[:n]
    labels = np.array([0, 3, 9, 10])[:n]  # 10 = the null label
    return x, timestep, labels


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def saved(request, tmp_path_factory):
    """(torch model, folder written by diffusers save_pretrained with safetensors)."""
    model = _torch_dit(CONFIGS[request.param])
    folder = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def test_parity_vector_timesteps_and_labels(saved):
    torch_model, folder = saved
    config, model = load_dit(folder)
    x, timestep, labels = _inputs()
    ours = jax.jit(dit_apply)(nnx.split(model), jnp.asarray(x), timestep, labels)
    ref = _torch_out(torch_model, x, timestep, labels)
    assert ours.shape == ref.shape == (4, config.output_channels, 8, 8)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


def test_parity_scalar_timestep(saved):
    torch_model, folder = saved
    _, model = load_dit(folder)
    x, _, labels = _inputs()
    ours = model(jnp.asarray(x), 250.0, jnp.asarray(labels))
    ref = _torch_out(torch_model, x, np.full(4, 250.0, np.float32), labels)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("size", [16, 4, 9])
def test_parity_at_other_resolutions(saved, size):
    """2x and 0.5x the 8-pixel ``sample_size`` (the positional embedding is rescaled to the
    training grid) and 9 pixels (not a whole number of patches: the remainder is dropped)."""
    torch_model, folder = saved
    config, model = load_dit(folder)
    x, timestep, labels = _inputs(size=size)
    ours = jax.jit(dit_apply)(nnx.split(model), jnp.asarray(x), timestep, labels)
    ref = _torch_out(torch_model, x, timestep, labels)
    side = size // config.patch_size * config.patch_size
    assert ours.shape == ref.shape == (4, config.output_channels, side, side)
    np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "grid, base", [((4, 4), 4), ((8, 8), 4), ((2, 2), 4), ((3, 5), 4), ((6, 2), 3)]
)
def test_positional_embedding_is_diffusers(grid, base):
    from diffusers.models.embeddings import get_2d_sincos_pos_embed

    ref = get_2d_sincos_pos_embed(16, grid, base_size=base, output_type="pt").float().numpy()
    np.testing.assert_allclose(sincos_2d(16, *grid, base), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(8, 16), (4, 6), (1, 1)])
def test_sizes_diffusers_cannot_run_are_refused_by_name(shape):
    model = init_dit(DiTConfig(**CONFIGS["learned_sigma"]))
    x = jnp.zeros((1, 3, *shape))
    with pytest.raises(ValueError, match=f"{shape[0]}x{shape[1]} pixels"):
        model(x, 0.0, 0)


def test_legacy_interpolation_scale_is_ignored_like_diffusers(saved, tmp_path):
    """A ``Transformer2DModel`` config with ``interpolation_scale = 2``: diffusers'
    ``from_pretrained`` builds a ``DiTTransformer2DModel`` (scale 1), and so does ``load_dit``;
    compared at 2x resolution, where the scale would matter."""
    _, folder = saved
    config = json.loads((folder / "config.json").read_text())
    config.update(_class_name="Transformer2DModel", interpolation_scale=2.0)
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(folder / "diffusion_pytorch_model.safetensors", tmp_path)
    reference = diffusers.Transformer2DModel.from_pretrained(tmp_path).eval()
    assert type(reference).__name__ == "DiTTransformer2DModel"
    _, model = load_dit(tmp_path)
    x, timestep, labels = _inputs(size=16)
    ours = model(jnp.asarray(x), timestep, jnp.asarray(labels))
    np.testing.assert_allclose(
        np.asarray(ours), _torch_out(reference, x, timestep, labels), atol=1e-4, rtol=0
    )


def test_save_then_diffusers_from_pretrained(saved, tmp_path):
    torch_model, folder = saved
    config, model = load_dit(folder)
    save_dit(tmp_path, config, model)
    reloaded = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path).eval()
    x, timestep, labels = _inputs()
    np.testing.assert_array_equal(
        _torch_out(reloaded, x, timestep, labels), _torch_out(torch_model, x, timestep, labels)
    )
    assert load_dit(tmp_path)[0] == config


def _corrupt(folder, tmp_path, edit):
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    edit(tensors)
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    return tmp_path


def test_missing_tensor_is_named(saved, tmp_path):
    _, folder = saved
    name = "transformer_blocks.1.attn1.to_k.weight"
    bad = _corrupt(folder, tmp_path, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_dit(bad)


def test_wrong_shape_is_named(saved, tmp_path):
    _, folder = saved
    name = "proj_out_2.weight"

    def edit(t):
        t[name] = t[name][:-1]

    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_dit(_corrupt(folder, tmp_path, edit))


def test_unexpected_tensor_is_named(saved, tmp_path):
    _, folder = saved

    def edit(t):
        t["extra.weight"] = np.zeros(3, np.float32)

    with pytest.raises(ValueError, match=r"extra\.weight"):
        load_dit(_corrupt(folder, tmp_path, edit))


def test_new_weights_do_not_recompile():
    config = DiTConfig(**CONFIGS["learned_sigma"])
    traces = []

    @jax.jit
    def f(params, x):
        traces.append(None)
        return dit_apply(params, x, jnp.zeros(2), jnp.zeros(2, jnp.int32))

    x = jnp.ones((2, 3, 8, 8))
    f(nnx.split(init_dit(config, 0)), x)
    f(nnx.split(init_dit(config, 1)), x)
    assert len(traces) == 1


def test_init_is_adaln_zero():
    model = init_dit(DiTConfig(**CONFIGS["plain"]))
    x, timestep, labels = _inputs()
    assert float(jnp.abs(model(jnp.asarray(x), timestep, labels)).max()) == 0.0


def test_config_rejects_other_models():
    with pytest.raises(ValueError):
        DiTConfig.from_dict({"_class_name": "UNet2DModel", "patch_size": 2})
    with pytest.raises(ValueError):
        DiTConfig(norm_type="layer_norm")
