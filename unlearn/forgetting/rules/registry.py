"""Step rules by name: what ``scale="auto"`` or ``scale="<name>"`` runs to turn a removal into a weight change.

A rule is a callable taking a ``RuleInput`` and returning a ``Step``: the parameter change it
applies (a scaled sum of rows, or any other change) and a JSON-able report. Rules are looked up
by name so that ``forget()``, the CLI's --scale and the benchmarks reach a new rule with no new
option; ``"auto"`` runs the rule registered for the request's kind (``AUTO``).
"""

import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence, TypeVar, Union

import numpy as np
import torch

from ...errors import RequestError, UnlearnError
from ...params import load_flat_params
from ..requests import FinishedStore, Removal, retained_samples

KINDS = ("class", "samples")
AUTO = {"class": "class", "samples": "samples"}  # the rule "auto" runs, per request kind
SEARCH_KEYS = ("rule", "reached", "evaluations", "seconds")  # forget.json's scale_search keys every step has


@dataclass(frozen=True)
class RuleInput:
    """What a rule may use. ``model`` holds ``base`` when the rule is called; the rule may load other
    weights while it searches (apply_removal loads the result afterwards). It reads the store, never writes it."""

    model: torch.nn.Module
    base: np.ndarray  # float32 [M]: the weights before removal
    removal: Removal  # the request (keys, samples, class), the sum of its rows, a control for sample requests
    data: Any  # the run's DataSplit: training data for guards (test data never choose a step)
    store: Optional[FinishedStore] = None  # the open store, where the caller has one (forget() does)
    retained_loader: Optional[Any] = None  # batches of retained data, where the caller gives one (for rules that train)
    seed: int = 0
    names: Optional[Sequence[str]] = None  # the parameters ``base`` and ``rows`` index, in order (None: every one)

    def load(self, weights: np.ndarray) -> None:
        """Load a flat vector of the store's index space into ``model`` (what a rule that evaluates weights calls)."""
        load_flat_params(self.model, weights, self.names)

    @property
    def kind(self) -> str:
        """The request's kind: "class" or "samples"."""
        return self.removal.request.kind

    @property
    def keys(self) -> np.ndarray:
        """The store keys the request removes (rows not yet applied in its chain)."""
        return self.removal.request.keys

    @property
    def rows(self) -> np.ndarray:
        """float32 [M]: the sum of the request's rows."""
        return self.removal.vector

    def retained(self) -> np.ndarray:
        """Training keys outside the request's chain: the data a removal must spare."""
        return retained_samples(self.data, self.removal.request)


@dataclass
class Step:
    """What a rule returns: the change added to the base weights, and what it measured."""

    change: np.ndarray  # float32 [M]
    report: dict = field(default_factory=dict)  # JSON-able: forget.json's scale_search, after SEARCH_KEYS
    scale: Optional[float] = None  # the multiple of the rows the change stands for; None: fitted (ScaleChoice)
    reached: bool = True  # whether the rule's target was met
    evaluations: int = 0  # models evaluated to choose it
    rule: str = ""  # one line for scale_search.rule; empty: the rule's name
    weights: Optional[np.ndarray] = None  # base + change as the rule computed it (a walked path), loaded as is


class Rule(Protocol):
    """A step rule; an optional ``kinds`` attribute names the request kinds it serves (default: both)."""

    def __call__(self, given: RuleInput) -> Step: ...


@dataclass
class ScaleChoice:
    """What apply_removal did: the step, the weights it loaded, and the report forget.json keeps."""

    scale: float  # the rule's, or the least-squares multiple of the rows when it gave none (scale_fitted)
    reached: bool
    evaluations: int
    seconds: float
    rule: str
    change: np.ndarray  # float32 [M]: weights - base
    weights: np.ndarray  # float32 [M]: the weights loaded
    report: dict = field(default_factory=dict)  # the rule's own report
    name: str = "given"  # the registered rule's name; "given" for a number
    scale_fitted: bool = False

    @property
    def evidence(self) -> Optional[dict]:
        """What the sample rule measured (its report's "evidence"), if it measured anything."""
        return self.report.get("evidence")

    def search(self) -> dict:
        """forget.json's scale_search."""
        fitted = {"scale_fitted": True} if self.scale_fitted else {}
        return {"rule": self.rule, "reached": self.reached, "evaluations": self.evaluations, "seconds": self.seconds,
                **fitted, **self.report}


_RULES: dict[str, Rule] = {}
R = TypeVar("R")


def register_rule(name: str, *, replace: bool = False) -> Callable[[R], R]:
    """Decorator: register a step rule under ``name``, for ``scale=name`` and ``--scale name``.

    Decorate a function of a RuleInput returning a Step, or a class of such callables whose
    fields all have defaults (registered as its default instance); or call it on an instance
    (``register_rule("strict")(SampleRule(evidence_p=0.01))``). Returns what it decorates.
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip() or name == "auto" or is_number(name):
        raise UnlearnError(f"a step rule's name must be a word other than 'auto' and not a number, got {name!r}")

    def decorate(rule: R) -> R:
        instance = rule() if isinstance(rule, type) else rule
        if not callable(instance):
            raise UnlearnError(f"step rule {name!r} must be callable (RuleInput -> Step), got {type(instance).__name__}")
        if name in _RULES and not replace:
            raise UnlearnError(f"a step rule named {name!r} is already registered; unregister_rule({name!r}) first "
                               "or pass replace=True")
        _RULES[name] = instance
        return rule

    return decorate


def unregister_rule(name: str) -> None:
    """Remove a registered rule (a test's, a session's); RequestError if there is none by that name."""
    if name not in _RULES:
        raise RequestError(f"no step rule named {name!r} to unregister; registered: {', '.join(rule_names())}")
    del _RULES[name]


def registered_rules() -> dict[str, Rule]:
    """{name: rule} of every registered rule (a copy)."""
    return dict(_RULES)


def rule_names() -> list[str]:
    """The registered rules' names, sorted: what error messages list."""
    return sorted(_RULES)


def rule_kinds(rule: Rule) -> tuple[str, ...]:
    """The request kinds a rule serves (its ``kinds`` attribute, both by default)."""
    return tuple(getattr(rule, "kinds", KINDS))


def rule_for(scale: Union[str, Rule], kind: str) -> tuple[str, Rule]:
    """(name, rule) that ``scale`` ("auto", a registered name, or a rule itself) runs on a ``kind`` request."""
    if callable(scale):
        name, rule = getattr(scale, "__name__", type(scale).__name__), scale
    else:
        name = AUTO[kind] if scale == "auto" else scale
        if name not in _RULES:
            raise RequestError(f"no step rule named {scale!r}: give a number, 'auto', or one of the registered rules "
                               f"({', '.join(rule_names())})")
        rule = _RULES[name]
    if kind not in rule_kinds(rule):
        raise RequestError(f"step rule {name!r} serves {' and '.join(rule_kinds(rule))} requests, not {kind} requests")
    return name, rule


def run_rule(rule: Rule, given: RuleInput, name: str) -> ScaleChoice:
    """Run ``rule`` on the model at its base weights and check what it returns: a finite change of the
    model's size and a JSON-able report."""
    started = time.perf_counter()
    given.load(given.base)
    step = rule(given)
    seconds = time.perf_counter() - started
    if not isinstance(step, Step):
        raise UnlearnError(f"step rule {name!r} returned {type(step).__name__}, not a Step")
    change = np.asarray(step.change, np.float32)
    if change.shape != given.base.shape:
        raise UnlearnError(f"step rule {name!r} returned a change of shape {change.shape}; the model has "
                           f"{given.base.size} parameters")
    if not np.all(np.isfinite(change)):
        raise UnlearnError(f"step rule {name!r} returned a change that is not finite")
    clash = sorted(set(step.report) & {*SEARCH_KEYS, "scale_fitted"})
    if clash:
        raise UnlearnError(f"step rule {name!r}: its report may not use the keys {clash} (scale_search sets them)")
    try:
        json.dumps(step.report, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise UnlearnError(f"step rule {name!r} returned a report that is not JSON: {error}") from None
    weights = np.asarray(step.weights if step.weights is not None else given.base + change, np.float32)
    if step.weights is not None and not same_to_rounding(weights, given.base + change):
        raise UnlearnError(f"step rule {name!r} returned weights that are not base + change")
    scale = step.scale if step.scale is not None else fitted_scale(change, given.rows)
    return ScaleChoice(float(scale), bool(step.reached), int(step.evaluations), seconds, step.rule or name, change,
                       weights, step.report, name, scale_fitted=step.scale is None)


def same_to_rounding(weights: np.ndarray, expected: np.ndarray) -> bool:
    """Whether float32 ``weights`` equal ``expected`` but for a few roundings (a walk's weights against base + change)."""
    if weights.shape != expected.shape:
        return False
    largest = max(float(np.abs(weights).max(initial=0.0)), float(np.abs(expected).max(initial=0.0)))
    tolerance = 4 * float(np.finfo(np.float32).eps) * largest
    return bool(np.all(np.abs(weights - expected) <= tolerance))


def fitted_scale(change: np.ndarray, rows: np.ndarray) -> float:
    """The multiple of ``rows`` closest to ``change`` (least squares); 0 when the rows are 0."""
    norm = float(np.dot(rows.astype(np.float64), rows.astype(np.float64)))
    return float(np.dot(change.astype(np.float64), rows.astype(np.float64)) / norm) if norm else 0.0


def is_number(text: str) -> bool:
    """Whether text reads as a number: a step given as text, never a rule's name."""
    try:
        float(text)
    except ValueError:
        return False
    return True
