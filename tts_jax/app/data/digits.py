"""scikit-learn's bundled 8x8 handwritten digits (UCI optdigits test set, 1797 images, no download).

Images are NCHW ``Float[N, 1, 8, 8]`` in ``[-1, 1]`` (pixel counts 0..16 mapped linearly), labels
``Int[N]`` in 0..9. :func:`split_digits` cuts the set into two disjoint, class-stratified parts by
seed, so that two models can be trained on different data and each evaluated on digits it never
saw (the steering verifier on part ``"a"``, the held-out evaluator on part ``"b"``).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

IMAGE_SHAPE = (1, 8, 8)
NUM_CLASSES = 10
_MAX_PIXEL = 16.0


class Digits(NamedTuple):
    """A set of digits (NumPy arrays on host).

    Attributes:
        images: ``Float32[N, 1, 8, 8]`` in ``[-1, 1]``.
        labels: ``Int32[N]`` in ``0..9``.
    """

    images: np.ndarray
    labels: np.ndarray


def load_digits() -> Digits:
    """All 1797 digits, in scikit-learn's order."""
    from sklearn.datasets import load_digits as sk_load_digits

    raw = sk_load_digits()
    images = raw.images.astype(np.float32) / _MAX_PIXEL * 2.0 - 1.0
    return Digits(images.reshape(-1, *IMAGE_SHAPE), raw.target.astype(np.int32))


def split_indices(labels: np.ndarray, seed: int = 0, fraction_a: float = 0.5) -> tuple:
    """Deterministic class-stratified split of ``range(len(labels))`` into parts a and b.

    Within each class, indices are ordered by ``np.random.default_rng(seed).random``, and the first
    ``round(fraction_a * count)`` go to part a.

    Args:
        labels: ``Int[N]`` class labels.
        seed: split seed; the same seed always gives the same split.
        fraction_a: share of every class that goes to part a, in ``(0, 1)``.

    Returns:
        ``(idx_a, idx_b)``: sorted, disjoint ``Int64`` index arrays covering ``range(N)``.
    """
    if not 0.0 < fraction_a < 1.0:
        raise ValueError(f"fraction_a must be in (0, 1), got {fraction_a}")
    keys = np.random.default_rng(seed).random(len(labels))
    idx_a, idx_b = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[np.argsort(keys[members], kind="stable")]
        cut = round(fraction_a * len(members))
        idx_a.append(members[:cut])
        idx_b.append(members[cut:])
    return np.sort(np.concatenate(idx_a)), np.sort(np.concatenate(idx_b))


def split_digits(
    part: Literal["a", "b"], seed: int = 0, fraction_a: float = 0.5
) -> tuple[Digits, Digits]:
    """``(train, heldout)`` for a model trained on ``part`` of the seeded split.

    ``split_digits("a")`` and ``split_digits("b")`` train on disjoint data, and each one's held-out
    set is the other's training set.

    Args:
        part: ``"a"`` or ``"b"``, the part to train on.
        seed: split seed (see :func:`split_indices`).
        fraction_a: share of each class in part a.

    Returns:
        ``(train, heldout)`` :class:`Digits`.
    """
    if part not in ("a", "b"):
        raise ValueError(f"part must be 'a' or 'b', got {part!r}")
    data = load_digits()
    idx_a, idx_b = split_indices(data.labels, seed, fraction_a)
    train, heldout = (idx_a, idx_b) if part == "a" else (idx_b, idx_a)
    return (
        Digits(data.images[train], data.labels[train]),
        Digits(data.images[heldout], data.labels[heldout]),
    )
