"""Recording: each sample's masked gradient (or update share), computed in the user's own backward and stored.

``attach`` wraps the user's optimizer and loader; the engine hooks every recorded module,
whose handler (``register_handler``) computes the rows at the kept positions; recorders
turn them into store rows (the update flavour through the preconditioner), and the
ingest writes them in a background thread. ``distributed`` serves torchrun.
"""

from .threads import hold_torch_threads

hold_torch_threads()  # at import: before this package runs any numba kernel on this thread

from .engine import MaskedEngine, UnsupportedModelError, recording_plan  # noqa: E402
from .handlers import Capture, Handler, register_handler, registered_handlers, unregister_handler  # noqa: E402
from .recorders import PerSampleRecorder, Recorder, StepRecorder, create_recorder, recorder_for  # noqa: E402
from .session import ENGINES, RecordingOptimizer, RecordingSession, attach  # noqa: E402

__all__ = ["ENGINES", "Capture", "Handler", "MaskedEngine", "PerSampleRecorder", "Recorder", "RecordingOptimizer",
           "RecordingSession", "StepRecorder", "UnsupportedModelError", "attach", "create_recorder",
           "hold_torch_threads", "recorder_for", "recording_plan", "register_handler", "registered_handlers", "unregister_handler"]
