"""nn.RMSNorm: its weight (elementwise_affine) as small as a channel, formed whole.

g_b = sum over the sample's positions of delta * x / sqrt(mean(x^2 over normalized_shape) + eps).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .base import Capture, NormHandler
from .registry import register_handler


@register_handler(nn.RMSNorm)
class RMSNormHandler(NormHandler):
    def dense(self, capture: Capture, name: str) -> torch.Tensor:
        module: Any = capture.module
        x = capture.inputs[0].float()
        batch = x.shape[0]
        shape = tuple(module.normalized_shape)
        delta = capture.delta * F.rms_norm(x, shape, eps=module.eps)  # eps None: torch's default, as the module's
        return delta.reshape(batch, -1, *shape).sum(1).reshape(batch, -1)
