"""A model's parameters as one flat vector (named_parameters() order), the store's index space."""

from typing import Iterable, List, Tuple

import numpy as np
import torch

from .errors import UnlearnError


def flat_view(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The parameters as one flat torch tensor on their device (``flat_params`` gives numpy)."""
    return torch.cat([p.detach().reshape(-1) for p in params])


def flat_params(model: torch.nn.Module) -> np.ndarray:
    """All parameters in named_parameters() order as one float32 numpy vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu().numpy().copy()


def load_flat_params(model: torch.nn.Module, flat: "np.ndarray | torch.Tensor") -> None:
    """Write a flat vector (named_parameters() order) back into the model's parameters."""
    flat = torch.as_tensor(flat)
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n
    if offset != flat.numel():
        raise UnlearnError(f"flat vector has {flat.numel()} values, model has {offset}")


def named_shapes(model: torch.nn.Module) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, shape) of every parameter in order: the model half of a store's fingerprint."""
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]
