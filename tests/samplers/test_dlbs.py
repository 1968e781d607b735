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
from tts_jax.samplers.image import dlbs as D

MIXTURE = G.asymmetric_gmm_2d()
REWARD = distance_reward(MIXTURE.means[2])
NUM_STEPS, NUM_SEEDS = 10, 16
GRID = I.uniform_grid(NUM_STEPS)
DIFFUSION = I.diffusion("square", 3.0)
_CALLS: list[int] = []


def _counting_velocity(params, x, t, cond=None):
    """The exact mixture velocity on the VP path, counting its rows on the host."""
    jax.debug.callback(_CALLS.append, x.shape[0])
    return G.velocity(params, x, t, I.VP())


MODEL = FlowModel(MIXTURE, _counting_velocity, I.VP(), (2,))


def _search(key, beams: int, candidates: int, reward=REWARD, diffusion=DIFFUSION, **kw):
    """One DLBS run; returns the result and the model rows it evaluated."""
    _CALLS.clear()
    result = D.dlbs(
        key,
        MODEL,
        reward,
        GRID,
        diffusion,
        num_beams=beams,
        num_candidates=candidates,
        lookahead=1,
        **kw,
    )
    jax.effects_barrier()
    return result, sum(_CALLS)


def test_best_reward_rises_with_beams_and_candidates_at_the_stated_cost():
    best = {}
    for beams, candidates in ((1, 1), (4, 4)):
        nfe, calls = D.cost(D.Plan(beams, candidates, 1, NUM_STEPS))
        assert nfe == NUM_STEPS * beams + (NUM_STEPS - 1) * beams * candidates
        rewards = []
        for seed in range(NUM_SEEDS):
            result, counted = _search(jax.random.key(seed), beams, candidates)
            assert int(result.cost.nfe) == nfe == counted
            assert int(result.cost.reward_calls) == calls == NUM_STEPS * beams * candidates
            assert int(result.best) == 0 and (np.diff(np.asarray(result.rewards)) <= 0).all()
            rewards.append(float(result.rewards[0]))
        best[beams, candidates] = np.asarray(rewards)
    gain = best[4, 4] - best[1, 1]  # paired: the same keys
    t = gain.mean() / (gain.std(ddof=1) / np.sqrt(NUM_SEEDS))
    assert gain.mean() > 0 and t > 3, (gain.mean(), t)
    # The larger search nearly always ends in the maximizer's neighbourhood.
    assert np.median(best[4, 4]) > -0.5 and np.median(best[1, 1]) < -2.0
    # Another noise level reuses the compiled program.
    before = D._run._cache_size()
    _search(jax.random.key(0), 4, 4, diffusion=I.diffusion("square", 2.0))
    assert D._run._cache_size() == before


def test_nan_rewards_follow_the_shared_policy():
    """A NaN score is an error, or under ``drop`` never kept (here every score is NaN)."""
    reward = distance_reward(jnp.array([jnp.nan, 0.0]))  # same program as the test above
    with pytest.raises(ValueError, match="neg_sq_distance.*returned NaN in 160 evaluations"):
        _search(jax.random.key(0), 4, 4, reward=reward)
    result, _ = _search(jax.random.key(0), 4, 4, reward=reward, nan_policy="drop")
    assert int(result.info.num_nan) == NUM_STEPS * 16 and np.isneginf(result.rewards).all()


def test_lookahead_converges_to_the_ode_endpoint():
    """More lookahead steps: the estimate approaches the probability-flow ODE endpoint."""
    params = D.make_params(G.flow_model(MIXTURE, I.VP()), REWARD, GRID, DIFFUSION)
    z = jax.random.normal(jax.random.key(2), (64, 2))

    @jax.jit
    def errors(params, z, t):
        reference = D.lookahead_x0(params, z, t, 64)
        return [
            jnp.mean(jnp.linalg.norm(D.lookahead_x0(params, z, t, n) - reference, axis=-1))
            for n in (2, 8)
        ]

    coarse, fine = (float(e) for e in errors(params, z, jnp.float32(0.6)))
    assert coarse > 2 * fine > 0


def test_bad_arguments_are_named_errors():
    with pytest.raises(ValueError, match="num_beams must be an int >= 1"):
        D.sampler(0, 2, 1, 4)
    with pytest.raises(ValueError, match="data end 0"):
        D.dlbs(jax.random.key(0), MODEL, REWARD, GRID[:-1], DIFFUSION)
    with pytest.raises(ValueError, match="leading axis of size 1"):
        D.dlbs(jax.random.key(0), MODEL, REWARD, GRID, DIFFUSION, cond=jnp.zeros((3,)))
