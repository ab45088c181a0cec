"""nn.Linear: g_b[o, i] = sum_t delta[b, t, o] * a[b, t, i], entry by entry or in dense blocks."""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from .. import kernels
from . import base
from .base import Capture, DenseBlocks, Handler, as_numpy, gather, sum_rows_dot
from .registry import register_handler


@register_handler(nn.Linear)
class LinearHandler(Handler):
    """Any number of leading token dimensions: [B, ..., in] -> [B, ..., out]."""

    @classmethod
    def example(cls, module_type: type[nn.Module]) -> tuple[nn.Module, torch.Tensor]:
        return nn.Linear(5, 3), torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))

    def _rows(self, capture: Capture) -> tuple[torch.Tensor, torch.Tensor]:
        a = capture.inputs[0].float()
        batch = a.shape[0]
        a3 = a.reshape(batch, -1, a.shape[-1])
        d3 = capture.delta.reshape(batch, -1, capture.delta.shape[-1])
        return a3, d3

    def values(self, capture: Capture, name: str, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        a3, d3 = self._rows(capture)
        if name == "bias":
            return gather(d3.sum(1), b, j)
        batch, length, width_in = a3.shape
        width_out = d3.shape[2]
        o, i = j // width_in, j % width_in
        if length == 1:
            return d3.reshape(-1).index_select(0, b * width_out + o) * a3.reshape(-1).index_select(0, b * width_in + i)
        left = d3.transpose(1, 2).reshape(batch * width_out, length)
        right = a3.transpose(1, 2).reshape(batch * width_in, length)
        return sum_rows_dot(left, right, b * width_out + o, b * width_in + i)

    def dense(self, capture: Capture, name: str) -> torch.Tensor:
        a3, d3 = self._rows(capture)
        if name == "bias":
            return d3.sum(1)
        return torch.einsum("bto,bti->boi", d3, a3).reshape(a3.shape[0], -1)

    def adds_rows(self, capture: Capture, name: str, pairs: int) -> bool:
        a3, d3 = self._rows(capture)
        return (name != "bias" and base.on_cpu(a3, d3)
                and pairs < base.DENSE_SHARE * a3.shape[0] * a3.shape[2] * d3.shape[2])

    def add_rows(self, capture: Capture, name: str, positions: np.ndarray, first: np.ndarray, stop: np.ndarray,
                 offset: int, values: np.ndarray) -> None:
        a3, d3 = self._rows(capture)
        kernels.linear_rows(as_numpy(a3), as_numpy(d3), positions, first, stop, offset, values)

    def dense_blocks(self, capture: Capture, name: str) -> Optional[DenseBlocks]:
        a3, d3 = self._rows(capture)
        if name == "bias" or a3.shape[1] == 1:  # one token: two gathers per entry beat any product
            return None
        return (lambda first, stop: torch.einsum("bto,bti->boi", d3[first:stop], a3[first:stop]),
                a3.shape[0], a3.shape[2] * d3.shape[2])

    def dense_is_cheap(self, name: str) -> bool:
        return True  # the smallest weight may serve as the probe; see engine.Probe
