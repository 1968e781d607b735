"""Evaluation metrics for steered samples (host-side, return Python floats; not for use in jit).

- :func:`class_accuracy`: share of samples a (held-out) classifier assigns to the target class.
  Ma et al. 2025 report held-out verifiers because search on one verifier can hack it.
- :func:`frechet_distance`: Frechet distance between Gaussians fitted to two feature sets
  (the FID construction of Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule
  Converge to a Local Nash Equilibrium", here in a digit classifier's penultimate features, see
  :func:`classifier_frechet_distance`).
- :func:`mean_pairwise_distance`: sample diversity, which steering trades against reward.

Numerics: moments and matrix square roots are computed in float64 NumPy. The trace term
``tr sqrt(C1^1/2 C2 C1^1/2)`` uses symmetric eigendecompositions only (``C1^1/2`` from ``eigh``,
then the eigenvalues of the symmetric PSD product, clipped at 0 against round-off), which is
stable for singular covariances (fewer samples than feature dimensions) and never produces
complex values, unlike a general ``sqrtm`` of the non-symmetric product ``C1 C2``.

NaN handling: samples with non-finite pixels count as misclassified in :func:`class_accuracy`;
the distance metrics raise ``ValueError`` on non-finite inputs instead of returning NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tts_jax.models.classifier import Classifier
from tts_jax.rewards.classifier import prepare_images

Array = jax.Array


@jax.jit
def _predict(classifier: Classifier, x: Array) -> tuple[Array, Array, Array]:
    x_safe, finite = prepare_images(x)
    logits, features = classifier(x_safe)
    return jnp.argmax(logits, axis=-1), features, finite


def class_accuracy(classifier: Classifier, samples, target_class: int) -> float:
    """Fraction of ``samples [N, C, H, W]`` classified as ``target_class`` (inputs clipped to
    ``[-1, 1]`` as in the rewards; non-finite samples count as wrong)."""
    pred, _, finite = _predict(classifier, jnp.asarray(samples, jnp.float32))
    return float(jnp.mean((pred == target_class) & finite))


def _finite(name: str, a: np.ndarray) -> np.ndarray:
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains non-finite values")
    return a


def classifier_features(classifier: Classifier, samples) -> np.ndarray:
    """Penultimate features ``Float64[N, F]`` of ``samples [N, C, H, W]`` (clipped to [-1, 1]).

    Raises:
        ValueError: a sample has non-finite pixels.
    """
    _finite("samples", np.asarray(samples))
    _, features, _ = _predict(classifier, jnp.asarray(samples, jnp.float32))
    return np.asarray(features, np.float64)


def _psd_sqrt(c: np.ndarray) -> np.ndarray:
    """Symmetric PSD square root via ``eigh`` (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((c + c.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def gaussian_frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Squared 2-Wasserstein distance between ``N(mu1, cov1)`` and ``N(mu2, cov2)``:
    ``|mu1 - mu2|^2 + tr(cov1) + tr(cov2) - 2 tr sqrt(cov1^1/2 cov2 cov1^1/2)``.

    Args:
        mu1, mu2: ``Float[D]`` means.
        cov1, cov2: ``Float[D, D]`` symmetric PSD covariances.

    Returns:
        The distance (>= 0 up to round-off), float64 arithmetic.
    """
    mu1, mu2, cov1, cov2 = (
        _finite(n, np.asarray(a, np.float64))
        for n, a in (("mu1", mu1), ("mu2", mu2), ("cov1", cov1), ("cov2", cov2))
    )
    d = mu1.shape[0]
    if mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"shapes disagree: mu1 {mu1.shape}, cov1 {cov1.shape}, "
            f"mu2 {mu2.shape}, cov2 {cov2.shape}"
        )
    s1 = _psd_sqrt(cov1)
    middle = s1 @ cov2 @ s1
    cross = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * cross)


def frechet_distance(features1, features2) -> float:
    """Frechet distance between Gaussians fitted (mean, unbiased covariance) to two feature sets.

    Args:
        features1: ``Float[N1, D]``, ``N1 >= 2``.
        features2: ``Float[N2, D]``, ``N2 >= 2``.

    Returns:
        The distance. It is biased upward by finite samples (roughly ``tr(C1 + C2) / N`` from the
        mean term plus a covariance term), so compare values computed with equal sample sizes.
    """
    f1, f2 = (np.asarray(f, np.float64) for f in (features1, features2))
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1] or min(len(f1), len(f2)) < 2:
        raise ValueError(f"need two [N >= 2, D] feature sets, got {f1.shape} and {f2.shape}")
    return gaussian_frechet_distance(
        f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False)
    )


def classifier_frechet_distance(classifier: Classifier, samples, reference) -> float:
    """Frechet distance between ``samples`` and ``reference`` images (e.g. real digits of the
    target class), both ``[N, C, H, W]``, in ``classifier``'s penultimate feature space."""
    return frechet_distance(
        classifier_features(classifier, samples), classifier_features(classifier, reference)
    )


def mean_pairwise_distance(samples) -> float:
    """Mean Euclidean distance over all pairs ``i < j`` of flattened ``samples [N, ...]``, N >= 2.

    Computed row by row from exact differences (no Gram-matrix cancellation), memory O(N D).
    """
    x = _finite("samples", np.asarray(samples, np.float64))
    x = x.reshape(x.shape[0], -1)
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 samples, got {n}")
    total = sum(np.linalg.norm(x[i + 1 :] - x[i], axis=1).sum() for i in range(n - 1))
    return float(total / (n * (n - 1) / 2))
