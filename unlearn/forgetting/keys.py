"""Forgetting from one's own loop: ``forget_keys(model, store, keys)`` adds the rows of ``keys`` back to the
model's weights in place and marks them forgotten in the store, in one call (no run folder, no DataSplit).

Order of effects: everything is checked and the change computed first (the store finished, writable and
recorded for this model; the keys integers, in range, not repeated, live), then the weights change and the
rows are marked; if marking fails the weights are put back. A refused call changes neither the weights
nor the file, so a second call with the same keys (their rows are forgotten now) is refused and harmless.
"""

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Union, cast

import numpy as np
import torch

import gradstore

from ..errors import RequestError
from ..params import flat_params, load_flat_params, store_parameter_names
from .removal import Scale, removal_vector
from .requests import FinishedStore, Indices, OpenStore, Removal, Request, finished_store
from .rules import ClassRule, Rule, RuleInput, SampleRule, ScaleChoice, rule_for, rule_names, run_rule
from .run_folder import check_fingerprint
from .similar import find_similar as search
from .similar_spans import find_similar_spans

StoreOrPath = Union[OpenStore, str, "os.PathLike[str]"]
NEEDS_DATA = (ClassRule, SampleRule)  # the built-in rules: they read the run's DataSplit (RuleInput.data)


@dataclass
class ForgetKeysResult:
    """What ``forget_keys`` applied: the rows of ``keys`` times ``scale`` (or the rule's change), marked forgotten."""

    store: str  # the store's path
    keys: np.ndarray  # int64, sorted: the rows applied and marked forgotten
    scale: float  # the number given, the rule's step, or the least-squares multiple of the rows (scale_fitted)
    rule: str  # the registered rule's name; "given" for a number
    change_norm: float  # L2 norm of the change to the weights
    removal_norm: float  # L2 norm of the rows' sum
    # forget.json's scale_search: rule, reached, evaluations, seconds, then the rule's report
    scale_search: dict = field(default_factory=dict)
    rule_report: dict = field(default_factory=dict)  # the rule's own report (empty for a number)
    seconds: float = 0.0
    found: list = field(default_factory=list)  # find_similar: [{"key", "score"}] forgotten beside the keys given
    find_similar: Optional[dict] = None  # find_similar: the search's report (its test, threshold, rounds)

    @property
    def report(self) -> dict:
        """JSON-able: what was applied and how it was chosen."""
        return {"store": self.store, "num_keys": int(self.keys.size), "scale": self.scale, "rule": self.rule,
                "scale_search": dict(self.scale_search), "change_norm": self.change_norm,
                "removal_norm": self.removal_norm, "seconds": self.seconds,
                **({"found": self.found, "find_similar": self.find_similar} if self.find_similar is not None else {})}

    @property
    def record(self) -> dict:
        """JSON-able: the store and the keys now forgotten in it (forget()'s record names them the same way)."""
        return {"store": self.store, "forgotten_keys": self.keys.tolist(), "scale": self.scale, "rule": self.rule}


def forget_keys(model: torch.nn.Module, store: StoreOrPath, keys: Indices, scale: Scale = 1.0,
                retained: Optional[Any] = None, *, dataset: Optional[Any] = None,
                find_similar: bool = False) -> ForgetKeysResult:
    """Forget the rows of ``keys`` from ``model`` in place and mark them forgotten in ``store``.

    ``store``: a finished store open with mode "r+", or its path (opened "r+" and closed by the call).
    ``keys``: the store's keys (sample indices for a per-sample store, steps for a step-keyed one).
    ``scale``: a number from 0 to ClassRule.max_step (the change is ``scale`` times the rows' sum), a
    registered rule's name, a rule, or "auto" (the rule of the request's kind: "samples" here). A rule
    gets a RuleInput with ``retained_loader=retained`` (a DataLoader of the retained data), the open
    ``store`` and ``data=None``: the built-in rules ("samples", "class") need the run's DataSplit and are
    refused here (use ``unlearn.forget`` on a run folder, or ``plan_removal`` + ``apply_removal``).
    ``dataset``: the training data the store's keys index (``dataset[key]`` is ``(input, label)``, as a torch
    Dataset gives, or a language model's token window), for the rules that read samples through the model
    ("feature"; "tokens" for a causal language model's windows) and for ``find_similar``:
    forget, beside ``keys``, the live keys the model reads as it reads them (``unlearn.forgetting.similar``;
    nothing unless the keys share a direction a label-matched control does not; for token windows, the windows
    holding the rare span the named ones share, ``unlearn.forgetting.similar_spans``). ``found`` lists them.
    A rule's step 0 still marks the rows forgotten, as ``forget()`` + ``mark_applied`` would: the rule judged
    that the model holds nothing of them beyond what their labels' other samples taught. To keep rows for a
    later removal, give a number (``scale=1.0``: the rows exactly).

    Refused with nothing changed: RequestError for empty, repeated, non-integer, out-of-range or not-live
    keys (a second call with the same keys: their rows are forgotten) and for a scale or rule that cannot
    serve; gradstore's errors for a store still recording (BadInputError), open read-only
    (ReadOnlyError) or recorded for another model (FormatError).
    """
    if isinstance(store, (str, os.PathLike)):
        path = os.fspath(store)
        with gradstore.open(path, "r") as peek:  # an unfinished file opened "r+" may be tidied (written): check first
            finished_store(peek, ": nothing to forget with yet")
        with gradstore.open(path, "r+") as opened:
            return _forget_keys(model, finished_store(opened), keys, scale, retained, dataset, find_similar)
    return _forget_keys(model, finished_store(store, ": nothing to forget with yet"), keys, scale, retained, dataset,
                        find_similar)


def _forget_keys(model: torch.nn.Module, store: FinishedStore, keys: Indices, scale: Scale,
                 retained: Optional[Any], dataset: Optional[Any], find_similar: bool) -> ForgetKeysResult:
    started = time.perf_counter()
    if not store.writable:
        raise gradstore.ReadOnlyError(f"{store.path}: store is open read-only, so the rows forget_keys applies could "
                                      "not be marked forgotten; open it with mode='r+' (or pass its path). Nothing "
                                      "was changed")
    check_fingerprint(store, model)
    chosen = checked_keys(store, keys)
    number = _number(scale)
    if number is None:  # a rule: refuse one that cannot run here before reading any row
        name, rule = rule_for(cast(Union[str, Rule], scale), "samples")
        if isinstance(rule, NEEDS_DATA):
            auto = " (what scale='auto' runs for keys)" if scale == "auto" else ""
            raise RequestError(
                f"step rule {name!r}{auto} needs the "
                "run's training data (a DataSplit: the forgotten samples' inputs and labels, a same-label control and "
                "guard slices drawn from the retained samples), which forget_keys does not have: a DataLoader of "
                "retained data (retained=) cannot give the forgotten samples. Give a number (1.0: the rows "
                "exactly), a rule that reads given.retained_loader, or forget from a run folder with "
                "unlearn.forget(run_dir, ..., scale='auto'). Nothing was changed")
    per_sample = store.config.get("key_kind", "sample") == "sample"
    data = TrainingData.of(dataset, store.num_keys) if dataset is not None else None
    similar = None
    if find_similar:
        if data is None or not per_sample:
            raise RequestError("find_similar needs dataset= (the training data the store's keys index) and a "
                               "per-sample store: nothing was changed")
        live = np.flatnonzero(store.state == gradstore.RowState.LIVE)
        with _model_kept(model):
            if data.token_windows:  # what windows share is a span of text, not the window's mean: read token by token
                similar = find_similar_spans(model, data.train_x, chosen, live)
            else:
                similar = search(model, data.train_x, data.train_y, chosen, live)
        chosen = np.union1d(chosen, similar.found)
    samples = chosen if per_sample else _members(store, chosen)
    request = Request(samples=samples, keys=chosen, excluded=samples)
    removal = Removal(request, removal_vector(store, chosen), time.perf_counter() - started)
    names = store_parameter_names(store, model)  # the store's index space: the parameters it recorded, in order
    base = flat_params(model, names)
    if number is not None:
        change = np.float32(number) * removal.vector
        choice = ScaleChoice(number, True, 0, 0.0, "given", change, base + change)
    else:
        given = RuleInput(model, base, removal, data, store=store, retained_loader=retained, names=names)
        with _model_kept(model):  # the rule may load other weights, train, switch modes: none of it stays
            choice = run_rule(rule, given, name)
    if not np.all(np.isfinite(choice.weights)):
        raise RequestError(f"the change of scale {choice.scale} overflows the weights (not finite): "
                           "nothing was changed")
    saved = _snapshot(model)
    load_flat_params(model, choice.weights, names)
    try:
        store.mark_forgotten(chosen)
    except BaseException:
        _restore(model, saved)
        raise
    return ForgetKeysResult(
        store=str(store.path), keys=chosen, scale=float(choice.scale), rule=choice.name,
        change_norm=float(np.linalg.norm(choice.change.astype(np.float64))),
        removal_norm=float(np.linalg.norm(removal.vector.astype(np.float64))),
        scale_search=choice.search(), rule_report=dict(choice.report), seconds=time.perf_counter() - started,
        found=similar.report()["found"] if similar is not None else [],
        find_similar=similar.report() if similar is not None else None)


def _is_token_window(item: Any) -> bool:
    """Whether ``item`` is a language model's window: a 1-D array or tensor of integers."""
    if isinstance(item, (tuple, list)) or not hasattr(item, "shape") or len(item.shape) != 1:
        return False
    dtype = item.dtype
    if isinstance(dtype, torch.dtype):
        return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool
    return isinstance(dtype, np.dtype) and dtype.kind in "iu"


@dataclass
class TrainingData:
    """The training inputs and labels a store's keys index, stacked from a Dataset (what the feature rule and
    the search read through the model; row ``key`` is ``dataset[key]``)."""

    train_x: np.ndarray
    train_y: np.ndarray
    token_windows: bool = False  # a language model's windows [N, T] (labels all 0): searched span by span

    def __len__(self) -> int:
        return int(self.train_y.shape[0])

    @classmethod
    def of(cls, dataset: Any, num_keys: int) -> "TrainingData":
        """Stack ``dataset``: ``dataset[i]`` is ``(input, label)``, or a language model's token window (a 1-D
        integer array: labels are then all 0). RequestError unless it has one item per key."""
        if len(dataset) != num_keys:
            raise RequestError(f"dataset has {len(dataset)} items and the store {num_keys} keys: dataset[key] must be "
                               "the training sample of each key. Nothing was changed")
        items = [dataset[i] for i in range(num_keys)]
        first: Any = items[0] if items else None
        if _is_token_window(first):
            if not all(_is_token_window(item) and np.shape(item) == np.shape(first) for item in items):
                raise RequestError("dataset[0] is a token window, but not every item is one of its length: nothing "
                                   "was changed")
            return cls(np.stack([np.asarray(item, np.int64) for item in items]), np.zeros(num_keys, np.int64), True)
        if not all(isinstance(item, (tuple, list)) and len(item) == 2 for item in items[:1]):
            raise RequestError(f"dataset[0] is {type(items[0]).__name__}, not an (input, label) pair nor a token "
                               "window (1-D integers): nothing was changed")
        inputs = np.stack([np.asarray(x) for x, _ in items])
        try:
            labels = np.asarray([int(y) for _, y in items], np.int64)
        except (TypeError, ValueError):
            raise RequestError("dataset's labels (dataset[key][1]) must be integers: the search and the feature rule "
                               "compare samples of the same label. Nothing was changed") from None
        return cls(inputs, labels)


def checked_keys(store: FinishedStore, keys: Indices) -> np.ndarray:
    """``keys`` as sorted int64: RequestError naming them where they are not integers, are out of range,
    repeat, or are not live rows of ``store``."""
    array = np.asarray(keys)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1:
        raise RequestError(f"keys must be a 1-D list of store keys, got shape {array.shape}: nothing was changed")
    if array.size == 0:
        raise RequestError("no keys given: nothing to forget (nothing was changed)")
    if array.dtype.kind not in "iu":
        if not (array.dtype.kind == "f" and np.all(np.isfinite(array)) and np.all(array == np.round(array))):
            raise RequestError(f"keys must be integers (store keys), got {array.dtype}: nothing was changed")
    array = array.astype(np.int64)
    outside = array[(array < 0) | (array >= store.num_keys)]
    if outside.size:
        raise RequestError(f"keys out of range [0, {store.num_keys}) of {store.path}: {outside[:10].tolist()}"
                           f"{' ...' if outside.size > 10 else ''}; nothing was changed")
    unique, counts = np.unique(array, return_counts=True)
    if (counts > 1).any():
        raise RequestError(f"keys repeated: {unique[counts > 1][:10].tolist()} (each row is added back once); "
                           "nothing was changed")
    states = store.state[unique]
    if np.any(states != gradstore.RowState.LIVE):
        described = {gradstore.RowState.NAMES[int(s)]: unique[states == s][:10].tolist()
                     for s in np.unique(states) if s != gradstore.RowState.LIVE}
        raise RequestError(
            f"rows of {store.path} that are not live cannot be forgotten: {described} (forgotten or purged: applied "
            "already, by this call or another, so the model no longer holds them; empty: never recorded). "
            "Nothing was changed")
    return unique


def _number(scale: Scale) -> Optional[float]:
    """``scale`` as a number when it is one (or text reading as one), checked; None for a rule."""
    if isinstance(scale, str):
        try:
            value = float(scale)
        except ValueError:
            return None
    elif callable(scale):
        return None
    elif isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise RequestError(f"scale must be a number, 'auto' or a registered rule ({', '.join(rule_names())}), "
                           f"got {scale!r}")
    else:
        value = float(scale)
    if not math.isfinite(value) or not 0 <= value <= ClassRule.max_step:
        raise RequestError(f"scale must be a number from 0 (no step) to {ClassRule.max_step:.0f} (1: the recorded "
                           f"rows exactly), 'auto' or a registered rule, got {scale!r}: nothing was changed")
    return value


def _members(store: FinishedStore, keys: np.ndarray) -> np.ndarray:
    """The samples a step-keyed store's rows hold (their recorded members), for a rule's request."""
    held = [store.members[int(key)] for key in keys.tolist() if int(key) in store.members]
    return np.unique(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, np.int64)


Snapshot = tuple[list[torch.Tensor], list[torch.Tensor], list[tuple[torch.nn.Module, bool]]]


def _snapshot(model: torch.nn.Module) -> Snapshot:
    """Copies of the parameters and buffers, and every module's training flag."""
    return ([p.detach().clone() for p in model.parameters()], [b.detach().clone() for b in model.buffers()],
            [(module, module.training) for module in model.modules()])


def _restore(model: torch.nn.Module, saved: Snapshot) -> None:
    params, buffers, modes = saved
    with torch.no_grad():
        for p, value in zip(model.parameters(), params):
            p.copy_(value)
        for b, value in zip(model.buffers(), buffers):
            b.copy_(value)
    for module, training in modes:
        module.training = training


class _model_kept:
    """Context: the model as it was on entry, put back on exit (whatever a rule did to it)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def __enter__(self) -> None:
        self.saved = _snapshot(self.model)

    def __exit__(self, *exc: Any) -> None:
        _restore(self.model, self.saved)
