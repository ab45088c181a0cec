"""A recording: rows arriving during training, summed per key, committed, finalized once.

``gradstore.create`` returns one; ``gradstore.open`` of an unfinished file returns one to
resume. ``accumulate`` batches (any number of epochs), ``commit`` to make them survive a
crash, ``finalize`` to get the finished ``Store`` (one row per key, quantized once).

As a context manager it behaves like sqlite3's connection: leaving the block normally
commits; leaving it by an exception rolls back to the last commit, so a half-finished
step never counts.
"""

from __future__ import annotations

import json
import os
from types import TracebackType
from typing import Any, Iterator, Optional, Union

import numpy as np

from . import kernels, staging
from .base import StoreFile, load
from .checks import check_labels
from .errors import BadInputError, FormatError, ReadOnlyError, StoreError
from .format import ATTR_COMMITTED, LABELS, STAGING, RowState, get_json_attr, read_membership, rewrite_row_metadata, seal_metadata, set_json_attr
from .store import Store
from .writer import finished_file

DEFAULT_MEMORY_BUDGET = 256 << 20
COMMIT_RUNS = "runs"  # in the commit record: the runs that count, as ranges of their numbers


class Recording(StoreFile):
    """A store whose rows are still arriving. Use ``gradstore.create`` / ``gradstore.open``."""

    finished = False

    def __init__(self, path: str, h5file: Any, config: dict, writable: bool, memory_budget: int = DEFAULT_MEMORY_BUDGET,
                 buffer_dir: Optional[Union[str, os.PathLike]] = None):
        super().__init__(path, h5file, config, writable)
        self._runs: list[str] = []
        self._stale_runs: list[str] = []
        self.committed_generation: Optional[int] = None
        self.commit_note: Any = None
        self.generation = 0
        self._dirty = False  # accumulated or added members since the last commit
        self._finalized = False
        self._buffer = staging.WriteBuffer(self.k, memory_budget // (4 * self.k), buffer_dir)
        self._load_runs()

    def _load_runs(self) -> None:
        """The runs that count (see ``commit``); runs written after the last commit are dropped."""
        h5file = self._h5
        committed = get_json_attr(h5file, ATTR_COMMITTED) if ATTR_COMMITTED in h5file.attrs else None
        if committed is None and int(h5file.attrs["gradstore_format_version"]) < 2 and STAGING in h5file:
            committed = {"generation": 0, "note": None}  # format 1 had no commits: every complete run counts
        self.committed_generation = None if committed is None else int(committed["generation"])
        self.commit_note = None if committed is None else committed.get("note")
        self.generation = 0 if committed is None else int(committed["generation"]) + 1
        if committed is not None and COMMIT_RUNS in committed:  # the commit names its runs: each must be whole
            self._runs = staging.decode_run_names(committed[COMMIT_RUNS])
            for name in self._runs:
                staging.check_run(h5file, name, self.path, int(committed["generation"]))
            present = list(h5file[STAGING]) if STAGING in h5file else []
            self._stale_runs = sorted(set(present) - set(self._runs))
        else:  # written before commits named their runs: each run's own attributes decide
            self._runs, self._stale_runs = staging.run_names(h5file, self.committed_generation)
        if self.writable and self._stale_runs:
            for name in self._stale_runs:
                del h5file[STAGING][name]
            self._stale_runs = []
            h5file.flush()
        self._rebuild_row_metadata_from_runs()

    def _rebuild_row_metadata_from_runs(self) -> None:
        """While recording, the counting runs are the truth: rows/state, rows/labels and membership cache them."""
        self.state[:] = RowState.EMPTY
        for name in self._runs:
            keys, labels = staging.run_keys_labels(self._h5[STAGING][name])
            if keys.size and keys[-1] >= self.num_keys:
                raise FormatError(f"{self.path}: run {name} holds keys beyond {self.num_keys} (damaged)")
            self.state[keys] = RowState.LIVE
            self.labels[keys] = labels
        self.members = {key: samples for key, samples in self.members.items() if self.state[key] == RowState.LIVE}

    # ------------------------------------------------------------------ closing

    def close(self) -> None:
        """Commit what was accumulated since the last commit, and close."""
        if self._h5 is not None and self.writable and self._dirty:
            self.commit()
        self._release()

    def __exit__(self, exc_type: Optional[type[BaseException]], exc: Optional[BaseException],
                 traceback: Optional[TracebackType]) -> None:
        """Commit on a normal exit; on an exception, go back to the last commit and close."""
        try:
            if exc_type is not None and self._h5 is not None and self.writable and self._dirty:
                with self._failing_writes_close():
                    self.rollback(self.committed_generation, note=self.commit_note)
        finally:
            self.close()

    def _release(self) -> None:
        self._buffer.release()
        super().close()

    def _require_writable(self) -> None:
        if self._finalized:
            raise ReadOnlyError(f"{self.path}: recording has finished (finalize ran); the finished store that "
                                "finalize() returned reads it")
        self._require_open()
        if not self.writable:
            raise ReadOnlyError(f"{self.path}: store is open read-only")

    # ------------------------------------------------------------------ recording

    def accumulate(self, keys: Any, values: Any, labels: Any = None) -> None:
        """Add a batch: row i of ``values`` (float [batch, k]) is summed into key ``keys[i]``."""
        self._require_writable()
        keys = self._check_keys(keys)
        values = np.asarray(values)
        if values.ndim != 2 or values.shape != (keys.shape[0], self.k):
            raise BadInputError(f"values must have shape ({keys.shape[0]}, {self.k}) (batch, k), got {values.shape}")
        if values.dtype.kind != "f":
            raise BadInputError(f"values must be floating point, got dtype {values.dtype}")
        values = np.ascontiguousarray(values, dtype=np.float32)
        bad_rows = kernels.rows_not_finite(values)
        if bad_rows.size:
            raise BadInputError(f"values hold NaN or Inf for keys {keys[bad_rows][:20].tolist()}")
        if labels is not None:
            labels = check_labels(labels, keys.shape[0])
        if labels is not None:  # before any spill below: a run carries its rows' labels
            self.labels[keys] = labels
        step = self._buffer.capacity_rows  # a batch bigger than the buffer goes in slices
        for start in range(0, keys.shape[0], step):
            piece = slice(start, start + step)
            if not self._buffer.room_for(keys[piece]):
                with self._failing_writes_close():
                    self._spill()
            self._buffer.add(keys[piece], values[piece])
        self.state[keys] = RowState.LIVE
        self._dirty = True

    def add_members(self, key: int, samples: Any) -> None:
        """Record which samples a (step-keyed) row covers, so a forget can find its steps."""
        self._require_writable()
        key = int(self._check_keys([key])[0])
        samples = np.asarray(samples)
        if samples.ndim != 1 or (samples.size and samples.dtype.kind not in "iu") or (samples < 0).any():
            raise BadInputError(f"members of key {key} must be non-negative integers, got {samples!r}")
        self.members[key] = samples.astype(np.int64)
        self._dirty = True

    def commit(self, note: Any = None) -> int:
        """Make everything accumulated so far survive a crash; returns this commit's generation.

        What "committed" means: a crash (even SIGKILL) loses at most what was accumulated
        since the last ``commit``; every row sum it covered reopens intact. Buffers that
        spilled in between (a full memory budget) do not count until the next commit, so
        the store always reopens exactly at a commit. ``note``: JSON-able, saved with the
        commit (e.g. the training step it stands for; ``commit_note`` reads it back).
        """
        self._require_writable()
        json.dumps(note)  # refuse what cannot be saved before touching the file
        if not self._dirty and self.committed_generation is not None and note == self.commit_note:
            return self.committed_generation  # nothing new: the file stays byte for byte as it is
        with self._failing_writes_close():
            self._spill()
            self._write_commit_record(self.generation, note, self._runs)
            self._write_row_metadata()  # seals the checksums, the commit record's included
            self._h5.flush()
            os.fsync(self._h5.id.get_vfd_handle())  # a commit survives power loss, not only a killed process
        self.committed_generation, self.commit_note = self.generation, note
        self.generation += 1
        self._dirty = False
        return self.committed_generation

    def rollback(self, generation: Optional[int], note: Any = None) -> None:
        """Go back to commit ``generation`` (None: to before any commit): later runs and the buffer are dropped.

        Resuming from a training checkpoint taken at that commit then records every later
        step exactly once.
        """
        self._require_writable()
        if generation is not None and (self.committed_generation is None or not 0 <= generation <= self.committed_generation):
            raise BadInputError(
                f"{self.path}: cannot roll back to commit {generation}; the last commit is {self.committed_generation}"
            )
        limit = -1 if generation is None else int(generation)
        for name in list(self._h5[STAGING]) if STAGING in self._h5 else []:  # the file's runs, not a stale list
            if staging.run_generation(self._h5, name) > limit:
                del self._h5[STAGING][name]
        self._buffer.clear()
        self._dirty = False
        if generation is None:
            if ATTR_COMMITTED in self._h5.attrs:
                del self._h5.attrs[ATTR_COMMITTED]
        else:
            present = set(self._h5[STAGING]) if STAGING in self._h5 else set()
            kept = [name for name in self._runs if name in present]
            self._write_commit_record(limit, note, kept)
        seal_metadata(self._h5)
        self._h5.flush()
        self.members = read_membership(self._h5)  # as the last commit wrote them
        self.labels = self._h5[LABELS][()]
        self._load_runs()
        self._write_row_metadata()
        self._h5.flush()
        os.fsync(self._h5.id.get_vfd_handle())

    def _write_commit_record(self, generation: Optional[int], note: Any, runs: list[str]) -> None:
        """The commit record: its generation, note and the runs that count from it (sealed by the caller).

        A run written before runs carried ``run_crc32`` (a recording begun by an older
        gradstore, resumed here) gets it now, from the attributes that made it count.
        """
        for name in runs:
            group = self._h5[STAGING][name]
            if staging.RUN_CRC not in group.attrs:
                group.attrs[staging.RUN_CRC] = staging.run_signature(group)
        set_json_attr(self._h5, ATTR_COMMITTED, {"generation": generation, "note": note,
                                                 COMMIT_RUNS: staging.encode_run_names(runs)})

    def _write_row_metadata(self) -> None:
        rewrite_row_metadata(self._h5, labels=self.labels, state=self.state, members=self.members or None)

    def _failing_writes_close(self, outcome: Optional[str] = None) -> Any:
        """The base class's guard; ``outcome`` by default: the recording reopens at its last commit."""
        return super()._failing_writes_close(outcome or (
            f"the store is closed and reopens at its last commit ({self.committed_generation}, note "
            f"{json.dumps(self.commit_note)}): nothing committed was changed"))

    def _abandon_file(self) -> None:
        super()._abandon_file()
        self._release()

    def _spill(self) -> None:
        """Write the buffered sums as a run of the current generation (it counts from the next commit)."""
        if len(self._buffer):
            keys, slots = self._buffer.sorted_slots()
            writer = staging.RunWriter(self._h5, self._next_run_name(), self.k, self.zstd_level, self.generation)
            step = writer.flush_rows
            for i0 in range(0, keys.size, step):
                batch = keys[i0 : i0 + step]
                writer.append(batch, self._buffer.values[slots[i0 : i0 + step]], self.labels[batch])
            self._runs.append(writer.close())
            self._buffer.clear()

    def _next_run_name(self) -> str:
        present = list(self._h5[STAGING]) if STAGING in self._h5 else []
        numbers = [staging.run_number(name) for name in [*self._runs, *present]]
        return staging.run_name(max(numbers) + 1 if numbers else 0)

    def _compact_runs(self, fanin: int) -> None:
        """Merge runs in groups until at most ``fanin`` remain (lossless float32 sums).

        A group never mixes runs that count with runs spilled after the last commit: the
        merged run takes its group's generation, so a crash during compaction still
        reopens at the last commit with every committed row.
        """
        limit = -1 if self.committed_generation is None else self.committed_generation
        while len(self._runs) > fanin:
            committed = [name for name in self._runs if staging.run_generation(self._h5, name) <= limit]
            pending = [name for name in self._runs if name not in committed]
            group = (committed if len(committed) >= len(pending) else pending)[:fanin]
            rest = [name for name in self._runs if name not in group]
            cursors = self._cursors(group)
            generation = max(staging.run_generation(self._h5, name) for name in group)
            writer = staging.RunWriter(self._h5, self._next_run_name(), self.k, self.zstd_level, generation)

            def emit(lo: int, sums: np.ndarray, present: np.ndarray) -> None:
                keys = np.nonzero(present)[0] + lo
                writer.append(keys, sums[present], self.labels[keys])

            staging.merge(cursors, self.num_keys, self.k, self.rows_per_chunk, emit)
            merged = writer.close(replaces=group)
            self._runs = rest + [merged]
            if generation <= limit:  # the commit now counts the merged run instead of its group
                self._write_commit_record(self.committed_generation, self.commit_note,
                                          [name for name in self._runs if name not in pending])
                seal_metadata(self._h5)
                self._h5.flush()  # a crash before this flush leaves the group counting, the merged run stale
            for old in group:
                del self._h5[STAGING][old]

    # ------------------------------------------------------------------ finishing

    def finalize(self) -> Store:
        """Merge every run and the buffer into one row per key, quantize once, and seal the file.

        Returns the finished ``Store`` (open in this recording's mode); the recording is closed.
        Writes a new file beside the store and renames it over the store, so the staging
        runs leave no bytes behind and a crash leaves either the old or the new file.
        """
        self._require_writable()
        writer = self.config.get("writer")
        if writer is not None:
            raise BadInputError(f"{self.path} is rank {writer['rank']} of {writer['ranks']}'s recording of a sharded "
                                "store: commit it, then finish every rank's with gradstore.shards.finalize_shard "
                                "and write_manifest")
        self._compact_runs(staging.MAX_FANIN)
        cursors: list[staging.Cursor] = list(self.run_cursors())
        if len(self._buffer):
            cursors.append(staging.MemoryCursor(self._buffer))
        with finished_file(self.path, "finalize", self.config, self.labels, self.state, self.members,
                           before_replace=self._h5.close) as out:

            def emit(lo: int, sums: np.ndarray, present: np.ndarray) -> None:
                keys = np.arange(lo, lo + sums.shape[0], dtype=np.int64)
                out.write_rows(lo, self.codec.encode(sums, keys, self.seed))

            staging.merge(cursors, self.num_keys, self.k, out.block_rows, emit)
        self._h5 = None
        self._finalized = True
        self._release()
        return load(self.path, "r+", lambda h5file, config, _: Store(self.path, h5file, config, writable=True))

    # ------------------------------------------------------------------ runs

    @property
    def runs(self) -> tuple[str, ...]:
        """Names of the staging runs that count (those of the last commit, and spilled since), oldest first."""
        return tuple(self._runs)

    def run_cursors(self) -> list[staging.RunCursor]:
        """A cursor over each run of ``runs``, for merging them in key order (as ``finalize`` does, and
        ``shards.finalize_shard`` over every writer's recording)."""
        self._require_open()
        return self._cursors(self._runs)

    def runs_in_file(self) -> list[str]:
        """Names of every staging run in the file, counting or not (an ``r+`` open drops the others)."""
        self._require_open()
        return sorted(self._h5[STAGING]) if STAGING in self._h5 else []

    def _cursors(self, names: list[str]) -> list[staging.RunCursor]:
        return [staging.RunCursor(self._h5[STAGING][name]) for name in names]

    # ------------------------------------------------------------------ description

    def _lifecycle_info(self) -> dict:
        return {
            "staging_runs": len(self._runs),
            "committed_generation": self.committed_generation,
            "commit_note": self.commit_note,
            "uncommitted_runs_ignored": len(self._stale_runs),
        }

    def info(self) -> dict:
        return {**super().info(), "ratio_vs_dense_fp32": None}

    def verify(self) -> list[dict]:
        """Decode every run chunk of the last commit and check it. Returns a list of problems, each naming its rows."""
        self._require_open()
        problems = self._invalid_states()
        for name in self._runs:
            try:
                cursor = staging.RunCursor(self._h5[STAGING][name])
            except StoreError as error:
                problems.append({"rows": [], "problem": f"run {name}: {error}"})
                continue
            except Exception as error:  # noqa: BLE001 - h5py on a damaged run: KeyError, OSError, ...
                problems.append({"rows": [], "problem": f"run {name} cannot be read ({type(error).__name__}: {error})"})
                continue
            for chunk in range(-(-cursor.keys.size // cursor.rows_per_chunk)):
                lo = chunk * cursor.rows_per_chunk
                keys = cursor.keys[lo : lo + cursor.rows_per_chunk]
                try:
                    block = cursor.chunk(chunk)[: keys.size]
                except FormatError as error:
                    problems.append({"rows": keys.tolist(), "problem": f"run {name}: {error}"})
                    continue
                bad = kernels.rows_not_finite(np.ascontiguousarray(block, np.float32))
                if bad.size:
                    problems.append({"rows": keys[bad].tolist(), "problem": f"run {name}: non-finite values"})
        return problems
