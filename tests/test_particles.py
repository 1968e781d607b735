import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax import Particles, check_log_weights, ess, gather, log_normalize, make_particles


def test_ess_equal_weights_is_n():
    assert float(ess(jnp.zeros(17))) == pytest.approx(17.0, rel=1e-6)


def test_ess_single_nonzero_weight_is_one():
    lw = jnp.array([-jnp.inf, 3.0, -jnp.inf, -jnp.inf])
    assert float(ess(lw)) == pytest.approx(1.0, rel=1e-6)


def test_ess_shift_invariant_and_stable_for_huge_values():
    # Dyadic values stay exact in float32 after the shifts, so only the ESS computation is tested.
    lw = jnp.array([0.125, -2.0, 1.5, 0.0, -jnp.inf])
    base = float(ess(lw))
    w = np.exp(np.array([0.125, -2.0, 1.5, 0.0]))
    assert base == pytest.approx(w.sum() ** 2 / (w**2).sum(), rel=1e-5)
    for shift in (-1e4, 1e4, 2.0**18):
        assert float(ess(lw + shift)) == pytest.approx(base, rel=1e-4)


def test_ess_all_dead_is_zero():
    assert float(ess(jnp.full(4, -jnp.inf))) == 0.0


def test_log_normalize_sums_to_one():
    lw = jnp.array([1000.0, 999.0, -jnp.inf])
    p = jnp.exp(log_normalize(lw))
    # float32 resolves logsumexp ~ 1000.3 to 6e-5, which bounds the achievable accuracy.
    expected = [1 / (1 + np.exp(-1)), np.exp(-1) / (1 + np.exp(-1)), 0.0]
    np.testing.assert_allclose(p, expected, atol=1e-4)
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-4)


def test_gather_moves_every_leaf_with_the_same_ancestor():
    state = {
        "x": jnp.arange(4.0)[:, None] * jnp.ones((4, 3)),
        "cache": (jnp.arange(4), jnp.arange(8).reshape(4, 2)),
    }
    p = make_particles(state, jnp.arange(4.0))
    anc = jnp.array([3, 3, 0, 1])
    out = gather(p, anc)
    np.testing.assert_array_equal(out.state["x"][:, 0], [3, 3, 0, 1])
    np.testing.assert_array_equal(out.state["cache"][0], [3, 3, 0, 1])
    np.testing.assert_array_equal(out.state["cache"][1], [[6, 7], [6, 7], [0, 1], [2, 3]])
    np.testing.assert_array_equal(out.log_weights, [3.0, 3.0, 0.0, 1.0])


def test_make_particles_rejects_mismatched_axes():
    with pytest.raises(ValueError, match="disagree on the particle axis"):
        make_particles({"a": jnp.zeros((4, 2)), "b": jnp.zeros((5,))})


def test_make_particles_rejects_empty_and_scalar_and_bad_weights():
    with pytest.raises(ValueError, match="empty"):
        make_particles(jnp.zeros((0, 3)))
    with pytest.raises(ValueError, match="no array leaves"):
        make_particles({})
    with pytest.raises(ValueError, match="scalar"):
        make_particles({"a": jnp.zeros((4,)), "step": jnp.int32(0)})
    with pytest.raises(ValueError, match=r"expected \(4,\)"):
        make_particles(jnp.zeros((4, 2)), jnp.zeros(3))


def test_check_log_weights_names_the_problem():
    with pytest.raises(ValueError, match="NaN at particles \\[1\\]"):
        check_log_weights(jnp.array([0.0, jnp.nan]))
    with pytest.raises(ValueError, match="all particles are dead"):
        check_log_weights(jnp.full(3, -jnp.inf))
    with pytest.raises(ValueError, match=r"\+inf"):
        check_log_weights(jnp.array([0.0, jnp.inf]))
    check_log_weights(jnp.array([0.0, -jnp.inf]))


def test_particles_is_a_pytree_usable_under_jit():
    p = Particles(jnp.ones((3, 2)), jnp.zeros(3))
    out = jax.jit(lambda q: gather(q, jnp.array([2, 0, 0])))(p)
    assert out.state.shape == (3, 2) and out.num_particles == 3


def test_particles_built_directly_reject_leaves_with_another_particle_axis():
    with pytest.raises(ValueError, match=r"state leaf \['b'\] has shape \(5, 2\).*N = 4"):
        Particles({"a": jnp.zeros((4, 3)), "b": jnp.zeros((5, 2))}, jnp.zeros(4))
    with pytest.raises(ValueError, match=r"state leaf \['step'\] has a scalar"):
        Particles({"a": jnp.zeros((4, 3)), "step": jnp.int32(0)}, jnp.zeros(4))
    p = Particles(jnp.zeros((4, 3)), jnp.zeros(4))
    with pytest.raises(ValueError, match=r"log_weights has shape \(3,\)"):
        p._replace(log_weights=jnp.zeros(3))
    with pytest.raises(ValueError, match=r"has shape \(3,\)"):  # shapes are checked when traced
        jax.jit(lambda: Particles(jnp.zeros(3), jnp.zeros(4)))()


def test_particles_check_leaves_jax_tree_operations_working():
    p = Particles({"x": jnp.ones((4, 2)), "done": jnp.zeros(4, bool)}, jnp.zeros(4))
    treedef = jax.tree.structure(p)
    # JAX rebuilds the node with placeholder leaves and with reductions of the leaves.
    assert jax.tree_util.tree_unflatten(treedef, [object()] * 3).state["x"] is not None
    assert jax.tree.map(lambda leaf: leaf.shape, p).log_weights == (4,)
    assert float(jax.tree.map(jnp.sum, p).state["x"]) == 8.0
    assert jax.eval_shape(lambda q: q, p).state["x"].shape == (4, 2)
    # Under vmap each example's leaves agree; stacked sets compare the leading axis only.
    stacked = jax.vmap(lambda c: Particles(c * jnp.ones((4, 2)), jnp.zeros(4)))(jnp.arange(3.0))
    assert stacked.state.shape == (3, 4, 2) and stacked.log_weights.shape == (3, 4)
    per_example = jax.vmap(lambda q: jnp.sum(q.state, axis=1) + q.log_weights)(stacked)
    np.testing.assert_array_equal(per_example[:, 0], [0.0, 2.0, 4.0])
    _, ys = jax.lax.scan(lambda c, _: (c, c.log_weights), p, None, length=2)
    assert ys.shape == (2, 4)


def test_gather_rejects_out_of_range_concrete_ancestors():
    p = make_particles({"x": jnp.arange(4.0)}, jnp.zeros(4))
    with pytest.raises(ValueError, match=r"ancestor indices \[4\] are outside \[0, 4\)"):
        gather(p, jnp.array([0, 4, 1, 1]))
    with pytest.raises(ValueError, match=r"ancestor indices \[-1\] are outside \[0, 4\)"):
        gather(p, np.array([-1, 0, 1, 2]))  # no Python-style wrap-around either
    with pytest.raises(ValueError, match=r"outside \[0, 2\) for leaf \['short'\]"):
        gather({"long": jnp.zeros(4), "short": jnp.zeros(2)}, jnp.array([0, 3]))


def test_gather_inside_jit_never_writes_nan():
    """Traced ancestors cannot be checked without a host callback: out-of-range ones read the
    nearest end row (clip mode, a bare gather) instead of the NaN of jnp.take's fill mode."""
    p = make_particles({"x": jnp.arange(4.0), "i": jnp.arange(4)}, jnp.zeros(4))
    out = jax.jit(gather)(p, jnp.array([3, 7, 0, 1]))
    np.testing.assert_array_equal(out.state["x"], [3.0, 3.0, 0.0, 1.0])
    np.testing.assert_array_equal(out.state["i"], [3, 3, 0, 1])
    assert "select" not in jax.jit(gather).lower(p, jnp.zeros(4, jnp.int32)).as_text()
