"""Interpolants: coefficient identities, conversions, exact scores, ODE/SDE marginals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax import interpolants as I
from tts_jax.models import gmm as G
from tts_jax.models.base import linear_to_vp
from tts_jax.samplers.image import integrate

from .helpers import assert_matches_gmm

PATHS = [I.Linear(), I.VP()]


@pytest.mark.parametrize("interp", PATHS, ids=["linear", "vp"])
def test_derivatives_match_autodiff(interp):
    ts = jnp.linspace(0.05, 1.0, 9)
    for f, df in [(interp.alpha, interp.alpha_dot), (interp.sigma, interp.sigma_dot)]:
        np.testing.assert_allclose(jax.vmap(jax.grad(f))(ts), df(ts), rtol=2e-4, atol=1e-5)


def test_vp_is_variance_preserving_and_matches_the_schedule():
    vp = I.VP()
    r = jnp.linspace(0.0, 1.0, 11)
    np.testing.assert_allclose(vp.alpha(r) ** 2 + vp.sigma(r) ** 2, 1.0, atol=1e-6)
    T = 0.5 * r**2 * (20.0 - 0.1) + r * 0.1
    np.testing.assert_allclose(vp.alpha(r), np.exp(-T / 2), rtol=1e-6)


@pytest.mark.parametrize("interp", PATHS, ids=["linear", "vp"])
def test_conversions_recover_x0_and_eps(interp):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x0 = jax.random.normal(k1, (64, 3))
    eps = jax.random.normal(k2, (64, 3))
    t = jax.random.uniform(k3, (64,), minval=0.05, maxval=0.95)
    a, s, _, _ = interp.coefficients(t, x0)
    x = a * x0 + s * eps
    u = I.x0_eps_to_velocity(interp, x0, eps, t)
    np.testing.assert_allclose(I.velocity_to_x0(interp, u, x, t), x0, atol=2e-4)
    np.testing.assert_allclose(I.velocity_to_eps(interp, u, x, t), eps, atol=2e-4)
    np.testing.assert_allclose(I.eps_to_velocity(interp, eps, x, t), u, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("interp", PATHS, ids=["linear", "vp"])
@pytest.mark.parametrize("t", [0.1, 0.5, 0.9])
def test_score_of_exact_velocity_is_grad_log_density(interp, t):
    gmm = G.asymmetric_gmm_2d()
    x = jax.random.normal(jax.random.key(1), (32, 2)) * 1.5
    u = G.velocity(gmm, x, t, interp)
    score = I.velocity_to_score(interp, u, x, jnp.float32(t))
    marginal = G.marginal(gmm, interp, jnp.float32(t))
    expected = jax.grad(lambda y: G.log_prob(marginal, y).sum())(x)
    np.testing.assert_allclose(score, expected, rtol=2e-3, atol=2e-3)


def test_linear_to_vp_velocity_is_the_exact_vp_velocity():
    gmm = G.asymmetric_gmm_2d()
    converted = linear_to_vp(G.flow_model(gmm, I.Linear()))
    x = jax.random.normal(jax.random.key(2), (32, 2))
    for r in (0.2, 0.5, 0.95):
        np.testing.assert_allclose(
            converted.velocity(x, r), G.velocity(gmm, x, r, I.VP()), rtol=1e-3, atol=1e-3
        )


def test_linear_to_vp_time_and_scale_match_signal_to_noise():
    conv = I.LinearToVP()
    r = jnp.linspace(0.05, 1.0, 7)
    t = conv.linear_time(r)
    vp = I.VP()
    np.testing.assert_allclose((1 - t) / t, vp.alpha(r) / vp.sigma(r), rtol=1e-4)
    np.testing.assert_allclose(conv.scale(r) * (1 - t), vp.alpha(r), rtol=1e-5)


@pytest.mark.parametrize("interp", PATHS, ids=["linear", "vp"])
def test_forward_renoise_maps_marginal_to_marginal(interp):
    gmm = G.asymmetric_gmm_2d()
    s, s_next = 0.3, 0.6
    x_s, _ = G.sample(G.marginal(gmm, interp, s), jax.random.key(3), 20000)
    x_next = I.forward_renoise(interp, jax.random.key(4), x_s, s, s_next)
    assert_matches_gmm(G.marginal(gmm, interp, s_next), x_next)


def test_sde_drift_is_the_velocity_where_g_is_zero_even_at_the_data_end():
    u = jnp.ones((4, 2))
    x = jnp.zeros((4, 2))
    drift = I.sde_drift(I.Linear(), u, x, jnp.zeros(4), jnp.zeros(4))
    np.testing.assert_array_equal(drift, u)


SAMPLERS = {
    "ode": (False, I.ode()),
    "sde-square-1": (False, I.diffusion("square", 1.0)),
    "sde-square-3": (False, I.diffusion("square", 3.0)),
    "vp-sde-square-3": (True, I.diffusion("square", 3.0)),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_ode_and_sdes_reach_the_mixture(name):
    to_vp, diffusion = SAMPLERS[name]
    gmm = G.asymmetric_gmm_2d()
    model = G.flow_model(gmm)
    model = linear_to_vp(model) if to_vp else model
    x = integrate.initial_noise(jax.random.key(5), model, 20000)
    out = jax.jit(integrate.solve)(jax.random.key(6), model, x, I.uniform_grid(100), diffusion)
    assert_matches_gmm(gmm, out)


def test_grids():
    u = I.uniform_grid(4)
    np.testing.assert_allclose(u, [1.0, 0.75, 0.5, 0.25, 0.0])
    s = I.sqrt_grid(10)
    assert float(s[0]) == 1.0 and float(s[-1]) == 0.0
    assert bool(jnp.all(jnp.diff(s) < 0))
    np.testing.assert_allclose(s[3], np.sqrt(1 - 0.09), rtol=1e-6)


def test_unknown_diffusion_kind_is_rejected():
    with pytest.raises(ValueError, match="unknown diffusion kind"):
        I.diffusion("cubic", 1.0)


def _ramp(norm, t, interp):
    """A diffusion coefficient written outside the package: ``g = a + b t``."""
    return norm["a"] + norm["b"] * t


def test_diffusion_coefficients_are_values():
    t = jnp.linspace(0.0, 1.0, 5)
    vp = I.VP()
    for name, fn in zip(I.DIFFUSION_KINDS, I.diffusions, strict=True):
        by_name, by_value = I.diffusion(name, 2.0), I.diffusion(fn, 2.0)
        # One coefficient, one pytree (same treedef: same compiled programs).
        assert by_value == by_name and by_value.kind == name
        assert jax.tree.structure(by_value) == jax.tree.structure(by_name)
        np.testing.assert_array_equal(by_value(t, vp), fn(np.float32(2.0), t, vp))
    np.testing.assert_allclose(I.diffusion("square", 2.0)(t, vp), 2.0 * t**2)
    np.testing.assert_allclose(I.diffusion("sigma", 2.0)(t, vp), 2.0 * vp.sigma(t))
    assert I.ode().kind == "zero" and I.diffusion(I.diffusions.zero, 0.0).kind == "zero"

    ramp = I.diffusion(_ramp, {"a": 0.5, "b": 2.0})
    assert ramp.kind is _ramp and ramp.coefficient is _ramp
    assert ramp.norm["a"].dtype == np.float32
    np.testing.assert_allclose(ramp(t, vp), 0.5 + 2.0 * t)
    # Its numbers are leaves: a new value is the same treedef (no recompilation).
    other = I.diffusion(_ramp, {"a": 0.1, "b": 1.0})
    assert jax.tree.structure(other) == jax.tree.structure(ramp)
    traces = []

    @jax.jit
    def g(d, t):
        traces.append(1)
        return d(t, vp)

    g(ramp, t)
    np.testing.assert_allclose(g(other, t), 0.1 + t)
    assert len(traces) == 1
