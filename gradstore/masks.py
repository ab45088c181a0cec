"""Mask positions regenerated from (seed, key): never stored, identical everywhere.

A row keeps ``k`` of the ``M`` flat parameters. Its positions are drawn by Floyd's
algorithm from a counter-based splitmix64 stream keyed by (seed, key), then sorted.
Everything is uint64 integer arithmetic (wrapping), so the result does not depend
on the machine, numpy's version or the number of threads. ``docs/FORMAT.md``
gives the algorithm in plain Python; ``reference_positions`` below is that text.
"""

from typing import Any

import numpy as np
from llvmlite import ir  # type: ignore[import-untyped]  # llvmlite ships no type information
from numba import int64, njit, prange, types, uint64
from numba.extending import intrinsic

from .errors import BadInputError

GOLDEN = 0x9E3779B97F4A7C15
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


@njit(inline="always", cache=True)
def mix64(z: Any) -> Any:
    """splitmix64's finaliser on a uint64."""
    z = uint64(z)
    z = (z ^ (z >> uint64(30))) * uint64(_MIX_1)
    z = (z ^ (z >> uint64(27))) * uint64(_MIX_2)
    return z ^ (z >> uint64(31))


@njit(inline="always", cache=True)
def stream_base(seed: Any, key: Any, salt: Any) -> Any:
    """Start of the random stream for (seed, key); ``salt`` separates streams' uses."""
    return mix64(mix64(uint64(seed) ^ uint64(salt)) ^ uint64(key))


@njit(inline="always", cache=True)
def stream_draw(base: Any, i: Any) -> Any:
    """The i-th (0-based) 64-bit draw of a stream."""
    return mix64(base + uint64(i + 1) * uint64(GOLDEN))


MASK_SALT = 0
ROUNDING_SALT = 0x5DEECE66D


@njit(inline="always", cache=True)
def below(draw: Any, n: Any) -> Any:
    """floor(draw * n / 2**64) for n < 2**32: a uniform integer in [0, n) without a division."""
    high = draw >> uint64(32)
    low = draw & uint64(0xFFFFFFFF)
    return int64((high * uint64(n) + ((low * uint64(n)) >> uint64(32))) >> uint64(32))


@intrinsic
def _trailing_zeros(typingctx, word):
    """Index of the lowest set bit of a uint64 (64 for zero): one tzcnt/bsf instruction."""

    def codegen(context, builder, signature, args):
        return builder.cttz(args[0], ir.Constant(ir.IntType(1), 0))

    return types.uint64(types.uint64), codegen


@intrinsic
def _popcount(typingctx, word):
    """Set bits of a uint64: one popcnt instruction."""

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return types.uint64(types.uint64), codegen


def unroll_for(num_params: int, k: int) -> int:
    """How many positions ``_read_bitmap`` writes per word without a branch, from the bits a word holds on
    average (64 k / M): 0 (skip empty words) when most are empty, up to 8 when most hold several.
    Measured on this project's 2-vCPU machine (docs/RESULTS.md); any value gives the same output."""
    density = 64.0 * k / max(num_params, 1)
    if density < 0.2:
        return 0
    if density < 0.45:
        return 1
    if density < 1.0:
        return 2
    if density < 2.5:
        return 3
    return 8


@njit(cache=True)
def _floyd(seed, key, num_params, k, bitmap, draws):
    """Floyd's algorithm: mark the row's k picks in ``bitmap`` (zeroed on entry).

    The draws do not depend on the bitmap, so they are computed first, in a loop the CPU
    pipelines; the marking loop then only branches on a collision (rare at small p).
    """
    base = stream_base(seed, key, MASK_SALT)
    first = num_params - k
    for i in range(k):
        draws[i] = below(stream_draw(base, i), first + i + 1)
    for i in range(k):
        t = draws[i]
        bit = uint64(1) << uint64(t & 63)
        word = bitmap[t >> 6]
        if word & bit:  # already picked: Floyd takes j = first + i, never picked before
            j = first + i
            bitmap[j >> 6] |= uint64(1) << uint64(j & 63)
        else:
            bitmap[t >> 6] = word | bit


@njit(cache=True, inline="always")
def _read_words(bitmap, out, unroll):
    """Write the set bits' indices in order into ``out`` (exactly as many as are set) and zero the bitmap.

    While ``out`` has room, each word's first ``unroll`` positions are written without a
    branch (those past the word's count are overwritten by the next word's), so a word
    costs no unpredictable branch; the rest, and every word when ``unroll`` is 0, go
    through the exact loop that skips empty words. Inlined with a constant ``unroll``,
    so the compiler unrolls it.
    """
    k = out.shape[0]
    n = 0
    w = 0
    if unroll > 0:
        while w < bitmap.shape[0] and n + unroll <= k:
            word = bitmap[w]
            bitmap[w] = 0
            count = int64(_popcount(word))  # type: ignore[call-arg]  # numba supplies an intrinsic's typingctx
            first = w * 64
            for u in range(unroll):
                out[n + u] = first + int64(_trailing_zeros(word))
                word &= word - uint64(1)
            if count > unroll:
                m = n + unroll
                while word:
                    out[m] = first + int64(_trailing_zeros(word))
                    m += 1
                    word &= word - uint64(1)
            n += count
            w += 1
    while w < bitmap.shape[0]:
        word = bitmap[w]
        if word:
            bitmap[w] = 0
            while word:
                out[n] = w * 64 + int64(_trailing_zeros(word))  # type: ignore[call-arg,operator]  # numba intrinsic (typingctx supplied), typed by numba
                n += 1
                word &= word - uint64(1)
        w += 1


@njit(cache=True)
def _read_bitmap(bitmap, out, unroll):
    """``_read_words`` specialised for each unroll that ``unroll_for`` returns."""
    if unroll == 1:
        _read_words(bitmap, out, 1)
    elif unroll == 2:
        _read_words(bitmap, out, 2)
    elif unroll == 3:
        _read_words(bitmap, out, 3)
    elif unroll == 8:
        _read_words(bitmap, out, 8)
    else:
        _read_words(bitmap, out, 0)


@njit(cache=True)
def _fill_positions(seed, key, num_params, out, bitmap, draws, unroll):
    """Write the sorted positions of one row into ``out`` (length k).

    ``bitmap`` is a zeroed uint64 scratch of ceil(num_params / 64) words, left zeroed;
    ``draws`` an int64 scratch of at least k. Floyd's algorithm marks the picks in the
    bitmap; reading its set bits in order gives them sorted in O(num_params / 64 + k),
    with no sort.
    """
    k = out.shape[0]
    if k == num_params:
        for j in range(k):
            out[j] = j
        return
    _floyd(seed, key, num_params, k, bitmap, draws)
    _read_bitmap(bitmap, out, unroll)


@njit(cache=True)
def fill_rows(seed: int, keys: np.ndarray, num_params: int, out: np.ndarray, start: int, stop: int, unroll: int) -> None:
    """Positions of keys[start:stop] into out[start:stop], with one scratch bitmap."""
    bitmap = np.zeros((num_params + 63) // 64, np.uint64)
    draws = np.empty(out.shape[1], np.int64)
    for r in range(start, stop):
        _fill_positions(seed, keys[r], num_params, out[r], bitmap, draws, unroll)


@njit(cache=True, parallel=True)
def _positions_many_parallel(seed, keys, num_params, unroll, out):
    n = keys.shape[0]
    nthreads = min(n, 64)
    per = (n + nthreads - 1) // nthreads
    for t in prange(nthreads):
        fill_rows(seed, keys, num_params, out, t * per, min(n, (t + 1) * per), unroll)


@njit(cache=True)
def _positions_many_serial(seed, keys, num_params, unroll, out):
    fill_rows(seed, keys, num_params, out, 0, keys.shape[0], unroll)


# Below this many values a parallel launch (waking the thread pool) costs more than it saves.
PARALLEL_MIN_VALUES = 1 << 18


def positions_many(seed: int, keys: Any, num_params: int, k: int) -> np.ndarray:
    """Sorted positions for each key: int64 array [len(keys), k]."""
    if num_params >= 2**32:
        raise BadInputError(f"num_params must be below 2**32, got {num_params}")
    keys = np.ascontiguousarray(keys, dtype=np.int64)
    out = np.empty((keys.shape[0], k), dtype=np.int64)
    unroll = unroll_for(num_params, k)
    if keys.shape[0] * k >= PARALLEL_MIN_VALUES and keys.shape[0] > 1:
        _positions_many_parallel(seed, keys, num_params, unroll, out)
    else:
        _positions_many_serial(seed, keys, num_params, unroll, out)
    return out


def positions(seed: int, key: int, num_params: int, k: int) -> np.ndarray:
    """Sorted positions of one key: int64 array [k]."""
    return positions_many(seed, np.array([key]), num_params, k)[0]


def reference_positions(seed: int, key: int, num_params: int, k: int) -> np.ndarray:
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
