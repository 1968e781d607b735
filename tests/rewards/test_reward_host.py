"""Host-boundary reward: equals the direct NumPy / torch computation inside jit, scan and vmap."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax.rewards.host import host_reward


class CountingFn:
    """A NumPy reward ``-|x - 0.3|^2`` per candidate that records the batch sizes it saw."""

    def __init__(self):
        self.batches = []

    def __call__(self, x: np.ndarray) -> np.ndarray:
        assert isinstance(x, np.ndarray)
        self.batches.append(x.shape[0])
        return -np.square(x.reshape(x.shape[0], -1) - 0.3).sum(axis=1)


@jax.jit
def _call(reward, x):
    return reward(x)


def test_inside_jit_equals_direct_numpy():
    fn = CountingFn()
    x = jax.random.normal(jax.random.key(0), (7, 1, 8, 8))
    got = _call(host_reward(fn), x)
    assert got.dtype == jnp.float32 and got.shape == (7,)
    np.testing.assert_allclose(got, fn(np.asarray(x)), rtol=1e-6)


def test_inside_a_jitted_scan_loop_one_call_per_step():
    fn = CountingFn()
    reward = host_reward(fn)

    @jax.jit
    def loop(reward, x):
        def step(x, _):
            r = reward(x)
            return x * 0.5, r

        return jax.lax.scan(step, x, length=4)[1]

    x = jax.random.normal(jax.random.key(1), (5, 3))
    rs = loop(reward, x)
    expected = [fn(np.asarray(x) * 0.5**k) for k in range(4)]
    np.testing.assert_allclose(rs, np.stack(expected), rtol=1e-5)
    assert fn.batches[:4] == [5, 5, 5, 5]


def test_vmap_makes_one_host_call_on_the_flattened_batch():
    fn = CountingFn()
    x = jax.random.normal(jax.random.key(2), (3, 4, 1, 8, 8))
    got = jax.jit(jax.vmap(host_reward(fn)))(x)
    assert fn.batches == [12]
    np.testing.assert_allclose(got, fn(np.asarray(x).reshape(12, 1, 8, 8)).reshape(3, 4), rtol=1e-6)


def test_torch_function():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 1))

    def torch_reward(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(x)).squeeze(-1).numpy()

    x = jax.random.normal(jax.random.key(3), (6, 1, 8, 8))
    got = _call(host_reward(torch_reward, name="torch"), x)
    np.testing.assert_allclose(got, torch_reward(np.array(x)), rtol=1e-5, atol=1e-6)


def test_same_function_does_not_recompile():
    traces = 0
    fn = CountingFn()

    @jax.jit
    def score(reward, x):
        nonlocal traces
        traces += 1
        return reward(x)

    x = jnp.ones((2, 3))
    score(host_reward(fn), x)
    score(host_reward(fn), x + 1.0)
    assert traces == 1


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda x: np.full(x.shape[0], np.nan), "'bad' returned NaN for 4 of 4 candidates"),
        (lambda x: np.zeros(x.shape[0] + 1), r"'bad' returned shape \(5,\)"),
    ],
)
def test_nan_or_wrong_shape_is_a_clear_error(fn, match):
    with pytest.raises(Exception, match=match):
        _call(host_reward(fn, name="bad"), jnp.zeros((4, 2))).block_until_ready()
