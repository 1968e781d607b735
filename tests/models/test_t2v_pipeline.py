"""The Wan 2.1 text-to-video pipeline (pipelines.text_to_video) against diffusers' WanPipeline on
the tiny folder of tests/t2v_folders.py: prompt embeddings, the guided velocity of one denoising
step, the time grid (FlowMatch Euler and UniPC flow sigmas), latent sizes and their named
errors, named folder errors, FK steering on [N, C, F, h, w] latents, decoding."""

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax import interpolants as I
from tts_jax import smc
from tts_jax.models.pipelines import folder as F
from tts_jax.models.pipelines import text_to_video as TV
from tts_jax.models.pipelines.schedule import UnsupportedSchedulerError
from tts_jax.models.pipelines.text_to_image import with_guidance
from tts_jax.models.pipelines.text_to_video import (
    TextToVideoPipeline,
    load_text_to_video,
    prompt_clean,
)
from tts_jax.rewards.base import Reward
from tts_jax.samplers import run
from tts_jax.samplers.image import fk_steering as fk
from tts_jax.samplers.image.integrate import solve

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
from tests import t2v_folders as T  # noqa: E402

PROMPT = "a  photo of a red &amp; blue car"  # cleaned as WanPipeline cleans it
NEGATIVE = "a dog"
S = T.MAX_SEQUENCE_LENGTH
_FAST = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
    "xla_cpu_use_fusion_emitters": False,
}
_run = jax.jit(run, static_argnames="sampler", compiler_options=_FAST)
_solve = jax.jit(solve, compiler_options=_FAST)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def _unoptimised_compiles():
    """The pipeline's prompt encoder and VAE jits compiled by unoptimised XLA (the programs are
    tiny; the compile is what costs)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TV, "_encode", jax.jit(TV._encode.__wrapped__, compiler_options=_FAST))
        quick = jax.jit(TV._decode.__wrapped__, static_argnames="stats", compiler_options=_FAST)
        mp.setattr(TV, "_decode", quick)
        yield


@pytest.fixture(scope="session")
def wan(tmp_path_factory):
    return T.tiny_wan(tmp_path_factory)


@pytest.fixture(scope="module")
def pipe(wan) -> TextToVideoPipeline:
    return load_text_to_video(wan.folder, max_sequence_length=S)


@pytest.fixture(scope="module")
def reference(wan):
    torch.set_num_threads(1)
    return wan.pipeline()


def test_prompt_embeddings_match_wanpipeline(pipe, reference):
    assert prompt_clean(PROMPT) == "a photo of a red & blue car"
    cond = pipe.encode_prompt(PROMPT, NEGATIVE)
    with torch.no_grad():
        pos, neg = reference.encode_prompt(PROMPT, NEGATIVE, max_sequence_length=S)
    assert cond.embeds.shape == (1, S, T.TEXT_DIM) and cond.pooled is None
    np.testing.assert_allclose(np.asarray(cond.embeds), pos.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(cond.negative_embeds), neg.numpy(), atol=1e-5, rtol=0)
    length = len(pipe.prompt_encoder.tokenizer(prompt_clean(PROMPT)).input_ids)
    assert 2 < length < S
    assert np.all(np.asarray(cond.embeds)[0, length:] == 0)  # the padding positions zeroed
    assert np.all(np.asarray(cond.embeds)[0, :length] != 0)


def test_guided_velocity_is_one_wanpipeline_step(pipe, reference, wan):
    """The flow's velocity with CFG at the first grid time is what WanPipeline's denoising loop
    computes (transformer on the positive and the negative embeddings, then combined), and the
    grid is the scheduler's sigmas."""
    steps, scale = 4, 4.5
    grid = np.asarray(pipe.grid(steps, T.FRAMES, T.HEIGHT, T.WIDTH))
    reference.scheduler.set_timesteps(steps)
    np.testing.assert_array_equal(grid, reference.scheduler.sigmas.numpy())
    shape = pipe.latent_shape(T.FRAMES, T.HEIGHT, T.WIDTH)
    assert shape == (T.LATENT_CHANNELS, 2, 4, 4)
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    flow = pipe.flow(T.FRAMES, T.HEIGHT, T.WIDTH, guidance_scale=scale)
    assert flow.apply.cfg and flow.sample_shape == shape
    cond = pipe.encode_prompt(PROMPT, NEGATIVE)
    k = 1  # a step inside the grid
    t = jnp.full((2,), grid[k], jnp.float32)
    velocity = jax.jit(flow.apply, compiler_options=_FAST)
    v = np.asarray(velocity(flow.params, jnp.asarray(x), t, cond))
    with torch.no_grad():
        pos, neg = reference.encode_prompt(PROMPT, NEGATIVE, max_sequence_length=S)
    timestep = np.full(2, reference.scheduler.timesteps[k].item(), np.float32)
    v_pos = T.torch_velocity(wan.transformer, x, timestep, pos.repeat(2, 1, 1).numpy())
    v_neg = T.torch_velocity(wan.transformer, x, timestep, neg.repeat(2, 1, 1).numpy())
    np.testing.assert_allclose(v, v_neg + scale * (v_pos - v_neg), atol=1e-4, rtol=0)
    # another scale: the same compiled program, a different velocity
    v2 = np.asarray(velocity(with_guidance(flow, 1.5).params, jnp.asarray(x), t, cond))
    np.testing.assert_allclose(v2, v_neg + 1.5 * (v_pos - v_neg), atol=1e-4, rtol=0)
    assert velocity._cache_size() == 1


def test_unipc_flow_grid_matches_the_scheduler(pipe, tmp_path):
    """The hub's Wan folders ship UniPC with flow sigmas: the grid is its sigmas."""
    import diffusers

    unipc = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
    )
    unipc.save_config(tmp_path)
    config = TV.read_video_scheduler(tmp_path)
    assert isinstance(config, TV.UniPCFlowConfig) and config.flow_shift == 3.0
    with_unipc = dataclasses.replace(pipe, scheduler=config)
    for steps in (1, 4, 50):
        unipc.set_timesteps(steps)
        np.testing.assert_array_equal(np.asarray(with_unipc.grid(steps)), unipc.sigmas.numpy())
    file = tmp_path / "scheduler_config.json"
    raw = json.loads(file.read_text())
    for change, refused in (
        ({"use_karras_sigmas": True}, "use_karras_sigmas"),
        ({"use_flow_sigmas": False}, "use_flow_sigmas false"),
        ({"variance_type": "x"}, "unknown key 'variance_type'"),
    ):
        file.write_text(json.dumps({**raw, **change}))
        with pytest.raises(UnsupportedSchedulerError, match=f"refused: {refused}"):
            TV.read_video_scheduler(tmp_path)


def test_latent_sizes_and_their_errors(pipe):
    assert pipe.latent_shape(1, 16, 48) == (T.LATENT_CHANNELS, 1, 2, 6)
    assert pipe.latent_shape(81, 480, 832) == (T.LATENT_CHANNELS, 21, 60, 104)
    with pytest.raises(ValueError, match=r"1 \+ 4 k frames.*near it: 5, 9, 13, 17.*got 10"):
        pipe.latent_shape(10, 32, 32)
    with pytest.raises(ValueError, match=r"height must be a positive multiple of 16.*got 40"):
        pipe.latent_shape(5, 40, 32)
    with pytest.raises(ValueError, match="frames"):
        pipe.grid(4, 6)


def test_folder_errors_are_named(wan, tmp_path):
    with pytest.raises(F.NotAPipelineFolderError, match="no model_index.json"):
        load_text_to_video(wan.folder / "transformer")
    folder = tmp_path / "wan"
    shutil.copytree(wan.folder, folder)
    index = T.model_index(folder)
    for change, error, message in (
        ({"_class_name": "FluxPipeline"}, F.UnsupportedPipelineError, "WanPipeline"),
        (
            {"transformer_2": ["diffusers", "WanTransformer3DModel"]},
            F.UnsupportedPipelineError,
            "two-stage Wan 2.2",
        ),
        ({"vae": [None, None]}, F.MissingComponentError, "lists no 'vae' component"),
    ):
        (folder / "model_index.json").write_text(json.dumps({**index, **change}))
        with pytest.raises(error, match=message):
            load_text_to_video(folder)


def _mean_latent(params, x, cond=None):
    """A trivial reward on latents: the mean of channel 0 (higher is better)."""
    return jnp.mean(x[:, 0], axis=(1, 2, 3))


def test_fk_steering_runs_unchanged_on_video_latents(pipe):
    """FK steering's kernel, as it is, on the tiny Wan flow's [N, C, F, h, w] latents (one
    compile, unoptimised XLA as in tests/samplers/test_t2i_samplers.py)."""
    flow = pipe.flow(T.FRAMES, T.HEIGHT, T.WIDTH, guidance_scale=1.0)  # no CFG: N rows
    assert not flow.apply.cfg
    steps, n = 3, 4
    reward = Reward(None, _mean_latent, "mean_latent")
    params = fk.make_params(
        flow, reward, pipe.grid(steps), I.diffusion("square", 1.0), 5.0, smc.every(steps, 1),
        pipe.encode_prompt(PROMPT),
    )  # fmt: skip
    sampler = fk.sampler(n, steps, "diff", "multinomial")
    fk.check_params(params, sampler)
    result = _run(jax.random.key(0), sampler, params)
    samples = np.asarray(result.samples)
    assert samples.shape == (n, *pipe.latent_shape(T.FRAMES, T.HEIGHT, T.WIDTH))
    assert np.isfinite(samples).all()
    np.testing.assert_allclose(
        np.asarray(result.rewards), np.asarray(_mean_latent(None, samples)), atol=1e-6
    )
    assert np.asarray(result.info.ancestors).shape == (steps, n)
    assert np.asarray(result.info.resampled).all()  # resampled (gathered latents) every step
    assert int(result.cost.nfe) == n * steps


def _brightness(scale, video, cond=None):
    """A reward on decoded videos ``[N, 3, T, H, W]``: the scaled mean pixel."""
    return scale * video.mean(axis=(1, 2, 3, 4))


def test_decode_is_the_pipelines_last_step(pipe, wan):
    shape = pipe.latent_shape(T.FRAMES, T.HEIGHT, T.WIDTH)
    x = np.random.default_rng(2).standard_normal((1, *shape)).astype(np.float32)
    video = np.asarray(pipe.decode(jnp.asarray(x)))
    mean = np.asarray(T.LATENTS_MEAN, np.float32).reshape(1, -1, 1, 1, 1)
    std = np.asarray(T.LATENTS_STD, np.float32).reshape(1, -1, 1, 1, 1)
    with torch.no_grad():
        ref = wan.vae.decode(torch.from_numpy(x * std + mean), return_dict=False)[0].numpy()
    assert video.shape == (1, 3, T.FRAMES, T.HEIGHT, T.WIDTH)
    np.testing.assert_allclose(video, np.clip(ref, -1, 1), atol=1e-4, rtol=0)
    # a reward on decoded videos, on latents
    reward = TV.decoded_video_reward(pipe, _brightness, np.float32(2.0), "brightness")
    score = np.asarray(reward.apply(reward.params, jnp.asarray(x)))
    np.testing.assert_allclose(score, 2.0 * video.mean(axis=(1, 2, 3, 4)), rtol=1e-5)


def test_video_equals_wanpipeline_end_to_end(pipe, reference):
    """Same initial latents and prompt: 2 guided Euler steps and the VAE give WanPipeline's
    ``output_type="np"`` video."""
    shape = pipe.latent_shape(T.FRAMES, T.HEIGHT, T.WIDTH)
    x = np.random.default_rng(3).standard_normal((1, *shape)).astype(np.float32)
    scale, steps = 4.5, 2
    with torch.no_grad():
        ref = reference(
            prompt=PROMPT,
            negative_prompt=NEGATIVE,
            height=T.HEIGHT,
            width=T.WIDTH,
            num_frames=T.FRAMES,
            num_inference_steps=steps,
            guidance_scale=scale,
            latents=torch.from_numpy(x),
            output_type="np",
            max_sequence_length=S,
        ).frames
    flow = pipe.flow(T.FRAMES, T.HEIGHT, T.WIDTH, guidance_scale=scale)
    cond = pipe.encode_prompt(PROMPT, NEGATIVE)
    samples = _solve(jax.random.key(0), flow, jnp.asarray(x), pipe.grid(steps), I.ode(), cond)
    video = np.asarray(pipe.decode(samples))
    ours = (np.transpose(video, (0, 2, 3, 4, 1)) + 1) / 2  # [N, F, H, W, 3] in [0, 1]
    assert ref.shape == ours.shape == (1, T.FRAMES, T.HEIGHT, T.WIDTH, 3)
    np.testing.assert_allclose(ours, ref, atol=1e-3, rtol=0)  # measured 1.8e-6
