"""Evaluation metrics: held-out accuracy, Frechet distance (closed forms, digits), diversity."""

import numpy as np
import pytest
from scipy.linalg import sqrtm

from tts_jax.app.data.digits import load_digits, split_digits
from tts_jax.rewards.classifier import load_digits_heldout, load_digits_verifier
from tts_jax.rewards.metrics import (
    class_accuracy,
    classifier_features,
    frechet_distance,
    gaussian_frechet_distance,
    mean_pairwise_distance,
)


def _rotated_pair(seed: int):
    """Covariances sharing eigenvectors (a random rotation) with eigenvalues a and b."""
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(3, 3)))
    a, b = np.array([1.0, 2.0, 0.5]), np.array([3.0, 0.5, 1.0])
    return a, b, (q * a) @ q.T, (q * b) @ q.T


def test_gaussian_frechet_closed_forms():
    a, b, c1, c2 = _rotated_pair(0)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([1.0, 0.5, -0.75])
    # Commuting covariances: sum of squared differences of the eigenvalue square roots.
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert gaussian_frechet_distance(mu1, c1, mu2, c2) == pytest.approx(want, rel=1e-10)
    assert gaussian_frechet_distance(mu1, c1, mu1, c1) == pytest.approx(0.0, abs=1e-10)
    # Non-commuting, singular (rank-deficient) covariance: the textbook formula with scipy's sqrtm.
    rng = np.random.default_rng(1)
    f, g = rng.normal(size=(3, 2)), rng.normal(size=(3, 3))
    s1, s2 = f @ f.T, g @ g.T + 0.1 * np.eye(3)
    textbook = np.trace(s1) + np.trace(s2) - 2.0 * np.trace(sqrtm(s1 @ s2)).real
    assert gaussian_frechet_distance(mu1, s1, mu1, s2) == pytest.approx(textbook, rel=1e-6)
    # Symmetric in its arguments.
    assert gaussian_frechet_distance(mu2, s2, mu1, s1) == pytest.approx(
        gaussian_frechet_distance(mu1, s1, mu2, s2), rel=1e-10
    )


def test_sample_frechet_distance_matches_the_gaussian_closed_form():
    a, b, c1, c2 = _rotated_pair(2)
    mu1, mu2 = np.array([0.0, 1.0, -1.0]), np.array([1.0, 0.5, -0.75])
    n = 20_000
    rng = np.random.default_rng(3)
    x1, x2 = rng.multivariate_normal(mu1, c1, n), rng.multivariate_normal(mu2, c2, n)
    d = mu1 - mu2
    want = d @ d + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    # Delta method: the mean term fluctuates with sd 2 sqrt(d'(C1 + C2)d / n); sqrt of a sample
    # variance has variance a / (2n), so (sqrt a - sqrt b)^2 has variance 2 (sqrt a - sqrt b)^2
    # (a + b) / n. Off-diagonal and mean-norm errors are O(d tr(C) / n) biases.
    var_cov_term = np.sum(2 * (np.sqrt(a) - np.sqrt(b)) ** 2 * (a + b)) / n
    sd = np.sqrt(4 * d @ (c1 + c2) @ d / n + var_cov_term)
    bias = 3 * (np.trace(c1) + np.trace(c2)) / n
    assert abs(frechet_distance(x1, x2) - want) < 5 * sd + bias


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_frechet_distance_of_real_digits_in_classifier_features(digits):
    feats = classifier_features(load_digits_verifier(), digits.images)
    by_class = [feats[digits.labels == c] for c in range(10)]
    same = [frechet_distance(f[::2], f[1::2]) for f in by_class]
    different = [
        frechet_distance(by_class[c][::2], by_class[k][1::2])
        for c in range(10)
        for k in range(10)
        if k != c
    ]
    assert min(same) >= 0.0
    # Two halves of one class (~90 digits each) differ only by sampling noise.
    assert max(same) < 0.05 * min(different), (max(same), min(different))


def test_class_accuracy_of_heldout_classifier():
    clf = load_digits_heldout()
    _, unseen = split_digits("b")  # the held-out classifier trained on part b
    for c in (0, 4, 9):
        mine = unseen.images[unseen.labels == c]
        assert class_accuracy(clf, mine, c) >= 0.9
        assert class_accuracy(clf, mine, (c + 1) % 10) <= 0.1
    bad = mine.copy()
    bad[: len(bad) // 2, 0, 0, 0] = np.nan
    assert class_accuracy(clf, bad, 9) == pytest.approx(
        class_accuracy(clf, mine[len(bad) // 2 :], 9) * (len(bad) - len(bad) // 2) / len(bad)
    )


def test_mean_pairwise_distance():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(40, 1, 8, 8))
    flat = x.reshape(40, -1)
    brute = np.linalg.norm(flat[:, None] - flat[None], axis=-1)
    want = brute[np.triu_indices(40, k=1)].mean()
    assert mean_pairwise_distance(x) == pytest.approx(want, rel=1e-12)
    assert mean_pairwise_distance(2.5 * x + 1.0) == pytest.approx(2.5 * want, rel=1e-12)
    assert mean_pairwise_distance(np.repeat(x[:1], 5, axis=0)) == 0.0


def test_non_finite_inputs_raise():
    x = np.zeros((4, 3))
    x[1, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        mean_pairwise_distance(x)
    with pytest.raises(ValueError, match="non-finite"):
        gaussian_frechet_distance(np.zeros(3), x[:3], np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(np.zeros((1, 3)), np.zeros((5, 3)))
