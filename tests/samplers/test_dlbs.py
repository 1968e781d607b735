"""Diffusion latent beam search (docs/algorithms.md 6.4) on the 2-D Gaussian mixture.

The reward ``-|x - c|^2`` with ``c`` the mean of the rare component (weight 0.1) has its maximum
at ``c``; plain sampling rarely lands near it. Over paired seeds (the same keys for every size),
more beams and candidates find better samples. The cost in ``result.cost`` is checked against the
formula and against the model calls actually made (counted on the host).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax import interpolants as I
from tts_jax.models import gmm as G
from tts_jax.models.base import FlowModel
from tts_jax.rewards.analytic import distance_reward
from tts_jax.samplers.base import run
from tts_jax.samplers.image import dlbs as D

MIXTURE = G.asymmetric_gmm_2d()
MODEL = G.flow_model(MIXTURE, I.VP())
REWARD = distance_reward(MIXTURE.means[2])
NUM_STEPS, NUM_SEEDS = 10, 16
GRID = I.uniform_grid(NUM_STEPS)
DIFFUSION = I.diffusion("square", 3.0)
_run_many = jax.jit(jax.vmap(run, in_axes=(0, None, None)), static_argnums=1)


def _best_rewards(num_beams: int, num_candidates: int) -> np.ndarray:
    sampler = D.sampler(num_beams, num_candidates, 1, NUM_STEPS)
    params = D.make_params(MODEL, REWARD, GRID, DIFFUSION)
    D.check_params(params, sampler)
    keys = jax.random.split(jax.random.key(11), NUM_SEEDS)
    result = _run_many(keys, sampler, params)
    expected = D.cost(D.Plan(num_beams, num_candidates, 1, NUM_STEPS))
    assert (np.asarray(result.cost.nfe) == expected[0]).all()
    assert (np.asarray(result.cost.reward_calls) == expected[1]).all()
    assert (np.asarray(result.best) == 0).all()  # the beams come back best first
    return np.asarray(result.rewards[:, 0], np.float64)


def test_best_reward_rises_with_beams_and_candidates():
    plain, large = _best_rewards(1, 1), _best_rewards(4, 4)
    gain = large - plain  # paired: the same keys
    t = gain.mean() / (gain.std(ddof=1) / np.sqrt(NUM_SEEDS))
    assert gain.mean() > 0 and t > 3, (gain.mean(), t)
    # The largest search nearly always ends at the maximizer's neighbourhood.
    assert np.median(large) > -0.5 and np.median(plain) < -2.0


def _counting_velocity(params, x, t, cond=None):
    jax.debug.callback(_CALLS.append, x.shape[0])
    return G.velocity(params, x, t, I.VP())


_CALLS: list[int] = []


def test_cost_equals_the_formula_and_the_calls_made():
    model = FlowModel(MIXTURE, _counting_velocity, I.VP(), (2,))
    b, k, la, s = 3, 2, 3, 4
    _CALLS.clear()
    result = D.dlbs(
        jax.random.key(0),
        model,
        REWARD,
        I.uniform_grid(s),
        DIFFUSION,
        num_beams=b,
        num_candidates=k,
        lookahead=la,
    )
    jax.effects_barrier()
    assert int(result.cost.nfe) == s * b + (s - 1) * b * k * la == sum(_CALLS)
    assert int(result.cost.reward_calls) == s * b * k
    assert np.asarray(result.info.extra["nfe"])[-1] == int(result.cost.nfe)
    assert result.samples.shape == (b, 2)
    assert (np.diff(np.asarray(result.rewards)) <= 0).all()


def test_lookahead_converges_to_the_ode_endpoint():
    """More lookahead steps: the estimate approaches the probability-flow ODE endpoint."""
    params = D.make_params(MODEL, REWARD, GRID, DIFFUSION)
    z = jax.random.normal(jax.random.key(2), (64, 2))
    t = jnp.float32(0.6)
    estimate = jax.jit(D.lookahead_x0, static_argnums=3)
    reference = estimate(params, z, t, 256)
    errors = [
        float(jnp.mean(jnp.linalg.norm(estimate(params, z, t, n) - reference, axis=-1)))
        for n in (2, 8, 32)
    ]
    assert errors[0] > 2 * errors[1] > 4 * errors[2]


def test_bad_arguments_are_named_errors():
    with pytest.raises(ValueError, match="num_beams must be an int >= 1"):
        D.sampler(0, 2, 1, 4)
    with pytest.raises(ValueError, match="data end 0"):
        D.dlbs(jax.random.key(0), MODEL, REWARD, GRID[:-1], DIFFUSION)
    with pytest.raises(ValueError, match="leading axis of size 1"):
        D.dlbs(jax.random.key(0), MODEL, REWARD, GRID, DIFFUSION, cond=jnp.zeros((3,)))
