"""Per-sample predictions and accuracy: what every other metric reads."""

from typing import Any

import numpy as np
import torch

ArrayLike = Any  # numpy arrays or torch tensors of samples

EVAL_BATCH = 1024


@torch.no_grad()
def predict(model: torch.nn.Module, x: ArrayLike, batch: int = EVAL_BATCH) -> torch.Tensor:
    """Logits of the model on x, as a float32 CPU tensor [N, classes], in batches."""
    device = next(model.parameters()).device
    model.eval()
    outputs = [model(torch.as_tensor(x[i : i + batch]).to(device)).float().cpu() for i in range(0, len(x), batch)]
    return torch.cat(outputs) if outputs else torch.empty(0)


def accuracy(model: torch.nn.Module, x: ArrayLike, y: np.ndarray) -> float:
    """Share of ``x`` predicted as ``y``; NaN for no samples (a cell with nothing in it, not a zero)."""
    if len(y) == 0:
        return float("nan")
    return float((predict(model, x).argmax(1).numpy() == y).mean())


def per_sample_stats(model: torch.nn.Module, x: ArrayLike,
                     y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(correct bool [N], loss [N], true-label confidence [N])."""
    if len(y) == 0:
        return np.zeros(0, np.bool_), np.zeros(0, np.float32), np.zeros(0, np.float32)
    logits = predict(model, x)
    target = torch.as_tensor(y)
    loss = torch.nn.functional.cross_entropy(logits, target, reduction="none")
    confidence = torch.softmax(logits, 1).gather(1, target[:, None])[:, 0]
    return (logits.argmax(1) == target).numpy(), loss.numpy(), confidence.numpy()
