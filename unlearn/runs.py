"""Run directories: what `train` writes and `forget` reads.

RUN_DIR/model.pt      the model's state_dict (loaded with weights_only=True)
RUN_DIR/store.h5      the recording (absent for --method none)
RUN_DIR/train.json    settings and results; enough to rebuild the data and the model
RUN_DIR/started.json  the options, written when training starts (a run without train.json was interrupted)
RUN_DIR/checkpoint.pt while training with --checkpoint-every: the last checkpoint (weights_only)
RUN_DIR/forget.json   only in a forget output: the request chain (see unlearn.forget)
"""

import json
import os
from pathlib import Path

import numpy as np
import torch

from . import data as datasets
from .models import build_model

STARTED = "started.json"
CHECKPOINT = "checkpoint.pt"


def save_json(path, payload):
    """Written beside and renamed: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    os.replace(tmp, path)


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_json(path):
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {path.parent} a run directory written by `unlearn train`?")
    return json.loads(path.read_text())


def build_data(config):
    """The training/test split a run trained on: its keys index this training set."""
    split = datasets.load_dataset(config["dataset"], config.get("data_dir"))
    if config.get("keep_first"):
        cls, count = config["keep_first"]
        split = datasets.keep_first(split, cls, count)
    return _apply_exclusions(split, config)


def _apply_exclusions(split, config):
    if config.get("exclude_class") is not None:
        split = datasets.exclude(split, cls=config["exclude_class"])
    if config.get("exclude_samples") is not None:
        split = datasets.exclude(split, samples=np.asarray(config["exclude_samples"], np.int64))
    return split


def load_model(run_dir, config, device="cpu"):
    model = build_model(config["model"], config["in_channels"], config["num_classes"], seed=config["seed"],
                        groups=config.get("groups", 1))
    state = torch.load(Path(run_dir) / "model.pt", map_location=device, weights_only=True)
    model.load_state_dict(state)
    return model.to(device).eval()


def save_model(run_dir, model):
    torch.save(model.state_dict(), Path(run_dir) / "model.pt")
