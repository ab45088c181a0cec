"""numba kernels for the CPU: one per-sample gradient entry per (sample, index) pair.

They walk each sample's sorted mask positions within one parameter and add the
entries straight into the batch's [B, k] values, reading the layer's input and output
gradient in place: no im2col, no pair arrays, no temporaries, so an entry costs its L
multiply-adds and nothing else. The right tool when few entries per sample are kept;
``layers`` switches to a dense per-sample product when the kept share is large. ``layers`` uses
them for CPU tensors and falls back to torch gathers elsewhere (a GPU).
"""

import numpy as np
from numba import njit, prange

PARALLEL_MIN_PAIRS = 4096


_OPTIONS = dict(cache=True, nogil=True)


@njit(inline="always", **_OPTIONS)
def _advance(j, o, base, width):
    """(o, base) moved up to the output whose ``width`` entries hold entry j (base = o * width). Positions
    ascend within a row, so each row walks its outputs once, without a division per entry."""
    while j - base >= width:
        o += 1
        base += width
    return o, base


def _conv2d_rows_body(x, delta, positions, lo, hi, offset, values, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                      kernel_h, kernel_w, per_group_in, per_group_out):
    """values[r, c] += the entry at positions[r, c] - offset, for c in lo[r]:hi[r] (no pair arrays)."""
    height, width = x.shape[2], x.shape[3]
    out_h, out_w = delta.shape[2], delta.shape[3]
    taps = kernel_h * kernel_w
    per_out = per_group_in * taps
    for sample in prange(positions.shape[0]):
        row = positions[sample]
        o, base = 0, 0
        for c in range(lo[sample], hi[sample]):
            j = row[c] - offset
            o, base = _advance(j, o, base, per_out)
            rest = j - base
            ch = rest // taps
            tap = rest - ch * taps
            kh = tap // kernel_w
            kw = tap - kh * kernel_w
            image = x[sample, (o // per_group_out) * per_group_in + ch]
            grad = delta[sample, o]
            shift_h = kh * dil_h - pad_h
            shift_w = kw * dil_w - pad_w
            # output rows/columns whose input pixel lies inside the image
            oh_lo = max(0, (-shift_h + stride_h - 1) // stride_h)
            oh_hi = min(out_h, (height - 1 - shift_h) // stride_h + 1)
            ow_lo = max(0, (-shift_w + stride_w - 1) // stride_w)
            ow_hi = min(out_w, (width - 1 - shift_w) // stride_w + 1)
            total = np.float32(0.0)
            for oh in range(oh_lo, oh_hi):
                source = image[oh * stride_h + shift_h]
                g = grad[oh]
                for ow in range(ow_lo, ow_hi):
                    total += g[ow] * source[ow * stride_w + shift_w]
            values[sample, c] += total


def _linear_rows_body(a, delta, positions, lo, hi, offset, values, width_in):
    """values[r, c] += sum_t delta[r, t, o] * a[r, t, i] for j = positions[r, c] - offset = o * width_in + i."""
    for sample in prange(positions.shape[0]):
        o, base = 0, 0
        for c in range(lo[sample], hi[sample]):
            o, base = _advance(positions[sample, c] - offset, o, base, width_in)
            i = positions[sample, c] - offset - base
            total = np.float32(0.0)
            for t in range(a.shape[1]):
                total += delta[sample, t, o] * a[sample, t, i]
            values[sample, c] += total


_conv2d_rows_parallel = njit(parallel=True, **_OPTIONS)(_conv2d_rows_body)
_conv2d_rows_serial = njit(**_OPTIONS)(_conv2d_rows_body)
_linear_rows_parallel = njit(parallel=True, **_OPTIONS)(_linear_rows_body)
_linear_rows_serial = njit(**_OPTIONS)(_linear_rows_body)


def conv2d_rows(x, delta, positions, lo, hi, offset, values, stride, padding, dilation, kernel, per_group_in,
                per_group_out):
    """Add a conv weight's entries into values [B, k] in place (see ``_conv2d_rows_body``)."""
    parallel = int((hi - lo).sum()) >= PARALLEL_MIN_PAIRS
    (_conv2d_rows_parallel if parallel else _conv2d_rows_serial)(
        x, delta, positions, lo, hi, offset, values, stride[0], stride[1], padding[0], padding[1], dilation[0],
        dilation[1], kernel[0], kernel[1], per_group_in, per_group_out)


def linear_rows(a, delta, positions, lo, hi, offset, values):
    """Add a Linear weight's entries (inputs [B, T, I]) into values [B, k] in place."""
    parallel = int((hi - lo).sum()) >= PARALLEL_MIN_PAIRS
    (_linear_rows_parallel if parallel else _linear_rows_serial)(a, delta, positions, lo, hi, offset, values, a.shape[2])


@njit(cache=True, nogil=True)
def row_bounds(positions, offsets):
    """bounds[r, q]: the first column of row r whose position is >= offsets[q] (rows sorted)."""
    batch, k = positions.shape
    count = offsets.shape[0]
    bounds = np.empty((batch, count), np.int64)
    for r in range(batch):
        q = 0
        for c in range(k):
            while q < count and offsets[q] <= positions[r, c]:
                bounds[r, q] = c
                q += 1
        while q < count:
            bounds[r, q] = k
            q += 1
    return bounds
