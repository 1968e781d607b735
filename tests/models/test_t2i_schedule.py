"""The SD3 / FLUX time grid against diffusers' FlowMatchEulerDiscreteScheduler after the same
pipeline calls (``calculate_shift`` + ``retrieve_timesteps`` of the pipeline modules)."""

import json

import numpy as np
import pytest

from tts_jax.models import checkpoint
from tts_jax.models.pipelines import schedule as S

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.flux import pipeline_flux  # noqa: E402
from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3 as pipeline_sd3  # noqa: E402

# Real configs (the hub's scheduler_config.json, _diffusers_version dropped) and variants.
SD3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_DEV = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "max_image_seq_len": 4096,
    "max_shift": 1.15,
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
}
FLUX_SCHNELL = dict(FLUX_DEV, shift=1.0, use_dynamic_shifting=False)
SD3_CONFIGS = {
    "sd3": SD3,
    "sd3_shift_terminal": dict(SD3, shift_terminal=0.02),
    "sd3_dynamic": dict(FLUX_DEV, max_shift=1.16),
    "sd3_unshifted": dict(SD3, shift=1.0),
}
FLUX_CONFIGS = {
    "flux_dev": FLUX_DEV,
    "flux_schnell": FLUX_SCHNELL,
    "flux_linear": dict(FLUX_DEV, time_shift_type="linear"),
    "flux_shift_terminal": dict(FLUX_DEV, shift_terminal=0.1),
}
STEPS = (1, 2, 4, 28, 50)
LATENTS = ((8, 8), (64, 64), (128, 128), (96, 160))  # h, w: 512 px / 1024 px / non-square


def _scheduler(raw):
    return diffusers.FlowMatchEulerDiscreteScheduler.from_config(raw)


def _diffusers_sd3(raw, steps, h, w, patch=2):
    scheduler = _scheduler(raw)
    kwargs = {}
    if scheduler.config.get("use_dynamic_shifting", None):
        kwargs["mu"] = pipeline_sd3.calculate_shift(
            (h // patch) * (w // patch),
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.16),
        )
    pipeline_sd3.retrieve_timesteps(scheduler, steps, "cpu", sigmas=None, **kwargs)
    return scheduler


def _diffusers_flux(raw, steps, h, w):
    scheduler = _scheduler(raw)
    sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = pipeline_flux.calculate_shift(
        (h // 2) * (w // 2),
        scheduler.config.get("base_image_seq_len", 256),
        scheduler.config.get("max_image_seq_len", 4096),
        scheduler.config.get("base_shift", 0.5),
        scheduler.config.get("max_shift", 1.15),
    )
    pipeline_flux.retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, mu=mu)
    return scheduler


def _assert_grid(grid, scheduler, steps):
    assert grid.sigmas.shape == (steps + 1,) and grid.timesteps.shape == (steps,)
    assert grid.sigmas.dtype == np.float32 and grid.timesteps.dtype == np.float32
    np.testing.assert_allclose(grid.sigmas, scheduler.sigmas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(grid.timesteps, scheduler.timesteps.numpy(), rtol=1e-6, atol=0)
    assert grid.sigmas[-1] == 0 and np.all(np.diff(grid.sigmas) < 0)


@pytest.mark.parametrize("name", sorted(SD3_CONFIGS))
def test_sd3_grid_matches_diffusers(name):
    config = S.FlowMatchConfig.from_dict(SD3_CONFIGS[name])
    for steps in STEPS:
        if steps == 1 and config.shift_terminal:
            with pytest.raises(ValueError, match="shift_terminal"):
                S.sd3_grid(config, steps, 64, 64)
            continue
        for h, w in LATENTS:
            grid = S.sd3_grid(config, steps, h, w, patch_size=2)
            _assert_grid(grid, _diffusers_sd3(SD3_CONFIGS[name], steps, h, w), steps)


@pytest.mark.parametrize("name", sorted(FLUX_CONFIGS))
def test_flux_grid_matches_diffusers(name):
    config = S.FlowMatchConfig.from_dict(FLUX_CONFIGS[name])
    for steps in STEPS:
        if steps == 1 and config.shift_terminal:
            with pytest.raises(ValueError, match="shift_terminal"):
                S.flux_grid(config, steps, 64, 64)
            continue
        for h, w in LATENTS:
            grid = S.flux_grid(config, steps, h, w)
            _assert_grid(grid, _diffusers_flux(FLUX_CONFIGS[name], steps, h, w), steps)
            again = S.pipeline_grid("flux", config, steps, h, w)
            assert np.array_equal(grid.sigmas, again.sigmas)


def test_sd3_grid_values():
    """SD3's double shift: 1 step of shift 3 on the (already shifted) training range."""
    grid = S.sd3_grid(S.FlowMatchConfig.from_dict(SD3), 2, 128, 128)
    s_min = 3 * 0.001 / (1 + 2 * 0.001)
    mid = 3 * s_min / (1 + 2 * s_min)
    np.testing.assert_allclose(grid.sigmas, [1.0, mid, 0.0], atol=1e-6)
    np.testing.assert_allclose(grid.timesteps, 1000 * grid.sigmas[:-1], rtol=1e-6)


def test_flux_mu_follows_token_count():
    config = S.FlowMatchConfig.from_dict(FLUX_DEV)
    assert S.calculate_shift(256) == pytest.approx(0.5)
    assert S.calculate_shift(4096) == pytest.approx(1.15)
    small, large = S.flux_grid(config, 4, 32, 32), S.flux_grid(config, 4, 128, 128)
    assert np.all(large.sigmas[1:-1] > small.sigmas[1:-1])  # more tokens: more time at high noise


def test_custom_sigmas_and_errors():
    config = S.FlowMatchConfig.from_dict(SD3)
    sigmas = [1.0, 0.75, 0.5, 0.25]
    grid = S.sd3_grid(config, 4, 64, 64, sigmas=sigmas)
    scheduler = _scheduler(SD3)
    pipeline_sd3.retrieve_timesteps(scheduler, None, "cpu", sigmas=sigmas)
    _assert_grid(grid, scheduler, 4)
    with pytest.raises(ValueError, match="num_steps"):
        S.flow_grid(config, 0)
    with pytest.raises(ValueError, match="len"):
        S.flow_grid(config, 3, sigmas=sigmas)
    with pytest.raises(ValueError, match="mu"):
        S.flow_grid(S.FlowMatchConfig.from_dict(FLUX_DEV), 4)
    with pytest.raises(ValueError, match="kind"):
        S.pipeline_grid("sdxl", config, 4, 64, 64)


def test_read_scheduler_config_from_tiny_folder_scheduler(tmp_path):
    _scheduler(FLUX_DEV).save_config(tmp_path)  # every key diffusers writes
    config = S.read_scheduler_config(tmp_path)
    assert config.use_dynamic_shifting and config.max_shift == 1.15
    _scheduler(SD3).save_config(tmp_path / "sd3")
    assert S.read_scheduler_config(tmp_path / "sd3") == S.FlowMatchConfig(shift=3.0)


@pytest.mark.parametrize(
    "key, value, match",
    [
        ("use_karras_sigmas", True, "use_karras_sigmas=True"),
        ("use_exponential_sigmas", True, "use_exponential_sigmas"),
        ("use_beta_sigmas", True, "use_beta_sigmas"),
        ("invert_sigmas", True, "invert_sigmas"),
        ("stochastic_sampling", True, "stochastic_sampling"),
        ("time_shift_type", "cosine", "time_shift_type"),
        ("use_flow_sigmas", True, r"config keys \['use_flow_sigmas'\]"),
        ("_class_name", "EulerDiscreteScheduler", "only FlowMatchEulerDiscreteScheduler"),
    ],
)
def test_unsupported_options_are_named(tmp_path, key, value, match):
    (tmp_path / S.SCHEDULER_CONFIG_NAME).write_text(json.dumps(dict(SD3, **{key: value})))
    with pytest.raises(S.UnsupportedSchedulerError, match=match) as info:
        S.read_scheduler_config(tmp_path)
    assert str(tmp_path) in str(info.value) and S.SCHEDULER_CONFIG_NAME in str(info.value)
    assert isinstance(info.value, checkpoint.CheckpointConfigError)


def test_config_file_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="does not exist"):
        S.read_scheduler_config(tmp_path / "nope")
    with pytest.raises(checkpoint.CheckpointNotFoundError, match="has no scheduler_config.json"):
        S.read_scheduler_config(tmp_path)
    (tmp_path / S.SCHEDULER_CONFIG_NAME).write_text(json.dumps(dict(SD3, shift="3")))
    with pytest.raises(checkpoint.CheckpointConfigError, match='"shift" must be a number'):
        S.read_scheduler_config(tmp_path)
