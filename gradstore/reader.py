"""``StoreReader``: what every finished store offers, a single file (``Store``) or a sharded one
(``ShardedStore``), so callers (unlearn's forget, transcode) can be typed against one interface.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any, Iterator, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from .codecs import Codec
from .format import RowState


@runtime_checkable
class StoreReader(Protocol):
    """A finished store: its rows by key, to read, apply to weights, forget and purge."""

    path: str
    finished: bool
    writable: bool
    config: dict
    codec: Codec
    num_params: int
    num_keys: int
    k: int
    keep: float
    seed: int
    rows_per_chunk: int
    labels: np.ndarray
    state: np.ndarray
    members: dict[int, np.ndarray]

    def read(self, keys: Any) -> np.ndarray:
        """Decoded rows of ``keys`` (live or forgotten): float32 [len(keys), k], in the order given."""

    def scatter_add(self, flat_params: np.ndarray, keys: Any, alpha: float = 1.0) -> None:
        """flat_params[positions(key)] += alpha * row(key) for every (live) key, in place."""

    def blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Every row in key order, empty ones included: (first key, float32 [rows, k])."""

    def positions(self, key: int) -> np.ndarray:
        """Sorted flat-parameter positions of ``key``'s row (int64 [k])."""

    def keys_covering(self, samples: Any, states: Sequence[int] = (RowState.LIVE,)) -> np.ndarray:
        """Keys whose recorded members include any of ``samples``."""

    def keys_with_label(self, label: int, states: Sequence[int] = (RowState.LIVE,)) -> np.ndarray:
        """Keys whose stored label is ``label``."""

    def mark_forgotten(self, keys: Any) -> None:
        """Record that these live rows have been applied."""

    def purge(self) -> int:
        """Erase forgotten rows from the file(s); returns how many."""

    def info(self) -> dict:
        """Every store-level field, row counts and bytes on disk."""

    def verify(self) -> list[dict]:
        """Decode every chunk and check it: a list of problems, each naming its rows."""

    def close(self) -> None:
        """Close the file(s)."""

    def __enter__(self) -> Any:
        ...

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        ...
