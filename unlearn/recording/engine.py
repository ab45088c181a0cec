"""The masked per-sample gradient engine: module hooks inside the user's own backward.

For each batch the engine knows the sample keys, hence every recording mask's
positions (regenerated from (seed, key), as the store does). A forward hook keeps a
hooked module's input; a hook on its output receives the output gradient during the
ordinary ``loss.backward()``; the module's handler (``handlers``) then computes each
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
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from gradstore import masks

from ..errors import RecordingUsageError, UnsupportedModelError
from ..params import recorded_parameters
from . import kernels
from .handlers import Capture, Handler, handler_for, supported
from .handlers import base as handler_base
from .handlers.base import VMAP_HELP
from .handlers.generic import GENERIC, GenericHandler

# The gradient the optimizer stepped with must be this close to a multiple of the
# backward's (see Probe); farther, the engine warns once.
PROBE_TOLERANCE = 1e-2

# Prepare a batch's positions in a thread while its forward runs (False: at begin_batch, inline).
PREPARE_IN_BACKGROUND = True

# Relative size below which a change (or a gradient) in another sample's slice counts as none (the check
# compares two runs of the same kernels on the same shapes: kept-apart slices are equal to the bit).
SEPARATION_TOLERANCE = 1e-5

SEQUENCE_FIRST_HELP = ("run it on batch-first tensors: the samples must be the first dimension of its input "
                       "(batch_first=True for nn.Transformer*/nn.MultiheadAttention, or transpose before calling it)")
# The check of a handler without dense() (_check_parameters): at most this many of the positions where
# autograd's gradient of the sample is non-zero, this many others at random, nonzero() on chunks this long.
CHECK_NONZERO = 4096
CHECK_RANDOM = 256
CHECK_CHUNK = 1 << 22

SHARED_HELP = ("give it its input per sample: expand the shared input to the batch before the call, e.g. "
               "pos(position_ids.expand(B, -1)) or pos(torch.arange(T).expand(B, -1))")

# What to do about a module the masked engine refuses, by type: the nearest class along the
# module's MRO wins; a type with none gets the advice of ``advice_for``'s last line.
ADVICE: dict[type[nn.Module], str] = {
    nn.modules.batchnorm._BatchNorm: ("replace BatchNorm with GroupNorm (unlearn.runs.models.resnet18 does), or use it "
                                      "in eval mode with its affine parameters frozen"),
    nn.MultiheadAttention: ("record it through its handler (unlearn.recording.handlers.attention, registered by "
                            "default: self- and cross-attention, batch_first True or False, masks; not dropout "
                            "inside the attention while training), or build the attention from nn.Linear "
                            "projections and F.scaled_dot_product_attention, or freeze its parameters"),
    nn.RNNBase: "write the recurrence with nn.Linear layers called at each step, freeze its parameters",
}


def advice_for(module: nn.Module) -> str:
    """What to do about a module the masked engine refuses: advice that fits the module (``ADVICE``)."""
    for cls in type(module).__mro__:
        advice = ADVICE.get(cls)
        if advice is not None:
            return f"{advice}, {VMAP_HELP}"
    return (f"hold its parameters in supported submodules ({supported()}), register a handler for "
            f"{type(module).__name__} (unlearn.recording.register_handler, docs/RECORDING.md), freeze them "
            f"(requires_grad_(False)), {VMAP_HELP}")


@dataclass
class Resolved:
    """Each module's handler and the child parameters handlers claim, resolved once per model."""

    handler_of: dict[nn.Module, Handler]  # every module with a registered handler
    claims_of: dict[nn.Module, list[tuple[str, nn.Parameter]]]  # claiming module -> (dotted name, parameter)
    claimed: dict[tuple[int, str], str]  # (id(child module), parameter name) -> path of the module that claims it

    def own(self, module: nn.Module) -> list[tuple[str, nn.Parameter]]:
        """The module's own parameters less those a parent's handler claims (a tied copy elsewhere stays)."""
        return [(n, p) for n, p in module.named_parameters(recurse=False) if (id(module), n) not in self.claimed]


def resolve(model: nn.Module, generic: bool = True, recorded: Optional[set[int]] = None) -> Resolved:
    """Look up every module's handler (the registry, once per model: never per step) and the claims; with
    ``generic``, a module no registered handler serves that has trainable parameters of its own (claimed by
    no parent) takes the generic path (``handlers.generic``), BatchNorm aside. ``recorded``: ids of the parameters
    recorded (None: every trainable one)."""
    handler_of: dict[nn.Module, Handler] = {}
    claims_of: dict[nn.Module, list[tuple[str, nn.Parameter]]] = {}
    claimed: dict[tuple[int, str], str] = {}
    for path, module in model.named_modules():
        handler = handler_for(module)
        if handler is None:
            continue
        handler_of[module] = handler
        claims = handler.claimed(module)
        if claims:
            claims_of[module] = claims
        for name, _ in claims:
            owner_path, _, leaf = name.rpartition(".")
            key = (id(module.get_submodule(owner_path)), leaf)
            if key in claimed:
                raise UnsupportedModelError(
                    f"{path or 'model'}.{name} is claimed by two handlers ({claimed[key]} and {path or 'model'}): "
                    "rows would count it twice. Fix: claim each child parameter in one handler only")
            claimed[key] = path or "model"
    resolved = Resolved(handler_of, claims_of, claimed)
    if generic:
        for module in model.modules():
            if module in handler_of or isinstance(module, nn.modules.batchnorm._BatchNorm):
                continue
            names = [n for n, p in resolved.own(module) if _records(p, recorded)]
            if names:
                handler_of[module] = GenericHandler(names)
    return resolved


def handler_label(handler: Handler) -> str:
    """How a module is recorded, for recording_plan(): its handler's class, or the generic path."""
    return GENERIC if isinstance(handler, GenericHandler) else type(handler).__name__


def _records(param: nn.Parameter, recorded: Optional[set[int]]) -> bool:
    return param.requires_grad if recorded is None else id(param) in recorded


def recording_plan(model: nn.Module, generic: bool = True, modules: Optional[Sequence[str]] = None) -> dict[str, str]:
    """{module path: how the masked engine records it}, for every module with trainable parameters it records:
    a registered handler's class name ("LinearHandler"), or ``GENERIC`` (torch.func on that module: slower).
    ``modules``: the subset create_recorder(modules=...) would record. Refuses, as ``attach`` does, a model it
    cannot record (UnsupportedModelError naming the modules)."""
    recorded = {id(p) for _, p in recorded_parameters(model, modules)}
    resolved = check_model(model, generic, recorded)
    plan = {}
    for path, module in model.named_modules():
        handler = resolved.handler_of.get(module)
        params = [p for _, p in resolved.own(module) + resolved.claims_of.get(module, [])]
        if handler is not None and any(id(p) in recorded for p in params):
            plan[path or "model"] = handler_label(handler)
    return plan


def check_model(model: nn.Module, generic: bool = True, recorded: Optional[set[int]] = None) -> Resolved:
    """Refuse, naming them by path with advice that fits each, the modules whose per-sample
    gradients the engine cannot form; the handlers and claims it resolved on the way."""
    resolved = resolve(model, generic, recorded)
    problems = []
    for name, module in model.named_modules():
        path = name or "model"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.training or any(_records(p, recorded) for p in module.parameters(recurse=False)):
                problems.append(f"{path} ({type(module).__name__}: mixes the samples of a batch in training mode): "
                                f"fix: {advice_for(module)}")
            continue
        trainable = [n for n, p in resolved.own(module) if _records(p, recorded)]
        handler = resolved.handler_of.get(module)
        if handler is None:
            if trainable:
                problems.append(f"{path} ({type(module).__name__}, parameters {', '.join(trainable)}): "
                                f"fix: {advice_for(module)}")
            continue
        refusal = handler.refusal(module)
        if refusal is not None and (trainable or any(_records(p, recorded) for _, p in resolved.claims_of.get(module, []))):
            problems.append(f"{path} ({type(module).__name__}: {refusal})")
    if problems:
        raise UnsupportedModelError(
            "the masked engine cannot record per-sample gradients of: " + "; ".join(problems)
            + f". Supported: {supported()}."
        )
    return resolved


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
    prepared: Any = None  # {mask: MaskBatch}, or a Future of it
    values: dict = field(default_factory=dict)  # {mask: float32 [B * k]} once a capture arrived

    def ready(self) -> dict[tuple[int, int], "MaskBatch"]:
        if not isinstance(self.prepared, dict):
            self.prepared = self.prepared.result()
        return self.prepared


class MaskBatch:
    """One mask's positions for one batch: [B, k], sorted per row, with where each parameter starts.

    The CPU kernels walk the rows directly (``rows``); the other paths get (sample, index,
    flat slot) arrays per parameter (``pieces``), built on first use.
    """

    def __init__(self, positions: np.ndarray, offsets: np.ndarray, device: torch.device):
        self.numpy = positions
        self.k = positions.shape[1]
        self.offsets = offsets
        self.bounds = kernels.row_bounds(positions, offsets)  # [B, P + 1]
        self.counts = (self.bounds[:, 1:] - self.bounds[:, :-1]).sum(0)  # [P]: entries in each parameter
        self.positions = torch.from_numpy(positions).to(device, non_blocking=True)
        self.device = device
        self._pieces: dict[int, tuple[torch.Tensor, ...]] = {}

    def rows(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(first, stop) columns of each row that fall in parameter ``index``."""
        return self.bounds[:, index], self.bounds[:, index + 1]

    def count(self, index: int) -> int:
        return int(self.counts[index])

    def pieces(self, index: int) -> tuple[torch.Tensor, ...]:
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
        self.total: Optional[torch.Tensor] = None
        self.warned = False
        self.reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None  # under DDP: what .grad holds of the ranks' sums (unlearn.recording.distributed)

    def add(self, dense_batch_sum: torch.Tensor) -> None:
        self.total = dense_batch_sum if self.total is None else self.total + dense_batch_sum

    def reset(self) -> None:
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

    def __init__(self, model: nn.Module, mask_specs: Iterable[tuple[int, int]], num_params: int,
                 generic: bool = True, params: Optional[Sequence[nn.Parameter]] = None):
        """``params``: the recorded parameters in the store's index order (default: every trainable one, in
        named_parameters() order); ``num_params`` must be their size. ``generic``: modules no registered handler
        serves take the generic path (False: they are refused)."""
        recorded = list(params) if params is not None else [p for _, p in recorded_parameters(model)]
        resolved = check_model(model, generic, {id(p) for p in recorded})
        if sum(p.numel() for p in recorded) != num_params:
            raise RecordingUsageError(f"the recorded parameters hold {sum(p.numel() for p in recorded)} values, "
                                      f"the store indexes {num_params}")
        self.model = model
        self.mask_specs = sorted(set(mask_specs))  # (seed, k)
        self.num_params = num_params
        offsets = [0]
        slots_of: dict[nn.Module, list[ParamSlot]] = {}
        names = {id(p): n for n, p in model.named_parameters()}
        for p in recorded:
            offsets.append(offsets[-1] + p.numel())
        offset_of = {id(p): offsets[i] for i, p in enumerate(recorded)}
        index_of = {id(p): i for i, p in enumerate(recorded)}
        self.offsets = np.array(offsets, np.int64)
        paths: dict[nn.Module, str] = {}
        for path, module in model.named_modules():
            paths.setdefault(module, path or "model")
        self._handles: list = []
        self._handler_of: dict[nn.Module, Handler] = {}  # resolved here, once: the hooks never consult the registry
        dense_candidates = []
        for module in model.modules():
            handler = resolved.handler_of.get(module)
            slots = []
            if handler is not None:
                for name, p in resolved.own(module) + resolved.claims_of.get(module, []):
                    if id(p) in index_of:
                        slot = ParamSlot(index_of[id(p)], name, p, offset_of[id(p)])
                        slots.append(slot)
                        if handler.dense_is_cheap(name):
                            dense_candidates.append(slot)
            if handler is not None and slots:
                if isinstance(handler, GenericHandler):
                    handler.names = tuple(slot.name for slot in slots)
                slots_of[module] = slots
                self._handler_of[module] = handler
                if handler.tuple_output:  # its whole call: keyword arguments, a tuple output (handlers.base)
                    self._handles.append(module.register_forward_hook(self._call_hook, with_kwargs=True))
                else:
                    self._handles.append(module.register_forward_hook(self._forward_hook))
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                self._handles.append(module.register_forward_pre_hook(_RefuseTrainingBatchNorm(paths[module])))
        self._slots_of = slots_of
        self.paths = paths
        # The one-time check that every recorded module keeps the samples apart (verify_separation):
        # at the first recorded forward of two or more samples, before it runs.
        self.root = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        self.verified = False
        self.checked_modules: set[nn.Module] = set()  # the modules the one-time check saw run
        self.verify_seconds = 0.0
        self._verifying: Optional[dict[nn.Module, list]] = None  # {module: [(inputs, output)]} while the check reruns the forward
        self._untensored: dict[nn.Module, str] = {}  # hooked modules whose output the check saw is not a tensor: its type
        self._verify_grads: dict[tuple[nn.Module, int], torch.Tensor] = {}  # (module, call) -> gradient at its output, in the check's backward
        self._expanding = False  # the check's last rerun: shared inputs expanded
        self.expand: dict[nn.Module, str] = {}  # module -> "prepend" | "replace": its input is shared by the batch (see verify_separation)
        self._forward_batch: Optional[int] = None  # samples of the forward in progress
        self._handles.append(self.root.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        if not dense_candidates:  # the generic path forms dense() too (a vmap over the module): better than no probe
            dense_candidates = [slot for module, slots in slots_of.items()
                                if isinstance(self._handler_of[module], GenericHandler) for slot in slots]
        probe_slot = min(dense_candidates, key=lambda s: s.param.numel(), default=None)
        if probe_slot is None and slots_of:
            warnings.warn("no recorded parameter can serve as the engine's probe (a bias, a norm, or a module on the "
                          "generic path): rows hold the backward's gradient as it is, so a GradScaler's scale or a "
                          "clipping factor applied before optimizer.step() would not be taken out of them. Record a "
                          "module with a bias (or a norm) too, or do not scale or clip", stacklevel=3)
        if probe_slot is not None:
            probe_slot.qualified = names[id(probe_slot.param)]
        self.probe = Probe(probe_slot)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gradstore-masks")
        self.current: Optional[BatchEntry] = None
        self.entries: list[BatchEntry] = []  # since the last step
        self.unkeyed: list = []  # (capture, slots) of backward passes whose keys are not known yet
        self.compute_seconds = 0.0  # inside the hooks, on the training thread
        self.prepare_seconds = 0.0  # mask positions and their split, in the background thread

    @property
    def plan(self) -> dict[str, str]:
        """{module path: how it is recorded} (``recording_plan``): a handler's class name, or the generic path."""
        return {self.paths[module]: handler_label(self._handler_of[module]) for module in self._slots_of}

    # ------------------------------------------------------------------ batches

    def begin_batch(self, keys: ArrayLike, labels: Optional[ArrayLike] = None) -> BatchEntry:
        """The next forward/backward passes are of these samples (in batch order)."""
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        entry = BatchEntry(keys, None if labels is None else np.asarray(labels, np.int64))
        entry.prepared = self._executor.submit(self._prepare, keys) if PREPARE_IN_BACKGROUND else self._prepare(keys)
        self.current = entry
        self.entries.append(entry)
        return entry

    def assign_unkeyed(self, keys: ArrayLike, labels: Optional[ArrayLike] = None) -> bool:
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

    def reset(self) -> None:
        """Forget the values of passes since the last step (zero_grad, a skipped step)."""
        self.entries = [self.current] if self.current is not None else []
        for entry in self.entries:
            entry.values = {}
        self.unkeyed = []
        self.probe.reset()

    def end_step(self) -> None:
        self.entries, self.current, self.unkeyed = [], None, []
        self.probe.reset()

    # ------------------------------------------------------------------ hooks

    def _root_pre_hook(self, root, args, kwargs):
        if not torch.is_grad_enabled() or self._verifying is not None:
            return
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return
        batch = self.current.keys.size if self.current is not None else None
        if batch is None:
            first = next((t for t in _tensors((args, kwargs)) if t.dim() >= 1), None)
            batch = None if first is None else first.shape[0]
        self._forward_batch = batch
        if not self.verified and batch is not None and batch >= 2:
            started = time.perf_counter()
            try:
                verify_separation(self, args, kwargs, batch)
            finally:
                self.verify_seconds += time.perf_counter() - started
            self.verified = True

    def _call_hook(self, module, args, kwargs, output):
        """A ``tuple_output`` handler's module: its Capture inputs are ``handler.inputs(module, args, kwargs)``,
        its output the first tensor of a tuple, batch first: a sequence-first output is handed on as the
        transpose of a batch-first view, whose gradient is then batch-first (the user's output keeps its values)."""
        handler = self._handler_of[module]
        first = output[0] if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor) else output
        if isinstance(handler, GenericHandler) and torch.is_grad_enabled() \
                and torch._C._functorch.peek_interpreter_stack() is None:
            self._refuse_generic_call(module, output, first)
        if not isinstance(first, torch.Tensor):
            return self._forward_hook(module, args, output)  # the check names what it returns
        if self._verifying is None and (not torch.is_grad_enabled() or not first.requires_grad
                                        or torch._C._functorch.peek_interpreter_stack() is not None):
            return None  # nothing to record (as _forward_hook): the call's inputs are not even looked at
        dim = handler.batch_dim(module)
        seen = first.transpose(0, dim) if dim else first
        replaced = self._forward_hook(module, handler.inputs(module, args, kwargs), seen)
        if replaced is None and not dim:
            return None
        out = (seen if replaced is None else replaced).transpose(0, dim) if dim else replaced
        return (out, *output[1:]) if isinstance(output, tuple) else out

    def _refuse_generic_call(self, module, output, first):
        """The generic path differentiates through the first tensor a module returns, and relies on the one-time
        check: refuse a call whose other outputs carry gradient, and a module first run after the check."""
        rest = output[1:] if isinstance(output, (tuple, list)) and isinstance(first, torch.Tensor) else ()
        if any(t.requires_grad and t.is_floating_point() for t in _tensors(rest)):
            raise UnsupportedModelError(
                f"{self.paths[module]} ({type(module).__name__}) takes the generic path, which differentiates through "
                "the first tensor the module returns, and it returns more tensors that carry gradient: their share "
                "of its parameters' gradient would be missing from the rows. Fix: return one tensor (or only the "
                f"first requiring grad), register a handler for {type(module).__name__}, freeze its parameters, "
                f"{VMAP_HELP}")
        if self.verified and self._verifying is None and module not in self.checked_modules:
            raise UnsupportedModelError(
                f"{self.paths[module]} ({type(module).__name__}) takes the generic path and first ran after the "
                "engine's one-time check (at the first recorded forward of two or more samples), so its rows were "
                "never compared with autograd. Fix: make it run in the first recorded forward, or attach() again "
                "once the model has its final form")

    def _forward_hook(self, module, inputs, output):
        mode = self.expand.get(module)
        if self._verifying is not None:  # the one-time check's rerun: keep what it compares, hook nothing else
            if not isinstance(output, torch.Tensor):  # never hooked while recording (see _check_parameters)
                self._untensored[module] = type(output).__name__
                return None
            if mode is not None and self._expanding and inputs and isinstance(inputs[0], torch.Tensor):
                inputs, output = (_expanded(inputs[0], mode, self._forward_batch), *inputs[1:]), \
                    _expanded(output, mode, self._forward_batch)
            calls = self._verifying.setdefault(module, [])
            if output.requires_grad:  # a hook, not autograd.grad on the tensor: an in-place op may follow (ReLU)
                key = (module, len(calls))
                output.register_hook(lambda grad: self._verify_grads.__setitem__(key, grad))
            calls.append((tuple(inputs), output))  # every positional input, as recording's Capture gets them
            return output
        if not torch.is_grad_enabled() or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        if torch._C._functorch.peek_interpreter_stack() is not None:
            return  # inside a torch.func transform (e.g. the vmap reference): not the user's backward
        if mode is not None and self._forward_batch is not None:
            # an input shared by the batch: its output, expanded to the batch, carries each sample's gradient
            inputs = (_expanded(inputs[0], mode, self._forward_batch), *inputs[1:])
            output = _expanded(output, mode, self._forward_batch)
        entry, slots = self.current, self._slots_of[module]

        def on_output_grad(grad):
            capture = Capture(module, inputs, grad)
            if entry is None:
                self.unkeyed.append((capture, slots))
            else:
                self._compute(entry, capture, slots)

        output.register_hook(on_output_grad)
        return output if mode is not None else None

    @torch.no_grad()  # the inputs require grad: nothing here belongs in a graph
    def _compute(self, entry: BatchEntry, capture: Capture, slots):
        started = time.perf_counter()
        prepared = entry.ready()
        batch = capture.delta.shape[0]
        if batch != entry.keys.size:
            module = capture.module
            raise RecordingUsageError(f"module {self.paths.get(module, '?')} ({type(module).__name__}) saw a batch of {batch} "
                             f"samples, but the batch has {entry.keys.size} keys: keys must follow the batch's first "
                             f"dimension. Fix: name each batch's samples in order (set_batch) and "
                             f"{SEQUENCE_FIRST_HELP}")
        handler = self._handler_of[capture.module]
        on_cpu = handler_base.USE_NUMBA and capture.delta.device.type == "cpu"
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
                    kernels.dense_rows(dense_rows, found.numpy, first, stop, slot.offset,
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

    def step_values(self) -> Optional[tuple[np.ndarray, Optional[np.ndarray], dict]]:
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

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._executor.shutdown(wait=True)


def merge_repeated_keys(keys: np.ndarray, labels: Optional[np.ndarray],
                        per_mask: dict) -> tuple[np.ndarray, Optional[np.ndarray], dict]:
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


class _RefuseTrainingBatchNorm:
    def __init__(self, path):
        self.path = path

    def __call__(self, module, inputs):
        if module.training and torch.is_grad_enabled():
            raise UnsupportedModelError(f"{self.path} ({type(module).__name__}) ran in training mode while recording: "
                                        f"it mixes the samples of a batch. Fix: {advice_for(module)}")


# ---------------------------------------------------------------------- the one-time separation check


def _tensors(tree):
    """The tensors in nested tuples, lists and mappings (a batch, a model's output)."""
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, Mapping):  # dicts, Hugging Face's BatchEncoding and ModelOutput
        for value in tree.values():
            yield from _tensors(value)
    elif isinstance(tree, (tuple, list)):
        for value in tree:
            yield from _tensors(value)


def _map_tensors(tree, fn):
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        mapped = {key: _map_tensors(value, fn) for key, value in tree.items()}
        rebuild: Any = type(tree)
        try:
            return rebuild(mapped)
        except Exception:
            return mapped
    if isinstance(tree, tuple) and hasattr(tree, "_fields"):
        return type(tree)(*(_map_tensors(value, fn) for value in tree))
    if isinstance(tree, (tuple, list)):
        return type(tree)(_map_tensors(value, fn) for value in tree)
    return tree


def _expanded(tensor, mode, batch):
    """A tensor shared by the batch, as one slice per sample (a view: no copy)."""
    if mode == "replace":  # a leading dimension of 1 that broadcasts
        return tensor.expand(batch, *tensor.shape[1:])
    return tensor.unsqueeze(0).expand(batch, *tensor.shape)  # no batch dimension at all


def _changed(before, after):
    """Bool [rows] (or [] for a 0-d tensor): which slices along the first dimension differ."""
    if before.shape != after.shape:
        return None
    if before.is_floating_point() or before.is_complex():
        scale = max(float(before.abs().max()) if before.numel() else 0.0,
                    float(after.abs().max()) if after.numel() else 0.0, 1e-30)
        differs = (after - before).abs() > SEPARATION_TOLERANCE * scale
    else:
        differs = after != before
    return differs.reshape(differs.shape[0], -1).any(1) if differs.dim() else differs


def _first_shape(calls):
    """The shape of a module's first call's first input, for messages."""
    return list(calls[0][0][0].shape)


def _others_apart(before, after, batch, sample):
    """Whether a module's other inputs (after the first) kept the samples apart when sample ``sample``
    was perturbed: each tensor with the batch along its first dimension changed in that sample's slice
    at most (one without it is shared by the batch: recording hands it to the handler as it is)."""
    if len(before) != len(after):
        return False
    for a, b in zip(before, after):
        if not isinstance(a, torch.Tensor) or a.dim() == 0 or a.shape[0] != batch:
            continue
        if not isinstance(b, torch.Tensor):
            return False
        changed = _changed(a.detach(), b.detach())
        if changed is None or bool(torch.cat([changed[:sample], changed[sample + 1:]]).any()):
            return False
    return True


def _leaks(grad, batch, sample):
    """Whether the gradient of sample ``sample``'s outputs alone reaches another sample's slice."""
    if grad.dim() == 0 or grad.shape[0] != batch:
        return True
    rows = grad.detach().abs().reshape(batch, -1).amax(1)
    others = torch.cat([rows[:sample], rows[sample + 1:]])
    return bool(others.numel()) and float(others.max()) > SEPARATION_TOLERANCE * max(float(rows.max()), 1e-30)


def verify_separation(engine: MaskedEngine, args: tuple, kwargs: dict, batch: int, sample: int = 0) -> None:
    """Refuse, once per model, the recorded modules that do not keep a batch's samples apart along
    the first dimension of their input; find the inputs shared by the batch and expand them.

    Runs before the first recorded forward of >= 2 samples, on that forward's own inputs. The
    forward is rerun (A, B and, when some input is shared, C), the RNG state restored before each
    rerun and after them (dropout draws the same masks in every rerun, and the user's forward
    then runs as it would have), the model's buffers restored, its train/eval mode and parameters
    untouched (torch.autograd.grad: nothing reaches ``.grad``):

    A. as called: each recorded call's input and output; then the gradient of a random projection
       of sample ``sample``'s outputs alone: at each module's output it must vanish in every other
       sample's slice (else the module's rows would take in other samples' losses);
    B. with sample ``sample``'s slice of every input perturbed (no grad): each recorded module's
       input may change in that sample's slice only. Sequence-first [T, B, D] inputs fail A or B,
       T == B included.
    An input unchanged by B whose output fails A (``pos(torch.arange(T))``, a [1, T]
    ``position_ids`` buffer) is shared by the batch: C reruns with its input and output expanded
    to the batch (a view); the model's outputs must be A's, and the gradient at the expanded
    output then per sample: each sample's row holds its own share of the shared module's gradient.
    Last, on A's (or C's) gradients: a trainable parameter that received a gradient while no hook
    saw its module run is refused, and each module's gradient for that sample, as its handler
    forms it from the Capture recording would hand it (every positional input, sliced to the
    sample), must equal autograd's: whole through ``dense``, or through ``values`` at
    ``check_positions`` for a handler without ``dense`` (a subclass whose forward is not its
    base's, or a wrong handler, is refused; so is a handler that fails on the call).
    """
    root = engine.root
    inputs = [t for t in _tensors((args, kwargs)) if t.dim() >= 1 and t.shape[0] == batch]
    if not inputs:
        shapes = ", ".join(str(list(t.shape)) for t in _tensors((args, kwargs)))
        raise RecordingUsageError(f"the batch has {batch} keys, but no input of the model ({shapes}) has {batch} samples along "
                         f"its first dimension: keys must follow the batch's first dimension (batch-first inputs)")
    generator = torch.Generator().manual_seed(0)

    def perturb(t):
        if t.dim() == 0 or t.shape[0] != batch:
            return t
        t = t.detach().clone()
        if t.is_floating_point():
            noise = torch.randn(t[sample].shape, generator=generator).to(t.device, t.dtype)
            t[sample] += noise * (float(t.abs().max()) + 1.0)
        elif t.dtype == torch.bool:
            t[sample] = ~t[sample]
        elif not t.is_complex():
            t[sample] = torch.remainder(t[sample] + 1, int(t.max()) + 1)
        return t

    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    buffers = [(b, b.detach().clone()) for b in root.buffers()]
    # Embedding(max_norm=...) renorms the rows it looks up in place, in every forward: the perturbed
    # rerun would renorm rows the batch never uses. Put back after the reruns (not between them: the
    # first rerun's graph is still to be differentiated).
    renormed = []
    for module in root.modules():
        weight = getattr(module, "weight", None)
        if getattr(module, "max_norm", None) is not None and isinstance(weight, torch.Tensor):
            renormed.append((weight, weight.detach().clone()))

    def rerun(call_args, call_kwargs, grad, expanding=False):
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        engine._verifying, engine._expanding, engine._forward_batch = {}, expanding, batch
        try:
            with torch.set_grad_enabled(grad):
                out = root(*call_args, **call_kwargs)
            return out, engine._verifying
        finally:
            engine._verifying, engine._expanding = None, False
            _restore(buffers)

    try:
        out_a, calls_a = rerun(args, kwargs, True)
        grads_a, params_a = _sample_gradients(engine, out_a, calls_a, batch, sample)
        perturbed_args, perturbed_kwargs = _map_tensors((args, kwargs), perturb)
        _, calls_b = rerun(perturbed_args, perturbed_kwargs, False)
        mixed, shared, unpositional = [], {}, []
        for module, calls in calls_a.items():
            after = calls_b.get(module, [])
            kinds = set()
            for index, (ins, out) in enumerate(calls):
                if not ins or not isinstance(ins[0], torch.Tensor):
                    unpositional.append(module)
                    break
                a = ins[0]
                then = after[index][0] if index < len(after) else ()
                changed = _changed(a.detach(), then[0].detach()) \
                    if then and isinstance(then[0], torch.Tensor) else None
                leaks = grads_a is not None and grads_a.get((module, index)) is not None \
                    and _leaks(grads_a[(module, index)], batch, sample)
                batch_first = a.dim() >= 1 and a.shape[0] == batch
                if changed is None or not _others_apart(ins[1:], then[1:], batch, sample):
                    kinds.add("mixed")
                elif not bool(changed.any()) and (leaks or not batch_first):
                    kinds.add("replace" if a.dim() >= 1 and a.shape[0] == 1 and out.dim() >= 1
                              and out.shape[0] == 1 else "prepend")
                elif not batch_first or bool(torch.cat([changed[:sample], changed[sample + 1:]]).any()) or leaks:
                    kinds.add("mixed")
            if "mixed" in kinds:
                mixed.append(module)
            elif len(kinds) > 1:  # shared in some calls, per sample in others
                mixed.append(module)
            elif kinds:
                shared[module] = kinds.pop()
        if unpositional:
            raise UnsupportedModelError(
                "the masked engine cannot see the input of: "
                + ", ".join(f"{engine.paths[m]} ({type(m).__name__})" for m in dict.fromkeys(unpositional))
                + ": called without a tensor as its first positional argument, and its hooks see positional "
                "arguments only. Fix: call it with its input first and positional, module(x, ...), not module(input=x)")
        if mixed:
            raise UnsupportedModelError(
                "the masked engine would record wrong rows: these modules do not keep the samples of a batch apart "
                "along the first dimension of their input (checked by perturbing one sample): "
                + ", ".join(f"{engine.paths[m]} ({type(m).__name__}, input {_first_shape(calls_a[m])})"
                            for m in mixed)
                + f", for a batch of {batch}. Fix: {SEQUENCE_FIRST_HELP}")
        grads, params = grads_a, params_a
        calls_b = None  # B's activations: read above, never again
        if shared:
            engine.expand = dict(shared)
            # C is a whole forward and backward again: A's activations and gradients go first (its outputs are
            # compared, detached; the shapes are kept for the message), so the check holds one of them at a time.
            first_shapes = {m: _first_shape(calls_a[m]) for m in shared}
            out_a = _map_tensors(out_a, lambda t: t.detach())
            calls_a = grads = params = grads_a = params_a = None
            try:
                out_c, calls_c = rerun(args, kwargs, True, expanding=True)
                same = _same_outputs(out_a, out_c)
                grads, params = _sample_gradients(engine, out_c, calls_c, batch, sample) if same else (None, None)
            except Exception:
                same = False
            if same and grads is not None:
                same = not any(_leaks(g, batch, sample) for (m, _), g in grads.items() if m in shared and g is not None)
            if not same:
                engine.expand = {}
                raise UnsupportedModelError(
                    "the masked engine cannot attribute per sample the modules whose input is shared by the batch "
                    "and whose output is not combined with each sample's own: "
                    + ", ".join(f"{engine.paths[m]} ({type(m).__name__}, input {first_shapes[m]})"
                                for m in shared) + f". Fix: {SHARED_HELP}")
            calls_a = calls_c
        engine.checked_modules = set(calls_a)
        if params is not None:
            _check_parameters(engine, calls_a, grads, params, batch, sample)
    finally:
        _restore(renormed)
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        engine._forward_batch = batch


def _restore(buffers):
    """Buffers back as they were (only those a forward changed: an untouched one keeps its version)."""
    with torch.no_grad():
        for b, saved in buffers:
            if not torch.equal(b, saved):
                b.copy_(saved)


def _same_outputs(first, second):
    first, second = list(_tensors(first)), list(_tensors(second))
    if len(first) != len(second):
        return False
    for a, b in zip(first, second):
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        if a.is_floating_point() and not torch.allclose(a.detach(), b.detach(), rtol=1e-5,
                                                        atol=1e-6 * max(float(a.detach().abs().max()), 1e-30)):
            return False
        if not a.is_floating_point() and not torch.equal(a, b):
            return False
    return True


def _sample_gradients(engine, out, calls, batch, sample):
    """Autograd's gradients of a random projection of one sample's outputs: at each recorded call's
    output {(module, call): grad}, and at each recorded parameter {id: grad}; (None, None) when the
    model's outputs have no per-sample slices that require grad."""
    outs = [t for t in _tensors(out) if t.dim() >= 1 and t.shape[0] == batch and t.requires_grad
            and t.is_floating_point()]
    if not outs:
        return None, None
    generator = torch.Generator().manual_seed(1)
    target = sum((t[sample].float() * torch.randn(t[sample].shape, generator=generator).to(t.device)).sum()
                 for t in outs)
    params = {id(slot.param): slot.param for slots in engine._slots_of.values() for slot in slots}
    engine._verify_grads = {}
    try:
        grads = torch.autograd.grad(target, list(params.values()), allow_unused=True)
        at_outputs = engine._verify_grads
    finally:
        engine._verify_grads = {}
    return at_outputs, {key: g.to_dense() if g is not None and g.is_sparse else g  # Embedding(sparse=True)
                        for key, g in zip(params, grads)}


def _sample_capture(module, inputs, grad, batch, sample):
    """The Capture recording hands the handler, restricted to one sample: every positional input, those with
    the batch along their first dimension sliced to the sample (an input shared by the batch as it is)."""
    sliced = tuple(t.detach()[sample:sample + 1] if isinstance(t, torch.Tensor) and t.dim() >= 1 and t.shape[0] == batch
                   else t.detach() if isinstance(t, torch.Tensor) else t for t in inputs)
    return Capture(module, sliced, grad[sample:sample + 1])


# Relative to the sample's whole gradient: a parameter whose gradient is below this share of it is compared on that
# scale, not its own (both sides are rounding noise there). A handler that is wrong by any factor on a parameter
# carrying more than ~1e-9 of the gradient is still refused.
NOISE_FLOOR = 1e-6


def check_positions(theirs: torch.Tensor) -> torch.Tensor:
    """Where a handler without ``dense`` is compared with autograd: the flat positions where autograd's
    gradient of the sample is non-zero (every ``ceil(count / CHECK_NONZERO)``-th of them when there are
    more), and ``CHECK_RANDOM`` others drawn with a fixed seed; sorted, int64, on ``theirs``' device.
    Never more than a chunk of [numel] indices at once."""
    numel = theirs.numel()
    nonzero = theirs.ne(0)
    count = int(nonzero.sum())
    step = max(1, -(-count // CHECK_NONZERO))
    picked, seen = [], 0
    for start in range(0, numel, CHECK_CHUNK):
        here = nonzero[start:start + CHECK_CHUNK].nonzero().reshape(-1)
        picked.append(here[(-seen) % step::step] + start)
        seen += here.numel()
    generator = torch.Generator().manual_seed(2)
    picked.append(torch.randint(0, numel, (min(CHECK_RANDOM, numel),), generator=generator).to(theirs.device))
    return torch.unique(torch.cat(picked))


def _cannot_form(handler, where, failure, module=None):
    if isinstance(handler, GenericHandler):
        return UnsupportedModelError(
            f"{where} takes the generic path (no registered handler serves {type(module).__name__}: torch.func reruns "
            f"the module's forward per sample), which cannot recompute it ({failure}). A forward that draws random "
            "numbers (dropout while training, in the module or a module inside it) cannot be drawn again; vmap "
            "cannot run data-dependent control flow or .item(). Fix: set those dropouts to 0 or record in eval "
            "mode, hold bare parameters in a small module of their own (its forward adds or concatenates them: "
            f"only it is rerun), {advice_for(module) if module is not None else VMAP_HELP}")
    return UnsupportedModelError(
        f"{type(handler).__name__} cannot form the per-sample gradient of {where} ({failure}), so the engine cannot "
        "check it against autograd and would not record it right. Fix: make the handler's dense() (small "
        "parameters) or values() (entry by entry) serve this module's call, freeze the parameter "
        f"(requires_grad_(False)), {VMAP_HELP}")


@torch.no_grad()
def _check_parameters(engine, calls, grads, params, batch, sample):
    """Every parameter with a gradient was seen by its module's hook, and each handler's gradient of
    the sample equals autograd's (tied parameters: summed over the modules that hold them).

    A handler's ``dense`` is compared whole; where it raises NotImplementedError (a handler that gives
    ``values`` only, as the Embedding's) ``values`` is compared at ``check_positions``. Any other failure
    refuses the parameter by path: no handler goes unchecked."""
    uses: dict[int, list] = {}  # id(param) -> [(handler, sample capture, name, dotted path)]
    unseen = []
    uncarried: dict[int, list[str]] = {}
    for module, slots in engine._slots_of.items():
        found = calls.get(module, [])
        for slot in slots:
            where = f"{engine.paths[module]}.{slot.name}"
            theirs = params.get(id(slot.param))
            if not found:
                if theirs is not None and bool(theirs.ne(0).any()):
                    unseen.append(where if module not in engine._untensored else
                                  f"{where} ({engine.paths[module]} returns a {engine._untensored[module]}, not a "
                                  "tensor: the engine hooks modules whose output is one tensor, or a tuple for a "
                                  "handler that declares tuple_output)")
                continue
            handler = engine._handler_of[module]
            if isinstance(handler, GenericHandler) and found:  # which inputs hold the batch: decided here, once
                handler.learn_batched(found[0][0], batch)
            carried = False
            for index, (inputs, out) in enumerate(found):
                grad = grads.get((module, index))
                if grad is None:  # this call's output does not reach the sample's loss
                    continue
                carried = True
                if grad.dim() == 0 or grad.shape[0] != batch:
                    raise UnsupportedModelError(
                        f"{where}: the gradient at the output of {engine.paths[module]} ({type(module).__name__}) "
                        f"has shape {list(grad.shape)}, without the batch of {batch} first, so the engine cannot "
                        f"attribute it per sample. Fix: {SEQUENCE_FIRST_HELP}, {VMAP_HELP}")
                capture = _sample_capture(module, inputs, grad, batch, sample)
                uses.setdefault(id(slot.param), []).append((engine._handler_of[module], capture, slot.name, where))
            if not carried and theirs is not None and bool(theirs.ne(0).any()):
                uncarried.setdefault(id(slot.param), []).append(
                    f"{where} ({engine.paths[module]} ran, but the tensor its hook follows carries none of this "
                    "parameter's gradient: another of its outputs does)")
    # a parameter whose gradient no hooked output carried, though autograd gives it one (a tied copy elsewhere that
    # carried it is compared below, where a missing use shows as a wrong gradient)
    unseen += [where for key, wheres in uncarried.items() if key not in uses for where in wheres]
    if unseen:
        raise UnsupportedModelError(
            "parameters receive a gradient without calling their module, so no hook sees their use and their rows "
            f"would stay empty: {', '.join(unseen)} (as nn.MultiheadAttention uses out_proj's weight without calling "
            "out_proj, which its handler claims). Fix: build the computation from modules that are called "
            "(nn.Linear projections and F.scaled_dot_product_attention for attention), register a handler for the "
            "module that uses them which claims them (Handler.claims, docs/RECORDING.md; the module returns one "
            f"tensor, or a tuple with Handler.tuple_output), freeze these parameters, {VMAP_HELP}")
    # The sample's whole gradient sets the scale below which a parameter's gradient is rounding noise: an
    # attention key bias moves every score of a query alike, softmax ignores it, and autograd's gradient for
    # it is ~1e-10 where the rest is ~1e-3; compared with itself alone, noise against noise read as a wrong handler.
    whole_norm = float(torch.stack([g.detach().float().norm() for g in params.values() if g is not None]).norm()) \
        if any(g is not None for g in params.values()) else 0.0
    wrong = []
    generic = False
    for key, found in uses.items():
        theirs = params.get(key)
        if theirs is None:
            continue
        theirs = theirs.detach().reshape(-1).float()
        whole, by_entry = [], []
        for handler, capture, name, where in found:
            try:
                whole.append((handler.dense(capture, name), where))
            except NotImplementedError:
                by_entry.append((handler, capture, name, where))
            except Exception as failure:
                raise _cannot_form(handler, where, f"dense() raised {failure!r}", capture.module) from failure
        for mine, where in whole:
            if mine.numel() != theirs.numel():
                raise UnsupportedModelError(
                    f"{where}: its handler's dense() gives {mine.numel()} entries for one sample, the parameter has "
                    f"{theirs.numel()}. Fix: dense() returns [B, numel] (docs/RECORDING.md), {VMAP_HELP}")
        if not by_entry:
            mine = sum(m.reshape(-1).float() for m, _ in whole)
        else:
            positions = check_positions(theirs)
            mine = sum(m.reshape(-1).float().index_select(0, positions.to(m.device)).to(theirs.device)
                       for m, _ in whole) if whole else torch.zeros(positions.numel(), device=theirs.device)
            for handler, capture, name, where in by_entry:
                if handler.formed_whole(name) or handler.dense_is_cheap(name):
                    raise UnsupportedModelError(
                        f"{type(handler).__name__} forms no dense() for {where}, but its formed_whole() or "
                        "dense_is_cheap() says it does: recording would call dense(). Fix: implement dense(), or "
                        "return False from both for this parameter")
                device = capture.delta.device
                try:
                    got = handler.values(capture, name, torch.zeros_like(positions, device=device),
                                         positions.to(device))
                except Exception as failure:
                    raise _cannot_form(handler, where, f"values() raised {failure!r}", capture.module) from failure
                if got.numel() != positions.numel():
                    raise UnsupportedModelError(
                        f"{where}: its handler's values() gives {got.numel()} values for {positions.numel()} pairs. "
                        f"Fix: values() returns one value per (b, j) pair, {VMAP_HELP}")
                mine = mine + got.reshape(-1).float().to(theirs.device)
            theirs = theirs.index_select(0, positions)
        error = float((mine - theirs).norm()) / max(float(theirs.norm()), NOISE_FLOOR * whole_norm, 1e-30)
        if error > 1e-3:
            wrong.append(f"{', '.join(dict.fromkeys(w for *_, w in found))} (relative error {error:.2g})")
            generic = generic or any(isinstance(handler, GenericHandler) for handler, *_ in found)
    if wrong:
        causes = ("a subclass whose forward is not its base's, a parameter also used outside its module, a "
                  "handler's claim that misses a use of a child's parameter, or a wrong handler")
        if generic:
            causes += ("; on the generic path: tensors nested in tuples, lists or dicts among a module's inputs "
                       "(not split per sample), or a forward that depends on the batch as a whole")
        raise UnsupportedModelError(
            "the masked engine's per-sample gradient differs from autograd's for: " + ", ".join(wrong)
            + f": {causes}. Fix: record these modules' parameters through supported modules, freeze them, {VMAP_HELP}")
