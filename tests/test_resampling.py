"""Resamplers: unbiased offspring counts, variance ordering, static shapes, dead particles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax import resampling

SCHEMES = ["multinomial", "stratified", "systematic", "residual"]
WEIGHTS = np.array([0.31, 0.0, 0.05, 0.22, 0.013, 0.0, 0.297, 0.11])
REPS = 4000


def _counts(name, num_samples=8, weights=WEIGHTS):
    fn = resampling.get_resampler(name)
    lw = jnp.log(jnp.asarray(weights, jnp.float32))
    keys = jax.random.split(jax.random.key(1), REPS)
    anc = jax.jit(jax.vmap(lambda k: fn(k, lw, num_samples)))(keys)
    assert anc.shape == (REPS, num_samples) and anc.dtype == jnp.int32
    return np.stack([np.bincount(a, minlength=len(weights)) for a in np.asarray(anc)])


@pytest.mark.parametrize("name", SCHEMES)
@pytest.mark.parametrize("num_samples", [8, 13])
def test_offspring_counts_are_unbiased(name, num_samples):
    counts = _counts(name, num_samples)
    expected = num_samples * WEIGHTS
    # Multinomial variance bounds every scheme's count variance; 5 standard errors of the mean.
    se = np.sqrt(num_samples * WEIGHTS * (1 - WEIGHTS) / REPS)
    np.testing.assert_array_less(np.abs(counts.mean(0) - expected), 5 * se + 1e-9)


@pytest.mark.parametrize("name", SCHEMES)
def test_zero_weight_particles_are_never_drawn(name):
    counts = _counts(name)
    assert counts[:, WEIGHTS == 0].sum() == 0


@pytest.mark.parametrize("name", ["stratified", "systematic", "residual"])
def test_low_variance_schemes_beat_multinomial(name):
    var_multi = _counts("multinomial").var(0).sum()
    assert _counts(name).var(0).sum() < 0.7 * var_multi


def test_residual_keeps_deterministic_copies():
    counts = _counts("residual")
    floors = np.floor(len(WEIGHTS) * WEIGHTS)
    assert (counts >= floors).all()


@pytest.mark.parametrize("name", SCHEMES)
def test_invalid_weights_raise_outside_jit(name):
    fn = resampling.get_resampler(name)
    with pytest.raises(ValueError, match="dead"):
        fn(jax.random.key(0), jnp.full(4, -jnp.inf), 4)
    with pytest.raises(ValueError, match="NaN"):
        fn(jax.random.key(0), jnp.array([0.0, jnp.nan, 0.0]), 3)


@pytest.mark.parametrize("name", SCHEMES)
def test_invalid_weights_inside_jit_return_the_out_of_range_sentinel(name):
    fn = resampling.get_resampler(name)
    anc = jax.jit(lambda k, lw: fn(k, lw, 5))(jax.random.key(0), jnp.full(4, -jnp.inf))
    np.testing.assert_array_equal(anc, np.full(5, 4))


def test_huge_log_weights_are_handled():
    lw = jnp.array([1e5, 1e5 - 1.0, -jnp.inf])
    anc = resampling.systematic(jax.random.key(0), lw, 1000)
    frac = np.bincount(np.asarray(anc), minlength=3) / 1000
    np.testing.assert_allclose(frac, [1 / (1 + np.exp(-1)), 1 - 1 / (1 + np.exp(-1)), 0], atol=2e-3)


def test_unknown_resampler_lists_known_ones():
    with pytest.raises(ValueError, match="multinomial"):
        resampling.get_resampler("bogus")


def _brute_search(cdf, u):
    return np.sum(np.asarray(cdf)[None, :] <= np.asarray(u)[:, None], axis=1)


@pytest.mark.parametrize("n", [300, 4099])
def test_search_matches_a_full_comparison(n):
    # Above the dense size: runs of tiny and zero weights and draws exactly at cdf values must
    # resolve as the full comparison does, never on a zero-weight particle.
    rng = np.random.default_rng(n)
    w = np.exp(3 * rng.normal(size=n))
    w[rng.random(n) < 0.2] = 0.0
    w[n // 3 : n // 3 + 100] = 1e-9
    cdf = resampling._cdf(jnp.asarray(w / w.max(), jnp.float32))
    assert np.all(np.diff(np.asarray(cdf)) >= 0) and cdf[-1] == 1.0
    u = np.concatenate(
        [rng.random(n), np.asarray(cdf)[rng.integers(0, n, n)], np.arange(n) / n]
    ).astype(np.float32)
    u = jnp.asarray(np.minimum(u, np.float32(1 - 2**-24)))
    got = jax.jit(resampling._search)(cdf, u)
    np.testing.assert_array_equal(got, _brute_search(cdf, u))
    assert not np.any(w[np.asarray(got)] == 0)


@pytest.mark.parametrize("name", SCHEMES)
def test_large_sets_match_the_weights_and_skip_dead_particles(name):
    # The O(N) paths (histograms, guide table) above the dense size: offspring counts summed
    # over repetitions match M w within 5 standard errors; dead particles never drawn.
    n, reps = 1000, 200
    rng = np.random.default_rng(3)
    w = rng.random(n) + 0.05
    w[::7] = 0.0
    w /= w.sum()
    lw = jnp.log(jnp.asarray(w, jnp.float32))
    fn = resampling.get_resampler(name)
    keys = jax.random.split(jax.random.key(2), reps)
    anc = np.asarray(jax.jit(jax.vmap(lambda k: fn(k, lw, n)))(keys))
    counts = np.bincount(anc.ravel(), minlength=n + 1)
    assert counts[n] == 0 and counts[:n][w == 0].sum() == 0
    se = np.sqrt(reps * n * w * (1 - w))
    np.testing.assert_array_less(np.abs(counts[:n] - reps * n * w), 5 * se + 1e-9)


def _keep_first(key, log_weights, num_samples):
    """A resampler written outside the package (not a useful one)."""
    return jnp.zeros((num_samples,), jnp.int32)


def test_resamplers_are_values_and_names_are_aliases():
    for name, fn in resampling.RESAMPLERS.items():
        assert resampling.get_resampler(name) is fn is getattr(resampling, name)
        assert resampling.get_resampler(fn) is fn
    assert resampling.get_resampler(_keep_first) is _keep_first
    # The SMC engine takes it as it takes the package's own.
    from tts_jax import smc

    def propagate(key, state, k, params):
        return state + jax.random.normal(key, state.shape), jnp.zeros(state.shape[:1])

    def log_potential(state, k, params):
        return -jnp.abs(state[:, 0])

    state, schedule = jnp.zeros((8, 1)), smc.every(3, 1)
    out = smc.run(jax.random.key(0), state, propagate, log_potential, schedule, None, _keep_first)
    np.testing.assert_array_equal(np.asarray(out.info.ancestors), 0)
