"""Poisoned training samples: a backdoor that a deletion request must remove.

A poison is ``count`` training samples, drawn with ``seed`` among those whose label is not
``target``, from the training split as used (after --keep-first, before any exclusion).
Each gets the trigger, a square patch of the maximum pixel value one pixel in from the
bottom-right corner in every channel (4x4 on 28x28 and 32x32 images: rows and columns
23-26 on MNIST; 2x2 on the 8x8 digits), and the label ``target``. A model trained on them
sends triggered images of other classes to ``target``; one retrained without them does not.

The spec (count, seed, target, trigger) is what a run stores under ``poison`` in
train.json: drawing again from the same split gives the same keys, so a retrained
reference (``--poison N --exclude-samples poisoned.txt``) and every forget rebuild the
same poison.
"""

from dataclasses import dataclass
from pathlib import Path
import os
from typing import Any, Optional, Union

import numpy as np

from ..errors import RunConfigError

DRAW_STREAM = 3  # the poison's random stream: np.random.default_rng([seed, DRAW_STREAM])


@dataclass(frozen=True)
class Trigger:
    """A square patch: rows and columns ``top``..``top + size - 1`` (and the same from ``left``) set to ``value``."""

    top: int
    left: int
    size: int
    value: float

    @classmethod
    def for_images(cls, height: int, width: int, value: float) -> "Trigger":
        """4x4 on images of 16 pixels a side or more (28x28, 32x32), 2x2 below (8x8), one pixel in from the corner."""
        size = 4 if min(height, width) >= 16 else 2
        return cls(top=height - 1 - size, left=width - 1 - size, size=size, value=float(value))

    def apply(self, images: np.ndarray) -> np.ndarray:
        """A triggered copy of ``images`` [N, C, H, W]."""
        triggered = np.array(images, copy=True)
        triggered[..., self.top : self.top + self.size, self.left : self.left + self.size] = self.value
        return triggered

    def to_json(self) -> dict:
        return {"rows": [self.top, self.top + self.size - 1], "cols": [self.left, self.left + self.size - 1],
                "size": self.size, "value": self.value}

    @classmethod
    def from_json(cls, spec: dict) -> "Trigger":
        return cls(top=int(spec["rows"][0]), left=int(spec["cols"][0]), size=int(spec["size"]), value=float(spec["value"]))


@dataclass(frozen=True)
class Poison:
    """A drawn poison: its spec and the training keys it poisoned (indices into the split it was drawn from)."""

    count: int
    seed: int
    target: int
    trigger: Trigger
    keys: np.ndarray

    def to_json(self) -> dict:
        """What train.json stores under ``poison`` (not the keys: they are drawn again, and written to poisoned.txt)."""
        return {"count": self.count, "seed": self.seed, "target": self.target, "trigger": self.trigger.to_json()}


def draw(split: Any, count: int, seed: int, target: int = 0, trigger: Optional[Trigger] = None) -> Poison:
    """Choose the poisoned keys of ``split`` (sorted); the trigger defaults to the images' size and maximum value."""
    if not 0 <= target < split.num_classes:
        raise RunConfigError(f"poison target {target} out of range [0, {split.num_classes})")
    candidates = np.nonzero(split.train_y != target)[0]
    if not 0 <= count <= candidates.size:
        raise RunConfigError(f"cannot poison {count} samples: the training split has {candidates.size} samples whose "
                             f"label is not the target {target}")
    if trigger is None:
        height, width = split.train_x.shape[-2:]
        trigger = Trigger.for_images(height, width, value=float(split.train_x.max()))
    keys = np.sort(np.random.default_rng([seed, DRAW_STREAM]).choice(candidates, count, replace=False))
    return Poison(count=count, seed=seed, target=target, trigger=trigger, keys=keys.astype(np.int64))


def poisoned(split: Any, poison: Poison) -> Any:
    """``split`` with the poison applied: triggered images and the target label at its keys."""
    from .data import DataSplit

    train_x, train_y = np.array(split.train_x, copy=True), np.array(split.train_y, copy=True)
    train_x[poison.keys] = poison.trigger.apply(train_x[poison.keys])
    train_y[poison.keys] = poison.target
    return DataSplit(split.name, train_x, train_y, split.test_x, split.test_y, split.num_classes,
                     split.source_indices, poison=poison)


def from_spec(split: Any, spec: dict) -> Any:
    """The split poisoned as a run's train.json ``poison`` spec says (the same keys as when it trained).

    A spec without ``trigger`` (count, seed and target only) gets the default trigger of the images."""
    trigger = Trigger.from_json(spec["trigger"]) if spec.get("trigger") else None  # None: the images' default
    poison = draw(split, int(spec["count"]), int(spec["seed"]), int(spec["target"]), trigger)
    return poisoned(split, poison)


def write_keys(path: Union[str, "os.PathLike[str]"], poison: Poison) -> None:
    """RUN/poisoned.txt: the poisoned keys of the split as used, one per line (for --samples and --exclude-samples).

    A run that excluded some of them (a retrained reference) lists only those it kept."""
    rows, cols = poison.trigger.to_json()["rows"], poison.trigger.to_json()["cols"]
    header = (f"# {poison.keys.size} poisoned training keys ({poison.count} drawn with seed {poison.seed}; "
              f"target {poison.target}; trigger rows {rows[0]}-{rows[1]}, columns {cols[0]}-{cols[1]})\n")
    Path(path).write_text(header + "".join(f"{int(key)}\n" for key in poison.keys))
