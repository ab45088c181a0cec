"""What the request's samples share, read from the model's head: the search for the samples nobody named
(``find_similar``) and the coherence test that the feature rule and the search both start with.

Why the head's input and not the stored rows: measured on the poisoned MNIST runs (docs/DESIGN.md, "Memorised
data"), a row's inner product with the named rows at its positions ranks the 75 unnamed poisoned samples with an
AUC of .97-.98 but only because their rows are large (hard samples are too): 23-32 of the top 75 are poisoned.
The head's input (the features the last Linear layer reads) separates them completely: samples that taught
the same thing are read the same way by the model that learned it.

Every test is against a label-matched control, so that a request that shares nothing finds nothing:
- coherence: the named samples' centred features point the same way (mean pairwise cosine) more than
  ``control_draws`` random sets of the same size and labels do (a permutation p-value), and by enough to act on
  (a mean cosine of at least ``min_cosine``);
- the search, only when coherence holds: a candidate is found when its cosine with the named set's direction
  is at least the named samples' own leave-one-out cosines' ``quantile``-th percentile (the 1st: about the least
  of them; the 5th, used until 2026-12-07, missed 9 of 30 draws of 25 named on the poisoned MNIST runs at recall
  .75-.88, where the 1st met all 30 at precision 1.00: docs/RESULTS.md), and nearer their
  cosines than the bulk of the candidates' (``balanced``: where a model learnt the shared thing weakly, the named
  samples' cosines spread out and the percentile alone let in clean samples). One round by default: rounds that
  add the found samples to the direction and search again (``max_rounds``) drifted to half of a language
  model's windows (docs/RESULTS.md, "Language model: canaries").

Where it fails: a memorised span that is a small part of its sample (a canary line in a 128-byte window) is
averaged away with the rest of the sample's features; the search then finds mostly other samples.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from ..errors import RequestError

FEATURE_BATCH = 1024


@dataclass
class Head:
    """The model's last Linear layer in forward order: what reads the features the search compares."""

    name: str
    module: torch.nn.Linear


def find_head(model: torch.nn.Module, example: Any) -> Head:
    """The last ``nn.Linear`` the model calls on ``example`` (one batch of inputs); RequestError if none is called."""
    called: list[str] = []
    names = {module: name for name, module in model.named_modules()}
    hooks = [module.register_forward_hook(lambda m, i, o: called.append(names[m]))
             for module in model.modules() if isinstance(module, torch.nn.Linear)]
    try:
        with torch.no_grad():
            model(_as_tensor(example, model))
    finally:
        for hook in hooks:
            hook.remove()
    if not called:
        raise RequestError(f"{type(model).__name__} calls no nn.Linear layer: the feature rule and the search read the "
                           "input of the model's last Linear layer (its head), and this model has none")
    return Head(called[-1], dict(model.named_modules())[called[-1]])


def head_features(model: torch.nn.Module, head: Head, inputs: Any, batch_size: int = FEATURE_BATCH,
                  positions: bool = False) -> np.ndarray:
    """float64 [n, d]: the input of ``head`` for each sample of ``inputs`` (averaged over any positions, such as
    tokens, between the batch and the feature dimension), with the model in eval mode. ``positions``: float32
    [n, positions, d], each position kept (``similar_spans`` reads a window token by token)."""
    caught: list[torch.Tensor] = []
    hook = head.module.register_forward_hook(lambda m, i, o: caught.append(i[0].detach()))
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(inputs), batch_size):
                caught.clear()
                model(_as_tensor(inputs[start:start + batch_size], model))
                x = caught[-1].reshape(caught[-1].shape[0], -1, caught[-1].shape[-1])
                out.append(x.float().cpu().numpy() if positions else x.mean(1).double().cpu().numpy())
    finally:
        hook.remove()
        for module, training in modes:  # each module's own flag, as it was
            module.training = training
    if not out:
        return np.zeros((0, 1, head.module.in_features) if positions else (0, head.module.in_features))
    return np.concatenate(out)


def _as_tensor(inputs: Any, model: torch.nn.Module) -> torch.Tensor:
    """``inputs`` on the model's device; floating inputs in the model's floating dtype (float64 data, a float32
    model), integer inputs (token ids) as they are."""
    parameter = next(model.parameters())
    tensor = torch.as_tensor(np.asarray(inputs)).to(parameter.device)
    return tensor.to(parameter.dtype) if tensor.is_floating_point() and parameter.is_floating_point() else tensor


def mean_pairwise_cosine(units: np.ndarray) -> float:
    """Mean cosine over distinct pairs of unit rows (0 for fewer than two)."""
    n = units.shape[0]
    if n < 2:
        return 0.0
    total = units.sum(0)
    return float((total @ total - n) / (n * (n - 1)))


@dataclass
class Coherence:
    """Whether the named samples' features point the same way more than random label-matched sets do."""

    cosine: float  # the named set's mean pairwise cosine
    null_max: float  # the largest of the control draws'
    p_value: float  # (1 + draws at least as coherent) / (1 + draws)
    draws: int

    def report(self) -> dict:
        return {"mean_pairwise_cosine": self.cosine, "control_max": self.null_max, "p_value": self.p_value,
                "control_draws": self.draws}

    def shortfall(self, evidence_p: float, min_cosine: float) -> str:
        """Why the named samples do not count as sharing a direction ("" when they do): the test's p-value not
        below ``evidence_p``, or a mean cosine below ``min_cosine`` (an effect too small to act on, however
        significant: a random request of 539 on MNIST once reached p = 0.0010 at a cosine of .033)."""
        if self.p_value >= evidence_p:
            return f"coherence p = {self.p_value:.3g}, not below {evidence_p}"
        if self.cosine < min_cosine:
            return f"mean pairwise cosine {self.cosine:.3f}, below {min_cosine}"
        return ""


def coherence(named: np.ndarray, pool: np.ndarray, pool_labels: np.ndarray, named_labels: np.ndarray,
              draws: int, rng: np.random.Generator) -> Coherence:
    """Permutation test of ``named`` (unit rows) against draws from ``pool`` (unit rows) with the named label mix."""
    observed = mean_pairwise_cosine(named)
    labels, counts = np.unique(named_labels, return_counts=True)
    by_label = [np.flatnonzero(pool_labels == label) for label in labels]
    if any(rows.size < count for rows, count in zip(by_label, counts)):
        raise RequestError("the control for the coherence test needs, for each label of the request, at least as "
                           "many retained samples of that label as the request has: "
                           f"{dict(zip(labels.tolist(), counts.tolist()))} requested, "
                           f"{ {int(l): int(r.size) for l, r in zip(labels, by_label)} } retained")
    null = np.array([mean_pairwise_cosine(pool[np.concatenate([rng.choice(rows, count, replace=False)
                                                              for rows, count in zip(by_label, counts)])])
                     for _ in range(draws)])
    return Coherence(observed, float(null.max(initial=-1.0)), float((1 + (null >= observed).sum()) / (1 + draws)),
                     draws)


@dataclass
class Similar:
    """What ``find_similar`` found: training samples that the model reads as it reads the named ones."""

    found: np.ndarray  # int64 sample indices (never the named ones), by score, highest first
    scores: np.ndarray  # their cosines with the named (and found) samples' direction
    coherence: Optional[Coherence]
    threshold: Optional[float]
    rounds: int
    candidates: int
    head: str
    why: str = ""  # why nothing was searched for, where nothing was
    extra: dict = field(default_factory=dict)

    def report(self, truth: Optional[np.ndarray] = None) -> dict:
        """JSON-able; with ``truth`` (the samples known to belong with the named ones, such as a run's poisoned
        keys), ``precision`` and ``recall`` of the found samples against the truth outside the named ones."""
        report: dict = {
            "found": [{"key": int(k), "score": float(s)} for k, s in zip(self.found, self.scores)],
            "num_found": int(self.found.size), "head": self.head, "candidates": self.candidates,
            "threshold": self.threshold, "rounds": self.rounds,
            "coherence": self.coherence.report() if self.coherence else None,
        }
        if self.why:
            report["why_nothing"] = self.why
        if truth is not None:
            hits = int(np.isin(self.found, truth).sum())
            report["precision"] = hits / self.found.size if self.found.size else None
            report["recall"] = hits / truth.size if truth.size else None
            report["truth_unnamed"] = int(truth.size)
        return {**report, **self.extra}


def find_similar(model: torch.nn.Module, inputs: Any, labels: Optional[np.ndarray], named: np.ndarray,
                 candidates: np.ndarray, *, seed: int = 0, evidence_p: float = 0.001, min_cosine: float = 0.2,
                 control_draws: int = 2000,
                 quantile: float = 1.0, max_rounds: int = 1) -> Similar:
    """The training samples among ``candidates`` that the model reads as it reads ``named`` (see the module doc).

    ``inputs`` and ``labels`` are indexed by sample; ``labels`` None treats every sample as one label. Only
    candidates with a label of the named samples are scored. Nothing is found unless the named samples'
    features are coherent (p < ``evidence_p`` against ``control_draws`` label-matched random sets, and a mean
    pairwise cosine of at least ``min_cosine``: groups the model reads alike reach .29-.49, random sets .00-.05, and
    random clean samples of a label that also holds a poisoned group .10-.14),
    and never a candidate nearer the bulk of the candidates' scores than the named samples' own (``balanced``)."""
    if 1.0 / (1 + control_draws) >= evidence_p:
        raise RequestError(f"control_draws={control_draws} cannot give a p-value below evidence_p={evidence_p} "
                           f"(the smallest is 1/(1 + draws)): give at least {int(np.ceil(1 / evidence_p))} draws")
    named, candidates = checked_search_keys("find_similar", named, candidates, len(inputs))
    all_labels = np.zeros(len(inputs), np.int64) if labels is None else np.asarray(labels)
    head = find_head(model, inputs[named[:1]])
    candidates = candidates[np.isin(all_labels[candidates], all_labels[named])]
    if named.size < 3:
        return Similar(np.zeros(0, np.int64), np.zeros(0), None, None, 0, int(candidates.size), head.name,
                       why=f"{named.size} named sample(s): at least 3 are needed to tell what they share")
    features = head_features(model, head, inputs[np.concatenate([named, candidates])])
    # centred on the candidates of each label, never on the named
    named_units, pool = centred_units(features[:named.size], all_labels[named], features[named.size:],
                                      all_labels[candidates])
    rng = np.random.default_rng([seed, 24])
    test = coherence(named_units, pool, all_labels[candidates], all_labels[named], control_draws, rng)
    short = test.shortfall(evidence_p, min_cosine)
    if short:
        return Similar(np.zeros(0, np.int64), np.zeros(0), test, None, 0, int(candidates.size), head.name,
                       why=f"the named samples share no direction the model reads ({short}): nothing is added "
                           "without evidence")
    found = np.zeros(candidates.size, bool)
    rounds, threshold, scores = 0, 0.0, np.zeros(candidates.size)
    for rounds in range(1, max_rounds + 1):
        total = named_units.sum(0) + pool[found].sum(0)
        direction = total / np.linalg.norm(total)
        scores = pool @ direction
        leave_one_out = [float(u @ (total - u)) / float(np.linalg.norm(total - u)) for u in named_units]
        threshold = max(float(np.percentile(leave_one_out, quantile)), balanced(scores, np.asarray(leave_one_out)))
        now = scores >= threshold
        if np.array_equal(now, found):
            break
        found = now
    order = np.argsort(-scores[found], kind="stable")
    return Similar(candidates[found][order], scores[found][order], test, threshold, rounds, int(candidates.size),
                   head.name)


def checked_search_keys(search: str, named: Any, candidates: Any, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(named, candidates less the named) as sorted unique int64; RequestError naming the keys outside [0, size)."""
    named = np.unique(np.asarray(named, np.int64))
    candidates = np.setdiff1d(np.asarray(candidates, np.int64), named)
    for what, keys in (("named", named), ("candidates", candidates)):
        outside = keys[(keys < 0) | (keys >= size)]
        if outside.size:
            raise RequestError(f"{search}: {what} outside [0, {size}): {outside[:10].tolist()}")
    return named, candidates


def centred_units(request: np.ndarray, request_labels: np.ndarray, pool: np.ndarray,
                  pool_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Features centred on the median of the pool's features of each one's label, at unit length: (the
    request's, the pool's). A label the pool lacks is centred on the request's own mean there; pool rows of
    labels outside the request are 0."""
    request, pool = request.copy(), pool.copy()
    outside = ~np.isin(pool_labels, request_labels)
    for label in np.unique(request_labels):
        mine, theirs = request_labels == label, pool_labels == label
        centre = np.median(pool[theirs], axis=0) if theirs.any() else request[mine].mean(0)
        request[mine] -= centre
        pool[theirs] -= centre
    pool[outside] = 0.0
    request /= np.maximum(np.linalg.norm(request, axis=1, keepdims=True), 1e-12)
    pool /= np.maximum(np.linalg.norm(pool, axis=1, keepdims=True), 1e-12)
    return request, pool


def balanced(scores: np.ndarray, named_scores: np.ndarray) -> float:
    """The score as many robust deviations (1.4826 MAD) above the candidates' median as below the named samples'
    median: nearer the named samples' scores above it, nearer the bulk's below."""
    low, high = float(np.median(scores)), float(np.median(named_scores))
    low_spread = 1.4826 * float(np.median(np.abs(scores - low)))
    high_spread = 1.4826 * float(np.median(np.abs(named_scores - high)))
    return (low * high_spread + high * low_spread) / max(low_spread + high_spread, 1e-12)
