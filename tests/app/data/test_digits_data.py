"""Digits data: layout, value range, deterministic disjoint stratified split."""

import numpy as np
import pytest

from tts_jax.app.data.digits import load_digits, split_digits, split_indices


def test_layout_and_range():
    d = load_digits()
    assert d.images.shape == (1797, 1, 8, 8) and d.images.dtype == np.float32
    assert d.labels.shape == (1797,) and d.labels.dtype == np.int32
    assert d.images.min() == -1.0 and d.images.max() == 1.0
    assert set(np.unique(d.labels)) == set(range(10))


def test_split_is_deterministic_disjoint_covering_and_stratified():
    labels = load_digits().labels
    a, b = split_indices(labels, seed=0)
    a2, b2 = split_indices(labels, seed=0)
    np.testing.assert_array_equal(a, a2)
    np.testing.assert_array_equal(b, b2)
    assert np.intersect1d(a, b).size == 0
    np.testing.assert_array_equal(np.sort(np.concatenate([a, b])), np.arange(len(labels)))
    counts_a, counts = np.bincount(labels[a]), np.bincount(labels)
    assert np.all(np.abs(counts_a - counts / 2) <= 0.5)
    assert not np.array_equal(split_indices(labels, seed=1)[0], a)


def test_parts_swap_train_and_heldout():
    train_a, heldout_a = split_digits("a")
    train_b, heldout_b = split_digits("b")
    np.testing.assert_array_equal(train_a.images, heldout_b.images)
    np.testing.assert_array_equal(train_b.labels, heldout_a.labels)
    with pytest.raises(ValueError, match="part must be"):
        split_digits("c")
    with pytest.raises(ValueError, match="fraction_a"):
        split_indices(np.zeros(4, np.int32), fraction_a=1.0)
