"""The removal path of a sample request: the request's rows, minus what would move the retained data's outputs.

A sample request's rows carry two things: what the samples alone taught (a backdoor's trigger,
a mislabelled sample's label) and their share of what every sample of their classes teaches.
Removing the second part is harmful: with the non-negative features of a ReLU network, taking
back 100 poisoned samples' pushes toward their label lowers that label's logit on every input
and silences the class (docs/RESULTS.md). So each step of the removal is projected off the
span of the gradients of the retained data's mean logits: per class y, in GROUPS random groups
of retained samples of y, the gradient of the mean of each logit k. To first order the step
then leaves every such mean output unchanged; what remains moves only outputs that those
averages do not see. The span is recomputed at each segment of the path, because the
projection holds to first order only (one projected step of the whole length brought back half
of the backdoor's removal as damage on MNIST).
"""

from typing import Any, Optional

import numpy as np
import torch

from ..errors import UnlearnError
from ..params import load_flat_params

SAMPLES_PER_CLASS = 300  # retained samples per class behind the directions
GROUPS = 2  # random groups per class: classes * GROUPS * logits directions
MAX_LOGITS = 16  # above this many classes only the request's labels' logits are held (the basis stays small)


def retained_output_basis(model: torch.nn.Module, weights: np.ndarray, data: Any, retained: np.ndarray, labels: np.ndarray,
                          rng: np.random.Generator) -> np.ndarray:
    """Orthonormal float32 [M, d]: the gradients, at ``weights``, of the retained data's mean logits per class and group.

    ``labels``: the request's labels; with more than MAX_LOGITS classes only their logits are held.
    """
    load_flat_params(model, weights)
    model.eval()
    params = list(model.parameters())
    logits = range(data.num_classes) if data.num_classes <= MAX_LOGITS else sorted(set(int(y) for y in labels))
    device = params[0].device
    directions = []
    for cls in range(data.num_classes):
        pool = retained[data.train_y[retained] == cls]
        if pool.size == 0:
            continue
        pick = rng.choice(pool, min(SAMPLES_PER_CLASS, pool.size), replace=False)
        for group in np.array_split(pick, min(GROUPS, pick.size)):
            mean = model(torch.as_tensor(data.train_x[group]).to(device)).float().mean(0)
            for position, k in enumerate(logits):
                grads = torch.autograd.grad(mean[k], params, retain_graph=position < len(logits) - 1, allow_unused=True)
                directions.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                             for g, p in zip(grads, params)]).detach().cpu().numpy())
    if not directions:
        return np.zeros((weights.size, 0), np.float32)
    basis, _ = np.linalg.qr(np.stack(directions, 1).astype(np.float64))
    return basis.astype(np.float32)


def project_off(vector: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """``vector`` minus its component in span(basis) (orthonormal columns)."""
    return vector - basis @ (basis.T @ vector)


class ProjectedWalk:
    """Walks the projected removal of the request's rows in segments of ``segment`` (in units of the rows'
    scale), carrying a control's rows along with the same projections (a control of retained samples of the
    same labels: what a random set's removal does). Each segment is projected at its start.
    """

    def __init__(self, model: torch.nn.Module, base: np.ndarray, removal: np.ndarray, control: np.ndarray, data: Any,
                 retained: np.ndarray, labels: np.ndarray, segment: float, seed: int = 0):
        self.model, self.data, self.retained, self.labels = model, data, retained, labels
        self.removal, self.control, self.segment = removal, control, float(segment)
        self.rng = np.random.default_rng([seed, 5])
        self.start = np.asarray(base, np.float32)  # the request's path, at the current segment's start
        self.control_start = np.asarray(base, np.float32)  # the control's
        self.walked = 0  # segments completed
        self.bases = 0
        self.direction: Optional[np.ndarray] = None
        self.control_direction: Optional[np.ndarray] = None

    def project(self) -> None:
        """Project both removals at the current segment's start."""
        basis = retained_output_basis(self.model, self.start, self.data, self.retained, self.labels, self.rng)
        self.bases += 1
        self.direction = project_off(self.removal, basis).astype(np.float32)
        self.control_direction = project_off(self.control, basis).astype(np.float32)

    def within(self, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """(request weights, control weights) at ``fraction`` (0..1) of the current segment."""
        if self.direction is None or self.control_direction is None:
            raise UnlearnError("ProjectedWalk.within before project(): the segment has no direction yet")
        step = np.float32(fraction * self.segment)
        return self.start + step * self.direction, self.control_start + step * self.control_direction

    def advance(self) -> None:
        self.start, self.control_start = self.within(1.0)
        self.walked += 1

    def scale(self, fraction: float = 0.0) -> float:
        """The rows' scale removed at ``fraction`` of the current segment."""
        return (self.walked + fraction) * self.segment
