"""Mask positions regenerated from (seed, key): deterministic, valid, equal to the spec, uniform."""

import numpy as np
import pytest

from gradstore import masks

# reference_positions(seed=42, key=7, num_params=1000, k=10), computed once and pasted here:
# a change of the algorithm (or of its constants) breaks every store already written.
GOLDEN_42_7_1000_10 = [105, 412, 443, 695, 794, 833, 892, 895, 972, 979]


def assert_valid(pos, num_params, k):
    assert pos.dtype == np.int64
    assert pos.shape == (k,)
    assert np.all(np.diff(pos) > 0), "positions must be strictly increasing (sorted and distinct)"
    assert pos[0] >= 0 and pos[-1] < num_params


def test_golden_value_is_pinned():
    assert masks.reference_positions(42, 7, 1000, 10).tolist() == GOLDEN_42_7_1000_10
    assert masks.positions(42, 7, 1000, 10).tolist() == GOLDEN_42_7_1000_10


@pytest.mark.parametrize("num_params,k", [(1000, 10), (5000, 100), (300, 50), (64, 64), (100, 99), (1000, 997), (1, 1), (10, 1)])
def test_positions_match_reference(num_params, k):
    for seed in (0, 42, 2**63 - 1):
        for key in (0, 1, 7, 12345, 2**40 + 3):
            pos = masks.positions(seed, key, num_params, k)
            assert_valid(pos, num_params, k)
            assert np.array_equal(pos, masks.reference_positions(seed, key, num_params, k)), (seed, key)


@pytest.mark.parametrize("k", [3, 28, 60, 200, 1200, 4000])  # 64 k / M from 0.03 to 43: every unroll
def test_every_bitmap_unroll_matches_reference(k):
    """The bitmap reader's unrolled paths (picked by density) agree with the reference, and so does every
    other unroll forced on the same row: the choice is speed only."""
    num_params, seed = 6000, 11
    keys = np.array([0, 5, 2**35 + 1], np.int64)
    expected = np.stack([masks.reference_positions(seed, int(key), num_params, k) for key in keys])
    assert np.array_equal(masks.positions_many(seed, keys, num_params, k), expected)
    for unroll in (0, 1, 2, 3, 8):
        out = np.empty((keys.size, k), np.int64)
        masks._positions_many_serial(seed, keys, num_params, unroll, out)
        assert np.array_equal(out, expected), unroll


def test_k_equal_to_m_is_identity():
    for key in (0, 5, 99):
        assert np.array_equal(masks.positions(3, key, 257, 257), np.arange(257))
        assert np.array_equal(masks.reference_positions(3, key, 257, 257), np.arange(257))


def test_k_close_to_m_misses_exactly_the_complement():
    pos = masks.positions(9, 4, 500, 498)
    assert_valid(pos, 500, 498)
    missing = np.setdiff1d(np.arange(500), pos)
    assert missing.size == 2
    assert np.array_equal(pos, masks.reference_positions(9, 4, 500, 498))


def test_deterministic_same_call_twice():
    a = masks.positions_many(5, np.arange(50), 10_000, 200)
    b = masks.positions_many(5, np.arange(50), 10_000, 200)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("num_params,k", [(200_000, 2000), (20_000, 1000)])  # sparse and dense masks
def test_parallel_many_equals_per_key(num_params, k):
    keys = np.concatenate([np.arange(300), [10**6, 2**33]]).astype(np.int64)
    assert keys.size * k >= masks.PARALLEL_MIN_VALUES  # the parallel path runs
    many = masks.positions_many(77, keys, num_params, k)
    assert many.shape == (keys.size, k)
    for i in range(0, keys.size, 23):
        single = masks.positions(77, int(keys[i]), num_params, k)
        assert_valid(single, num_params, k)
        assert np.array_equal(many[i], single), i
    assert np.array_equal(many[-1], masks.positions(77, 2**33, num_params, k))
    # the serial path (below the threshold) gives the same rows
    serial = masks.positions_many(77, keys[:3], num_params, k)
    assert np.array_equal(serial, many[:3])
    assert np.all(np.diff(many, axis=1) > 0)
    assert many.min() >= 0 and many.max() < num_params


def test_different_keys_and_seeds_give_different_sets():
    base = masks.positions(1, 1, 10_000, 100)
    assert not np.array_equal(base, masks.positions(1, 2, 10_000, 100))
    assert not np.array_equal(base, masks.positions(2, 1, 10_000, 100))
    # seed and key are not interchangeable
    assert not np.array_equal(masks.positions(1, 2, 10_000, 100), masks.positions(2, 1, 10_000, 100))
    # many keys: all distinct sets
    rows = masks.positions_many(1, np.arange(200), 10_000, 100)
    assert len({row.tobytes() for row in rows}) == 200


def test_uniform_over_positions_chi_square():
    stats = pytest.importorskip("scipy.stats")
    num_params, k, num_keys = 200, 20, 5000
    rows = masks.positions_many(2024, np.arange(num_keys), num_params, k)
    counts = np.bincount(rows.ravel(), minlength=num_params)
    assert counts.sum() == num_keys * k
    result = stats.chisquare(counts)
    assert result.pvalue > 1e-4, (result, counts.min(), counts.max())
    # a second, independent seed is uniform too, and uses different sets
    other = masks.positions_many(2025, np.arange(num_keys), num_params, k)
    assert stats.chisquare(np.bincount(other.ravel(), minlength=num_params)).pvalue > 1e-4
    assert (other != rows).any(axis=1).mean() > 0.99


def test_num_params_limit_is_enforced():
    """The kernel's 32-bit halves need M < 2**32 (docs/FORMAT.md): larger M is refused, not miscomputed."""
    with pytest.raises(ValueError, match="2\\*\\*32"):
        masks.positions(0, 0, 2**32, 4)
    with pytest.raises(ValueError):
        masks.positions_many(0, np.arange(3), 2**32 + 1, 4)
    # just below the limit, the kernel's draw -> [0, n) map is the spec's exact (draw * n) >> 64
    rng = np.random.default_rng(6)
    draws = [int(d) for d in rng.integers(0, 2**64, size=200, dtype=np.uint64)] + [0, 2**64 - 1, 2**63]
    for n in (2**32 - 1, 2**31 + 7, 1_000_003, 3, 1):
        for draw in draws:
            assert masks.below(np.uint64(draw), n) == (draw * n) >> 64, (draw, n)


def test_parallel_and_serial_kernels_have_their_own_cache_entries():
    """numba's disk cache keys entries by function name and line, not by the parallel flag: a
    parallel and a serial dispatcher of one body would load each other's machine code."""
    from gradstore import kernels
    from unlearn.recording import kernels as pair_kernels
    from unlearn.recording import preconditioner

    pairs = [(kernels._scatter_add_parallel, kernels._scatter_add_serial),
             (kernels._dequantize_int8_parallel, kernels._dequantize_int8_serial),
             (pair_kernels._conv2d_rows_parallel, pair_kernels._conv2d_rows_serial),
             (pair_kernels._linear_rows_parallel, pair_kernels._linear_rows_serial),
             (preconditioner._adam_times_parallel, preconditioner._adam_times_serial)]
    names = [dispatcher._cache._cache_file._index_name for pair in pairs for dispatcher in pair]
    assert len(set(names)) == len(names)
    assert all(parallel.targetoptions.get("parallel") and not serial.targetoptions.get("parallel")
               for parallel, serial in pairs)
