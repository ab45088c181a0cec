"""The sample rule ("samples", what "auto" runs for a sample request): remove what only these samples taught, or nothing."""

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np
import torch

from ...evaluation import accuracy, per_sample_stats
from ...params import load_flat_params
from ..projection import ProjectedWalk
from ..requests import Removal, label_matched, retained_samples
from .registry import RuleInput, ScaleChoice, Step, register_rule, run_rule


@register_rule("samples")
@dataclass(frozen=True)
class SampleRule:
    """Sample requests: remove what the samples taught that their classes' other samples did not, or nothing.

    The path: the request's rows, projected off the gradients of the retained data's mean
    outputs per class (unlearn.forgetting.projection), walked in segments of ``segment_share`` of
    the weights' norm, ``segments`` at most. At each segment's end two checks:
    - the evidence: each forget sample's loss rise against those of a control (retained samples
      of the same labels, removal.control, at least ``control_min``) whose own rows are removed as
      far along the same projections; one-sided Mann-Whitney U, p < ``evidence_p``;
    - the guards: retained accuracy on a random slice and on a slice of the request's labels
      (``guard_slice`` each), each within ``guard_tolerance`` of its value before removal (a
      failing segment is bisected ``bisections`` times).
    The step is the furthest point where both hold, 0 if the first segment already lacks the
    evidence (the store shows nothing these samples taught that random samples of their labels
    did not). Forward passes, and backward passes on retained data for the projections, only:
    test data never enter.
    """

    segment_share: float = 0.07
    segments: int = 24
    evidence_p: float = 0.05
    control_min: int = 50  # the smallest control plan_removal draws: a smaller request meets a larger control (conservative)
    guard_slice: int = 2000
    guard_tolerance: float = 0.01
    bisections: int = 4
    kinds: ClassVar[tuple[str, ...]] = ("samples",)

    def __call__(self, given: RuleInput) -> Step:
        removal, model, base, data, seed = given.removal, given.model, given.base, given.data, given.seed
        request = removal.request
        if request.keys.size == 0 or not np.any(removal.vector):
            return nothing("empty request: nothing to remove", base)
        if removal.control is None or removal.control_samples is None or removal.control_samples.size == 0:
            return nothing("samples: no retained sample shares the request's labels, so nothing tells what only "
                           "these samples taught: nothing removed", base)
        load_flat_params(model, base)
        rng = np.random.default_rng(seed)
        retained = retained_samples(data, request, removal.control_samples)
        guards = [rng.choice(retained, min(self.guard_slice, retained.size), replace=False),
                  label_matched(data, request, self.guard_slice, [seed, 7], exclude=removal.control_samples)]
        guards = [guard for guard in guards if guard.size]
        floors = [accuracy(model, data.train_x[g], data.train_y[g]) - self.guard_tolerance for g in guards]
        evidence = Evidence(model, data, request.samples, removal.control_samples)
        segment = self.segment_share * float(np.linalg.norm(base)) / float(np.linalg.norm(removal.vector))
        walk = ProjectedWalk(model, base, removal.vector, removal.control, data, retained,
                             np.unique(data.train_y[request.samples]), segment, seed=seed)
        evaluations = 0

        def holds(fraction: float) -> tuple[bool, Optional[float]]:
            """Guards and evidence at ``fraction`` of the current segment: (guarded, p-value or None)."""
            nonlocal evaluations
            evaluations += 1
            weights, control_weights = walk.within(fraction)
            load_flat_params(model, weights)
            if not all(accuracy(model, data.train_x[g], data.train_y[g]) >= floor for g, floor in zip(guards, floors)):
                return False, None
            return True, evidence.p_value(weights, control_weights)

        def kept(p_value: Optional[float]) -> bool:
            return p_value is not None and p_value < self.evidence_p

        chosen, last_p, stop = (np.asarray(base, np.float32), 0.0), None, "segments"
        while walk.walked < self.segments:
            walk.project()
            guarded, p_value = holds(1.0)
            if guarded and kept(p_value):
                walk.advance()
                chosen, last_p = (walk.start, walk.scale()), p_value
                continue
            stop = "evidence" if guarded else "guard"
            if not guarded:  # the guard fails within this segment: the furthest point before it that keeps both
                low, high = 0.0, 1.0
                for _ in range(self.bisections):
                    middle = (low + high) / 2
                    ok, p_middle = holds(middle)
                    if ok and kept(p_middle):
                        low, chosen, last_p = middle, (walk.within(middle)[0], walk.scale(middle)), p_middle
                    else:
                        high = middle
            else:
                last_p = last_p if last_p is not None else p_value
            break
        weights, scale = chosen
        load_flat_params(model, base)
        report = {
            "test": "one-sided Mann-Whitney U: forget-set loss rises > a same-label control's under its own rows' removal",
            "threshold": self.evidence_p, "p_value": last_p, "forget_samples": int(request.samples.size),
            "control_samples": int(removal.control_samples.size), "segment": segment, "segments_kept": scale / segment,
            "projections": walk.bases, "stopped_by": stop,
        }
        rule = ("samples: the projected removal, as far as the forget set keeps losing more than a same-label control "
                f"(Mann-Whitney p < {self.evidence_p}) and the retained guards hold")
        weights = np.asarray(weights, np.float32)
        return Step(weights - base, {"evidence": report}, scale=float(scale),
                    reached=stop == "evidence",  # a guard or the segment limit stopped it while the samples still lost more
                    evaluations=evaluations, rule=rule, weights=weights)


def nothing(why: str, base: np.ndarray) -> Step:
    """No step: the model is left as it was."""
    return Step(np.zeros_like(base), scale=0.0, reached=False, rule=why)


class Evidence:
    """The sample rule's test: per-sample loss rises of the forget set against the control's."""

    def __init__(self, model: torch.nn.Module, data: Any, samples: np.ndarray, control_samples: np.ndarray):
        self.model = model
        self.forget = data.train_x[samples], data.train_y[samples]
        self.control = data.train_x[control_samples], data.train_y[control_samples]
        self.forget_before = per_sample_stats(model, *self.forget)[1]
        self.control_before = per_sample_stats(model, *self.control)[1]

    def p_value(self, weights: np.ndarray, control_weights: np.ndarray) -> float:
        from scipy.stats import mannwhitneyu

        load_flat_params(self.model, weights)
        forget_rise = per_sample_stats(self.model, *self.forget)[1] - self.forget_before
        load_flat_params(self.model, control_weights)
        control_rise = per_sample_stats(self.model, *self.control)[1] - self.control_before
        return float(mannwhitneyu(forget_rise, control_rise, alternative="greater").pvalue)


def choose_sample_step(model: torch.nn.Module, base: np.ndarray, removal: Removal, data: Any,
                       guard_tolerance: float = SampleRule.guard_tolerance, seed: int = 0,
                       bisections: int = SampleRule.bisections) -> ScaleChoice:
    """The sample rule on a removal, without loading the result (SampleRule)."""
    rule = SampleRule(guard_tolerance=guard_tolerance, bisections=bisections)
    return run_rule(rule, RuleInput(model, base, removal, data, seed=seed), "samples")
