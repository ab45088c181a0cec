"""Recorders: turn one training step into rows of a gradstore store.

Every recorder's rows share one sign convention: a row is what must be ADDED to the
weights to undo its key's contribution. Forgetting is then ``w + scale * sum(rows)``.

- ``PerSampleRecorder`` (ours), keyed by sample, summed over epochs:
  ``grad``   the sample's gradient g_i (with the 1/B of the mean loss): the seed's rule.
  ``update`` the sample's whole effect on the weights through the optimizer, this step
             and (through momentum) the later ones, with the preconditioner of the step
             its gradient was taken at: SGD lr*g_i, with momentum mu lr*g_i/(1-mu);
             Adam/AdamW lr*g_i/(sqrt(v_hat)+eps) with v_hat after this step (the first
             moment's weights (1-beta1)*beta1^j sum to 1 over the following steps).
- ``StepRecorder``, keyed by step, with the step's batch as its members:
  ``original`` (Graves et al.) the dense step delta w_before - w_after;
  ``layer`` (partial amnesiac) a random fraction p of it, masked by (seed, step).
"""

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np
import torch
from numpy.typing import ArrayLike

import gradstore
import gradstore.shards
from gradstore import masks

from ..errors import RecordingUsageError
from ..identity import store_identity
from ..params import recorded_parameters
from .names import FLAVOURS, LAYER, ORIGINAL, PER_SAMPLE, RECORDING_METHODS, STEP_METHODS, UPDATE
from .preconditioner import Preconditioner

if TYPE_CHECKING:
    from .ingest import Ingest


@dataclass
class StepContext:
    """What recorders see of one optimizer step."""

    step: int
    sample_ids: np.ndarray  # keys of the step's samples (indices into the training set), unique
    labels: Optional[np.ndarray]
    params_before: Optional[torch.Tensor]  # flat, named_parameters() order; only when a step recorder needs them
    params_after: Optional[torch.Tensor]
    ingest: "Ingest"  # where rows go (a background thread)
    per_mask: dict = field(default_factory=dict)  # {(seed, k): (positions [B, k], gradient values [B, k])}
    preconditioner: Optional[Preconditioner] = None  # the multiplier turning g_i into the sample's update

    def positions(self, seed: int, keys: ArrayLike, num_params: int, k: int) -> torch.Tensor:
        """Mask positions [len(keys), k] on the parameters' device (a step-keyed row's mask)."""
        if self.params_after is None:
            raise RecordingUsageError("step-keyed rows need the step's parameters: the session passes params_after")
        return torch.from_numpy(masks.positions_many(seed, keys, num_params, k)).to(self.params_after.device)


class Recorder(ABC):
    """One store fed from every step; ``needs_per_sample`` asks the session for per-sample gradients
    at the store's mask (``mask``: (seed, k))."""

    needs_per_sample = False
    needs_preconditioner = False

    def __init__(self, store: Any):
        self.store = store

    @property
    @abstractmethod
    def method(self) -> str:
        """'per-sample', 'original' or 'layer'."""

    @abstractmethod
    def record(self, ctx: StepContext) -> None:
        """Add this step's rows to the store."""

    @property
    def mask(self) -> tuple[int, int]:
        return (self.store.seed, self.store.k)

    def finish(self) -> None:
        """Finalize the recording; ``store`` is then the finished store (a sharded one when each rank
        recorded its own: every rank must call this)."""
        if self.store.finished:  # a resumed run may find it sealed already
            return
        if "writer" in self.store.config:
            from .distributed import finish_sharded

            self.store = finish_sharded(self.store)
        else:
            self.store = self.store.finalize()


class PerSampleRecorder(Recorder):
    needs_per_sample = True
    method = PER_SAMPLE
    FLAVOURS = FLAVOURS

    def __init__(self, store: Any, flavour: str = UPDATE):
        if flavour not in self.FLAVOURS:
            raise RecordingUsageError(f"flavour must be one of {self.FLAVOURS}, got {flavour!r}")
        super().__init__(store)
        self.flavour = flavour
        self.needs_preconditioner = flavour == UPDATE
        self.router = None  # one rank's recording of a sharded store: rows go to their key's owner
        if "writer" in store.config and not store.finished:
            from .distributed import KeyRouter

            self.router = KeyRouter(store)

    def record(self, ctx: StepContext) -> None:
        store = self.store
        positions, values = ctx.per_mask[(store.seed, store.k)]
        if self.flavour == UPDATE:
            if ctx.preconditioner is None:
                raise RecordingUsageError("the update flavour needs the step's preconditioner (the session gives it)")
            values = ctx.preconditioner.times(positions, values)
        keys, labels = ctx.sample_ids, ctx.labels
        if self.router is not None:
            keys, values, labels = self.router.route(keys, values, labels)
        ctx.ingest.submit_accumulate(store, keys, values, labels)


class StepRecorder(Recorder):
    def __init__(self, store: Any):
        super().__init__(store)
        self._method = ORIGINAL if store.k == store.num_params else LAYER

    @property
    def method(self) -> str:
        return self._method

    def record(self, ctx: StepContext) -> None:
        store = self.store
        if ctx.params_before is None or ctx.params_after is None:
            raise RecordingUsageError("step recorders need the step's parameters before and after (the session gives them)")
        delta = ctx.params_before - ctx.params_after
        if store.k < store.num_params:
            key = np.array([ctx.step])
            delta = delta[ctx.positions(store.seed, key, store.num_params, store.k)[0]]
        ctx.ingest.submit_accumulate(store, [ctx.step], delta[None])
        ctx.ingest.submit_members(store, ctx.step, ctx.sample_ids)


METHODS = RECORDING_METHODS


def recorder_for(store: Any, method: str, flavour: str = UPDATE) -> Recorder:
    """The recorder that feeds ``store`` (a new recording, a reopened one, or a finished store)."""
    if method == PER_SAMPLE:
        return PerSampleRecorder(store, flavour)
    if method in STEP_METHODS:
        return StepRecorder(store)
    raise RecordingUsageError(f"method must be one of {METHODS}, got {method!r}")


def create_recorder(path: Union[str, os.PathLike], method: str, model: torch.nn.Module, num_samples: int, steps: Optional[int] = None, *, keep: float = 0.1,
                    codec: str = "int8", flavour: str = UPDATE, seed: int = 0, memory_budget: int = 256 << 20,
                    buffer_dir: Optional[str] = None, overwrite: bool = False, run_id: Optional[str] = None,
                    data_sha256: Optional[str] = None, modules: Optional[Sequence[str]] = None) -> Recorder:
    """Create the store of one recording method and the recorder that fills it: the one place
    every method's store is laid out (per-sample: a row per sample, masked to ``keep``;
    original: a dense row per step; layer: a row per step masked to ``keep``).

    Under an initialized torch.distributed process group of several ranks, every rank calls
    this with the same ``path``: each gets its own recording of the store
    (``gradstore.shards.recording_path``), finished into shards behind ``path``.

    ``run_id`` and ``data_sha256`` name the run and its data in the store's identity
    (``unlearn.identity``); the mask seed and the model's fingerprint are always there.

    The store indexes the recorded parameters (``unlearn.params.recorded_parameters``): the trainable ones in
    named_parameters() order, or those at or under the names in ``modules`` ("encoder.layer.0", "classifier");
    frozen parameters never. Their names and shapes are the fingerprint: ``attach`` and ``forget_keys`` read the
    index space back from it.
    """
    from . import distributed

    recorded = recorded_parameters(model, modules)
    num_params = sum(p.numel() for _, p in recorded)
    fingerprint = gradstore.model_fingerprint([(name, tuple(p.shape)) for name, p in recorded])
    options: dict[str, Any] = dict(codec=codec, seed=seed, fingerprint=fingerprint,
                   identity=store_identity(fingerprint, seed, run_id, data_sha256),
                   memory_budget=memory_budget, buffer_dir=buffer_dir, overwrite=overwrite)
    if distributed.active():
        if method != PER_SAMPLE:
            raise RecordingUsageError(f"the {method} method records whole steps; under torch.distributed only the "
                             "per-sample method records (each rank its own samples)")
        options["writer"] = distributed.writer_options()
        os.makedirs(gradstore.shards.shard_dir(path), exist_ok=True)
        path = gradstore.shards.recording_path(path, options["writer"]["rank"], options["writer"]["ranks"])
    if method == PER_SAMPLE:
        store = gradstore.create(path, num_params, num_samples, keep, **options)
    elif method in STEP_METHODS:
        if steps is None:
            raise RecordingUsageError(f"the {method} method keys rows by step: give steps (epochs * batches per epoch)")
        store = gradstore.create(path, num_params, steps, 1.0 if method == ORIGINAL else keep, key_kind="step", **options)
    else:
        raise RecordingUsageError(f"method must be one of {METHODS}, got {method!r}")
    return recorder_for(store, method, flavour)
