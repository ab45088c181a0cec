"""Training that records, forgetting, evaluation: needs the `unlearn` extra (torch).

Four roles, each a folder, each importing only those below it (docs/DESIGN.md):
``recording`` (attach, the engine, handlers, recorders), ``evaluation`` (metrics),
``runs`` (the ready-made loop, data, models, poison, checkpoints, run folders) and
``forgetting`` (requests, removals, step rules); ``cli`` on top.
"""

import importlib.util as _util

_MISSING = [name for name in ("torch", "torchvision", "tqdm", "sklearn") if _util.find_spec(name) is None]
if _MISSING:
    raise ImportError(f"unlearn needs {', '.join(_MISSING)}, not installed: pip install 'amnesiac-gradstore[unlearn]' "
                      "(the store alone, gradstore, needs none of them)")
del _util, _MISSING

from .recording import (PerSampleRecorder, Recorder, StepRecorder, attach, create_recorder, recorder_for,  # noqa: E402
                        recording_plan)
from .evaluation import evaluate, mia_efficacy  # noqa: E402
from .runs import train  # noqa: E402
from .forgetting import (ForgetKeysResult, ForgetResult, Removal, apply_removal, find_similar, forget,  # noqa: E402
                         forget_keys, mark_applied, plan_removal, register_rule)

__all__ = [
    "ForgetKeysResult",
    "ForgetResult",
    "PerSampleRecorder",
    "Recorder",
    "Removal",
    "StepRecorder",
    "apply_removal",
    "attach",
    "create_recorder",
    "evaluate",
    "find_similar",
    "forget",
    "forget_keys",
    "mark_applied",
    "mia_efficacy",
    "plan_removal",
    "recorder_for",
    "recording_plan",
    "register_rule",
    "train",
]
