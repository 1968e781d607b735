"""Feynman-Kac correctors (docs/algorithms.md 6.3) against exact targets on 2-D Gaussian mixtures.

The targets: the product ``q_A q_B`` of two mixtures is a mixture in closed form (its moments are
exact); the annealed ``q_A^2`` and the guidance mixture ``q_A^w q_B^{1 - w}`` are normalized on a
fine 2-D grid. The exact velocities of ``models.gmm`` on the VP path give exact scores, so what
remains is the SDE's time discretization and Monte Carlo error. The Monte Carlo error is measured
honestly: ``R`` independent runs (``vmap`` over keys), each a weighted estimate, and the standard
error of their mean (resampling makes the particles of one run dependent, so the ESS of one run
would understate it). The same runs read without weights (no resampling, uniform weights: the
bare target-score SDE) miss the target: the correction is what makes the method right.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import gmm_expected_statistics
from tts_jax import interpolants as I
from tts_jax import smc
from tts_jax.models import gmm as G
from tts_jax.rewards.base import Reward
from tts_jax.samplers.base import run
from tts_jax.samplers.image import fk_correctors as F

A = G.asymmetric_gmm_2d()
B = G.make_gmm(  # three components, as A: every target below shares one compiled program
    [0.49, 0.49, 0.02],
    [[0.0, 0.5], [1.5, -1.0], [3.0, 3.0]],
    [[[0.5, 0.0], [0.0, 0.5]], [[0.4, 0.1], [0.1, 0.3]], [[0.2, 0.0], [0.0, 0.2]]],
)
VP = I.VP()
MODEL_A, MODEL_B = G.flow_model(A, VP), G.flow_model(B, VP)
NUM_RUNS, NUM_PARTICLES, NUM_STEPS = 8, 512, 200
GRID = I.uniform_grid(NUM_STEPS)
_run_many = jax.jit(jax.vmap(run, in_axes=(0, None, None)), static_argnums=1)


def product_gmm(a: G.GMM, b: G.GMM) -> tuple[G.GMM, float]:
    """``q_a q_b / Z`` as a mixture of ``K_a K_b`` components, and ``log Z`` (float64)."""
    log_w, means, covs = [], [], []
    for i in range(len(a.weights)):
        for j in range(len(b.weights)):
            pi = np.linalg.inv(np.asarray(a.covs[i], np.float64))
            pj = np.linalg.inv(np.asarray(b.covs[j], np.float64))
            cov = np.linalg.inv(pi + pj)
            means.append(cov @ (pi @ np.asarray(a.means[i]) + pj @ np.asarray(b.means[j])))
            covs.append(cov)
            d = np.asarray(a.means[i] - b.means[j], np.float64)
            c = np.asarray(a.covs[i] + b.covs[j], np.float64)
            log_w.append(
                np.log(a.weights[i] * b.weights[j])
                - 0.5 * d @ np.linalg.solve(c, d)
                - 0.5 * np.log(np.linalg.det(2 * np.pi * c))
            )
    log_w = np.asarray(log_w)
    log_z = np.logaddexp.reduce(log_w)
    return G.make_gmm(np.exp(log_w - log_z), means, covs), float(log_z)


def _statistics(x: np.ndarray) -> np.ndarray:
    """``[x1, x2, x1^2, x1 x2, x2^2]`` per sample."""
    return np.stack(
        [x[..., 0], x[..., 1], x[..., 0] ** 2, x[..., 0] * x[..., 1], x[..., 1] ** 2], -1
    )


def _log_prob(gmm: G.GMM, x: np.ndarray) -> np.ndarray:
    """``log q(x)`` of a mixture in float64 NumPy (for the grid of :func:`_grid_statistics`)."""
    comps = []
    for w, m, c in zip(*(np.asarray(a, np.float64) for a in gmm[:3]), strict=True):
        d = x - m
        quad = np.einsum("ni,ij,nj->n", d, np.linalg.inv(c), d)
        comps.append(np.log(w) - 0.5 * quad - 0.5 * np.log(np.linalg.det(2 * np.pi * c)))
    return np.logaddexp.reduce(np.stack(comps), axis=0)


def _grid_statistics(log_density) -> np.ndarray:
    """Exact expectations of :func:`_statistics` under ``exp(log_density)`` normalized on a
    401 x 401 grid over ``[-5, 5]^2`` (the targets have no mass outside)."""
    axis = np.linspace(-5.0, 5.0, 401)
    pts = np.stack(np.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    lp = log_density(pts)
    p = np.exp(lp - lp.max())
    return (p / p.sum()) @ _statistics(pts)


def _runs(target: F.Target, schedule) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``R`` runs: (weighted estimates [R, 5], unweighted estimates [R, 5], log Z [R])."""
    sampler = F.sampler(NUM_PARTICLES, NUM_STEPS, len(target.models))
    params = F.make_params(target, GRID, schedule=schedule)
    F.check_params(params, sampler)
    keys = jax.random.split(jax.random.key(7), NUM_RUNS)
    result = _run_many(keys, sampler, params)
    w = np.exp(np.asarray(result.log_weights, np.float64))
    stats = _statistics(np.asarray(result.samples, np.float64))
    weighted = np.einsum("rn,rns->rs", w, stats)
    return weighted, stats.mean(axis=1), np.asarray(result.log_evidence, np.float64)


def _check(weighted: np.ndarray, exact: np.ndarray, slack: float) -> np.ndarray:
    """The mean of the ``R`` run estimates equals ``exact`` within 4 standard errors (from the
    spread of the runs) plus the discretization ``slack``; returns the errors in standard
    errors."""
    est = weighted.mean(axis=0)
    se = weighted.std(axis=0, ddof=1) / np.sqrt(len(weighted))
    err = np.abs(est - exact)
    assert (err <= 4 * se + slack).all(), f"estimate {est} vs exact {exact}: error {err}, se {se}"
    return err / se


def _unweighted_misses(unweighted: np.ndarray, exact: np.ndarray, margin: float) -> None:
    """The bare SDE's estimate is off by more than ``margin`` in some statistic, far beyond its
    standard error."""
    est = unweighted.mean(axis=0)
    se = unweighted.std(axis=0, ddof=1) / np.sqrt(len(unweighted))
    off = np.abs(est - exact)
    assert (off > np.maximum(margin, 6 * se)).any(), f"unweighted {est} vs exact {exact}"


@pytest.fixture(scope="module")
def product_runs():
    target = F.product(MODEL_A, MODEL_B)
    return _runs(target, smc.adaptive(NUM_STEPS)), _runs(target, smc.never(NUM_STEPS))


def test_product_matches_the_closed_form_mixture(product_runs):
    (weighted, _, log_z), (_, unweighted, _) = product_runs
    exact_gmm, log_z0 = product_gmm(A, B)
    exact = gmm_expected_statistics(exact_gmm)[:5]  # mean and upper-triangle second moments
    _check(weighted, exact, slack=0.05)
    _unweighted_misses(unweighted, exact, margin=0.15)
    # log Z_0 - log Z_1: Z_1 = int N(0, I)^2 = 1 / (4 pi) (the noise end, up to alpha(1)^2).
    assert (
        abs(log_z.mean() - (log_z0 + np.log(4 * np.pi)))
        < 4 * log_z.std() / np.sqrt(len(log_z)) + 0.3
    )


@pytest.fixture(scope="module")
def guided_runs():
    target = F.geometric(MODEL_A, MODEL_B, 2.5)
    return _runs(target, smc.adaptive(NUM_STEPS)), _runs(target, smc.never(NUM_STEPS))


def test_guidance_matches_the_geometric_mixture(guided_runs):
    (weighted, _, _), (_, unweighted, _) = guided_runs
    exact = _grid_statistics(lambda x: 2.5 * _log_prob(A, x) - 1.5 * _log_prob(B, x))
    _check(weighted, exact, slack=0.03)
    _unweighted_misses(unweighted, exact, margin=0.1)


def test_annealing_matches_the_grid_normalized_power():
    """``q^2`` run as the two-term target ``q^2 q^0`` (the compiled program of the other tests);
    the one-term :func:`annealed` computes the same score and rate (below)."""
    target = F.Target((MODEL_A, MODEL_A), (None, None), np.array([2.0, 0.0], np.float32))
    weighted, _, _ = _runs(target, smc.adaptive(NUM_STEPS))
    _, unweighted, _ = _runs(target, smc.never(NUM_STEPS))
    exact = _grid_statistics(lambda x: 2.0 * _log_prob(A, x))
    _check(weighted, exact, slack=0.05)
    _unweighted_misses(unweighted, exact, margin=0.05)


def test_annealed_target_score_and_rate():
    """The one-term :func:`annealed` target: ``S = beta s`` and the rate
    ``beta (beta - 1) g^2 / 2 |s|^2`` (what the two-term form above computes)."""
    x, t = jax.random.normal(jax.random.key(5), (64, 2)), jnp.float32(0.3)

    @jax.jit  # one compile instead of a dispatch per operation
    def both(x, t):
        score = I.velocity_to_score(VP, MODEL_A.velocity(x, t), x, t)
        return F.scores_and_increment(F.annealed(MODEL_A, 2.0), x, t), score

    (total, rate, _, g2), score = both(x, t)
    np.testing.assert_allclose(np.asarray(total), 2.0 * np.asarray(score), rtol=1e-5, atol=1e-6)
    expected = 2.0 * 0.5 * g2 * jnp.sum(score**2, axis=-1)
    np.testing.assert_allclose(np.asarray(rate), np.asarray(expected), rtol=1e-5)


def test_guided_exponents_sweep_without_recompiling(guided_runs):
    sampler = F.sampler(NUM_PARTICLES, NUM_STEPS, 2)
    before = _run_many._cache_size()
    params = F.make_params(F.geometric(MODEL_A, MODEL_B, np.float32(1.5)), GRID)
    _run_many(jax.random.split(jax.random.key(1), NUM_RUNS), sampler, params)
    assert _run_many._cache_size() == before


def test_non_finite_increments_follow_the_nan_policy(guided_runs):
    """A model returning NaN scores: its particles are dropped and counted by the engine, and the
    host check makes it an error (under ``drop``: every particle died here, also an error)."""
    broken = G.flow_model(B._replace(means=B.means.at[0].set(jnp.nan)), VP)
    sampler = F.sampler(NUM_PARTICLES, NUM_STEPS, 2)
    params = F.make_params(F.product(MODEL_A, broken), GRID)
    result = _run_many(jax.random.split(jax.random.key(1), NUM_RUNS), sampler, params)
    first = jax.tree.map(lambda leaf: leaf[0], result)  # the same compiled program, run 0
    nan_weights = np.asarray(first.info.extra["num_nan_weights"])
    assert nan_weights[0] == NUM_PARTICLES and nan_weights[1:].sum() == 0  # each counted once
    with pytest.raises(
        ValueError, match=r"non-finite log-weight increments .* first at step 1 \(512 particles"
    ):
        F.check_result(first, None, "raise")
    with pytest.raises(ValueError, match="every particle has zero weight"):
        F.check_result(first, None, "drop")


def test_bad_arguments_are_named_errors():
    grid = I.uniform_grid(8)
    with pytest.raises(ValueError, match="alpha'/alpha is infinite"):
        F.fk_correctors(jax.random.key(0), F.annealed(G.flow_model(A), 2.0), 8, grid)
    with pytest.raises(ValueError, match="sum to a positive number"):
        F.fk_correctors(jax.random.key(0), F.annealed(MODEL_A, -1.0), 8, grid)
    with pytest.raises(ValueError, match="exponents must be finite"):
        F.fk_correctors(jax.random.key(0), F.annealed(MODEL_A, np.nan), 8, grid)
    with pytest.raises(ValueError, match="share one path"):
        F.fk_correctors(jax.random.key(0), F.product(MODEL_A, G.flow_model(B)), 8, grid)
    with pytest.raises(ValueError, match="data end 0"):
        F.fk_correctors(jax.random.key(0), F.annealed(MODEL_A, 2.0), 8, grid[:-1])


def test_guided_digits_dit_runs_finite():
    """Guidance on the embedded digits DiT (VP-converted): one short run, finite float32."""
    from tts_jax.models.base import linear_to_vp
    from tts_jax.models.zoo import load_digits_flow

    model = linear_to_vp(load_digits_flow())
    target = F.guided(model, 2.0, jnp.int32(3), None)
    reward = Reward({}, _brightness, "brightness")
    result = F.fk_correctors(jax.random.key(0), target, 4, I.uniform_grid(3), reward=reward)
    assert result.samples.shape == (4, 1, 8, 8) and result.log_weights.dtype == jnp.float32
    assert np.isfinite(np.asarray(result.samples)).all()
    assert np.isfinite(np.asarray(result.log_weights)).all()
    assert int(result.cost.nfe) == 2 * 3 * 4 and int(result.cost.reward_calls) == 4
    np.testing.assert_allclose(
        np.asarray(reward(result.samples)), np.asarray(result.rewards), rtol=1e-5, atol=1e-6
    )
    assert int(result.best) == int(np.argmax(np.asarray(result.rewards)))


def _brightness(params, x, cond=None):
    return jnp.mean(x.reshape(x.shape[0], -1), axis=-1)
