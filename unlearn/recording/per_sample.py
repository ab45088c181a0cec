"""Per-sample gradients with torch.func: vmap over grad, in chunks so memory stays bounded."""

from typing import Callable, Optional, Sequence

import torch
from torch.func import functional_call, grad, vmap


def per_sample_grads(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_scale: float = 1.0,
                     chunk_size: int = 64, loss_fn: Optional[Callable] = None,
                     names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Flat per-sample gradients [B, M] (named_parameters() order) of loss_scale * loss_fn(sample).

    ``loss_fn(logits [1, ...], target [1, ...])`` is the loss of one sample (default:
    cross-entropy). With loss_scale = 1/B their sum over the batch is the gradient of the
    mean loss. This is the reference (``engine="vmap"``): it holds the [B, M] tensor.
    ``names``: the parameters differentiated, in this order (default: every one); the others are held as they are.
    """
    params = {name: p.detach() for name, p in model.named_parameters()}
    if names is not None:
        params = {name: params[name] for name in names}
    loss_fn = loss_fn or torch.nn.functional.cross_entropy

    def sample_loss(p, x, y):
        logits = functional_call(model, p, (x.unsqueeze(0),), strict=False)
        return loss_fn(logits, y.unsqueeze(0)) * loss_scale

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    outputs = []
    for start in range(0, inputs.shape[0], chunk_size):
        grads = per_sample(params, inputs[start : start + chunk_size], targets[start : start + chunk_size])
        outputs.append(torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1))
    return torch.cat(outputs)
