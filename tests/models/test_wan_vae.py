"""Wan 2.1's causal video VAE (tts_jax.models.wan_vae) against diffusers' ``AutoencoderKLWan``.

One tiny random diffusers folder (tests/wan_vae_folder.py: Wan 2.1's 4-level structure, temporal
factor 4, spatial factor 8, at base_dim 8) serves every test. Parity is against diffusers' own
chunked decode / encode (one latent frame at a time; the first frame then 4-frame chunks; with
its feature caches): in float32, 3 latent frames -> 9 frames (the first chunk, then two cached
steps of our ``lax.scan``) and 9 frames -> 3 latent frames; in bfloat16, 1 latent frame (the
first chunk alone). The scan tests trace 2 and 6 latent frames (5 and 13 frames to encode).

Compile time: the jitted functions here are compiled with ``xla_backend_optimization_level=0``
(LLVM -O0 for XLA's CPU code generation; the HLO program and its optimisations are the same):
on this 2-core machine that makes each compile 4-5x faster (decode 23 s -> 5 s under load).
The outputs are not bit-identical to the default build's (LLVM's code generation changes the
float operation order): measured 5.7e-6 max abs apart on the 9-frame decode, far inside the
1e-4 parity tolerance (the default build is 6.0e-6 from diffusers). Tracing-only checks use
``jax.make_jaxpr``.
"""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from tts_jax.models import wan_vae as W

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from tests import wan_vae_folder as WF  # noqa: E402

torch.set_num_threads(1)  # tiny models: threads only add contention on a shared machine

FAST_COMPILE = {"xla_backend_optimization_level": 0}
# bfloat16 parameters and compute against diffusers' float32 decode (pixels in [-1, 1]), max /
# mean abs: measured 0.042 / 0.0063 on 1 latent frame (this test), 0.075 / 0.0080 on 2 (5
# frames; diffusers' own bfloat16 decode of those latents: 0.068 / 0.0084). The bounds allow the
# 5-frame error with margin; see the module docstring of wan_vae.
BF16_DECODE_MAX_ATOL = 0.12
BF16_DECODE_MEAN_ATOL = 0.015


@pytest.fixture(scope="session")
def wan_vae_folder(tmp_path_factory):
    """``(diffusers model, folder)`` of the tiny random AutoencoderKLWan."""
    model = WF.tiny_wan_vae(seed=0)
    folder = tmp_path_factory.mktemp("wan_vae")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.fixture(scope="module")
def vae(wan_vae_folder):
    return W.load_wan_vae(wan_vae_folder[1])


_decode = jax.jit(lambda params, z: nnx.merge(*params).decode(z), compiler_options=FAST_COMPILE)
_decode_latents = jax.jit(W.wan_vae_decode, compiler_options=FAST_COMPILE)
_encode = jax.jit(
    lambda params, video: nnx.merge(*params).encode_posterior(video),
    compiler_options=FAST_COMPILE,
)


def _latents(frames: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((2, WF.Z_DIM, frames, 2, 2)).astype("f4")


def _video(frames: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (2, 3, frames, 16, 16)).astype("f4")


def _torch_decode(model, z: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model.decode(torch.tensor(z)).sample.numpy()


def _assert_informative(ref: np.ndarray) -> None:
    """The reference is not mostly clipped to +-1 (else parity would be vacuous)."""
    inside = np.mean(np.abs(ref) < 0.999)
    assert inside > 0.5, f"only {inside:.0%} of the reference pixels are inside (-1, 1)"


def test_decode_latents_matches_wan_pipeline_decode(wan_vae_folder, vae):
    """Three latent frames -> 1 + 4 * 2 = 9 frames; the scan carries the caches over two steps.
    The latents are the transformer's normalised ones, un-normalised as WanPipeline does."""
    model, _ = wan_vae_folder
    latents = _latents(3)
    config = model.config
    mean = torch.tensor(config.latents_mean).view(1, WF.Z_DIM, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(config.latents_std).view(1, WF.Z_DIM, 1, 1, 1)
    with torch.no_grad():
        ref = model.decode(torch.tensor(latents) / inv_std + mean).sample.numpy()
    ours = np.asarray(_decode_latents(nnx.split(vae), jnp.asarray(latents)))
    assert (
        ours.shape == ref.shape == (2, 3, vae.config.video_frames(3), 16, 16) == (2, 3, 9, 16, 16)
    )
    _assert_informative(ref)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_encode_parity(wan_vae_folder, vae):
    """9 frames = the first frame, then two 4-frame chunks through the scan -> 3 latent frames;
    posterior mean and clipped log-variance as diffusers' ``latent_dist``."""
    model, _ = wan_vae_folder
    video = _video(9)
    with torch.no_grad():
        post = model.encode(torch.tensor(video)).latent_dist
    mean, logvar = _encode(nnx.split(vae), jnp.asarray(video))
    assert mean.shape == post.mean.shape == (2, WF.Z_DIM, 3, 2, 2)
    np.testing.assert_allclose(np.asarray(mean), post.mean.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logvar), post.logvar.numpy(), atol=1e-4, rtol=0)
    # normalisation as the Wan pipelines apply it to encoded videos: (mean - mu) * (1 / std)
    mu = torch.tensor(model.config.latents_mean).view(1, WF.Z_DIM, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(model.config.latents_std).view(1, WF.Z_DIM, 1, 1, 1)
    expected = ((post.mean - mu) * inv_std).numpy()
    normalized = vae.normalize_latents(mean)
    np.testing.assert_allclose(np.asarray(normalized), expected, atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        np.asarray(vae.denormalize_latents(normalized)), np.asarray(mean), atol=1e-5, rtol=0
    )


def test_bfloat16_decode_close_to_float32(wan_vae_folder):
    """One latent frame (the first chunk alone, no scan: 1 frame out) in bfloat16 against
    diffusers' float32; then, on abstract shapes, three frames: the scan's carry (the caches)
    stays bfloat16."""
    model, folder = wan_vae_folder
    vae16 = W.load_wan_vae(folder, dtype=jnp.bfloat16)
    assert vae16.dtype == jnp.bfloat16
    z = _latents(1)
    out = _decode(nnx.split(vae16), jnp.asarray(z))
    assert out.dtype == jnp.bfloat16 and out.shape == (2, 3, 1, 16, 16)
    ref = _torch_decode(model, z)
    _assert_informative(ref)
    err = np.abs(np.asarray(out, np.float32) - ref)
    print(f"bf16 vs fp32 decode: max {err.max():.4f}, mean {err.mean():.5f}")
    assert err.max() < BF16_DECODE_MAX_ATOL, f"max {err.max():.4f}, mean {err.mean():.5f}"
    assert err.mean() < BF16_DECODE_MEAN_ATOL, f"max {err.max():.4f}, mean {err.mean():.5f}"
    graphdef, state = nnx.split(vae16)
    longer = jax.ShapeDtypeStruct((2, WF.Z_DIM, 3, 2, 2), jnp.float32)
    abstract = jax.eval_shape(lambda s, z: nnx.merge(graphdef, s).decode(z), state, longer)
    assert abstract.dtype == jnp.bfloat16 and abstract.shape == (2, 3, 9, 16, 16)


def _count_primitives(jaxpr, name: str) -> int:
    """Occurrences of a primitive in a closed jaxpr, sub-jaxprs (scan bodies) included."""
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name == name
        for value in eqn.params.values():
            sub = getattr(value, "jaxpr", value)  # ClosedJaxpr -> Jaxpr
            if hasattr(sub, "eqns"):
                count += _count_primitives(sub, name)
    return count


def _scan_lengths(jaxpr) -> list[int]:
    return [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"]


@pytest.mark.parametrize(
    "step, method, shapes",
    [
        ("_decode_step", "decode", [(1, WF.Z_DIM, f, 2, 2) for f in (2, 6)]),
        ("_encode_step", "encode", [(1, 3, t, 16, 16) for t in (5, 13)]),
    ],
)
def test_scan_body_traced_once_whatever_the_frame_count(vae, monkeypatch, step, method, shapes):
    """The chunk step is traced once per input shape (a ``lax.scan``, not a Python loop over
    chunks), so the program holds one decoder (encoder) copy for the first chunk and one for the
    scan body: the same number of convolutions for 2 or 6 latent frames (5 or 13 frames)."""
    traces = []
    original = getattr(W, step)

    def counted(*args):
        traces.append(1)
        return original(*args)

    monkeypatch.setattr(W, step, counted)
    graphdef, state = nnx.split(vae)
    convs, lengths = [], []
    for shape in shapes:
        traces.clear()
        fn = lambda s, x: getattr(nnx.merge(graphdef, s), method)(x)  # noqa: E731
        closed = jax.make_jaxpr(fn)(state, jax.ShapeDtypeStruct(shape, jnp.float32))
        jaxpr, (out,) = closed.jaxpr, closed.out_avals
        assert len(traces) == 1, f"{step} traced {len(traces)} times for {shape}"
        frames = shape[2]
        if method == "decode":  # F latent frames -> 1 + 4 (F - 1) frames of 8x the size
            assert out.shape == (1, 3, vae.config.video_frames(frames), 16, 16)
        else:
            assert out.shape == (1, WF.Z_DIM, vae.config.latent_frames(frames), 2, 2)
        convs.append(_count_primitives(jaxpr, "conv_general_dilated"))
        lengths.append(_scan_lengths(jaxpr))
    assert convs[0] == convs[1] > 0, convs
    chunks = [s[2] - 1 if method == "decode" else (s[2] - 1) // W.ENCODER_CHUNK for s in shapes]
    assert lengths == [[c] for c in chunks], lengths


def test_wan21_frame_and_pixel_counts():
    """The Wan 2.1 VAE (diffusers' defaults: dim_mult [1, 2, 4, 4], temperal_downsample [False,
    True, True]): 81 frames of 480 x 832 <-> 21 latent frames of 60 x 104."""
    config = W.WanVAEConfig()
    assert (config.temporal_factor, config.spatial_factor) == (4, 8)
    assert config.latent_frames(81) == 21 and config.video_frames(21) == 81
    assert config.latent_frames(1) == 1 and config.video_frames(1) == 1


def test_bad_frame_counts_name_the_valid_ones(vae):
    with pytest.raises(ValueError, match=r"1 \+ 4 k frames .*valid: 1, 5, 9, 13"):
        vae.encode(np.zeros((1, 3, 6, 16, 16), np.float32))
    with pytest.raises(ValueError, match=r"1 \+ 4 k frames .*77, 81, 85"):
        W.WanVAEConfig().latent_frames(80)
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(np.zeros((1, 3, 5, 12, 16), np.float32))
    with pytest.raises(ValueError, match=r"z_dim=4"):
        vae.decode(np.zeros((1, 3, 2, 2, 2), np.float32))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"is_residual": True}, "Wan 2.2"),
        ({"patch_size": 2}, "patch_size"),
        (
            {"dim_mult": (1, 2), "temperal_downsample": (True,), "scale_factor_temporal": 2},
            "scale_factor_spatial=8",
        ),
        ({"temperal_downsample": (False, True)}, "one entry per down level"),
        ({"temperal_downsample": (True, True, True), "scale_factor_temporal": 8}, "at most two"),
        ({"latents_mean": (0.0,)}, "z_dim = 16"),
    ],
)
def test_unsupported_configs_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        W.WanVAEConfig(**overrides)


def test_config_round_trip_and_wrong_class(wan_vae_folder, tmp_path):
    _, folder = wan_vae_folder
    raw = json.loads((folder / "config.json").read_text())
    config = W.WanVAEConfig.from_dict(raw)
    assert config.dim_mult == (1, 2, 2, 2) and config.z_dim == WF.Z_DIM
    assert W.WanVAEConfig.from_dict(config.to_dict()) == config
    (tmp_path / "config.json").write_text(json.dumps({**raw, "_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="not an AutoencoderKLWan config"):
        W.load_wan_vae(tmp_path)


def test_missing_tensor_is_named(wan_vae_folder, tmp_path):
    _, folder = wan_vae_folder
    tensors = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    name = "decoder.up_blocks.0.upsamplers.0.time_conv.weight"
    del tensors[name]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(tensors, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        W.load_wan_vae(tmp_path)


def test_save_then_diffusers_from_pretrained(wan_vae_folder, vae, tmp_path):
    model, _ = wan_vae_folder
    W.save_wan_vae(tmp_path, vae)
    reloaded = diffusers.AutoencoderKLWan.from_pretrained(tmp_path).eval()
    ours, theirs = reloaded.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value), key


def test_load_refuses_non_float_dtype(wan_vae_folder):
    with pytest.raises(ValueError, match="float dtype"):
        W.load_wan_vae(wan_vae_folder[1], dtype=jnp.int32)
