"""The identity of the run that recorded a store, and the check that a store belongs to its run.

A store's rows are only meaningful for the training run that recorded them: another
seed, other data or another model gives rows of the same shape that subtract the wrong
things without a word. So a store carries its run's identity in its config (covered by
the config checksum), and ``forget`` compares it with the run it is asked to forget from.

The identity is derived, never drawn at random, so two identical runs still write
identical stores (``created_at`` aside):
- ``run_id``: SHA-256 of the run's settings that decide what it trains on and records
  (``RUN_ID_FIELDS`` of train.json; not the data folder's path nor the checkpoint cadence);
- ``data_sha256``: SHA-256 of the training samples as trained on (their bytes, labels,
  and their indices in the full dataset);
- ``mask_seed``: the seed the masks are regenerated from;
- ``model_sha256``: the model's parameter fingerprint (names and shapes, in order).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Dict, Mapping, Optional, Protocol, Union

import numpy as np

import gradstore

IDENTITY = "identity"  # the store config's key
IDENTITY_FIELDS = ("run_id", "data_sha256", "mask_seed", "model_sha256")
RUN_ID_FIELDS = ("dataset", "model", "groups", "method", "flavour", "keep", "codec", "epochs", "batch_size", "seed",
                 "optimizer", "lr", "keep_first", "exclude_class", "exclude_samples", "engine", "poison")


class StoreIdentityError(gradstore.FormatError):
    """A store that was not recorded by the run it is used with (or carries no identity to tell)."""


class JSONSettings(Protocol):
    """A run's settings that can say what train.json holds (``unlearn.runs.config.RunConfig``)."""

    def to_json(self) -> Dict[str, Any]: ...


Settings = Union[JSONSettings, Mapping[str, Any]]  # a RunConfig, or train.json's dict


def _as_json(config: Settings) -> Mapping[str, Any]:
    return config if isinstance(config, Mapping) else config.to_json()


def run_id(config: Settings) -> str:
    """SHA-256 of the settings in ``RUN_ID_FIELDS`` (absent ones as null), as train.json holds them."""
    held = _as_json(config)
    settings = {field: held.get(field) for field in RUN_ID_FIELDS}
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=_plain).encode()).hexdigest()


def data_fingerprint(train_x: Any, train_y: Any, source_indices: Any) -> str:
    """SHA-256 of training samples as trained on: each array's dtype, shape and bytes, in order."""
    digest = hashlib.sha256()
    for array in (train_x, train_y, source_indices):
        array = np.ascontiguousarray(np.asarray(array))
        digest.update(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.data.cast("B"))
    return digest.hexdigest()


def store_identity(model_fingerprint: dict, mask_seed: int, run: Optional[str] = None,
                   data_sha256: Optional[str] = None) -> dict:
    """The identity a recording stores (``run``/``data_sha256`` None where the caller has none to give)."""
    return {"run_id": run, "data_sha256": data_sha256, "mask_seed": int(mask_seed),
            "model_sha256": model_fingerprint["sha256"]}


def run_identity(config: Settings, split: Any, model_fingerprint: dict) -> dict:
    """The identity of a run written by ``unlearn train``: from its train.json settings and its data."""
    return store_identity(model_fingerprint, _as_json(config)["seed"], run_id(config),
                          data_fingerprint(split.train_x, split.train_y, split.source_indices))


def check_identity(store: Any, expected: dict, allow_unverified: bool = False) -> str:
    """'verified' when the store's identity equals ``expected``; StoreIdentityError naming what differs.

    A store without an identity (recorded before stores carried one) is refused unless
    ``allow_unverified``, and then reported as 'unverified'.
    """
    recorded = store.config.get(IDENTITY)
    if not recorded:
        if allow_unverified:
            return "unverified"
        raise StoreIdentityError(
            f"{store.path} carries no run identity (recorded before stores had one), so nothing shows that it "
            "belongs to this run; record the run again, or accept it unverified (--allow-unverified-store)")
    differs = [field for field in IDENTITY_FIELDS if recorded.get(field) != expected.get(field)]
    if differs:
        what = {"run_id": "another run's settings (seed, data selection, method ...)", "data_sha256": "other data",
                "mask_seed": "another mask seed", "model_sha256": "another model"}
        shown = "; ".join(f"{field} {_short(recorded.get(field))} where this run has {_short(expected.get(field))} "
                          f"({what[field]})" for field in differs)
        raise StoreIdentityError(f"{store.path} was recorded by another run: {shown}. Nothing was changed")
    return "verified"


def _short(value):
    return f"{value[:12]}..." if isinstance(value, str) and len(value) > 12 else repr(value)


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
