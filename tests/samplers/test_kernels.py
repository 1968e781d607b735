"""Samplers as pure kernels (issue 16): ``run`` jitted with the sampler static, vmapped over keys,
sharded; numbers and weights in ``params`` (no recompilation); potentials, resamplers and
diffusion coefficients written outside the package, through FK steering."""

import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax import interpolants as I
from tts_jax import smc
from tts_jax.models import gmm as G
from tts_jax.models.base import FlowModel
from tts_jax.rewards.analytic import linear_reward
from tts_jax.samplers import Sampler, run
from tts_jax.samplers.image import fk_steering as fk

from ..helpers import gmm_expected_statistics, gmm_statistics, run_on_host_devices

DIRECTION = jnp.array([1.0, -0.5])
K = 12
RUN = jax.jit(run, static_argnames="sampler")


def _params(lam=1.5, gmm=None, diffusion=None, schedule=None):
    return fk.make_params(
        G.flow_model(gmm or G.asymmetric_gmm_2d()),
        linear_reward(DIRECTION),
        I.uniform_grid(K),
        diffusion or I.diffusion("square", 2.0),
        lam,
        schedule or smc.every(K, 3),
    )


def _assert_same(a, b):
    for got, want in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# ------------------------------------------------------------------ pieces written out here


def _smoothed_init(num_particles):
    return jnp.zeros((num_particles,), jnp.float32)


def _smoothed_update(ema, log_potential, reward, lam):
    """A potential the package does not have: ``log G_k = lam * EMA_k`` of the rewards."""
    ema = 0.5 * ema + 0.5 * reward
    return ema, log_potential + lam * ema


SMOOTHED = fk.Potential(_smoothed_init, _smoothed_update)


def _my_diff_update(state, log_potential, reward, lam):
    return state, lam * reward


MY_DIFF = fk.Potential(lambda num_particles: None, _my_diff_update)


def categorical(key, log_weights, num):
    """Multinomial resampling as a user would write it."""
    return jax.random.categorical(key, log_weights, shape=(num,)).astype(jnp.int32)


def keep_the_best(key, log_weights, num):
    """Not a valid SMC resampler, but it shows which function ran: every slot gets the best."""
    return jnp.full((num,), jnp.argmax(log_weights), jnp.int32)


def ramp(norm, t, interp):
    """A diffusion coefficient ``g = norm t``."""
    return norm * t


def my_square(norm, t, interp):
    return norm * t**2


# ------------------------------------------------------------------ tests


def test_factories_are_memoized_and_names_are_aliases():
    s = fk.sampler(8, K, "max", "multinomial")
    assert isinstance(s, Sampler) and s.num_steps == K
    from tts_jax import resampling

    same = fk.sampler(8, K, fk.potentials.max, resampling.multinomial)
    assert same is s and hash(same) == hash(s)
    assert fk.sampler(8, K, "sum") != s and fk.sampler(16, K) != s
    assert fk.POTENTIALS == ("diff", "max", "sum", "final")
    with pytest.raises(ValueError, match="unknown potential 'cubic'"):
        fk.sampler(8, K, "cubic")
    with pytest.raises(ValueError, match="unknown resampler"):
        fk.sampler(8, K, resampler="nope")
    with pytest.raises(ValueError, match="num_steps must be >= 1"):
        fk.sampler(8, 0)


def test_jitted_run_equals_the_convenience_function_and_compiles_once():
    """``jax.jit(run, static_argnames="sampler")`` with public names only; sweeping ``lam``, the
    diffusion norm, the ESS threshold, or swapping the model's weights for others of the same
    shapes, reuses the one compiled program (weights are arguments, not constants)."""
    run_jit = jax.jit(run, static_argnames="sampler")
    s = fk.sampler(16, K, "max")
    params = _params(lam=1.5)
    fk.check_params(params, s)
    key = jax.random.key(3)
    out = run_jit(key, s, params)
    # jax.jit of one function shares its cache between wrappers: count what this test adds.
    compiled = run_jit._cache_size()
    want = fk.fk_steering(
        key,
        params.model,
        params.reward,
        16,
        params.grid,
        params.diffusion,
        1.5,
        schedule=params.schedule,
        potential="max",
    )
    _assert_same(out, want)

    base = G.asymmetric_gmm_2d()  # other weights, same shapes
    shifted = G.make_gmm(base.weights[::-1], base.means + 1.0, base.covs)
    variants = [
        params._replace(lam=np.float32(4.0)),
        params._replace(diffusion=I.diffusion("square", 0.5)),
        params._replace(schedule=smc.adaptive(K, 0.9)),
        params._replace(model=G.flow_model(shifted)),
    ]
    results = [run_jit(key, s, p) for p in variants]
    assert run_jit._cache_size() == compiled
    for r in results:  # every change reached the program
        assert not np.array_equal(np.asarray(r.samples), np.asarray(out.samples))
    # Same configuration by another spelling: still the same compiled program.
    run_jit(key, fk.sampler(16, K, fk.potentials.max), params)
    assert run_jit._cache_size() == compiled


def _gaussian_velocity(params, x, t, cond=None):
    """Exact velocity of ``N(mean, std^2 I)`` data on the linear path, elementwise in ``x``."""
    interp, t = I.Linear(), t[:, None]
    a, s = interp.alpha(t), interp.sigma(t)
    mean, var = params["mean"][None], params["std"] ** 2
    resid = (x - a * mean) / (a**2 * var + s**2)
    return interp.alpha_dot(t) * (mean + a * var * resid) + interp.sigma_dot(t) * s * resid


GAUSSIAN = FlowModel(
    {"mean": jnp.array([1.0, -2.0]), "std": jnp.float32(0.7)}, _gaussian_velocity, I.Linear(), (2,)
)


def _batched_and_separate(model, potential, resampler):
    s = fk.sampler(32, K, potential, resampler)
    params = _params(lam=2.0, schedule=smc.adaptive(K))._replace(model=model)
    keys = jax.random.split(jax.random.key(0), 4)
    batched = jax.jit(jax.vmap(run, in_axes=(0, None, None)), static_argnums=1)(keys, s, params)
    assert batched.samples.shape == (4, 32, 2)
    assert bool(np.asarray(batched.info.resampled).any())
    pairs = [
        (jax.tree.map(lambda leaf, i=i: leaf[i], batched), RUN(keys[i], s, params))
        for i in range(4)
    ]
    return pairs


@pytest.mark.parametrize("potential, resampler", [("diff", "systematic"), ("max", "multinomial")])
def test_vmap_over_keys_equals_separate_runs(potential, resampler):
    """Exactly: the sampler machinery (kernel, engine, resampler) computes the same bits batched
    or not, shown with a model whose velocity is elementwise."""
    for got, want in _batched_and_separate(GAUSSIAN, potential, resampler):
        _assert_same(got, want)


def test_vmap_over_keys_of_a_contracting_model_matches_to_rounding():
    """The GMM's velocity contracts over components and dimensions (an einsum); at another batch
    shape XLA may order those sums differently, so values agree to float32 rounding and every
    discrete outcome (resampling steps, ancestors) is identical."""
    gmm_model = G.flow_model(G.asymmetric_gmm_2d())
    for got, want in _batched_and_separate(gmm_model, "diff", "systematic"):
        for key in ("resampled", "ancestors", "unique_ancestors"):
            np.testing.assert_array_equal(getattr(got.info, key), getattr(want.info, key))
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_a_potential_written_outside_the_package_runs_and_can_reproduce_a_built_in_one():
    key = jax.random.key(1)
    params = _params()
    built_in = RUN(key, fk.sampler(16, K, "diff"), params)
    _assert_same(RUN(key, fk.sampler(16, K, MY_DIFF), params), built_in)
    out = RUN(key, fk.sampler(16, K, SMOOTHED), params)
    assert np.isfinite(float(out.log_evidence))
    # Other intermediate potentials: other resampling, other samples.
    assert not np.array_equal(np.asarray(out.samples), np.asarray(built_in.samples))


def test_a_resampler_written_outside_the_package_is_the_one_that_runs():
    out = RUN(jax.random.key(2), fk.sampler(16, K, "diff", keep_the_best), _params(lam=3.0))
    resampled = np.flatnonzero(np.asarray(out.info.resampled))
    assert resampled.size
    for k in resampled:  # every slot copies the single best particle
        ancestors = np.asarray(out.info.ancestors[k])
        assert (ancestors == ancestors[0]).all() and int(out.info.unique_ancestors[k]) == 1


def test_a_diffusion_written_outside_the_package_runs_and_can_reproduce_a_built_in_one():
    key, s = jax.random.key(4), fk.sampler(16, K, "max")
    square = RUN(key, s, _params(diffusion=I.diffusion("square", 2.0)))
    _assert_same(RUN(key, s, _params(diffusion=I.diffusion(my_square, 2.0))), square)
    out = RUN(key, s, _params(diffusion=I.diffusion(ramp, 1.0)))
    assert np.isfinite(np.asarray(out.samples)).all()
    assert not np.array_equal(np.asarray(out.samples), np.asarray(square.samples))


@pytest.mark.slow
def test_custom_potential_resampler_and_diffusion_together_target_the_tilted_mixture():
    """All three pieces from this file, vmapped over 4 seeds in one program: the final
    correction makes any potential exact, so the weighted particles match the closed-form tilt."""
    gmm = G.asymmetric_gmm_2d()
    lam = 1.2
    tilted, log_z = G.tilt_linear(gmm, DIRECTION, lam)
    s = fk.sampler(2048, 40, SMOOTHED, categorical)
    params = fk.make_params(
        G.flow_model(gmm),
        linear_reward(DIRECTION),
        I.uniform_grid(40),
        I.diffusion(ramp, 2.0),
        lam,
        smc.every(40, 10),
    )
    fk.check_params(params, s)
    keys = jax.random.split(jax.random.key(7), 6)
    out = jax.jit(jax.vmap(run, in_axes=(0, None, None)), static_argnums=1)(keys, s, params)
    w = np.exp(np.asarray(out.log_weights, np.float64))
    stats = np.stack([w[i] @ gmm_statistics(tilted, out.samples[i]) for i in range(len(keys))])
    se = stats.std(0, ddof=1) / np.sqrt(len(keys))
    err = np.abs(stats.mean(0) - gmm_expected_statistics(tilted))
    assert (err < 5 * se + 0.05).all(), (err, se)
    logzs = np.asarray(out.log_evidence)
    assert abs(logzs.mean() - float(log_z)) < 5 * logzs.std(ddof=1) / np.sqrt(len(keys)) + 0.05


def test_check_params_names_what_is_wrong_and_skips_traced_values():
    s = fk.sampler(8, K)
    params = _params()
    fk.check_params(params, s)
    with pytest.raises(ValueError, match="the grid has 12 steps but the sampler takes 10"):
        fk.check_params(params, fk.sampler(8, 10))
    with pytest.raises(ValueError, match="schedule has 5 steps but the grid has 12"):
        fk.check_params(params._replace(schedule=smc.never(5)), s)
    with pytest.raises(ValueError, match="my_method: lam must be finite, got nan"):
        fk.check_params(params._replace(lam=np.float32(np.nan)), s, "my_method")
    with pytest.raises(ValueError, match=r"diffusion.norm\['b'\] must be finite"):
        fk.check_params(params._replace(diffusion=I.diffusion(ramp, {"b": np.inf})), s)

    @jax.jit
    def checked(lam):  # inside jit: shapes checked, traced values skipped
        p = params._replace(lam=lam)
        fk.check_params(p, s)
        return run(jax.random.key(0), s, p).log_evidence

    assert np.isfinite(float(checked(jnp.float32(1.0))))


SHARDED = textwrap.dedent(
    """
    import jax, numpy as np
    from tts_jax import interpolants as I, smc
    from tts_jax.models import gmm as G
    from tts_jax.rewards.analytic import linear_reward
    from tts_jax.samplers import run
    from tts_jax.samplers.image import fk_steering as fk
    from tts_jax.sharding import constrain_particles, particle_mesh

    assert len(jax.devices()) == 4
    n = 64
    s = fk.sampler(n, 20, "diff")
    params = fk.make_params(G.flow_model(G.asymmetric_gmm_2d()), linear_reward([1.0, -0.5]),
                            I.uniform_grid(20), I.diffusion("square", 2.0), 2.0,
                            smc.every(20, 4))
    mesh = particle_mesh(4)
    plain = jax.jit(run, static_argnames="sampler")(jax.random.key(0), s, params)
    sharded = jax.jit(lambda key, p: constrain_particles(run(key, s, p), mesh, n))(
        jax.random.key(0), params)
    assert len(sharded.samples.sharding.device_set) == 4
    assert sharded.samples.addressable_shards[0].data.shape == (n // 4, 2)
    assert int(plain.info.resampled.sum()) > 0
    np.testing.assert_array_equal(sharded.info.ancestors, plain.info.ancestors)
    np.testing.assert_allclose(sharded.samples, plain.samples, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sharded.log_evidence, plain.log_evidence, rtol=1e-5)
    print("SHARDED-FK-OK")
    """
)


def test_run_shards_over_the_particle_axis_as_it_is():
    run_on_host_devices(SHARDED, 4, "SHARDED-FK-OK")
