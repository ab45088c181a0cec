"""Training that records: ``attach`` hooks recorders into any loop; ``train`` is a ready loop.

``attach`` works like Opacus' ``make_private``: one call wraps the optimizer and the
data loader, and the user's loop stays as it was::

    optimizer, loader = attach(model, optimizer, loader, recorders)
    for epoch in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()          # records, then steps
    optimizer.finish()                # finalizes every store

The wrapped loader draws the same batches as the original and remembers which
training indices each batch holds; the wrapped ``step`` computes per-sample gradients
at the pre-step weights (when a recorder needs them), steps, and hands the step to
every recorder.
"""

import time

from typing import Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from .per_sample import per_sample_grads
from .recorders import Recorder, StepContext, update_preconditioner


def flat_view(params):
    """The parameters as one flat torch tensor on their device (``models.flat_params`` gives numpy)."""
    return torch.cat([p.detach().reshape(-1) for p in params])


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


class RecordingLoader:
    """Iterates like the user's loader (same sampler, collate_fn, workers), remembering each batch's indices."""

    def __init__(self, loader, session):
        self.session = session
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
        self._loader = DataLoader(_IndexedDataset(loader.dataset), **options)

    def __len__(self):
        return len(self._loader)

    def __iter__(self):
        for batch, indices in self._loader:
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise ValueError("recording needs batches of (inputs, targets)")
            x, y = batch
            self.session.current_batch = (x, y, indices.numpy())
            yield x, y


class RecordingOptimizer:
    """The user's optimizer, whose ``step`` also records. Other attributes pass through."""

    def __init__(self, optimizer, session):
        self._optimizer = optimizer
        self._session = session

    def __getattr__(self, name):
        return getattr(self._optimizer, name)

    def step(self, closure=None):
        return self._session.step(closure)

    def zero_grad(self, set_to_none=True):
        self._optimizer.zero_grad(set_to_none=set_to_none)

    def finish(self):
        self._session.finish()


class RecordingSession:
    """The state shared by the wrapped loader and optimizer."""

    def __init__(self, model, optimizer, recorders, loss_fn=None, chunk_size=64):
        self.model = model
        self.optimizer = optimizer
        self.recorders = list(recorders)
        self.loss_fn = loss_fn
        self.chunk_size = chunk_size
        self.params = list(model.parameters())
        self.current_batch = None
        self.step_index = 0
        self.record_seconds = 0.0
        self._per_sample = None  # computed by backward() for this batch, reused by step()

    @property
    def needs_per_sample(self):
        return any(r.needs_per_sample for r in self.recorders)

    def backward(self, x, y):
        """Set every parameter's .grad to the batch's mean-loss gradient from per-sample gradients.

        A loop that calls this instead of ``loss.backward()`` computes gradients once per
        step instead of twice (the sum of the per-sample gradients is the batch gradient).
        """
        self._per_sample = per_sample_grads(self.model, x, y, loss_scale=1.0 / len(y), chunk_size=self.chunk_size)
        total = self._per_sample.sum(0)
        offset = 0
        for p in self.params:
            p.grad = total[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()

    def step(self, closure=None):
        if self.current_batch is None:
            raise RuntimeError("optimizer.step() before any batch of the recording loader")
        x, y, indices = self.current_batch
        started = time.perf_counter()
        device = self.params[0].device
        per_sample, self._per_sample = self._per_sample, None
        if per_sample is None and self.needs_per_sample:
            per_sample = per_sample_grads(
                self.model, x.to(device), y.to(device), loss_scale=1.0 / len(indices), chunk_size=self.chunk_size
            )
        before = flat_view(self.params).clone()
        self.record_seconds += time.perf_counter() - started
        result = self.optimizer.step(closure)
        started = time.perf_counter()
        context = StepContext(
            step=self.step_index,
            sample_ids=indices,
            labels=y.numpy().astype(np.int64) if y.device.type == "cpu" else y.cpu().numpy().astype(np.int64),
            params_before=before,
            params_after=flat_view(self.params),
            per_sample=per_sample,
        )
        if any(r.needs_preconditioner for r in self.recorders):
            context.preconditioner = update_preconditioner(self.optimizer, self.params)
        for recorder in self.recorders:
            recorder.record(context)
        self.step_index += 1
        self.current_batch = None
        self.record_seconds += time.perf_counter() - started
        return result

    def finish(self):
        for recorder in self.recorders:
            recorder.finish()


def attach(model: torch.nn.Module, optimizer: torch.optim.Optimizer, data_loader, recorders: Sequence["Recorder"],
           chunk_size: int = 64) -> tuple:
    """Wrap (optimizer, data_loader) so that every step records into ``recorders``.

    Batches must be (inputs, integer class targets); the per-sample loss is cross-entropy
    scaled by 1/B, matching a mean-reduced loss.
    """
    session = RecordingSession(model, optimizer, recorders, chunk_size=chunk_size)
    return RecordingOptimizer(optimizer, session), RecordingLoader(data_loader, session)


def make_optimizer(name, params, lr=None, momentum=0.9):
    """'adam' (lr 1e-3), 'sgd' (lr 0.01, no momentum) or 'sgd-momentum'."""
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3 if lr is None else lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01 if lr is None else lr)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=0.01 if lr is None else lr, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; choose adam, sgd or sgd-momentum")


def make_loader(x, y, batch_size, seed, shuffle=True):
    generator = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(model: torch.nn.Module, train_x: np.ndarray, train_y: np.ndarray, epochs: int, batch_size: int, seed: int,
          optimizer: str = "adam", lr: Optional[float] = None, recorders: Sequence["Recorder"] = (), device=None,
          progress: bool = True, description: str = "train", checkpoint=None) -> dict:
    """Train with the seed's loop (cross-entropy, shuffled batches), recording into ``recorders``.

    ``checkpoint``: an ``unlearn.checkpoint.Checkpointer``; training resumes from its file
    when there is one (the stores rolled back to it) and saves one every ``every_steps``
    steps and before the stores are finalized.
    Returns {"seconds", "record_seconds", "steps", "resumed_from_step"}. Stores are finalized at the end.
    """
    torch.manual_seed(seed)
    device = device or default_device()
    model.to(device)
    opt = make_optimizer(optimizer, model.parameters(), lr)
    loader = make_loader(train_x, train_y, batch_size, seed)
    generator = loader.generator
    stores = [recorder.store for recorder in recorders]
    start_epoch, start_batch, steps, seconds_before = 0, 0, 0, 0.0
    if checkpoint is not None:
        resumed = checkpoint.restore(model, opt, stores)
        if resumed is not None:
            start_epoch, start_batch, steps = resumed["epoch"], resumed["batch"], resumed["step"]
            seconds_before = float(resumed.get("seconds", 0.0))
            generator.set_state(resumed["epoch_generator_state"])
    resumed_from = steps
    session = None
    if recorders:
        opt, loader = attach(model, opt, loader, recorders)
        session = opt._session
        session.step_index = steps
    started = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, epochs):
        epoch_generator_state = generator.get_state()
        batches = tqdm(loader, desc=f"{description} epoch {epoch + 1}/{epochs}", disable=not progress, leave=False)
        for index, (x, y) in enumerate(batches):
            if epoch == start_epoch and index < start_batch:
                continue  # done before the checkpoint: drawn again only to keep the shuffle in step
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            if session is not None and session.needs_per_sample:
                session.backward(x, y)  # one gradient computation serves the step and the recording
            else:
                torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            steps += 1
            if checkpoint is not None and checkpoint.due(steps):
                checkpoint.save(model, opt, stores, epoch, index + 1, steps, epoch_generator_state,
                                seconds_before + time.perf_counter() - started)
    if checkpoint is not None and steps > resumed_from:  # the final state, before the stores are sealed
        checkpoint.save(model, opt, stores, epochs, 0, steps, generator.get_state(),
                        seconds_before + time.perf_counter() - started)
    if session is not None:
        session.finish()
    model.eval()
    return {
        "seconds": seconds_before + time.perf_counter() - started,  # a resumed run counts every process's time
        "record_seconds": session.record_seconds if session else 0.0,
        "steps": steps,
        "resumed_from_step": resumed_from,
    }
