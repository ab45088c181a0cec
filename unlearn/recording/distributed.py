"""Recording under torch.distributed: each rank records its own samples, the shards are finished in parallel.

Launch with torch's own launcher, ``torchrun --nproc-per-node N -m unlearn train ...``,
or call ``attach`` inside your own DistributedDataParallel loop. Nothing here starts
processes or moves data but torch.distributed (gloo on CPU, NCCL on CUDA).

- Keys are indices into the training split as used, the same on every rank. Each global
  batch (the single-process loop's, from one seeded permutation) is split into
  contiguous shares, one per rank (``share``).
- ``create_recorder`` under an initialized process group creates one recording per rank
  (``gradstore.shards.recording_path``), all tagged with one run id from rank 0.
- DDP averages gradients over ranks, so what a rank's backward sees of a sample is W
  times its share of the step's gradient: the session scales its rows by 1/W
  (``gradient_share``), and compares the probe with ``.grad`` over all ranks.
- Rows go to the rank that owns their key range as they are recorded (``KeyRouter``: one
  all_to_all a step), so a rank's recording sums its own keys only.
- ``finish_sharded`` (what a per-rank recorder's ``finish`` calls): every rank commits,
  finalizes the shard of its key range, and rank 0 writes the entry point ``RUN/store.h5``
  and removes the recordings.
"""

import os
import uuid
from typing import Any, Optional

import numpy as np
from numpy.typing import ArrayLike
import torch
import torch.distributed as dist
from torch.utils.data import BatchSampler, RandomSampler

import gradstore
from gradstore import shards

from ..errors import RecordingUsageError


def active() -> bool:
    """Whether this process is one of several ranks of an initialized process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_and_world() -> tuple:
    return (dist.get_rank(), dist.get_world_size()) if active() else (0, 1)


def init_from_environment(device_name: Optional[str] = None) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1), on gloo for CPU or NCCL for CUDA.

    Returns the device this rank trains on: ``cuda:LOCAL_RANK`` when CUDA is asked for
    (or available and nothing is asked), else the CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    wants_cuda = device_name.startswith("cuda") if device_name else torch.cuda.is_available()
    device = torch.device(device_name) if device_name else torch.device("cuda" if wants_cuda else "cpu")
    if world > 1:
        if wants_cuda:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if wants_cuda else "gloo")
    return device


def barrier() -> None:
    if active():
        dist.barrier()


def global_batches(num_samples: int, batch_size: int, generator: torch.Generator) -> BatchSampler:
    """The batches of the single-process loop: the sampler a shuffled torch DataLoader with ``generator`` uses."""
    return BatchSampler(RandomSampler(range(num_samples), generator=generator), batch_size, drop_last=False)


def share(batch: np.ndarray, rank: int, world: int) -> np.ndarray:
    """This rank's contiguous share of a global batch of keys."""
    return np.array_split(np.asarray(batch, np.int64), world)[rank]


def check_batches(num_samples: int, batch_size: int, world: int) -> None:
    """Every rank needs at least one sample of every batch (DDP runs one backward per rank per step)."""
    last = num_samples % batch_size or batch_size
    if min(batch_size, last) < world:
        raise RecordingUsageError(f"a batch of {min(batch_size, last)} samples (the last of {num_samples} in batches of "
                         f"{batch_size}) cannot give each of {world} ranks a sample: choose another --batch-size")


def new_run_id() -> str:
    """One id for every rank's recording of a store: drawn on rank 0, broadcast to the others."""
    value: list[Any] = [uuid.uuid4().hex if not active() or dist.get_rank() == 0 else None]
    if active():
        dist.broadcast_object_list(value, src=0)
    return value[0]


def writer_options() -> dict:
    """``gradstore.create``'s ``writer`` for this rank (a collective call: every rank makes it in turn)."""
    rank, world = rank_and_world()
    return {"run_id": new_run_id(), "rank": rank, "ranks": world}


def gradient_share(model: torch.nn.Module) -> float:
    """The share of a rank's backward that reaches ``.grad``: 1/W under DistributedDataParallel (it averages)."""
    wrapped = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    return 1.0 / dist.get_world_size() if wrapped and active() else 1.0


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over every rank (itself when single-process)."""
    if not active():
        return tensor
    total = tensor.detach().clone()
    dist.all_reduce(total)
    return total


class KeyRouter:
    """Sends each recorded row to the rank that owns its key: rank r holds shard r's key range
    (``gradstore.shards.shard_ranges``), so its recording sums only its own keys, whichever rank
    saw them, and its shard is finished from it alone (docs/SCALING.md says why: spilling every
    row where it was seen would grow with the epochs; routing costs one all_to_all a step).
    """

    def __init__(self, store: Any):
        ranges = shards.shard_ranges(store.num_keys, store.rows_per_chunk, dist.get_world_size())
        self.bounds = np.array([lo for lo, _ in ranges[1:]], np.int64)

    def route(self, keys: ArrayLike, values: torch.Tensor,
              labels: Optional[np.ndarray]) -> tuple[np.ndarray, torch.Tensor, Optional[np.ndarray]]:
        """(keys, values, labels) of this step's rows that this rank owns, from every rank (a collective)."""
        keys = np.asarray(keys, np.int64)
        owner = np.searchsorted(self.bounds, keys, side="right")
        order = np.argsort(owner, kind="stable")
        sent = np.bincount(owner, minlength=dist.get_world_size())
        device = values.device
        received = torch.empty(sent.size, dtype=torch.int64, device=device)
        dist.all_to_all_single(received, torch.as_tensor(sent, device=device))
        sizes, sent = received.tolist(), sent.tolist()
        labels = np.full(keys.size, -1, np.int64) if labels is None else np.asarray(labels, np.int64)
        index = torch.as_tensor(order, device=device)
        out = []
        for tensor in (torch.as_tensor(keys, device=device), values, torch.as_tensor(labels, device=device)):
            part = torch.empty((sum(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=device)
            dist.all_to_all_single(part, tensor[index].contiguous(), output_split_sizes=sizes, input_split_sizes=sent)
            out.append(part)
        return out[0].cpu().numpy(), out[1], out[2].cpu().numpy()


def finish_sharded(recording: Any) -> Any:
    """Every rank: commit, finalize its shard from every rank's recording; rank 0: write the entry point.

    Returns the finished store, opened read-only on every rank.
    """
    writer = recording.config["writer"]
    rank, ranks = writer["rank"], writer["ranks"]
    path = shards.entry_path(recording.path)
    recording.commit()
    recording.close()
    barrier()  # every recording at its last commit
    shards.finalize_shard(path, rank, ranks)
    barrier()  # every shard written
    if rank == 0:
        shards.write_manifest(path, ranks)
        shards.remove_recordings(path, ranks)
    barrier()
    return gradstore.open(path)
