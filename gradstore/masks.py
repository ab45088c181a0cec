"""Mask positions regenerated from (seed, key): never stored, identical everywhere.

A row keeps ``k`` of the ``M`` flat parameters. Its positions are drawn by Floyd's
algorithm from a counter-based splitmix64 stream keyed by (seed, key), then sorted.
Everything is uint64 integer arithmetic (wrapping), so the result does not depend
on the machine, numpy's version or the number of threads. ``docs/FORMAT.md``
gives the algorithm in plain Python; ``reference_positions`` below is that text.
"""

import numpy as np
from numba import int64, njit, prange, uint64

GOLDEN = 0x9E3779B97F4A7C15
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


@njit(inline="always", cache=True)
def mix64(z):
    """splitmix64's finaliser on a uint64."""
    z = uint64(z)
    z = (z ^ (z >> uint64(30))) * uint64(_MIX_1)
    z = (z ^ (z >> uint64(27))) * uint64(_MIX_2)
    return z ^ (z >> uint64(31))


@njit(inline="always", cache=True)
def stream_base(seed, key, salt):
    """Start of the random stream for (seed, key); ``salt`` separates streams' uses."""
    return mix64(mix64(uint64(seed) ^ uint64(salt)) ^ uint64(key))


@njit(inline="always", cache=True)
def stream_draw(base, i):
    """The i-th (0-based) 64-bit draw of a stream."""
    return mix64(base + uint64(i + 1) * uint64(GOLDEN))


MASK_SALT = 0
ROUNDING_SALT = 0x5DEECE66D


@njit(inline="always", cache=True)
def below(draw, n):
    """floor(draw * n / 2**64) for n < 2**32: a uniform integer in [0, n) without a division."""
    high = draw >> uint64(32)
    low = draw & uint64(0xFFFFFFFF)
    return int64((high * uint64(n) + ((low * uint64(n)) >> uint64(32))) >> uint64(32))


_DEBRUIJN = 0x03F79D71B4CB0A89
_DEBRUIJN_TABLE = np.zeros(64, np.int64)
for _bit in range(64):
    _DEBRUIJN_TABLE[(((1 << _bit) * _DEBRUIJN) & _MASK64) >> 58] = _bit


@njit(inline="always", cache=True)
def _lowest_bit(word):
    """Index of the lowest set bit of a non-zero uint64 (de Bruijn multiply)."""
    isolated = word & (~word + uint64(1))
    return _DEBRUIJN_TABLE[(isolated * uint64(_DEBRUIJN)) >> uint64(58)]


def bitmap_words(num_params):
    """A zeroed bitmap of num_params bits, as the scratch ``_fill_positions`` needs."""
    return np.zeros((num_params + 63) // 64, np.uint64)


@njit(cache=True)
def _fill_positions(seed, key, num_params, out, bitmap):
    """Write the sorted positions of one row into ``out`` (length k).

    ``bitmap`` is a zeroed uint64 scratch of ceil(num_params / 64) words, left zeroed.
    Floyd's algorithm marks the picks in the bitmap; reading its set bits in order
    gives them sorted in O(num_params / 64 + k), with no sort.
    """
    k = out.shape[0]
    if k == num_params:
        for j in range(k):
            out[j] = j
        return
    base = stream_base(seed, key, MASK_SALT)
    i = 0
    for j in range(num_params - k, num_params):
        t = below(stream_draw(base, i), j + 1)
        i += 1
        if (bitmap[t >> 6] >> uint64(t & 63)) & uint64(1):
            t = j
        bitmap[t >> 6] |= uint64(1) << uint64(t & 63)
    n = 0
    for w in range(bitmap.shape[0]):
        word = bitmap[w]
        if word:
            bitmap[w] = 0
            while word:
                out[n] = w * 64 + _lowest_bit(word)
                n += 1
                word &= word - uint64(1)


@njit(cache=True)
def fill_rows(seed, keys, num_params, out, start, stop):
    """Positions of keys[start:stop] into out[start:stop], with one scratch bitmap."""
    bitmap = np.zeros((num_params + 63) // 64, np.uint64)
    for r in range(start, stop):
        _fill_positions(seed, keys[r], num_params, out[r], bitmap)


@njit(cache=True, parallel=True)
def _positions_many_parallel(seed, keys, num_params, k, out):
    n = keys.shape[0]
    nthreads = min(n, 64)
    per = (n + nthreads - 1) // nthreads
    for t in prange(nthreads):
        fill_rows(seed, keys, num_params, out, t * per, min(n, (t + 1) * per))


@njit(cache=True)
def _positions_many_serial(seed, keys, num_params, k, out):
    fill_rows(seed, keys, num_params, out, 0, keys.shape[0])


# Below this many values a parallel launch (waking the thread pool) costs more than it saves.
PARALLEL_MIN_VALUES = 1 << 18


def positions_many(seed, keys, num_params, k):
    """Sorted positions for each key: int64 array [len(keys), k]."""
    if num_params >= 2**32:
        raise ValueError(f"num_params must be below 2**32, got {num_params}")
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    out = np.empty((keys.shape[0], k), dtype=np.int64)
    if keys.shape[0] * k >= PARALLEL_MIN_VALUES and keys.shape[0] > 1:
        _positions_many_parallel(seed, keys, num_params, k, out)
    else:
        _positions_many_serial(seed, keys, num_params, k, out)
    return out


def positions(seed, key, num_params, k):
    """Sorted positions of one key: int64 array [k]."""
    return positions_many(seed, np.array([key]), num_params, k)[0]


def reference_positions(seed, key, num_params, k):
    """Pure-Python statement of the mask algorithm (slow; the spec in docs/FORMAT.md)."""

    def mix(z):
        z &= _MASK64
        z = ((z ^ (z >> 30)) * _MIX_1) & _MASK64
        z = ((z ^ (z >> 27)) * _MIX_2) & _MASK64
        return z ^ (z >> 31)

    if k == num_params:
        return np.arange(num_params, dtype=np.int64)
    base = mix(mix(seed ^ MASK_SALT) ^ key)
    chosen = set()
    for i, j in enumerate(range(num_params - k, num_params)):
        t = (mix(base + (i + 1) * GOLDEN) * (j + 1)) >> 64
        chosen.add(j if t in chosen else t)
    return np.array(sorted(chosen), dtype=np.int64)
