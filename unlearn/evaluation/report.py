"""Every metric of a forget request on one model: the seed's forgotten/rest cells, UA/RA/TA, MIA, the backdoor."""

from typing import Any, Optional

import numpy as np
import torch

from .attack import backdoor_metrics
from .metrics import accuracy, per_sample_stats
from .mia import MIA_METHOD, mia_efficacy


def evaluate(model: torch.nn.Module, data: Any, forget_keys: np.ndarray, forget_class: Optional[int] = None,
             excluded: Optional[np.ndarray] = None, retained_limit: Optional[int] = None, seed: int = 0) -> dict[str, Any]:
    """Every metric of a forget request on one model.

    ``excluded``: every training sample not retained (default: the forget set); a chain
    of requests excludes what earlier requests forgot too.

    forgotten_acc / rest_acc: the seed's cells, on the test set (class requests: the
    class / every other class; sample requests: the forget samples / the test set).
    ua / ra / ta: accuracy on the forget set, the retained training set, the test set.
    A poisoned split adds asr, poisoned_label_acc and target_class_acc (``backdoor_metrics``).
    """
    retained = np.setdiff1d(np.arange(len(data)), forget_keys if excluded is None else excluded)
    forget_x, forget_y = data.train_x[forget_keys], data.train_y[forget_keys]
    mia, mia_std = mia_efficacy(model, data.train_x[retained], data.train_y[retained], data.test_x, data.test_y,
                                forget_x, forget_y, seed=seed)  # members drawn from every retained sample
    if retained_limit is not None and retained.size > retained_limit:
        retained = np.sort(np.random.default_rng(seed).choice(retained, retained_limit, replace=False))
    ua = accuracy(model, forget_x, forget_y)
    ta = accuracy(model, data.test_x, data.test_y)
    if forget_class is not None:
        in_class = data.test_y == forget_class
        forgotten_acc = accuracy(model, data.test_x[in_class], data.test_y[in_class])
        rest_acc = accuracy(model, data.test_x[~in_class], data.test_y[~in_class])
    else:
        forgotten_acc, rest_acc = ua, ta
    backdoor = backdoor_metrics(model, data) if getattr(data, "poison", None) is not None else {}
    return {
        **backdoor,
        "forgotten_acc": forgotten_acc,
        "rest_acc": rest_acc,
        "ua": ua,
        "ra": accuracy(model, data.train_x[retained], data.train_y[retained]),
        "ta": ta,
        "mia_efficacy": mia,
        "mia_efficacy_std": mia_std,
        "mia_method": MIA_METHOD,
        "forget_loss": float(per_sample_stats(model, forget_x, forget_y)[1].mean()) if len(forget_keys) else None,
    }
