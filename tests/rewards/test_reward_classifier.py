"""Classifier rewards: log p(target | x), margin, no recompile across targets, NaN policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tts_jax.app.data.digits import split_digits
from tts_jax.rewards.classifier import (
    class_log_prob_reward,
    class_margin_reward,
    load_digits_heldout,
    load_digits_verifier,
)


@pytest.fixture(scope="module")
def verifier():
    return load_digits_verifier()


@pytest.fixture(scope="module")
def heldout_digits():
    """Digits the verifier never trained on (it trained on part a)."""
    return split_digits("a")[1]


@jax.jit
def _call(reward, x):
    return reward(x)


@jax.jit
def _logits(classifier, x):
    return classifier(x)[0]


def test_assets_load_by_name():
    assert load_digits_verifier().config.architecture == "cnn"
    assert load_digits_heldout().config.architecture == "mlp"


def test_log_prob_is_log_softmax_of_logits(verifier, heldout_digits):
    x = jnp.asarray(heldout_digits.images[:40])
    logits = _logits(verifier, x)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    np.testing.assert_allclose(_call(class_log_prob_reward(verifier, 4), x), log_p[:, 4], atol=1e-5)
    per_particle = jnp.arange(40, dtype=jnp.int32) % 10
    np.testing.assert_allclose(
        _call(class_log_prob_reward(verifier, per_particle), x),
        log_p[jnp.arange(40), per_particle],
        atol=1e-5,
    )


def test_margin_is_target_logit_minus_best_other(verifier, heldout_digits):
    x = jnp.asarray(heldout_digits.images[:40])
    logits = np.asarray(_logits(verifier, x))
    margin = np.asarray(_call(class_margin_reward(verifier, 7), x))
    others = np.delete(logits, 7, axis=1)
    np.testing.assert_allclose(margin, logits[:, 7] - others.max(1), atol=1e-5)
    np.testing.assert_array_equal(margin > 0, logits.argmax(1) == 7)


@pytest.mark.parametrize("make", [class_log_prob_reward, class_margin_reward])
def test_reward_ranks_real_digits_of_the_target_class_first(verifier, heldout_digits, make):
    x, y = jnp.asarray(heldout_digits.images), heldout_digits.labels
    for c in range(10):
        r = np.asarray(_call(make(verifier, c), x))
        inside, outside = r[y == c], r[y != c]
        assert inside.mean() > outside.mean()
        # Probability that a random target-class digit outscores a random other digit (AUC).
        auc = (inside[:, None] > outside[None, :]).mean()
        assert auc > 0.99, (c, auc)


def test_changing_the_target_class_does_not_recompile(verifier, heldout_digits):
    traces = 0

    @jax.jit
    def score(reward, x):
        nonlocal traces
        traces += 1
        return reward(x)

    x = jnp.asarray(heldout_digits.images[:16])
    outs = [score(class_log_prob_reward(load_digits_verifier(), c), x) for c in (0, 3, 9)]
    assert traces == 1
    assert not np.allclose(outs[0], outs[1])
    score(class_margin_reward(verifier, 5), x)  # another reward function: a new trace
    score(class_margin_reward(verifier, 6), x)
    assert traces == 2


def test_invalid_target_raises(verifier):
    with pytest.raises(ValueError, match=r"target_class must be in \[0, 10\)"):
        class_log_prob_reward(verifier, 10)
    with pytest.raises(ValueError, match="scalar or"):
        class_margin_reward(verifier, np.zeros((2, 2), np.int32))


@pytest.mark.parametrize("make", [class_log_prob_reward, class_margin_reward])
def test_nan_policy_and_extreme_inputs(verifier, heldout_digits, make):
    x = jnp.asarray(heldout_digits.images[:6])
    reward = make(verifier, 2)
    bad = x.at[1, 0, 3, 3].set(jnp.nan).at[2, 0, 0, 0].set(jnp.inf)
    r, r_clean = _call(reward, bad), _call(reward, x)
    assert np.isneginf(r[1]) and np.isneginf(r[2])
    np.testing.assert_allclose(r[jnp.array([0, 3, 4, 5])], r_clean[jnp.array([0, 3, 4, 5])])
    # Finite inputs, however large, give finite rewards (clipped to the pixel range) and gradients.
    huge = x * 1e30
    assert np.isfinite(_call(reward, huge)).all()
    grad = jax.jit(jax.grad(lambda r, z: r(z).sum(), argnums=1))(reward, bad)
    assert np.isfinite(grad).all()
