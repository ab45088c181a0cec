"""nn.LayerNorm and nn.GroupNorm: affine parameters as small as a channel, formed whole."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Capture, NormHandler
from .registry import register_handler


@register_handler(nn.LayerNorm)
class LayerNormHandler(NormHandler):
    def dense(self, capture: Capture, name: str) -> torch.Tensor:
        module: Any = capture.module
        x = capture.inputs[0].float()
        delta = capture.delta
        batch = x.shape[0]
        shape = module.normalized_shape
        if name == "weight":
            delta = delta * F.layer_norm(x, shape, eps=module.eps)
        return delta.reshape(batch, -1, *shape).sum(1).reshape(batch, -1)


@register_handler(nn.GroupNorm)
class GroupNormHandler(NormHandler):
    @classmethod
    def example(cls, module_type: type[nn.Module]) -> tuple[nn.Module, torch.Tensor]:
        return nn.GroupNorm(2, 4), torch.randn(4, 4, 3, 2, generator=torch.Generator().manual_seed(0))

    def dense(self, capture: Capture, name: str) -> torch.Tensor:
        module: Any = capture.module
        x = capture.inputs[0].float()
        delta = capture.delta
        if name == "weight":
            delta = delta * F.group_norm(x, module.num_groups, eps=module.eps)
        return delta.reshape(delta.shape[0], delta.shape[1], -1).sum(2)
