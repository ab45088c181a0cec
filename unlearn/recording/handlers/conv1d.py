"""transformers' Conv1D (GPT-2): y = x @ W + b with W [in, out], a Linear whose weight is transposed.

Registered by its qualified name: ``import unlearn`` does not import transformers (an optional
extra). Its weight's flat index j = i * out + o (row-major [in, out]) is the Linear's o * in + i
with the roles of the input ``a`` and the output gradient ``delta`` exchanged:
g_b[i, o] = sum_t a[b, t, i] * delta[b, t, o]. So the Linear's kernels serve it, handed (delta, a)
for (a, delta); the bias is the Linear's.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .base import Capture, DenseBlocks, gather
from .linear import LinearHandler
from .registry import register_handler

QUALIFIED_NAME = "transformers.pytorch_utils.Conv1D"


@register_handler(QUALIFIED_NAME)
class Conv1DHandler(LinearHandler):
    """Any number of leading token dimensions: [B, ..., in] -> [B, ..., out]."""

    @classmethod
    def example(cls, module_type: type[nn.Module]) -> tuple[nn.Module, torch.Tensor]:
        module = module_type(3, 5)  # Conv1D(nf=out, nx=in): [B, T, 5] -> [B, T, 3]
        return module, torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(0))

    def _rows(self, capture: Capture) -> tuple[torch.Tensor, torch.Tensor]:
        """(delta, a) where the Linear's kernels read (a, delta): the transposed weight's layout."""
        a3, d3 = super()._rows(capture)
        return d3, a3

    def _bias(self, capture: Capture) -> torch.Tensor:
        delta = capture.delta
        return delta.reshape(delta.shape[0], -1, delta.shape[-1]).sum(1)

    def values(self, capture: Capture, name: str, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        if name == "bias":
            return gather(self._bias(capture), b, j)
        return super().values(capture, name, b, j)

    def dense(self, capture: Capture, name: str) -> torch.Tensor:
        if name == "bias":
            return self._bias(capture)
        return super().dense(capture, name)

    def adds_rows(self, capture: Capture, name: str, pairs: int) -> bool:
        return name != "bias" and super().adds_rows(capture, name, pairs)

    def dense_blocks(self, capture: Capture, name: str) -> Optional[DenseBlocks]:
        return None if name == "bias" else super().dense_blocks(capture, name)
