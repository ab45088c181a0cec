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

from ...errors import RecordingUsageError
from .base import DENSE_BLOCK_FLOATS, Capture, Handler, Pairs, gather_dense_blocks

GENERIC = "generic (torch.func on the module)"  # the path's name in recording_plan()
# Below this many floats (samples x the module's own parameters) a call's per-sample gradients are formed once
# for every parameter and kept for the call; above it, a block of samples at a time for each parameter.
WHOLE_FLOATS = 1 << 24


class CallLayout:
    """How a call's inputs are laid out in its Capture: the positional arguments, then the keyword ones by name;
    and each tensor's version counter at the call (an input changed in place afterwards cannot be recomputed)."""

    def __init__(self, num_args: int, keywords: Sequence[str], versions: Sequence[Optional[int]] = ()):
        self.num_args = num_args
        self.keywords = tuple(keywords)
        self.versions = tuple(versions)

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
        # Which inputs hold the batch along their first dimension, by position: learnt at the engine's one-time
        # check, never guessed again from a shape (a shared [T, T] mask is not a batch when T equals B).
        self.batched: Optional[tuple[bool, ...]] = None

    def inputs(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        values = (*args, *kwargs.values())
        versions = tuple(v._version if isinstance(v, torch.Tensor) else None for v in values)
        return (*values, CallLayout(len(args), tuple(kwargs), versions))

    def learn_batched(self, inputs: tuple, batch: int) -> None:
        """At the one-time check: which of a call's inputs (as ``inputs`` lays them out) hold the batch."""
        self.batched = tuple(isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch
                             for v in inputs[:-1])

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
        name = type(module).__name__
        for value, version in zip(values, layout.versions):
            if isinstance(value, torch.Tensor) and version is not None and value._version != version:
                raise RecordingUsageError(
                    f"an input of {name} was changed in place after the call (h += m(h), an in-place activation), "
                    "so the generic path cannot recompute the call. Fix: write h = h + m(h), or use the "
                    "activation's out-of-place form")
        if self.batched is None:
            dims = tuple(0 if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == batch else None
                         for v in values)
        else:
            if len(self.batched) != len(values):
                raise RecordingUsageError(f"{name} was called with {len(values)} inputs, at the engine's one-time "
                                          f"check with {len(self.batched)}: the generic path needs the same call")
            for value, batched in zip(values, self.batched):
                if batched and not (isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch):
                    raise RecordingUsageError(f"an input of {name} held the batch at the engine's one-time check "
                                              f"but not in this call of {batch} samples")
            dims = tuple(0 if batched else None for batched in self.batched)
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
