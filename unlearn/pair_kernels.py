"""numba kernels for the CPU: one per-sample gradient entry per (sample, index) pair.

They read the layer's input and output gradient in place (no im2col, no [pairs, L]
temporaries), so a pair costs its L multiply-adds and nothing else: the right tool
when few entries per sample are kept. ``layers`` switches to a dense per-sample
product when the kept share is large. ``layers`` uses
them for CPU tensors and falls back to torch gathers elsewhere (a GPU).
"""

import numpy as np
from numba import njit, prange

PARALLEL_MIN_PAIRS = 4096


def _conv2d_body(x, delta, starts, j, out, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, kernel_h, kernel_w,
                 per_group_in, per_group_out):
    """out[p] = sum over output pixels of delta[b, o, oh, ow] * x[b, cin, oh*s - pad + kh*d, ...] (zero padding).

    Samples run in parallel; a sample's pairs are starts[b]:starts[b + 1], j ascending.
    """
    height, width = x.shape[2], x.shape[3]
    out_h, out_w = delta.shape[2], delta.shape[3]
    taps = kernel_h * kernel_w
    per_out = per_group_in * taps
    for sample in prange(starts.shape[0] - 1):
        lo, hi = starts[sample], starts[sample + 1]
        if lo == hi:
            continue
        o = j[lo] // per_out
        base = o * per_out
        for p in range(lo, hi):  # j ascends within a sample: follow o without dividing
            while j[p] - base >= per_out:
                o += 1
                base += per_out
            rest = j[p] - base
            c = rest // taps
            tap = rest - c * taps
            kh = tap // kernel_w
            kw = tap - kh * kernel_w
            image = x[sample, (o // per_group_out) * per_group_in + c]
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
            out[p] = total


def _linear_seq_body(a, delta, starts, j, out, width_in):
    """out[p] = sum_t delta[b, t, o] * a[b, t, i] for j = o * width_in + i (j ascending per sample)."""
    for sample in prange(starts.shape[0] - 1):
        lo, hi = starts[sample], starts[sample + 1]
        if lo == hi:
            continue
        o = j[lo] // width_in
        base = o * width_in
        for p in range(lo, hi):
            while j[p] - base >= width_in:
                o += 1
                base += width_in
            i = j[p] - base
            total = np.float32(0.0)
            for t in range(a.shape[1]):
                total += delta[sample, t, o] * a[sample, t, i]
            out[p] = total


_OPTIONS = dict(cache=True, nogil=True)
_conv2d_parallel = njit(parallel=True, **_OPTIONS)(_conv2d_body)
_conv2d_serial = njit(**_OPTIONS)(_conv2d_body)
_linear_seq_parallel = njit(parallel=True, **_OPTIONS)(_linear_seq_body)
_linear_seq_serial = njit(**_OPTIONS)(_linear_seq_body)


def sample_starts(b, batch):
    """starts[s]:starts[s + 1] are sample s's pairs (b non-decreasing)."""
    return np.searchsorted(b, np.arange(batch + 1)).astype(np.int64)


def conv2d_pairs(x, delta, b, j, stride, padding, dilation, kernel, per_group_in, per_group_out):
    """float32 [pairs] from numpy x [B, C, H, W] and delta [B, O, OH, OW] (float32, C-contiguous)."""
    out = np.empty(b.shape[0], np.float32)
    kernel_fn = _conv2d_parallel if b.shape[0] >= PARALLEL_MIN_PAIRS else _conv2d_serial
    kernel_fn(x, delta, sample_starts(b, x.shape[0]), j, out, stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
              kernel[0], kernel[1], per_group_in, per_group_out)
    return out


def linear_seq_pairs(a, delta, b, j):
    """float32 [pairs] from numpy a [B, T, I] and delta [B, T, O]."""
    out = np.empty(b.shape[0], np.float32)
    kernel_fn = _linear_seq_parallel if b.shape[0] >= PARALLEL_MIN_PAIRS else _linear_seq_serial
    kernel_fn(a, delta, sample_starts(b, a.shape[0]), j, out, a.shape[2])
    return out


@njit(cache=True, nogil=True)
def split_rows(positions, offsets):
    """Pairs of every parameter from sorted positions [B, k], in one pass.

    Returns (first [P + 1], b, j, out): parameter q's pairs are first[q]:first[q + 1] of
    b (sample), j (index within the parameter) and out (index into the flat [B * k]
    values), in sample order.
    """
    batch, k = positions.shape
    count = offsets.shape[0] - 1
    bounds = np.empty((batch, count + 1), np.int64)
    for r in range(batch):  # merge walk: where each parameter starts in row r
        q = 0
        for c in range(k):
            while q <= count and offsets[q] <= positions[r, c]:
                bounds[r, q] = c
                q += 1
        while q <= count:
            bounds[r, q] = k
            q += 1
    first = np.zeros(count + 1, np.int64)
    for q in range(count):
        total = 0
        for r in range(batch):
            total += bounds[r, q + 1] - bounds[r, q]
        first[q + 1] = first[q] + total
    b = np.empty(batch * k, np.int64)
    j = np.empty(batch * k, np.int64)
    out = np.empty(batch * k, np.int64)
    for q in range(count):
        n = first[q]
        for r in range(batch):
            for c in range(bounds[r, q], bounds[r, q + 1]):
                b[n] = r
                j[n] = positions[r, c] - offsets[q]
                out[n] = r * k + c
                n += 1
    return first, b, j, out
