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
