"""Training that records: ``attach`` hooks recorders into any loop (``unlearn.runs.train`` is a ready one).

``attach`` works like Opacus' ``make_private``: one call wraps the optimizer and the
data loader, and the user's loop stays as it was, their loss and scheduler included::

    optimizer, loader = attach(model, optimizer, loader, recorders)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 10)   # a real torch Optimizer
    for epoch in range(epochs):
        for batch in loader:                   # any batch structure
            optimizer.zero_grad()
            my_loss(model, batch).backward()   # the only gradient computation
            optimizer.step()                   # steps, then records
        scheduler.step()
    optimizer.finish()                         # finalizes every store

The wrapped loader draws the same batches as the original and tells the engine the
training indices (the keys) of each; without it, call ``optimizer.set_batch(keys)``.
``engine="masked"`` (default) computes each sample's gradient at its kept positions
inside the user's backward (``unlearn.recording.engine``); ``engine="vmap"`` recomputes full
per-sample gradients with torch.func at step time (any module; needs (inputs,
integer targets) batches and a per-sample loss).
"""

import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch.utils.data import DataLoader, Dataset

from gradstore import masks

from ..params import flat_view, parameters_named
from ..errors import RecordingUsageError
from . import distributed
from .engine import MaskedEngine, merge_repeated_keys
from .ingest import Ingest
from .names import ENGINES, MASKED, VMAP
from .per_sample import per_sample_grads
from .preconditioner import Preconditioner
from .recorders import Recorder, StepContext



class _IndexedDataset(Dataset):
    """Yields (the dataset's item, index); the index is the sample's key."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index], index


class _IndexedCollate:
    """The user's collate_fn on the items, the indices beside them."""

    def __init__(self, collate):
        self.collate = collate

    def __call__(self, items):
        return self.collate([item for item, _ in items]), torch.tensor([index for _, index in items], dtype=torch.int64)


def labels_of(batch: Any, size: int) -> Optional[np.ndarray]:
    """Integer class labels of a batch when it carries them: (inputs, targets) or a dict with 'labels'/'label'."""
    candidate = None
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        candidate = batch[1]
    elif isinstance(batch, dict):
        candidate = next((batch[name] for name in ("labels", "label", "targets", "target") if name in batch), None)
    if isinstance(candidate, torch.Tensor) and candidate.dim() == 1 and candidate.numel() == size \
            and not candidate.is_floating_point() and not candidate.is_complex():
        return candidate.detach().cpu().numpy().astype(np.int64)
    return None


def indexed_loader(loader: DataLoader, loader_class: type = DataLoader) -> DataLoader:
    """A loader drawing the same batches as ``loader`` (same sampler, collate_fn, workers) that yields
    (the user's batch, int64 indices of its samples in ``loader.dataset``); ``loader_class``: a DataLoader subclass."""
    if isinstance(loader.dataset, torch.utils.data.IterableDataset):
        raise RecordingUsageError("an IterableDataset has no sample indices to key rows by: use a map-style "
                                  "dataset, or name each batch's samples with optimizer.set_batch(keys)")
    options = dict(
        num_workers=loader.num_workers, collate_fn=_IndexedCollate(loader.collate_fn), pin_memory=loader.pin_memory,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn, generator=loader.generator,
        multiprocessing_context=loader.multiprocessing_context,
    )
    if loader.num_workers:
        options.update(persistent_workers=loader.persistent_workers, prefetch_factor=loader.prefetch_factor)
    if loader.batch_size is None:  # the user gave a batch_sampler
        options["batch_sampler"] = loader.batch_sampler
    else:
        options.update(batch_size=loader.batch_size, sampler=loader.sampler, drop_last=loader.drop_last)
    return loader_class(_IndexedDataset(loader.dataset), **options)


class RecordingLoader:
    """Iterates like the user's loader (same sampler, collate_fn, workers), telling the session each batch's keys."""

    def __init__(self, loader: DataLoader, session: "RecordingSession"):
        self.session = session
        self._loader = indexed_loader(loader)

    def __len__(self):
        return len(self._loader)

    def __iter__(self):
        for batch, indices in self._loader:
            self.session.begin_batch(indices.numpy(), labels_of(batch, indices.numel()), batch)
            yield batch

LABEL_KEYS = ("labels", "label", "targets", "target")


def vmap_inputs(batch: Any) -> tuple[Any, torch.Tensor]:
    """(inputs, targets) of a batch the vmap engine recomputes: an (inputs, targets) pair, or a dict
    whose label entry ('labels', 'label', 'targets' or 'target') holds the targets and whose other
    tensor entries are the model's input: one is passed positionally, several as keyword arguments."""
    if isinstance(batch, Mapping):
        name = next((n for n in LABEL_KEYS if n in batch), None)
        if name is None:
            raise RecordingUsageError(f"engine='vmap' needs each dict batch to hold its targets under one of {LABEL_KEYS}; "
                             f"this one has {sorted(batch)}")
        targets = batch[name]
        rest = {key: value for key, value in batch.items() if key != name and isinstance(value, torch.Tensor)
                and value.dim() >= 1 and value.shape[0] == len(targets)}
        if not rest:
            raise RecordingUsageError(f"engine='vmap': the dict batch {sorted(batch)} has no input tensor of {len(targets)} samples")
        return (next(iter(rest.values())) if len(rest) == 1 else rest), targets
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise RecordingUsageError(f"engine='vmap' needs (inputs, targets) batches or dicts with a label entry, got {type(batch).__name__}")


def _per_sample_grads_kwargs(model, inputs, targets, loss_scale, chunk_size, loss_fn, names):
    """``per_sample_grads`` for a model called with keyword inputs: flat [B, M] per-sample gradients."""
    from torch.func import functional_call, grad, vmap

    every = dict(model.named_parameters())
    params = {name: every[name].detach() for name in names}
    loss_fn = loss_fn or torch.nn.functional.cross_entropy

    def sample_loss(p, x, y):
        logits = functional_call(model, p, (), {name: value.unsqueeze(0) for name, value in x.items()}, strict=False)
        return loss_fn(logits, y.unsqueeze(0)) * loss_scale

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    outputs = []
    for start in range(0, len(targets), chunk_size):
        chunk = {name: value[start:start + chunk_size] for name, value in inputs.items()}
        grads = per_sample(params, chunk, targets[start:start + chunk_size])
        outputs.append(torch.cat([g.reshape(g.shape[0], -1) for g in grads.values()], dim=1))
    return torch.cat(outputs)


def _delegated(name):
    """A property that reads and writes the wrapped optimizer's attribute ``name``."""
    return property(lambda self: getattr(self.original_optimizer, name),
                    lambda self, value: setattr(self.original_optimizer, name, value))


class RecordingOptimizer(torch.optim.Optimizer):
    """The user's optimizer, whose ``step`` also records: a real ``torch.optim.Optimizer``.

    ``param_groups``, ``state`` and ``defaults`` are the wrapped optimizer's own, so LR
    schedulers, ``state_dict``/``load_state_dict`` and GradScaler act on it directly.
    """

    _step_supports_amp_scaling = False  # GradScaler unscales .grad itself, then calls step()

    def __init__(self, optimizer: torch.optim.Optimizer, session: "RecordingSession"):
        # Optimizer.__init__ is not called: the wrapped optimizer owns the parameters and state.
        self.original_optimizer = optimizer
        self._session = session
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    # shared with the wrapped optimizer, read and written through (LR schedulers write param_groups' lr)
    param_groups = _delegated("param_groups")
    state = _delegated("state")
    defaults = _delegated("defaults")

    @property
    def session(self) -> "RecordingSession":
        """The recording session behind this optimizer: its engine, recorders, ingest and timings
        (``session.engine``, ``session.ingest.seconds``...), for training loops and benchmarks that
        report them. Read it; driving the session directly bypasses the optimizer's bookkeeping."""
        return self._session

    def __getattr__(self, name):  # anything else the wrapped optimizer has (e.g. its own helpers)
        if name.startswith("__") or name in ("original_optimizer", "_session"):
            raise AttributeError(name)
        return getattr(self.original_optimizer, name)

    def __repr__(self):
        return f"RecordingOptimizer({self.original_optimizer!r})"

    def __getstate__(self):
        raise TypeError("a RecordingOptimizer holds open stores; save optimizer.state_dict() instead")

    def state_dict(self) -> dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        raise RecordingUsageError("the recorded parameters are fixed at attach(): add parameter groups before attaching")

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.original_optimizer.zero_grad(set_to_none=set_to_none)
        self._session.zero_grad()

    # mypy: torch.optim.Optimizer.step is overloaded on the closure; this one takes either form (ignore[override] below)
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        """Step the wrapped optimizer, then record; returns what its ``step`` returns.

        With a ``closure`` (closure-based optimizers, Lightning's automatic optimization), the
        closure is called first, once, with grad enabled, as torch's optimizers do: its backward
        is recorded, then the wrapped optimizer steps and gets the closure's loss from that
        first call, and the step returns it. An optimizer that evaluates the closure again
        within the step (LBFGS) gets real re-evaluations, but they are not recorded: a
        sample's row holds the first evaluation's gradient only (at the weights the step
        started from), never a sum over evaluations. A closure that runs no backward (a
        manual-optimization loop's no-op closure) records the backward passes run before the
        call, as ``step()`` does.
        """
        return self._session.step(closure)

    def recording_plan(self) -> dict[str, str]:
        """{module path: how it is recorded}: a registered handler's class name, or the generic path (torch.func
        on that module, slower); with engine='vmap', the whole model through torch.func."""
        session = self._session
        if session.engine is not None:
            return session.engine.plan
        return {"model": "vmap (torch.func on the whole model)"} if session.computes_gradients else {}

    def set_batch(self, keys: ArrayLike, labels: Optional[ArrayLike] = None) -> None:
        """The keys (training indices) of the samples in the backward passes of this step, in batch order.

        Call it before the backward (values are then computed during it) or after it, before
        ``step()`` (the engine then keeps each hooked layer's input and output gradient until
        this call). Labels, when given, let class requests find the samples.
        """
        self._session.set_batch(keys, labels)

    def flush(self) -> None:
        """Wait until every recorded step reached its store (before committing a store yourself)."""
        self._session.ingest.flush()

    def finish(self) -> None:
        """Record what is pending, finalize every store, remove the hooks."""
        self._session.finish()


def recorded_by(model: torch.nn.Module, recorders: Sequence[Recorder]) -> tuple[list[str], list[torch.nn.Parameter]]:
    """(names, parameters) the stores index, in their order: their fingerprint's names, looked up in ``model``
    (or in the module a DistributedDataParallel wraps, when the store was created from it). Every store must
    index the same parameters, each still trainable."""
    root = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    found: Optional[list[str]] = None
    for recorder in recorders:
        names = (recorder.store.config.get("fingerprint") or {}).get("names")
        names = list(names) if names is not None else [n for n, _ in model.named_parameters()]
        if found is not None and names != found:
            raise RecordingUsageError(f"{recorder.store.path} indexes other parameters than {recorders[0].store.path}: "
                                      "record every store of one session with the same modules")
        found = names
    if found is None:
        return [n for n, _ in model.named_parameters()], list(model.parameters())
    own = dict(model.named_parameters())
    holder = model if all(n in own for n in found) else root
    params = parameters_named(holder, found)
    frozen = [n for n, p in zip(found, params) if not p.requires_grad]
    if frozen:
        raise RecordingUsageError(f"{recorders[0].store.path} records {', '.join(frozen[:5])}, which the model has "
                                  "frozen now (requires_grad=False): create the store after freezing, so that it "
                                  "indexes the trainable parameters only")
    total = sum(p.numel() for p in params)
    for recorder in recorders:
        if recorder.store.num_params != total:
            raise RecordingUsageError(f"{recorder.store.path} holds {recorder.store.num_params} parameters; the "
                                      f"parameters it names have {total}")
    return found, params


class RecordingSession:
    """The state shared by the wrapped loader and optimizer: the engine, the recorders, the ingest."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, recorders: Sequence[Recorder],
                 engine: str = MASKED, loss_fn: Optional[Callable] = None, chunk_size: int = 64,
                 background: bool = True, generic: bool = True):
        if engine not in ENGINES:
            raise RecordingUsageError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.model = model
        self.optimizer = optimizer
        self.recorders = list(recorders)
        self.engine_name = engine
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.names, self.params = recorded_by(model, self.recorders)
        self._trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # what the vmap engine trains
        num_params = sum(p.numel() for p in self.params)
        self.num_params = num_params
        self.mask_specs = sorted({r.mask for r in self.recorders if r.needs_per_sample})
        self.engine = MaskedEngine(model, self.mask_specs, num_params, generic, self.params) \
            if engine == MASKED and self.mask_specs else None
        self.share = distributed.gradient_share(model)  # 1/W under DDP: a rank's backward is W times its share
        if self.share != 1.0 and engine == VMAP and self.mask_specs:
            raise RecordingUsageError("engine='vmap' recomputes gradients outside DistributedDataParallel's backward: "
                             "record with engine='masked' under torch.distributed")
        if self.share != 1.0 and self.engine is not None:
            self.engine.probe.reduce = lambda total: distributed.sum_over_ranks(total) * self.share
        self.ingest = Ingest(max_pending=2 * max(1, len(self.recorders)), background=background)
        self.step_index = 0
        self.record_seconds = 0.0
        self._batches: list[tuple] = []  # vmap engine: (keys, labels, batch) since the last step
        self._per_sample: Optional[torch.Tensor] = None  # vmap engine: computed by backward() for this batch, reused by step()

    @property
    def needs_per_sample(self) -> bool:
        return bool(self.mask_specs)

    @property
    def computes_gradients(self) -> bool:
        """Whether ``backward`` must be called instead of ``loss.backward()`` (the vmap path)."""
        return self.engine_name == VMAP and self.needs_per_sample

    def begin_batch(self, keys: ArrayLike, labels: Optional[np.ndarray] = None, batch: Any = None) -> None:
        if self.engine is not None:
            self.engine.begin_batch(keys, labels)
        self._batches.append((np.asarray(keys, np.int64), labels, batch))

    def set_batch(self, keys: ArrayLike, labels: Optional[ArrayLike] = None) -> None:
        keys = np.asarray(keys, np.int64)
        labels = None if labels is None else np.asarray(torch.as_tensor(labels).cpu(), np.int64)
        if self.engine is not None and not self.engine.assign_unkeyed(keys, labels):
            self.engine.begin_batch(keys, labels)
        if self.engine is None:
            self._batches.append((keys, labels, None))

    def zero_grad(self) -> None:
        if self.engine is not None:
            self.engine.reset()
        self._batches = self._batches[-1:] if self._batches else []
        self._per_sample = None

    def backward(self, x: Any, y: torch.Tensor) -> None:
        """vmap engine: set every parameter's .grad to the batch's mean-loss gradient from per-sample gradients.

        A loop that calls this instead of ``loss.backward()`` computes gradients once per
        step instead of twice (the sum of the per-sample gradients is the batch gradient).
        """
        per_sample = self._per_sample = self._vmap(x, y)
        total = per_sample.sum(0)
        offset = 0
        for _, p in self._trainable:
            p.grad = total[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def _vmap(self, x, y):
        """[B, M'] per-sample gradients of every trainable parameter (the recorded ones among them: ``_recorded_columns``)."""
        device = self.params[0].device
        names = [name for name, _ in self._trainable]
        if isinstance(x, Mapping):  # keyword inputs of a dict batch
            return _per_sample_grads_kwargs(self.model, {name: v.to(device) for name, v in x.items()}, y.to(device),
                                            1.0 / len(y), self.chunk_size, self.loss_fn, names)
        return per_sample_grads(self.model, x.to(device), y.to(device), loss_scale=1.0 / len(y),
                                chunk_size=self.chunk_size, loss_fn=self.loss_fn, names=names)

    def _recorded_columns(self, device: torch.device) -> Optional[torch.Tensor]:
        """Where each recorded position sits among ``_vmap``'s columns; None when they are the same."""
        if [name for name, _ in self._trainable] == list(self.names):
            return None
        start, at = 0, {}
        for name, p in self._trainable:
            at[name] = start
            start += p.numel()
        return torch.cat([torch.arange(at[name], at[name] + p.numel())
                          for name, p in zip(self.names, self.params)]).to(device)

    def _vmap_values(self):
        """The vmap path's per-mask values of this step's batches: full per-sample gradients, gathered."""
        batches = [b for b in self._batches if b[2] is not None]
        if not batches:
            raise RuntimeError("engine='vmap' needs the wrapped loader's (inputs, targets) batches")
        keys = np.concatenate([b[0] for b in batches])
        labels = None if any(b[1] is None for b in batches) else np.concatenate([b[1] for b in batches])
        if self._per_sample is not None:
            per_sample = self._per_sample
        else:
            per_sample = torch.cat([self._vmap(*vmap_inputs(b[2])) for b in batches])
        result = {}
        columns = self._recorded_columns(per_sample.device)
        for seed, k in self.mask_specs:
            positions = torch.from_numpy(masks.positions_many(seed, keys, self.num_params, k)).to(per_sample.device)
            at = positions if columns is None else columns[positions]
            result[(seed, k)] = (positions, torch.gather(per_sample, 1, at))
        return merge_repeated_keys(keys, labels, result)

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """Gather this step's values, step the optimizer, record (``RecordingOptimizer.step``)."""
        if closure is None:
            return self._step(None)
        with torch.enable_grad():
            loss = closure()
        return self._step(_FirstEvaluation(closure, loss, self))

    def _pause_engine(self) -> None:
        """Forget what the engine holds of this step: its values are gathered, and re-evaluations of the
        closure (LBFGS) must not record (their captures wait unkeyed until this clears them)."""
        if self.engine is not None:
            self.engine.end_step()

    def _step(self, closure: Optional["_FirstEvaluation"]) -> Optional[float]:
        started = time.perf_counter()
        per_mask: dict = {}
        keys, labels = None, None
        if self.needs_per_sample:
            if self.engine is not None:
                found = self.engine.step_values()
                factor = self.engine.probe.factor() * self.share
                if found is None and closure is not None and all(p.grad is None for p in self.params):
                    # the closure ran no backward and no gradient is there (Lightning skips a step whose
                    # training_step returned None): the optimizer moves nothing, nothing is recorded
                    self._pause_engine()
                    self.record_seconds += time.perf_counter() - started
                    return self.optimizer.step(closure)
                if found is None:
                    raise RuntimeError("optimizer.step() with no recorded backward: iterate the wrapped loader "
                                       "or call optimizer.set_batch(keys) for each batch")
                keys, labels, per_mask = found
                if factor != 1.0:
                    per_mask = {mask: (positions, values * factor) for mask, (positions, values) in per_mask.items()}
            else:
                keys, labels, per_mask = self._vmap_values()
        else:
            steps_batches = [b for b in self._batches]
            if not steps_batches:
                raise RuntimeError("optimizer.step() before any batch: iterate the wrapped loader or call set_batch")
            keys = np.unique(np.concatenate([b[0] for b in steps_batches]))
        before = flat_view(self.params).clone() if any(not r.needs_per_sample for r in self.recorders) else None
        self.record_seconds += time.perf_counter() - started
        if closure is None:
            result = self.optimizer.step()
        else:
            self._pause_engine()
            result = self.optimizer.step(closure)
            self._pause_engine()
        started = time.perf_counter()
        context = StepContext(step=self.step_index, sample_ids=keys, labels=labels, params_before=before,
                              params_after=flat_view(self.params) if before is not None else None,
                              ingest=self.ingest, per_mask=per_mask)
        if any(r.needs_preconditioner for r in self.recorders):
            context.preconditioner = Preconditioner(self.optimizer, self.params)
        for recorder in self.recorders:
            recorder.record(context)
        self.step_index += 1
        self._batches, self._per_sample = [], None
        if self.engine is not None:
            self.engine.end_step()
        self.record_seconds += time.perf_counter() - started
        return result

    def flush(self) -> None:
        started = time.perf_counter()
        self.ingest.flush()
        self.record_seconds += time.perf_counter() - started

    def finish(self) -> None:
        started = time.perf_counter()
        try:
            self.ingest.close()
            for recorder in self.recorders:
                recorder.finish()
        finally:
            if self.engine is not None:
                self.engine.close()
        self.record_seconds += time.perf_counter() - started


class _FirstEvaluation:
    """The closure the wrapped optimizer gets: the first call returns the loss of the evaluation the
    session recorded; later calls (LBFGS) evaluate the user's closure again, unrecorded."""

    def __init__(self, closure: Callable[[], Any], loss: Any, session: RecordingSession):
        self.closure, self.loss, self.session = closure, loss, session
        self.calls = 0

    def __call__(self) -> Any:
        self.calls += 1
        if self.calls == 1:
            return self.loss
        try:
            return self.closure()
        finally:
            self.session._pause_engine()


def attach(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data_loader: Optional[DataLoader] = None,
           recorders: Sequence[Recorder] = (), *, engine: str = MASKED, loss_fn: Optional[Callable] = None,
           chunk_size: int = 64, background: bool = True, generic: bool = True) -> tuple:
    """Wrap (optimizer, data_loader) so that every step records into ``recorders``.

    Returns (a ``torch.optim.Optimizer`` that records, the wrapped loader or None).
    ``engine``: 'masked' (default; the user's own backward, any loss that sums or averages
    per-sample terms; refuses BatchNorm in training mode and modules it cannot attribute,
    naming them) or 'vmap' (torch.func; ``loss_fn(logits, targets)`` per sample, default
    cross-entropy, scaled by 1/B as a mean-reduced loss is). ``background``: store writes
    in a thread overlapping the next step. ``generic``: modules no registered handler serves record through
    torch.func on that module (``recording_plan()`` says which path each module takes); False refuses them.
    The parameters recorded are those the stores index (``create_recorder(modules=...)``: the trainable ones,
    or a named subset).
    """
    session = RecordingSession(model, optimizer, recorders, engine=engine, loss_fn=loss_fn, chunk_size=chunk_size,
                               background=background, generic=generic)
    loader = RecordingLoader(data_loader, session) if data_loader is not None else None
    return RecordingOptimizer(optimizer, session), loader
