"""nn.Conv1d and nn.Conv2d: g_b[o, c, kpos] = sum_l delta[b, o, l] * unfold(a)[b, c, kpos, l]."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from . import base
from .base import Capture, DenseBlocks, Handler, as_numpy, gather, on_cpu, sum_rows_dot
from .registry import register_handler

Geometry = tuple[Any, ...]  # (stride, padding, dilation, kernel, per_group_in, per_group_out), all 2-D


@register_handler(nn.Conv1d, nn.Conv2d)
class ConvHandler(Handler):
    """Conv1d and Conv2d: stride, padding (any mode, 'same'), dilation, groups."""

    @classmethod
    def example(cls, module_type: type[nn.Module]) -> tuple[nn.Module, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        if issubclass(module_type, nn.Conv1d):
            return nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2), torch.randn(4, 2, 9, generator=generator)
        return (nn.Conv2d(2, 4, (2, 3), dilation=(1, 2), padding=1, padding_mode="reflect"),
                torch.randn(4, 2, 6, 7, generator=generator))

    def _unfold_args(self, module: Any, x: torch.Tensor) -> tuple[torch.Tensor, Any, Any, Any]:
        """(input padded as the conv pads it, as 4-D, kernel, dilation, stride), all 2-D."""
        ndim = len(module.kernel_size)
        kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        if module.padding_mode != "zeros":
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        elif module.padding == "same":
            pads: list[int] = []
            for size, dil in reversed(list(zip(kernel, dilation))):
                total = dil * (size - 1)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads)
        elif module.padding != "valid" and any(module.padding):
            x = F.pad(x, [p for p in reversed(module.padding) for _ in range(2)])
        if ndim == 1:
            return x.unsqueeze(2), (1, kernel[0]), (1, dilation[0]), (1, stride[0])
        return x, kernel, dilation, stride

    def _delta(self, capture: Capture) -> torch.Tensor:
        d = capture.delta
        return d.reshape(d.shape[0], d.shape[1], -1)  # [B, O, L]

    def values(self, capture: Capture, name: str, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        delta = self._delta(capture)
        if name == "bias":
            return gather(delta.sum(2), b, j)
        module: Any = capture.module
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
        block = max(1, base.PAIR_CHUNK_FLOATS // rows_per_sample)
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
            out[lo:hi] = sum_rows_dot(left, right, b[lo:hi] * out_channels + o[lo:hi], right_rows)
        return out

    def adds_rows(self, capture: Capture, name: str, pairs: int) -> bool:
        module: Any = capture.module
        return (name != "bias" and on_cpu(capture.delta)
                and pairs < base.DENSE_SHARE * capture.delta.shape[0] * module.weight.numel())

    def add_rows(self, capture: Capture, name: str, positions: np.ndarray, first: np.ndarray, stop: np.ndarray,
                 offset: int, values: np.ndarray) -> None:
        x, delta, geometry = self._numba_geometry(capture)
        kernels.conv2d_rows(x, delta, positions, first, stop, offset, values, *geometry)

    def _numba_geometry(self, capture: Capture) -> tuple[np.ndarray, np.ndarray, Geometry]:
        """(x, delta as 4-D numpy, (stride, padding, dilation, kernel, per_group_in, per_group_out))."""
        module: Any = capture.module
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
        return as_numpy(x), as_numpy(delta), geometry

    def dense_blocks(self, capture: Capture, name: str) -> Optional[DenseBlocks]:
        if name == "bias":
            return None
        module: Any = capture.module
        delta = self._delta(capture)
        x, kernel, dilation, stride = self._unfold_args(module, capture.inputs[0].float())
        return (lambda first, stop: self._dense_weight(module, x[first:stop], delta[first:stop], kernel, dilation, stride),
                delta.shape[0], module.weight.numel())

    def dense(self, capture: Capture, name: str) -> torch.Tensor:
        delta = self._delta(capture)
        if name == "bias":
            return delta.sum(2)
        module = capture.module
        x, kernel, dilation, stride = self._unfold_args(module, capture.inputs[0].float())
        return self._dense_weight(module, x, delta, kernel, dilation, stride)

    @staticmethod
    def _dense_weight(module: Any, x: torch.Tensor, delta: torch.Tensor, kernel: Any, dilation: Any,
                      stride: Any) -> torch.Tensor:
        """Per-sample weight gradients [b, numel] of a few samples: im2col, then one batched product per group."""
        unfolded = F.unfold(x, kernel, dilation=dilation, stride=stride)  # [b, C*K, L]
        batch, groups, length = delta.shape[0], module.groups, delta.shape[2]
        grads = torch.einsum("bgol,bgcl->bgoc", delta.reshape(batch, groups, -1, length),
                             unfolded.reshape(batch, groups, -1, length))
        return grads.reshape(batch, -1)

    def dense_is_cheap(self, name: str) -> bool:
        return True
