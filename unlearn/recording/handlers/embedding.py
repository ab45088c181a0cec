"""nn.Embedding: g_b[v, d] = sum_{t: idx[b, t] = v} delta[b, t, d], for the kept (v, d) only."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .base import VMAP_HELP, Capture, Handler
from .registry import register_handler


@register_handler(nn.Embedding)
class EmbeddingHandler(Handler):
    """Any index shape [B, ...]; the padding row gets no gradient. Entry by entry only (no dense)."""

    @classmethod
    def example(cls, module_type: type[nn.Module]) -> tuple[nn.Module, torch.Tensor]:
        idx = torch.randint(0, 10, (4, 6), generator=torch.Generator().manual_seed(0))
        idx[0, :2] = 0  # padding tokens
        return nn.Embedding(10, 4, padding_idx=0), idx

    def refusal(self, module: nn.Module) -> Optional[str]:
        if getattr(module, "scale_grad_by_freq", False):
            return ("scale_grad_by_freq makes its gradient depend on the whole batch; fix: construct it with "
                    f"scale_grad_by_freq=False, freeze it, {VMAP_HELP}")
        return None

    def values(self, capture: Capture, name: str, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        module: Any = capture.module
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

    def dense_is_cheap(self, name: str) -> bool:
        return False
