"""Forgetting: add a request's recorded rows back to the weights, with a chosen step size.

w_new = w + scale * removal, removal = sum of the rows of the request's keys:
per-sample stores use the samples' own rows; step-keyed stores (original, layer)
every step whose batch held a forgotten sample. ``scale="auto"`` picks the step
with forward passes only (``choose_scale``).

Requests chain: forgetting from a forget output starts from its model and skips the
keys already applied there, so no row is ever subtracted twice. ``mark_applied`` then
marks a chain's rows forgotten in the store, and erases them from the file if asked (a
deletion request); the store refuses them for good, and a forget from a model that still holds
them (one not in that chain) is refused rather than silently skipped.
"""

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch

import gradstore

from ..evaluation import accuracy, per_sample_stats
from ..identity import check_identity, run_identity
from ..params import flat_params, load_flat_params, named_shapes
from ..runs import folders as runs
from ..runs.loop import default_device, train

# A class is forgotten when none of its training samples is recognised any more: a model
# that never saw the class never predicts it. (A 1% threshold left 1.3% of the test
# samples of MNIST's class 3 recognised at p = 0.01: docs/RESULTS.md.)
CLASS_TARGET_ACC = 0.0
GUARD_SLICE = 2000  # retained training samples watched by the auto step's guard
# Training samples of a class stop being recognised at a smaller step than its unseen test
# samples do (MNIST class 3, p = 0.02: at the step where no training three was recognised
# any more, 1.1% of the test threes still were); class requests take this much more step,
# when the guard allows it.
CLASS_MARGIN = 1.5


# Sample requests (choose_sample_step): the removal walks a projected path (unlearn.projection) in segments
# that each move the weights by SEGMENT_SHARE of their norm, SEGMENTS at most; the step is kept only when
# the request's samples lose significantly more than a control of retained samples of the same labels
# losing its own rows (one-sided Mann-Whitney U on the per-sample loss rises, p < EVIDENCE_P).
SEGMENT_SHARE = 0.07
SEGMENTS = 24
EVIDENCE_P = 0.05
CONTROL_MIN = 50  # the smallest control: a smaller request is compared with a larger control (conservative)


@dataclass
class Request:
    """A resolved request: training samples to forget and the store keys that carry them."""

    samples: np.ndarray  # to remove now
    keys: np.ndarray
    cls: int = None
    skipped_samples: np.ndarray = None  # already forgotten earlier in the chain
    excluded: np.ndarray = None  # every sample forgotten once this request is applied (not retained data)

    @property
    def forget_set(self):
        """The request's samples, including those an earlier request in the chain removed."""
        return np.union1d(self.samples, self.skipped_samples)


@dataclass
class ScaleChoice:
    scale: float
    reached: bool  # whether the forget target was met within the guard
    evaluations: int
    seconds: float
    rule: str
    weights: Optional[np.ndarray] = None  # the weights chosen, when they are not base + scale * rows (a projected path)
    evidence: Optional[dict] = None  # what the sample rule measured (see choose_sample_step)


@dataclass
class Removal:
    """A request resolved against a store, with the sum of its rows: what a step is applied to."""

    request: Request
    vector: np.ndarray  # float32 [M]: sum of the request's rows
    seconds: float  # resolving and reading the rows
    control: Optional[np.ndarray] = None  # float32 [M]: a control set's rows (sample requests; see control_samples)
    control_samples: Optional[np.ndarray] = None  # retained samples of the request's labels, as many (at least CONTROL_MIN)


def plan_removal(store: gradstore.Store, method: str, data, samples: Optional[Sequence[int]] = None,
                 cls: Optional[int] = None, already: Sequence[int] = (), already_keys: Sequence[int] = (),
                 seed: int = 0) -> Removal:
    """The pipeline's first two stages: resolve the request's keys, sum their rows.

    A sample request also gets its control: as many retained samples of the same labels (at
    least CONTROL_MIN), drawn with ``seed``, and the sum of their live rows (choose_sample_step)."""
    if not store.finished:
        raise gradstore.BadInputError(f"{store.path}: recording has not finished (finalize never ran): nothing to forget with yet")
    started = time.perf_counter()
    request = resolve_request(store, method, data, samples=samples, cls=cls, already=already, already_keys=already_keys)
    vector = removal_vector(store, request.keys)
    removal = Removal(request, vector, time.perf_counter() - started)
    if cls is None and request.samples.size:
        removal.control_samples = label_matched(data, request, max(request.samples.size, CONTROL_MIN), [seed, 6])
        keys = removal.control_samples if method == "per-sample" else np.setdiff1d(
            store.keys_covering(removal.control_samples), np.union1d(request.keys, already_keys))
        removal.control = removal_vector(store, keys[store.state[keys] == gradstore.RowState.LIVE])
        removal.seconds = time.perf_counter() - started
    return removal


def label_matched(data, request, count, seed, exclude=()):
    """About ``count`` retained samples (not in the request's chain, nor in ``exclude``) with the request's label mix."""
    rng = np.random.default_rng(seed)
    retained = np.setdiff1d(np.setdiff1d(np.arange(len(data)), request.excluded), np.asarray(exclude, np.int64))
    labels, counts = np.unique(data.train_y[request.samples], return_counts=True)
    chosen = []
    for label, share in zip(labels, counts):
        pool = retained[data.train_y[retained] == label]
        want = int(np.ceil(count * share / request.samples.size))
        chosen.append(rng.choice(pool, min(want, pool.size), replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def apply_removal(model: torch.nn.Module, base: np.ndarray, removal: Removal, data, scale: Union[float, str],
                  seed: int = 0) -> ScaleChoice:
    """The pipeline's last two stages: choose the step (a number, or "auto") and load
    ``base + step * removal`` into ``model``."""
    if scale == "auto" and removal.request.cls is None:
        choice = choose_sample_step(model, base, removal, data, seed=seed)
    elif scale == "auto":
        choice = choose_scale(model, base, removal.vector, data, removal.request, seed=seed)
    else:
        choice = ScaleChoice(float(scale), True, 0, 0.0, "given")
    load_flat_params(model, choice.weights if choice.weights is not None else base + np.float32(choice.scale) * removal.vector)
    return choice


def removal_vector(store, keys):
    """sum of the rows of ``keys`` as a dense float32 [M] vector."""
    removal = np.zeros(store.num_params, np.float32)
    if len(keys):
        store.scatter_add(removal, keys, 1.0)
    return removal


def resolve_request(store, method, data, samples=None, cls=None, already=(), already_keys=()):
    """Samples and store keys of a request; samples and keys applied earlier in the chain are skipped."""
    if (samples is None) == (cls is None):
        raise ValueError("give exactly one of samples= or cls=")
    if cls is not None:
        if not (0 <= cls < data.num_classes):
            raise ValueError(f"class {cls} out of range [0, {data.num_classes})")
        samples = np.nonzero(data.train_y == cls)[0]
    samples = np.asarray(samples, np.int64)
    bad = samples[(samples < 0) | (samples >= len(data))]
    if bad.size:
        raise ValueError(f"sample indices out of range [0, {len(data)}): {bad[:10].tolist()}")
    already = np.asarray(already, np.int64)
    skipped = np.intersect1d(samples, already)
    samples = np.setdiff1d(samples, skipped)
    if method == "per-sample":
        keys = samples
    else:
        keys = np.setdiff1d(store.keys_covering(samples, states=tuple(gradstore.RowState.NAMES)), already_keys)
    gone = keys[store.state[keys] != gradstore.RowState.LIVE]
    if gone.size:
        raise ValueError(
            f"rows {gone[:10].tolist()} of this request are not live in {store.path} (forgotten or purged by a "
            "forget outside this chain, or never recorded): this model still holds them and they cannot be "
            "removed again; forget from that forget's output instead"
        )
    excluded = np.union1d(np.union1d(already, samples), skipped)
    return Request(samples=samples, keys=keys, cls=cls, skipped_samples=skipped, excluded=excluded)


def choose_scale(model, base, removal, data, request, guard_tolerance=0.01, seed=0, max_evaluations=40):
    """Class requests: the smallest step at which the class stops being recognised, within a guard.

    The class's training samples' accuracy falls to CLASS_TARGET_ACC = 0 (what a model that
    never saw the class gets). Guard: accuracy on a slice of retained training data stays
    within guard_tolerance of its value before removal. Forward passes only: a doubling
    search, then bisection; then CLASS_MARGIN times the step when the guard allows.
    (Sample requests: choose_sample_step.)
    """
    started = time.perf_counter()
    if request.cls is None:
        raise ValueError("choose_scale is the class rule; sample requests use choose_sample_step")
    if request.keys.size == 0:
        return ScaleChoice(0.0, False, 0, 0.0, "empty request: nothing to remove")
    load_flat_params(model, base)  # the guard's reference is the model before removal, whatever it holds now
    rng = np.random.default_rng(seed)
    retained = np.setdiff1d(np.arange(len(data)), request.excluded)
    guard = rng.choice(retained, min(GUARD_SLICE, retained.size), replace=False)
    forget_x, forget_y = data.train_x[request.samples], data.train_y[request.samples]
    rule = f"class: training-sample accuracy <= {CLASS_TARGET_ACC}, then x{CLASS_MARGIN} if the guard allows"
    guard_floor = accuracy(model, data.train_x[guard], data.train_y[guard]) - guard_tolerance
    evaluations = 0

    def assess(scale):
        nonlocal evaluations
        evaluations += 1
        load_flat_params(model, base + np.float32(scale) * removal)
        forgotten = accuracy(model, forget_x, forget_y) <= CLASS_TARGET_ACC
        guarded = accuracy(model, data.train_x[guard], data.train_y[guard]) >= guard_floor
        return forgotten, guarded

    scale, last_safe, reached = 2.0**-16, 0.0, False
    while evaluations < max_evaluations and scale <= 2.0**16:
        forgotten, guarded = assess(scale)
        if not guarded:
            break
        if forgotten:
            reached = True
            break
        last_safe, scale = scale, scale * 2
    if reached:  # bisect (geometrically) between the last scale that did not forget and this one
        low, high = max(last_safe, scale / 2), scale
        for _ in range(6):
            middle = (low * high) ** 0.5
            forgotten, guarded = assess(middle)
            if forgotten and guarded:
                high = middle
            else:
                low = middle
        scale = high
        forgotten, guarded = assess(scale * CLASS_MARGIN)
        if guarded:
            scale *= CLASS_MARGIN
    else:
        scale = last_safe
    load_flat_params(model, base)
    return ScaleChoice(float(scale), reached, evaluations, time.perf_counter() - started, rule)


def choose_sample_step(model, base, removal: Removal, data, guard_tolerance=0.01, seed=0, bisections=4) -> ScaleChoice:
    """Sample requests: remove what the samples taught that their classes' other samples did not, or nothing.

    The path: the request's rows, projected off the gradients of the retained data's mean
    outputs per class (unlearn.projection), walked in segments of SEGMENT_SHARE of the weights'
    norm, SEGMENTS at most. At each segment's end two checks:
    - the evidence: each forget sample's loss rise against those of a control (retained samples
      of the same labels, removal.control) whose own rows are removed as far along the same
      projections; one-sided Mann-Whitney U, p < EVIDENCE_P;
    - the guards: retained accuracy on a random slice and on a slice of the request's labels,
      each within ``guard_tolerance`` of its value before removal (a failing segment is bisected).
    The step is the furthest point where both hold, 0 if the first segment already lacks the
    evidence (the store shows nothing these samples taught that random samples of their labels
    did not). Forward passes, and backward passes on retained data for the projections, only:
    test data never enter.
    """
    from .projection import ProjectedWalk

    started = time.perf_counter()
    request = removal.request
    if request.keys.size == 0 or not np.any(removal.vector):
        return ScaleChoice(0.0, False, 0, 0.0, "empty request: nothing to remove")
    if removal.control_samples is None or removal.control_samples.size == 0:
        return ScaleChoice(0.0, False, 0, 0.0, "samples: no retained sample shares the request's labels, so "
                           "nothing tells what only these samples taught: nothing removed")
    load_flat_params(model, base)
    rng = np.random.default_rng(seed)
    retained = np.setdiff1d(np.setdiff1d(np.arange(len(data)), request.excluded), removal.control_samples)
    guards = [rng.choice(retained, min(GUARD_SLICE, retained.size), replace=False),
              label_matched(data, request, GUARD_SLICE, [seed, 7], exclude=removal.control_samples)]
    guards = [guard for guard in guards if guard.size]
    floors = [accuracy(model, data.train_x[g], data.train_y[g]) - guard_tolerance for g in guards]
    evidence = Evidence(model, data, request.samples, removal.control_samples)
    segment = SEGMENT_SHARE * float(np.linalg.norm(base)) / float(np.linalg.norm(removal.vector))
    walk = ProjectedWalk(model, base, removal.vector, removal.control, data, retained, np.unique(data.train_y[request.samples]),
                         segment, seed=seed)
    evaluations = 0

    def holds(fraction):
        """Guards and evidence at ``fraction`` of the current segment: (guarded, p-value or None)."""
        nonlocal evaluations
        evaluations += 1
        weights, control_weights = walk.within(fraction)
        load_flat_params(model, weights)
        if not all(accuracy(model, data.train_x[g], data.train_y[g]) >= floor for g, floor in zip(guards, floors)):
            return False, None
        return True, evidence.p_value(weights, control_weights)

    chosen, last_p, stop = (np.asarray(base, np.float32), 0.0), None, "segments"
    while walk.walked < SEGMENTS:
        walk.project()
        guarded, p_value = holds(1.0)
        if guarded and p_value < EVIDENCE_P:
            walk.advance()
            chosen, last_p = (walk.start, walk.scale()), p_value
            continue
        stop = "evidence" if guarded else "guard"
        if not guarded:  # the guard fails within this segment: the furthest point before it that keeps both
            low, high = 0.0, 1.0
            for _ in range(bisections):
                middle = (low + high) / 2
                ok, p_middle = holds(middle)
                if ok and p_middle < EVIDENCE_P:
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
        "threshold": EVIDENCE_P, "p_value": last_p, "forget_samples": int(request.samples.size),
        "control_samples": int(removal.control_samples.size), "segment": segment, "segments_kept": scale / segment,
        "projections": walk.bases, "stopped_by": stop,
    }
    rule = ("samples: the projected removal, as far as the forget set keeps losing more than a same-label control "
            f"(Mann-Whitney p < {EVIDENCE_P}) and the retained guards hold")
    reached = stop == "evidence"  # a guard or the segment limit stopped it while the samples still lost more: not reached
    return ScaleChoice(float(scale), reached, evaluations, time.perf_counter() - started, rule,
                       weights=np.asarray(weights, np.float32), evidence=report)


class Evidence:
    """The sample rule's test: per-sample loss rises of the forget set against the control's."""

    def __init__(self, model, data, samples, control_samples):
        self.model = model
        self.forget = data.train_x[samples], data.train_y[samples]
        self.control = data.train_x[control_samples], data.train_y[control_samples]
        self.forget_before = per_sample_stats(model, *self.forget)[1]
        self.control_before = per_sample_stats(model, *self.control)[1]

    def p_value(self, weights, control_weights) -> float:
        from scipy.stats import mannwhitneyu

        load_flat_params(self.model, weights)
        forget_rise = per_sample_stats(self.model, *self.forget)[1] - self.forget_before
        load_flat_params(self.model, control_weights)
        control_rise = per_sample_stats(self.model, *self.control)[1] - self.control_before
        return float(mannwhitneyu(forget_rise, control_rise, alternative="greater").pvalue)


def check_fingerprint(store, model):
    expected = (store.config.get("fingerprint") or {}).get("sha256")
    actual = gradstore.model_fingerprint(named_shapes(model))
    if expected is not None and expected != actual["sha256"]:
        raise gradstore.FormatError(
            f"{store.path} was recorded for another model (fingerprint {expected[:12]}..., model {actual['sha256'][:12]}...)"
        )
    if store.num_params != actual["num_params"]:
        raise gradstore.FormatError(f"{store.path} holds {store.num_params} parameters; the model has {actual['num_params']}")


def fine_tune(model, data, excluded, epochs, config, progress=True):
    """The seed's "retrain": a few epochs on the retained data (all but ``excluded``) with a fresh optimizer."""
    keep = np.setdiff1d(np.arange(len(data)), excluded)
    return train(model, data.train_x[keep], data.train_y[keep], epochs, config["batch_size"], config["seed"] + 1,
                 optimizer=config["optimizer"], lr=config.get("lr"), device=next(model.parameters()).device,
                 progress=progress, description="fine-tune")


@dataclass
class ForgetResult:
    model: torch.nn.Module  # the weights after removal (and fine-tune, if asked)
    no_retrain_state: dict  # state_dict after removal, before any fine-tune
    data: object  # the run's DataSplit
    request: Request
    report: dict  # scale, its search, seconds, request sizes
    record: dict  # the chain: root run, base, samples and keys applied so far


def root_run(run_dir):
    """The training run behind a run directory or a forget output."""
    chain = Path(run_dir) / "forget.json"
    return Path(runs.load_json(chain)["root_run"]) if chain.exists() else Path(run_dir)


def forget(run_dir: Union[str, Path], samples: Optional[Sequence[int]] = None, cls: Optional[int] = None,
           scale: Union[float, str] = 1.0, retrain_epochs: int = 0, device=None, progress: bool = True,
           allow_unverified_store: bool = False) -> "ForgetResult":
    """Forget from a run (or a forget output) without touching the store. See the module doc.

    The store must carry the run's identity (``unlearn.identity``): a store of another run is
    refused naming what differs; one recorded before stores carried an identity is refused
    unless ``allow_unverified_store`` (the report then says ``"store_identity": "unverified"``).
    """
    run_dir = Path(run_dir)
    chain = runs.load_json(run_dir / "forget.json") if (run_dir / "forget.json").exists() else None
    root = root_run(run_dir)
    config = runs.load_json(root / "train.json")
    if config["method"] == "none":
        raise ValueError(f"{root} was trained with --method none: it has no recording to forget with")
    device = device or default_device()
    model = runs.load_model(run_dir, config, device)
    data = runs.build_data(config)
    started = time.perf_counter()
    with gradstore.open(root / "store.h5") as store:
        check_fingerprint(store, model)
        verified = check_identity(store, run_identity(config, data, gradstore.model_fingerprint(named_shapes(model))),
                                  allow_unverified_store)
        already = np.asarray(chain["forgotten_samples"] if chain else [], np.int64)
        already_keys = np.asarray(chain["forgotten_keys"] if chain else [], np.int64)
        removal = plan_removal(store, config["method"], data, samples=samples, cls=cls, already=already,
                               already_keys=already_keys, seed=config["seed"])
    request = removal.request
    choice = apply_removal(model, flat_params(model), removal, data, scale, seed=config["seed"])
    removal_seconds = time.perf_counter() - started
    report = {
        "method": config["method"],
        "request": {"class": cls, "num_samples": int(request.samples.size), "num_keys": int(request.keys.size),
                    "skipped_already_forgotten": int(request.skipped_samples.size)},
        "scale": choice.scale,
        "scale_search": {"rule": choice.rule, "reached": choice.reached, "evaluations": choice.evaluations,
                         "seconds": choice.seconds, **({"evidence": choice.evidence} if choice.evidence else {})},
        "removal_norm": float(np.linalg.norm(removal.vector)),
        "store_identity": verified,
        "seconds_no_retrain": removal_seconds,
    }
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


def mark_applied(record: dict, erase: bool = False) -> int:
    """Mark a chain's applied rows forgotten in the root store; with ``erase``, purge them from disk.

    Call it once the forgotten model is safely written: marked rows are refused to every
    later request that does not start from this chain, and erased rows are gone.
    Returns the number of rows marked (or erased).
    """
    with gradstore.open(Path(record["root_run"]) / "store.h5", "r+") as store:
        if not store.finished:
            raise gradstore.BadInputError(f"{store.path}: recording has not finished (finalize never ran)")
        keys = np.asarray(record["forgotten_keys"], np.int64)
        live = keys[store.state[keys] == gradstore.RowState.LIVE]
        if live.size:
            store.mark_forgotten(live)
        return store.purge() if erase else int(live.size)
