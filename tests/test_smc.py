"""The SMC engine: exact tilted targets, log-evidence, schedules, compile counts, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax import interpolants as I
from tts_jax import smc
from tts_jax.models import gmm as G
from tts_jax.rewards.analytic import linear_reward
from tts_jax.samplers.image import fk_steering as fk

from .helpers import assert_matches_gmm, gmm_expected_statistics, gmm_statistics

DIRECTION = jnp.array([1.0, -0.5])
NUM_TEMPER_STEPS = 8
TRACES = {"propagate": 0}


def tempered_propagate(key, state, k, params):
    """Random-walk Metropolis move that leaves the base mixture p invariant.

    Every x_k is then marginally p, and because the engine's cumulative potentials telescope,
    the total weight is G_K(x_K): the final target is p(x) exp(lam a.x) / Z exactly, with no
    discretization error, whatever the intermediate potentials.
    """
    TRACES["propagate"] += 1
    gmm = params["gmm"]

    def log_target(x):
        return G.log_prob(gmm, x)

    k1, k2 = jax.random.split(key)
    prop = state + 0.5 * jax.random.normal(k1, state.shape)
    accept = jnp.log(jax.random.uniform(k2, state.shape[:1])) < log_target(prop) - log_target(state)
    moved = jnp.where(accept[:, None], prop, state)
    return moved, jnp.zeros(state.shape[:1])


def tempered_log_potential(state, k, params):
    return params["lam"] * k / NUM_TEMPER_STEPS * (state @ DIRECTION)


def _tempered_run(key, lam, threshold=0.5, n=4096):
    gmm = G.asymmetric_gmm_2d()
    x0, _ = G.sample(gmm, jax.random.fold_in(key, 1), n)
    schedule = smc.ResampleSchedule(jnp.ones(NUM_TEMPER_STEPS, bool), jnp.float32(threshold))
    params = {"gmm": gmm, "lam": jnp.float32(lam)}
    return smc.run(key, x0, tempered_propagate, tempered_log_potential, schedule, params)


def test_tempered_smc_hits_the_closed_form_tilt_and_log_normalizer():
    gmm = G.asymmetric_gmm_2d()
    lam = 1.5
    tilted, log_z = G.tilt_linear(gmm, DIRECTION, lam)
    stats, logzs = [], []
    for seed in range(6):
        out = _tempered_run(jax.random.key(seed), lam)
        w = np.exp(np.asarray(out.particles.log_weights, np.float64))
        stats.append(w @ gmm_statistics(tilted, out.particles.state))
        logzs.append(float(out.log_evidence))
        assert bool(out.info.resampled.any())
    stats, logzs = np.array(stats), np.array(logzs)
    # Tolerance from the spread over independent runs (6 runs: 5 standard errors is generous).
    se = stats.std(0, ddof=1) / np.sqrt(len(stats))
    err = np.abs(stats.mean(0) - gmm_expected_statistics(tilted))
    assert (err < 5 * se + 1e-3).all(), (err, se)
    assert abs(logzs.mean() - float(log_z)) < 5 * logzs.std(ddof=1) / np.sqrt(len(logzs)) + 1e-3


def test_sweeping_lambda_and_threshold_compiles_once():
    _tempered_run(jax.random.key(0), 1.0, 0.5, n=64)
    before = TRACES["propagate"]
    _tempered_run(jax.random.key(1), 2.0, 0.9, n=64)
    _tempered_run(jax.random.key(2), 0.3, 2.0, n=64)
    assert TRACES["propagate"] == before


def _fk_weighted_statistics(potential, lam, seeds, n, schedule_fn, gmm, tilted):
    model = G.flow_model(gmm)
    reward = linear_reward(DIRECTION)
    grid = I.uniform_grid(60)
    stats, logzs = [], []
    for seed in seeds:
        out = fk.fk_steering(
            jax.random.key(seed),
            model,
            reward,
            n,
            grid,
            I.diffusion("square", 2.0),
            lam,
            schedule=schedule_fn(60),
            potential=potential,
        )
        w = np.exp(np.asarray(out.log_weights, np.float64))
        stats.append(w @ gmm_statistics(tilted, out.samples))
        logzs.append(float(out.log_evidence))
    return np.array(stats), np.array(logzs)


# max/sum/final accumulate every evaluated reward, so their last-step correction grows with the
# number of evaluation points: like Singhal et al., use a few resampling points for them.
CASES = {
    "diff-adaptive": ("diff", smc.adaptive),
    "diff-every-10": ("diff", lambda k: smc.every(k, 10)),
    "max-every-20": ("max", lambda k: smc.every(k, 20)),
    "sum-every-20": ("sum", lambda k: smc.every(k, 20)),
    "final-every-20": ("final", lambda k: smc.every(k, 20)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_smc_with_tweedie_potentials_targets_the_tilted_mixture(case):
    potential, schedule_fn = CASES[case]
    gmm = G.asymmetric_gmm_2d()
    lam = 1.2
    tilted, log_z = G.tilt_linear(gmm, DIRECTION, lam)
    stats, logzs = _fk_weighted_statistics(potential, lam, range(8), 4096, schedule_fn, gmm, tilted)
    se = stats.std(0, ddof=1) / np.sqrt(len(stats))
    err = np.abs(stats.mean(0) - gmm_expected_statistics(tilted))
    # 60 SDE steps add a small discretization bias (measured < 0.02 on the untilted mixture).
    assert (err < 5 * se + 0.03).all(), (err, se)
    assert abs(logzs.mean() - float(log_z)) < 5 * logzs.std(ddof=1) / np.sqrt(8) + 0.03


def test_lambda_zero_reproduces_the_untilted_mixture_with_unit_evidence():
    gmm = G.asymmetric_gmm_2d()
    out = fk.fk_steering(
        jax.random.key(0),
        G.flow_model(gmm),
        linear_reward(DIRECTION),
        8192,
        I.uniform_grid(60),
        I.diffusion("square", 2.0),
        0.0,
    )
    assert float(out.log_evidence) == pytest.approx(0.0, abs=1e-5)
    assert not bool(out.info.resampled.any())
    assert_matches_gmm(gmm, out.samples, slack=0.02)


def test_all_dead_is_reported_not_silently_sampled():
    def propagate(key, state, k, params):
        return state, jnp.zeros(state.shape[:1])

    def kill(state, k, params):
        return jnp.where(k >= 2, -jnp.inf, 0.0) * jnp.ones(state.shape[:1])

    out = smc.run(jax.random.key(0), jnp.zeros((8, 2)), propagate, kill, smc.adaptive(4))
    assert bool(out.all_dead)
    assert float(out.log_evidence) == -np.inf
    np.testing.assert_array_equal(np.asarray(out.info.all_dead), [False, True, True, True])


def test_nan_potentials_raise_or_drop():
    def propagate(key, state, k, params):
        return state, jnp.zeros(state.shape[:1])

    def nan_for_first(state, k, params):
        return jnp.where((jnp.arange(state.shape[0]) == 0) & (k == 1), jnp.nan, 0.0)

    with pytest.raises(ValueError, match=r"NaN at steps \[1\]"):
        smc.run(jax.random.key(0), jnp.zeros((4, 1)), propagate, nan_for_first, smc.never(2))
    out = smc.run(
        jax.random.key(0),
        jnp.zeros((4, 1)),
        propagate,
        nan_for_first,
        smc.never(2),
        nan_policy="drop",
    )
    assert float(out.particles.log_weights[0]) == -np.inf
    assert int(out.info.num_nan_potentials.sum()) == 1


def test_schedules():
    np.testing.assert_array_equal(smc.every(10, 3).mask, [0, 0, 1, 0, 0, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(
        smc.every(10, 3, start=2, end=8, include_last=False).mask, [0, 0, 0, 0, 1, 0, 0, 1, 0, 0]
    )
    with pytest.raises(ValueError, match="outside"):
        smc.at_steps(4, [4])
    with pytest.raises(ValueError, match="interval"):
        smc.every(4, 0)


def test_bad_initial_state_is_rejected():
    def propagate(key, state, k, params):
        return state, jnp.zeros(2)

    def pot(state, k, params):
        return jnp.zeros(2)

    with pytest.raises(ValueError, match="disagree"):
        smc.run(
            jax.random.key(0),
            {"a": jnp.zeros((2, 1)), "b": jnp.zeros(3)},
            propagate,
            pot,
            smc.never(1),
        )
    with pytest.raises(ValueError, match="empty"):
        smc.run(jax.random.key(0), jnp.zeros((0, 1)), propagate, pot, smc.never(1))


def _still(key, state, k, params):
    return state, jnp.zeros(state.shape[:1])


def test_log_potential_of_the_wrong_length_is_named_at_trace_time():
    """Regression: a wrong-length potential used to fail with a broadcasting TypeError deep
    inside the loop."""

    def too_short(state, k, params):
        return jnp.zeros(state.shape[0] - 1)

    def per_dimension(state, k, params):
        return state  # [N, 1], not [N]

    state = jnp.zeros((4, 1))
    with pytest.raises(ValueError, match=r"must have shape \[N\] = \(4,\).*got shape \(3,\)"):
        smc.run(jax.random.key(0), state, _still, too_short, smc.never(2))
    with pytest.raises(ValueError, match=r"got shape \(4, 1\)"):
        smc.run(jax.random.key(0), state, _still, per_dimension, smc.never(2))
    with pytest.raises(ValueError, match=r"got shape \(3,\)"):  # the un-jitted API as well
        smc.init(state, too_short)


def test_propagate_that_changes_the_particle_count_is_named():
    def duplicate(key, state, k, params):
        return jnp.concatenate([state, state]), jnp.zeros(state.shape[0])

    def bad_correction(key, state, k, params):
        return state, jnp.zeros((state.shape[0], 2))

    def flat(state, k, params):
        return jnp.zeros(state.shape[0])

    state = jnp.zeros((4, 1))
    with pytest.raises(ValueError, match="propagate returned a state with 8 particles, expected"):
        smc.run(jax.random.key(0), state, duplicate, flat, smc.never(2))
    with pytest.raises(ValueError, match=r"correction must have shape \[N\] = \(4,\)"):
        smc.run(jax.random.key(0), state, bad_correction, flat, smc.never(2))


def test_non_finite_ess_threshold_is_rejected():
    def flat(state, k, params):
        return jnp.zeros(state.shape[0])

    for bad in (np.nan, np.inf):
        schedule = smc.ResampleSchedule(np.ones(2, bool), np.float32(bad))
        with pytest.raises(ValueError, match=f"ess_threshold must be finite.*got {bad}"):
            smc.run(jax.random.key(0), jnp.zeros((4, 1)), _still, flat, schedule)


def _clock_propagate(key, state, k, params):
    """Particles ``[N, 3]``: a random walk in column 0 and a step counter in column 1, frozen
    once the counter reaches the particle's own horizon ``params["horizon"]``; column 2 counts
    every call (frozen or not) and enters no potential."""
    done = state[:, 1] >= params["horizon"]
    walk = state[:, 0] + jax.random.normal(key, state.shape[:1])
    moved = jnp.stack([walk, state[:, 1] + 1.0, state[:, 2]], axis=1)
    out = jnp.where(done[:, None], state, moved)
    return out.at[:, 2].add(1.0), jnp.zeros(state.shape[:1])


def _clock_potential(state, k, params):
    return -0.5 * state[:, 0] ** 2


def test_run_until_stops_when_finished_and_matches_the_idle_scan():
    """Up to the stop, run_until takes the steps run_scan takes (same keys); after it, run_scan's
    idle steps (frozen particles, ESS above the threshold) are exactly the no-ops run_until
    records without running them."""
    n, num_steps = 64, 12
    horizon = jnp.where(jnp.arange(n) < n // 2, 3.0, 5.0)
    params = {"horizon": horizon}
    calls = {"count": 0}

    def counting_propagate(key, state, k, params):
        calls["count"] += 1
        return _clock_propagate(key, state, k, params)

    def finished(state, params):
        return jnp.all(state[:, 1] >= params["horizon"])

    schedule = smc.ResampleSchedule(jnp.ones(num_steps, bool), jnp.float32(0.7))
    state = jnp.zeros((n, 3))
    key = jax.random.key(3)
    early = jax.jit(
        lambda: smc.run_until(
            key, state, counting_propagate, _clock_potential, schedule, params, finished=finished
        )
    )()
    full = jax.jit(
        lambda: smc.run_scan(key, state, _clock_propagate, _clock_potential, schedule, params)
    )()
    # Every particle is done after 5 steps: run_until made 5 calls, run_scan all 12.
    np.testing.assert_array_equal(early.particles.state[:, 2], 5.0)
    np.testing.assert_array_equal(full.particles.state[:, 2], float(num_steps))
    np.testing.assert_array_equal(early.particles.state[:, 1], np.asarray(horizon))
    np.testing.assert_allclose(early.particles.state[:, :2], full.particles.state[:, :2], rtol=1e-6)
    np.testing.assert_allclose(early.particles.log_weights, full.particles.log_weights, atol=1e-6)
    np.testing.assert_allclose(early.log_evidence, full.log_evidence, rtol=1e-6)
    assert not bool(np.any(np.asarray(full.info.resampled)[5:]))  # idle steps did not resample
    for got, want in zip(jax.tree.leaves(early.info), jax.tree.leaves(full.info), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    assert calls["count"] == 1  # traced once: one while-loop body, no per-step Python dispatch


def test_step_takes_a_key_or_its_split_pair_and_reports_observations():
    """``step(key)`` splits the key; ``step(split(key))`` takes the pair as is (what
    ``step_keys`` derives for a whole loop): the same step either way, raw keys included."""
    gmm = G.asymmetric_gmm_2d()
    x0, _ = G.sample(gmm, jax.random.key(1), 64)
    params = {"gmm": gmm, "lam": jnp.float32(2.0)}
    schedule = smc.ResampleSchedule(np.ones(NUM_TEMPER_STEPS, bool), np.float32(2.0))
    state = smc.init(x0, tempered_log_potential, params)

    def one(key):
        return smc.step(
            key,
            state,
            tempered_propagate,
            tempered_log_potential,
            schedule,
            params,
            "multinomial",
            observe=lambda x: jnp.max(x[:, 0]),
        )

    for key in (jax.random.key(5), jax.random.PRNGKey(5)):
        split = one(jax.random.split(key))
        for got, want in zip(jax.tree.leaves(one(key)), jax.tree.leaves(split), strict=True):
            np.testing.assert_array_equal(got, want)
    new, info = one(jax.random.key(5))
    assert bool(info.resampled) and int(new.step) == 1
    # observe sees the propagated particles, before resampling.
    moved, _ = tempered_propagate(jax.random.split(jax.random.key(5))[0], x0, 0, params)
    assert float(info.observed) == float(jnp.max(moved[:, 0]))
    pairs = smc.step_keys(jax.random.key(5), 3)
    assert pairs.shape == (3, 2)
    np.testing.assert_array_equal(
        jax.random.key_data(pairs[2]),
        jax.random.key_data(jax.random.split(jax.random.fold_in(jax.random.key(5), 2))),
    )
