"""Gaussian mixtures with exact flow fields: the analytic reference every sampler is tested on.

For data ``x0 ~ sum_k pi_k N(mu_k, Sigma_k)`` and any interpolant ``x_t = alpha x0 + sigma eps``,
the marginal is ``p_t = sum_k pi_k N(alpha mu_k, C_k)`` with ``C_k = alpha^2 Sigma_k + sigma^2 I``,
and the posterior means are, per component,

    E[x0 | x_t, k]  = mu_k + alpha Sigma_k C_k^{-1} (x - alpha mu_k)
    E[eps | x_t, k] = sigma C_k^{-1} (x - alpha mu_k)

mixed with the posterior responsibilities. The exact velocity is
``alpha_dot E[x0|x] + sigma_dot E[eps|x]``, well defined at both ends of the path.

A linear reward ``r(x) = a.x`` tilts the mixture in closed form:
``p(x) exp(lambda a.x) / Z`` is a mixture with means ``mu_k + lambda Sigma_k a`` and weights
``pi_k exp(lambda a.mu_k + 0.5 lambda^2 a' Sigma_k a) / Z``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from tts_jax.interpolants import Interpolant, Linear
from tts_jax.models.base import FlowModel

Array = jax.Array


class GMM(NamedTuple):
    """A D-dimensional Gaussian mixture (a pytree: pass it as an argument, never close over it).

    Build it with :func:`make_gmm`, which also stores the eigendecomposition of the covariances
    (``covs[k] = eigvecs[k] diag(eigvals[k]) eigvecs[k]'``): the exact velocity needs it at every
    step, and a decomposition inside the sampling loop would be recomputed per step wherever XLA
    cannot hoist it (conditionals, while loops).

    Attributes:
        weights: ``Float[K]`` mixture proportions (sum to one).
        means: ``Float[K, D]``.
        covs: ``Float[K, D, D]`` symmetric positive definite.
        eigvals: ``Float[K, D]`` eigenvalues of ``covs``.
        eigvecs: ``Float[K, D, D]`` orthonormal eigenvectors of ``covs`` (columns).
    """

    weights: Array
    means: Array
    covs: Array
    eigvals: Array
    eigvecs: Array

    @property
    def dim(self) -> int:
        return self.means.shape[-1]


def make_gmm(weights, means, covs) -> GMM:
    """Validate and build a :class:`GMM` (float32)."""
    weights = jnp.asarray(weights, jnp.float32)
    means = jnp.asarray(means, jnp.float32)
    covs = jnp.asarray(covs, jnp.float32)
    k, d = means.shape
    if weights.shape != (k,) or covs.shape != (k, d, d):
        raise ValueError(
            f"GMM shapes disagree: weights {weights.shape}, means {means.shape}, covs {covs.shape}"
        )
    if not jnp.allclose(weights.sum(), 1.0, atol=1e-5) or bool((weights < 0).any()):
        raise ValueError(f"GMM weights must be non-negative and sum to one, got {weights}")
    eigvals, eigvecs = np.linalg.eigh(np.asarray(covs, np.float64))
    if not (eigvals > 0).all():
        raise ValueError(f"GMM covariances must be positive definite, eigenvalues {eigvals}")
    return GMM(
        weights, means, covs, jnp.asarray(eigvals, jnp.float32), jnp.asarray(eigvecs, jnp.float32)
    )


def asymmetric_gmm_2d() -> GMM:
    """The default test mixture: three anisotropic components with unequal weights in 2-D."""
    return make_gmm(
        weights=[0.6, 0.3, 0.1],
        means=[[-1.5, 0.5], [1.5, 1.0], [0.5, -2.0]],
        covs=[
            [[0.30, 0.10], [0.10, 0.20]],
            [[0.15, -0.05], [-0.05, 0.25]],
            [[0.10, 0.00], [0.00, 0.10]],
        ],
    )


def _mvn_log_prob(x: Array, mean: Array, cov: Array) -> Array:
    """``log N(x; mean, cov)`` for ``x [N, D]``, one component."""
    chol = jnp.linalg.cholesky(cov)
    z = jax.scipy.linalg.solve_triangular(chol, (x - mean[None]).T, lower=True)
    d = x.shape[-1]
    return (
        -0.5 * jnp.sum(z**2, axis=0)
        - jnp.sum(jnp.log(jnp.diagonal(chol)))
        - 0.5 * d * jnp.log(2 * jnp.pi)
    )


def log_prob(gmm: GMM, x: Array) -> Array:
    """``log p(x)`` for ``x [N, D]`` -> ``[N]``."""
    comp = jax.vmap(lambda m, c: _mvn_log_prob(x, m, c))(gmm.means, gmm.covs)  # [K, N]
    return logsumexp(comp + jnp.log(gmm.weights)[:, None], axis=0)


def component_log_posterior(gmm: GMM, x: Array) -> Array:
    """Responsibilities ``log p(k | x)`` -> ``[N, K]``."""
    comp = jax.vmap(lambda m, c: _mvn_log_prob(x, m, c))(gmm.means, gmm.covs).T
    joint = comp + jnp.log(gmm.weights)[None]
    return joint - logsumexp(joint, axis=-1, keepdims=True)


def sample(gmm: GMM, key: Array, num: int) -> tuple[Array, Array]:
    """Draw ``num`` samples -> ``(x [num, D], component [num])``."""
    k_comp, k_noise = jax.random.split(key)
    comp = jax.random.categorical(k_comp, jnp.log(gmm.weights), shape=(num,))
    chol = jnp.linalg.cholesky(gmm.covs)[comp]
    z = jax.random.normal(k_noise, (num, gmm.dim))
    return gmm.means[comp] + jnp.einsum("nij,nj->ni", chol, z), comp


def marginal(gmm: GMM, interp: Interpolant, t: Array) -> GMM:
    """The mixture ``p_t`` at scalar time ``t`` (means ``alpha mu``, covariances ``C_k``)."""
    a, s = interp.alpha(t), interp.sigma(t)
    eye = jnp.eye(gmm.dim)[None]
    return GMM(
        gmm.weights,
        a * gmm.means,
        a**2 * gmm.covs + s**2 * eye,
        a**2 * gmm.eigvals + s**2,
        gmm.eigvecs,
    )


def _rotated_posterior(gmm: GMM, interp: Interpolant, x: Array, t: Array):
    """Per-component posterior pieces in each covariance's eigenbasis.

    Returns ``(a, s, resp [N, K], rotated [N, K, D], var [N, K, D])`` with
    ``rotated = Q_k' (x - a mu_k)`` and ``var = a^2 lam_k + s^2`` the eigenvalues of
    ``C_k = a^2 Sigma_k + s^2 I``, so ``C_k^{-1} (x - a mu_k) = Q_k (rotated / var)``.
    """
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])[:, None, None]  # [N, 1, 1]
    a, s = interp.alpha(t), interp.sigma(t)
    resid = x[:, None, :] - a * gmm.means[None]  # [N, K, D]
    rotated = jnp.einsum("kdi,nkd->nki", gmm.eigvecs, resid)
    var = a**2 * gmm.eigvals[None] + s**2  # [N, K, D]
    comp_lp = -0.5 * jnp.sum(rotated**2 / var + jnp.log(2 * jnp.pi * var), axis=-1)  # [N, K]
    resp = jax.nn.softmax(comp_lp + jnp.log(gmm.weights)[None], axis=-1)  # [N, K]
    return a, s, resp, rotated, var


def posterior_means(gmm: GMM, interp: Interpolant, x: Array, t: Array) -> tuple[Array, Array]:
    """Exact ``(E[x0 | x_t], E[eps | x_t])`` for ``x [N, D]`` and ``t`` scalar or ``[N]``.

    With ``Sigma_k = Q_k diag(lam_k) Q_k'`` (stored in the mixture), per component
    ``E[x0 | x, k] = mu_k + a Q_k diag(lam_k / var_k) Q_k' (x - a mu_k)`` and
    ``E[eps | x, k] = s Q_k diag(1 / var_k) Q_k' (x - a mu_k)``: no per-particle solve.
    """
    a, s, resp, rotated, var = _rotated_posterior(gmm, interp, x, t)
    mixed = resp[..., None] * rotated / var  # [N, K, D]
    x0 = resp @ gmm.means + a[:, 0] * jnp.einsum(
        "kdi,nki->nd", gmm.eigvecs, mixed * gmm.eigvals[None]
    )
    eps = s[:, 0] * jnp.einsum("kdi,nki->nd", gmm.eigvecs, mixed)
    return x0, eps


def velocity(gmm: GMM, x: Array, t: Array, interp: Interpolant = Linear()) -> Array:
    """Exact velocity field ``u(x, t) = alpha_dot E[x0|x] + sigma_dot E[eps|x]`` -> ``[N, D]``.

    One contraction over components and eigen-directions:
    ``u = alpha_dot sum_k r_k mu_k + sum_k r_k Q_k diag((alpha_dot a lam_k + sigma_dot s) / var_k)
    Q_k' (x - a mu_k)`` with ``r_k`` the responsibilities.
    """
    a, s, resp, rotated, var = _rotated_posterior(gmm, interp, x, t)
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:1])[:, None, None]
    a_dot, s_dot = interp.alpha_dot(t), interp.sigma_dot(t)
    gain = (a_dot * a * gmm.eigvals[None] + s_dot * s) / var  # [N, K, D]
    mixed = resp[..., None] * rotated * gain
    return a_dot[:, 0] * (resp @ gmm.means) + jnp.einsum("kdi,nki->nd", gmm.eigvecs, mixed)


def tilt_linear(gmm: GMM, direction: Array, lam: Array) -> tuple[GMM, Array]:
    """Closed form of ``p(x) exp(lam * direction.x) / Z``.

    Args:
        direction: ``Float[D]`` the reward's gradient ``a`` in ``r(x) = a.x``.
        lam: scalar inverse temperature.

    Returns:
        ``(tilted GMM, log Z)`` with ``Z = E_p[exp(lam a.x)]``.
    """
    direction = jnp.asarray(direction, jnp.float32)
    shift = lam * jnp.einsum("kij,j->ki", gmm.covs, direction)
    log_w = (
        jnp.log(gmm.weights)
        + lam * gmm.means @ direction
        + 0.5 * lam**2 * jnp.einsum("i,kij,j->k", direction, gmm.covs, direction)
    )
    log_z = logsumexp(log_w)
    tilted = GMM(jnp.exp(log_w - log_z), gmm.means + shift, gmm.covs, gmm.eigvals, gmm.eigvecs)
    return tilted, log_z


def mean(gmm: GMM) -> Array:
    """Mixture mean ``[D]``."""
    return gmm.weights @ gmm.means


def covariance(gmm: GMM) -> Array:
    """Mixture covariance ``[D, D]``."""
    m = mean(gmm)
    centered = gmm.means - m[None]
    return jnp.einsum("k,kij->ij", gmm.weights, gmm.covs) + jnp.einsum(
        "k,ki,kj->ij", gmm.weights, centered, centered
    )


@dataclasses.dataclass(frozen=True)
class _ExactVelocity:
    """Static apply of :func:`flow_model`: the exact velocity on a fixed interpolant."""

    interp: Interpolant

    def __call__(self, params: GMM, x: Array, t: Array, cond=None) -> Array:
        return velocity(params, x, t, self.interp)


def flow_model(gmm: GMM, interp: Interpolant = Linear()) -> FlowModel:
    """The mixture as a :class:`~tts_jax.models.base.FlowModel` with its exact velocity field."""
    return FlowModel(gmm, _ExactVelocity(interp), interp, (gmm.dim,))
