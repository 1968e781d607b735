"""models.wan (Wan 2.1 WanTransformer3DModel) against diffusers on the tiny random folder of
tests/t2v_folders.py: the velocity in float32 and bfloat16 on [N, C, F, H, W] latents with a
prompt shared by the particles, and the named errors for bad latents and configs."""

import jax
import numpy as np
import pytest
from flax import nnx

from tts_jax.models import checkpoint
from tts_jax.models.wan import WanConfig, load_wan, wan_apply

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from tests import t2v_folders as T  # noqa: E402

# Unoptimised XLA compiles several times faster; the tiny programs run in milliseconds anyway.
_FAST = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}
_apply = jax.jit(wan_apply, compiler_options=_FAST)


@pytest.fixture(scope="session")
def wan(tmp_path_factory):
    return T.tiny_wan(tmp_path_factory)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    # F = 3 frames, a 4 x 6 latent: a 3 x 2 x 3 token grid (every RoPE band sees > 1 position)
    x = rng.standard_normal((2, T.LATENT_CHANNELS, 3, 4, 6)).astype(np.float32)
    t = np.array([999.0, 321.5], np.float32)
    states = rng.standard_normal((1, 7, T.TEXT_DIM)).astype(np.float32)  # one shared prompt
    return x, t, states


def test_velocity_matches_diffusers_float32_and_bfloat16(wan, inputs):
    x, t, states = inputs
    ref = T.torch_velocity(wan.transformer, x, t, np.repeat(states, 2, axis=0))
    _, model = load_wan(wan.folder / "transformer")
    out = np.asarray(_apply(nnx.split(model), x, t, states))
    assert out.shape == x.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    # bfloat16 weights and activations (norms, tables, softmax float32): measured 0.014 max
    # abs error on outputs of max |v| 2.5 (8 bits of mantissa through 2 blocks).
    _, model16 = load_wan(wan.folder / "transformer", jax.numpy.bfloat16)
    out16 = np.asarray(_apply(nnx.split(model16), x, t, states)).astype(np.float32)
    err = np.abs(out16 - ref).max()
    assert 0 < err < 0.05, err
    assert model16.blocks[0].attn1.to_q.weight.dtype == jax.numpy.bfloat16
    assert model16.blocks[0].scale_shift_table.dtype == np.float32
    assert model16.condition_embedder.time_embedder.linear_1.weight.dtype == np.float32


def test_bad_latents_are_named(wan, inputs):
    _, model = load_wan(wan.folder / "transformer")
    x, t, states = inputs
    with pytest.raises(ValueError, match=r"multiples of the patch size \(1, 2, 2\): width 5"):
        model(x[..., :5], t, states)
    with pytest.raises(ValueError, match=r"need 4 channels"):
        model(x[:, :3], t, states)
    with pytest.raises(ValueError, match=r"\[N, C, F, H, W\]"):
        model(x[:, :, 0], t, states)
    with pytest.raises(ValueError, match="per-token timesteps"):
        model(x, np.zeros((2, 3), np.float32), states)


def test_image_conditioning_and_other_configs_are_refused(wan, tmp_path):
    base = {**T.tiny_transformer_config(), "_class_name": "WanTransformer3DModel"}
    with pytest.raises(ValueError, match="image_dim=1280: the image-to-video CLIP image"):
        WanConfig.from_dict({**base, "image_dim": 1280})
    with pytest.raises(ValueError, match="qk_norm"):
        WanConfig.from_dict({**base, "qk_norm": "rms_norm"})
    with pytest.raises(ValueError, match="unsupported WanTransformer3DModel config keys"):
        WanConfig.from_dict({**base, "window_size": [-1, -1]})
    folder = tmp_path / "transformer"
    folder.mkdir()
    for f in (wan.folder / "transformer").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = T.json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(T.json.dumps({**config, "added_kv_proj_dim": 16}))
    with pytest.raises(checkpoint.CheckpointConfigError, match="load_wan: config.json in .*"):
        load_wan(folder)
    (folder / "config.json").write_text(T.json.dumps({**config, "ffn_dim": 41}))
    with pytest.raises(checkpoint.TensorMismatchError, match="ffn.net.0.proj.weight"):
        load_wan(folder)
