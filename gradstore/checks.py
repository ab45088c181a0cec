"""Argument checks shared by the entry points: each refusal is a BadInputError naming the argument."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import BadInputError

ZSTD_LEVELS = (1, 22)  # zstd's levels: 1 (the fastest, as good as 3 on gradients) to 22
LABELS = (-1, 2**31 - 1)  # a class label, or -1: unknown


def check_number(name: str, value: object) -> float:
    """``value`` as a finite float; BadInputError naming ``name`` otherwise (strings, None, NaN, Inf)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise BadInputError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    if not math.isfinite(float(value)):
        raise BadInputError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_integer(name: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in [low, high]; BadInputError naming ``name`` otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise BadInputError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    if not math.isfinite(float(value)) or int(value) != value:
        raise BadInputError(f"{name} must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise BadInputError(f"{name} must be in [{low}, {high}], got {int(value)}")
    return int(value)


def check_labels(labels: Any, count: int, name: str = "labels") -> np.ndarray:
    """``count`` integer labels as int64, each a class (0 .. 2**31-1) or -1 (unknown)."""
    array = np.asarray(labels)
    if array.shape != (count,) or (array.size and array.dtype.kind not in "iu"):
        raise BadInputError(f"{name} must be {count} integers, got dtype {array.dtype} shape {array.shape}")
    if array.size and (int(array.min()) < LABELS[0] or int(array.max()) > LABELS[1]):
        bad = array[(array < LABELS[0]) | (array > LABELS[1])]
        raise BadInputError(f"{name} must be class labels in [0, {LABELS[1]}] or -1 (unknown), got {bad[:10].tolist()}")
    return array.astype(np.int64)
