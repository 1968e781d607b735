"""Text-to-image pipelines (pipelines.text_to_image) against diffusers on the tiny SD3 / SD3.5 /
FLUX folders of tests/t2i_folders.py: prompt embeddings, images from the same initial latents,
the Euler step, compile reuse across guidance scales, shared prompts, named folder errors."""

import functools
import json
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax.interpolants import Linear, ode
from tts_jax.models.base import FlowModel
from tts_jax.models.pipelines import folder as F
from tts_jax.models.pipelines.text_to_image import (
    decode_latents,
    load_text_to_image,
    pack_latents,
    unpack_latents,
    with_guidance,
)
from tts_jax.samplers.image.integrate import solve

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")
from tests import t2i_folders as T  # noqa: E402

KINDS = ("sd3", "sd35", "flux", "schnell")
PROMPTS = [
    "a photo of a cat",
    # longer than the tiny CLIP tokenizers' 16 tokens: truncated the same way
    "an astronaut riding a horse on the moon with a small red car in a large green house",
]
SIZE, STEPS, GUIDANCE = T.IMAGE_SIZE, 2, 3.5
# Unoptimised XLA without the fusion emitters compiles 3-4x faster; these tiny programs run in
# milliseconds either way.
_FAST = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}


@functools.partial(jax.jit, compiler_options=_FAST)
def _generate(flow, vae, x, grid, cond):
    """The pipeline's image: an Euler ODE solve on ``grid`` from ``x``, then the VAE."""
    return decode_latents(vae, solve(jax.random.key(0), flow, x, grid, ode(), cond))


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny models gain nothing from threads on a shared machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("t2i")
    return {
        "sd3": T.make_tiny_sd3(root / "sd3"),
        "sd35": T.make_tiny_sd3(root / "sd35", "sd35"),
        "flux": T.make_tiny_flux(root / "flux"),
        "schnell": T.make_tiny_flux(root / "schnell", guidance_embeds=False),
    }


class _Lazy(dict):
    """Loads each value on first use (a test that needs one pipeline loads one)."""

    def __init__(self, load):
        super().__init__()
        self.load = load

    def __missing__(self, name):
        self[name] = value = self.load(name)
        return value


@pytest.fixture(scope="module")
def pipes(folders):
    return _Lazy(
        lambda k: load_text_to_image(folders[k], max_sequence_length=T.MAX_SEQUENCE_LENGTH)
    )


@pytest.fixture(scope="module")
def refs(folders):
    return _Lazy(lambda k: T.load_reference(folders[k]))


def _latents(n=2, seed=0):
    shape = (n, T.LATENT_CHANNELS, T.LATENT_SIZE, T.LATENT_SIZE)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _images(pipe, cond, latents, guidance=GUIDANCE):
    flow = pipe.flow(SIZE, SIZE, guidance_scale=guidance)
    grid = pipe.grid(STEPS, SIZE, SIZE)
    return _generate(flow, pipe.vae_params, jnp.asarray(latents), grid, cond)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("name", ["sd3", "sd35", "flux"])
def test_prompt_embeddings_equal_diffusers(pipes, refs, name):
    pipe, ref = pipes[name], refs[name]
    negative = ["a dog", ""] if pipe.kind == "sd3" else None
    cond = pipe.encode_prompt(PROMPTS, negative)
    want = T.reference_prompt_embeds(ref, PROMPTS, negative_prompt=negative or "")
    got = {
        "prompt_embeds": cond.embeds,
        "pooled_prompt_embeds": cond.pooled,
        "negative_prompt_embeds": cond.negative_embeds,
        "negative_pooled_prompt_embeds": cond.negative_pooled,
    }
    for key, value in want.items():
        if key == "text_ids":  # FLUX's are zeros, built inside the flow
            assert not value.any() and value.shape == (T.MAX_SEQUENCE_LENGTH, 3)
            continue
        assert got[key].shape == value.shape, key
        np.testing.assert_allclose(np.asarray(got[key]), value, atol=1e-4, rtol=0, err_msg=key)
    if pipe.kind == "flux":
        assert cond.negative_embeds is None and cond.negative_pooled is None


@pytest.mark.parametrize(
    ("name", "guidance"),
    [(k, GUIDANCE) for k in KINDS] + [("sd3", 1.0)],  # SD3 at scale 1: no CFG, as diffusers
)
def test_images_equal_diffusers(pipes, refs, name, guidance):
    """Same prompt, initial latents, steps and guidance -> the diffusers image (``"np"``)."""
    pipe = pipes[name]
    latents = _latents()
    cond = pipe.encode_prompt(PROMPTS[0])
    ours = np.asarray(_images(pipe, cond, latents, guidance))
    assert ours.shape == (2, 3, SIZE, SIZE) and ours.min() >= -1 and ours.max() <= 1
    want = T.reference_images(refs[name], PROMPTS[0], latents, STEPS, guidance)
    diff = np.abs((ours.transpose(0, 2, 3, 1) + 1) / 2 - want).max()
    assert diff <= 1e-3, diff


def test_sd3_without_t5_uses_zeros_like_diffusers(folders, tmp_path):
    """``text_encoder_3`` / ``tokenizer_3`` set to ``[null, null]``: the T5 part is zeros."""
    folder = _copy(folders, "sd3", tmp_path)
    index = json.loads((folder / F.MODEL_INDEX_NAME).read_text())
    index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
    (folder / F.MODEL_INDEX_NAME).write_text(json.dumps(index))
    pipe = load_text_to_image(folder, max_sequence_length=T.MAX_SEQUENCE_LENGTH)
    assert pipe.prompt_encoder.encoders[2] is None
    cond = pipe.encode_prompt(PROMPTS[0])
    import diffusers

    ref = diffusers.StableDiffusion3Pipeline.from_pretrained(
        folder, text_encoder_3=None, tokenizer_3=None, torch_dtype=torch.float32
    )
    want = T.reference_prompt_embeds(ref, PROMPTS[0])
    np.testing.assert_allclose(np.asarray(cond.embeds), want["prompt_embeds"], atol=1e-4, rtol=0)
    assert not np.asarray(cond.embeds[:, T.CLIP_MAX_LENGTH :]).any()


def test_bfloat16_pipeline_is_close_to_float32(folders, pipes):
    """Every network in bfloat16 (FLUX): the image moves by at most a few hundredths (measured:
    max 0.029, mean 0.004 on [-1, 1]; the VAE alone contributes up to 0.038, test_vae.py)."""
    pipe = load_text_to_image(folders["flux"], jnp.bfloat16, max_sequence_length=24)
    leaf = jax.tree.leaves(pipe.transformer_params[1])[0]
    assert leaf.dtype == jnp.bfloat16
    cond = pipe.encode_prompt(PROMPTS[0])
    assert cond.embeds.dtype == cond.pooled.dtype == jnp.bfloat16
    latents = _latents()
    low = np.asarray(_images(pipe, cond, latents))
    high = np.asarray(_images(pipes["flux"], pipes["flux"].encode_prompt(PROMPTS[0]), latents))
    assert low.dtype == np.float32 and np.isfinite(low).all()
    assert np.abs(low - high).max() < 0.1 and np.abs(low - high).mean() < 0.01


def test_euler_solve_is_the_scheduler_step(pipes, refs):
    """integrate.solve with ode() on pipe.grid is FlowMatchEulerDiscreteScheduler.step."""
    ref = refs["sd3"]
    scheduler = ref.scheduler
    scheduler.set_timesteps(3)
    grid = pipes["sd3"].grid(3, SIZE, SIZE)
    np.testing.assert_array_equal(np.asarray(grid), scheduler.sigmas.numpy())
    x0 = _latents(1)
    weight = np.float32(-0.7)
    flow = FlowModel(jnp.float32(weight), _linear_velocity, Linear(), x0.shape[1:])
    ours = solve(jax.random.key(0), flow, jnp.asarray(x0), grid, ode())
    x = torch.from_numpy(x0)
    for k, t in enumerate(scheduler.timesteps):
        sigma = scheduler.sigmas[k].reshape(1).numpy()
        v = torch.from_numpy(_linear_velocity(weight, x.numpy(), sigma))
        x = scheduler.step(v, t, x, return_dict=False)[0]
    np.testing.assert_allclose(np.asarray(ours), x.numpy(), atol=1e-6, rtol=0)


def _linear_velocity(params, x, t, cond=None):
    """Any velocity field will do for the step: a linear one in ``x`` and ``t``."""
    return params * x + t.reshape(-1, 1, 1, 1)


def test_flux_packing_is_diffusers():
    x = _latents(2)
    packed = np.asarray(pack_latents(jnp.asarray(x)))
    np.testing.assert_array_equal(packed, T.pack_flux_latents(x))
    np.testing.assert_array_equal(np.asarray(unpack_latents(jnp.asarray(packed), 8, 8)), x)


# --------------------------------------------------------------------------- compiles, batching


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_changing_guidance_reuses_the_compiled_program(pipes, name):
    pipe = pipes[name]
    cond = pipe.encode_prompt(PROMPTS[0])
    latents = jnp.asarray(_latents())
    grid = pipe.grid(STEPS, SIZE, SIZE)
    flow = pipe.flow(SIZE, SIZE, guidance_scale=GUIDANCE)
    first = _generate(flow, pipe.vae_params, latents, grid, cond)
    size = _generate._cache_size()
    second = _generate(with_guidance(flow, 6.0), pipe.vae_params, latents, grid, cond)
    third = _generate(
        pipe.flow(SIZE, SIZE, guidance_scale=2.0), pipe.vae_params, latents, grid, cond
    )
    assert _generate._cache_size() == size
    assert float(jnp.abs(first - second).max()) > 1e-4  # the scale is used
    assert float(jnp.abs(second - third).max()) > 1e-4


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_prompt_is_not_replicated_per_particle(pipes, name):
    """One prompt for N = 8 particles: ``cond`` keeps B = 1 and the velocity's program holds no
    ``[N, T, D]`` (nor, with CFG, ``[2N, T, D]``) copy of the prompt tokens."""
    pipe = pipes[name]
    cond = pipe.encode_prompt(PROMPTS[0])
    assert all(leaf.shape[0] == 1 for leaf in jax.tree.leaves(cond))
    flow = pipe.flow(SIZE, SIZE)
    n = 8
    x = jnp.zeros((n, *flow.sample_shape))
    t = jnp.full((n,), 0.5)
    text = str(jax.make_jaxpr(flow.apply)(flow.params, x, t, cond))
    _, tokens, width = cond.embeds.shape
    b = 2 if pipe.kind == "sd3" else 1  # SD3: negative and positive prompt in one batch
    assert f"f32[{b},{tokens},{width}]" in text
    for rows in (n, 2 * n):
        assert not re.search(rf"f32\[{rows},{tokens},{width}\]", text), rows


# --------------------------------------------------------------------------- sizes, errors


def test_sizes_and_grid(pipes):
    sd3, flux = pipes["sd3"], pipes["flux"]
    assert sd3.kind == "sd3" and flux.kind == "flux"
    assert sd3.vae_scale_factor == flux.vae_scale_factor == T.VAE_SCALE_FACTOR
    assert sd3.default_size == SIZE  # transformer sample_size 8 x 4
    assert sd3.latent_shape(SIZE, 48) == (16, 8, 12)
    assert flux.latent_shape(SIZE, 44) == (16, 8, 10)  # FLUX rounds to even latents
    assert sd3.flow(SIZE, SIZE).sample_shape == (16, 8, 8)
    grid = np.asarray(flux.grid(4, SIZE, SIZE))
    assert grid.shape == (5,) and grid[0] == 1 and grid[-1] == 0 and (np.diff(grid) < 0).all()
    with pytest.raises(ValueError, match="below the minimum"):
        sd3.latent_shape(4, 4)


def test_flow_without_prompt_is_an_error(pipes):
    flow = pipes["sd3"].flow(SIZE, SIZE)
    with pytest.raises(ValueError, match="encode_prompt"):
        flow.velocity(jnp.zeros((1, *flow.sample_shape)), 0.5, None)


def _copy(folders, name, tmp_path):
    return shutil.copytree(folders[name], tmp_path / name)


def test_folder_without_model_index(folders, tmp_path):
    with pytest.raises(F.NotAPipelineFolderError, match="model_index.json"):
        load_text_to_image(folders["sd3"] / "transformer")


def test_unknown_pipeline_class(folders, tmp_path):
    folder = _copy(folders, "flux", tmp_path)
    index = json.loads((folder / F.MODEL_INDEX_NAME).read_text())
    index["_class_name"] = "StableDiffusionXLPipeline"
    (folder / F.MODEL_INDEX_NAME).write_text(json.dumps(index))
    with pytest.raises(F.UnsupportedPipelineError, match="StableDiffusionXLPipeline"):
        load_text_to_image(folder)


def test_pickle_only_component(folders, tmp_path):
    folder = _copy(folders, "sd3", tmp_path)
    weights = folder / "text_encoder_2" / "model.safetensors"
    weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(F.PickleWeightsError, match="text_encoder_2"):
        load_text_to_image(folder)


def test_unreachable_hub_id():
    with pytest.raises(F.HubUnreachableError, match="unreachable"):
        load_text_to_image("no-such-owner-tts-jax/no-such-pipeline")
