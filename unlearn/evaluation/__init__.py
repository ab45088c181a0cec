"""Evaluation: accuracy, membership inference, attack success, and every metric of a request at once."""

from .attack import backdoor_metrics
from .metrics import EVAL_BATCH, accuracy, per_sample_stats, predict
from .mia import MIA_DRAWS, MIA_GRID, MIA_MEMBERS, MIA_METHOD, mia_efficacy, mia_from_confidences
from .report import evaluate

__all__ = ["EVAL_BATCH", "MIA_DRAWS", "MIA_GRID", "MIA_MEMBERS", "MIA_METHOD", "accuracy", "backdoor_metrics", "evaluate",
           "mia_efficacy", "mia_from_confidences", "per_sample_stats", "predict"]
