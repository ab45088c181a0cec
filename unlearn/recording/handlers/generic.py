"""The generic path: any parameterized module no registered handler serves, through torch.func on that module alone.

A module of an unregistered type with trainable parameters of its own (a user's layer, a ViT whose forward adds
its bare ``cls_token`` and ``pos_embed`` nn.Parameters) is not refused: the engine hooks its whole call (keyword
arguments too) and, from the gradient at its output, computes each sample's gradient of the module's own
parameters by ``torch.func.vmap(torch.func.grad(...))`` of the module's forward on that sample's inputs, with the
children's parameters held fixed (their own handlers record them). That reruns the module's forward and backward
per call: the cost of vmap on that module (on the whole model when the bare parameters live at its root), and
[samples, numel] floats a block at a time (``DENSE_BLOCK_FLOATS``). The engine's one-time check compares the result
with autograd, as for every handler, so a module the recomputation cannot reproduce is refused, not recorded wrong.

Refused (at the check, naming the module): a forward that draws random numbers (dropout inside the module while
training: the recomputation cannot draw the same mask; vmap runs with ``randomness="error"``), a forward vmap
cannot run (data-dependent control flow, ``.item()``), an output that is not a tensor or a tuple starting with one.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from .base import DENSE_BLOCK_FLOATS, Capture, Handler, Pairs, gather_dense_blocks

GENERIC = "generic (torch.func on the module)"  # the path's name in recording_plan()
# Below this many floats (samples x the module's own parameters) a call's per-sample gradients are formed once
# for every parameter and kept for the call; above it, a block of samples at a time for each parameter.
WHOLE_FLOATS = 1 << 24


class CallLayout:
    """How a call's inputs are laid out in its Capture: the positional arguments, then the keyword ones by name."""

    def __init__(self, num_args: int, keywords: Sequence[str]):
        self.num_args = num_args
        self.keywords = tuple(keywords)

    def split(self, values: Sequence[Any]) -> tuple[tuple, dict]:
        return tuple(values[:self.num_args]), dict(zip(self.keywords, values[self.num_args:]))


def _first_tensor(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the module returns a {type(output).__name__}: the generic path needs a tensor, or a tuple "
                    "whose first item is one")


class GenericHandler(Handler):
    """torch.func per-sample gradients of one module's own parameters (one instance per module: ``names``)."""

    tuple_output = True  # the whole call: keyword arguments, and an output that is a tuple by its first tensor

    def __init__(self, names: Sequence[str] = ()):
        self.names = tuple(names)  # the module's recorded parameters (the engine sets them)

    def inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        return (*args, *kwargs.values(), CallLayout(len(args), tuple(kwargs)))

    def formed_whole(self, name: str) -> bool:
        return False

    def dense_is_cheap(self, name: str) -> bool:
        return False

    # ------------------------------------------------------------------ the recomputation

    def _per_sample(self, capture: Capture, names: Sequence[str], first: int, stop: int) -> dict[str, torch.Tensor]:
        """{name: [stop - first, numel]}: each sample's gradient of <output, gradient at the output>."""
        module = capture.module
        *values, layout = capture.inputs
        batch = capture.delta.shape[0]
        dims = tuple(0 if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch else None
                     for v in values)
        sliced = [v[first:stop] if d == 0 else v for v, d in zip(values, dims)]
        own = dict(module.named_parameters(recurse=False))
        params = {name: own[name].detach() for name in names}

        def inner(p: dict, delta: torch.Tensor, *sample: Any) -> torch.Tensor:
            one = [v.unsqueeze(0) if d == 0 else v for v, d in zip(sample, dims)]
            args, kwargs = layout.split(one)
            out = _first_tensor(functional_call(module, p, args, kwargs, strict=False))
            return (out.float() * delta.unsqueeze(0)).sum()

        grads = vmap(grad(inner), in_dims=(None, 0, *dims), randomness="error")(
            params, capture.delta[first:stop], *sliced)
        return {name: g.reshape(stop - first, -1).float() for name, g in grads.items()}

    def _whole(self, capture: Capture, name: str) -> Optional[torch.Tensor]:
        """The parameter's [B, numel] when every recorded parameter's fit in WHOLE_FLOATS: formed once per call."""
        names = self.names or (name,)
        batch = capture.delta.shape[0]
        own = dict(capture.module.named_parameters(recurse=False))
        if batch * sum(own[n].numel() for n in names) > WHOLE_FLOATS:
            return None
        cached = getattr(capture, "generic_whole", None)
        if cached is None:
            cached = self._per_sample(capture, names, 0, batch)
            capture.generic_whole = cached  # type: ignore[attr-defined]
        return cached[name]

    def _blocks(self, capture: Capture, name: str):
        numel = dict(capture.module.named_parameters(recurse=False))[name].numel()
        return (lambda first, stop: self._per_sample(capture, (name,), first, stop)[name],
                capture.delta.shape[0], numel)

    def dense(self, capture: Capture, name: str) -> torch.Tensor:
        whole = self._whole(capture, name)
        return whole if whole is not None else self._per_sample(capture, (name,), 0, capture.delta.shape[0])[name]

    def values(self, capture: Capture, name: str, b: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        return self.values_many(capture, name, [(b, j)])[0]

    def values_many(self, capture: Capture, name: str, pieces: Sequence[Pairs]) -> list[torch.Tensor]:
        whole = self._whole(capture, name)
        if whole is not None:
            return [whole.reshape(-1).index_select(0, b * whole.shape[1] + j) for b, j in pieces]
        dense_of, batch, numel = self._blocks(capture, name)
        return gather_dense_blocks(dense_of, batch, numel, pieces)


__all__ = ["CallLayout", "DENSE_BLOCK_FLOATS", "GENERIC", "GenericHandler"]
