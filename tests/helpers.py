"""Statistical assertions shared by the tests: tolerances come from the sample size."""

from __future__ import annotations

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np

from tts_jax.models import gmm as G


def weighted_moments(values: np.ndarray, weights: np.ndarray | None = None):
    """Weighted mean of ``values [N, ...]`` and its standard error (Kish effective sample size)."""
    values = np.asarray(values, np.float64)
    w = np.ones(len(values)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    mean = np.tensordot(w, values, axes=1)
    var = np.tensordot(w, (values - mean) ** 2, axes=1)
    n_eff = 1.0 / np.sum(w**2)
    return mean, np.sqrt(var / n_eff)


def gmm_statistics(gmm: G.GMM, x) -> np.ndarray:
    """Per-sample statistics whose exact expectations under ``gmm`` are known in closed form:
    ``x`` (-> mean), ``x x'`` upper triangle (-> second moments), responsibilities ``p(k|x)``
    (-> mixture weights)."""
    x = jnp.asarray(x)
    d = x.shape[-1]
    iu = np.triu_indices(d)
    outer = (x[:, :, None] * x[:, None, :])[:, iu[0], iu[1]]
    resp = jnp.exp(G.component_log_posterior(gmm, x))
    return np.concatenate([np.asarray(x), np.asarray(outer), np.asarray(resp)], axis=1)


def gmm_expected_statistics(gmm: G.GMM) -> np.ndarray:
    d = gmm.dim
    iu = np.triu_indices(d)
    m = np.asarray(G.mean(gmm))
    second = np.asarray(G.covariance(gmm)) + np.outer(m, m)
    return np.concatenate([m, second[iu], np.asarray(gmm.weights)])


def assert_matches_gmm(gmm: G.GMM, x, weights=None, num_se: float = 5.0, slack: float = 0.0):
    """Mean, second moments and component proportions of (weighted) samples ``x`` match ``gmm``
    within ``num_se`` standard errors (plus an optional absolute ``slack`` for discretization)."""
    est, se = weighted_moments(gmm_statistics(gmm, x), weights)
    expected = gmm_expected_statistics(gmm)
    err = np.abs(est - expected)
    bound = num_se * se + slack
    assert (err <= bound).all(), (
        f"statistics {est} vs exact {expected}: error {err} > bound {bound}"
    )


def run_on_host_devices(script: str, num_devices: int, marker: str) -> None:
    """Run ``script`` in a fresh Python with ``num_devices`` CPU devices (the XLA flag must be set
    before jax starts) from the repository root; assert it succeeds and prints ``marker``."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={num_devices}",
        JAX_PLATFORMS="cpu",
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    assert marker in out.stdout
