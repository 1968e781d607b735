"""Token-level SMC, and particle filtering with the cached PRM, on a 2-D mesh of 4 host devices
(2 particles x 2 model) give the unsharded tokens (in subprocesses).

The policy LM (and the PRM) are split over the ``model`` axis by their partition table
(:func:`tts_jax.models.partitioning.shard_model`; the tiny LM's vocabulary of 5 and its single KV
head are replicated, its 2 query heads and MLP split). Both samplers create their particles
inside their jitted programs (prompt prefill), so the sharded run constrains the program's
particle outputs to the ``particles`` axis (:func:`tts_jax.sharding.constrain_particles`) and
XLA carries the sharding back through the SMC loop. Tokens and ancestors are compared exactly:
the row-parallel sums change logits by float32 reassociation only (~1e-7), far below the gaps
that decide a draw here.
"""

import textwrap

import pytest

from .helpers import run_on_host_devices

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from tts_jax.samplers.lm import engine, particle_filter, token_smc
    from tts_jax.samplers.base import run_with_keys
    from tts_jax.models.partitioning import lm_table, shard_model
    from tts_jax.sharding import constrain_particles, mesh as make_mesh
    from tests.samplers.test_lm_smc import EOS, PROMPT, _params, potential, tiny_lm

    assert len(jax.devices()) == 4, jax.devices()
    N, TOKENS, THRESHOLD = 32, 8, 0.9
    pot, banned = _params(lam=1.0)
    plain = token_smc.token_smc(jax.random.key(0), tiny_lm(), PROMPT, num_particles=N,
                             max_new_tokens=TOKENS, potential=potential, potential_params=pot,
                             stop_ids=[EOS], pad_id=EOS, ess_threshold=THRESHOLD)
    sampler = token_smc.token_smc_sampler(N, TOKENS, potential)
    mesh = make_mesh(particles=2, model=2)
    table = lm_table(tiny_lm().config, shard_vocab=False, shard_kv=False)
    sharded_lm = shard_model(tiny_lm(), mesh, table)
    q = sharded_lm.model.layers[0].self_attn.q_proj.weight[...]
    assert {s.data.shape for s in q.addressable_shards} == {(q.shape[0] // 2, q.shape[1])}

    @jax.jit
    def sharded_program(key, model):
        params = token_smc.make_token_smc_params(model, PROMPT, stop_ids=[EOS], pad_id=EOS,
                                              ess_threshold=THRESHOLD, potential_params=pot)
        out = run_with_keys(*token_smc.token_smc_keys(key, sampler), sampler, params)
        return constrain_particles(out, mesh, N)

    sharded = sharded_program(jax.random.key(0), sharded_lm)
    assert len(sharded.samples.tokens.sharding.device_set) == 4
    assert sharded.samples.tokens.addressable_shards[0].data.shape == (N // 2, TOKENS)
    assert int(plain.info.resampled.sum()) > 0
    np.testing.assert_array_equal(sharded.samples.tokens, plain.samples.tokens)
    np.testing.assert_array_equal(sharded.info.ancestors, plain.info.ancestors)
    np.testing.assert_allclose(sharded.log_weights, plain.log_weights, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sharded.log_evidence, plain.log_evidence, rtol=1e-5)
    try:
        constrain_particles(jnp.zeros((5, 2)), mesh, 5)
    except ValueError as err:
        assert "not divisible" in str(err)
    else:
        raise AssertionError("indivisible particle count accepted")
    print("SHARDED-LM-OK")
    """
)


@pytest.mark.slow
def test_sharded_token_smc_matches_unsharded():
    run_on_host_devices(SCRIPT, 4, "SHARDED-LM-OK")


PF_SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from tts_jax.samplers.lm import engine, particle_filter, token_smc
    from tts_jax.models.lm_reward import cached_prm_scorer
    from tts_jax.samplers.base import run_with_keys
    from tts_jax.models.partitioning import lm_table, shard_model
    from tts_jax.sharding import constrain_particles, mesh as make_mesh
    from tests.samplers.test_lm_pf import PROMPT, SEP, tiny_prm
    from tests.samplers.test_lm_smc import EOS, tiny_lm

    assert len(jax.devices()) == 4, jax.devices()
    N, STEPS, STEP_TOKENS, TOKENS = 16, 4, 2, 7
    plain = particle_filter.particle_filter(jax.random.key(1), tiny_lm(), PROMPT, cached_prm_scorer,
                                   tiny_prm(), num_particles=N, max_steps=STEPS,
                                   max_step_tokens=STEP_TOKENS, max_new_tokens=TOKENS,
                                   temperature=1.0, sep_id=SEP, stop_ids=[EOS], pad_id=EOS)
    sampler = particle_filter.pf_sampler(N, STEPS, STEP_TOKENS, TOKENS, cached_prm_scorer)
    mesh = make_mesh(particles=2, model=2)
    table = lm_table(tiny_lm().config, shard_vocab=False, shard_kv=False)

    @jax.jit
    def sharded_program(key, model, prm):
        params = particle_filter.make_pf_params(model, PROMPT, prm, max_new_tokens=TOKENS,
                                       temperature=1.0, sep_id=SEP, stop_ids=[EOS], pad_id=EOS)
        out = run_with_keys(*particle_filter.pf_keys(key, sampler), sampler, params)
        return constrain_particles(out, mesh, N)

    sharded = sharded_program(jax.random.key(1), shard_model(tiny_lm(), mesh, table),
                              shard_model(tiny_prm(), mesh, table))
    assert len(sharded.samples.tokens.sharding.device_set) == 4
    assert int(plain.info.resampled.sum()) > 0
    np.testing.assert_array_equal(sharded.samples.tokens, plain.samples.tokens)
    np.testing.assert_array_equal(sharded.info.ancestors, plain.info.ancestors)
    np.testing.assert_allclose(sharded.rewards, plain.rewards, rtol=1e-5)
    print("SHARDED-PF-OK")
    """
)


@pytest.mark.slow
def test_sharded_particle_filter_with_the_cached_prm_matches_unsharded():
    """The PRM's KV cache is particle state too: sharded with the rest, resampled across
    shards; the PRM's weights are split over the model axis like the policy's."""
    run_on_host_devices(PF_SCRIPT, 4, "SHARDED-PF-OK")
