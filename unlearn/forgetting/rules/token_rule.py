"""The token rule ("tokens"): for a causal language model, find the tokens of the request's windows that their
rows taught, and only those, then make the model stop predicting them. What a canary (a secret the model can
recite) needs, where the rows as recorded remove too little and larger multiples of them wreck the model
(docs/RESULTS.md, "Language model: canaries"; docs/DESIGN.md, "Memorised data")."""

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import numpy as np
import torch

import gradstore

from ...errors import RequestError
from ...params import flat_params, parameters_named
from .registry import RuleInput, Step, register_rule
from .sample_rule import nothing


@register_rule("tokens")
@dataclass(frozen=True)
class TokenRule:
    """Sample requests on a causal language model (token windows in, next-token logits [batch, T, vocab] out).

    1. Attribution, from the store: every token's next-token loss is measured at the base weights and with
       ``attribution_scale`` times rows removed: the request's windows with the request's rows, and a control
       of as many retained windows (64 at least, ``control`` at most) with the control's own rows (the
       removal's control where it has one). A request token is attributed when its loss rises by more than the
       control tokens' ``attribution_quantile`` rise (removing windows' rows always raises their own loss a
       little: these rise more than 95% of that) and the model predicts it better than typical (its loss below
       the entropy of the model's prediction at its position: what a model recites, not what it guesses).
    2. Evidence: the request's windows' attributed shares must exceed the control windows' (permutation test
       over windows, p < ``evidence_p`` against ``control_draws`` draws), and the request's share must be at
       least ``min_excess`` times the control's. A random request is exchangeable with the control: step 0
       but for a false positive at rate ``evidence_p``.
    3. The walk: ``max_steps`` steps of length ``step_share`` times the weights' norm, each along the gradient of
       the attributed tokens' loss (mean per window, then over ``batch`` windows), projected off the gradient
       of ``retained_batch`` retained windows' loss where they conflict. With ``repair`` > 0, each step also
       descends that retained batch's loss by ``repair`` times the step's length: a fine-tune on retained data
       interleaved with the walk (the "tokens-repair" rule, reported apart from "tokens"). It may restore what
       retained text also teaches, attributed or not (it is not projected off the attributed tokens' gradient:
       measured both ways in docs/DESIGN.md). Its batches are drawn from retained windows outside the guard's,
       which then stays a measure of damage. The walk stops when at most ``stop_share`` of the attributed
       tokens are still predicted better than typical (a token's loss below the entropy of the model's
       prediction at its position): half, about what models retrained without the windows leave (0.49-0.55 on
       the bench lm runs; docs/DESIGN.md).
    4. Guard: the mean loss of ``guard_windows`` retained windows may rise by ``guard_tolerance`` (relative) at
       most; checked every ``check_every`` steps, the walk keeps the last checked weights that held it.
    Training data only (the request's windows and retained ones); nothing about a secret's format. The
    parameters moved are the ones the store indexes (frozen ones too: requires_grad is restored after).
    Memory: a step holds ``batch`` windows' logits [batch, T, vocab] several times over; lower ``batch`` for
    a large vocabulary and long windows.
    """

    attribution_scale: float = 3.0
    attribution_quantile: float = 0.95
    control: int = 256
    evidence_p: float = 0.001
    control_draws: int = 2000
    min_excess: float = 3.0
    step_share: float = 1.7e-4
    max_steps: int = 80
    batch: int = 64
    retained_batch: int = 32
    stop_share: float = 0.5
    repair: float = 0.0
    check_every: int = 5
    guard_windows: int = 256
    guard_tolerance: float = 0.10
    kinds: ClassVar[tuple[str, ...]] = ("samples",)

    def __call__(self, given: RuleInput) -> Step:
        base = given.base
        if not 0.0 <= self.stop_share < 1.0:
            raise RequestError(f"step rule '{self.label}': stop_share={self.stop_share} must lie in [0, 1). "
                               "Nothing was changed")
        if not (math.isfinite(self.repair) and self.repair >= 0.0):
            raise RequestError(f"step rule '{self.label}': repair={self.repair} must be a finite number, 0 or more. "
                               "Nothing was changed")
        if 1.0 / (1 + self.control_draws) >= self.evidence_p:
            raise RequestError(f"step rule '{self.label}': control_draws={self.control_draws} cannot give a p-value below "
                               f"evidence_p={self.evidence_p}: give at least {int(np.ceil(1 / self.evidence_p))}")
        self._require_data(given)
        samples = given.removal.request.samples
        if samples.size == 0 or not np.any(given.rows):
            return nothing(f"{self.label}: empty request: nothing to remove", base)
        return self._in_eval(given, samples, self._walk)

    def attributed_tokens(self, given: RuleInput) -> Optional[np.ndarray]:
        """Step 1 alone: bool [request windows, T - 1], the next tokens the walk would raise (None for an empty
        request, or where no retained window has a live row to compare with). What benchmarks compare other
        models on; it changes nothing."""
        self._require_data(given)
        samples = given.removal.request.samples
        if samples.size == 0:
            return None

        def attribution(given: RuleInput, windows: np.ndarray, samples: np.ndarray, device: torch.device) -> Any:
            found = self._attribution(given, windows, samples, device, np.random.default_rng([given.seed, 24]))
            return None if found is None else found.attributed.cpu().numpy()
        return self._in_eval(given, samples, attribution)

    def _require_data(self, given: RuleInput) -> None:
        if given.data is None or not hasattr(given.data, "train_x"):
            raise RequestError(f"step rule '{self.label}' reads the request's windows through the model: it needs the "
                               "training data (forget_keys(..., dataset=...), or a run folder). Nothing was changed")

    def _in_eval(self, given: RuleInput, samples: np.ndarray, then: Any) -> Any:
        """``then(given, windows, samples, device)`` with the model checked and in eval mode (restored after)."""
        model = given.model
        windows = _token_windows(given.data.train_x)
        device = next(model.parameters()).device
        modes = {module: module.training for module in model.modules()}
        model.eval()
        try:
            _check_causal_lm(model, windows[samples[:1]], device)
            return then(given, windows, samples, device)
        finally:
            for module, mode in modes.items():
                module.training = mode

    @property
    def label(self) -> str:
        """The name the rule's messages use: "tokens", or "tokens-repair" for a rule that repairs."""
        return "tokens-repair" if self.repair else "tokens"

    def _walk(self, given: RuleInput, windows: np.ndarray, samples: np.ndarray, device: torch.device) -> Step:
        model, base = given.model, given.base
        rng = np.random.default_rng([given.seed, 24])
        found = self._attribution(given, windows, samples, device, rng)
        if found is None:
            return nothing(f"{self.label}: no retained window with a live row to compare with: nothing removed", base)
        retained, guard, attributed, report, p_value = (found.retained, found.guard, found.attributed, found.report,
                                                        found.p_value)
        share, control_share = report["attribution"]["share"], report["attribution"]["control_share"]
        request_ids = torch.as_tensor(windows[samples], device=device)
        guard_ids = torch.as_tensor(windows[guard], device=device)
        # without a repair the retained batches only veto directions; with one they are trained on, so not the guard's
        spare_pool = np.setdiff1d(retained, guard) if self.repair else retained
        if spare_pool.size == 0:
            spare_pool = retained
        if p_value >= self.evidence_p or share < self.min_excess * control_share or not attributed.any():
            why = (f"p = {p_value:.3g}, not below {self.evidence_p}" if p_value >= self.evidence_p else
                   f"{share:.3%} of the request's tokens attributed, under {self.min_excess:g}x the control's "
                   f"{control_share:.3%}")
            step = nothing(f"{self.label}: the rows single out none of the request's tokens ({why}): nothing removed",
                           base)
            step.report = report
            return step

        params = parameters_named(model, given.names)
        frozen = [p for p in params if not p.requires_grad]
        for p in frozen:  # a model frozen for inference: its recorded parameters are what the rule moves
            p.requires_grad_(True)
        try:
            return self._steps(given, params, windows, samples, spare_pool, request_ids, guard_ids, attributed, rng,
                               report, p_value, device)
        finally:
            given.load(base)
            for p in frozen:
                p.requires_grad_(False)

    def _attribution(self, given: RuleInput, windows: np.ndarray, samples: np.ndarray, device: torch.device,
                     rng: np.random.Generator) -> Optional["_Attribution"]:
        """Step 1 and the evidence of step 2 (the control, the guard's windows and the permutation test drawn from
        ``rng`` in that order); None where no retained window has a live row."""
        model, base = given.model, given.base
        retained = given.retained()
        control, control_rows = self._control(given, retained, samples.size, rng)
        if control.size == 0:
            return None
        guard = np.sort(rng.choice(retained, min(self.guard_windows, retained.size), replace=False))
        request_ids = torch.as_tensor(windows[samples], device=device)
        control_ids = torch.as_tensor(windows[control], device=device)

        scale = np.float32(self.attribution_scale)
        request_before, control_before = token_losses(model, request_ids), token_losses(model, control_ids)
        request_predicted = predicted_better_than_typical(model, request_ids)
        control_predicted = predicted_better_than_typical(model, control_ids)
        try:
            given.load(base + scale * given.rows)
            request_rise = token_losses(model, request_ids) - request_before
            given.load(base + scale * control_rows)  # the control's own rows: what any windows' rows do to them
            control_rise = token_losses(model, control_ids) - control_before
        finally:
            given.load(base)
        threshold = float(torch.quantile(control_rise.flatten().double(), self.attribution_quantile))
        attributed = (request_rise > threshold) & request_predicted
        control_attributed = (control_rise > threshold) & control_predicted
        share, control_share = float(attributed.float().mean()), float(control_attributed.float().mean())
        p_value = _permutation_p(attributed.float().mean(1).double().cpu().numpy(),
                                 control_attributed.float().mean(1).double().cpu().numpy(), self.control_draws, rng)
        report: dict[str, Any] = {
            "attribution": {"scale": self.attribution_scale, "quantile": self.attribution_quantile,
                            "threshold": threshold, "tokens": int(attributed.sum()), "share": share,
                            "control_share": control_share, "windows": int(samples.size),
                            "control_windows": int(control.size)},
            "evidence": {"p_value": p_value, "evidence_p": self.evidence_p, "min_excess": self.min_excess},
            "repair": self.repair}
        return _Attribution(retained, guard, attributed, report, p_value)

    def _control(self, given: RuleInput, retained: np.ndarray, size: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Retained windows with live rows, as many as the request (``control`` at most, 64 at least where there
        are), and the sum of their own rows: the removal's own control where the request has one."""
        removal = given.removal
        if removal.control_samples is not None and removal.control is not None and removal.control_samples.size:
            return np.asarray(removal.control_samples), removal.control
        store = given.store
        if store is None:
            raise RequestError("step rule 'tokens' compares the request's windows with retained windows whose own "
                               "rows are removed: it needs the open store (forget_keys and forget() give it). "
                               "Nothing was changed")
        if store.config.get("key_kind", "sample") != "sample":
            raise RequestError("step rule 'tokens' reads one row per training window: this store's keys are steps, "
                               "not samples. Nothing was changed")
        live = retained[store.state[retained] == gradstore.RowState.LIVE]
        count = min(live.size, self.control, max(size, 64))
        control = np.sort(rng.choice(live, count, replace=False)) if count else np.zeros(0, np.int64)
        rows = np.zeros(store.num_params, np.float32)
        if control.size:
            store.scatter_add(rows, control, 1.0)
        return control, rows

    def _steps(self, given: RuleInput, params: list, windows: np.ndarray, samples: np.ndarray, retained: np.ndarray,
               request_ids: torch.Tensor, guard_ids: torch.Tensor, attributed: torch.Tensor,
               rng: np.random.Generator, report: dict, p_value: float, device: torch.device) -> Step:
        """The walk: projected steps raising the attributed tokens' loss, checked against the guard (``retained``:
        the windows its retained batches are drawn from)."""
        model, base = given.model, given.base
        guard_before = float(token_losses(model, guard_ids).mean())
        ceiling = guard_before * (1 + self.guard_tolerance)
        length = self.step_share * float(np.linalg.norm(base))
        kept, kept_step, active_share, guard_after, stopped = np.asarray(base), 0, 1.0, guard_before, "max_steps"
        checks: list[list[Optional[float]]] = []  # [step, guard loss, share still predicted (None: guard failed)]
        norms: list[float] = []
        for taken in range(1, self.max_steps + 1):
            pick = np.sort(rng.choice(samples.size, min(self.batch, samples.size), replace=False))
            forget = _gradient(params, lambda: _attributed_loss(model, request_ids[pick], attributed[pick]))
            if forget is None:  # no attributed token in this batch's windows
                continue
            spare_ids = torch.as_tensor(windows[rng.choice(retained, min(self.retained_batch, retained.size),
                                                           replace=False)], device=device)
            spare = _gradient(params, lambda: token_losses(model, spare_ids, grad=True).mean())
            assert spare is not None
            overlap = float(forget @ spare)
            if overlap > 0:  # raising the request's loss would raise the retained loss too: leave that part out
                forget = forget - overlap / float(spare @ spare) * spare
            change = forget * (length / float(forget.norm()))
            spare_norm = float(spare.norm())
            if self.repair and spare_norm > 0:  # the retained batch's loss, descended: "tokens-repair"'s fine-tune
                change = change - spare * (self.repair * length / spare_norm)  # not projected: docs/DESIGN.md
            norms.append(float(change.norm()))
            _move(params, change)
            if taken % self.check_every and taken != self.max_steps:
                continue
            guard_after = float(token_losses(model, guard_ids).mean())
            if guard_after > ceiling:
                checks.append([taken, guard_after, None])
                stopped = "guard"
                break
            kept, kept_step = flat_params(model, given.names), taken
            active_share = _active_share(model, request_ids, attributed)
            checks.append([taken, guard_after, active_share])
            if active_share <= self.stop_share:
                stopped = "attributed tokens predicted no better than typical"
                break
        report.update({"steps": kept_step, "step_length": length,
                       "step_norm_mean": float(np.mean(norms)) if norms else 0.0, "stopped_by": stopped,
                       "still_predicted_share": active_share, "guard_before": guard_before,
                       "guard_tolerance": self.guard_tolerance, "guard_last": guard_after, "checks": checks})
        if kept_step == 0:
            step = nothing(f"{self.label}: the retained guard rose by more than {self.guard_tolerance:.0%} within "
                           f"{self.check_every} steps: nothing removed", base)
            step.report = report
            return step
        repaired = f", the retained loss descended at {self.repair:g}x the step" if self.repair else ""
        rule = (f"{self.label}: {int(attributed.sum())} tokens the rows single out (p = {p_value:.3g}) raised for "
                f"{kept_step} steps{repaired}, until {stopped}")
        return Step(kept - base, report, evaluations=kept_step, rule=rule, reached=stopped != "guard"
                    and stopped != "max_steps", weights=kept)


@dataclass(frozen=True)
class _Attribution:
    retained: np.ndarray  # the retained windows
    guard: np.ndarray  # the guard's windows among them
    attributed: torch.Tensor  # bool [request windows, T - 1]
    report: dict
    p_value: float


register_rule("tokens-repair")(TokenRule(repair=1.0, max_steps=200))


def token_losses(model: torch.nn.Module, ids: torch.Tensor, grad: bool = False, batch: int = 16) -> torch.Tensor:
    """Next-token cross-entropy of every position: float32 [windows, T - 1]."""
    if grad:
        return _next_token_loss(_logits(model(ids)), ids)
    with torch.no_grad():
        return torch.cat([_next_token_loss(_logits(model(ids[i:i + batch])), ids[i:i + batch])
                          for i in range(0, len(ids), batch)])


def _next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")


def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _still_predicted(logits: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [n, T-1], whether each next token is predicted better than typical: loss below the entropy)."""
    loss = _next_token_loss(logits, ids)
    log_p = torch.log_softmax(logits[:, :-1].detach().float(), -1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return loss, loss.detach() < entropy


def _attributed_loss(model: torch.nn.Module, ids: torch.Tensor, attributed: torch.Tensor) -> Optional[torch.Tensor]:
    """Mean loss of the attributed tokens, each window with attributed tokens weighing the same."""
    loss = _next_token_loss(_logits(model(ids)), ids)
    weights = attributed.float()
    windows = weights.sum(1, keepdim=True)
    if not bool((windows > 0).any()):
        return None
    return (loss * weights / windows.clamp(min=1)).sum() / (windows > 0).sum()


def predicted_better_than_typical(model: torch.nn.Module, ids: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Whether the model predicts each next token better than typical: its loss below the entropy of the model's
    prediction at its position (bool [n, T - 1])."""
    with torch.no_grad():
        return torch.cat([_still_predicted(_logits(model(ids[i:i + batch])), ids[i:i + batch])[1]
                          for i in range(0, len(ids), batch)])


def _active_share(model: torch.nn.Module, ids: torch.Tensor, attributed: torch.Tensor) -> float:
    """Share of the attributed tokens the model still predicts better than typical."""
    return float((predicted_better_than_typical(model, ids) & attributed).sum() / attributed.sum().clamp(min=1))


def _gradient(params: list, loss_of) -> Optional[torch.Tensor]:
    """The flat gradient of ``loss_of()`` over ``params`` (None when it returns None); ``.grad`` is left alone."""
    with torch.enable_grad():
        loss = loss_of()
        if loss is None:
            return None
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def _move(params: list, change: torch.Tensor) -> None:
    with torch.no_grad():
        offset = 0
        for p in params:
            p.add_(change[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def _permutation_p(request: np.ndarray, control: np.ndarray, draws: int, rng: np.random.Generator) -> float:
    """One-sided permutation p-value of the request's mean above the control's (windows exchangeable)."""
    pooled = np.concatenate([request, control])
    observed = request.mean() - control.mean()
    count = 0
    for _ in range(draws):
        order = rng.permutation(pooled.size)
        a, b = pooled[order[:request.size]], pooled[order[request.size:]]
        count += a.mean() - b.mean() >= observed
    return float((1 + count) / (1 + draws))


def _token_windows(inputs: Any) -> np.ndarray:
    array = np.asarray(inputs)
    if array.ndim != 2 or array.dtype.kind not in "iu":
        raise RequestError(f"step rule 'tokens' reads token windows (integer [samples, T]); the training inputs are "
                           f"{array.dtype} {array.shape}. Nothing was changed")
    return array.astype(np.int64, copy=False)


def _check_causal_lm(model: torch.nn.Module, example: np.ndarray, device: torch.device) -> None:
    """RequestError unless the model maps token windows [batch, T] to next-token logits [batch, T, vocab]."""
    with torch.no_grad():
        out = model(torch.as_tensor(example, device=device))
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != example.shape:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(out).__name__
        raise RequestError(f"step rule 'tokens' serves causal language models, whose output is next-token logits "
                           f"[batch, T, vocab] for windows [batch, T] = {tuple(example.shape)}; this model returns "
                           f"{shape}. Nothing was changed")
