"""Training checkpoints taken in step with the stores' commits, so a killed recording resumes.

``Checkpointer.save`` first commits every store, then writes (atomically) the model, the
optimizer, the position in the loop (epoch, batch, step), the loader's shuffle generator
as it was when that epoch began, torch's RNG, torch's CPU thread count (it sets the float
summation order of the CPU kernels: a resumed run steps with the count the interrupted one
had, whatever its environment says), and the generation each store committed.
``restore`` rolls every store back to that generation, dropping whatever was recorded
after the checkpoint (a store that committed before the process died, its checkpoint not
yet written), so the resumed loop records every step exactly once.

A crash loses at most the steps since the last checkpoint; they are trained and recorded
again on resume. The file holds tensors, numbers and strings only: it loads with
``torch.load(..., weights_only=True)``.
"""

import os
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Union

import torch

from gradstore import BadInputError, shards

from ..errors import RunConfigError
from ..recording import distributed


class Checkpointer:
    """Saves every ``every_steps`` steps to ``path``; restores from it when it exists."""

    def __init__(self, path: Union[str, "os.PathLike[str]"], every_steps: int):
        if int(every_steps) < 1:
            raise RunConfigError(f"checkpoint every_steps must be a positive integer, got {every_steps!r}")
        self.path = Path(path)
        self.every_steps = int(every_steps)

    def due(self, step: int) -> bool:
        """Whether a checkpoint is taken after ``step`` steps."""
        return step % self.every_steps == 0

    def save(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, stores: Sequence[Any], epoch: int,
             batch: int, step: int, epoch_generator_state: torch.Tensor, seconds: float = 0.0) -> None:
        """Commit every store, then write the checkpoint. Under torch.distributed every rank commits its own
        recordings at the same step (they reach the same generation), and rank 0 writes the file once all have."""
        generations = {_key(store): store.commit(note={"step": step}) for store in stores if not store.finished}
        distributed.barrier()  # every rank's commit is on disk before the checkpoint that counts on it
        if distributed.rank_and_world()[0] == 0:
            self._write(model, optimizer, epoch, batch, step, epoch_generator_state, generations, seconds)
        distributed.barrier()

    def _write(self, model, optimizer, epoch, batch, step, epoch_generator_state, generations, seconds):
        payload = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "epoch": epoch,
            "batch": batch,
            "step": step,
            "epoch_generator_state": epoch_generator_state,
            "torch_rng_state": torch.get_rng_state(),
            "torch_threads": torch.get_num_threads(),
            "generations": generations,
            "seconds": float(seconds),  # training time so far, over every process that took part
        }
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                stores: Sequence[Any]) -> Optional[Dict[str, Any]]:
        """Load the checkpoint into model and optimizer and roll the stores back to it.

        Returns the checkpoint (epoch, batch, step, epoch_generator_state), or None when
        there is none yet: then every store is rolled back to empty and training starts over.
        """
        if not self.path.exists():
            for store in stores:
                if store.finished:
                    raise BadInputError(f"{store.path} is finished but no checkpoint exists to resume the model from")
                store.rollback(None)
            return None
        state = torch.load(self.path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng_state"])
        threads = int(state.get("torch_threads", 0))  # absent from checkpoints of older versions
        if threads and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        for store in stores:
            name = _key(store)
            if store.finished:
                continue  # finalized after the last checkpoint, which the loop then skips to the end
            if name not in state["generations"]:
                raise BadInputError(f"{self.path} does not cover the store {name}: it belongs to another recording")
            generation = state["generations"][name]
            if store.committed_generation is None or store.committed_generation < generation:
                raise BadInputError(
                    f"{name} is at commit {store.committed_generation} but {self.path} expects commit {generation}: "
                    "the store is older than the checkpoint"
                )
            if store.committed_generation != generation:
                store.rollback(generation, note={"step": state["step"]})
        return state


def _key(store):
    """A store's name in the checkpoint: its resolved path, however the run directory was spelled (for one
    rank's recording of a sharded store, the store's entry point: the same name on every rank)."""
    path = shards.entry_path(store.path) if "writer" in store.config else store.path
    return os.path.realpath(path)
