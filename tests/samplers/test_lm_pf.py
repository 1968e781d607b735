"""Step-level particle filtering: softmax-temperature limits, exact twisted target, particle Gibbs,
entropic annealing, NaN scores, empty budgets, recompiles.

Setup (exact by enumeration): the tiny LM of ``test_lm_smc``, prompt ``[2, 3]``, steps of one
token, two steps, and an oracle step scorer that depends only on the first completion token, so
every quantity reduces to the exactly known first-token distribution ``p0``.
"""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import EOS, PINNED_JAX, VOCAB, digest, iid_tv, random_module, tiny_lm
from tests.lm_exact import enumerate_completions
from tts_jax.models.lm_reward import RewardModel, cached_prm_scorer, prm_scorer
from tts_jax.samplers.base import run as base_run
from tts_jax.samplers.base import run_with_keys
from tts_jax.samplers.lm import engine, particle_filter
from tts_jax.samplers.lm.scoring import AGGREGATIONS, score_sequences
from tts_jax.samplers.lm.state import sequences

PROMPT = np.array([2, 3], np.int32)
SEP, N, RUNS = 1, 16, 40
TABLE = np.array([0.2, 0.5, 0.8, 0.35, 0.65], np.float32)  # score of each first token


def first_token_scorer(table, tokens, step_ends):
    """Oracle PRM: every step of a completion scores ``table[first completion token]``."""
    r = table[tokens[:, PROMPT.shape[0]]]
    return jnp.where(step_ends, r[:, None], 0.0)


@functools.cache
def p0() -> np.ndarray:
    _, log_p = enumerate_completions(tiny_lm(), PROMPT, 1, [EOS])
    return np.exp(log_p)


def run(seed, table=TABLE, method=particle_filter.particle_filter, n=N, temperature=1.0, **kwargs):
    return method(
        jax.random.key(seed),
        tiny_lm(),
        PROMPT,
        first_token_scorer,
        jnp.asarray(table),
        num_particles=n,
        max_steps=2,
        max_step_tokens=1,
        max_new_tokens=2,
        temperature=temperature,
        sep_id=SEP,
        stop_ids=[EOS],
        pad_id=EOS,
        **kwargs,
    )


def _tv(a, b):
    return 0.5 * np.abs(a - b).sum()


def _histogram(values, weights=None):
    return np.bincount(values, weights=weights, minlength=len(TABLE)) / (
        len(values) if weights is None else np.sum(weights)
    )


def test_infinite_softmax_temperature_is_independent_sampling():
    first = np.concatenate(
        [np.asarray(run(s, softmax_temperature=1e6).samples.tokens)[:, 0] for s in range(RUNS)]
    )
    # Resampling uniform weights keeps the marginal; copies halve the effective sample size.
    assert _tv(_histogram(first), p0()) < 2.5 * iid_tv(p0(), RUNS * N // 2)


def test_zero_softmax_temperature_keeps_only_the_best_scored_prefix():
    chosen = []
    for s in range(RUNS):
        r = run(s, softmax_temperature=1e-3)
        first = np.asarray(r.samples.tokens)[:, 0]
        assert (first == first[0]).all()  # every particle descends from the best first step
        chosen.append(first[0])
    # The kept first token is the best-scored of N draws: P(v) = F(<= v)^N - F(< v)^N.
    order = np.argsort(TABLE)
    cdf = np.cumsum(p0()[order])
    exact = np.zeros(len(TABLE))
    exact[order] = cdf**N - np.concatenate([[0.0], cdf[:-1]]) ** N
    assert _tv(_histogram(np.array(chosen)), exact) < 2.5 * iid_tv(exact, RUNS) + 0.02


def test_twisted_weighting_targets_the_odds_tilted_first_token():
    t = 0.5
    odds = TABLE / (1 - TABLE)
    target = p0() * odds ** (1 / t)
    target /= target.sum()
    pooled, z = np.zeros(len(TABLE)), []
    for s in range(RUNS):
        r = run(s, softmax_temperature=t, weighting="twisted")
        z.append(float(r.log_evidence))
        w = np.exp(np.asarray(r.log_weights, np.float64) + z[-1])
        pooled += np.bincount(np.asarray(r.samples.tokens)[:, 0], weights=w, minlength=len(TABLE))
    # Tight enough that the absolute (Puri) weights, which double-count, fail it (TV ~ 0.09).
    assert _tv(pooled / pooled.sum(), target) < 1.5 * iid_tv(target, RUNS * N // 2)
    z_exact = np.sum(p0() * odds ** (1 / t))
    z = np.exp(np.array(z))
    assert abs(z.mean() / z_exact - 1) < 4 * z.std(ddof=1) / np.sqrt(RUNS) / z_exact + 0.02


def test_twisted_weighting_corrects_a_tempered_proposal_back_to_the_lm():
    """At LM temperature 0.7 the tokens come from the tempered LM ``q_T``; the ``p / q_T``
    correction makes ``Z_hat W_i`` an unbiased estimate of the untempered tilted measure
    ``p0(v) odds(v)^(1 / T_softmax)`` of every first token ``v`` (and ``Z_hat`` of its sum):
    z-scores over 80 independent runs of 16 particles (|z| <= 1.1 measured). Without the
    correction the estimates follow ``q_T`` (``q_T(EOS) = 0.015`` vs ``p0 = 0.037``): z = -9.4
    for EOS, -5.2 for token 4, -3.7 for ``Z``."""
    temperature, t, runs = 0.7, 1.0, 2 * RUNS
    gamma = p0() * (TABLE / (1 - TABLE)) ** (1 / t)
    est = np.zeros((runs, len(TABLE)))
    for s in range(runs):
        r = run(100 + s, temperature=temperature, softmax_temperature=t, weighting="twisted")
        w = np.exp(np.asarray(r.log_weights, np.float64) + float(r.log_evidence))
        est[s] = np.bincount(np.asarray(r.samples.tokens)[:, 0], weights=w, minlength=len(TABLE))
    z = (est.mean(axis=0) - gamma) / (est.std(axis=0, ddof=1) / np.sqrt(runs))
    z_hat = est.sum(axis=1)
    z_total = (z_hat.mean() - gamma.sum()) / (z_hat.std(ddof=1) / np.sqrt(runs))
    assert np.abs(z).max() < 4 and abs(z_total) < 4, (z, z_total)


def test_puri_weights_are_absolute_and_finished_particles_stay_finished():
    r = run(0)
    assert np.isnan(float(r.log_evidence))  # not an evidence estimate
    lw = np.asarray(r.log_weights)
    expected = np.log(TABLE / (1 - TABLE))[np.asarray(r.samples.tokens)[:, 0]]
    np.testing.assert_allclose(lw - lw.max(), expected - expected.max(), atol=1e-4)
    finished = np.asarray(r.samples.finished)
    assert (
        np.asarray(r.samples.tokens)[finished, np.asarray(r.samples.lengths)[finished] - 1] == EOS
    ).all()
    assert int(r.cost.reward_calls) <= 2 * N and int(r.info.extra["lm_calls"]) <= 1 + 2


def test_particle_gibbs_never_resamples_the_reference_away():
    r = run(3, method=particle_filter.particle_gibbs, n=2 * N, num_sweeps=2)
    reference = np.asarray(r.info.extra["references"])[0]
    tokens, length = np.asarray(r.samples.tokens)[0], int(r.samples.lengths[0])
    np.testing.assert_array_equal(tokens[:length], reference[:length])
    single = run(3, n=N)  # one sweep of the same size: the budget is split, not multiplied
    assert int(r.cost.tokens) <= 2 * N * 2 and int(single.cost.tokens) <= N * 2
    assert r.samples.tokens.shape[0] == N


def test_entropic_temperature_formula_and_run():
    lw = jnp.asarray([0.0, -10.0, -10.0, -10.0])  # ESS ~ 1 of 4
    ratio = 1.0 / 4
    t_early = float(particle_filter.entropic_temperature(lw, jnp.float32(0.1)))
    assert t_early == pytest.approx((1 - 0.1) / ratio, rel=1e-3)
    assert (
        float(particle_filter.entropic_temperature(lw, jnp.float32(0.6))) == 1.0
    )  # late: untempered
    assert (
        float(particle_filter.entropic_temperature(jnp.zeros(4), jnp.float32(0.1))) == 1.0
    )  # ESS = N
    r = run(0, method=particle_filter.entropic_particle_filter, softmax_temperature=0.1)
    scores = np.asarray(r.rewards)
    assert scores[int(r.best)] == scores.max()


def test_nan_scores_raise_or_drop_to_all_dead():
    nan_table = np.full(len(TABLE), np.nan, np.float32)
    with pytest.raises(ValueError, match="NaN"):
        run(0, table=nan_table)
    assert bool(run(0, table=nan_table, nan_policy="drop").all_dead)


def test_empty_budget_and_bad_options_are_refused():
    with pytest.raises(ValueError, match="empty budget"):
        run(0, n=0)
    with pytest.raises(ValueError, match="empty budget"):
        particle_filter.particle_filter(
            jax.random.key(0),
            tiny_lm(),
            PROMPT,
            first_token_scorer,
            jnp.asarray(TABLE),
            num_particles=4,
            max_steps=0,
            max_step_tokens=1,
            max_new_tokens=2,
        )
    with pytest.raises(ValueError, match="weighting"):
        run(0, weighting="bogus")
    with pytest.raises(ValueError, match="temperature > 0"):  # greedy: no p / q_T correction
        run(0, weighting="twisted", temperature=0.0)
    run(0, temperature=0.0)  # greedy proposals are fine for the (uncorrected) Puri weights
    with pytest.raises(ValueError, match="particles per"):
        run(0, method=particle_filter.particle_gibbs, n=N, num_sweeps=N)


def test_new_temperatures_or_weighting_compile_nothing():
    # Compile each program once first: the jit cache is shared by the whole process.
    run(0, softmax_temperature=1.0)
    run(
        0, method=particle_filter.particle_gibbs, n=2 * N, num_sweeps=2
    ).samples.tokens.block_until_ready()
    size = engine.run_jitted._cache_size()
    run(1, softmax_temperature=0.3, temperature=0.7)
    run(2, softmax_temperature=4.0, weighting="twisted", ess_threshold=0.8)
    gibbs = run(
        3, method=particle_filter.particle_gibbs, n=2 * N, num_sweeps=2, softmax_temperature=2.0
    )
    gibbs.samples.tokens.block_until_ready()
    assert engine.run_jitted._cache_size() == size


def _kernel(weighting="puri", temperature=1.0, softmax_temperature=1.0, resampler="multinomial"):
    sampler = particle_filter.pf_sampler(N, 2, 1, 2, first_token_scorer, "last", resampler)
    params = particle_filter.make_pf_params(
        tiny_lm(),
        PROMPT,
        jnp.asarray(TABLE),
        max_new_tokens=2,
        temperature=temperature,
        softmax_temperature=softmax_temperature,
        sep_id=SEP,
        stop_ids=[EOS],
        pad_id=EOS,
        weighting=weighting,
    )
    particle_filter.check_pf_params(params, sampler)
    return sampler, params


@pytest.mark.parametrize("weighting", particle_filter.WEIGHTINGS)
def test_kernel_is_the_convenience_function_vmaps_over_keys_and_compiles_once(weighting):
    sampler, params = _kernel(weighting)
    assert particle_filter.pf_sampler(N, 2, 1, 2, first_token_scorer) is sampler
    jitted = jax.jit(run_with_keys, static_argnames="sampler")
    out = jitted(*particle_filter.pf_keys(jax.random.key(5), sampler), sampler, params)
    assert digest(out) == digest(run(5, weighting=weighting))
    keys = jax.random.split(jax.random.key(6), 3)
    run_jit = jax.jit(base_run, static_argnames="sampler")
    batched = jax.jit(jax.vmap(base_run, in_axes=(0, None, None)), static_argnames="sampler")(
        keys, sampler, params
    )
    for i in range(3):
        single = run_jit(keys[i], sampler, params)
        np.testing.assert_array_equal(
            np.asarray(batched.samples.tokens[i]), np.asarray(single.samples.tokens)
        )
        np.testing.assert_array_equal(
            np.asarray(batched.info.ancestors[i]), np.asarray(single.info.ancestors)
        )
        np.testing.assert_allclose(np.asarray(batched.rewards[i]), np.asarray(single.rewards))
    compiled = run_jit._cache_size()  # jit caches are shared by every jax.jit(run) of the process
    _, hotter = _kernel(weighting, temperature=0.7, softmax_temperature=0.3)
    run_jit(keys[0], sampler, hotter).samples.tokens.block_until_ready()
    assert run_jit._cache_size() == compiled  # a new temperature compiles nothing
    if weighting == "twisted":
        with pytest.raises(ValueError, match="temperature > 0"):
            particle_filter.check_pf_params(_kernel(weighting, temperature=0.0)[1], sampler)


@functools.cache
def tiny_prm() -> RewardModel:
    config = tiny_lm().config  # outside the abstract trace of random_module
    return random_module(lambda: RewardModel(config, 2, rngs=nnx.Rngs(0)), 3)


@pytest.mark.parametrize("how", AGGREGATIONS)
def test_cached_prm_scorer_equals_rescoring_the_whole_sequence(how):
    """Ragged chunks (0 to 3 new tokens per row and update, a padded prompt) fed to the PRM's
    cache give, after every update, the aggregate of a full-prefix PRM pass."""
    n, length_max, window = 5, 9, 3
    rng = np.random.default_rng(0)
    prompt, prompt_length = jnp.asarray([2, 3, 0], jnp.int32), jnp.int32(2)
    completion = jnp.asarray(rng.integers(0, VOCAB, (n, length_max)), jnp.int32)
    marks = jnp.asarray(rng.random((n, length_max)) < 0.4)
    state = cached_prm_scorer.init(tiny_prm(), prompt, prompt_length, n, length_max)
    update = jax.jit(cached_prm_scorer.update, static_argnums=(5, 6))
    full = jax.jit(score_sequences, static_argnums=(0, 4))
    length = np.zeros(n, np.int32)
    for _ in range(4):
        length = np.minimum(length + rng.integers(0, window + 1, n), length_max).astype(np.int32)
        written = jnp.arange(length_max)[None, :] < length[:, None]
        score, state = update(
            tiny_prm(), state, completion, jnp.asarray(length), marks & written, window, how
        )
        view = types.SimpleNamespace(tokens=completion, step_ends=marks & written)
        tokens, ends = sequences(prompt, view, prompt_length)
        expected = full(prm_scorer, tiny_prm(), tokens, ends, how)
        np.testing.assert_allclose(np.asarray(score), np.asarray(expected), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.fed), length)


@pytest.mark.parametrize(
    "method, options",
    [
        (particle_filter.particle_filter, {}),
        (particle_filter.entropic_particle_filter, {}),
        (particle_filter.particle_gibbs, {"num_sweeps": 2}),
    ],
)
def test_particle_filters_with_the_cached_prm_reproduce_full_rescoring(method, options):
    """Same key: the same particles, ancestors and scores whether the PRM re-reads every
    sequence or keeps its cache in the (resampled) particle state."""

    def sample(scorer):
        return method(
            jax.random.key(4),
            tiny_lm(),
            PROMPT,
            scorer,
            tiny_prm(),
            num_particles=8,
            max_steps=4,
            max_step_tokens=2,
            max_new_tokens=7,
            temperature=1.0,
            sep_id=SEP,
            stop_ids=[EOS],
            pad_id=EOS,
            aggregation="min",
            **options,
        )

    full, cached = sample(prm_scorer), sample(cached_prm_scorer)
    assert np.asarray(full.info.resampled).any()
    np.testing.assert_array_equal(
        np.asarray(cached.samples.tokens), np.asarray(full.samples.tokens)
    )
    np.testing.assert_array_equal(
        np.asarray(cached.info.ancestors), np.asarray(full.info.ancestors)
    )
    np.testing.assert_allclose(np.asarray(cached.rewards), np.asarray(full.rewards), rtol=1e-5)
    assert int(cached.cost.reward_calls) == int(full.cost.reward_calls)


# Digests of small runs pinned before the particle filters became kernels (issue 16): the port
# keeps the key layout and every bit of the result.
PINNED = {
    "puri": ("ebed56a0c8338eb04a1deb58745a5493", "nan"),
    "twisted": ("c1737a235e2b4b1b07ed5aeba0e204dd", "0.5077250003814697"),
    "entropic": ("12b170a59fc449395675e3f7bf8eb41d", "nan"),
    "gibbs": ("9912032e636fad5b2f974f3b10180b2e", "nan"),
    "prm-puri-stratified": ("5a616febb0e309ff6b3ead4a9dfc23f5", "nan"),
    "prm-twisted": ("c42dd9f95b5e2aaa095098951effdf04", "-5.795820236206055"),
    "prm-entropic": ("4481e581dccad24fa24088b3e9c1cbb6", "nan"),
    "prm-gibbs": ("cb4cf7c032c463ed7e0e40ec568e94a8", "nan"),
}


def _pinned_case(name):
    def prm(method, **options):
        return method(
            jax.random.key(4),
            tiny_lm(),
            PROMPT,
            prm_scorer,
            tiny_prm(),
            num_particles=8,
            max_steps=4,
            max_step_tokens=2,
            max_new_tokens=7,
            temperature=1.0,
            sep_id=SEP,
            stop_ids=[EOS],
            pad_id=EOS,
            aggregation="min",
            **options,
        )

    cases = {
        "puri": lambda: run(0, softmax_temperature=0.5, temperature=0.8),
        "twisted": lambda: run(1, weighting="twisted", ess_threshold=0.8, temperature=0.7),
        "entropic": lambda: run(2, method=particle_filter.entropic_particle_filter),
        "gibbs": lambda: run(3, method=particle_filter.particle_gibbs, n=2 * N, num_sweeps=2),
        "prm-puri-stratified": lambda: prm(particle_filter.particle_filter, resampler="stratified"),
        "prm-twisted": lambda: prm(particle_filter.particle_filter, weighting="twisted"),
        "prm-entropic": lambda: prm(particle_filter.entropic_particle_filter),
        "prm-gibbs": lambda: prm(particle_filter.particle_gibbs, num_sweeps=2),
    }
    return cases[name]()


@pytest.mark.skipif(
    jax.__version__ != PINNED_JAX or jax.default_backend() != "cpu",
    reason=f"outputs pinned on jax {PINNED_JAX}, CPU",
)
@pytest.mark.parametrize("name", list(PINNED))
def test_outputs_are_bit_identical_to_the_pinned_runs(name):
    out = _pinned_case(name)
    got = (digest(out), repr(float(out.log_evidence)))
    assert got == PINNED[name], f"{name}: got {got}, pinned {PINNED[name]}"


@pytest.mark.slow
def test_gibbs_kernel_is_the_convenience_function_and_vmaps_over_keys():
    sampler = particle_filter.gibbs_sampler(2 * N, 2, 2, 1, 2, first_token_scorer)
    assert particle_filter.gibbs_sampler(2 * N, 2, 2, 1, 2, first_token_scorer) is sampler
    params = particle_filter.make_pf_params(
        tiny_lm(),
        PROMPT,
        jnp.asarray(TABLE),
        max_new_tokens=2,
        temperature=1.0,
        sep_id=SEP,
        stop_ids=[EOS],
        pad_id=EOS,
    )
    jitted = jax.jit(run_with_keys, static_argnames="sampler")
    out = jitted(*particle_filter.gibbs_keys(jax.random.key(3), sampler), sampler, params)
    assert digest(out) == PINNED["gibbs"][0]
    assert out.info.extra["references"].shape == (1, 2)
    keys = jax.random.split(jax.random.key(6), 2)
    batched = jax.vmap(base_run, in_axes=(0, None, None))(keys, sampler, params)
    for i in range(2):
        single = base_run(keys[i], sampler, params)
        np.testing.assert_array_equal(
            np.asarray(batched.samples.tokens[i]), np.asarray(single.samples.tokens)
        )
        np.testing.assert_array_equal(
            np.asarray(batched.info.extra["references"][i]),
            np.asarray(single.info.extra["references"]),
        )


def test_a_one_element_separator_set_decodes_bit_for_bit_as_sep_id():
    """``sep_ids=[s]`` is ``sep_id=s`` (the compiled program of the pinned PRM cases)."""

    def prm(**separators):
        return particle_filter.particle_filter(
            jax.random.key(1),
            tiny_lm(),
            PROMPT,
            prm_scorer,
            tiny_prm(),
            num_particles=8,
            max_steps=4,
            max_step_tokens=2,
            max_new_tokens=7,
            temperature=1.0,
            stop_ids=[EOS],
            pad_id=EOS,
            aggregation="min",
            weighting="twisted",
            **separators,
        )

    one = prm(sep_id=SEP)
    assert (np.asarray(one.samples.tokens) == SEP).sum() > 3  # separators end steps here
    assert digest(prm(sep_ids=[SEP])) == digest(one)
    assert digest(prm(sep_ids=np.asarray([SEP], np.int32))) == digest(one)
    with pytest.raises(ValueError, match="not both"):
        prm(sep_id=SEP, sep_ids=[SEP])
