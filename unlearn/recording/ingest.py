"""The store's share of a step, run in a background thread behind the next step's compute.

Recorders hand their rows (still torch tensors, possibly on a GPU) to one ``Ingest``;
its thread copies them to the CPU and calls the store (quantize-free float32 sums,
zstd, HDF5). The queue is bounded, so a store slower than training slows training
instead of growing memory. One thread keeps every store's writes in submission order.
An error in the thread is raised again at the next ``submit``, ``flush`` or ``close``.
"""

from __future__ import annotations

import queue
import threading
import time
from typing import Any, Optional, Union

import numpy as np
from numpy.typing import ArrayLike
import torch


class Ingest:
    def __init__(self, max_pending: int = 8, background: bool = True):
        self.background = background
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, max_pending))
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self.seconds = 0.0  # time spent inside store calls (any thread)

    def _ensure_thread(self):
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="gradstore-ingest", daemon=True)
            self._thread.start()

    def _run(self):
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    self._do(job)
            except BaseException as error:  # noqa: BLE001 - handed to the training thread
                self._error = error
            finally:
                self._queue.task_done()

    def _do(self, job):
        started = time.perf_counter()
        kind, store, args = job
        if kind == "accumulate":
            keys, values, labels = args
            if isinstance(values, torch.Tensor):
                values = values.detach().to("cpu", torch.float32).numpy()
            store.accumulate(keys, np.asarray(values), labels=labels)
        else:
            store.add_members(*args)
        self.seconds += time.perf_counter() - started

    def _raise_pending(self):
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"recording failed in the background store thread: {error}") from error

    def submit_accumulate(self, store: Any, keys: ArrayLike, values: Union[torch.Tensor, np.ndarray],
                          labels: Optional[np.ndarray] = None) -> None:
        self._submit(("accumulate", store, (np.asarray(keys), values, labels)))

    def submit_members(self, store: Any, key: int, samples: ArrayLike) -> None:
        self._submit(("members", store, (key, np.asarray(samples))))

    def _submit(self, job):
        self._raise_pending()
        if not self.background:
            self._do(job)
            return
        self._ensure_thread()
        self._queue.put(job)

    def flush(self) -> None:
        """Wait until every submitted write reached its store (before commit, checkpoint, finalize)."""
        if self._thread is not None:
            self._queue.join()
        self._raise_pending()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.join()
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        self._raise_pending()
