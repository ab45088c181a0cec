"""The joined view of a sharded store: its manifest and every shard, used as one finished store.

``gradstore.open(manifest)`` returns a ``ShardedStore``. Before anything is read, every
shard the manifest names must exist, belong to its run, hold its key range, and carry
the header the manifest recorded: a missing or foreign shard is a FormatError (HDF5's
virtual datasets would silently read fill values instead).

Forgetting across shards survives a crash between shards: ``mark_forgotten`` first
writes its keys to the manifest (``pending/forget``, fsynced), then marks them shard by
shard, then clears the note. Opening the store again finishes a noted forget (mode
'r+') or counts its keys as forgotten (mode 'r'). ``purge`` erases shard by shard;
each shard's purge is atomic, so a crash between shards leaves every row forgotten or
purged, never live again, and the next ``purge`` finishes the rest.
"""

from __future__ import annotations

import os
from typing import Any, Iterator, Union

import numpy as np

from .base import KeyedRows, OpenFile, load
from .codecs import Codec, Part
from .errors import FormatError, ReadOnlyError, StoreError
from .format import ATTR_CONFIG, RowState, get_json_attr
from .shards import ATTR_MANIFEST_CRC, ATTR_SHARDS, manifest_crc, shard_ranges, shared_config
from .store import Store

PENDING_FORGET = "pending/forget"  # keys of a forget in progress across shards


class ShardedStore(KeyedRows, OpenFile):
    """A finished store kept as key-range shards. Use ``gradstore.open`` on its entry point."""

    finished = True

    def __init__(self, path: str, h5file: Any, writable: bool):
        self.path, self._h5, self.writable = path, h5file, writable
        self.shards: list[Store] = []
        try:
            self._check_manifest()
            self._open_shards()
        except BaseException:
            self.close()
            raise
        first = self.shards[0]
        self.config: dict = get_json_attr(h5file, ATTR_CONFIG)
        self.codec: Codec = first.codec
        self.num_params, self.num_keys, self.k, self.seed = first.num_params, first.num_keys, first.k, first.seed
        self.keep: float = first.keep
        self.zstd_level: int = first.zstd_level
        self.rows_per_chunk: int = first.rows_per_chunk
        self.parts: list[Part] = first.parts
        self.key_range = (0, self.num_keys)
        self.labels = np.full(self.num_keys, -1, np.int64)
        self.state = np.zeros(self.num_keys, np.uint8)
        self.members = {}
        for shard in self.shards:
            lo, hi = shard.key_range
            self.labels[lo:hi], self.state[lo:hi] = shard.labels[lo:hi], shard.state[lo:hi]
            self.members.update(shard.members)
        self._finish_pending_forget()

    # ------------------------------------------------------------------ opening

    def _check_manifest(self) -> None:
        attrs = self._h5.attrs
        if ATTR_MANIFEST_CRC not in attrs or int(attrs[ATTR_MANIFEST_CRC]) != manifest_crc(self._h5):
            raise FormatError(f"{self.path}: the manifest fails its checksum; the file is damaged")
        listing = get_json_attr(self._h5, ATTR_SHARDS)
        self.run_id, self._entries = listing["run_id"], listing["shards"]

    def _open_shards(self) -> None:
        """Open every shard (in this store's mode), checking it is the one the manifest names."""
        config = get_json_attr(self._h5, ATTR_CONFIG)
        expected_ranges = shard_ranges(config["num_keys"], config["rows_per_chunk"], len(self._entries))
        folder = os.path.dirname(os.path.abspath(self.path))
        for index, entry in enumerate(self._entries):
            file = os.path.join(folder, entry["file"])
            if not os.path.exists(file):
                raise FormatError(f"{self.path}: shard {index} ({file}) is missing; nothing was read")
            def make(h5: Any, cfg: dict, finished: bool, file: str = file) -> Union[Store, Any]:
                return Store(file, h5, cfg, self.writable) if finished else h5

            opened = load(file, "r+" if self.writable else "r", make)
            if not isinstance(opened, Store):
                opened.close()
                raise FormatError(f"{file} is not finished: it cannot be shard {index} of {self.path}")
            shard = opened
            self.shards.append(shard)
            described = shard.config.get("shard") or {}
            if (described.get("run_id") != self.run_id or described.get("index") != index
                    or described.get("count") != len(self._entries)
                    or tuple(described.get("key_range", ())) != tuple(entry["key_range"])
                    or tuple(entry["key_range"]) != expected_ranges[index]
                    or shard.header_crc() != entry["header_crc32"]
                    or shared_config(shard.config) != shared_config(config)):
                raise FormatError(f"{self.path}: {file} is not its shard {index} (another run's, or rewritten: "
                                  f"it says {described}); nothing was read")

    def _finish_pending_forget(self) -> None:
        if PENDING_FORGET not in self._h5:
            return
        keys = self._h5[PENDING_FORGET][()]
        if self.writable:
            self._mark_in_shards(keys)
            del self._h5[PENDING_FORGET]
            self._h5.flush()
        else:  # a forget was interrupted: its keys count as forgotten, as they will once finished
            self.state[keys[self.state[keys] == RowState.LIVE]] = RowState.FORGOTTEN

    # ------------------------------------------------------------------ the Store interface

    def close(self) -> None:
        for shard in self.shards:
            shard.close()
        self.shards = []
        super().close()

    def __repr__(self) -> str:
        return (f"<gradstore sharded store {self.path!r} M={self.num_params} keys={self.num_keys} k={self.k} "
                f"codec={self.codec.codec_id} shards={len(self._entries)}>")

    def _require_writable(self) -> None:
        self._require_open()
        if not self.writable:
            raise ReadOnlyError(f"{self.path}: store is open read-only; open it with mode='r+'")

    def _by_shard(self, keys: np.ndarray) -> Iterator[tuple[Store, np.ndarray]]:
        """(shard, positions in ``keys``) for each shard holding some of ``keys``."""
        for shard in self.shards:
            lo, hi = shard.key_range
            inside = np.nonzero((keys >= lo) & (keys < hi))[0]
            if inside.size:
                yield shard, inside

    def read(self, keys: Any) -> np.ndarray:
        """Decoded rows of ``keys``: float32 [len(keys), k], in the order given."""
        self._require_open()
        keys = self._check_keys(keys)
        self._require_states(keys, [RowState.LIVE, RowState.FORGOTTEN], "read")
        out = np.empty((keys.size, self.k), np.float32)
        for shard, inside in self._by_shard(keys):
            out[inside] = shard.read(keys[inside])
        return out

    def scatter_add(self, flat_params: np.ndarray, keys: Any, alpha: float = 1.0) -> None:
        """flat_params[positions(key)] += alpha * row(key) for every key (live rows only), shard by shard."""
        self._require_open()
        keys = self._check_keys(keys)
        self._require_states(keys, [RowState.LIVE], "scatter_add")
        for shard, inside in self._by_shard(keys):
            shard.scatter_add(flat_params, keys[inside], alpha)

    def blocks(self, block_rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Every row in key order, as ``Store.blocks`` gives them (what ``transcode`` re-encodes)."""
        self._require_open()
        for lo in range(0, self.num_keys, block_rows):
            keys = np.arange(lo, min(self.num_keys, lo + block_rows), dtype=np.int64)
            block = np.empty((keys.size, self.k), np.float32)
            for shard, inside in self._by_shard(keys):
                block[inside] = shard.decode_rows(keys[inside])
            yield lo, block

    def mark_forgotten(self, keys: Any) -> None:
        """Record that these live rows have been applied, in every shard, as one step a crash cannot split."""
        self._require_writable()
        keys = self._check_keys(keys)
        self._require_states(keys, [RowState.LIVE], "forget")
        self._h5.create_dataset(PENDING_FORGET, data=np.sort(keys))
        self._h5.flush()
        os.fsync(self._h5.id.get_vfd_handle())
        self._mark_in_shards(keys)
        del self._h5[PENDING_FORGET]
        self._h5.flush()

    def _mark_in_shards(self, keys: np.ndarray) -> None:
        for shard, inside in self._by_shard(keys):
            live = keys[inside][shard.state[keys[inside]] == RowState.LIVE]  # a resumed forget skips what is done
            if live.size:
                shard.mark_forgotten(live)
        self.state[keys] = RowState.FORGOTTEN

    def purge(self) -> int:
        """Erase forgotten rows from every shard; returns the number of rows purged."""
        self._require_writable()
        purged = 0
        for shard in self.shards:
            purged += shard.purge()
            lo, hi = shard.key_range
            self.state[lo:hi], self.labels[lo:hi] = shard.state[lo:hi], shard.labels[lo:hi]
        return purged

    def info(self) -> dict:
        """The fields of ``Store.info``, summed over shards, plus the shard count."""
        self._require_open()
        infos = [shard.info() for shard in self.shards]
        counts = {name: int((self.state == value).sum()) for value, name in RowState.NAMES.items()}
        stored = counts["live"] + counts["forgotten"]
        bytes_on_disk = os.path.getsize(self.path) + sum(info["bytes_on_disk"] for info in infos)
        return {
            "path": self.path,
            "format_version": int(self._h5.attrs["gradstore_format_version"]),
            **{key: value for key, value in self.config.items() if key != "fingerprint"},
            "fingerprint_sha256": (self.config.get("fingerprint") or {}).get("sha256"),
            "finished": True,
            "rows_live": counts["live"], "rows_forgotten": counts["forgotten"],
            "rows_purged": counts["purged"], "rows_empty": counts["empty"],
            "staging_runs": 0, "committed_generation": None, "commit_note": None, "uncommitted_runs_ignored": 0,
            "bytes_on_disk": bytes_on_disk,
            "stored_values": stored * self.k,
            "bytes_per_value": bytes_on_disk / (stored * self.k) if stored else None,
            "dense_fp32_bytes": stored * self.num_params * 4,
            "payload_bytes": sum(info["payload_bytes"] for info in infos),
            "ratio_vs_dense_fp32": stored * self.num_params * 4 / bytes_on_disk if stored else None,
            "shards": len(self.shards),
            "run_id": self.run_id,
        }

    def verify(self) -> list[dict]:
        """Every shard's problems (each names its rows), after the checks ``open`` already made."""
        self._require_open()
        problems = []
        for shard in self.shards:
            problems += [{**problem, "problem": f"{os.path.basename(shard.path)}: {problem['problem']}"}
                         for problem in shard.verify()]
        return problems


def open_manifest(path: str, h5file: Any, mode: str) -> ShardedStore:
    """The ShardedStore of the manifest open as ``h5file`` (mode 'r' or 'r+'); the file is closed on failure."""
    try:
        return ShardedStore(path, h5file, writable=(mode == "r+"))
    except StoreError:
        h5file.close()
        raise
    except Exception as error:  # h5py on damaged structures: KeyError, OSError, RuntimeError, ...
        h5file.close()
        raise FormatError(f"{path}: damaged sharded store ({type(error).__name__}: {error})") from None
