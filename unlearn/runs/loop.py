"""The ready-made training loop: the seed's (cross-entropy, shuffled batches), recording through ``attach``."""

import time
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset
from tqdm.auto import tqdm

from ..errors import RunConfigError
from ..recording import distributed
from ..recording.recorders import Recorder
from ..recording.names import MASKED
from ..recording.session import attach
from .checkpoint import Checkpointer


def make_optimizer(name: str, params: Iterable[torch.nn.Parameter], lr: Optional[float] = None,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """'adam' (lr 1e-3), 'sgd' (lr 0.01, no momentum) or 'sgd-momentum'."""
    if name == "adam":
        return torch.optim.Adam(params, lr=1e-3 if lr is None else lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.01 if lr is None else lr)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=0.01 if lr is None else lr, momentum=momentum)
    raise RunConfigError(f"unknown optimizer {name!r}; choose adam, sgd or sgd-momentum")


def make_loader(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, shuffle: bool = True) -> DataLoader:
    """(x, y) batches, shuffled by a generator seeded with ``seed`` (the seed's loader)."""
    generator = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(torch.as_tensor(x), torch.as_tensor(y))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)


def default_device() -> torch.device:
    """The GPU when there is one: where the ready-made loop and forget() run unless told."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def train(model: torch.nn.Module, train_x: np.ndarray, train_y: np.ndarray, epochs: int, batch_size: int, seed: int,
          optimizer: str = "adam", lr: Optional[float] = None, recorders: Sequence[Recorder] = (),
          device: Optional[Union[str, torch.device]] = None,
          progress: bool = True, description: str = "train", checkpoint: Optional[Checkpointer] = None,
          engine: str = MASKED) -> dict:
    """Train with the seed's loop (cross-entropy, shuffled batches), recording into ``recorders``.

    ``checkpoint``: an ``unlearn.runs.checkpoint.Checkpointer``; training resumes from its file
    when there is one (the stores rolled back to it) and saves one every ``every_steps``
    steps and before the stores are finalized.
    Under torch.distributed (``unlearn.recording.distributed``) every rank runs this: ``batch_size`` is
    the global batch, each rank trains its share of it through DistributedDataParallel,
    so the run trains the single-process model (to float rounding).
    Returns {"seconds", "record_seconds", "steps", "resumed_from_step"}. Stores are finalized at the end.
    """
    torch.manual_seed(seed)
    device = torch.device(device) if device is not None else default_device()
    model.to(device)
    rank, world = distributed.rank_and_world()
    if world > 1:
        distributed.check_batches(len(train_x), batch_size, world)
    forward = model if world == 1 else torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device] if device.type == "cuda" else None)
    opt = make_optimizer(optimizer, model.parameters(), lr)
    generator = torch.Generator().manual_seed(seed)
    batches = distributed.global_batches(len(train_x), batch_size, generator)
    inputs, targets = torch.as_tensor(train_x), torch.as_tensor(train_y)
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
        opt, _ = attach(forward, opt, None, recorders, engine=engine)
        session = opt.session
        session.step_index = steps
    started = time.perf_counter()
    model.train()
    for epoch in range(start_epoch, epochs):
        epoch_generator_state = generator.get_state()
        shown = tqdm(batches, desc=f"{description} epoch {epoch + 1}/{epochs}", disable=not progress or rank > 0,
                     leave=False)
        for index, batch in enumerate(shown):
            if epoch == start_epoch and index < start_batch:
                continue  # done before the checkpoint: drawn again only to keep the shuffle in step
            keys = distributed.share(batch, rank, world)
            x, y = inputs[keys].to(device), targets[keys].to(device)
            opt.zero_grad()
            if session is not None:
                session.begin_batch(keys, y.cpu().numpy().astype(np.int64), (x, y))
            if session is not None and session.computes_gradients:
                session.backward(x, y)  # one gradient computation serves the step and the recording
            elif world == 1:
                torch.nn.functional.cross_entropy(forward(x), y).backward()
            else:  # DDP averages over ranks: each rank's sum, over the global batch, times W
                loss = torch.nn.functional.cross_entropy(forward(x), y, reduction="sum") * (world / len(batch))
                loss.backward()
            opt.step()
            steps += 1
            if checkpoint is not None and checkpoint.due(steps):
                if session is not None:
                    session.flush()  # the stores hold every step the checkpoint counts
                checkpoint.save(model, opt, stores, epoch, index + 1, steps, epoch_generator_state,
                                seconds_before + time.perf_counter() - started)
    if checkpoint is not None and steps > resumed_from:  # the final state, before the stores are sealed
        if session is not None:
            session.flush()
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
