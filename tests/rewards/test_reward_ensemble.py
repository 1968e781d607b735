"""Mean-rank verifier ensemble: analytic case, ties, monotone invariance, NaN, in-graph use."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.stats import rankdata

from tts_jax.rewards.base import Reward
from tts_jax.rewards.classifier import (
    class_log_prob_reward,
    class_margin_reward,
    load_digits_heldout,
    load_digits_verifier,
)
from tts_jax.rewards.ensemble import average_ranks, mean_rank_ensemble


def _column(params, x, cond):
    """Reward = the pixel of ``x [N, D]`` at column ``params['col']``."""
    del cond
    return jnp.take(x, params["col"], axis=1)


def _exp_column(params, x, cond):
    return jnp.exp(_column(params, x, cond))


def _cubed_shifted_column(params, x, cond):
    return 1e3 * _column(params, x, cond) ** 3 - 7.0


@jax.jit
def _call(reward, x):
    return reward(x)


def test_average_ranks_matches_scipy_with_ties():
    s = jnp.array([3.0, 1.0, 3.0, -2.0, 3.0, 0.5, 1.0])
    ranks = jax.jit(average_ranks)(s)
    np.testing.assert_array_equal(ranks, rankdata(np.asarray(s), method="average"))
    r = jax.random.normal(jax.random.key(0), (257,))
    np.testing.assert_array_equal(jax.jit(average_ranks)(r), rankdata(np.asarray(r)))


def test_hand_made_case_equals_analytic_rank_mean():
    # Candidates (rows) scored by two rewards (columns) on wildly different scales.
    x = jnp.array([[0.1, -500.0], [0.9, 200.0], [0.5, 900.0], [0.5, -100.0]])
    ens = mean_rank_ensemble([Reward({"col": 0}, _column), Reward({"col": 1}, _column)])
    # Ranks by reward 0: [1, 4, 2.5, 2.5]; by reward 1: [1, 3, 4, 2].
    np.testing.assert_array_equal(_call(ens, x), [1.0, 3.5, 3.25, 2.25])


def test_invariant_to_monotone_transforms_of_a_member():
    x = jax.random.normal(jax.random.key(1), (64, 3))
    members = [Reward({"col": 0}, _column), Reward({"col": 2}, _column)]
    transformed = [Reward({"col": 0}, _exp_column), Reward({"col": 2}, _cubed_shifted_column)]
    base = _call(mean_rank_ensemble(members), x)
    np.testing.assert_array_equal(_call(mean_rank_ensemble([transformed[0], members[1]]), x), base)
    np.testing.assert_array_equal(_call(mean_rank_ensemble(transformed), x), base)


def test_nan_member_scores_rank_last_and_output_is_finite():
    x = jnp.array([[jnp.nan, 1.0], [2.0, 2.0], [-jnp.inf, 3.0]])
    ens = mean_rank_ensemble([Reward({"col": 0}, _column), Reward({"col": 1}, _column)])
    # Reward 0 ranks: NaN and -inf tie for last -> [1.5, 3, 1.5]; reward 1: [1, 2, 3].
    np.testing.assert_array_equal(_call(ens, x), [1.25, 2.5, 2.25])


def test_ensemble_of_classifier_rewards_in_jit_without_recompiling():
    from tts_jax.app.data.digits import load_digits

    data = load_digits()
    x = jnp.asarray(data.images[:30])
    traces = 0

    @jax.jit
    def score(reward, x):
        nonlocal traces
        traces += 1
        return reward(x)

    verifier, heldout = load_digits_verifier(), load_digits_heldout()
    for c in (3, 8):
        ens = mean_rank_ensemble(
            [class_log_prob_reward(verifier, c), class_margin_reward(heldout, c)]
        )
        r = score(ens, x)
        assert int(jnp.argmax(r)) in np.flatnonzero(data.labels[:30] == c)
        assert float(r.sum()) == pytest.approx(30 * 31 / 2)
    assert traces == 1


def test_empty_ensemble_raises():
    with pytest.raises(ValueError, match="at least one"):
        mean_rank_ensemble([])
