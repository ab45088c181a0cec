"""What a request is: the samples to forget, the store keys that carry them, and once summed, its rows.

Kept apart from the step rules and the run folder so that every stage of the pipeline (planning,
the rules, applying) reads one definition of a request and of the retained data it must spare.
"""

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

import numpy as np

import gradstore

from ..errors import RequestError
from ..recording.names import PER_SAMPLE

# A request is served by a finished store only (finished_store); gradstore.open may also give a recording.
FinishedStore = gradstore.StoreReader
OpenStore = Union[gradstore.StoreReader, gradstore.Recording]
Indices = Union[Sequence[int], np.ndarray]  # sample indices or store keys


@dataclass
class Request:
    """A resolved request: training samples to forget and the store keys that carry them."""

    samples: np.ndarray  # to remove now
    keys: np.ndarray
    cls: Optional[int] = None
    skipped_samples: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # already forgotten earlier in the chain
    excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # every sample forgotten once this request is applied (not retained data)

    @property
    def kind(self) -> str:
        """Which step rule "auto" runs: "class" or "samples" (unlearn.forgetting.rules)."""
        return "samples" if self.cls is None else "class"

    @property
    def forget_set(self) -> np.ndarray:
        """The request's samples, including those an earlier request in the chain removed."""
        return np.union1d(self.samples, self.skipped_samples)


@dataclass
class Removal:
    """A request resolved against a store, with the sum of its rows: what a step is applied to."""

    request: Request
    vector: np.ndarray  # float32 [M]: sum of the request's rows
    seconds: float  # resolving and reading the rows
    control: Optional[np.ndarray] = None  # float32 [M]: a control set's rows (sample requests; see control_samples)
    control_samples: Optional[np.ndarray] = None  # retained samples of the request's labels, as many (at least control_min)


def finished_store(store: OpenStore, purpose: str = "") -> FinishedStore:
    """``store`` if its recording has finished; BadInputError naming the file otherwise."""
    if isinstance(store, gradstore.Recording) or not store.finished:
        raise gradstore.BadInputError(f"{store.path}: recording has not finished (finalize never ran){purpose}")
    return store


def resolve_request(store: FinishedStore, method: str, data: Any, samples: Optional[Indices] = None,
                    cls: Optional[int] = None, already: Indices = (), already_keys: Indices = ()) -> Request:
    """Samples and store keys of a request; samples and keys applied earlier in the chain are skipped."""
    if (samples is None) == (cls is None):
        raise RequestError("give exactly one of samples= or cls=")
    if cls is not None:
        if not (0 <= cls < data.num_classes):
            raise RequestError(f"class {cls} out of range [0, {data.num_classes})")
        samples = np.nonzero(data.train_y == cls)[0]
    chosen = np.asarray(samples, np.int64)
    bad = chosen[(chosen < 0) | (chosen >= len(data))]
    if bad.size:
        raise RequestError(f"sample indices out of range [0, {len(data)}): {bad[:10].tolist()}")
    applied = np.asarray(already, np.int64)
    skipped = np.intersect1d(chosen, applied)
    chosen = np.setdiff1d(chosen, skipped)
    if method == PER_SAMPLE:
        keys = chosen
    else:
        keys = np.setdiff1d(store.keys_covering(chosen, states=tuple(gradstore.RowState.NAMES)), already_keys)
    gone = keys[store.state[keys] != gradstore.RowState.LIVE]
    if gone.size:
        raise RequestError(
            f"rows {gone[:10].tolist()} of this request are not live in {store.path} (forgotten or purged by a "
            "forget outside this chain, or never recorded): this model still holds them and they cannot be "
            "removed again; forget from that forget's output instead"
        )
    excluded = np.union1d(np.union1d(applied, chosen), skipped)
    return Request(samples=chosen, keys=keys, cls=cls, skipped_samples=skipped, excluded=excluded)


def retained_samples(data: Any, request: Request, exclude: Indices = ()) -> np.ndarray:
    """Training keys outside the request's chain (and outside ``exclude``): the data a removal must spare."""
    return np.setdiff1d(np.setdiff1d(np.arange(len(data)), request.excluded), np.asarray(exclude, np.int64))


def label_matched(data: Any, request: Request, count: int, seed: Any, exclude: Indices = ()) -> np.ndarray:
    """About ``count`` retained samples (not in the request's chain, nor in ``exclude``) with the request's label mix."""
    rng = np.random.default_rng(seed)
    retained = retained_samples(data, request, exclude)
    labels, counts = np.unique(data.train_y[request.samples], return_counts=True)
    chosen = []
    for label, share in zip(labels, counts):
        pool = retained[data.train_y[retained] == label]
        want = int(np.ceil(count * share / request.samples.size))
        chosen.append(rng.choice(pool, min(want, pool.size), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)
