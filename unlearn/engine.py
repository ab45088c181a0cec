"""The masked per-sample gradient engine: module hooks inside the user's own backward.

For each batch the engine knows the sample keys, hence every recording mask's
positions (regenerated from (seed, key), as the store does). A forward hook keeps a
hooked module's input; a hook on its output receives the output gradient during the
ordinary ``loss.backward()``; the module's handler (``layers``) then computes each
sample's gradient at that sample's kept positions only, and adds them into the batch's
[B, k] values. Memory is O(B·k) per mask plus what the layers' backward holds; no
[B, M] tensor exists. The per-sample quantity is the gradient of the user's own loss
restricted to sample b, so any loss that is a sum or mean of per-sample terms works
(the 1/B of a mean arrives through the backward).

A batch's positions and their split by parameter are prepared in a background thread
as soon as its keys are known (when the wrapped loader yields it), overlapping the
forward pass.
"""

from __future__ import annotations

import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from gradstore import masks

from . import layers, pair_kernels
from .layers import Capture, handler_for

# The gradient the optimizer stepped with must be this close to a multiple of the
# backward's (see Probe); farther, the engine warns once.
PROBE_TOLERANCE = 1e-2

# Prepare a batch's positions in a thread while its forward runs (False: at begin_batch, inline).
PREPARE_IN_BACKGROUND = True

UNSUPPORTED_HELP = ("replace BatchNorm with GroupNorm (unlearn.models.resnet18 does), freeze the module's "
                    "parameters, or record with engine='vmap' (slower, any module torch.func supports)")


class UnsupportedModelError(ValueError):
    """The model holds modules the masked engine cannot attribute per sample."""


def check_model(model: nn.Module):
    """Refuse, naming them, the modules whose per-sample gradients the engine cannot form."""
    problems = []
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training or any(p.requires_grad for p in module.parameters(recurse=False)):
                problems.append(f"{name or 'model'} ({type(module).__name__}: mixes the samples of a batch in training mode)")
            continue
        trainable = [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not trainable:
            continue
        if handler_for(module) is None:
            problems.append(f"{name or 'model'} ({type(module).__name__}, parameters {', '.join(trainable)})")
        elif isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
            problems.append(f"{name} (Embedding with scale_grad_by_freq: its gradient depends on the whole batch)")
    if problems:
        raise UnsupportedModelError(
            "the masked engine cannot record per-sample gradients of: " + "; ".join(problems)
            + ". Supported: Linear, Conv1d, Conv2d, Embedding, LayerNorm, GroupNorm. Fix: " + UNSUPPORTED_HELP
        )


@dataclass
class ParamSlot:
    """One trainable parameter of a hooked module: where it sits in the flat vector."""

    index: int
    name: str  # within its module ("weight", "bias")
    param: torch.nn.Parameter
    offset: int
    qualified: str = ""  # within the model


@dataclass
class BatchEntry:
    """One batch (or micro-batch) of a step: its keys, labels, masks and accumulated values."""

    keys: np.ndarray
    labels: Optional[np.ndarray]
    prepared: object = None  # {mask: MaskBatch}, or a Future of it
    values: dict = field(default_factory=dict)  # {mask: float32 [B * k]} once a capture arrived

    def ready(self):
        if not isinstance(self.prepared, dict):
            self.prepared = self.prepared.result()
        return self.prepared


class MaskBatch:
    """One mask's positions for one batch: [B, k], sorted per row, with where each parameter starts.

    The CPU kernels walk the rows directly (``rows``); the other paths get (sample, index,
    flat slot) arrays per parameter (``pieces``), built on first use.
    """

    def __init__(self, positions: np.ndarray, offsets: np.ndarray, device):
        self.numpy = positions
        self.k = positions.shape[1]
        self.offsets = offsets
        self.bounds = pair_kernels.row_bounds(positions, offsets)  # [B, P + 1]
        self.counts = (self.bounds[:, 1:] - self.bounds[:, :-1]).sum(0)  # [P]: entries in each parameter
        self.positions = torch.from_numpy(positions).to(device, non_blocking=True)
        self.device = device
        self._pieces = {}

    def rows(self, index):
        """(first, stop) columns of each row that fall in parameter ``index``."""
        return self.bounds[:, index], self.bounds[:, index + 1]

    def count(self, index):
        return int(self.counts[index])

    def pieces(self, index):
        """(b, j, out) int64 tensors: sample, index within the parameter, slot in the flat [B * k] values."""
        if index not in self._pieces:
            first, stop = self.rows(index)
            lengths = stop - first
            rows = np.arange(lengths.size)
            before = np.cumsum(lengths) - lengths
            out = np.arange(int(lengths.sum())) + np.repeat(rows * self.k + first - before, lengths)
            b = np.repeat(rows, lengths)
            j = self.numpy.reshape(-1)[out] - self.offsets[index]
            self._pieces[index] = tuple(torch.from_numpy(a).to(self.device) for a in (b, j, out))
        return self._pieces[index]


class Probe:
    """The factor between the backward's gradients and the gradient the optimizer steps with.

    GradScaler scales the loss by S and unscales ``.grad`` before the step;
    ``clip_grad_norm_`` multiplies ``.grad`` by c <= 1. Both turn the backward's gradient
    g into f·g. The probe sums the per-sample gradients of one small parameter (formed
    whole anyway) and compares them with its ``.grad`` at step time, so rows hold the
    sample's share of the gradient the step actually used: unscaled, and clipped when
    the step was.
    """

    def __init__(self, slot: Optional[ParamSlot]):
        self.slot = slot
        self.total = None
        self.warned = False
        self.reduce = None  # under DDP: what .grad holds of the ranks' sums (unlearn.distributed)

    def add(self, dense_batch_sum):
        self.total = dense_batch_sum if self.total is None else self.total + dense_batch_sum

    def reset(self):
        self.total = None

    def factor(self) -> float:
        if self.slot is None or self.total is None or self.slot.param.grad is None:
            return 1.0
        seen = (self.total if self.reduce is None else self.reduce(self.total)).reshape(-1).double()
        stepped = self.slot.param.grad.detach().reshape(-1).double()
        norm = float(seen @ seen)
        if norm == 0.0:
            return 1.0
        factor = float(stepped @ seen) / norm
        residual = float((stepped - factor * seen).norm()) / max(float(stepped.norm()), 1e-30)
        if residual > PROBE_TOLERANCE and not self.warned:
            self.warned = True
            warnings.warn(f"the gradient of {self.slot.qualified} at optimizer.step() is not a multiple of what the "
                          f"backward computed (relative residual {residual:.2g}): element-wise clipping, added "
                          "noise, or a parameter used outside its module (tied weights)? Rows assume a multiple.",
                          stacklevel=3)
        return factor


class MaskedEngine:
    """Hooks that fill each batch's per-mask values during the user's backward."""

    def __init__(self, model: nn.Module, mask_specs, num_params: int):
        check_model(model)
        self.model = model
        self.mask_specs = sorted(set(mask_specs))  # (seed, k)
        self.num_params = num_params
        offsets, slots_of = [0], {}
        names = {id(p): n for n, p in model.named_parameters()}
        for p in model.parameters():
            offsets.append(offsets[-1] + p.numel())
        offset_of = {id(p): offsets[i] for i, p in enumerate(model.parameters())}
        index_of = {id(p): i for i, p in enumerate(model.parameters())}
        self.offsets = np.array(offsets, np.int64)
        self._handles = []
        dense_candidates = []
        for module in model.modules():
            handler = handler_for(module)
            slots = []
            for name, p in module.named_parameters(recurse=False):
                if p.requires_grad and handler is not None:
                    slot = ParamSlot(index_of[id(p)], name, p, offset_of[id(p)])
                    slots.append(slot)
                    if handler.dense_is_cheap(name):
                        dense_candidates.append(slot)
            if slots:
                slots_of[module] = slots
                self._handles.append(module.register_forward_hook(self._forward_hook))
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._handles.append(module.register_forward_pre_hook(_refuse_training_batchnorm))
        self._slots_of = slots_of
        probe_slot = min(dense_candidates, key=lambda s: s.param.numel(), default=None)
        if probe_slot is not None:
            probe_slot.qualified = names[id(probe_slot.param)]
        self.probe = Probe(probe_slot)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradstore-masks")
        self.current: Optional[BatchEntry] = None
        self.entries: list[BatchEntry] = []  # since the last step
        self.unkeyed: list = []  # (capture, slots) of backward passes whose keys are not known yet
        self.compute_seconds = 0.0  # inside the hooks, on the training thread
        self.prepare_seconds = 0.0  # mask positions and their split, in the background thread

    # ------------------------------------------------------------------ batches

    def begin_batch(self, keys, labels=None) -> BatchEntry:
        """The next forward/backward passes are of these samples (in batch order)."""
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        entry = BatchEntry(keys, None if labels is None else np.asarray(labels, np.int64))
        entry.prepared = self._executor.submit(self._prepare, keys) if PREPARE_IN_BACKGROUND else self._prepare(keys)
        self.current = entry
        self.entries.append(entry)
        return entry

    def assign_unkeyed(self, keys, labels=None) -> bool:
        """Give keys to the captures of backward passes run before the keys were known."""
        if not self.unkeyed:
            return False
        entry = BatchEntry(np.ascontiguousarray(keys, dtype=np.int64), None if labels is None else np.asarray(labels, np.int64))
        entry.prepared = self._prepare(entry.keys)
        self.entries.append(entry)
        captures, self.unkeyed = self.unkeyed, []
        for capture, slots in captures:
            self._compute(entry, capture, slots)
        return True

    def _prepare(self, keys):
        started = time.perf_counter()
        device = next(iter(self._slots_of.values()))[0].param.device if self._slots_of else torch.device("cpu")
        prepared = {}
        for seed, k in self.mask_specs:
            prepared[(seed, k)] = MaskBatch(masks.positions_many(seed, keys, self.num_params, k), self.offsets, device)
        self.prepare_seconds += time.perf_counter() - started
        return prepared

    def reset(self):
        """Forget the values of passes since the last step (zero_grad, a skipped step)."""
        self.entries = [self.current] if self.current is not None else []
        for entry in self.entries:
            entry.values = {}
        self.unkeyed = []
        self.probe.reset()

    def end_step(self):
        self.entries, self.current, self.unkeyed = [], None, []
        self.probe.reset()

    # ------------------------------------------------------------------ hooks

    def _forward_hook(self, module, inputs, output):
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return  # inside a torch.func transform (e.g. the vmap reference): not the user's backward
        entry, slots = self.current, self._slots_of[module]

        def on_output_grad(grad):
            capture = Capture(module, inputs, grad)
            if entry is None:
                self.unkeyed.append((capture, slots))
            else:
                self._compute(entry, capture, slots)

        output.register_hook(on_output_grad)

    @torch.no_grad()  # the inputs require grad: nothing here belongs in a graph
    def _compute(self, entry: BatchEntry, capture: Capture, slots):
        started = time.perf_counter()
        prepared = entry.ready()
        batch = capture.delta.shape[0]
        if batch != entry.keys.size:
            raise ValueError(f"{type(capture.module).__name__} saw a batch of {batch} samples, but the batch has "
                             f"{entry.keys.size} keys: keys must follow the batch's first dimension")
        handler = handler_for(capture.module)
        on_cpu = layers.USE_NUMBA and capture.delta.device.type == "cpu"
        for slot in slots:
            here = [(mask, found) for mask, found in prepared.items() if found.count(slot.index)]
            dense = None
            if slot is self.probe.slot or (on_cpu and here and handler.formed_whole(slot.name)):
                dense = handler.dense(capture, slot.name)
            if slot is self.probe.slot:
                self.probe.add(dense.sum(0))
            if not here:
                continue
            values_of = {mask: self._values(entry, mask, batch, capture.delta.device) for mask, _ in here}
            if on_cpu and dense is not None:  # formed whole anyway: gathered straight into the values
                dense_rows = dense.detach().float().contiguous().numpy()
                for mask, found in here:
                    first, stop = found.rows(slot.index)
                    pair_kernels.dense_rows(dense_rows, found.numpy, first, stop, slot.offset,
                                            values_of[mask].view(batch, mask[1]).numpy())
                continue
            pairs = sum(found.count(slot.index) for _, found in here)
            if handler.adds_rows(capture, slot.name, pairs):  # CPU kernels: straight into the values
                for mask, found in here:
                    first, stop = found.rows(slot.index)
                    handler.add_rows(capture, slot.name, found.numpy, first, stop, slot.offset,
                                     values_of[mask].view(batch, mask[1]).numpy())
                continue
            pieces = [found.pieces(slot.index) for _, found in here]
            computed = handler.values_many(capture, slot.name, [(b, j) for b, j, _ in pieces])
            for (mask, _), (_, _, out), values_here in zip(here, pieces, computed):
                values_of[mask].index_add_(0, out, values_here)
        self.compute_seconds += time.perf_counter() - started

    @staticmethod
    def _values(entry, mask, batch, device):
        values = entry.values.get(mask)
        if values is None:
            values = entry.values[mask] = torch.zeros(batch * mask[1], device=device)
        return values

    # ------------------------------------------------------------------ results

    def step_values(self):
        """{mask: (keys, labels, positions [n, k], values [n, k])} of the entries with values, keys merged."""
        entries = [e for e in self.entries if e.values]
        if not entries:
            return None
        keys = np.concatenate([e.keys for e in entries])
        labels = None
        if all(e.labels is not None for e in entries):
            labels = np.concatenate([e.labels for e in entries])
        result = {}
        for mask in self.mask_specs:
            positions = [e.ready()[mask].positions for e in entries]
            values = [self._values(e, mask, e.keys.size, positions[0].device).view(e.keys.size, mask[1])
                      for e in entries]
            result[mask] = (positions[0], values[0]) if len(entries) == 1 else (torch.cat(positions), torch.cat(values))
        return merge_repeated_keys(keys, labels, result)

    def close(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._executor.shutdown(wait=True)


def merge_repeated_keys(keys, labels, per_mask):
    """A sample seen twice in one step (micro-batches, sampling with replacement) gets one summed row."""
    unique, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    if unique.size == keys.size:
        return keys, labels, per_mask
    merged = {}
    for mask, (positions, values) in per_mask.items():
        index = torch.from_numpy(inverse).to(values.device)
        summed = torch.zeros(unique.size, values.shape[1], device=values.device).index_add_(0, index, values)
        merged[mask] = (positions[torch.from_numpy(first).to(positions.device)], summed)
    return unique, None if labels is None else labels[first], merged


def _refuse_training_batchnorm(module, inputs):
    if module.training and torch.is_grad_enabled():
        raise UnsupportedModelError(f"{type(module).__name__} ran in training mode while recording: it mixes the "
                                    f"samples of a batch. Fix: {UNSUPPORTED_HELP}")
