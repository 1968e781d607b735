"""Search baselines: best-of-N, votes, beam search (with duplicate filtering), DVTS, the PRM
adapter, budget accounting, NaN scores, empty budgets, recompiles.

Same tiny setup as ``test_lm_pf``: one-token steps, two steps, and an oracle scorer of the first
completion token, so each selection can be checked exactly against the scores it saw.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from tests.helpers import EOS, PINNED_JAX, VOCAB, digest, random_module, tiny_lm
from tts_jax.models.lm_reward import RewardModel, cached_prm_scorer, prm_scorer, prm_scores
from tts_jax.samplers.base import run as base_run
from tts_jax.samplers.base import run_with_keys
from tts_jax.samplers.lm import search as lm_search
from tts_jax.samplers.lm.answers import select
from tts_jax.samplers.lm.scoring import aggregate, host_scorer

from .test_lm_pf import PROMPT, SEP, TABLE, first_token_scorer, tiny_prm

N, BEAM = 16, 4


def run(
    method,
    seed=0,
    table=TABLE,
    n=N,
    scorer=first_token_scorer,
    scorer_params=None,
    temperature=1.0,
    **kwargs,
):
    params = jnp.asarray(table) if scorer_params is None else scorer_params
    return method(
        jax.random.key(seed),
        tiny_lm(),
        PROMPT,
        scorer,
        params,
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


def test_grouped_top_k_and_duplicates():
    scores = jnp.asarray([0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.6])
    np.testing.assert_array_equal(
        lm_search.grouped_top_k(scores, jnp.int32(1), jnp.int32(2)), [1, 1, 1, 1, 6, 6, 6, 6]
    )
    np.testing.assert_array_equal(
        lm_search.grouped_top_k(scores, jnp.int32(2), jnp.int32(1)), [1, 1, 1, 1, 6, 6, 6, 6]
    )
    np.testing.assert_array_equal(
        lm_search.grouped_top_k(scores, jnp.int32(4), jnp.int32(1)), [1, 1, 3, 3, 4, 4, 6, 6]
    )
    tokens = jnp.asarray([[1, 2], [1, 2], [1, 3], [1, 2]])
    lengths = jnp.asarray([2, 2, 2, 1])
    np.testing.assert_array_equal(
        lm_search.duplicates(tokens, lengths, jnp.int32(1)), [False, True, False, False]
    )
    np.testing.assert_array_equal(
        lm_search.duplicates(tokens, lengths, jnp.int32(2)), [False, True, False, False]
    )


def test_best_of_n_budget_and_votes():
    r = run(lm_search.best_of_n)
    first = np.asarray(r.samples.tokens)[:, 0]
    np.testing.assert_allclose(np.asarray(r.rewards), TABLE[first])
    assert int(r.best) == int(np.argmax(TABLE[first]))
    assert int(r.cost.tokens) == int(np.asarray(r.samples.lengths).sum())  # nothing discarded
    assert int(r.cost.reward_calls) == N and int(r.info.extra["lm_calls"]) <= 1 + 2
    answers = [int(t) for t in first]
    counts = np.bincount(first, minlength=VOCAB)
    assert first[lm_search.majority_vote(r, answers)] == np.argmax(counts)
    assert first[lm_search.weighted_best_of_n(r, answers)] == np.argmax(counts * TABLE)


@pytest.mark.parametrize("dedup", [False, True])
def test_beam_search_keeps_the_top_scored_beams(dedup):
    r = run(lm_search.beam_search, seed=1, beam_width=BEAM, dedup=dedup)
    scores = np.asarray(r.info.extra["scores"])[0]
    ancestors = np.asarray(r.info.extra["ancestors"])[0]
    kept = ancestors[::BEAM]
    np.testing.assert_array_equal(ancestors, np.repeat(kept, BEAM))
    if not dedup:
        assert np.sort(scores[kept]).tolist() == np.sort(scores)[-N // BEAM :].tolist()
    else:
        # Distinct first steps first: as many distinct ones as exist, up to N / BEAM.
        distinct = len(set(scores.tolist()))
        assert len(set(scores[kept].tolist())) == min(N // BEAM, distinct)
        assert scores[kept].max() == scores.max()
    assert int(r.cost.reward_calls) >= N


def test_dvts_subtrees_stay_independent_and_greedy():
    r = run(lm_search.dvts, seed=2, beam_width=BEAM)
    scores = np.asarray(r.info.extra["scores"])[0]
    ancestors = np.asarray(r.info.extra["ancestors"])[0]
    groups = np.arange(N) // BEAM
    np.testing.assert_array_equal(ancestors // BEAM, groups)
    np.testing.assert_array_equal(scores[ancestors], scores.reshape(-1, BEAM).max(1)[groups])


def test_prm_adapter_scores_with_the_reward_model_in_graph():
    config = tiny_lm().config
    prm = random_module(lambda: RewardModel(config, 2, rngs=nnx.Rngs(0)), 3)
    r = run(lm_search.best_of_n, scorer=prm_scorer, scorer_params=prm)
    tokens = np.concatenate([np.tile(PROMPT, (N, 1)), np.asarray(r.samples.tokens)], axis=1)
    ends = np.zeros(tokens.shape, bool)
    lengths = np.asarray(r.samples.lengths)
    ends[np.arange(N), PROMPT.shape[0] + lengths - 1] = True  # the last step's end
    expected = jax.jit(prm_scores)(prm, jnp.asarray(tokens), jnp.asarray(ends))
    np.testing.assert_allclose(np.asarray(r.rewards), np.asarray(expected).max(1), atol=1e-5)


@pytest.mark.parametrize(
    "method, options",
    [
        (lm_search.best_of_n, {"aggregation": "model"}),
        (lm_search.beam_search, {"beam_width": 4, "aggregation": "prod"}),
        (lm_search.dvts, {"beam_width": 2, "aggregation": "last"}),
    ],
)
def test_searches_with_the_cached_prm_reproduce_full_rescoring(method, options):
    """Same key: the same selections and scores whether the PRM re-reads every sequence or is
    fed one step at a time from its cache (best-of-N reads the cache's aggregate at the end)."""

    def search(scorer):
        return method(
            jax.random.key(5),
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
            **options,
        )

    full, cached = search(prm_scorer), search(cached_prm_scorer)
    np.testing.assert_array_equal(
        np.asarray(cached.samples.tokens), np.asarray(full.samples.tokens)
    )
    np.testing.assert_array_equal(
        np.asarray(cached.info.extra["ancestors"]), np.asarray(full.info.extra["ancestors"])
    )
    np.testing.assert_allclose(np.asarray(cached.rewards), np.asarray(full.rewards), rtol=1e-5)
    assert np.ptp(np.asarray(full.rewards)) > 0  # the PRM tells the particles apart
    assert int(cached.cost.reward_calls) == int(full.cost.reward_calls)


def test_nan_scores_raise_or_are_never_selected():
    table = TABLE.copy()
    table[3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        run(lm_search.beam_search, seed=1, table=table, beam_width=BEAM)
    r = run(lm_search.best_of_n, seed=1, table=table, nan_policy="drop")
    assert not np.isnan(np.asarray(r.rewards)[int(r.best)])


def test_empty_budget_and_bad_beam_width_are_refused():
    with pytest.raises(ValueError, match="empty budget"):
        run(lm_search.best_of_n, n=0)
    with pytest.raises(ValueError, match="beam_width"):
        run(lm_search.beam_search, beam_width=3)


def test_every_method_and_temperature_share_one_compiled_program():
    run(lm_search.best_of_n)  # compiles the one program (the jit cache is shared process-wide)
    size = lm_search._run_with_keys._cache_size()
    run(lm_search.beam_search, seed=4, beam_width=BEAM, temperature=0.5)
    run(lm_search.dvts, seed=5, beam_width=2, dedup=True, temperature=1.5)
    run(lm_search.beam_search, seed=6, beam_width=8).samples.tokens.block_until_ready()
    assert lm_search._run_with_keys._cache_size() == size


def _kernel(num_groups, keep, temperature=1.0, dedup=False):
    sampler = lm_search.search_sampler(N, 2, 1, 2, first_token_scorer)
    params = lm_search.make_search_params(
        tiny_lm(),
        PROMPT,
        jnp.asarray(TABLE),
        num_groups=num_groups,
        keep=keep,
        score_steps=num_groups < N,
        dedup=dedup,
        temperature=temperature,
        sep_id=SEP,
        stop_ids=[EOS],
        pad_id=EOS,
    )
    lm_search.check_search_params(params, sampler, N)
    return sampler, params


@pytest.mark.parametrize(
    "method, plan, options",
    [
        (lm_search.best_of_n, (N, 1), {}),
        (lm_search.beam_search, (1, N // BEAM), {"beam_width": BEAM}),
        (lm_search.dvts, (N // 2, 1), {"beam_width": 2, "dedup": True}),
    ],
)
def test_kernel_is_the_convenience_function_vmaps_over_keys_and_compiles_once(
    method, plan, options
):
    sampler, params = _kernel(*plan, dedup=options.get("dedup", False))
    assert lm_search.search_sampler(N, 2, 1, 2, first_token_scorer) is sampler
    jitted = jax.jit(run_with_keys, static_argnames="sampler")
    out = jitted(*lm_search.search_keys(jax.random.key(7), sampler), sampler, params)
    assert digest(out) == digest(run(method, seed=7, **options))
    keys = jax.random.split(jax.random.key(8), 3)
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
            np.asarray(batched.info.extra["ancestors"][i]),
            np.asarray(single.info.extra["ancestors"]),
        )
    compiled = run_jit._cache_size()  # jit caches are shared by every jax.jit(run) of the process
    _, hotter = _kernel(*plan, temperature=0.6)
    run_jit(keys[0], sampler, hotter).samples.tokens.block_until_ready()
    assert run_jit._cache_size() == compiled  # a new temperature compiles nothing
    with pytest.raises(ValueError, match="must divide"):
        lm_search.check_search_params(_kernel(3, 1)[1], sampler, N)


def test_aggregations_of_per_step_scores():
    scores = jnp.asarray([[0.0, 0.9, 0.0, 0.5, 0.8], [0.7, 0.0, 0.6, 0.0, 0.0]])
    ends = jnp.asarray([[False, True, False, True, True], [True, False, True, False, False]])
    expected = {"last": [0.8, 0.6], "min": [0.5, 0.6], "prod": [0.36, 0.42], "model": [0.8, 0.6]}
    for how, want in expected.items():
        np.testing.assert_allclose(aggregate(scores, ends, how), want, rtol=1e-5)
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(scores, ends, "mean")


def _numpy_first_token_scorer(tokens, step_ends):
    return np.where(step_ends, TABLE[tokens[:, PROMPT.shape[0]]][:, None], 0.0)


HOST_SCORER = host_scorer(_numpy_first_token_scorer)


def test_host_scorer_matches_the_in_graph_oracle_and_weighted_sample_selects_by_weight():
    in_graph = run(lm_search.best_of_n, seed=7)
    on_host = run(lm_search.best_of_n, seed=7, scorer=HOST_SCORER)
    np.testing.assert_array_equal(
        np.asarray(on_host.samples.tokens), np.asarray(in_graph.samples.tokens)
    )
    np.testing.assert_allclose(np.asarray(on_host.rewards), np.asarray(in_graph.rewards))
    picks = {select(in_graph, "weighted_sample", key=jax.random.key(s)) for s in range(64)}
    assert len(picks) > 1 and picks <= set(range(N))  # uniform weights: many particles drawn


# Digests of small runs pinned before the searches became kernels (issue 16): the port keeps the
# key layout and every bit of the result.
PINNED = {
    "best_of_n": "7bbe4da1d8b15f747b39177c74e9cd02",
    "beam": "1ae2e2f49a465e262dd516a66898acb0",
    "dvts-dedup": "18a82f351c3f769042e49c02bcccb38b",
    "prm-best_of_n": "8258671cc6b2416a0774cd11ca744a4d",
    "prm-beam-dedup": "277d8916b4d5932f89819365c7dce3a4",
    "prm-dvts": "0f096249da4ff591544a9db02042bb84",
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
        "best_of_n": lambda: run(lm_search.best_of_n, seed=1),
        "beam": lambda: run(lm_search.beam_search, seed=2, beam_width=BEAM, temperature=0.7),
        "dvts-dedup": lambda: run(lm_search.dvts, seed=3, beam_width=2, dedup=True),
        "prm-best_of_n": lambda: prm(lm_search.best_of_n),
        "prm-beam-dedup": lambda: prm(lm_search.beam_search, beam_width=2, dedup=True),
        "prm-dvts": lambda: prm(lm_search.dvts, beam_width=4),
    }
    return cases[name]()


@pytest.mark.skipif(
    jax.__version__ != PINNED_JAX or jax.default_backend() != "cpu",
    reason=f"outputs pinned on jax {PINNED_JAX}, CPU",
)
@pytest.mark.parametrize("name", list(PINNED))
def test_outputs_are_bit_identical_to_the_pinned_runs(name):
    out = _pinned_case(name)
    assert digest(out) == PINNED[name], f"{name}: got {digest(out)}, pinned {PINNED[name]}"


def test_a_one_element_separator_set_searches_bit_for_bit_as_sep_id():
    def prm(**separators):
        return lm_search.dvts(
            jax.random.key(4),
            tiny_lm(),
            PROMPT,
            prm_scorer,
            tiny_prm(),
            num_particles=8,
            beam_width=4,
            max_steps=4,
            max_step_tokens=2,
            max_new_tokens=7,
            temperature=1.0,
            stop_ids=[EOS],
            pad_id=EOS,
            aggregation="min",
            **separators,
        )

    assert digest(prm(sep_ids=[SEP])) == digest(prm(sep_id=SEP))
