"""numba kernels: quantize, dequantize, and the scatter-add that applies rows to weights.

The scatter-add is parallel over disjoint ranges of the parameter vector, so no two
threads ever add into the same element (a ``prange`` over rows would race). Small
calls run serially: waking the OpenMP pool costs more than one row's work.
"""

import math

import numpy as np
from numba import njit, prange

from .jit import parallel_and_serial
from .masks import PARALLEL_MIN_VALUES, ROUNDING_SALT, fill_rows, stream_base, stream_draw, unroll_for

# ---------------------------------------------------------------- int8, absmax per block


@njit(cache=True, parallel=True)
def quantize_int8(values: np.ndarray, keys: np.ndarray, block_size: int, stochastic: bool, seed: int, q_out: np.ndarray,
                  scales_out: np.ndarray) -> None:
    """values float32 [n, k] -> q int8 [n, k], scales float32 [n, ceil(k/block)].

    scale = absmax(block) / 127; q = round(x * (127 / absmax)), to nearest (ties to even)
    or stochastically, with noise drawn from (seed, key) so a re-run gives the same bytes.
    """
    n, k = values.shape
    nblocks = scales_out.shape[1]
    for r in prange(n):
        base = stream_base(seed, keys[r], ROUNDING_SALT)
        for b in range(nblocks):
            lo = b * block_size
            hi = min(k, lo + block_size)
            absmax = np.float32(0.0)
            for j in range(lo, hi):
                absmax = max(absmax, abs(values[r, j]))
            scales_out[r, b] = absmax / np.float32(127.0)
            if absmax == 0:
                q_out[r, lo:hi] = 0
                continue
            inv = np.float32(127.0) / absmax
            if stochastic:
                for j in range(lo, hi):
                    u = np.float32(stream_draw(base, j) >> np.uint64(40)) * np.float32(1.0 / 16777216.0)
                    q_out[r, j] = np.int8(min(max(np.floor(values[r, j] * inv + u), np.float32(-127.0)), np.float32(127.0)))
            else:
                for j in range(lo, hi):
                    q_out[r, j] = np.int8(min(max(np.rint(values[r, j] * inv), np.float32(-127.0)), np.float32(127.0)))


def _dequantize_int8_body(q, scales, block_size, out):
    n, k = q.shape
    for r in prange(n):
        for b in range(scales.shape[1]):
            scale = scales[r, b]
            for j in range(b * block_size, min(k, (b + 1) * block_size)):
                out[r, j] = np.float32(q[r, j]) * scale


_dequantize_int8_parallel, _dequantize_int8_serial = parallel_and_serial(_dequantize_int8_body, cache=True)


def dequantize_int8(q: np.ndarray, scales: np.ndarray, block_size: int, out: np.ndarray) -> None:
    """q int8 [n, k], scales [n, nblocks] -> float32 [n, k] (out)."""
    kernel = _dequantize_int8_parallel if q.size >= PARALLEL_MIN_VALUES else _dequantize_int8_serial
    kernel(q, scales, block_size, out)


# ---------------------------------------------------------------- fp16 with a row exponent


@njit(cache=True, parallel=True)
def row_pow2_scales(values: np.ndarray, scales_out: np.ndarray) -> None:
    """Per row, the smallest power of two s >= absmax (capped at 2**127); 1 for an all-zero row.

    Dividing by a power of two is exact, so fp16(x / s) * s is plain fp16 rounding with
    float32's exponent range: no overflow past 65504, no flush of small gradients.
    """
    n, k = values.shape
    for r in prange(n):
        absmax = np.float32(0.0)
        for j in range(k):
            absmax = max(absmax, abs(values[r, j]))
        if absmax == 0:
            scales_out[r, 0] = 1.0
        else:
            mantissa, exponent = math.frexp(absmax)  # absmax = mantissa * 2**exponent, mantissa in [0.5, 1)
            if mantissa == 0.5:
                exponent -= 1
            scales_out[r, 0] = math.ldexp(1.0, min(exponent, 127))


# ---------------------------------------------------------------- input checks


@njit(cache=True)
def rows_not_finite(values: np.ndarray) -> np.ndarray:
    """Indices of rows holding a NaN or an Inf (an exponent of all ones), vectorised bit test."""
    n = values.shape[0]
    bits = values.reshape(n, -1).view(np.uint32)
    bad = np.zeros(n, np.bool_)
    for r in range(n):
        flag = np.uint32(0)
        for j in range(bits.shape[1]):
            flag |= np.uint32((bits[r, j] & np.uint32(0x7F800000)) == np.uint32(0x7F800000))
        bad[r] = flag != 0
    return np.nonzero(bad)[0]


@njit(cache=True)
def add_rows(target: np.ndarray, slots: np.ndarray, fresh: np.ndarray, values: np.ndarray) -> None:
    """target[slots[i]] = values[i] where fresh[i], else += (slots unique)."""
    for i in range(slots.shape[0]):
        row = target[slots[i]]
        if fresh[i]:
            row[:] = values[i]
        else:
            row += values[i]


# ---------------------------------------------------------------- scatter-add


def _scatter_add_body(flat, values, scales, block_size, keys, seed, num_params, alpha, nparts, positions, unroll):
    n, k = values.shape
    # 1) positions of every row (each row writes only its own slice of ``positions``)
    nthreads = min(n, nparts)
    per = (n + nthreads - 1) // nthreads
    for t in prange(nthreads):
        fill_rows(seed, keys, num_params, positions, t * per, min(n, (t + 1) * per), unroll)
    # 2) each part owns the parameter range [lo, hi): no two parts touch one element
    span = (num_params + nparts - 1) // nparts
    for p in prange(nparts):
        lo = p * span
        hi = min(num_params, lo + span)
        for r in range(n):
            row_pos = positions[r]
            start = np.searchsorted(row_pos, lo)
            stop = np.searchsorted(row_pos, hi)
            j = start
            while j < stop:  # block by block: one scale per block, no division per value
                block_end = min(stop, (j // block_size + 1) * block_size)
                weight = alpha * scales[r, j // block_size]
                for i in range(j, block_end):
                    flat[row_pos[i]] += weight * np.float32(values[r, i])
                j = block_end


_scatter_add_parallel, _scatter_add_serial = parallel_and_serial(_scatter_add_body, cache=True)


def scatter_add(flat: np.ndarray, values: np.ndarray, scales: np.ndarray, block_size: int, keys: np.ndarray, seed: int,
                num_params: int, alpha: float) -> None:
    """flat[positions(key_r)] += alpha * scales[r, j // block] * values[r, j] for every row r.

    ``values`` is int8 (with its absmax scales) or float (with scales of ones / the row
    exponent and block_size = k). Positions are regenerated inside the call.
    """
    n, k = values.shape
    positions = np.empty((n, k), np.int64)
    alpha = np.float32(alpha)
    unroll = unroll_for(num_params, k)
    if n * k < PARALLEL_MIN_VALUES or n == 1:
        _scatter_add_serial(flat, values, scales, block_size, keys, seed, num_params, alpha, 1, positions, unroll)
    else:
        import numba

        nparts = max(1, numba.get_num_threads())
        _scatter_add_parallel(flat, values, scales, block_size, keys, seed, num_params, alpha, nparts, positions, unroll)


# ---------------------------------------------------------------- packed sub-byte codes (int4, int2, sign)
#
# A row of k codes of ``bits`` bits (1, 2 or 4) packs 8 // bits codes a byte, code j in
# byte j // (8 // bits) at bit offset (j % (8 // bits)) * bits (the first code in the
# lowest bits); bits past k in the last byte are 0. A code c decodes to table[c] * scale
# of its block: two's complement for int4 / int2, (+1, -1) for sign.

MODE_NEAREST, MODE_STOCHASTIC, MODE_SIGN = 0, 1, 2


@njit(cache=True, parallel=True)
def quantize_packed(values: np.ndarray, keys: np.ndarray, block_size: int, bits: int, levels: int, mode: int, seed: int,
                    packed_out: np.ndarray, scales_out: np.ndarray) -> None:
    """values float32 [n, k] -> packed uint8 [n, ceil(k * bits / 8)] (zeroed on entry), scales float32 [n, nblocks].

    MODE_NEAREST / MODE_STOCHASTIC: scale = absmax / levels, q = round(x * (levels / absmax)) in
    [-levels, levels] (to nearest, ties to even, or floor(t + u) with u from (seed, key)), code q's
    two's complement in ``bits`` bits. MODE_SIGN: scale = mean |x| of the block (float64 sum in
    index order, / count, to float32), code 1 for x < 0 and 0 otherwise.
    """
    n, k = values.shape
    nblocks = scales_out.shape[1]
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    top = np.float32(levels)
    for r in prange(n):
        base = stream_base(seed, keys[r], ROUNDING_SALT)
        for b in range(nblocks):
            lo = b * block_size
            hi = min(k, lo + block_size)
            if mode == MODE_SIGN:
                total = 0.0
                for j in range(lo, hi):
                    total += np.float64(abs(values[r, j]))
                scales_out[r, b] = np.float32(total / np.float64(hi - lo))
                for j in range(lo, hi):
                    if values[r, j] < 0:
                        packed_out[r, j // per_byte] |= np.uint8(1 << ((j % per_byte) * bits))
                continue
            absmax = np.float32(0.0)
            for j in range(lo, hi):
                absmax = max(absmax, abs(values[r, j]))
            scales_out[r, b] = absmax / top
            if absmax == 0:
                continue
            inv = top / absmax
            for j in range(lo, hi):
                x = values[r, j]
                if x == 0:  # stays 0 (also where inv overflows to inf: 0 * inf would be NaN)
                    continue
                t = x * inv
                if mode == MODE_STOCHASTIC:
                    u = np.float32(stream_draw(base, j) >> np.uint64(40)) * np.float32(1.0 / 16777216.0)
                    q = min(max(np.floor(t + u), -top), top)
                else:
                    q = min(max(np.rint(t), -top), top)
                code = np.int64(q) & mask
                packed_out[r, j // per_byte] |= np.uint8(code << ((j % per_byte) * bits))


def _dequantize_packed_body(packed, scales, block_size, bits, table, out):
    n, k = out.shape
    lpb = 3 - (bits >> 1) if bits < 4 else 1  # log2(8 // bits): 1 -> 3, 2 -> 2, 4 -> 1
    pbmask = (1 << lpb) - 1
    mask = (1 << bits) - 1
    for r in prange(n):
        for b in range(scales.shape[1]):
            scale = scales[r, b]
            for j in range(b * block_size, min(k, (b + 1) * block_size)):
                code = (np.int64(packed[r, j >> lpb]) >> ((j & pbmask) * bits)) & mask
                out[r, j] = table[code] * scale


_dequantize_packed_parallel, _dequantize_packed_serial = parallel_and_serial(_dequantize_packed_body, cache=True)


def dequantize_packed(packed: np.ndarray, scales: np.ndarray, block_size: int, bits: int, table: np.ndarray,
                      out: np.ndarray) -> None:
    """packed uint8 [n, ceil(k * bits / 8)], scales [n, nblocks] -> float32 [n, k] (out): table[code] * scale."""
    kernel = _dequantize_packed_parallel if out.size >= PARALLEL_MIN_VALUES else _dequantize_packed_serial
    kernel(packed, scales, block_size, bits, table, out)


def _scatter_add_packed_body(flat, packed, scales, block_size, bits, byte_table, keys, seed, num_params, alpha, nparts,
                             positions, unroll):
    n, k = positions.shape
    lpb = 3 - (bits >> 1) if bits < 4 else 1  # log2 of the codes a byte holds: 1 -> 3, 2 -> 2, 4 -> 1
    per_byte = 1 << lpb
    pbmask = per_byte - 1
    mask = (1 << bits) - 1
    # A whole byte at a time where a block holds a power-of-two count of whole bytes (every registered default):
    # the block of byte b is b >> shift, and byte_table[v] holds byte v's codes decoded. Else block by block.
    bytes_per_block = block_size // per_byte
    shift = -1
    if block_size % per_byte == 0 and bytes_per_block & (bytes_per_block - 1) == 0:
        shift = 0
        while (1 << shift) < bytes_per_block:
            shift += 1
    nthreads = min(n, nparts)
    per = (n + nthreads - 1) // nthreads
    for t in prange(nthreads):
        fill_rows(seed, keys, num_params, positions, t * per, min(n, (t + 1) * per), unroll)
    span = (num_params + nparts - 1) // nparts
    for p in prange(nparts):
        lo = p * span
        hi = min(num_params, lo + span)
        for r in range(n):
            row_pos = positions[r]
            row_codes = packed[r]
            row_scales = scales[r]
            start = np.searchsorted(row_pos, lo)
            stop = np.searchsorted(row_pos, hi)
            if shift < 0:  # block by block: one scale per block, each code unpacked in place
                j = start
                while j < stop:
                    block_end = min(stop, (j // block_size + 1) * block_size)
                    weight = alpha * row_scales[j // block_size]
                    for i in range(j, block_end):
                        code = (np.int64(row_codes[i >> lpb]) >> ((i & pbmask) * bits)) & mask
                        flat[row_pos[i]] += weight * byte_table[code, 0]
                    j = block_end
                continue
            head = min(stop, ((start + pbmask) >> lpb) << lpb)  # the first whole byte's first value
            tail = max(head, (stop >> lpb) << lpb)  # the value after the last whole byte
            for i in range(start, head):  # values before the first whole byte (a part may start mid-byte)
                code = (np.int64(row_codes[i >> lpb]) >> ((i & pbmask) * bits)) & mask
                flat[row_pos[i]] += alpha * row_scales[i >> (shift + lpb)] * byte_table[code, 0]
            first, last = head >> lpb, tail >> lpb
            if bits == 4:
                for b in range(first, last):
                    weight = alpha * row_scales[b >> shift]
                    v = row_codes[b]
                    i = b * 2
                    flat[row_pos[i]] += weight * byte_table[v, 0]
                    flat[row_pos[i + 1]] += weight * byte_table[v, 1]
            elif bits == 2:
                for b in range(first, last):
                    weight = alpha * row_scales[b >> shift]
                    v = row_codes[b]
                    i = b * 4
                    flat[row_pos[i]] += weight * byte_table[v, 0]
                    flat[row_pos[i + 1]] += weight * byte_table[v, 1]
                    flat[row_pos[i + 2]] += weight * byte_table[v, 2]
                    flat[row_pos[i + 3]] += weight * byte_table[v, 3]
            else:
                for b in range(first, last):
                    weight = alpha * row_scales[b >> shift]
                    v = row_codes[b]
                    i = b * 8
                    for c in range(8):
                        flat[row_pos[i + c]] += weight * byte_table[v, c]
            for i in range(tail, stop):  # values after the last whole byte (a part's end, or k's last byte)
                code = (np.int64(row_codes[i >> lpb]) >> ((i & pbmask) * bits)) & mask
                flat[row_pos[i]] += alpha * row_scales[i >> (shift + lpb)] * byte_table[code, 0]


_scatter_add_packed_parallel, _scatter_add_packed_serial = parallel_and_serial(_scatter_add_packed_body, cache=True)


def byte_table(table: np.ndarray, bits: int) -> np.ndarray:
    """float32 [256, 8 // bits]: row v holds the codes of byte v decoded through ``table``, lowest bits first
    (row c < 2**bits starts with table[c], which decodes a lone code)."""
    per_byte = 8 // bits
    codes = (np.arange(256)[:, None] >> (np.arange(per_byte) * bits)[None, :]) & ((1 << bits) - 1)
    return np.ascontiguousarray(np.asarray(table, np.float32)[codes])


def scatter_add_packed(flat: np.ndarray, packed: np.ndarray, scales: np.ndarray, block_size: int, bits: int,
                       table: np.ndarray, keys: np.ndarray, seed: int, num_params: int, k: int, alpha: float) -> None:
    """flat[positions(key_r)] += alpha * scales[r, j // block] * table[code_rj] for every row r: the packed
    codes are decoded inside the scatter, one pass, no float32 copy of the rows."""
    n = packed.shape[0]
    positions = np.empty((n, k), np.int64)
    alpha = np.float32(alpha)
    unroll = unroll_for(num_params, k)
    args = (flat, packed, scales, block_size, bits, byte_table(table, bits), keys, seed, num_params, alpha)
    if n * k < PARALLEL_MIN_VALUES or n == 1:
        _scatter_add_packed_serial(*args, 1, positions, unroll)
    else:
        import numba

        _scatter_add_packed_parallel(*args, max(1, numba.get_num_threads()), positions, unroll)
