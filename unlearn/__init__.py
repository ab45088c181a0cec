"""Training that records, forgetting, evaluation: needs the `unlearn` extra (torch)."""

import importlib.util as _util

_MISSING = [name for name in ("torch", "torchvision", "tqdm", "sklearn") if _util.find_spec(name) is None]
if _MISSING:
    raise ImportError(f"unlearn needs {', '.join(_MISSING)}, not installed: pip install 'amnesiac-gradstore[unlearn]' "
                      "(the store alone, gradstore, needs none of them)")
del _util, _MISSING

from .evaluate import evaluate, mia_efficacy  # noqa: E402
from .forget import ForgetResult, Removal, apply_removal, forget, mark_applied, plan_removal  # noqa: E402
from .recorders import PerSampleRecorder, Recorder, StepRecorder, create_recorder, recorder_for  # noqa: E402
from .train import attach, train  # noqa: E402

__all__ = [
    "ForgetResult",
    "PerSampleRecorder",
    "Recorder",
    "Removal",
    "StepRecorder",
    "apply_removal",
    "attach",
    "create_recorder",
    "evaluate",
    "forget",
    "mark_applied",
    "mia_efficacy",
    "plan_removal",
    "recorder_for",
    "train",
]
