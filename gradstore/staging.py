"""Recording: sum rows in memory, spill sorted lossless runs, merge them once at the end.

A sample comes back once per epoch. Its contributions are summed in float32 in a
bounded write buffer; when the buffer is full (or on ``commit``) its rows are sorted
by key and written as an immutable *run*: float32, byte-shuffled, zstd (lossless).
``finalize`` streams a k-way merge of the runs in key order, sums each key's
contributions in float and quantizes once. So the codec's error is one
quantization however many epochs there were, and memory is the buffer plus one
chunk per run, whatever the number of samples.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from typing import IO, Any, Callable, Iterable, Optional, Sequence, Union

import numpy as np

from . import chunkio, kernels
from .errors import FormatError
from .format import RUN_COMMITTED, RUN_GENERATION, RUN_REPLACES, STAGING, get_json_attr, set_json_attr

RUN_CHUNK_BYTES = 256 * 1024
MAX_FANIN = 64  # runs merged at once; more are first merged into bigger runs


class WriteBuffer:
    """float32 sums of the rows seen since the last spill, one slot per key.

    ``scratch_dir``: hold the sums in a memory-mapped, already-unlinked file there
    instead of in anonymous memory, so that a buffer larger than RAM pages to disk
    rather than exhausting memory (the kernel writes cold rows back; nothing is
    compressed). The file vanishes with the buffer, even after a crash.
    """

    def __init__(self, k: int, capacity_rows: int, scratch_dir: Optional[Union[str, os.PathLike]] = None):
        self.k = k
        self.capacity_rows = max(1, int(capacity_rows))
        self._scratch: Optional[IO[bytes]] = None
        self.values: np.ndarray
        if scratch_dir is not None:
            self._scratch = tempfile.TemporaryFile(dir=os.fspath(scratch_dir), prefix="gradstore-buffer-")
            self.values = np.memmap(self._scratch, np.float32, "w+", shape=(self.capacity_rows, k))  # sparse file
        else:
            self.values = np.zeros((min(self.capacity_rows, 1024), k), np.float32)
        self.keys = np.empty(self.values.shape[0], np.int64)
        self.slot_of_key: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.slot_of_key)

    def room_for(self, keys: np.ndarray) -> bool:
        """Whether adding these keys keeps the buffer within its capacity."""
        new = sum(1 for key in keys.tolist() if key not in self.slot_of_key)
        return len(self) + new <= self.capacity_rows

    def add(self, keys: np.ndarray, values: np.ndarray) -> None:
        """Sum rows into their keys' slots (keys unique within the call)."""
        slots = np.empty(keys.shape[0], np.int64)
        fresh = np.zeros(keys.shape[0], np.bool_)
        for i, key in enumerate(keys.tolist()):
            slot = self.slot_of_key.get(key)
            if slot is None:
                slot = self.slot_of_key[key] = len(self.slot_of_key)
                fresh[i] = True
            slots[i] = slot
        self._grow_to(len(self))
        self.keys[slots[fresh]] = keys[fresh]
        kernels.add_rows(self.values, slots, fresh, values)

    def _grow_to(self, rows: int) -> None:
        if rows <= self.values.shape[0]:
            return
        size = min(self.capacity_rows, max(rows, 2 * self.values.shape[0]))
        values = np.zeros((size, self.k), np.float32)
        values[: self.values.shape[0]] = self.values
        keys = np.empty(size, np.int64)
        keys[: self.keys.shape[0]] = self.keys
        self.values, self.keys = values, keys

    def sorted_slots(self) -> tuple[np.ndarray, np.ndarray]:
        """(keys ascending, their slots)."""
        n = len(self)
        order = np.argsort(self.keys[:n], kind="stable")
        return self.keys[:n][order], order

    def clear(self) -> None:
        self.slot_of_key.clear()

    def release(self) -> None:
        """Drop the sums (and the scratch file, if any); the buffer is then empty and holds no memory."""
        self.slot_of_key.clear()
        self.values, self.keys = np.zeros((0, self.k), np.float32), np.empty(0, np.int64)
        if self._scratch is not None:
            self._scratch.close()
            self._scratch = None


class MemoryCursor:
    """Rows of the write buffer in key order, served by key range."""

    def __init__(self, buffer: WriteBuffer):
        self.buffer = buffer
        self.keys, self.slots = buffer.sorted_slots()

    def rows_in(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        i0, i1 = np.searchsorted(self.keys, [lo, hi])
        return self.keys[i0:i1], self.buffer.values[self.slots[i0:i1]]


RUN_INDEX_CRC = "index_crc32"  # CRC-32 of the run's keys then labels (int64 bytes)


def run_keys_labels(group: Any) -> tuple[np.ndarray, np.ndarray]:
    """(keys, labels) of a run, checked against the run's checksum when it has one."""
    keys, labels = group["keys"][()], group["labels"][()]
    expected = group.attrs.get(RUN_INDEX_CRC)
    if expected is not None and int(expected) != zlib.crc32(labels.tobytes(), zlib.crc32(keys.tobytes())):
        raise FormatError(f"{group.file.filename}: run {group.name} has damaged keys or labels (checksum mismatch)")
    if keys.size and (np.any(np.diff(keys) <= 0) or keys[0] < 0):
        raise FormatError(f"{group.file.filename}: run {group.name} keys are not ascending and unique (damaged)")
    return keys, labels


class RunCursor:
    """Rows of one run on disk in key order, decoding one chunk at a time."""

    def __init__(self, group: Any):
        self.group = group
        self.keys = run_keys_labels(group)[0]
        self.values = group["values"]
        self.rows_per_chunk: int = self.values.chunks[0]
        self.checksums = group["checksums"][()].astype(np.uint32) if "checksums" in group else None
        self._chunks: dict[int, np.ndarray] = {}

    def chunk(self, index: int) -> np.ndarray:
        """Decoded chunk ``index`` of the run's values ([rows_per_chunk, k], checked against its checksum)."""
        if index not in self._chunks:
            name_rows = lambda i: self.keys[i * self.rows_per_chunk : (i + 1) * self.rows_per_chunk].tolist()
            self._chunks = chunkio.read_chunks(self.values, [index], True, name_rows, self.checksums)  # keep only this one
        return self._chunks[index]

    def rows_in(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        i0, i1 = (int(i) for i in np.searchsorted(self.keys, [lo, hi]))
        out = np.empty((i1 - i0, self.values.shape[1]), np.float32)
        i = i0
        while i < i1:
            chunk = i // self.rows_per_chunk
            stop = min(i1, (chunk + 1) * self.rows_per_chunk)
            out[i - i0 : stop - i0] = self.chunk(chunk)[i - chunk * self.rows_per_chunk : stop - chunk * self.rows_per_chunk]
            i = stop
        if i1 == self.keys.size:
            self._chunks = {}  # exhausted: hold no decoded chunk
        return self.keys[i0:i1], out


RUN_CRC = "run_crc32"  # CRC-32 of everything that decides what the run counts for (``run_signature``)


def run_signature(group: Any) -> int:
    """CRC-32 of what decides a run's part in the store: its generation, ``committed``, ``replaces``,
    ``index_crc32``, its chunk checksums and the shape and chunking of its ``values``.

    Written as the run's ``run_crc32`` when it is closed and checked whenever a commit
    counts it: a flipped byte in any of these is an error naming the run, never a run
    that silently stops counting.
    """
    attrs = group.attrs
    decided = [  # runs written before 2026-12-07 may lack replaces, index_crc32 or checksums: null then
        int(attrs.get(RUN_GENERATION, 0)),
        bool(attrs.get(RUN_COMMITTED, False)),
        get_json_attr(group, RUN_REPLACES) if RUN_REPLACES in attrs else None,
        int(attrs[RUN_INDEX_CRC]) if RUN_INDEX_CRC in attrs else None,
        zlib.crc32(np.ascontiguousarray(group["checksums"][()], "<u4").tobytes()) if "checksums" in group else None,
        [int(n) for n in group["values"].shape],
        [int(n) for n in group["values"].chunks],
        group["values"].dtype.str,  # byte order included: the chunks are decoded with it
        chunkio.filter_pipeline(group["values"]),
    ]
    return zlib.crc32(json.dumps(decided).encode())


def check_run(h5file: Any, name: str, path: str, generation: int) -> None:
    """FormatError naming run ``name`` unless it is in the file, whole, and counts for commit ``generation``."""
    where = f"{path}: run {name} of the last commit ({generation})"
    if STAGING not in h5file or name not in h5file[STAGING]:
        raise FormatError(f"{where} is missing: the file is damaged (no committed row is dropped silently)")
    try:
        group = h5file[STAGING][name]
        expected = int(group.attrs[RUN_CRC])
        actual = run_signature(group)
    except Exception as error:  # noqa: BLE001 - h5py on a damaged object header: KeyError, OSError, ...
        raise FormatError(f"{where} cannot be read ({type(error).__name__}: {' '.join(str(error).split())}): "
                          "the file is damaged") from None
    if actual != expected:
        raise FormatError(f"{where} fails its checksum (its generation, commit flag, index or chunk checksums "
                          "are damaged): the file is damaged")
    if int(group.attrs[RUN_GENERATION]) > generation:
        raise FormatError(f"{where} is of a later generation ({int(group.attrs[RUN_GENERATION])}): the file is damaged")


def run_number(name: str) -> int:
    return int(name.split("_")[1])


def run_name(number: int) -> str:
    return f"run_{number:06d}"


def encode_run_names(names: Iterable[str]) -> list[list[int]]:
    """Run names as ranges of their numbers, [[first, last], ...]: a commit record stays small."""
    ranges: list[list[int]] = []
    for number in sorted(run_number(name) for name in names):
        if ranges and number == ranges[-1][1] + 1:
            ranges[-1][1] = number
        else:
            ranges.append([number, number])
    return ranges


def decode_run_names(ranges: Sequence[Sequence[int]]) -> list[str]:
    return [run_name(number) for first, last in ranges for number in range(int(first), int(last) + 1)]


def run_generation(h5file: Any, name: str) -> int:
    return int(h5file[STAGING][name].attrs.get(RUN_GENERATION, 0))


def run_names(h5file: Any, committed_generation: Optional[int]) -> tuple[list[str], list[str]]:
    """(runs that count, runs written after the last commit), oldest first.

    A run counts when it is complete, no counting merge replaced it, and a commit()
    covers its generation (``committed_generation`` None: no commit yet, none counts).
    """
    if STAGING not in h5file:
        return [], []
    group = h5file[STAGING]
    complete = sorted(name for name in group if group[name].attrs.get(RUN_COMMITTED, False))
    limit = -1 if committed_generation is None else committed_generation
    counting = [name for name in complete if run_generation(h5file, name) <= limit]
    replaced = {old for name in counting if RUN_REPLACES in group[name].attrs for old in get_json_attr(group[name], RUN_REPLACES)}
    stale = sorted(set(group) - set(counting))
    return [name for name in counting if name not in replaced], stale


class RunWriter:
    """Appends rows in ascending key order to a new run; ``close`` commits it."""

    def __init__(self, h5file: Any, name: str, k: int, zstd_level: int, generation: int):
        self.h5file, self.k, self.zstd_level = h5file, k, zstd_level
        group = h5file.require_group(STAGING)
        if name in group:  # an uncommitted leftover of a crash
            del group[name]
        self.group = group.create_group(name)
        self.group.attrs[RUN_GENERATION] = int(generation)
        self.name = name
        rows_per_chunk = max(1, RUN_CHUNK_BYTES // (4 * k))
        filters = chunkio.dataset_filters(True, zstd_level)
        self.values = self.group.create_dataset(
            "values", shape=(0, k), maxshape=(None, k), dtype=np.float32, chunks=(rows_per_chunk, k), **filters
        )
        int_filters = chunkio.dataset_filters(False, zstd_level)
        self.keys = self.group.create_dataset("keys", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,), **int_filters)
        self.labels = self.group.create_dataset("labels", shape=(0,), maxshape=(None,), dtype=np.int64, chunks=(4096,), **int_filters)
        self.rows_per_chunk = rows_per_chunk
        self.flush_rows = rows_per_chunk * max(1, (16 << 20) // (4 * k * rows_per_chunk))
        self.pending_keys: list[np.ndarray] = []
        self.pending_rows: list[np.ndarray] = []
        self.pending_labels: list[np.ndarray] = []
        self.pending = 0
        self.written = 0
        self.checksums = np.zeros(0, np.uint32)

    def append(self, keys: np.ndarray, rows: np.ndarray, labels: np.ndarray) -> None:
        if keys.size:
            self.pending_keys.append(keys)
            self.pending_rows.append(rows)
            self.pending_labels.append(labels)
            self.pending += keys.size
        if self.pending >= self.flush_rows:
            self._write(final=False)

    def _write(self, final: bool) -> None:
        keys = np.concatenate(self.pending_keys) if self.pending_keys else np.empty(0, np.int64)
        rows = np.concatenate(self.pending_rows) if self.pending_rows else np.empty((0, self.k), np.float32)
        labels = np.concatenate(self.pending_labels) if self.pending_labels else np.empty(0, np.int64)
        cut = keys.size if final else keys.size - keys.size % self.rows_per_chunk
        if cut:
            total = self.written + cut
            self.values.resize((total, self.k))
            self.keys.resize((total,))
            self.labels.resize((total,))
            self.checksums = np.concatenate([self.checksums, np.zeros(-(-cut // self.rows_per_chunk), np.uint32)])
            chunkio.write_rows(self.values, self.written, rows[:cut], True, self.zstd_level, self.checksums)
            self.keys[self.written : total] = keys[:cut]
            self.labels[self.written : total] = labels[:cut]
            self.written = total
        self.pending_keys, self.pending_rows, self.pending_labels = [keys[cut:]], [rows[cut:]], [labels[cut:]]
        self.pending = keys.size - cut

    def close(self, replaces: Sequence[str] = ()) -> str:
        """Write what is pending and mark the run complete (a crash before this loses only this run).

        ``replaces``: runs this one merges; once it is committed they no longer count.
        """
        self._write(final=True)
        self.group.create_dataset("checksums", data=self.checksums)
        self.group.attrs[RUN_INDEX_CRC] = zlib.crc32(self.labels[()].tobytes(), zlib.crc32(self.keys[()].tobytes()))
        set_json_attr(self.group, RUN_REPLACES, list(replaces))
        self.group.attrs[RUN_COMMITTED] = True
        self.group.attrs[RUN_CRC] = run_signature(self.group)
        self.h5file.flush()
        return self.name


Cursor = Union[RunCursor, MemoryCursor]


def merge(cursors: Sequence[Cursor], num_keys: int, k: int, block_rows: int,
          emit: Callable[[int, np.ndarray, np.ndarray], None], start: int = 0) -> None:
    """Stream every key block [lo, lo + block_rows) from ``start`` up to ``num_keys``:
    emit(lo, sums float32 [rows, k], present bool)."""
    for lo in range(start, num_keys, block_rows):
        hi = min(num_keys, lo + block_rows)
        sums: Optional[np.ndarray] = None
        present = np.zeros(hi - lo, np.bool_)
        for cursor in cursors:  # one cursor's rows in memory at a time
            keys, rows = cursor.rows_in(lo, hi)
            if len(cursors) == 1 and keys.size == hi - lo:  # one source covering every key: no copy
                sums = rows
            else:
                if sums is None:
                    sums = np.zeros((hi - lo, k), np.float32)
                sums[keys - lo] += rows  # keys are unique within one cursor
            present[keys - lo] = True
        emit(lo, np.zeros((hi - lo, k), np.float32) if sums is None else sums, present)
