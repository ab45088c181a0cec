"""A finished store: one row per key, to read, scatter-add into weights, forget and purge.

``Recording.finalize`` returns one; ``gradstore.open`` of a finished file returns one.
The layout is in docs/FORMAT.md.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import numpy as np

from . import chunkio, kernels
from .base import StoreFile
from .checks import check_number
from .codecs import Parts, decoded_rows, packed_operands_checked, scatter_operands_checked
from .errors import BadInputError, CorruptChunkError, FormatError, ReadOnlyError
from .format import CHECKSUMS, ROWS, RowState, open_h5, require_room, rewrite_row_metadata
from .writer import finished_file

SCATTER_BATCH_VALUES = 8 << 20  # values decoded at once (rows, and whole chunks) by read / scatter_add


class Store(StoreFile):
    """A finished store. Use ``gradstore.open`` (or a recording's ``finalize``) rather than this class."""

    finished = True

    def __init__(self, path: str, h5file: Any, config: dict, writable: bool):
        super().__init__(path, h5file, config, writable)
        self._checksums: dict[str, np.ndarray] = {}
        self._row_datasets = self._find_row_datasets()

    def _find_row_datasets(self) -> dict[str, Any]:
        """{part name: h5py dataset} of a finished store (looked up once: h5py lookups cost ~0.1 ms),
        and each part's chunk checksums."""
        self._checksums = {}
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

    def _require_writable(self) -> None:
        self._require_open()
        if not self.writable:
            raise ReadOnlyError(f"{self.path}: store is open read-only; open it with mode='r+'")

    # ------------------------------------------------------------------ reading

    def _chunk_keys(self, chunk_index: int) -> list[int]:
        lo = chunk_index * self.rows_per_chunk
        return list(range(lo, min(self.num_keys, lo + self.rows_per_chunk)))

    def _read_parts(self, sorted_keys: np.ndarray) -> dict[str, np.ndarray]:
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

    def _batches(self, sorted_keys: np.ndarray) -> Iterator[slice]:
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

    def read(self, keys: Any) -> np.ndarray:
        """Decoded rows of ``keys``: float32 [len(keys), k], in the order given."""
        self._require_open()
        keys = self._check_keys(keys)
        self._require_states(keys, [RowState.LIVE, RowState.FORGOTTEN], "read")
        return self._decode(keys)

    def decode_rows(self, keys: Any) -> np.ndarray:
        """Decoded rows of ``keys`` whatever their state (empty and purged rows decode to zeros):
        the whole key range as stored, which ``blocks`` and a sharded store's ``blocks`` copy.
        ``read`` is the one for rows that were recorded: it refuses the others."""
        self._require_open()
        return self._decode(self._check_keys(keys))

    def _decode(self, keys: np.ndarray) -> np.ndarray:
        order = np.argsort(keys)
        out = np.empty((keys.size, self.k), np.float32)
        for batch in self._batches(keys[order]):
            chunk = keys[order[batch]]
            out[order[batch]] = decoded_rows(self.codec, self._read_parts(chunk), chunk.size, self.k)
        return out

    def scatter_add(self, flat_params: np.ndarray, keys: Any, alpha: float = 1.0) -> None:
        """flat_params[positions(key)] += alpha * row(key) for every key (live rows only).

        flat_params: float32, C-contiguous, length num_params; modified in place.
        Rows are decoded and applied in batches of about 8M values; packed sub-byte codes are
        decoded inside the scatter (``Codec.packed_operands``); a codec without a kernel of its
        own is applied as its decoded float32 rows (``Codec.scatter_operands``).
        """
        self._require_open()
        if not isinstance(flat_params, np.ndarray) or flat_params.dtype != np.float32:
            raise BadInputError("flat_params must be a float32 numpy array")
        if flat_params.shape != (self.num_params,) or not flat_params.flags.c_contiguous:
            raise BadInputError(f"flat_params must be C-contiguous of shape ({self.num_params},), got {flat_params.shape}")
        alpha = check_number("alpha", alpha)
        if abs(alpha) > float(np.finfo(np.float32).max):
            raise BadInputError(f"alpha must fit float32 (|alpha| <= 3.4e38), got {alpha!r}")
        keys = np.sort(self._check_keys(keys))
        self._require_states(keys, [RowState.LIVE], "scatter_add")
        for batch in self._batches(keys):
            batch_keys = keys[batch]
            parts = self._read_parts(batch_keys)
            packed = packed_operands_checked(self.codec, parts, batch_keys.size, self.k)
            if packed is not None:  # sub-byte codes: decoded inside the scatter
                codes, scales, block, bits, table = packed
                kernels.scatter_add_packed(flat_params, codes, scales, block, bits, table, batch_keys, self.seed,
                                           self.num_params, self.k, alpha)
                continue
            values, scales, block = scatter_operands_checked(self.codec, parts, batch_keys.size, self.k)
            kernels.scatter_add(flat_params, values, scales, block, batch_keys, self.seed, self.num_params, alpha)

    def blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Every row, empty ones included, in key order: yields (first key, float32 [rows, k]) for
        each ``block_rows`` keys (what ``transcode`` re-encodes)."""
        self._require_open()
        for lo in range(0, self.num_keys, block_rows):
            keys = np.arange(lo, min(self.num_keys, lo + block_rows), dtype=np.int64)
            yield lo, decoded_rows(self.codec, self._read_parts(keys), keys.size, self.k)

    # ------------------------------------------------------------------ chunks as stored

    def chunk_checksums(self, part: str) -> Optional[np.ndarray]:
        """A copy of ``checksums/<part>``: each chunk's CRC-32 (None in a version 1 file, which has none)."""
        self._require_open()
        self._require_part(part)
        sums = self._checksums.get(part)
        return None if sums is None else sums.copy()

    def stored_chunk(self, part: str, chunk: int) -> bytes:
        """Chunk ``chunk`` of ``rows/<part>`` as stored: its zstd frame, unchecked and undecoded."""
        self._require_open()
        self._require_part(part)
        chunks = -(-self.num_keys // self.rows_per_chunk)
        if not 0 <= int(chunk) < chunks:
            raise BadInputError(f"chunk must be in [0, {chunks}), got {chunk!r}")
        return bytes(self._row_datasets[part].id.read_direct_chunk((int(chunk) * self.rows_per_chunk, 0))[1])

    def _require_part(self, part: str) -> None:
        if part not in self._row_datasets:
            raise BadInputError(f"{self.path}: no part {part!r}; codec {self.codec.codec_id} stores {list(self._row_datasets)}")

    @contextlib.contextmanager
    def checksums_unchecked(self) -> Iterator[None]:
        """Testing hook: reads inside the block skip the chunk checksums (bench/corrupt.py times their
        cost with it). Never for real reads: a damaged chunk would then decode into wrong rows."""
        saved = self._checksums
        self._checksums = {}
        try:
            yield
        finally:
            self._checksums = saved

    # ------------------------------------------------------------------ forgetting

    def mark_forgotten(self, keys: Any) -> None:
        """Record that these live rows have been applied; a second forget of them is refused."""
        self._require_writable()
        keys = self._check_keys(keys)
        self._require_states(keys, [RowState.LIVE], "forget")
        state = self.state.copy()
        state[keys] = RowState.FORGOTTEN
        rows = f"rows {keys[:10].tolist()}{' ...' if keys.size > 10 else ''} are not marked forgotten"
        require_room(self.path, self._h5.id.get_vfd_handle(), state.nbytes, f"nothing was changed: {rows}")
        with self._failing_writes_close(f"the store is closed and unchanged: {rows}"):
            rewrite_row_metadata(self._h5, state=state)
            self._h5.flush()
        self.state = state

    def purge(self) -> int:
        """Erase forgotten rows from the file: their chunks are rewritten without them.

        The store is rewritten into a new file that is renamed over the old one, so no
        byte of a purged row survives in the file (HDF5 never reuses freed space
        otherwise). Returns the number of rows purged.
        """
        self._require_writable()
        doomed = self.state == RowState.FORGOTTEN
        if not doomed.any():
            return 0
        purged_state = self.state.copy()
        purged_state[doomed] = RowState.PURGED
        purged_labels = self.labels.copy()
        purged_labels[doomed] = -1
        rows = self.rows_per_chunk
        with finished_file(self.path, "purge", self.config, purged_labels, purged_state, self.members,
                           before_replace=self._h5.close) as out:
            for part in self.parts:
                source, source_sums = self._row_datasets[part.name], self._checksums.get(part.name)
                for chunk in self._own_chunks():
                    lo = chunk * rows
                    hit = doomed[lo : lo + rows]
                    if not hit.any():  # copied as stored, once its checksum holds
                        _, frame = source.id.read_direct_chunk((lo, 0))
                        checksum = chunkio.frame_checksum(chunk, frame)
                        if source_sums is not None and checksum != source_sums[chunk]:
                            keys = self._chunk_keys(chunk)
                            raise CorruptChunkError(f"{source.name}: chunk {chunk} fails its checksum; rows {keys}", keys)
                        out.copy_chunk(part, chunk, frame, checksum)
                        continue
                    block = chunkio.read_chunks(source, [chunk], part.shuffle, self._chunk_keys, source_sums)[chunk].copy()
                    block[: hit.size][hit] = 0
                    out.write_part(part, lo, block[: hit.size])
        self._h5 = open_h5(self.path, "r+")
        self._row_datasets = self._find_row_datasets()
        self.state, self.labels = purged_state, purged_labels
        return int(doomed.sum())

    # ------------------------------------------------------------------ description

    def _lifecycle_info(self) -> dict:
        return {"staging_runs": 0, "committed_generation": None, "commit_note": None, "uncommitted_runs_ignored": 0}

    def info(self) -> dict:
        info = super().info()
        stored = info["stored_values"]
        info["bytes_per_value"] = info["bytes_on_disk"] / stored if stored else None
        # the compressed chunks of the row datasets alone, without HDF5's own structures
        info["payload_bytes"] = sum(_stored_chunk_bytes(dset) for dset in self._row_datasets.values())
        info["ratio_vs_dense_fp32"] = info["dense_fp32_bytes"] / info["bytes_on_disk"] if stored else None
        return info

    def verify(self) -> list[dict]:
        """Decode every chunk and check it (the codec's ``check_parts``, and that empty and purged rows
        hold zeros). Returns a list of problems, each naming its rows."""
        self._require_open()
        problems = self._invalid_states()
        for chunk in self._own_chunks():
            keys = np.array(self._chunk_keys(chunk), np.int64)
            parts = {}
            for part in self.parts:
                try:
                    parts[part.name] = chunkio.read_chunks(self._row_datasets[part.name], [chunk], part.shuffle,
                                                           self._chunk_keys, self._checksums.get(part.name))[chunk][: keys.size]
                except FormatError as error:
                    problems.append({"rows": keys.tolist(), "problem": str(error)})
            if len(parts) == len(self.parts):
                problems += [{"rows": keys[rows].tolist(), "problem": problem} for rows, problem in self.codec.check_parts(parts)]
                problems += self._vacant_not_zero(keys, parts)
        return problems

    def _vacant_not_zero(self, keys: np.ndarray, parts: Parts) -> list[dict]:
        """Empty and purged rows hold what the codec writes for a row of zeros (finalize), or zeros in
        every part (purge); anything else is a problem."""
        vacant = np.nonzero(np.isin(self.state[keys], [RowState.EMPTY, RowState.PURGED]))[0]
        if not vacant.size:
            return []
        zero = self.codec.encode(np.zeros((vacant.size, self.k), np.float32), keys[vacant], self.seed)
        as_encoded = np.ones(vacant.size, np.bool_)
        all_zero = np.ones(vacant.size, np.bool_)
        for name, block in parts.items():
            rows = block[vacant]
            as_encoded &= (rows == zero[name]).all(axis=1)
            all_zero &= (rows == 0).all(axis=1)
        wrong = vacant[~(as_encoded | all_zero)]
        return [{"rows": keys[wrong].tolist(), "problem": "empty or purged row is not zero"}] if wrong.size else []



def _stored_chunk_bytes(dset: Any) -> int:
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
