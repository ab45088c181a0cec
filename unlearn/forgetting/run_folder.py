"""Forgetting from a run folder (or a forget output): the driver behind ``python -m unlearn forget``.

Requests chain: forgetting from a forget output starts from its model and skips the keys
already applied there, so no row is ever subtracted twice. ``mark_applied`` then marks a
chain's rows forgotten in the store, and erases them from the file if asked (a deletion
request); the store refuses them for good, and a forget from a model that still holds them
(one not in that chain) is refused rather than silently skipped.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

import gradstore

from ..errors import RequestError, RunFolderError, UnlearnError
from ..identity import check_identity, run_identity
from ..params import flat_params, named_shapes, store_parameter_names
from ..recording.names import PER_SAMPLE
from ..runs import folders as runs
from ..runs.config import RunConfig
from ..runs.loop import default_device, train
from .removal import Scale, apply_removal, plan_removal
from .requests import FinishedStore, Indices, Request, finished_store
from .similar import find_similar as search


def check_fingerprint(store: FinishedStore, model: torch.nn.Module) -> None:
    """FormatError where the store was recorded for another model than ``model``."""
    expected = (store.config.get("fingerprint") or {}).get("sha256")
    names = store_parameter_names(store, model)
    try:
        actual = gradstore.model_fingerprint(named_shapes(model, names))
    except UnlearnError as missing:
        raise gradstore.FormatError(f"{store.path} was recorded for another model: {missing}") from missing
    if expected is not None and expected != actual["sha256"]:
        raise gradstore.FormatError(
            f"{store.path} was recorded for another model (fingerprint {expected[:12]}..., model {actual['sha256'][:12]}...)"
        )
    if store.num_params != actual["num_params"]:
        raise gradstore.FormatError(f"{store.path} holds {store.num_params} parameters; the model has {actual['num_params']}")


def fine_tune(model: torch.nn.Module, data: Any, excluded: np.ndarray, epochs: int, config: RunConfig,
              progress: bool = True) -> dict:
    """The seed's "retrain": a few epochs on the retained data (all but ``excluded``) with a fresh optimizer."""
    keep = np.setdiff1d(np.arange(len(data)), excluded)
    return train(model, data.train_x[keep], data.train_y[keep], epochs, config.batch_size, config.seed + 1,
                 optimizer=config.optimizer, lr=config.lr, device=next(model.parameters()).device,
                 progress=progress, description="fine-tune")


@dataclass
class ForgetResult:
    model: torch.nn.Module  # the weights after removal (and fine-tune, if asked)
    no_retrain_state: dict  # state_dict after removal, before any fine-tune
    data: Any  # the run's DataSplit
    request: Request
    report: dict  # scale, its search, seconds, request sizes
    record: dict  # the chain: root run, base, samples and keys applied so far


def root_run(run_dir: Union[str, Path]) -> Path:
    """The training run behind a run directory or a forget output."""
    chain = Path(run_dir) / "forget.json"
    return Path(runs.load_json(chain)["root_run"]) if chain.exists() else Path(run_dir)


def forget(run_dir: Union[str, Path], samples: Optional[Indices] = None, cls: Optional[int] = None,
           scale: Scale = 1.0, retrain_epochs: int = 0, device: Optional[Union[str, torch.device]] = None,
           progress: bool = True, allow_unverified_store: bool = False, find_similar: bool = False) -> ForgetResult:
    """Forget from a run (or a forget output) without touching the store. See the module doc.

    ``scale``: a number, "auto", or a registered step rule's name (unlearn.forgetting.rules).
    The store must carry the run's identity (``unlearn.identity``): a store of another run is
    refused naming what differs; one recorded before stores carried an identity is refused
    unless ``allow_unverified_store`` (the report then says ``"store_identity": "unverified"``).
    ``find_similar`` (sample requests): first find the retained samples the model reads as it reads the
    named ones (``unlearn.forgetting.similar``) and forget them together; the report's ``found`` lists them
    with their scores, and where the run knows the truth (RUN/poisoned.txt), ``precision`` and ``recall``
    against the poisoned samples not named.
    """
    run_dir = Path(run_dir)
    chain = runs.load_json(run_dir / "forget.json") if (run_dir / "forget.json").exists() else None
    root = root_run(run_dir)
    config = runs.load_run_config(root)
    if not config.records:
        raise RunFolderError(f"{root} was trained with --method none: it has no recording to forget with")
    device = device or default_device()
    model = runs.load_model(run_dir, config, device)
    data = runs.build_data(config)
    started = time.perf_counter()
    with gradstore.open(root / "store.h5") as opened:
        store = finished_store(opened, ": nothing to forget with yet")
        check_fingerprint(store, model)
        verified = check_identity(store, run_identity(config, data, gradstore.model_fingerprint(named_shapes(model))),
                                  allow_unverified_store)
        already = np.asarray(chain["forgotten_samples"] if chain else [], np.int64)
        already_keys = np.asarray(chain["forgotten_keys"] if chain else [], np.int64)
        found = None
        if find_similar:
            live = np.flatnonzero(store.state == gradstore.RowState.LIVE) if config.method == PER_SAMPLE else None
            samples, found = _with_similar(root, model, data, samples, cls, already, config.seed, live)
        removal = plan_removal(store, config.method, data, samples=samples, cls=cls, already=already,
                               already_keys=already_keys, seed=config.seed)
        request = removal.request
        base = flat_params(model, store_parameter_names(store, model))  # the store's index space
        choice = apply_removal(model, base, removal, data, scale, seed=config.seed, store=store)
    removal_seconds = time.perf_counter() - started
    report = {
        "method": config.method,
        "request": {"class": cls, "num_samples": int(request.samples.size), "num_keys": int(request.keys.size),
                    "skipped_already_forgotten": int(request.skipped_samples.size)},
        "scale": choice.scale,
        "scale_search": choice.search(),
        "removal_norm": float(np.linalg.norm(removal.vector)),
        "store_identity": verified,
        "seconds_no_retrain": removal_seconds,
    }
    if found is not None:
        report["find_similar"] = found
        report["found"] = found["found"]
        report.update({key: found[key] for key in ("precision", "recall") if key in found})
    no_retrain_state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    if retrain_epochs:
        tuned = fine_tune(model, data, request.excluded, retrain_epochs, config, progress)
        report["retrain_epochs"] = retrain_epochs
        report["retrain_seconds"] = tuned["seconds"]
    report["seconds"] = time.perf_counter() - started
    record = {
        "root_run": str(root.resolve()),
        "base": str(run_dir.resolve()),
        "forgotten_samples": np.union1d(already, request.samples).tolist(),
        "forgotten_keys": np.union1d(already_keys, request.keys).tolist(),
    }
    return ForgetResult(model, no_retrain_state, data, request, report, record)


def _with_similar(root: Path, model: torch.nn.Module, data: Any, samples: Optional[Indices], cls: Optional[int],
                  already: np.ndarray, seed: int, live: Optional[np.ndarray]) -> tuple[np.ndarray, dict]:
    """The named samples and the retained ones the search finds (``similar.find_similar``) among those whose
    rows are ``live`` (per-sample stores; None: every sample), and its report (with precision and recall where
    RUN/poisoned.txt names the truth)."""
    if samples is None or cls is not None:
        raise RequestError("find_similar serves sample requests (--samples): a class request already names every "
                           "sample of its class. Nothing was changed")
    named = np.unique(np.asarray(samples, np.int64))
    outside = named[(named < 0) | (named >= len(data))]
    if outside.size:
        raise RequestError(f"sample indices out of range [0, {len(data)}): {outside[:10].tolist()}; nothing was "
                           "changed")
    candidates = np.setdiff1d(np.arange(len(data)) if live is None else live, np.union1d(named, already))
    started = time.perf_counter()
    similar = search(model, data.train_x, data.train_y, named, candidates, seed=seed)
    poisoned = root / runs.POISONED
    truth = None
    if poisoned.exists():  # the poisoned samples the search could find: not named, not forgotten earlier, live
        truth = np.intersect1d(np.loadtxt(poisoned, dtype=np.int64, ndmin=1), candidates)
    report = {**similar.report(truth), "named": int(named.size), "seconds": time.perf_counter() - started}
    return np.union1d(named, similar.found), report
