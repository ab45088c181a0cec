"""The removal pipeline over a store: plan (resolve the request, sum its rows), apply (a step rule's
change loaded into the model), and once the result is safe on disk, mark the rows applied.

w_new = w + change; with a number, change = scale * removal, removal = sum of the rows of the
request's keys: per-sample stores use the samples' own rows; step-keyed stores (original, layer)
every step whose batch held a forgotten sample. A rule's name (unlearn.forgetting.rules) or
"auto" chooses the change instead.
"""

import math
import time
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

import gradstore

from ..errors import RequestError
from ..params import load_flat_params, store_parameter_names
from .requests import FinishedStore, Indices, OpenStore, Removal, finished_store, label_matched, resolve_request
from .rules import ClassRule, Rule, RuleInput, SampleRule, ScaleChoice, rule_for, rule_names, run_rule
from .rules.registry import is_number
from ..recording.names import PER_SAMPLE

Scale = Union[float, str, Rule]  # a number, "auto", a registered rule's name, or a rule itself


def plan_removal(store: OpenStore, method: str, data: Any, samples: Optional[Indices] = None,
                 cls: Optional[int] = None, already: Indices = (), already_keys: Indices = (),
                 seed: int = 0, control_min: int = SampleRule.control_min) -> Removal:
    """The pipeline's first two stages: resolve the request's keys, sum their rows.

    A sample request also gets its control: as many retained samples of the same labels (at
    least ``control_min``), drawn with ``seed``, and the sum of their live rows (the sample rule)."""
    store = finished_store(store, ": nothing to forget with yet")
    started = time.perf_counter()
    request = resolve_request(store, method, data, samples=samples, cls=cls, already=already, already_keys=already_keys)
    vector = removal_vector(store, request.keys)
    removal = Removal(request, vector, time.perf_counter() - started)
    if cls is None and request.samples.size:
        control_samples = label_matched(data, request, max(request.samples.size, control_min), [seed, 6])
        keys = control_samples if method == PER_SAMPLE else np.setdiff1d(
            store.keys_covering(control_samples), np.union1d(request.keys, already_keys))
        removal.control_samples = control_samples
        removal.control = removal_vector(store, keys[store.state[keys] == gradstore.RowState.LIVE])
        removal.seconds = time.perf_counter() - started
    return removal


def removal_vector(store: FinishedStore, keys: np.ndarray) -> np.ndarray:
    """sum of the rows of ``keys`` as a dense float32 [M] vector."""
    removal = np.zeros(store.num_params, np.float32)
    if len(keys):
        store.scatter_add(removal, keys, 1.0)
    return removal


def apply_removal(model: torch.nn.Module, base: np.ndarray, removal: Removal, data: Any, scale: Scale,
                  seed: int = 0, *, store: Optional[FinishedStore] = None, retained_loader: Optional[Any] = None) -> ScaleChoice:
    """The pipeline's last two stages: choose the change and load ``base + change`` into ``model``.

    ``scale``: a number (change = scale * removal), "auto" (the rule of the request's kind),
    a registered rule's name, or a rule. ``store`` and ``retained_loader`` reach the rule
    (RuleInput), for rules that read more rows or train. With ``store``, ``base`` and the change are in
    its index space (``unlearn.params.store_parameter_names``): every parameter, or the ones it recorded."""
    names = store_parameter_names(store, model) if store is not None else None
    if names == [name for name, _ in model.named_parameters()]:
        names = None  # every parameter: the built-in rules' space
    if isinstance(scale, str) and is_number(scale):
        scale = parse_scale(scale)  # "0.5" is the number it reads as (checked as --scale is); a name, the rule
    if isinstance(scale, str) or callable(scale):
        name, rule = rule_for(scale, removal.request.kind)
        if names is not None and isinstance(rule, (ClassRule, SampleRule)):
            raise RequestError(f"step rule {name!r} evaluates the whole model's parameters, and this store indexes "
                               f"{len(names)} of them (the ones it recorded): give a number, or a rule that loads "
                               "weights with given.load(...). Nothing was changed")
        given = RuleInput(model, base, removal, data, store=store, retained_loader=retained_loader, seed=seed,
                          names=names)
        choice = run_rule(rule, given, name)
    else:
        try:
            number = float(scale)
        except (TypeError, ValueError):
            raise RequestError(f"scale must be a number, 'auto' or a registered rule ({', '.join(rule_names())}), "
                               f"got {scale!r}") from None
        change = np.float32(number) * removal.vector
        choice = ScaleChoice(number, True, 0, 0.0, "given", change, base + change)
    load_flat_params(model, choice.weights, names)
    return choice


def parse_scale(text: str, max_scale: float = ClassRule.max_step) -> Union[float, str]:
    """--scale as given on a command line: "auto", a registered rule's name, or a number in [0, max_scale].

    RequestError naming --scale and the registered rules otherwise. 0 is no step, 1 the recorded
    rows exactly; a step beyond the class search's ceiling (ClassRule.max_step) is no removal
    but the weights' overflow."""
    if text == "auto" or text in rule_names():
        return text
    try:
        value = float(text)
    except ValueError:
        raise RequestError(f"--scale must be a number, 'auto' or a registered rule ({', '.join(rule_names())}), "
                           f"got {text!r}") from None
    if not math.isfinite(value) or not 0 <= value <= max_scale:
        raise RequestError(f"--scale must be 'auto', a registered rule ({', '.join(rule_names())}) or a number from 0 "
                           f"(no step) to {max_scale:.0f} (1: the recorded rows exactly), got {text}")
    return value


def mark_applied(record: dict, erase: bool = False) -> int:
    """Mark a chain's applied rows forgotten in the root store; with ``erase``, purge them from disk.

    Call it once the forgotten model is safely written: marked rows are refused to every
    later request that does not start from this chain, and erased rows are gone.
    Returns the number of rows marked (or erased).
    """
    with gradstore.open(Path(record["root_run"]) / "store.h5", "r+") as opened:
        store = finished_store(opened)
        keys = np.asarray(record["forgotten_keys"], np.int64)
        live = keys[store.state[keys] == gradstore.RowState.LIVE]
        if live.size:
            store.mark_forgotten(live)
        return store.purge() if erase else int(live.size)
