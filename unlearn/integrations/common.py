"""What every framework's callback shares: its recording options, its store, and giving a half-recorded run up."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

from ..recording import RecordingOptimizer
from ..recording.names import UPDATE


class RecordingSettings:
    """A framework callback's recording: ``create_recorder``'s options for the per-sample method, the recorder
    once training began, and the optimizer that records. ``num_samples`` defaults to the train dataset's size;
    ``modules`` names the part of the model to record (default: every trainable parameter; frozen ones never)."""

    def __init__(self, path: Union[str, os.PathLike], *, keep: float = 0.1, codec: str = "int8",
                 flavour: str = UPDATE, seed: int = 0, num_samples: Optional[int] = None,
                 memory_budget: int = 256 << 20, buffer_dir: Optional[str] = None, overwrite: bool = False,
                 run_id: Optional[str] = None, data_sha256: Optional[str] = None, background: bool = True,
                 modules: Optional[Sequence[str]] = None):
        super().__init__()
        self.path = path
        self.options: dict[str, Any] = dict(keep=keep, codec=codec, flavour=flavour, seed=seed,
                                            memory_budget=memory_budget, buffer_dir=buffer_dir, overwrite=overwrite,
                                            run_id=run_id, data_sha256=data_sha256, modules=modules)
        self.num_samples = num_samples
        self.background = background
        self.recorder: Any = None
        self.optimizer: Optional[RecordingOptimizer] = None


def abandon_recording(optimizer: Optional[RecordingOptimizer], recorder: Any) -> None:
    """After a training run that raised: stop the background writes and the hooks, roll the recording back
    to before any row and close it (an unfinished store holding nothing: record again from the start).
    The training's own exception is the one to see, so a failure of the writer thread is not raised."""
    session = optimizer.session if optimizer is not None else None
    try:
        if session is not None:
            try:
                session.ingest.close()
            except Exception:  # noqa: BLE001 - the training's own exception is the one to see
                pass
    finally:
        if session is not None and session.engine is not None:
            session.engine.close()
        store = recorder.store if recorder is not None else None
        if store is not None and not store.finished:
            try:
                store.rollback(store.committed_generation)
            finally:
                store.close()
