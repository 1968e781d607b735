"""The exact Gaussian mixture: sampling, density, posterior means and the closed-form tilt."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax import interpolants as I
from tts_jax.models import gmm as G

from .helpers import assert_matches_gmm, weighted_moments


def test_samples_match_the_mixture():
    gmm = G.asymmetric_gmm_2d()
    x, comp = G.sample(gmm, jax.random.key(0), 40000)
    assert_matches_gmm(gmm, x)
    freq = np.bincount(np.asarray(comp), minlength=3) / 40000
    np.testing.assert_allclose(freq, gmm.weights, atol=5 * np.sqrt(0.25 / 40000))


def test_log_prob_integrates_to_one():
    gmm = G.asymmetric_gmm_2d()
    g = np.linspace(-6, 6, 401)
    xx, yy = np.meshgrid(g, g)
    pts = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], 1), jnp.float32)
    mass = float(jnp.exp(G.log_prob(gmm, pts)).sum()) * (g[1] - g[0]) ** 2
    assert mass == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("interp", [I.Linear(), I.VP()], ids=["linear", "vp"])
def test_posterior_mean_is_exact_at_the_ends(interp):
    gmm = G.asymmetric_gmm_2d()
    x = jax.random.normal(jax.random.key(1), (16, 2))
    x0, eps = G.posterior_means(gmm, interp, x, 0.0)
    np.testing.assert_allclose(x0, x, atol=1e-5)
    np.testing.assert_allclose(eps, 0.0, atol=1e-5)
    if isinstance(interp, I.Linear):
        x0, eps = G.posterior_means(gmm, interp, x, 1.0)
        np.testing.assert_allclose(x0, jnp.broadcast_to(G.mean(gmm), x.shape), atol=1e-5)
        np.testing.assert_allclose(eps, x, atol=1e-5)


def test_posterior_mean_matches_monte_carlo():
    """E[x0 | x_t] by self-normalized importance sampling over the prior."""
    gmm = G.asymmetric_gmm_2d()
    t = 0.6
    x0, _ = G.sample(gmm, jax.random.key(2), 200000)
    x_t = jnp.array([[0.3, -0.2]])
    log_lik = -0.5 * jnp.sum((x_t - (1 - t) * x0) ** 2, axis=1) / t**2
    est, se = weighted_moments(np.asarray(x0), np.asarray(jnp.exp(log_lik - log_lik.max())))
    exact, _ = G.posterior_means(gmm, I.Linear(), x_t, t)
    np.testing.assert_array_less(np.abs(est - np.asarray(exact[0])), 5 * se)


def test_tilt_matches_importance_weighting():
    gmm = G.asymmetric_gmm_2d()
    direction, lam = jnp.array([1.0, -0.5]), 1.3
    tilted, log_z = G.tilt_linear(gmm, direction, lam)
    x, _ = G.sample(gmm, jax.random.key(3), 200000)
    logw = lam * x @ direction
    assert_matches_gmm(tilted, x, weights=np.asarray(jnp.exp(logw - logw.max())))
    w = np.exp(np.asarray(logw, np.float64))
    assert float(log_z) == pytest.approx(
        np.log(w.mean()), abs=5 * w.std() / w.mean() / np.sqrt(len(w))
    )


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="shapes disagree"):
        G.make_gmm([0.5, 0.5], [[0.0, 0.0]], [np.eye(2)])
    with pytest.raises(ValueError, match="sum to one"):
        G.make_gmm([0.5, 0.6], [[0.0], [1.0]], [[[1.0]], [[1.0]]])


@pytest.mark.parametrize("interp", [I.Linear(), I.VP()], ids=["linear", "vp"])
def test_velocity_combines_the_posterior_means(interp):
    """The fused velocity contraction equals ``alpha_dot E[x0|x] + sigma_dot E[eps|x]``, and the
    stored eigendecomposition (also of the marginal mixture) reconstructs the covariances."""
    gmm = G.asymmetric_gmm_2d()
    x = 2.0 * jax.random.normal(jax.random.key(4), (32, 2))
    t = jnp.linspace(0.05, 0.95, 32)
    x0, eps = G.posterior_means(gmm, interp, x, t)
    expected = interp.alpha_dot(t)[:, None] * x0 + interp.sigma_dot(t)[:, None] * eps
    np.testing.assert_allclose(G.velocity(gmm, x, t, interp), expected, rtol=1e-5, atol=1e-5)
    marginal = G.marginal(gmm, interp, jnp.float32(0.4))
    for mix in (gmm, marginal):
        rebuilt = jnp.einsum("kij,kj,klj->kil", mix.eigvecs, mix.eigvals, mix.eigvecs)
        np.testing.assert_allclose(rebuilt, mix.covs, atol=1e-5)


def test_covariances_must_be_positive_definite():
    with pytest.raises(ValueError, match="positive definite"):
        G.make_gmm([1.0], [[0.0, 0.0]], [[[1.0, 0.0], [0.0, -1.0]]])
