"""Run directories: what `train` writes and `forget` reads.

RUN_DIR/model.pt      the model's state_dict (loaded with weights_only=True)
RUN_DIR/store.h5      the recording (absent for --method none)
RUN_DIR/train.json    settings and results; enough to rebuild the data and the model
RUN_DIR/started.json  the options, written when training starts (a run without train.json was interrupted)
RUN_DIR/checkpoint.pt while training with --checkpoint-every: the last checkpoint (weights_only)
RUN_DIR/poisoned.txt  only with --poison: the poisoned training keys, one per line (see unlearn.poison)
RUN_DIR/forget.json   only in a forget output: the request chain (see unlearn.forget)
"""

import io
import json
import os
from pathlib import Path

import numpy as np
import torch

from . import data as datasets
from . import poison
from .models import build_model

STARTED = "started.json"
CHECKPOINT = "checkpoint.pt"
POISONED = "poisoned.txt"


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


# The fields each file of a run directory must hold (a file without them is damaged or not ours).
REQUIRED = {
    "train.json": ("dataset", "model", "method", "seed", "in_channels", "num_classes", "batch_size", "optimizer"),
    "forget.json": ("root_run", "forgotten_samples", "forgotten_keys"),
}


def load_json(path):
    """A run directory's JSON file as a dict; ValueError naming the file if it is damaged or lacks fields."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} is not a directory: give a run directory written by `unlearn train`")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {path.parent} a run directory written by `unlearn train`?")
    try:
        payload = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise ValueError(f"{path} is damaged: not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is damaged: not valid JSON ({error})") from None
    if not isinstance(payload, dict):
        raise ValueError(f"{path} is damaged: a JSON {type(payload).__name__}, not an object")
    missing = [key for key in REQUIRED.get(path.name, ()) if key not in payload]
    if missing:
        raise ValueError(f"{path} is damaged or not written by `unlearn`: it lacks {', '.join(missing)}")
    return payload


def build_data(config):
    """The training/test split a run trained on: its keys index this training set."""
    split = datasets.load_dataset(config["dataset"], config.get("data_dir"))
    if config.get("keep_first"):
        cls, count = config["keep_first"]
        split = datasets.keep_first(split, cls, count)
    if config.get("poison"):  # drawn before any exclusion: a retrained reference excludes the same samples
        split = poison.from_spec(split, config["poison"])
    return _apply_exclusions(split, config)


def _apply_exclusions(split, config):
    if config.get("exclude_class") is not None:
        split = datasets.exclude(split, cls=config["exclude_class"])
    if config.get("exclude_samples") is not None:
        split = datasets.exclude(split, samples=np.asarray(config["exclude_samples"], np.int64))
    return split


def load_model(run_dir, config, device="cpu"):
    """The run's model (as its train.json describes) with RUN_DIR/model.pt's weights.

    A missing or unreadable model.pt, or weights of another architecture, are a
    FileNotFoundError / ValueError naming the file and the mismatch.
    """
    model = build_model(config["model"], config["in_channels"], config["num_classes"], seed=config["seed"],
                        groups=config.get("groups", 1))
    path = Path(run_dir) / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory written by `unlearn train`?")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError... for damaged files
        raise ValueError(f"{path} is damaged or not a model saved by `unlearn`: {_first_line(error)}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a model's state_dict")
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise ValueError(f"{path} does not fit the model its train.json describes ({describe_model(config)}): "
                         f"{mismatch}; was it copied from another run?")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{path} does not load into {describe_model(config)}: {_first_line(error)}") from None
    return model.to(device).eval()


def describe_model(config):
    """'simple, 1 input channel(s), 10 classes' from a run's config."""
    groups = f", {config.get('groups', 1)} GroupNorm group(s)" if config["model"] == "resnet18" else ""
    return f"{config['model']}, {config['in_channels']} input channel(s), {config['num_classes']} classes{groups}"


def state_dict_mismatch(expected, state, shown=3):
    """What differs between a model's state_dict and loaded weights, in one line ('' if they fit)."""
    def names(keys):
        keys = list(keys)
        return ", ".join(keys[:shown]) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")

    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    shapes = [f"{key} {tuple(state[key].shape)} where the model has {tuple(value.shape)}"
              for key, value in expected.items()
              if key in state and hasattr(state[key], "shape") and tuple(state[key].shape) != tuple(value.shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing ({names(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({names(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} of another shape ({names(shapes)})")
    return "; ".join(parts)


def check_store(run_dir, config, store):
    """Refuse a store that was not recorded by this run: its keys must match the run's samples or steps."""
    method = config["method"]
    if method == "none":
        return
    kind, count = ("sample", config.get("num_samples")) if method == "per-sample" else ("step", config.get("steps"))
    path = Path(run_dir) / "store.h5"
    key_kind = store.config.get("key_kind", "sample")
    if key_kind != kind:
        raise ValueError(f"{path} is keyed by {key_kind}, but the run in {run_dir} (--method {method}) records one row "
                         f"per {kind}: the store belongs to another run")
    if count is not None and store.num_keys != count:
        raise ValueError(f"{path} holds {store.num_keys} rows, but the run in {run_dir} has {count} {kind}s: "
                         "the store belongs to another run (recorded on other data or settings)")
    recorded = (config.get("store") or {}).get("k")
    if recorded is not None and store.k != recorded:
        raise ValueError(f"{path} keeps {store.k} values per row, but the run in {run_dir} recorded {recorded}: "
                         "the store belongs to another run")


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def save_model(run_dir, model):
    """RUN_DIR/model.pt, written beside and renamed (as save_json): a failed or interrupted save
    leaves the old file (or none), and its OSError (a full disk) is one line naming the file."""
    buffer = io.BytesIO()  # serialized first: torch's own writer reports a full disk without the OS's reason
    torch.save(model.state_dict(), buffer)
    write_file(Path(run_dir) / "model.pt", buffer.getvalue())


def write_file(path, data: bytes):
    """``data`` into ``path``, written beside, flushed to disk and renamed over it: ``path`` holds
    its old contents or the new ones, never part of them. An OSError (no space, a file-size
    limit, no permission) is raised again as one line: the OS's reason, the file, and that it
    is unchanged; its errno is kept."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise write_failed(error, path) from None


def write_failed(error: OSError, path) -> OSError:
    """An OSError saying that writing ``path`` failed, why (the OS's reason first), and that the file
    is unchanged: for a write that goes beside and renames, so that a failure leaves the old file."""
    path = Path(path)
    reason = os.strerror(error.errno) if error.errno else _first_line(error)
    state = "the file there is unchanged" if path.exists() else "nothing was written there"
    failed = OSError(f"{reason}: writing {path} failed; {state}")
    failed.errno = error.errno
    return failed
