"""Run directories: what `train` writes and `forget` reads.

RUN_DIR/model.pt      the model's state_dict (loaded with weights_only=True)
RUN_DIR/store.h5      the recording (absent for --method none)
RUN_DIR/train.json    settings and results; enough to rebuild the data and the model
RUN_DIR/started.json  the options, written when training starts (a run without train.json was interrupted)
RUN_DIR/checkpoint.pt while training with --checkpoint-every: the last checkpoint (weights_only)
RUN_DIR/poisoned.txt  only with --poison: the poisoned training keys, one per line (see unlearn.runs.poison)
RUN_DIR/forget.json   only in a forget output: the request chain (see unlearn.forgetting.run_folder)
"""

import io
import json
import os
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import numpy as np
import torch

from ..errors import RunConfigError, RunFolderError
from . import data as datasets
from . import poison
from .config import PER_SAMPLE, REQUIRED as SETTINGS_REQUIRED, RunConfig, as_run_config
from .data import DataSplit
from .models import build_model

PathLike = Union[str, "os.PathLike[str]"]
Settings = Union[RunConfig, Mapping[str, Any]]  # a RunConfig, or train.json's dict (modules not yet converted)

STARTED = "started.json"
CHECKPOINT = "checkpoint.pt"
POISONED = "poisoned.txt"


def save_json(path: PathLike, payload: Any) -> None:
    """Written beside and renamed: a crash leaves the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=jsonable) + "\n")
    os.replace(tmp, path)


def write_json(path: PathLike, payload: Any) -> None:
    """``save_json`` through ``write_file``: flushed to disk, and a failure (a full disk) is one line
    naming the file and saying that it is unchanged, with no temporary file left behind."""
    write_file(path, (json.dumps(payload, indent=2, default=jsonable) + "\n").encode())


def jsonable(value: Any) -> Any:
    """``json.dumps``'s ``default`` for what runs hold: numpy scalars and arrays, paths."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# The fields each file of a run directory must hold (a file without them is damaged or not ours).
REQUIRED = {
    "train.json": SETTINGS_REQUIRED,
    "forget.json": ("root_run", "forgotten_samples", "forgotten_keys"),
}


def load_json(path: PathLike) -> Dict[str, Any]:
    """A run directory's JSON file as a dict; RunFolderError naming the file if it is damaged or lacks fields."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path.parent} is not a directory: give a run directory written by `unlearn train`")
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {path.parent} a run directory written by `unlearn train`?")
    try:
        payload = json.loads(path.read_text())
    except UnicodeDecodeError:
        raise RunFolderError(f"{path} is damaged: not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise RunFolderError(f"{path} is damaged: not valid JSON ({error})") from None
    if not isinstance(payload, dict):
        raise RunFolderError(f"{path} is damaged: a JSON {type(payload).__name__}, not an object")
    missing = [key for key in REQUIRED.get(path.name, ()) if key not in payload]
    if missing:
        raise RunFolderError(f"{path} is damaged or not written by `unlearn`: it lacks {', '.join(missing)}")
    return payload


def load_run_config(run_dir: PathLike) -> RunConfig:
    """RUN_DIR/train.json as a RunConfig; RunFolderError naming the file if it is damaged or lacks settings."""
    path = Path(run_dir) / "train.json"
    try:
        return RunConfig.from_json(load_json(path))
    except RunConfigError as error:
        raise RunFolderError(f"{path} is damaged or not written by `unlearn`: {error}") from None


def build_data(config: Settings) -> DataSplit:
    """The training/test split a run trained on: its keys index this training set."""
    config = as_run_config(config)
    split = datasets.load_dataset(config.dataset, config.data_dir)
    if config.keep_first:
        cls, count = config.keep_first
        split = datasets.keep_first(split, cls, count)
    if config.poison:  # drawn before any exclusion: a retrained reference excludes the same samples
        split = poison.from_spec(split, config.poison)
    if config.exclude_class is not None:
        split = datasets.exclude(split, cls=config.exclude_class)
    if config.exclude_samples is not None:
        split = datasets.exclude(split, samples=np.asarray(config.exclude_samples, np.int64))
    return split


def load_model(run_dir: PathLike, config: Settings, device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """The run's model (as its train.json describes) with RUN_DIR/model.pt's weights.

    A missing or unreadable model.pt, or weights of another architecture, are a
    FileNotFoundError / RunFolderError naming the file and the mismatch.
    """
    config = as_run_config(config)
    if config.in_channels is None or config.num_classes is None:
        raise RunFolderError(f"{Path(run_dir) / 'train.json'} lacks in_channels or num_classes: the run never finished")
    model = build_model(config.model, config.in_channels, config.num_classes, seed=config.seed, groups=config.groups)
    path = Path(run_dir) / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory written by `unlearn train`?")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as error:  # torch raises RuntimeError, UnpicklingError, EOFError... for damaged files
        raise RunFolderError(f"{path} is damaged or not a model saved by `unlearn`: {first_line(error)}") from None
    if not isinstance(state, dict):
        raise RunFolderError(f"{path} holds a {type(state).__name__}, not a model's state_dict")
    mismatch = state_dict_mismatch(model.state_dict(), state)
    if mismatch:
        raise RunFolderError(f"{path} does not fit the model its train.json describes ({describe_model(config)}): "
                             f"{mismatch}; was it copied from another run?")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise RunFolderError(f"{path} does not load into {describe_model(config)}: {first_line(error)}") from None
    return model.to(device).eval()


def describe_model(config: Settings) -> str:
    """'simple, 1 input channel(s), 10 classes' from a run's config."""
    config = as_run_config(config)
    groups = f", {config.groups} GroupNorm group(s)" if config.model == "resnet18" else ""
    return f"{config.model}, {config.in_channels} input channel(s), {config.num_classes} classes{groups}"


def state_dict_mismatch(expected: Mapping[str, Any], state: Mapping[str, Any], shown: int = 3) -> str:
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


def check_store(run_dir: PathLike, config: Settings, store: Any) -> None:
    """Refuse a store that was not recorded by this run: its keys must match the run's samples or steps."""
    config = as_run_config(config)
    method = config.method
    if not config.records:
        return
    kind = config.key_kind
    count = config.results.get("num_samples" if method == PER_SAMPLE else "steps")
    path = Path(run_dir) / "store.h5"
    key_kind = store.config.get("key_kind", "sample")
    if key_kind != kind:
        raise RunFolderError(f"{path} is keyed by {key_kind}, but the run in {run_dir} (--method {method}) records one row "
                             f"per {kind}: the store belongs to another run")
    if count is not None and store.num_keys != count:
        raise RunFolderError(f"{path} holds {store.num_keys} rows, but the run in {run_dir} has {count} {kind}s: "
                             "the store belongs to another run (recorded on other data or settings)")
    recorded = (config.results.get("store") or {}).get("k")
    if recorded is not None and store.k != recorded:
        raise RunFolderError(f"{path} keeps {store.k} values per row, but the run in {run_dir} recorded {recorded}: "
                             "the store belongs to another run")


def first_line(error: BaseException) -> str:
    """An error's first line (its type's name when it has no message): for one-line reports."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def save_model(run_dir: PathLike, model: torch.nn.Module) -> None:
    """RUN_DIR/model.pt, written beside and renamed (as save_json): a failed or interrupted save
    leaves the old file (or none), and its OSError (a full disk) is one line naming the file."""
    buffer = io.BytesIO()  # serialized first: torch's own writer reports a full disk without the OS's reason
    torch.save(model.state_dict(), buffer)
    write_file(Path(run_dir) / "model.pt", buffer.getvalue())


def write_file(path: PathLike, data: bytes) -> None:
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


def write_failed(error: OSError, path: PathLike) -> OSError:
    """An OSError saying that writing ``path`` failed, why (the OS's reason first), and that the file
    is unchanged: for a write that goes beside and renames, so that a failure leaves the old file."""
    path = Path(path)
    reason = os.strerror(error.errno) if error.errno else first_line(error)
    state = "the file there is unchanged" if path.exists() else "nothing was written there"
    failed = OSError(f"{reason}: writing {path} failed; {state}")
    failed.errno = error.errno
    return failed
