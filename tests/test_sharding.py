"""A sharded SMC run equals the unsharded one (4 host devices, in a subprocess)."""

import textwrap

from .helpers import run_on_host_devices

SCRIPT = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from tts_jax import smc
    from tts_jax.models import gmm as G
    from tts_jax.sharding import particle_mesh, shard_particles
    from tests.test_smc import tempered_propagate, tempered_log_potential, NUM_TEMPER_STEPS

    assert len(jax.devices()) == 4, jax.devices()
    gmm = G.asymmetric_gmm_2d()
    x0, _ = G.sample(gmm, jax.random.key(1), 256)
    schedule = smc.ResampleSchedule(jnp.ones(NUM_TEMPER_STEPS, bool), jnp.float32(0.7))
    params = {"gmm": gmm, "lam": jnp.float32(1.5)}
    plain = smc.run(jax.random.key(0), x0, tempered_propagate, tempered_log_potential, schedule,
                    params)
    mesh = particle_mesh(4)
    sharded_x0 = shard_particles(x0, mesh)
    assert len(sharded_x0.sharding.device_set) == 4
    sharded = smc.run(jax.random.key(0), sharded_x0, tempered_propagate, tempered_log_potential,
                      schedule, params)
    assert int(plain.info.resampled.sum()) > 0
    np.testing.assert_allclose(sharded.particles.state, plain.particles.state, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sharded.particles.log_weights, plain.particles.log_weights,
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(sharded.info.ancestors, plain.info.ancestors)
    np.testing.assert_allclose(sharded.log_evidence, plain.log_evidence, rtol=1e-5)
    try:
        shard_particles(jnp.zeros((6, 2)), mesh)
    except ValueError as err:
        assert "not divisible" in str(err)
    else:
        raise AssertionError("indivisible particle axis accepted")
    print("SHARDED-OK")
    """
)


def test_sharded_smc_matches_unsharded():
    run_on_host_devices(SCRIPT, 4, "SHARDED-OK")
