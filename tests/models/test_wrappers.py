"""DiT -> FlowModel wrappers: the DDPM interpolant, eps -> velocity, CFG, parity with diffusers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax.interpolants import Linear
from tts_jax.models.dit import DiTConfig, init_dit, load_dit
from tts_jax.models.wrappers import (
    DDPMInterpolant,
    EpsAsVelocity,
    ddpm_dit_flow,
    decode_images,
    load_ddpm_dit_pipeline,
    velocity_dit_flow,
    with_guidance,
)

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

SCHEDULES = [
    dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    dict(beta_schedule="squaredcos_cap_v2"),
]
TINY_DIT = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=3,
    out_channels=6,
    num_layers=1,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
)


# --------------------------------------------------------------------------- DDPM interpolant


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s["beta_schedule"])
def test_ddpm_interpolant_matches_scheduler(schedule, tmp_path):
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=1000, **schedule)
    scheduler.save_config(tmp_path)
    interp = DDPMInterpolant.from_scheduler_config(tmp_path / "scheduler_config.json")
    steps = np.arange(1000)
    t = jnp.asarray((steps + 1) / 1000.0, jnp.float32)
    np.testing.assert_allclose(
        np.asarray(interp.alpha(t) ** 2), scheduler.alphas_cumprod.numpy(), rtol=2e-4, atol=1e-7
    )
    np.testing.assert_allclose(np.asarray(interp.timestep(t)), steps, atol=1e-3)
    u = jax.random.uniform(jax.random.key(0), (64,))
    np.testing.assert_allclose(
        np.asarray(interp.alpha(u) ** 2 + interp.sigma(u) ** 2), 1, atol=1e-6
    )
    assert float(interp.alpha(jnp.zeros(()))) == 1.0 and float(interp.sigma(jnp.zeros(()))) == 0.0


def test_ddpm_interpolant_derivatives_match_autodiff():
    interp = DDPMInterpolant()
    t = jnp.asarray([0.0213, 0.3337, 0.5, 0.77771, 0.9994])  # away from grid points
    for f, df in [(interp.alpha, interp.alpha_dot), (interp.sigma, interp.sigma_dot)]:
        auto = jax.vmap(jax.grad(f))(t)
        np.testing.assert_allclose(np.asarray(df(t)), np.asarray(auto), rtol=1e-3)


def test_scheduler_config_rejections():
    with pytest.raises(ValueError):
        DDPMInterpolant.from_scheduler_config({"prediction_type": "v_prediction"})
    with pytest.raises(ValueError):
        DDPMInterpolant.from_scheduler_config({"beta_schedule": "sigmoid"})


def test_eps_to_velocity_exact_on_gaussian_data():
    """The exact eps-predictor of Gaussian data, wrapped, gives the exact (transport) velocity.

    For ``x0 ~ N(mu, s0^2)`` per pixel, ``p_t = N(alpha mu, std_t^2)`` with
    ``std_t^2 = alpha^2 s0^2 + sigma^2``; the exact eps-prediction is
    ``sigma (x - alpha mu) / std_t^2`` and the probability-flow velocity is the Gaussian transport
    ``d(alpha mu)/dt + (d std_t/dt) / std_t (x - alpha mu)``.
    """
    interp = DDPMInterpolant(beta_schedule="squaredcos_cap_v2")
    key_mu, key_x, key_t = jax.random.split(jax.random.key(1), 3)
    mu = jax.random.normal(key_mu, (1, 2, 4, 4))
    s0 = 0.3

    def exact_eps(params, x, t, cond):
        a, s, _, _ = interp.coefficients(t, x)
        return s * (x - a * params) / (a**2 * s0**2 + s**2)

    def gaussian_path(tt):
        a, s = interp.alpha(tt), interp.sigma(tt)
        return a, jnp.sqrt(a**2 * s0**2 + s**2)

    @jax.jit
    def exact_velocity(x, t):
        (a, std), (a_dot, std_dot) = jax.vmap(lambda tt: jax.jvp(gaussian_path, (tt,), (1.0,)))(t)
        a, std, a_dot, std_dot = (v[:, None, None, None] for v in (a, std, a_dot, std_dot))
        return a_dot * mu + std_dot / std * (x - a * mu)

    x = 2.0 * jax.random.normal(key_x, (16, 2, 4, 4))
    t = jax.random.uniform(key_t, (16,), minval=0.02, maxval=0.98)
    wrapped = jax.jit(EpsAsVelocity(exact_eps, interp))(mu, x, t)
    exact = exact_velocity(x, t)
    np.testing.assert_allclose(np.asarray(wrapped), np.asarray(exact), rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------- DiT wrappers


@jax.jit
def _velocity(flow, x, t, labels):
    return flow.velocity(x, t, labels)


@pytest.fixture(scope="module")
def torch_dit(tmp_path_factory):
    torch.manual_seed(0)
    model = diffusers.DiTTransformer2DModel(**TINY_DIT).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("dit")
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


def _torch_pred(model, x, timestep, labels, guidance):
    """First-C-channel prediction with classifier-free guidance, as in diffusers' DiTPipeline."""
    n, c = x.shape[:2]
    with torch.no_grad():
        out = model(
            torch.tensor(np.concatenate([x, x])),
            torch.tensor(np.concatenate([timestep, timestep]), dtype=torch.float32),
            torch.tensor(np.concatenate([labels, np.full(n, 10)])),
        ).sample.numpy()[:, :c]
    return out[n:] + guidance * (out[:n] - out[n:])


def _inputs():
    rng = np.random.default_rng(0)
    return rng.standard_normal((3, 3, 8, 8)).astype(np.float32), np.array([1, 4, 10])


def test_ddpm_dit_velocity_matches_diffusers(torch_dit):
    """eps from the torch DiT + the diffusers alphas_cumprod table reproduce our velocity."""
    torch_model, folder = torch_dit
    _, dit = load_dit(folder)
    interp = DDPMInterpolant()
    flow = ddpm_dit_flow(dit, interp, guidance=2.5)
    x, labels = _inputs()
    i = np.array([0, 400, 997])
    t = (i + 1.5) / 1000.0  # halfway between training steps i and i + 1
    ours = _velocity(flow, x, jnp.asarray(t), labels)

    eps = _torch_pred(torch_model, x, i + 0.5, labels, 2.5)
    log_ac = np.log(diffusers.DDPMScheduler().alphas_cumprod.numpy().astype(np.float64))
    slope = (log_ac[i + 1] - log_ac[i]) * 1000.0
    log_abar = 0.5 * (log_ac[i] + log_ac[i + 1])
    a, s = np.exp(0.5 * log_abar), np.sqrt(-np.expm1(log_abar))
    a_dot, s_dot = 0.5 * slope * a, -0.5 * np.exp(log_abar) * slope / s
    a, s, a_dot, s_dot = (v[:, None, None, None] for v in (a, s, a_dot, s_dot))
    expected = a_dot * (x - s * eps) / a + s_dot * eps
    np.testing.assert_allclose(np.asarray(ours), expected, atol=2e-3, rtol=2e-3)
    assert flow.interpolant == interp and flow.sample_shape == (3, 8, 8)


def test_velocity_dit_matches_diffusers_and_guidance_sweep_does_not_recompile(torch_dit):
    torch_model, folder = torch_dit
    _, dit = load_dit(folder)
    flow = velocity_dit_flow(dit, guided=True)
    assert isinstance(flow.interpolant, Linear)
    x, labels = _inputs()
    t = jnp.asarray([0.9, 0.5, 0.013])
    traces = []

    @jax.jit
    def velocity(f, x, t, y):
        traces.append(None)
        return f.velocity(x, t, y)

    for w in (1.0, 3.0, 0.0):
        ours = velocity(with_guidance(flow, w), x, t, labels)
        ref = _torch_pred(torch_model, x, np.asarray(t) * 1000.0, labels, w)
        np.testing.assert_allclose(np.asarray(ours), ref, atol=1e-4, rtol=0)
    assert len(traces) == 1


def test_unguided_and_unconditional_paths(torch_dit):
    _, folder = torch_dit
    _, dit = load_dit(folder)
    x, labels = _inputs()
    t = jnp.full((3,), 0.3)
    guided = _velocity(velocity_dit_flow(dit, guided=True, guidance=1.0), x, t, labels)
    plain = _velocity(velocity_dit_flow(dit), x, t, labels)
    np.testing.assert_allclose(np.asarray(guided), np.asarray(plain), atol=1e-5)
    uncond = _velocity(velocity_dit_flow(dit), x, t, None)
    null = _velocity(velocity_dit_flow(dit), x, t, jnp.full((3,), 10))
    np.testing.assert_allclose(np.asarray(uncond), np.asarray(null), atol=1e-6)


def test_euler_sampling_runs_under_scan():
    flow = velocity_dit_flow(init_dit(DiTConfig(**dict(TINY_DIT, out_channels=3)), 0))
    grid = jnp.linspace(1.0, 0.0, 5)

    @jax.jit
    def sample(f, x0):
        def body(x, ts):
            return x + f.velocity(x, ts[0]) * (ts[1] - ts[0]), None

        return jax.lax.scan(body, x0, jnp.stack([grid[:-1], grid[1:]], 1))[0]

    noise = jax.random.normal(jax.random.key(0), (2, *flow.sample_shape))
    out = sample(flow, noise)
    assert out.shape == noise.shape and bool(jnp.isfinite(out).all())


def test_pipeline_folder(torch_dit, tmp_path):
    torch_model, _ = torch_dit
    torch_model.save_pretrained(tmp_path / "transformer", safe_serialization=True)
    diffusers.DDIMScheduler(beta_schedule="linear").save_config(tmp_path / "scheduler")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        latent_channels=3, block_out_channels=(8, 8), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    flow, vae_params = load_ddpm_dit_pipeline(tmp_path, guidance=1.5)
    assert flow.interpolant == DDPMInterpolant()
    assert float(flow.params.guidance) == 1.5
    images = jax.jit(decode_images)(vae_params, jnp.ones((2, 3, 8, 8)))
    assert images.shape == (2, 3, 16, 16)
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
