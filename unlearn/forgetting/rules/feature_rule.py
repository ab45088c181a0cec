"""The feature rule ("feature"): take out of the model's head the direction that the request's samples, and
only they, occupy in its input. What a backdoor or a memorised group of samples taught, where subtracting
their rows silences their label together with the trigger (docs/DESIGN.md, "Memorised data")."""

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from ...errors import RequestError
from ...evaluation import accuracy
from ...params import flat_params
from ..requests import label_matched
from ..similar import centred_units, coherence, find_head, head_features
from .registry import RuleInput, Step, register_rule
from .sample_rule import nothing


@register_rule("feature")
@dataclass(frozen=True)
class FeatureRule:
    """Sample requests: project the head's weight off the request's feature direction, or change nothing.

    1. Evidence: the request's samples, centred on the median features of retained samples of their label,
       point the same way (mean pairwise cosine) more than ``control_draws`` random label-matched sets of
       retained samples do (permutation p < ``evidence_p``), by at least ``min_cosine``. A random request shares
       nothing: step 0.
    2. The change: with V the top ``directions`` right singular vectors of the request's features less the
       retained samples' mean (mu), the head's weight W becomes W (I - V'V) and its bias absorbs W V'V mu, so
       the head reads every retained sample's mean as before and no longer reads the request's direction.
    3. Guards: retained accuracy on a random slice and on a slice of the request's labels (``guard_slice``
       each) within ``guard_tolerance`` of before. Where the whole projection breaks one, the largest share of
       it that holds them (``bisections`` halvings; the report's ``share``, ``reached`` false); none: step 0.
    Forward passes only, on the request's samples and ``reference`` retained samples: no test data, nothing
    about a trigger or a target label. The rows are not used: the store tells which samples, the model how.
    """

    directions: int = 1
    evidence_p: float = 0.001
    min_cosine: float = 0.2
    control_draws: int = 2000
    reference: int = 10000
    guard_slice: int = 2000
    guard_tolerance: float = 0.01
    bisections: int = 5
    kinds: ClassVar[tuple[str, ...]] = ("samples",)

    def __call__(self, given: RuleInput) -> Step:
        data, model, base = given.data, given.model, given.base
        if 1.0 / (1 + self.control_draws) >= self.evidence_p:
            raise RequestError(f"step rule 'feature': control_draws={self.control_draws} cannot give a p-value below "
                               f"evidence_p={self.evidence_p}: give at least {int(np.ceil(1 / self.evidence_p))}")
        if data is None or not hasattr(data, "train_x"):
            raise RequestError("step rule 'feature' reads the request's samples through the model: it needs the "
                               "training data (unlearn.forget on a run folder, or forget_keys(..., dataset=...)). "
                               "Nothing was changed")
        samples = given.removal.request.samples
        if samples.size < 3:
            return nothing(f"feature: {samples.size} sample(s); at least 3 are needed to tell what they share", base)
        rng = np.random.default_rng([given.seed, 25])
        retained = given.retained()
        reference = np.sort(rng.choice(retained, min(self.reference, retained.size), replace=False))
        head = find_head(model, data.train_x[samples[:1]])
        _check_class_logits(model, data.train_x[samples[:1]])
        named_as = {id(p): n for n, p in model.named_parameters()}  # a tied weight is named once (GPT-2's wte)
        weight_name = named_as.get(id(head.module.weight), f"{head.name}.weight")
        bias_name = named_as.get(id(head.module.bias), "") if head.module.bias is not None else ""
        if weight_name != f"{head.name}.weight":
            raise RequestError(f"step rule 'feature' edits the head {head.name!r}, whose weight is tied to "
                               f"{weight_name!r}: projecting it would edit that parameter's other use too. "
                               "Nothing was changed")
        if given.names is not None and weight_name not in given.names:
            raise RequestError(f"step rule 'feature' edits the head {head.name!r}, which this store does not record "
                               f"(it records {len(given.names)} parameters): nothing was changed")
        features = head_features(model, head, data.train_x[np.concatenate([samples, reference])])
        request_features, reference_features = features[:samples.size], features[samples.size:]
        labels, reference_labels = data.train_y[samples], data.train_y[reference]
        units, pool = _units(request_features, labels, reference_features, reference_labels)
        test = coherence(units, pool, reference_labels, labels, self.control_draws, rng)
        report: dict[str, Any] = {"head": head.name, "coherence": test.report(), "evidence_p": self.evidence_p}
        short = test.shortfall(self.evidence_p, self.min_cosine)
        if short:
            step = nothing(f"feature: the samples share no direction the head reads ({short}): nothing removed", base)
            step.report = report
            return step
        mean = reference_features.mean(0)
        _, singular, vt = np.linalg.svd(request_features - mean, full_matrices=False)
        v = torch.as_tensor(vt[:self.directions], dtype=head.module.weight.dtype, device=head.module.weight.device)
        guards = [g for g in (rng.choice(retained, min(self.guard_slice, retained.size), replace=False),
                              label_matched(data, given.removal.request, self.guard_slice, [given.seed, 26])) if g.size]
        before = [accuracy(model, data.train_x[g], data.train_y[g]) for g in guards]
        names = given.names if given.names is not None else [n for n, _ in model.named_parameters()]
        w = head.module.weight.detach().clone()
        taken = (w @ v.T) @ v  # what the head reads along the request's direction(s)
        absorbed = taken @ torch.as_tensor(mean, dtype=w.dtype, device=w.device)
        # the bias absorbs the mean only where the store's index space holds it (a subset store may not)
        bias = head.module.bias.detach().clone() if head.module.bias is not None and bias_name in names else None

        def edit(share: float) -> tuple[np.ndarray, list[float]]:
            """The weights with ``share`` of the direction taken out, and the guards' accuracies there."""
            with torch.no_grad():
                head.module.weight.copy_(w - share * taken)
                if bias is not None:
                    head.module.bias.copy_(bias + share * absorbed)
            return flat_params(model, names), [accuracy(model, data.train_x[g], data.train_y[g]) for g in guards]

        def held(accuracies: list[float]) -> bool:
            return all(a >= b - self.guard_tolerance for a, b in zip(accuracies, before))

        edited, after = edit(1.0)
        share, evaluations = 1.0, 1
        if not held(after):  # the furthest share of the direction at which the guards hold
            low, high, edited, after, share = 0.0, 1.0, np.asarray(base), before, 0.0
            for _ in range(self.bisections):
                middle = (low + high) / 2
                weights, accuracies = edit(middle)
                evaluations += 1
                if held(accuracies):
                    low, edited, after, share = middle, weights, accuracies, middle
                else:
                    high = middle
        given.load(base)
        report.update({"directions": self.directions, "singular_values": singular[:self.directions + 2].tolist(),
                       "share": share, "guards_before": before, "guards_after": after,
                       "guard_tolerance": self.guard_tolerance,
                       "bias_absorbs_mean": bias is not None})
        if share == 0.0:
            step = nothing(f"feature: a retained guard fell by more than {self.guard_tolerance} at every share of the "
                           "direction tried: nothing removed", base)
            step.report = {**report, "stopped_by": "guard"}
            return step
        rule = (f"feature: {share:g} of the request's top {self.directions} feature direction(s) taken out of "
                f"{head.name}'s weight, the samples' features coherent against a label-matched control "
                f"(p < {self.evidence_p}); " + ("the retained guards held" if share == 1.0 else
                                                "further, a retained guard fell"))
        return Step(edited - base, report, evaluations=evaluations, rule=rule, reached=share == 1.0)


def _check_class_logits(model: torch.nn.Module, example: np.ndarray) -> None:
    """RequestError unless the model maps a batch to class logits [batch, classes]: the guards read accuracy."""
    with torch.no_grad():
        out = model(torch.as_tensor(example).to(next(model.parameters()).device))
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise RequestError(f"step rule 'feature' guards retained accuracy, read from class logits [batch, classes]; "
                           f"this model returns {shape}: a language model or another output is not served yet "
                           "(docs/RESULTS.md, 'Language model: canaries'). Nothing was changed")


def _units(request: np.ndarray, labels: np.ndarray, reference: np.ndarray, reference_labels: np.ndarray):
    """Features centred per label on the reference samples' median (``similar.centred_units``); RequestError
    where a label of the request has no reference sample."""
    for label in np.unique(labels):
        if not np.any(reference_labels == label):
            raise RequestError(f"step rule 'feature': no retained sample has label {label}, so nothing tells what the "
                               "request's samples of that label share: nothing was changed")
    return centred_units(request, labels, reference, reference_labels)
