"""Particle chunking (tts_jax.models.chunking): chunked calls and whole sampler runs agree with
the unchunked ones, the cond leaves are split by their batch size, and a chunked model compiles
once, at ``max_batch`` rows.

Bit-identity with the unchunked run does not hold on XLA CPU, and these tests say what does
(docs/precision.md, "Chunking"). The wrappers only slice, pad and concatenate (exact; the
elementwise test below is bit-identical), but XLA compiles a ``max_batch``-row loop body and an
``N``-row program to different code: above a size threshold its matmuls go to the YNNPACK
library, below it to XLA's own loops, and loop-invariant factors are hoisted out of the
``lax.map`` body and re-associated (a reward's ``-scale * mean(...)`` becomes
``sum * (-scale / 16)``). One forward pass then differs in the last bit or two (measured max
relative difference: DiT 4e-7, reward 1.5e-7, LM logits 1e-6). Whole runs are compared with the
discrete decisions (ancestors, tokens, the best candidate) exactly and the floats to 1e-5
relative: a few float32 ulps carried through the steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.helpers import EOS
from tests.helpers import tiny_lm as tiny_policy
from tests.tiny_models import tiny_dit
from tts_jax import interpolants as I
from tts_jax import smc
from tts_jax.models import gmm as G
from tts_jax.models.base import FlowModel, as_language_model
from tts_jax.models.chunking import (
    chunked,
    chunked_language_model,
    chunked_reward,
    chunked_scorer,
    map_rows,
    split_cond,
)
from tts_jax.models.wrappers import velocity_dit_flow
from tts_jax.rewards.analytic import linear_reward
from tts_jax.rewards.base import Reward
from tts_jax.samplers.image import fk_steering as fk
from tts_jax.samplers.image import noise_search
from tts_jax.samplers.lm import particle_filter

DIRECTION = jnp.array([1.0, -0.5])


def _energy(params, x, cond=None):
    """A per-particle reward on images: ``-scale * mean(x^2)``."""
    return -params["scale"] * jnp.mean(jnp.square(x.reshape(x.shape[0], -1)), axis=-1)


ENERGY = Reward({"scale": jnp.float32(1.0)}, _energy, "energy")


@jax.jit
def _velocity(model, x, t, cond):
    return model.velocity(x, t, cond)


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.abs(a - b).max() / np.abs(b).max()


# --------------------------------------------------------------------------- single calls


def test_chunked_guided_dit_velocity_matches_the_whole_batch():
    """Guided DiT, per-particle labels, N = 10 in chunks of 4 (padded to 12, the 2N guidance
    batch built per chunk): within 2e-6 relative of the 10-row call (measured 0 to 4e-7)."""
    flow = velocity_dit_flow(tiny_dit(), guided=True, guidance=2.0)
    x = jax.random.normal(jax.random.key(0), (10, 1, 4, 4))
    t = jnp.linspace(0.1, 0.9, 10)
    labels = jnp.arange(10) % 4  # 3 is the null label
    got = _velocity(chunked(flow, 4), x, t, labels)
    assert got.shape == x.shape and got.dtype == x.dtype
    assert _rel(got, _velocity(flow, x, t, labels)) < 2e-6


def test_chunked_reward_and_language_model_match_the_whole_batch():
    """A reward and an LM's ragged prefill (KV-cache rows moved with their tokens; decode is
    exercised by the particle filter below) in chunks of 3 rows of 7: within 2e-6 relative
    (measured 1.5e-7 and 1e-6); the cache lengths exactly."""
    x = jax.random.normal(jax.random.key(1), (7, 1, 4, 4))
    score = jax.jit(lambda reward, x: reward(x))
    assert _rel(score(chunked_reward(ENERGY, 3), x), score(ENERGY, x)) < 2e-6

    lm = as_language_model(tiny_policy())
    n, p = 7, 4
    tokens = jax.random.randint(jax.random.key(2), (n, p), 0, 5)
    lengths = jnp.array([4, 1, 2, 3, 4, 2, 1], jnp.int32)

    @jax.jit
    def run(model, tokens, lengths):
        cache = model.init_cache(tokens.shape[0], 8, jnp.float32)
        return model.prefill(tokens, cache, lengths)

    got = run(chunked_language_model(tiny_policy(), 3), tokens, lengths)
    whole = run(lm, tokens, lengths)
    np.testing.assert_array_equal(got[1].length, whole[1].length)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(whole), strict=True):
        assert _rel(a, b) < 2e-6


def _scaled(params, x, t, cond):
    return x * cond["scale"] + cond["shift"] + cond["pair"] + cond["w"]


def test_cond_leaves_are_chunked_shared_or_repeated_by_their_batch_size():
    """``B = N`` leaves are chunked, ``B = 1`` and scalars shared, ``1 < B < N`` repeated (row
    ``i`` uses ``i // (N / B)``); any other leading size is refused by name."""
    n = 6
    model = FlowModel(None, _scaled, I.Linear(), (2,))
    x = jnp.arange(2 * n, dtype=jnp.float32).reshape(n, 2)
    cond = {
        "scale": jnp.arange(2 * n, dtype=jnp.float32).reshape(n, 2),  # per particle
        "shift": jnp.array([[100.0, 200.0]]),  # shared
        "pair": jnp.array([[1000.0, 0.0], [2000.0, 0.0]]),  # particles 0-2 and 3-5
        "w": jnp.float32(0.5),
    }
    got = chunked(model, 4).velocity(x, 0.5, cond)
    pair = jnp.repeat(cond["pair"], 3, axis=0)
    np.testing.assert_array_equal(got, x * cond["scale"] + cond["shift"] + pair + 0.5)
    rows, rebuild = split_cond(cond, n)
    assert [r.shape[0] for r in rows] == [n, n]  # "pair" repeated, "scale" as it is
    assert rebuild(rows)["shift"] is cond["shift"]
    with pytest.raises(ValueError, match="leading size 4"):
        chunked(model, 4).velocity(x, 0.5, {**cond, "pair": jnp.ones((4, 2))})
    with pytest.raises(ValueError, match="max_batch must be a positive int"):
        chunked(model, 0)
    with pytest.raises(ValueError, match="same leading"):
        map_rows(lambda r: r, (jnp.ones(3), jnp.ones(4)), 2)


# --------------------------------------------------------------------------- whole runs

GRID = I.uniform_grid(8)
TRACES = {"shapes": []}


def _counted_gmm_velocity(params, x, t, cond=None):
    TRACES["shapes"].append(x.shape[0])
    return G.velocity(params, x, t)


def _fk(model, reward, lam=1.5, seed=3):
    return fk.fk_steering(
        jax.random.key(seed),
        model,
        reward,
        10,
        GRID,
        I.diffusion("square", 2.0),
        lam,
        schedule=smc.every(8, 2),
    )


def test_fk_steering_chunked_matches_unchunked_and_compiles_once():
    """FK steering on the 2-D mixture, N = 10, model in chunks of 4 and reward in chunks of 3
    (both padded): the same ancestors at every step; samples, log-weights and log Z within
    float32 rounding (measured max relative 3e-7, bound 1e-5). The chunked model is traced at
    ``max_batch = 4`` rows only, and a new lambda reuses the compiled run."""
    gmm = G.asymmetric_gmm_2d()
    model = FlowModel(gmm, _counted_gmm_velocity, I.Linear(), (2,))
    base = _fk(model, linear_reward(DIRECTION))
    TRACES["shapes"].clear()
    chunks = _fk(chunked(model, 4), chunked_reward(linear_reward(DIRECTION), 3))
    assert TRACES["shapes"] and set(TRACES["shapes"]) == {4}
    np.testing.assert_array_equal(chunks.info.ancestors, base.info.ancestors)
    for name in ("samples", "log_weights", "rewards"):
        np.testing.assert_allclose(getattr(chunks, name), getattr(base, name), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunks.log_evidence, base.log_evidence, rtol=1e-5)
    traced = len(TRACES["shapes"])
    _fk(chunked(model, 4), chunked_reward(linear_reward(DIRECTION), 3), lam=0.4, seed=4)
    assert len(TRACES["shapes"]) == traced  # no recompile


def test_best_of_n_chunked_matches_unchunked():
    """Best-of-N on the mixture (9 candidates, 4 Euler steps), velocity in chunks of 4 and the
    reward in chunks of 5: the same best candidate, samples and scores within 1e-5."""
    flow = G.flow_model(G.asymmetric_gmm_2d())
    reward = linear_reward(DIRECTION)

    def run(model, reward):
        return noise_search.best_of_n(jax.random.key(5), model, reward, 36, I.uniform_grid(4))

    base = run(flow, reward)
    chunks = run(chunked(flow, 4), chunked_reward(reward, 5))
    assert int(chunks.best) == int(base.best)
    np.testing.assert_allclose(chunks.samples, base.samples, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunks.rewards, base.rewards, rtol=1e-5, atol=1e-6)


def _first_token_scorer(table, tokens, step_ends):
    """Every step scores ``table[first completion token]`` (prompt of 2 tokens)."""
    return jnp.where(step_ends, table[tokens[:, 2]][:, None], 0.0)


def test_lm_particle_filter_chunked_matches_unchunked():
    """The twisted step-level particle filter on the tiny LM (its weights read the LM's
    log-probabilities), N = 8 rows in chunks of 3 (padded) and the step scorer in chunks of 5:
    the same tokens and ancestors; log-weights, scores and log Z within 1e-5 (measured:
    bit-identical)."""

    def run(model, scorer=_first_token_scorer):
        return particle_filter.particle_filter(
            jax.random.key(6),
            model,
            np.array([2, 3], np.int32),
            scorer,
            jnp.array([0.2, 0.5, 0.8, 0.35, 0.65], jnp.float32),
            num_particles=8,
            max_steps=3,
            max_step_tokens=1,
            max_new_tokens=3,
            temperature=0.8,
            weighting="twisted",
            sep_id=1,
            stop_ids=[EOS],
            pad_id=EOS,
        )

    base = run(tiny_policy())
    chunks = run(chunked_language_model(tiny_policy(), 3), chunked_scorer(_first_token_scorer, 5))
    np.testing.assert_array_equal(chunks.samples.tokens, base.samples.tokens)
    np.testing.assert_array_equal(chunks.info.ancestors, base.info.ancestors)
    np.testing.assert_allclose(chunks.log_weights, base.log_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunks.rewards, base.rewards, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(chunks.log_evidence, base.log_evidence, rtol=1e-5)
