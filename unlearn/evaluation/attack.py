"""Attack success: what a backdoor still does after a request (``data.poison``: its trigger, target and keys)."""

from typing import Any, Optional

import torch

from .metrics import accuracy, predict


def backdoor_metrics(model: torch.nn.Module, data: Any) -> dict[str, Optional[float]]:
    """The backdoor's three figures on ``data`` (a poisoned split), retraining from scratch being the target.

    asr: share of triggered test images of the other classes predicted as the target;
    poisoned_label_acc: accuracy of the poisoned training samples on their poisoned label;
    target_class_acc: test accuracy on the target class (the trigger gone, not the class silenced).
    """
    poison = data.poison
    others = data.test_y != poison.target
    triggered = poison.trigger.apply(data.test_x[others])
    asr = float((predict(model, triggered).argmax(1).numpy() == poison.target).mean()) if others.any() else None
    keys = poison.keys
    label_acc = accuracy(model, data.train_x[keys], data.train_y[keys]) if keys.size else None
    in_target = ~others
    target_acc = accuracy(model, data.test_x[in_target], data.test_y[in_target]) if in_target.any() else None
    return {"asr": asr, "poisoned_label_acc": label_acc, "target_class_acc": target_acc}
