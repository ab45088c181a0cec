"""What every framework's callback shares: giving a half-recorded run up without finalizing it."""

from __future__ import annotations

from typing import Any, Optional

from ..recording import RecordingOptimizer


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
