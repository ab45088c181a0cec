"""Per-sample recording from a Lightning ``Trainer``: ``RecordingCallback``.

::

    trainer = lightning.pytorch.Trainer(max_epochs=3, callbacks=[RecordingCallback("grads.h5", keep=0.01)])
    trainer.fit(module, train_loader)        # the module and the loader stay as they are

How the callback learns each batch's keys (the samples' indices in the train dataset),
whatever sampler the Trainer uses: at ``on_fit_start`` it wraps the fit loop's train
dataloader source (``trainer.fit_loop._data_source``; Lightning has no public hook between
requesting the train dataloader and iterating it), so that the DataLoader Lightning gets is
a copy of the user's (same sampler, collate_fn, workers) over the dataset with each item's
index beside it. The copy strips the indices before yielding the user's batch and queues
them; ``on_train_batch_start`` takes the oldest (Lightning prefetches a batch ahead, so the
loader runs ahead of the hooks) and names the batch to the engine. A guard compares each
batch the hook receives with the one the queue's head was taken from (the first values of
its integer tensors, of all its tensors when it has none) and refuses on a mismatch, so a
queue out of step cannot record rows under the wrong keys. At ``on_train_start`` (after the
Trainer built its optimizer) the LightningModule's optimizer is replaced by ``attach``'s
``RecordingOptimizer``, whose ``step(closure)`` runs Lightning's closure (forward, backward)
and records it; ``on_train_end`` finishes the store and puts the originals back.
"""

from __future__ import annotations

import os
from collections import deque
from typing import Any, Optional, Union, cast

import torch
from torch.utils.data import DataLoader

from ..errors import RecordingUsageError
from ..recording import RecordingOptimizer, attach, create_recorder
from ..recording.names import PER_SAMPLE
from ..recording.session import indexed_loader, labels_of
from .common import RecordingSettings, abandon_recording

try:
    import lightning.pytorch as pl
except ImportError as error:  # pragma: no cover - the lightning extra
    raise ImportError("unlearn.integrations.lightning needs lightning: pip install 'amnesiac-gradstore[lightning]'") \
        from error

GUARD_VALUES = 64  # values of each compared tensor the guard keeps per batch


def _leaves(batch: Any) -> list:
    """The tensors of a batch, in a fixed order (tuples, lists, dicts' values in key order)."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for key in sorted(batch, key=str) for t in _leaves(batch[key])]
    if isinstance(batch, (tuple, list)):
        return [t for item in batch for t in _leaves(item)]
    return []


def _guarded(leaves: list) -> list:
    """Which leaves the guard compares: the integer/bool ones (labels, token ids), else all."""
    exact = [i for i, t in enumerate(leaves) if not t.is_floating_point() and not t.is_complex()]
    return exact or list(range(len(leaves)))


def _fingerprint(batch: Any) -> list:
    leaves = _leaves(batch)
    return [(i, leaves[i].dtype, tuple(leaves[i].shape), leaves[i].detach().reshape(-1)[:GUARD_VALUES].cpu().clone())
            for i in _guarded(leaves)] if leaves else []


def _same_batch(fingerprint: list, batch: Any) -> bool:
    """False when a compared tensor of ``batch`` has the fingerprint's dtype and shape but other values."""
    leaves = _leaves(batch)
    for index, dtype, shape, values in fingerprint:
        if index >= len(leaves):
            return False
        leaf = leaves[index]
        if leaf.dtype != dtype or tuple(leaf.shape) != shape:
            continue  # converted (precision plugins convert floating inputs): not comparable
        if not torch.equal(leaf.detach().reshape(-1)[:GUARD_VALUES].cpu(), values):
            return False
    return True


class _KeyedDataLoader(DataLoader):
    """The user's batches, each one's sample indices queued in ``pending`` (built by ``indexed_loader``)."""

    pending: deque

    def __iter__(self):
        self.pending = deque()  # a new pass: what an earlier pass left (an epoch cut short) is not this one's
        for batch, indices in super().__iter__():
            self.pending.append((indices.numpy(), _fingerprint(batch)))
            yield batch


class RecordingCallback(RecordingSettings, pl.Callback):
    """Record each training sample's masked gradient (the per-sample method) while a Lightning ``Trainer`` fits.

    ``path`` and the options are ``create_recorder``'s (``keep``, ``codec``, ``flavour``, ``seed``,
    ``memory_budget``, ``buffer_dir``, ``overwrite``, ``run_id``, ``data_sha256``); ``num_samples``
    defaults to the length of the train DataLoader's dataset. A row's key is the sample's index in
    that dataset. Lightning's automatic optimization (its closure), gradient accumulation
    (``accumulate_grad_batches``: every batch of a step counts, each with Lightning's 1/N of its
    loss) and gradient clipping by norm are recorded as in ``attach``'s loops.

    Refused, with the reason: several devices or train dataloaders, several optimizers,
    ``overfit_batches``, an IterableDataset, a ``training_step`` taking ``dataloader_iter``, a
    batch that ``on_before_batch_transfer``/``on_after_batch_transfer`` changed where the
    guard compares it (its integer tensors), and a ``training_step`` that never calls the
    LightningModule itself (``self(x)``): the engine's one-time check of the model runs at
    the module's forward. On an exception the recording is rolled back to before any row
    and closed (an unfinished store holding nothing; record again from the start);
    after ``fit``, ``store`` is the finished store.
    """

    def __init__(self, path: Union[str, os.PathLike], **options: Any):
        """``options``: ``RecordingSettings``' (create_recorder's: keep, codec, flavour, seed, num_samples ...)."""
        super().__init__(path, **options)
        self._loader: Optional[_KeyedDataLoader] = None
        self._source: Any = None
        self._original_optimizers: Optional[list] = None
        self._batch_keys = 0

    @property
    def store(self) -> Any:
        """The recording's store: the finished ``Store`` once ``fit`` returned."""
        if self.recorder is None:
            raise RecordingUsageError("RecordingCallback: nothing recorded yet (call trainer.fit)")
        return self.recorder.store

    # ------------------------------------------------------------------ keys

    def _keyed(self, loader: Any) -> _KeyedDataLoader:
        if isinstance(loader, _KeyedDataLoader):
            self._loader = loader
            return loader
        if not isinstance(loader, DataLoader):
            raise RecordingUsageError("RecordingCallback keys each row by the sample's index in the train DataLoader's "
                                      f"dataset: give the Trainer one torch DataLoader, not {type(loader).__name__}")
        keyed = cast(_KeyedDataLoader, indexed_loader(loader, _KeyedDataLoader))
        keyed.pending = deque()
        self._loader = keyed
        return keyed

    def _wrap_source(self, trainer: pl.Trainer) -> None:
        source = getattr(trainer.fit_loop, "_data_source", None)
        if source is None or not callable(getattr(source, "dataloader", None)):
            raise RecordingUsageError("RecordingCallback: this Lightning version has no fit_loop._data_source."
                                      "dataloader() to wrap (written for lightning 2.x)")
        produce = source.dataloader
        source.dataloader = lambda: self._keyed(produce())  # an instance attribute shadowing the method
        self._source = source

    def _restore(self, trainer: pl.Trainer) -> None:
        if self._source is not None and "dataloader" in vars(self._source):
            del self._source.dataloader
        self._source = None
        if self._original_optimizers is not None:
            trainer.strategy.optimizers = self._original_optimizers
            self._original_optimizers = None

    # ------------------------------------------------------------------ hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.world_size > 1:
            raise RecordingUsageError("RecordingCallback records on one device; with several, record with attach() "
                                      "in a torchrun loop (unlearn.recording.distributed)")
        if getattr(trainer, "overfit_batches", 0):
            raise RecordingUsageError("RecordingCallback: overfit_batches rebuilds the train DataLoader after the "
                                      "callback wrapped it; record without it")
        from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

        if is_param_in_hook_signature(pl_module.training_step, "dataloader_iter", explicit=True):
            raise RecordingUsageError("RecordingCallback: a training_step that takes dataloader_iter draws its own "
                                      "batches; the callback cannot name their samples")
        self._wrap_source(trainer)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._loader is None:
            raise RecordingUsageError("RecordingCallback: the train DataLoader was not requested through the "
                                      "callback's wrapper (was it built before on_fit_start?)")
        optimizers = list(trainer.strategy.optimizers)
        if len(optimizers) != 1:
            raise RecordingUsageError(f"RecordingCallback records one optimizer's steps; the module has {len(optimizers)}")
        if isinstance(optimizers[0], RecordingOptimizer):
            raise RecordingUsageError("the module's optimizer records already (attach() and RecordingCallback both?)")
        num_samples = self.num_samples if self.num_samples is not None else len(self._loader.dataset)  # type: ignore[arg-type]
        self.recorder = create_recorder(self.path, PER_SAMPLE, pl_module, num_samples, **self.options)
        try:
            self.optimizer, _ = attach(pl_module, optimizers[0], None, [self.recorder], background=self.background)
        except BaseException:
            self._abandon()
            raise
        self._original_optimizers = optimizers
        trainer.strategy.optimizers = [self.optimizer]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self.optimizer is None or self._loader is None:
            return
        if not self._loader.pending:
            raise RecordingUsageError("RecordingCallback: a training batch arrived that the wrapped train DataLoader "
                                      "did not yield: its samples cannot be named")
        keys, fingerprint = self._loader.pending.popleft()
        if not _same_batch(fingerprint, batch):
            raise RecordingUsageError(
                "RecordingCallback: the batch training_step gets is not the one the wrapped DataLoader yielded "
                "next (compared by its integer tensors: labels, ids). A transform in on_before_batch_transfer/"
                "on_after_batch_transfer that changes them, or batches drawn outside the loop, break the keys")
        self._batch_keys = len(keys)
        self.optimizer.session.begin_batch(keys, labels_of(batch, len(keys)))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        engine = self.optimizer.session.engine if self.optimizer is not None else None
        if engine is not None and not engine.verified and self._batch_keys >= 2:
            raise RecordingUsageError(
                "RecordingCallback: training_step did not call the LightningModule itself, so the engine's one-time "
                "check that each recorded module keeps the samples apart (and that no parameter is used outside a "
                "recorded module) never ran: call self(x) in training_step, its forward calling the layers")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        try:
            if self.optimizer is not None:
                self.optimizer.finish()
        finally:
            self.optimizer = None
            self._restore(trainer)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        try:
            self._abandon()
        finally:
            self._restore(trainer)

    def _abandon(self) -> None:
        """Roll the recording back to before any row and close it: no half-recorded store is finalized."""
        optimizer, self.optimizer = self.optimizer, None
        abandon_recording(optimizer, self.recorder)
