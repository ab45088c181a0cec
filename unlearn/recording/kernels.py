"""numba kernels for the CPU: one per-sample gradient entry per (sample, index) pair.

They walk each sample's sorted mask positions within one parameter and add the
entries straight into the batch's [B, k] values, reading the layer's input and output
gradient in place: no im2col, no pair arrays, no temporaries, no division and no signed
index per entry, so an entry costs little more than its L multiply-adds. The right tool when few entries per sample are kept;
the layer handlers (``unlearn.recording.handlers``) switch to a dense per-sample product when the
kept share is large; they use these kernels for CPU tensors and torch gathers elsewhere (a GPU).
"""

from typing import Any, Sequence

import numpy as np
from numba import njit, prange

from gradstore.jit import parallel_and_serial

PARALLEL_MIN_PAIRS = 4096


_OPTIONS: dict[str, Any] = dict(cache=True, nogil=True)  # njit's options: Any for its overloads
# Index type inside the kernels: numba checks every signed index for Python's negative wraparound,
# a branch that cost as much as the multiply-adds of an entry; unsigned indices skip it.
_U = np.uint64


def _conv2d_rows_body(x, delta, positions, lo, hi, offset, values, taps_table, channel_of, tap_of, stride_h,
                      stride_w, per_group_in, per_group_out):
    """values[r, c] += the entry at positions[r, c] - offset, for c in lo[r]:hi[r] (no pair arrays).

    ``taps_table`` (``conv_tables``) holds each kernel tap's input shift and the output rows
    and columns whose input pixel lies inside the image; ``channel_of``/``tap_of`` split an
    index within one output channel's weights. No division per entry and unsigned indices
    (``_U``): at small p an entry is a few multiply-adds, and locating it cost more.
    """
    width, out_w = x.shape[3], delta.shape[3]
    images = x.reshape(x.shape[0], x.shape[1], x.shape[2] * width)
    grads = delta.reshape(delta.shape[0], delta.shape[1], delta.shape[2] * out_w)
    per_out = _U(channel_of.shape[0])
    start = _U(offset)
    step_w = _U(stride_w)
    for sample in prange(positions.shape[0]):
        row, out = positions[sample], values[sample]
        sample_images, sample_grads = images[sample], grads[sample]
        o, base, channel_base = _U(0), _U(0), _U(0)
        for c in range(_U(lo[sample]), _U(hi[sample])):
            j = _U(row[c]) - start
            if j - base >= per_out:  # positions ascend: each row walks its output channels once
                while j - base >= per_out:
                    o += _U(1)
                    base += per_out
                channel_base = (o // _U(per_group_out)) * _U(per_group_in)
            rest = j - base
            tap = _U(tap_of[rest])
            oh_lo, oh_hi = taps_table[tap, _U(2)], taps_table[tap, _U(3)]
            ow_lo, ow_hi = taps_table[tap, _U(4)], taps_table[tap, _U(5)]
            if oh_lo >= oh_hi or ow_lo >= ow_hi:
                continue  # the tap reads only padding: the entry is 0
            shift_h, shift_w = taps_table[tap, _U(0)], taps_table[tap, _U(1)]
            image = sample_images[channel_base + _U(channel_of[rest])]
            grad = sample_grads[o]
            total = np.float32(0.0)
            for oh in range(oh_lo, oh_hi):
                # may wrap below 0 when shift_w < 0; uint64 arithmetic wraps back for ow >= ow_lo
                source = _U((oh * stride_h + shift_h) * width + shift_w)
                target = _U(oh * out_w)
                for ow in range(_U(ow_lo), _U(ow_hi)):
                    total += grad[target + ow] * image[source + ow * step_w]
            out[c] += total


@njit(**_OPTIONS)
def conv_tables(height: int, width: int, out_h: int, out_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                dil_h: int, dil_w: int, kernel_h: int, kernel_w: int,
                per_group_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(taps_table [taps, 6]: shift_h, shift_w, oh_lo, oh_hi, ow_lo, ow_hi; channel_of, tap_of [per_group_in * taps])."""
    taps = kernel_h * kernel_w
    table = np.empty((taps, 6), np.int64)
    for tap in range(taps):
        kh = tap // kernel_w
        kw = tap - kh * kernel_w
        shift_h = kh * dil_h - pad_h
        shift_w = kw * dil_w - pad_w
        table[tap, 0] = shift_h
        table[tap, 1] = shift_w
        # output rows/columns whose input pixel lies inside the image
        table[tap, 2] = max(0, (-shift_h + stride_h - 1) // stride_h)
        table[tap, 3] = min(out_h, (height - 1 - shift_h) // stride_h + 1)
        table[tap, 4] = max(0, (-shift_w + stride_w - 1) // stride_w)
        table[tap, 5] = min(out_w, (width - 1 - shift_w) // stride_w + 1)
    channel_of = np.empty(per_group_in * taps, np.int32)
    tap_of = np.empty(per_group_in * taps, np.int32)
    for ch in range(per_group_in):
        for tap in range(taps):
            channel_of[ch * taps + tap] = ch
            tap_of[ch * taps + tap] = tap
    return table, channel_of, tap_of


def _linear_rows_body(a, delta, positions, lo, hi, offset, values, width_in):
    """values[r, c] += sum_t delta[r, t, o] * a[r, t, i] for j = positions[r, c] - offset = o * width_in + i."""
    tokens = _U(a.shape[1])
    width = _U(width_in)
    start = _U(offset)
    for sample in prange(positions.shape[0]):
        row, out = positions[sample], values[sample]
        inputs, grads = a[sample], delta[sample]
        o, base = _U(0), _U(0)
        for c in range(_U(lo[sample]), _U(hi[sample])):
            j = _U(row[c]) - start
            while j - base >= width:
                o += _U(1)
                base += width
            i = j - base
            total = np.float32(0.0)
            for t in range(tokens):
                total += grads[t, o] * inputs[t, i]
            out[c] += total


_conv2d_rows_parallel, _conv2d_rows_serial = parallel_and_serial(_conv2d_rows_body, **_OPTIONS)
_linear_rows_parallel, _linear_rows_serial = parallel_and_serial(_linear_rows_body, **_OPTIONS)


def conv2d_rows(x: np.ndarray, delta: np.ndarray, positions: np.ndarray, lo: np.ndarray, hi: np.ndarray, offset: int,
                values: np.ndarray, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                kernel: Sequence[int], per_group_in: int, per_group_out: int) -> None:
    """Add a conv weight's entries into values [B, k] in place (see ``_conv2d_rows_body``)."""
    tables = conv_tables(x.shape[2], x.shape[3], delta.shape[2], delta.shape[3], stride[0], stride[1], padding[0],
                         padding[1], dilation[0], dilation[1], kernel[0], kernel[1], per_group_in)
    parallel = int((hi - lo).sum()) >= PARALLEL_MIN_PAIRS
    (_conv2d_rows_parallel if parallel else _conv2d_rows_serial)(
        x, delta, positions, lo, hi, offset, values, *tables, stride[0], stride[1], per_group_in, per_group_out)


def linear_rows(a: np.ndarray, delta: np.ndarray, positions: np.ndarray, lo: np.ndarray, hi: np.ndarray, offset: int,
                values: np.ndarray) -> None:
    """Add a Linear weight's entries (inputs [B, T, I]) into values [B, k] in place."""
    parallel = int((hi - lo).sum()) >= PARALLEL_MIN_PAIRS
    (_linear_rows_parallel if parallel else _linear_rows_serial)(a, delta, positions, lo, hi, offset, values, a.shape[2])


@njit(**_OPTIONS)
def dense_rows(dense: np.ndarray, positions: np.ndarray, lo: np.ndarray, hi: np.ndarray, offset: int,
               values: np.ndarray) -> None:
    """values[r, c] += dense[r, positions[r, c] - offset] for c in lo[r]:hi[r]: a parameter whose
    per-sample gradients [B, numel] are formed whole (biases, norm affines, the probe)."""
    start = _U(offset)
    for sample in range(positions.shape[0]):
        row, out, grads = positions[sample], values[sample], dense[sample]
        for c in range(_U(lo[sample]), _U(hi[sample])):
            out[c] += grads[_U(row[c]) - start]


@njit(cache=True, nogil=True)
def row_bounds(positions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
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
