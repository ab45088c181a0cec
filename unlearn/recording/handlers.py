"""Per-sample gradient entries of one layer from what its backward already holds.

A layer's per-sample weight gradient is built from its input ``a`` and the gradient
``delta`` at its output (Opacus' grad samplers and LoGra use the same decomposition):
Linear  g_b[o, i]       = sum_t delta[b, t, o] * a[b, t, i]
Conv    g_b[o, c, kpos] = sum_l delta[b, o, l] * unfold(a)[b, c, kpos, l]
Embed.  g_b[v, d]       = sum_{t: idx[b, t] = v} delta[b, t, d]
The recording store keeps only a few entries per sample, so a handler computes just
those: ``values(param, b, j)`` gives g_b[j] for each pair (sample b, flat index j of
the parameter), at a cost proportional to the number of pairs, never a [B, numel]
tensor for a weight. Biases and norm affines are as small as the layer's output, so
their per-sample gradients are formed whole (``dense``) and gathered.
"""

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels

# Bound on the temporary [pairs, L] rows (floats) a weight handler gathers at once.
PAIR_CHUNK_FLOATS = 1 << 23
# CPU tensors go through the numba kernels (no temporaries); False forces the torch path everywhere.
USE_NUMBA = True
# Above this share of a weight's entries kept per sample, a dense per-sample product (a
# batched GEMM over a few samples at a time, then a gather) beats computing the entries one
# by one: measured on SimpleModel's conv2 on this project's 2-core CPU (docs/RESULTS.md).
DENSE_SHARE = 0.04
# Bound on the dense per-sample block (floats): samples at a time x the weight's size.
DENSE_BLOCK_FLOATS = 1 << 22


def _gather_dense_blocks(dense_of, batch, numel, pieces):
    """g_b[j] for each piece's pairs from ``dense_of(first, stop)`` -> [stop - first, numel]:
    a few samples at a time, each block formed once for every piece (every recording mask)."""
    block = max(1, DENSE_BLOCK_FLOATS // max(1, numel))
    starts = list(range(0, batch, block))
    outs, bounds = [], []
    for b, _ in pieces:
        outs.append(torch.empty(b.numel(), device=b.device))
        edges = torch.tensor(starts + [batch], device=b.device)
        bounds.append(torch.searchsorted(b, edges).tolist())
    for index, first in enumerate(starts):
        if all(edges[index] == edges[index + 1] for edges in bounds):
            continue
        dense = dense_of(first, min(batch, first + block)).reshape(-1)
        for (b, j), out, edges in zip(pieces, outs, bounds):
            lo, hi = edges[index], edges[index + 1]
            if lo < hi:
                out[lo:hi] = dense.index_select(0, (b[lo:hi] - first) * numel + j[lo:hi])
    return outs


def _numpy(tensor):
    return tensor.detach().to(torch.float32).contiguous().numpy()


def _on_cpu(*tensors):
    return USE_NUMBA and all(t.device.type == "cpu" for t in tensors)


class Capture:
    """One call of a module: its input and the gradient at its output, as float32."""

    def __init__(self, module, inputs, grad_output):
        self.module = module
        self.inputs = inputs
        self.delta = grad_output.float()


def _sum_rows_dot(left, right, left_rows, right_rows):
    """(left[left_rows] * right[right_rows]).sum(1), in chunks that bound the temporaries."""
    width = left.shape[1]
    step = max(1, PAIR_CHUNK_FLOATS // max(1, width))
    pieces = []
    for start in range(0, left_rows.numel(), step):
        stop = start + step
        pieces.append((left.index_select(0, left_rows[start:stop]) * right.index_select(0, right_rows[start:stop])).sum(1))
    return torch.cat(pieces) if pieces else left.new_zeros(0)


def _gather(dense, b, j):
    """dense[b, j] for the pairs, dense [B, n]."""
    return dense.reshape(-1).index_select(0, b * dense.shape[1] + j)


class Handler:
    """Per-sample gradient entries of one module type."""

    def values(self, capture, name, b, j):
        """g_b[j] for each pair: float32 [len(b)]."""
        return _gather(self.dense(capture, name), b, j)

    def values_many(self, capture, name, pieces):
        """``values`` for several sets of pairs (one per recording mask), sharing the work they can."""
        blocks = self.dense_blocks(capture, name)
        if blocks is not None:
            dense_of, batch, numel = blocks
            if sum(b.numel() for b, _ in pieces) >= DENSE_SHARE * batch * numel:
                return _gather_dense_blocks(dense_of, batch, numel, pieces)
        elif self.formed_whole(name):
            dense = self.dense(capture, name)
            return [_gather(dense, b, j) for b, j in pieces]
        return [self.values(capture, name, b, j) for b, j in pieces]

    def adds_rows(self, capture, name, pairs):
        """Whether ``add_rows`` serves this parameter now (CPU kernels, few entries kept)."""
        return False

    def add_rows(self, capture, name, positions, first, stop, offset, values):
        """values[r, c] += g_r[positions[r, c] - offset] for c in first[r]:stop[r] (numpy, in place)."""
        raise NotImplementedError(f"{type(self).__name__} adds no rows in place (adds_rows is False)")

    def dense_blocks(self, capture, name):
        """(dense_of(first, stop), batch, numel) when a weight's per-sample gradients can be formed
        a few samples at a time: cheaper than entry by entry once enough entries are kept."""
        return None

    def formed_whole(self, name):
        """Whether this parameter's per-sample gradients are always formed whole (small: biases, norms)."""
        return name == "bias"

    def dense(self, capture, name):
        """Per-sample gradients of the parameter: float32 [B, numel] (small parameters only)."""
        raise NotImplementedError(f"{type(self).__name__} forms no dense per-sample gradient for {name!r}")

    def dense_is_cheap(self, name):
        return name == "bias"


class LinearHandler(Handler):
    def _rows(self, capture):
        a = capture.inputs[0].float()
        batch = a.shape[0]
        a3 = a.reshape(batch, -1, a.shape[-1])
        d3 = capture.delta.reshape(batch, -1, capture.delta.shape[-1])
        return a3, d3

    def values(self, capture, name, b, j):
        a3, d3 = self._rows(capture)
        if name == "bias":
            return _gather(d3.sum(1), b, j)
        batch, length, width_in = a3.shape
        width_out = d3.shape[2]
        o, i = j // width_in, j % width_in
        if length == 1:
            return d3.reshape(-1).index_select(0, b * width_out + o) * a3.reshape(-1).index_select(0, b * width_in + i)
        left = d3.transpose(1, 2).reshape(batch * width_out, length)
        right = a3.transpose(1, 2).reshape(batch * width_in, length)
        return _sum_rows_dot(left, right, b * width_out + o, b * width_in + i)

    def dense(self, capture, name):
        a3, d3 = self._rows(capture)
        if name == "bias":
            return d3.sum(1)
        return torch.einsum("bto,bti->boi", d3, a3).reshape(a3.shape[0], -1)

    def adds_rows(self, capture, name, pairs):
        a3, d3 = self._rows(capture)
        return (name != "bias" and _on_cpu(a3, d3)
                and pairs < DENSE_SHARE * a3.shape[0] * a3.shape[2] * d3.shape[2])

    def add_rows(self, capture, name, positions, first, stop, offset, values):
        a3, d3 = self._rows(capture)
        kernels.linear_rows(_numpy(a3), _numpy(d3), positions, first, stop, offset, values)

    def dense_blocks(self, capture, name):
        a3, d3 = self._rows(capture)
        if name == "bias" or a3.shape[1] == 1:  # one token: two gathers per entry beat any product
            return None
        return (lambda first, stop: torch.einsum("bto,bti->boi", d3[first:stop], a3[first:stop]),
                a3.shape[0], a3.shape[2] * d3.shape[2])

    def dense_is_cheap(self, name):
        return True  # the smallest weight may serve as the probe; see engine.Probe


class ConvHandler(Handler):
    """Conv1d and Conv2d: stride, padding (any mode, 'same'), dilation, groups."""

    def _unfold_args(self, module, x):
        """(input padded as the conv pads it, as 4-D, kernel, dilation, stride), all 2-D."""
        ndim = len(module.kernel_size)
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        elif module.padding == "same":
            pads = []
            for size, dil in reversed(list(zip(kernel, dilation))):
                total = dil * (size - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        elif module.padding != "valid" and any(module.padding):
            x = F.pad(x, [p for p in reversed(module.padding) for _ in range(2)])
        if ndim == 1:
            return x.unsqueeze(2), (1, kernel[0]), (1, dilation[0]), (1, stride[0])
        return x, kernel, dilation, stride

    def _delta(self, capture):
        d = capture.delta
        return d.reshape(d.shape[0], d.shape[1], -1)  # [B, O, L]

    def values(self, capture, name, b, j):
        delta = self._delta(capture)
        if name == "bias":
            return _gather(delta.sum(2), b, j)
        module = capture.module
        x, kernel, dilation, stride = self._unfold_args(module, capture.inputs[0].float())
        batch, out_channels, length = delta.shape
        in_channels = x.shape[1]
        per_group_in = in_channels // module.groups
        per_group_out = out_channels // module.groups
        taps = kernel[0] * kernel[1]
        o, r = j // (per_group_in * taps), j % (per_group_in * taps)
        group = o // per_group_out
        left = delta.reshape(batch * out_channels, length)
        # unfold sample blocks one at a time so the [B, C*K, L] im2col stays bounded
        rows_per_sample = in_channels * taps * length
        block = max(1, PAIR_CHUNK_FLOATS // rows_per_sample)
        out = torch.empty(b.numel(), device=delta.device)
        bounds = torch.searchsorted(b, torch.arange(0, batch + block, block, device=b.device).clamp(max=batch))
        for index, first in enumerate(range(0, batch, block)):
            lo, hi = int(bounds[index]), int(bounds[index + 1])
            if lo == hi:
                continue
            unfolded = F.unfold(x[first:first + block], kernel, dilation=dilation, stride=stride)  # [b', C*K, L]
            right = unfolded.reshape(-1, length)
            pb = b[lo:hi] - first
            right_rows = pb * (in_channels * taps) + group[lo:hi] * (per_group_in * taps) + r[lo:hi]
            out[lo:hi] = _sum_rows_dot(left, right, b[lo:hi] * out_channels + o[lo:hi], right_rows)
        return out

    def adds_rows(self, capture, name, pairs):
        return (name != "bias" and _on_cpu(capture.delta)
                and pairs < DENSE_SHARE * capture.delta.shape[0] * capture.module.weight.numel())

    def add_rows(self, capture, name, positions, first, stop, offset, values):
        x, delta, geometry = self._numba_geometry(capture)
        kernels.conv2d_rows(x, delta, positions, first, stop, offset, values, *geometry)

    def _numba_geometry(self, capture):
        """(x, delta as 4-D numpy, (stride, padding, dilation, kernel, per_group_in, per_group_out))."""
        module = capture.module
        x, delta = capture.inputs[0], capture.delta
        ndim = len(module.kernel_size)
        padding = (0,) * ndim
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        elif module.padding == "same":  # torch puts the odd pixel on the right, which bounds checks cover
            padding = tuple(d * (size - 1) // 2 for size, d in zip(module.kernel_size, module.dilation))
        elif module.padding != "valid":
            padding = tuple(module.padding)
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        if ndim == 1:
            x, delta = x.unsqueeze(2), delta.unsqueeze(2)
            kernel, stride, dilation, padding = (1, *kernel), (1, *stride), (1, *dilation), (0, *padding)
        geometry = (stride, padding, dilation, kernel, x.shape[1] // module.groups, delta.shape[1] // module.groups)
        return _numpy(x), _numpy(delta), geometry

    def dense_blocks(self, capture, name):
        if name == "bias":
            return None
        module, delta = capture.module, self._delta(capture)
        x, kernel, dilation, stride = self._unfold_args(module, capture.inputs[0].float())
        return (lambda first, stop: self._dense_weight(module, x[first:stop], delta[first:stop], kernel, dilation, stride),
                delta.shape[0], module.weight.numel())

    def dense(self, capture, name):
        delta = self._delta(capture)
        if name == "bias":
            return delta.sum(2)
        module = capture.module
        x, kernel, dilation, stride = self._unfold_args(module, capture.inputs[0].float())
        return self._dense_weight(module, x, delta, kernel, dilation, stride)

    @staticmethod
    def _dense_weight(module, x, delta, kernel, dilation, stride):
        """Per-sample weight gradients [b, numel] of a few samples: im2col, then one batched product per group."""
        unfolded = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [b, C*K, L]
        batch, groups, length = delta.shape[0], module.groups, delta.shape[2]
        grads = torch.einsum("bgol,bgcl->bgoc", delta.reshape(batch, groups, -1, length),
                             unfolded.reshape(batch, groups, -1, length))
        return grads.reshape(batch, -1)

    def dense_is_cheap(self, name):
        return True


class EmbeddingHandler(Handler):
    def values(self, capture, name, b, j):
        module = capture.module
        idx = capture.inputs[0]
        batch = idx.shape[0]
        vocab, width = module.num_embeddings, module.embedding_dim
        idx = idx.reshape(batch, -1)
        delta = capture.delta.reshape(batch, -1, width)
        token_keys = (torch.arange(batch, device=idx.device)[:, None] * vocab + idx).reshape(-1)
        delta = delta.reshape(-1, width)
        if module.padding_idx is not None:  # the padding row gets no gradient
            keep = idx.reshape(-1) != module.padding_idx
            token_keys, delta = token_keys[keep], delta[keep]
        unique, inverse = torch.unique(token_keys, return_inverse=True)
        sums = torch.zeros(unique.numel(), width, device=delta.device).index_add_(0, inverse, delta)
        if unique.numel() == 0:
            return torch.zeros(b.numel(), device=delta.device)
        v, d = j // width, j % width
        pair_keys = b * vocab + v
        slot = torch.searchsorted(unique, pair_keys).clamp(max=unique.numel() - 1)
        found = unique.index_select(0, slot) == pair_keys
        return torch.where(found, sums.reshape(-1).index_select(0, slot * width + d), torch.zeros((), device=delta.device))

    def dense_is_cheap(self, name):
        return False


class NormHandler(Handler):
    """Affine parameters of a normalization: as small as a channel, always formed whole."""

    def formed_whole(self, name):
        return True

    def dense_is_cheap(self, name):
        return True


class LayerNormHandler(NormHandler):
    def dense(self, capture, name):
        module = capture.module
        x = capture.inputs[0].float()
        delta = capture.delta
        batch = x.shape[0]
        shape = module.normalized_shape
        if name == "weight":
            delta = delta * F.layer_norm(x, shape, eps=module.eps)
        return delta.reshape(batch, -1, *shape).sum(1).reshape(batch, -1)


class GroupNormHandler(NormHandler):
    def dense(self, capture, name):
        module = capture.module
        x = capture.inputs[0].float()
        delta = capture.delta
        if name == "weight":
            delta = delta * F.group_norm(x, module.num_groups, eps=module.eps)
        return delta.reshape(delta.shape[0], delta.shape[1], -1).sum(2)


HANDLERS = {
    nn.Linear: LinearHandler(),
    nn.Conv1d: ConvHandler(),
    nn.Conv2d: ConvHandler(),
    nn.Embedding: EmbeddingHandler(),
    nn.LayerNorm: LayerNormHandler(),
    nn.GroupNorm: GroupNormHandler(),
}


def handler_for(module):
    """The handler of the module's type, or of its nearest supported base class (most specific
    first along the MRO: ``nn.MultiheadAttention.out_proj`` is a ``NonDynamicallyQuantizableLinear``,
    recorded as a Linear), or None. A subclass that changes the forward is caught by the engine's
    one-time check (``engine.verify_separation``), which compares the handler's gradient with autograd's."""
    for cls in type(module).__mro__:
        handler = HANDLERS.get(cls)
        if handler is not None:
            return handler
    return None
