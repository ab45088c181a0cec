"""Shared helpers for the gradstore tests: synthetic gradient rows and small stores."""

import hashlib

import numpy as np
import pytest

import gradstore

EPS32 = float(np.finfo(np.float32).eps)


def gradient_rows(rng, n, k, zero_fraction=0.05):
    """Gradient-like float32 rows: heavy-tailed (Student-t, 3 dof) * 1e-4, with some exact zeros."""
    values = (rng.standard_t(3, size=(n, k)) * 1e-4).astype(np.float32)
    values[rng.random((n, k)) < zero_fraction] = 0.0
    return values


def sha256(path):
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def build_store(path, codec="int8", num_params=5000, num_keys=300, keep=0.1, seed=11, data_seed=0, labels=None, epochs=1):
    """Record ``epochs`` identical-shaped random epochs into a finished store.

    Returns (path, sums) where sums is the float64 sum of everything recorded, per key.
    """
    rng = np.random.default_rng(data_seed)
    store = gradstore.create(path, num_params=num_params, num_keys=num_keys, keep=keep, codec=codec, seed=seed, labels=labels)
    sums = np.zeros((num_keys, store.k), np.float64)
    for _ in range(epochs):
        order = rng.permutation(num_keys)
        for start in range(0, num_keys, 32):
            keys = order[start : start + 32]
            rows = gradient_rows(rng, keys.size, store.k)
            store.accumulate(keys, rows)
            sums[keys] += rows
    store = store.finalize()
    store.close()
    return path, sums


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def small_store(tmp_path):
    """A finished int8 store of 300 keys (3 chunks of rows) and its float64 input sums."""
    return build_store(tmp_path / "small.h5")
