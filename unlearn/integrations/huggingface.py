"""Per-sample recording from a Hugging Face ``Trainer``: ``RecordingCallback``.

::

    trainer = transformers.Trainer(model=model, args=args, train_dataset=dataset, data_collator=collator,
                                   callbacks=[RecordingCallback("grads.h5", keep=0.01)])
    trainer.train()                 # the dataset, the collator and the loss stay as they are
    store = trainer.callback_handler.callbacks[-1].store   # or keep a reference to the callback

How the keys (the samples' indices in the train dataset) reach the engine, whatever sampler
the Trainer uses: ``on_train_begin`` (called after the Trainer built and accelerate prepared the
optimizer and the train dataloader, before the first epoch's ``iter``) swaps the
``base_dataloader`` of accelerate's ``DataLoaderShard`` for a copy of it (same batch sampler,
collator, workers: ``unlearn.recording.session.indexed_loader``) over the dataset with each
item's index beside it. The copy strips the indices before yielding the user's batch and
queues them with a fingerprint of the batch (the first values of its integer tensors); the
indices travel with the batch through the workers, so the sampler's order, shuffling and
prefetching (accelerate's one batch ahead, the Trainer's ``gradient_accumulation_steps``
batches ahead) cannot mismatch them. A forward pre-hook on the model (before the engine's)
takes the queue's head at each training forward (grad enabled, ``model.training``) and names
the batch to the engine; it compares the forward's keyword tensors with the fingerprint and
refuses a mismatch. The ``AcceleratedOptimizer``'s wrapped optimizer is replaced by
``attach``'s ``RecordingOptimizer`` (a real torch Optimizer, so the LR scheduler, clipping and
``optimizer.state_dict()`` checkpoints act on the user's optimizer through it); accelerate's
``step`` calls it (under fp16's GradScaler too: its patched step methods are re-pointed at it).
``on_train_end`` finishes the store and puts the optimizer and the dataloader back.

Gradient accumulation: every micro-batch of a step is keyed by its own forward, and a row holds
the sample's share of the gradient the step used (with whatever scaling the Trainer gave the
micro-batch's loss). Clipping (``max_grad_norm``) scales the rows as it scales the step.

``resume_from_checkpoint`` is refused (``RecordingUsageError`` at ``on_train_begin``): a
store records a run from its first step, and the Trainer's checkpoints hold no store; record
again from the start into a new path.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Mapping
from typing import Any, Optional, Union, cast

import torch
from torch.utils.data import DataLoader

from ..errors import RecordingUsageError
from ..recording import RecordingOptimizer, attach, create_recorder
from ..recording.names import PER_SAMPLE
from ..recording.session import indexed_loader, labels_of
from .common import RecordingSettings, abandon_recording

try:
    import transformers
except ImportError as error:  # pragma: no cover - the transformers extra
    raise ImportError("unlearn.integrations.huggingface needs transformers: pip install transformers") from error

GUARD_VALUES = 64  # values of each compared tensor the guard keeps per batch


def _fingerprint(batch: Any) -> dict:
    """{name: (dtype, shape, first values)} of a dict batch's integer tensors (ids, masks, labels)."""
    if not isinstance(batch, Mapping):
        return {}
    return {name: (value.dtype, tuple(value.shape), value.detach().reshape(-1)[:GUARD_VALUES].cpu().clone())
            for name, value in batch.items()
            if isinstance(value, torch.Tensor) and not value.is_floating_point() and not value.is_complex()}


def _same_batch(fingerprint: dict, kwargs: Mapping) -> bool:
    """False when a keyword tensor of the forward has the fingerprint's dtype and shape but other values."""
    for name, (dtype, shape, values) in fingerprint.items():
        value = kwargs.get(name)
        if not isinstance(value, torch.Tensor) or value.dtype != dtype or tuple(value.shape) != shape:
            continue  # popped (the Trainer's label smoother takes the labels) or converted: not comparable
        if not torch.equal(value.detach().reshape(-1)[:GUARD_VALUES].cpu(), values):
            return False
    return True


def _point_scaler_steps(accelerated: Any, optimizer: Any) -> None:
    """Under fp16's GradScaler, ``AcceleratedOptimizer.step`` sets its wrapped optimizer's ``step`` to a
    patched method it built at prepare time from the then-wrapped optimizer's ``step`` (accelerate's
    ``patch_optimizer_step``): point both at ``optimizer``'s, so the scaler's step is ours."""
    if getattr(accelerated, "scaler", None) is None:
        return
    method = optimizer.step

    def patched_step(*args: Any, **kwargs: Any) -> Any:  # accelerate.optimizer.patch_optimizer_step's body
        accelerated._accelerate_step_called = True
        return method(*args, **kwargs)

    accelerated._optimizer_original_step_method = method
    accelerated._optimizer_patched_step_method = patched_step


class _KeyedDataLoader(DataLoader):
    """The user's batches, each one's sample indices queued in ``pending`` (built by ``indexed_loader``)."""

    pending: deque

    def __iter__(self):
        self.pending = deque()  # a new pass: what an earlier pass left (an epoch cut short) is not this one's
        for batch, indices in super().__iter__():
            self.pending.append((indices.numpy(), labels_of(batch, indices.numel()), _fingerprint(batch)))
            yield batch


class RecordingCallback(RecordingSettings, transformers.TrainerCallback):
    """Record each training sample's masked gradient (the per-sample method) while a ``Trainer`` trains.

    ``path`` and the options are ``create_recorder``'s (``keep``, ``codec``, ``flavour``, ``seed``,
    ``memory_budget``, ``buffer_dir``, ``overwrite``, ``run_id``, ``data_sha256``); ``num_samples``
    defaults to ``len(train_dataset)``. A row's key is the sample's index in the train dataset.
    One callback records one ``train()`` call; ``store`` is the finished store after it.

    Refused, with the reason (``RecordingUsageError``): ``resume_from_checkpoint`` (see the
    module's docstring), several processes or GPUs (record with ``attach`` under torchrun), an
    IterableDataset, a train dataloader accelerate did not prepare as a ``DataLoaderShard`` over a
    torch ``DataLoader`` (a stateful dataloader), an optimizer that records already, and a
    training forward of the model that the train dataloader's batches do not explain (a
    ``compute_loss`` that calls the model twice per batch, or on other inputs than the batch's).
    A ``train()`` that raises leaves the store unfinished and the hooks in place (transformers
    has no exception callback): call ``abandon()`` to roll the store back and remove them.
    """

    def __init__(self, path: Union[str, os.PathLike], **options: Any):
        """``options``: ``RecordingSettings``' (create_recorder's: keep, codec, flavour, seed, num_samples ...)."""
        super().__init__(path, **options)
        self._loader: Optional[_KeyedDataLoader] = None
        self._shard: Any = None  # accelerate's DataLoaderShard whose base_dataloader was swapped
        self._base: Optional[DataLoader] = None  # the original base_dataloader
        self._accelerated: Any = None  # accelerate's AcceleratedOptimizer whose optimizer was swapped
        self._original: Optional[torch.optim.Optimizer] = None
        self._handles: list = []
        self._depth = 0  # nesting of the model's forward (the engine's one-time check reruns it inside)
        self._started = False

    @property
    def store(self) -> Any:
        """The recording's store: the finished ``Store`` once ``train()`` returned."""
        if self.recorder is None:
            raise RecordingUsageError("RecordingCallback: nothing recorded yet (call trainer.train())")
        return self.recorder.store

    # ------------------------------------------------------------------ hooks

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       train_dataloader: Any = None, **kwargs: Any) -> None:
        if self._started:
            raise RecordingUsageError("RecordingCallback records one train() call into its store: give the next "
                                      "train() a new RecordingCallback with a new path")
        if getattr(state, "global_step", 0):
            raise RecordingUsageError(
                f"RecordingCallback: train() resumes from a checkpoint at step {state.global_step}; a store records "
                "a run from its first step and the checkpoint holds none: train from the start into a new path "
                "(resume_from_checkpoint is not supported)")
        if getattr(args, "world_size", 1) != 1 or getattr(args, "n_gpu", 1) > 1:
            raise RecordingUsageError("RecordingCallback records on one process and one device; with several, record "
                                      "with attach() in a torchrun loop (unlearn.recording.distributed)")
        if model is None or optimizer is None or train_dataloader is None:
            raise RecordingUsageError("RecordingCallback: on_train_begin got no model, optimizer or train_dataloader "
                                      "(written for transformers' Trainer 5.x)")
        base = vars(train_dataloader).get("base_dataloader")
        if type(base) is not DataLoader:
            raise RecordingUsageError(
                "RecordingCallback keys each row by the sample's index in the train dataset, read from accelerate's "
                f"DataLoaderShard over a torch DataLoader; the Trainer's train dataloader is {type(train_dataloader)!r} "
                f"over {type(base).__name__} (a stateful dataloader, or a Trainer that overrides get_train_dataloader?)")
        inner = vars(optimizer).get("optimizer")
        if not isinstance(inner, torch.optim.Optimizer):
            raise RecordingUsageError(f"RecordingCallback: the Trainer's optimizer ({type(optimizer).__name__}) is not "
                                      "accelerate's AcceleratedOptimizer over a torch Optimizer")
        if isinstance(inner, RecordingOptimizer):
            raise RecordingUsageError("the Trainer's optimizer records already (attach() and RecordingCallback both?)")
        self._started = True
        keyed = cast(_KeyedDataLoader, indexed_loader(base, _KeyedDataLoader))  # refuses an IterableDataset
        keyed.pending = deque()
        num_samples = self.num_samples if self.num_samples is not None else len(base.dataset)  # type: ignore[arg-type]
        self.recorder = create_recorder(self.path, PER_SAMPLE, model, num_samples, **self.options)
        try:
            self.optimizer, _ = attach(model, inner, None, [self.recorder], background=self.background)
        except BaseException:
            self.abandon()
            raise
        self._loader, self._shard, self._base = keyed, train_dataloader, base
        train_dataloader.base_dataloader = keyed
        self._accelerated, self._original = optimizer, inner
        optimizer.optimizer = self.optimizer
        _point_scaler_steps(optimizer, self.optimizer)
        self._depth = 0
        self._handles = [
            model.register_forward_pre_hook(self._key_batch, with_kwargs=True, prepend=True),  # before the engine's
            model.register_forward_hook(self._leave_forward, always_call=True),
        ]

    def _key_batch(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self._depth > 1 or not torch.is_grad_enabled() or not module.training or self.optimizer is None:
            return  # the engine's check rerunning the forward, evaluation, or no recording
        if self._loader is None or not self._loader.pending:
            raise RecordingUsageError(
                "RecordingCallback: a training forward of the model that the train dataloader did not feed (a "
                "compute_loss calling the model more than once per batch?): its samples cannot be named")
        keys, labels, fingerprint = self._loader.pending.popleft()
        if not _same_batch(fingerprint, kwargs):
            raise RecordingUsageError(
                "RecordingCallback: the model's training forward got other inputs than the batch the train "
                "dataloader yielded next (compared by its integer tensors: ids, masks, labels); a compute_loss that "
                "changes them, or forwards on other data, break the keys")
        self.optimizer.session.begin_batch(keys, labels)

    def _leave_forward(self, module: torch.nn.Module, args: tuple, output: Any) -> None:
        self._depth = max(0, self._depth - 1)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        try:
            if self.optimizer is not None:
                self.optimizer.finish()
        finally:
            self.optimizer = None
            self._restore()

    # ------------------------------------------------------------------ clean-up

    def _restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._shard is not None:
            self._shard.base_dataloader = self._base
        if self._accelerated is not None:
            self._accelerated.optimizer = self._original
            _point_scaler_steps(self._accelerated, self._original)
        self._shard = self._base = self._accelerated = self._original = None
        self._loader = None

    def abandon(self) -> None:
        """After a ``train()`` that raised: roll the recording back to before any row, close it (an
        unfinished store holding nothing; record again from the start), put the Trainer's optimizer
        and dataloader back and remove the hooks."""
        optimizer, self.optimizer = self.optimizer, None
        try:
            abandon_recording(optimizer, self.recorder)
        finally:
            self._restore()
