"""A model's recorded parameters as one flat vector: the store's index space.

A store indexes the parameters it records, in ``named_parameters()`` order: the trainable ones (frozen parameters
are never indexed), or a named subset of them (``recorded_parameters``). Their names and shapes are the store's
model fingerprint (``gradstore.model_fingerprint``), so whoever reads the store maps positions back through the
same list (``store_parameter_names``). Stores recorded before this rule indexed every parameter, frozen ones too:
their fingerprint names every parameter, and the same functions read them unchanged.
"""

from typing import Any, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import UnlearnError

Names = Optional[Sequence[str]]  # parameter names in index order; None: every parameter of the model


def flat_view(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """The parameters as one flat torch tensor on their device (``flat_params`` gives numpy)."""
    return torch.cat([p.detach().reshape(-1) for p in params])


def _named(model: torch.nn.Module) -> dict:
    return dict(model.named_parameters())


def parameters_named(model: torch.nn.Module, names: Names = None) -> List[torch.nn.Parameter]:
    """The model's parameters of ``names``, in that order (every parameter, in named_parameters() order, for None).
    A name the model does not have is refused, naming it."""
    if names is None:
        return list(model.parameters())
    found = _named(model)
    missing = [name for name in names if name not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UnlearnError(f"the model has no parameter {shown} (the store indexes parameters by name: was it "
                           "recorded for this model, or for the model wrapped in another module?)")
    return [found[name] for name in names]


def recorded_parameters(model: torch.nn.Module, modules: Names = None) -> List[Tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of what a recording indexes, in named_parameters() order: every trainable parameter, or,
    with ``modules`` (module paths like "transformer.h.0" or parameter names like "lm_head.weight"), the trainable
    parameters at or under those names. Frozen parameters are never recorded. Refused: a name that matches no
    module or parameter, a name whose parameters are all frozen, and a model with nothing trainable to record."""
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if modules is None:
        chosen = trainable
    else:
        if isinstance(modules, str):
            raise UnlearnError(f"modules takes a list of names, got the string {modules!r}: modules=[{modules!r}]")
        known = {name for name, _ in model.named_modules()} | {name for name, _ in model.named_parameters()}
        unknown = [m for m in modules if m not in known]
        if unknown:
            raise UnlearnError(f"modules names no module or parameter of the model: {', '.join(map(repr, unknown))}")

        def under(name: str, prefix: str) -> bool:
            return prefix == "" or name == prefix or name.startswith(prefix + ".")

        frozen = [m for m in modules if not any(under(name, m) for name, _ in trainable)]
        if frozen:
            raise UnlearnError(f"modules names parts of the model with no trainable parameter: "
                               f"{', '.join(map(repr, frozen))} (frozen parameters are never recorded)")
        chosen = [(name, p) for name, p in trainable if any(under(name, m) for m in modules)]
    if not chosen:
        raise UnlearnError("the model has no trainable parameter to record (every parameter has requires_grad=False)")
    return chosen


def store_parameter_names(store: Any, model: torch.nn.Module) -> List[str]:
    """The parameters a store indexes, in its order: its fingerprint's names (every parameter of ``model`` for a
    store written without a fingerprint)."""
    fingerprint = store.config.get("fingerprint") or {}
    names = fingerprint.get("names")
    return list(names) if names is not None else [name for name, _ in model.named_parameters()]


def flat_params(model: torch.nn.Module, names: Names = None) -> np.ndarray:
    """The parameters of ``names`` (all, in named_parameters() order, for None) as one float32 numpy vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in parameters_named(model, names)]).cpu().numpy().copy()


def load_flat_params(model: torch.nn.Module, flat: "np.ndarray | torch.Tensor", names: Names = None) -> None:
    """Write a flat vector back into the parameters of ``names`` (all, in named_parameters() order, for None)."""
    params = parameters_named(model, names)
    flat = torch.as_tensor(flat)
    total = sum(p.numel() for p in params)
    if total != flat.numel():
        raise UnlearnError(f"flat vector has {flat.numel()} values, the parameters it is for have {total}")
    offset = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            p.copy_(flat[offset : offset + n].view_as(p))
            offset += n


def named_shapes(model: torch.nn.Module, names: Names = None) -> List[Tuple[str, Tuple[int, ...]]]:
    """(name, shape) of the parameters of ``names`` (every parameter for None), in order: a store's fingerprint."""
    if names is None:
        return [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    return [(name, tuple(p.shape)) for name, p in zip(names, parameters_named(model, names))]
