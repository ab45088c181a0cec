"""A run's settings as one typed value (``RunConfig``), and the names its options take.

train.json and started.json are the contract with users and scripts: ``RunConfig.to_json``
writes exactly the keys and values ``unlearn train`` always wrote, and ``from_json`` reads
any file ``runs.load_json`` accepts (keys absent from an older file stay absent on the way
back, keys it does not know are kept), so that a run's identity (``identity.run_id``)
never changes with the way its settings are held.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Union

from ..errors import RunConfigError
from ..recording.names import (  # noqa: F401 (re-exported: every option name from one place)
    ENGINES, FLAVOURS, GRAD, KEEP_METHODS, LAYER, MASKED, ORIGINAL, PER_SAMPLE, RECORDING_METHODS, STEP_METHODS, UPDATE,
    VMAP)

# --method: what a run records (none: nothing; its runs cannot forget)
NO_RECORDING = "none"
METHODS = RECORDING_METHODS + (NO_RECORDING,)

# --codec: the row codecs (gradstore.codecs.CODECS holds their classes by these ids)
FP32 = "fp32"
FP16 = "fp16"
INT8 = "int8"
DEFAULT_CODEC = {PER_SAMPLE: INT8, ORIGINAL: FP32, LAYER: FP32}

MODELS = ("simple", "resnet18")
OPTIMIZERS = ("adam", "sgd", "sgd-momentum")

# The settings' keys, in the order train.json has always held them; the run's results follow.
SETTINGS = ("dataset", "data_dir", "model", "groups", "method", "flavour", "keep", "codec", "epochs", "batch_size",
            "seed", "optimizer", "lr", "keep_first", "exclude_class", "exclude_samples", "engine", "checkpoint_every",
            "poison", "in_channels", "num_classes")
# Written only where they have a value: started.json has no in_channels, num_classes (known once the data is
# built), and a run without --poison has no poison key.
WRITTEN_IF_SET = ("poison", "in_channels", "num_classes")
REQUIRED = ("dataset", "model", "method", "seed", "in_channels", "num_classes", "batch_size", "optimizer")


@dataclass(frozen=True)
class RunConfig:
    """The settings of one ``unlearn train`` run: what it trained on, how, and what it recorded.

    ``results`` holds the rest of a train.json (seconds, steps, num_samples, store, test_acc ...,
    and any key this version does not know), so a file read and written again is unchanged.
    """

    dataset: str
    model: str
    method: str
    seed: int
    batch_size: int
    optimizer: str
    data_dir: Optional[str] = None
    groups: int = 1
    flavour: Optional[str] = None
    keep: Optional[float] = None
    codec: Optional[str] = None
    epochs: Optional[int] = None
    lr: Optional[float] = None
    keep_first: Optional[List[int]] = None
    exclude_class: Optional[int] = None
    exclude_samples: Optional[List[int]] = None
    engine: Optional[str] = None
    checkpoint_every: Optional[int] = None
    poison: Optional[Dict[str, Any]] = None
    in_channels: Optional[int] = None
    num_classes: Optional[int] = None
    results: Dict[str, Any] = field(default_factory=dict)
    absent: FrozenSet[str] = frozenset()  # settings an older file did not hold: to_json leaves them out again

    @property
    def records(self) -> bool:
        """Whether the run recorded a store (every --method but none)."""
        return self.method != NO_RECORDING

    @property
    def key_kind(self) -> str:
        """What the store's rows are keyed by: 'sample' (per-sample) or 'step' (original, layer)."""
        return "sample" if self.method == PER_SAMPLE else "step"

    def to_json(self) -> Dict[str, Any]:
        """The settings, then ``results``, as train.json holds them (started.json: no results)."""
        payload = {name: getattr(self, name) for name in SETTINGS
                   if name not in self.absent and not (name in WRITTEN_IF_SET and getattr(self, name) is None)}
        payload.update(self.results)
        return payload

    @classmethod
    def from_json(cls, payload: Mapping[str, Any]) -> "RunConfig":
        """A train.json or started.json's object; RunConfigError naming the settings it lacks or gets wrong.

        in_channels and num_classes may be absent (started.json); ``runs.load_json`` refuses a
        train.json without them.
        """
        required = [name for name in REQUIRED if name not in WRITTEN_IF_SET]
        missing = [name for name in required if name not in payload]
        if missing:
            raise RunConfigError(f"run settings lack {', '.join(missing)}")
        if payload["method"] not in METHODS:
            raise RunConfigError(f"run settings: unknown method {payload['method']!r}; one of {', '.join(METHODS)}")
        if payload.get("flavour") not in FLAVOURS + (None,):
            raise RunConfigError(f"run settings: unknown flavour {payload['flavour']!r}; one of {', '.join(FLAVOURS)}")
        known = {name: payload[name] for name in SETTINGS if name in payload}
        absent = frozenset(name for name in SETTINGS if name not in payload and name not in WRITTEN_IF_SET)
        results = {key: value for key, value in payload.items() if key not in SETTINGS}
        return cls(**known, results=results, absent=absent)


def as_run_config(config: Union[RunConfig, Mapping[str, Any]]) -> RunConfig:
    """``config`` as a RunConfig: modules not yet converted still pass train.json's dict."""
    return config if isinstance(config, RunConfig) else RunConfig.from_json(config)
