"""What a recording and a finished store share: the open file, its config, labels, states and keys."""

from __future__ import annotations

import contextlib
import os
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import numpy as np

from . import masks
from .codecs import get_codec
from .errors import BadInputError, FormatError, StoreError, write_failed
from .format import ATTR_FINISHED, LABELS, STATE, RowState, header_crc, open_h5, read_header, read_membership

T = TypeVar("T")


class KeyedRows:
    """What every store offers by key, from its ``num_keys``, ``key_range``, ``labels``, ``state``,
    ``members``, ``seed``, ``num_params`` and ``k``: a single file, a shard, or a sharded store's joined view."""

    path: str
    num_params: int
    num_keys: int
    k: int
    seed: int
    key_range: tuple[int, int]
    labels: np.ndarray
    state: np.ndarray
    members: dict[int, np.ndarray]

    def _check_keys(self, keys: Any, what: str = "keys") -> np.ndarray:
        """Keys as a 1-D int64 array: integers, in range, not repeated."""
        array = np.asarray(keys)
        if array.ndim == 0:
            array = array.reshape(1)
        if array.ndim != 1:
            raise BadInputError(f"{what} must be 1-D, got shape {array.shape}")
        if array.size and array.dtype.kind not in "iu":
            if array.dtype.kind == "f" and np.all(array == np.round(array)):
                array = array.astype(np.int64)
            else:
                raise BadInputError(f"{what} must be integers, got dtype {array.dtype}")
        array = array.astype(np.int64)
        out_of_range = array[(array < 0) | (array >= self.num_keys)]
        if out_of_range.size:
            raise BadInputError(
                f"{what} out of range [0, {self.num_keys}): {out_of_range[:10].tolist()}"
                + (" ..." if out_of_range.size > 10 else "")
            )
        lo, hi = self.key_range
        if (lo, hi) != (0, self.num_keys):
            outside = array[(array < lo) | (array >= hi)]
            if outside.size:
                raise BadInputError(f"{self.path} is a shard holding keys [{lo}, {hi}); {what} {outside[:10].tolist()} "
                                    "are in other shards: open the store's entry point instead")
        unique, counts = np.unique(array, return_counts=True)
        if (counts > 1).any():
            raise BadInputError(f"{what} repeated: {unique[counts > 1][:10].tolist()}")
        return array

    def positions(self, key: int) -> np.ndarray:
        """Sorted flat-parameter positions of ``key``'s row (int64 [k])."""
        key = int(self._check_keys([key])[0])
        return masks.positions(self.seed, key, self.num_params, self.k)

    def keys_covering(self, samples: Any, states: Sequence[int] = (RowState.LIVE,)) -> np.ndarray:
        """Keys whose recorded members include any of ``samples`` (rows in ``states``)."""
        if not self.members:
            return np.empty(0, np.int64)
        keys = np.fromiter(self.members, np.int64, len(self.members))
        owners = np.repeat(keys, [self.members[key].size for key in keys.tolist()])
        flat = np.concatenate([self.members[key] for key in keys.tolist()])
        covering = np.unique(owners[np.isin(flat, np.asarray(samples, np.int64))])
        return covering[np.isin(self.state[covering], states)]

    def keys_with_label(self, label: int, states: Sequence[int] = (RowState.LIVE,)) -> np.ndarray:
        """Keys whose stored label is ``label`` (live rows by default)."""
        return np.nonzero((self.labels == label) & np.isin(self.state, states))[0]

    def _require_states(self, keys: np.ndarray, allowed: Sequence[int], action: str) -> None:
        bad = keys[~np.isin(self.state[keys], allowed)]
        if bad.size:
            described = {RowState.NAMES[int(s)]: bad[self.state[bad] == s][:10].tolist() for s in np.unique(self.state[bad])}
            raise BadInputError(f"cannot {action} keys that are {described}")


class OpenFile:
    """An open HDF5 file (``_h5``, None once closed) at ``path``, usable in a ``with`` block."""

    path: str
    _h5: Any  # the open h5py.File, None once closed (h5py has no type information: Any either way)

    def close(self) -> None:
        if self._h5 is not None:
            self._h5.close()
            self._h5 = None

    def __enter__(self: T) -> T:
        return self

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        self.close()

    def _require_open(self) -> None:
        if self._h5 is None:
            raise BadInputError(f"{self.path}: store is closed")

    @contextlib.contextmanager
    def _failing_writes_close(self, outcome: str) -> Iterator[None]:
        """A refused write (disk full, size limit) leaves the file as its last flush left it: close it and
        raise WriteFailedError with the OS's reason and ``outcome`` (what the caller's files are now)."""
        try:
            yield
        except (OSError, RuntimeError) as error:
            if isinstance(error, StoreError) or (isinstance(error, RuntimeError) and "errno = " not in str(error)):
                raise  # h5py reports some refused writes (extending the file) as RuntimeError with HDF5's errno
            self._abandon_file()
            raise write_failed(self.path, error, outcome) from error

    def _abandon_file(self) -> None:
        """Close the HDF5 file without writing another byte: as a crash would leave it, at its last flush.

        (Closing normally flushes HDF5's metadata cache; after a refused write that flush
        half-succeeds and leaves a file HDF5 cannot open. So the descriptor is first pointed
        at /dev/null, read-only: every later write fails and nothing reaches the store.)
        """
        try:
            descriptor = self._h5.id.get_vfd_handle()
            null = os.open(os.devnull, os.O_RDONLY)
            try:
                os.dup2(null, descriptor)
            finally:
                os.close(null)
        except Exception:  # noqa: BLE001 - closing below is all that is left to try
            pass
        with contextlib.suppress(Exception):
            self._h5.close()
        self._h5 = None


class StoreFile(KeyedRows, OpenFile, ABC):
    """An open store file. ``gradstore.create`` and ``gradstore.open`` make its two kinds:
    ``Recording`` (rows still arriving) and ``Store`` (finished: rows to read and forget)."""

    finished: bool  # set by each kind

    def __init__(self, path: str, h5file: Any, config: dict, writable: bool):
        self.path = path
        self._h5 = h5file
        self.config = config
        self.writable = writable
        self.codec = get_codec(config["codec"])
        self.num_params: int = config["num_params"]
        self.num_keys: int = config["num_keys"]
        self.keep: float = config["keep"]
        self.k: int = config["k"]
        self.seed: int = config["seed"]
        self.zstd_level: int = config["zstd_level"]
        self.rows_per_chunk: int = config["rows_per_chunk"]
        self.parts = self.codec.parts(self.k)
        shard = config.get("shard")  # a shard of a sharded store (gradstore.shards) holds one key range
        self.key_range = (0, self.num_keys) if shard is None else (int(shard["key_range"][0]), int(shard["key_range"][1]))
        self.labels = h5file[LABELS][()]
        self.state = h5file[STATE][()]
        self.members = read_membership(h5file)

    def __repr__(self) -> str:
        kind = "store" if self.finished else "recording"
        return f"<gradstore {kind} {self.path!r} M={self.num_params} keys={self.num_keys} k={self.k} codec={self.codec.codec_id}>"

    def header_crc(self) -> int:
        """CRC-32 of this file's version and config as stored: what a sharded store's manifest records of a shard."""
        self._require_open()
        return header_crc(self._h5)

    def info(self) -> dict:
        """Every store-level field plus row counts and bytes on disk (what `gradstore info` prints)."""
        self._require_open()
        counts = {name: int((self.state == value).sum()) for value, name in RowState.NAMES.items()}
        stored_rows = counts["live"] + counts["forgotten"]
        return {
            "path": self.path,
            "format_version": int(self._h5.attrs["gradstore_format_version"]),
            **{key: value for key, value in self.config.items() if key != "fingerprint"},
            "fingerprint_sha256": (self.config.get("fingerprint") or {}).get("sha256"),
            "finished": bool(self._h5.attrs[ATTR_FINISHED]),
            "rows_live": counts["live"],
            "rows_forgotten": counts["forgotten"],
            "rows_purged": counts["purged"],
            "rows_empty": counts["empty"],
            **self._lifecycle_info(),
            "bytes_on_disk": os.path.getsize(self.path),
            "stored_values": stored_rows * self.k,
            "bytes_per_value": None,  # a finished store's bytes on disk over its stored values
            "dense_fp32_bytes": stored_rows * self.num_params * 4,
        }

    def _own_chunks(self) -> range:
        """The chunk indices of this file's key range (all of them, but for a shard)."""
        lo, hi = self.key_range
        return range(lo // self.rows_per_chunk, -(-hi // self.rows_per_chunk))

    @abstractmethod
    def _lifecycle_info(self) -> dict:
        """The info fields of a recording's commits (None in a finished store)."""

    def _invalid_states(self) -> list:
        bad_state = np.nonzero(~np.isin(self.state, list(RowState.NAMES)))[0]
        return [{"rows": bad_state[:50].tolist(), "problem": "invalid row state"}] if bad_state.size else []


def load(path: str, mode: str, make: Callable[[Any, dict, bool], T]) -> T:
    """Open ``path`` and return ``make(h5file, config, finished)``; the file is closed again on any
    failure, and what h5py raises on a damaged structure becomes FormatError."""
    h5file = open_h5(path, mode)
    try:
        config, finished = read_header(h5file, path)
        return make(h5file, config, finished)
    except StoreError:
        h5file.close()
        raise
    except Exception as error:  # h5py/HDF5 on damaged structures: KeyError, OSError, ValueError, ...
        h5file.close()
        raise FormatError(f"{path}: damaged store ({type(error).__name__}: {error})") from None
