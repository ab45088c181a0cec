"""The store: one HDF5 file of masked, quantized, compressed rows, one row per key.

Life of a store: ``create`` -> ``accumulate`` batches (any number of epochs) ->
``finalize`` (one row per key, quantized once) -> ``open`` to ``read``,
``scatter_add``, ``mark_forgotten`` and ``purge``. The layout is in docs/FORMAT.md.
"""

import contextlib
import datetime
import json
import os

import numpy as np

from . import __version__, chunkio, kernels, masks, staging
from .codecs import get_codec
from .errors import BadInputError, CorruptChunkError, FormatError, ReadOnlyError, StoreError, WriteFailedError
from .format import (
    ATTR_COMMITTED,
    ATTR_FINISHED,
    CHECKSUMS,
    LABELS,
    MEMBERSHIP,
    ROWS,
    STAGING,
    STATE,
    RowState,
    get_json_attr,
    new_file_beside,
    open_h5,
    read_header,
    seal_metadata,
    set_json_attr,
    write_header,
)

FINAL_CHUNK_BYTES = 64 * 1024  # one row read decodes one chunk: ~40 us at this size
DEFAULT_MEMORY_BUDGET = 256 << 20
SCATTER_BATCH_VALUES = 8 << 20  # values decoded at once (rows, and whole chunks) by read / scatter_add


def keep_to_k(keep, num_params):
    """Number of values a row keeps: round(keep * num_params), refused when it would be 0."""
    if not (0 < keep <= 1):
        raise BadInputError(f"keep must be in (0, 1], got {keep!r}")
    k = int(round(keep * num_params))
    if k < 1:
        raise BadInputError(f"keep={keep} of {num_params} parameters keeps no value; raise keep")
    return k


def create(
    path,
    num_params,
    num_keys,
    keep,
    codec="int8",
    seed=0,
    zstd_level=1,
    key_kind="sample",
    fingerprint=None,
    labels=None,
    memory_budget=DEFAULT_MEMORY_BUDGET,
    buffer_dir=None,
    overwrite=False,
):
    """Create a store for recording and return it open for ``accumulate``.

    num_params: M, the model's flat parameter count. num_keys: rows (keys 0..num_keys-1).
    keep: p, the fraction of the M values each row keeps. codec: 'fp32', 'fp16', 'int8'
    or a codec config dict. memory_budget: bytes of float32 sums held before spilling.
    buffer_dir: keep those sums in a memory-mapped scratch file in this folder (a budget
    larger than RAM then pages to disk instead of exhausting memory).
    fingerprint: from ``format.model_fingerprint`` (checked at forget time by callers).
    """
    path = os.fspath(path)
    if int(num_params) != num_params or num_params < 1:
        raise BadInputError(f"num_params must be a positive integer, got {num_params!r}")
    if num_params >= 2**32:
        raise BadInputError(f"num_params must be below 2**32 (the mask kernel's limit), got {num_params}")
    if int(num_keys) != num_keys or num_keys < 1:
        raise BadInputError(f"num_keys must be a positive integer, got {num_keys!r}")
    if int(seed) != seed or not (0 <= seed < 2**63):
        raise BadInputError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    if key_kind not in ("sample", "step"):
        raise BadInputError(f"key_kind must be 'sample' or 'step', got {key_kind!r}")
    if fingerprint is not None and fingerprint.get("num_params") != num_params:
        raise BadInputError(
            f"fingerprint counts {fingerprint.get('num_params')} parameters but num_params is {num_params}"
        )
    num_params, num_keys, seed = int(num_params), int(num_keys), int(seed)
    k = keep_to_k(keep, num_params)
    codec = get_codec(codec)
    values_part = codec.parts(k)[0]
    config = {
        "num_params": num_params,
        "num_keys": num_keys,
        "keep": float(keep),
        "k": k,
        "seed": seed,
        "codec": codec.get_config(),
        "zstd_level": int(zstd_level),
        "rows_per_chunk": max(1, min(num_keys, FINAL_CHUNK_BYTES // (k * values_part.dtype.itemsize))),
        "key_kind": key_kind,
        "fingerprint": fingerprint,
        "package_version": __version__,
        "created_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    label_array = _check_labels(labels, num_keys) if labels is not None else np.full(num_keys, -1, np.int64)
    if buffer_dir is not None and not os.path.isdir(buffer_dir):
        raise BadInputError(f"buffer_dir {os.fspath(buffer_dir)!r} is not a directory")
    if os.path.exists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    h5file = open_h5(path, "w")
    write_header(h5file, config, finished=False)
    rows = h5file.create_group(ROWS)
    rows.create_dataset("labels", data=label_array, chunks=True, **chunkio.dataset_filters(False, 1))
    rows.create_dataset("state", data=np.zeros(num_keys, np.uint8), chunks=True, **chunkio.dataset_filters(False, 1))
    seal_metadata(h5file)
    h5file.flush()
    return Store(path, h5file, config, finished=False, writable=True, memory_budget=memory_budget, buffer_dir=buffer_dir)


def open(path, mode="r"):  # noqa: A001 - mirrors h5py.File / builtins.open
    """Open an existing store. mode 'r' reads; 'r+' also allows mark_forgotten and purge."""
    if mode not in ("r", "r+"):
        raise BadInputError(f"mode must be 'r' or 'r+', got {mode!r}")
    path = os.fspath(path)
    h5file = open_h5(path, mode)
    try:
        config, finished = read_header(h5file, path)
        return Store(path, h5file, config, finished=finished, writable=(mode == "r+"))
    except StoreError:
        h5file.close()
        raise
    except Exception as error:  # h5py/HDF5 on damaged structures: KeyError, OSError, ValueError, ...
        h5file.close()
        raise FormatError(f"{path}: damaged store ({type(error).__name__}: {error})") from None


def _check_labels(labels, count):
    labels = np.asarray(labels)
    if labels.shape != (count,) or labels.dtype.kind not in "iu":
        raise BadInputError(f"labels must be {count} integers, got dtype {labels.dtype} shape {labels.shape}")
    return labels.astype(np.int64)


class Store:
    """An open store. Use ``gradstore.create`` or ``gradstore.open`` rather than this class."""

    def __init__(self, path, h5file, config, finished, writable, memory_budget=DEFAULT_MEMORY_BUDGET, buffer_dir=None):
        self.path = path
        self._h5 = h5file
        self.config = config
        self.finished = finished
        self.writable = writable
        self.codec = get_codec(config["codec"])
        self.num_params = config["num_params"]
        self.num_keys = config["num_keys"]
        self.keep = config["keep"]
        self.k = config["k"]
        self.seed = config["seed"]
        self.zstd_level = config["zstd_level"]
        self.rows_per_chunk = config["rows_per_chunk"]
        self.parts = self.codec.parts(self.k)
        self.labels = h5file[LABELS][()]
        self.state = h5file[STATE][()]
        self._row_datasets = self._find_row_datasets()
        self.members = _read_membership(h5file, self.num_keys)
        self._buffer, self._runs, self._stale_runs = None, [], []
        self.committed_generation, self.commit_note, self.generation = None, None, 0
        self._dirty = False  # accumulated or added members since the last commit
        if not finished:
            self._buffer = staging.WriteBuffer(self.k, memory_budget // (4 * self.k), buffer_dir)
            self._load_runs()

    def _load_runs(self):
        """The runs that count (see ``commit``); runs written after the last commit are dropped."""
        h5file = self._h5
        committed = get_json_attr(h5file, ATTR_COMMITTED) if ATTR_COMMITTED in h5file.attrs else None
        if committed is None and int(h5file.attrs["gradstore_format_version"]) < 2 and STAGING in h5file:
            committed = {"generation": 0, "note": None}  # format 1 had no commits: every complete run counts
        self.committed_generation = None if committed is None else int(committed["generation"])
        self.commit_note = None if committed is None else committed.get("note")
        self.generation = 0 if committed is None else self.committed_generation + 1
        self._runs, self._stale_runs = staging.run_names(h5file, self.committed_generation)
        if self.writable and self._stale_runs:
            for name in self._stale_runs:
                del h5file[STAGING][name]
            self._stale_runs = []
            h5file.flush()
        self._rebuild_row_metadata_from_runs()

    # ------------------------------------------------------------------ housekeeping

    def _find_row_datasets(self):
        """{part name: h5py dataset} of a finished store (looked up once: h5py lookups cost ~0.1 ms),
        and each part's chunk checksums."""
        self._checksums = {}
        if not self.finished:
            return {}
        missing = [part.name for part in self.parts if f"{ROWS}/{part.name}" not in self._h5]
        if missing:
            raise FormatError(f"{self.path}: finished store lacks datasets {[f'{ROWS}/{m}' for m in missing]}")
        datasets = {part.name: self._h5[ROWS][part.name] for part in self.parts}
        num_chunks = -(-self.num_keys // self.rows_per_chunk)
        for part in self.parts:
            name = f"{CHECKSUMS}/{part.name}"
            if name not in self._h5:
                if int(self._h5.attrs["gradstore_format_version"]) >= 2:
                    raise FormatError(f"{self.path}: '{name}' is missing (damaged file)")
                continue
            self._checksums[part.name] = self._h5[name][()].astype(np.uint32)
            if self._checksums[part.name].shape != (num_chunks,):
                raise FormatError(f"{self.path}: '{name}' holds {self._checksums[part.name].shape} checksums, not {num_chunks}")
        for part in self.parts:  # reading dtype, shape and chunks here makes a damaged header fail at open
            dset = datasets[part.name]
            if dset.dtype != part.dtype or dset.chunks != (self.rows_per_chunk, part.width) or dset.shape != (self.num_keys, part.width):
                raise FormatError(f"{self.path}: '{ROWS}/{part.name}' has the wrong dtype, shape or chunks (damaged file)")
        return datasets

    def _rebuild_row_metadata_from_runs(self):
        """While recording, the counting runs are the truth: rows/state, rows/labels and membership cache them."""
        self.state[:] = RowState.EMPTY
        for name in self._runs:
            keys, labels = staging.run_keys_labels(self._h5[STAGING][name])
            if keys.size and keys[-1] >= self.num_keys:
                raise FormatError(f"{self.path}: run {name} holds keys beyond {self.num_keys} (damaged)")
            self.state[keys] = RowState.LIVE
            self.labels[keys] = labels
        self.members = {key: samples for key, samples in self.members.items() if self.state[key] == RowState.LIVE}

    def _reopen(self, mode):
        self._h5 = open_h5(self.path, mode)
        self._row_datasets = self._find_row_datasets()

    def close(self):
        if self._h5 is not None:
            if self.writable and not self.finished and self._dirty:
                self.commit()
            if self._buffer is not None:
                self._buffer.release()
            self._h5.close()
            self._h5 = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return f"<gradstore {self.path!r} M={self.num_params} keys={self.num_keys} k={self.k} codec={self.codec.id}>"

    def _require_open(self):
        if self._h5 is None:
            raise BadInputError(f"{self.path}: store is closed")

    def _require_recording(self):
        self._require_open()
        if self.finished:
            raise ReadOnlyError(f"{self.path}: recording has finished (finalize ran); the store takes no more rows")
        if not self.writable:
            raise ReadOnlyError(f"{self.path}: store is open read-only")

    def _require_finished(self, action):
        self._require_open()
        if not self.finished:
            raise BadInputError(f"{self.path}: cannot {action} before finalize(): recording has not finished")

    def _check_keys(self, keys, what="keys"):
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
        unique, counts = np.unique(array, return_counts=True)
        if (counts > 1).any():
            raise BadInputError(f"{what} repeated: {unique[counts > 1][:10].tolist()}")
        return array

    # ------------------------------------------------------------------ recording

    def accumulate(self, keys, values, labels=None):
        """Add a batch: row i of ``values`` (float [batch, k]) is summed into key ``keys[i]``."""
        self._require_recording()
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
            labels = np.asarray(labels)
            if labels.shape != keys.shape or labels.dtype.kind not in "iu":
                raise BadInputError(f"labels must be {keys.shape[0]} integers, got {labels.dtype} {labels.shape}")
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

    def commit(self, note=None):
        """Make everything accumulated so far survive a crash; returns this commit's generation.

        What "committed" means: a crash (even SIGKILL) loses at most what was accumulated
        since the last ``commit``; every row sum it covered reopens intact. Buffers that
        spilled in between (a full memory budget) do not count until the next commit, so
        the store always reopens exactly at a commit. ``note``: JSON-able, saved with the
        commit (e.g. the training step it stands for; ``commit_note`` reads it back).
        """
        self._require_recording()
        json.dumps(note)  # refuse what cannot be saved before touching the file
        if not self._dirty and self.committed_generation is not None and note == self.commit_note:
            return self.committed_generation  # nothing new: the file stays byte for byte as it is
        with self._failing_writes_close():
            self._spill()
            set_json_attr(self._h5, ATTR_COMMITTED, {"generation": self.generation, "note": note})
            self._write_row_metadata(self._h5)  # seals the checksums, the commit record's included
            self._h5.flush()
            os.fsync(self._h5.id.get_vfd_handle())  # a commit survives power loss, not only a killed process
        self.committed_generation, self.commit_note = self.generation, note
        self.generation += 1
        self._dirty = False
        return self.committed_generation

    @contextlib.contextmanager
    def _failing_writes_close(self):
        """A refused write (disk full, size limit) leaves the file at its last commit: close it and say so."""
        try:
            yield
        except OSError as error:
            if isinstance(error, StoreError):
                raise
            self._abandon_file()
            if self._buffer is not None:
                self._buffer.release()
            raise WriteFailedError(
                f"{self.path}: a write failed ({error}); the store is closed and reopens at its last commit "
                f"({self.committed_generation}, note {self.commit_note})"
            ) from error

    def _abandon_file(self):
        """Close the HDF5 file without writing another byte: as a crash would leave it, at its last commit.

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

    def _spill(self):
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

    def rollback(self, generation, note=None):
        """Go back to commit ``generation`` (None: to before any commit): later runs and the buffer are dropped.

        Resuming from a training checkpoint taken at that commit then records every later
        step exactly once.
        """
        self._require_recording()
        if generation is not None and (self.committed_generation is None or not 0 <= generation <= self.committed_generation):
            raise BadInputError(
                f"{self.path}: cannot roll back to commit {generation}; the last commit is {self.committed_generation}"
            )
        limit = -1 if generation is None else int(generation)
        for name in list(self._runs):
            if staging.run_generation(self._h5, name) > limit:
                del self._h5[STAGING][name]
        self._buffer.clear()
        self._dirty = False
        if generation is None:
            if ATTR_COMMITTED in self._h5.attrs:
                del self._h5.attrs[ATTR_COMMITTED]
        else:
            set_json_attr(self._h5, ATTR_COMMITTED, {"generation": limit, "note": note})
        seal_metadata(self._h5)
        self._h5.flush()
        self._load_runs()
        self._write_row_metadata(self._h5)
        self._h5.flush()
        os.fsync(self._h5.id.get_vfd_handle())

    def add_members(self, key, samples):
        """Record which samples a (step-keyed) row covers, so a forget can find its steps."""
        self._require_recording()
        key = int(self._check_keys([key])[0])
        samples = np.asarray(samples)
        if samples.ndim != 1 or (samples.size and samples.dtype.kind not in "iu") or (samples < 0).any():
            raise BadInputError(f"members of key {key} must be non-negative integers, got {samples!r}")
        self.members[key] = samples.astype(np.int64)
        self._dirty = True

    def keys_covering(self, samples, states=(RowState.LIVE,)):
        """Keys whose recorded members include any of ``samples`` (rows in ``states``)."""
        if not self.members:
            return np.empty(0, np.int64)
        keys = np.fromiter(self.members, np.int64, len(self.members))
        owners = np.repeat(keys, [self.members[key].size for key in keys.tolist()])
        flat = np.concatenate([self.members[key] for key in keys.tolist()])
        covering = np.unique(owners[np.isin(flat, np.asarray(samples, np.int64))])
        return covering[np.isin(self.state[covering], states)]

    def _write_row_metadata(self, h5file):
        h5file[LABELS][...] = self.labels
        h5file[STATE][...] = self.state
        if self.members:
            _write_membership(h5file, self.members)
        seal_metadata(h5file)

    def finalize(self):
        """Merge every run and the buffer into one row per key, quantize once, and seal the file.

        Writes a new file beside the store and renames it over the store, so the staging
        runs leave no bytes behind and a crash leaves either the old or the new file.
        """
        self._require_recording()
        self._compact_runs(staging.MAX_FANIN)
        cursors = [staging.RunCursor(self._h5[STAGING][name]) for name in self._runs]
        if len(self._buffer):
            cursors.append(staging.MemoryCursor(self._buffer))
        with new_file_beside(self.path, "finalize") as out:
            write_header(out, self.config, finished=True)
            datasets = self._create_row_datasets(out, self.labels, self.state)
            checksums = self._new_checksums()
            rows = self.rows_per_chunk
            block_rows = rows * max(1, (16 << 20) // (4 * self.k * rows))

            def emit(lo, sums, present):
                keys = np.arange(lo, lo + sums.shape[0], dtype=np.int64)
                encoded = self.codec.encode(sums, keys, self.seed)
                for part in self.parts:
                    chunkio.write_rows(datasets[part.name], lo, encoded[part.name], part.shuffle, self.zstd_level,
                                       checksums[part.name])

            staging.merge(cursors, self.num_keys, self.k, block_rows, emit)
            write_checksums(out, checksums)
        self._h5.close()
        os.replace(self.path + ".finalize.tmp", self.path)
        self.finished = True
        self._reopen("r+" if self.writable else "r")
        self._buffer.release()
        self._buffer = None
        self._runs = []

    def _next_run_name(self):
        return f"run_{int(self._runs[-1].split('_')[1]) + 1 if self._runs else 0:06d}"

    def _compact_runs(self, fanin):
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
            cursors = [staging.RunCursor(self._h5[STAGING][name]) for name in group]
            generation = max(staging.run_generation(self._h5, name) for name in group)
            writer = staging.RunWriter(self._h5, self._next_run_name(), self.k, self.zstd_level, generation)

            def emit(lo, sums, present):
                keys = np.nonzero(present)[0] + lo
                writer.append(keys, sums[present], self.labels[keys])

            staging.merge(cursors, self.num_keys, self.k, self.rows_per_chunk, emit)
            merged = writer.close(replaces=group)  # committed first: a crash now leaves it standing for them
            for old in group:
                del self._h5[STAGING][old]
            self._runs = rest + [merged]

    def _create_row_datasets(self, h5file, labels, state):
        """The row datasets of a finished file, with its labels, state and membership."""
        rows = h5file.require_group(ROWS)
        datasets = {}
        for part in self.parts:
            datasets[part.name] = rows.create_dataset(
                part.name,
                shape=(self.num_keys, part.width),
                dtype=part.dtype,
                chunks=(self.rows_per_chunk, part.width),
                **chunkio.dataset_filters(part.shuffle, self.zstd_level),
            )
        rows.create_dataset("labels", data=labels, chunks=True, **chunkio.dataset_filters(False, 1))
        rows.create_dataset("state", data=state, chunks=True, **chunkio.dataset_filters(False, 1))
        if self.members:
            _write_membership(h5file, self.members)
        seal_metadata(h5file)
        return datasets

    def _new_checksums(self):
        """{part: zeroed uint32 [num_chunks]} for write_rows to fill."""
        num_chunks = -(-self.num_keys // self.rows_per_chunk)
        return {part.name: np.zeros(num_chunks, np.uint32) for part in self.parts}

    # ------------------------------------------------------------------ reading

    def positions(self, key):
        """Sorted flat-parameter positions of ``key``'s row (int64 [k])."""
        key = int(self._check_keys([key])[0])
        return masks.positions(self.seed, key, self.num_params, self.k)

    def _chunk_keys(self, chunk_index):
        lo = chunk_index * self.rows_per_chunk
        return list(range(lo, min(self.num_keys, lo + self.rows_per_chunk)))

    def _read_parts(self, sorted_keys):
        """Stored parts of the rows of ascending ``sorted_keys``: {part: array [n, width]}."""
        rows = self.rows_per_chunk
        chunks, first = np.unique(sorted_keys // rows, return_index=True)
        bounds = np.append(first, sorted_keys.size)
        parts = {}
        for part in self.parts:
            decoded = chunkio.read_chunks(self._row_datasets[part.name], chunks.tolist(), part.shuffle, self._chunk_keys,
                                          self._checksums.get(part.name))
            out = np.empty((sorted_keys.size, part.width), part.dtype)
            for i, chunk in enumerate(chunks.tolist()):
                out[bounds[i] : bounds[i + 1]] = decoded.pop(chunk)[sorted_keys[bounds[i] : bounds[i + 1]] - chunk * rows]
            parts[part.name] = out
        return parts

    def _batches(self, sorted_keys):
        """Slices of ascending keys whose decoded chunks and rows stay within SCATTER_BATCH_VALUES."""
        max_rows = max(1, SCATTER_BATCH_VALUES // self.k)
        max_chunks = max(1, SCATTER_BATCH_VALUES // (self.k * self.rows_per_chunk))
        _, chunk_ordinal = np.unique(sorted_keys // self.rows_per_chunk, return_inverse=True)
        start = 0
        while start < sorted_keys.size:
            stop = min(sorted_keys.size, start + max_rows)
            stop = min(stop, int(np.searchsorted(chunk_ordinal, chunk_ordinal[start] + max_chunks)))
            yield slice(start, stop)
            start = stop

    def _require_states(self, keys, allowed, action):
        bad = keys[~np.isin(self.state[keys], allowed)]
        if bad.size:
            described = {RowState.NAMES[int(s)]: bad[self.state[bad] == s][:10].tolist() for s in np.unique(self.state[bad])}
            raise BadInputError(f"cannot {action} keys that are {described}")

    def read(self, keys):
        """Decoded rows of ``keys``: float32 [len(keys), k], in the order given."""
        self._require_finished("read rows")
        keys = self._check_keys(keys)
        self._require_states(keys, [RowState.LIVE, RowState.FORGOTTEN], "read")
        order = np.argsort(keys)
        out = np.empty((keys.size, self.k), np.float32)
        for batch in self._batches(keys[order]):
            out[order[batch]] = self.codec.decode(self._read_parts(keys[order[batch]]))
        return out

    def scatter_add(self, flat_params, keys, alpha=1.0):
        """flat_params[positions(key)] += alpha * row(key) for every key (live rows only).

        flat_params: float32, C-contiguous, length num_params; modified in place.
        Rows are decoded and applied in batches of about 8M values.
        """
        self._require_finished("scatter_add")
        if not isinstance(flat_params, np.ndarray) or flat_params.dtype != np.float32:
            raise BadInputError("flat_params must be a float32 numpy array")
        if flat_params.shape != (self.num_params,) or not flat_params.flags.c_contiguous:
            raise BadInputError(f"flat_params must be C-contiguous of shape ({self.num_params},), got {flat_params.shape}")
        if not np.isfinite(alpha):
            raise BadInputError(f"alpha must be finite, got {alpha!r}")
        keys = np.sort(self._check_keys(keys))
        self._require_states(keys, [RowState.LIVE], "scatter_add")
        for batch in self._batches(keys):
            batch_keys = keys[batch]
            values, scales, block = self.codec.scatter_operands(self._read_parts(batch_keys))
            kernels.scatter_add(flat_params, values, scales, block, batch_keys, self.seed, self.num_params, alpha)

    def keys_with_label(self, label, states=(RowState.LIVE,)):
        """Keys whose stored label is ``label`` (live rows by default)."""
        return np.nonzero((self.labels == label) & np.isin(self.state, states))[0]

    # ------------------------------------------------------------------ forgetting

    def mark_forgotten(self, keys):
        """Record that these live rows have been applied; a second forget of them is refused."""
        self._require_finished("mark rows forgotten")
        if not self.writable:
            raise ReadOnlyError(f"{self.path}: store is open read-only; open it with mode='r+'")
        keys = self._check_keys(keys)
        self._require_states(keys, [RowState.LIVE], "forget")
        self.state[keys] = RowState.FORGOTTEN
        self._h5[STATE][...] = self.state
        seal_metadata(self._h5)
        self._h5.flush()

    def purge(self):
        """Erase forgotten rows from the file: their chunks are rewritten without them.

        The store is rewritten into a new file that is renamed over the old one, so no
        byte of a purged row survives in the file (HDF5 never reuses freed space
        otherwise). Returns the number of rows purged.
        """
        self._require_finished("purge")
        if not self.writable:
            raise ReadOnlyError(f"{self.path}: store is open read-only; open it with mode='r+'")
        doomed = self.state == RowState.FORGOTTEN
        if not doomed.any():
            return 0
        with new_file_beside(self.path, "purge") as out:
            purged_state = self.state.copy()
            purged_state[doomed] = RowState.PURGED
            purged_labels = self.labels.copy()
            purged_labels[doomed] = -1
            write_header(out, self.config, finished=True)
            datasets = self._create_row_datasets(out, purged_labels, purged_state)
            checksums = self._new_checksums()
            rows = self.rows_per_chunk
            for part in self.parts:
                source, source_sums = self._row_datasets[part.name], self._checksums.get(part.name)
                for chunk in range(-(-self.num_keys // rows)):
                    lo = chunk * rows
                    hit = doomed[lo : lo + rows]
                    if not hit.any():  # copied as stored, once its checksum holds
                        _, frame = source.id.read_direct_chunk((lo, 0))
                        checksum = chunkio.frame_checksum(chunk, frame)
                        if source_sums is not None and checksum != source_sums[chunk]:
                            keys = self._chunk_keys(chunk)
                            raise CorruptChunkError(f"{source.name}: chunk {chunk} fails its checksum; rows {keys}", keys)
                        datasets[part.name].id.write_direct_chunk((lo, 0), frame)
                        checksums[part.name][chunk] = checksum
                        continue
                    block = chunkio.read_chunks(source, [chunk], part.shuffle, self._chunk_keys, source_sums)[chunk].copy()
                    block[: hit.size][hit] = 0
                    chunkio.write_rows(datasets[part.name], lo, block[: hit.size], part.shuffle, self.zstd_level,
                                       checksums[part.name])
            write_checksums(out, checksums)
        self._h5.close()
        os.replace(self.path + ".purge.tmp", self.path)
        self._reopen("r+")
        self.state, self.labels = purged_state, purged_labels
        return int(doomed.sum())

    # ------------------------------------------------------------------ description

    def info(self):
        """Every store-level field plus row counts and bytes on disk (what `gradstore info` prints)."""
        self._require_open()
        counts = {name: int((self.state == value).sum()) for value, name in RowState.NAMES.items()}
        stored_rows = counts["live"] + counts["forgotten"]
        bytes_on_disk = os.path.getsize(self.path)
        info = {
            "path": self.path,
            "format_version": int(self._h5.attrs["gradstore_format_version"]),
            **{key: value for key, value in self.config.items() if key != "fingerprint"},
            "fingerprint_sha256": (self.config.get("fingerprint") or {}).get("sha256"),
            "finished": bool(self._h5.attrs[ATTR_FINISHED]),
            "rows_live": counts["live"],
            "rows_forgotten": counts["forgotten"],
            "rows_purged": counts["purged"],
            "rows_empty": counts["empty"],
            "staging_runs": 0 if self.finished else len(self._runs),
            "committed_generation": None if self.finished else self.committed_generation,
            "commit_note": None if self.finished else self.commit_note,
            "uncommitted_runs_ignored": 0 if self.finished else len(self._stale_runs),
            "bytes_on_disk": bytes_on_disk,
            "stored_values": stored_rows * self.k,
            "bytes_per_value": bytes_on_disk / (stored_rows * self.k) if stored_rows and self.finished else None,
            "dense_fp32_bytes": stored_rows * self.num_params * 4,
        }
        if self.finished:  # the compressed chunks of the row datasets alone, without HDF5's own structures
            info["payload_bytes"] = sum(_stored_chunk_bytes(dset) for dset in self._row_datasets.values())
        info["ratio_vs_dense_fp32"] = (
            info["dense_fp32_bytes"] / bytes_on_disk if stored_rows and self.finished else None
        )
        return info

    def verify(self):
        """Decode every chunk and check it. Returns a list of problems, each naming its rows."""
        self._require_open()
        problems = []
        bad_state = np.nonzero(~np.isin(self.state, list(RowState.NAMES)))[0]
        if bad_state.size:
            problems.append({"rows": bad_state[:50].tolist(), "problem": "invalid row state"})
        if not self.finished:
            return problems + self._verify_runs()
        rows = self.rows_per_chunk
        for part in self.parts:
            dset = self._row_datasets[part.name]
            for chunk in range(-(-self.num_keys // rows)):
                keys = self._chunk_keys(chunk)
                try:
                    block = chunkio.read_chunks(dset, [chunk], part.shuffle, self._chunk_keys,
                                                self._checksums.get(part.name))[chunk][: len(keys)]
                except FormatError as error:
                    problems.append({"rows": keys, "problem": str(error)})
                    continue
                problems += _check_block(block, part.name, np.array(keys), self.state[keys])
        return problems

    def _verify_runs(self):
        problems = []
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
                    block = cursor._chunk(chunk)[: keys.size]
                except FormatError as error:
                    problems.append({"rows": keys.tolist(), "problem": f"run {name}: {error}"})
                    continue
                bad = kernels.rows_not_finite(np.ascontiguousarray(block, np.float32))
                if bad.size:
                    problems.append({"rows": keys[bad].tolist(), "problem": f"run {name}: non-finite values"})
        return problems


def _stored_chunk_bytes(dset):
    """Compressed bytes of a dataset's chunks, in one pass over its chunk index.

    (``get_chunk_info(i)`` walks the index from the start for every ``i``: quadratic,
    minutes for the 54,000 chunks of a large store.)
    """
    sizes = []
    if hasattr(dset.id, "chunk_iter"):
        dset.id.chunk_iter(lambda info: sizes.append(info.size))
    else:
        sizes = [dset.id.get_chunk_info(i).size for i in range(dset.id.get_num_chunks())]
    return int(sum(sizes))


def write_checksums(h5file, checksums):
    """checksums/<part>: the chunk checksums of a finished file's row datasets."""
    group = h5file.require_group(CHECKSUMS)
    for name, values in checksums.items():
        group.create_dataset(name, data=values)


def _write_membership(h5file, members):
    """members {key: int64 samples} as CSR: membership/keys, membership/indptr, membership/samples."""
    if MEMBERSHIP in h5file:
        del h5file[MEMBERSHIP]
    group = h5file.create_group(MEMBERSHIP)
    keys = np.array(sorted(members), np.int64)
    lengths = np.array([members[key].size for key in keys.tolist()], np.int64)
    samples = np.concatenate([members[key] for key in keys.tolist()]) if keys.size else np.empty(0, np.int64)
    filters = chunkio.dataset_filters(False, 1)
    group.create_dataset("keys", data=keys, chunks=True if keys.size else None, **(filters if keys.size else {}))
    group.create_dataset("indptr", data=np.concatenate([[0], np.cumsum(lengths)]), chunks=True, **filters)
    group.create_dataset("samples", data=samples, chunks=True if samples.size else None, **(filters if samples.size else {}))


def _read_membership(h5file, num_keys):
    if MEMBERSHIP not in h5file:
        return {}
    group = h5file[MEMBERSHIP]
    keys, indptr, samples = group["keys"][()], group["indptr"][()], group["samples"][()]
    return {int(key): samples[indptr[i] : indptr[i + 1]] for i, key in enumerate(keys.tolist())}


def _check_block(block, part_name, keys, states):
    """Problems in one decoded chunk of a part: non-finite, out-of-range, or non-zero empty rows."""
    problems = []
    if block.dtype.kind == "f":
        bad = kernels.rows_not_finite(np.ascontiguousarray(block, np.float32))
        if bad.size:
            problems.append({"rows": keys[bad].tolist(), "problem": f"{part_name}: NaN or Inf"})
        if part_name == "scales":
            negative = np.nonzero((block < 0).any(axis=1))[0]
            if negative.size:
                problems.append({"rows": keys[negative].tolist(), "problem": "scales: negative"})
    if block.dtype == np.int8:
        out_of_range = np.nonzero((block == -128).any(axis=1))[0]
        if out_of_range.size:
            problems.append({"rows": keys[out_of_range].tolist(), "problem": "values: int8 -128 never written"})
    vacant = np.isin(states, [RowState.EMPTY, RowState.PURGED])
    if part_name == "values":
        nonzero_vacant = np.nonzero(vacant & (block != 0).any(axis=1))[0]
        if nonzero_vacant.size:
            problems.append({"rows": keys[nonzero_vacant].tolist(), "problem": "empty or purged row is not zero"})
    return problems
