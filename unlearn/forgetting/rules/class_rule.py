"""The class rule ("class", what "auto" runs for a class request): the smallest step that forgets the class, within a guard."""

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ...evaluation import accuracy
from ...errors import RequestError
from ...params import load_flat_params
from ..requests import Removal, Request
from .registry import RuleInput, ScaleChoice, Step, register_rule, run_rule


@register_rule("class")
@dataclass(frozen=True)
class ClassRule:
    """Class requests: the smallest step at which the class stops being recognised, within a guard.

    The class's training samples' accuracy falls to ``target_acc`` (0: what a model that never saw
    the class gets). Guard: accuracy on ``guard_slice`` retained training samples stays within
    ``guard_tolerance`` of its value before removal. Forward passes only: a doubling search from
    ``first_step`` (at most ``max_step``, ``max_evaluations`` models), then ``bisections``
    geometric bisections; then ``margin`` times the step when the guard allows.
    """

    # A class is forgotten when none of its training samples is recognised any more: a model that
    # never saw the class never predicts it. (A 1% threshold left 1.3% of the test samples of
    # MNIST's class 3 recognised at p = 0.01: docs/RESULTS.md.)
    target_acc: float = 0.0
    # Training samples of a class stop being recognised at a smaller step than its unseen test
    # samples do (MNIST class 3, p = 0.02: at the step where no training three was recognised any
    # more, 1.1% of the test threes still were); take this much more step when the guard allows it.
    margin: float = 1.5
    guard_slice: int = 2000  # retained training samples watched by the guard
    guard_tolerance: float = 0.01
    first_step: float = 2.0**-16
    max_step: float = 2.0**16  # the search's ceiling (and the CLI's largest --scale)
    bisections: int = 6
    max_evaluations: int = 40
    kinds: ClassVar[tuple[str, ...]] = ("class",)

    def __call__(self, given: RuleInput) -> Step:
        request, model, base, data = given.removal.request, given.model, given.base, given.data
        if request.cls is None:
            raise RequestError("the class rule serves class requests; sample requests use the sample rule ('samples')")
        if request.keys.size == 0:
            return Step(np.zeros_like(base), scale=0.0, reached=False, rule="empty request: nothing to remove")
        load_flat_params(model, base)  # the guard's reference is the model before removal, whatever it holds now
        rng = np.random.default_rng(given.seed)
        retained = given.retained()
        guard = rng.choice(retained, min(self.guard_slice, retained.size), replace=False)
        forget_x, forget_y = data.train_x[request.samples], data.train_y[request.samples]
        rule = f"class: training-sample accuracy <= {self.target_acc}, then x{self.margin} if the guard allows"
        guard_floor = accuracy(model, data.train_x[guard], data.train_y[guard]) - self.guard_tolerance
        evaluations = 0

        def assess(scale: float) -> tuple[bool, bool]:
            nonlocal evaluations
            evaluations += 1
            load_flat_params(model, base + np.float32(scale) * given.rows)
            forgotten = accuracy(model, forget_x, forget_y) <= self.target_acc
            guarded = accuracy(model, data.train_x[guard], data.train_y[guard]) >= guard_floor
            return forgotten, guarded

        scale, last_safe, reached = self.first_step, 0.0, False
        while evaluations < self.max_evaluations and scale <= self.max_step:
            forgotten, guarded = assess(scale)
            if not guarded:
                break
            if forgotten:
                reached = True
                break
            last_safe, scale = scale, scale * 2
        if reached:  # bisect (geometrically) between the last scale that did not forget and this one
            low, high = max(last_safe, scale / 2), scale
            for _ in range(self.bisections):
                middle = (low * high) ** 0.5
                forgotten, guarded = assess(middle)
                if forgotten and guarded:
                    high = middle
                else:
                    low = middle
            scale = high
            forgotten, guarded = assess(scale * self.margin)
            if guarded:
                scale *= self.margin
        else:
            scale = last_safe
        load_flat_params(model, base)
        return Step(np.float32(scale) * given.rows, scale=float(scale), reached=reached, evaluations=evaluations,
                    rule=rule)


def choose_scale(model: torch.nn.Module, base: np.ndarray, removal: np.ndarray, data: Any, request: Request,
                 guard_tolerance: float = ClassRule.guard_tolerance, seed: int = 0,
                 max_evaluations: int = ClassRule.max_evaluations) -> ScaleChoice:
    """The class rule on a request and its rows' sum, without loading the result (ClassRule)."""
    rule = ClassRule(guard_tolerance=guard_tolerance, max_evaluations=max_evaluations)
    return run_rule(rule, RuleInput(model, base, Removal(request, removal, 0.0), data, seed=seed), "class")
