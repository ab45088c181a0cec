"""A store recorded by several writers: one recording per writer, finished as key-range shards behind one entry point.

Each writer (a torch.distributed rank, say) records the keys it sees into its own
recording, ``recording_path(path, rank, ranks)``, created with
``gradstore.create(..., writer={"run_id", "rank", "ranks"})``. A key may be seen by
several writers (a per-epoch reshuffle sends it to different ranks); its contributions
are summed once, at finalize:

- ``finalize_shard(path, index, ranks)`` merges every writer's committed runs for the
  keys of shard ``index`` (``shard_ranges``: contiguous, chunk-aligned) into one
  finished file, ``shard_path(path, index, ranks)``. Writers may run it in parallel,
  each for its own index, once every recording has its last commit.
- ``write_manifest(path, ranks)`` then writes ``path`` itself: the entry point that
  ``gradstore.open`` reads as one store (``joined.ShardedStore``). It names each shard
  with its key range and a checksum of its header, and maps the shards' row datasets
  as HDF5 virtual datasets, so plain h5py reads ``rows/values`` of the whole store
  (docs/FORMAT.md). ``remove_recordings`` deletes the recordings afterwards.

This module needs no torch: the ranks, barriers and who calls what are unlearn's.
"""

from __future__ import annotations

import os
import zlib
from typing import Union

import h5py
import numpy as np

from . import staging
from .base import load
from .errors import BadInputError, FormatError
from .format import (
    ATTR_CONFIG, ATTR_FINISHED, ATTR_VERSION, MANIFEST_VERSION, ROWS, RowState, get_json_attr, header_crc,
    new_file_beside, set_json_attr,
)
from .recording import Recording
from .writer import finished_file

ATTR_SHARDS = "gradstore_shards"  # manifest: JSON {"run_id", "shards": [{"file", "key_range", "header_crc32"}]}
ATTR_MANIFEST_CRC = "gradstore_manifest_crc32"  # manifest: CRC-32 of version|config|shards as stored
# config fields that may differ between a run's writers and shards (all the others must agree)
PathLike = Union[str, "os.PathLike[str]"]
PER_FILE_FIELDS = ("created_at", "package_version", "writer", "shard")


def shard_dir(path: PathLike) -> str:
    """The folder beside the entry point that holds a sharded store's recordings and shards."""
    return os.fspath(path) + ".shards"


def entry_path(file: PathLike) -> str:
    """The entry point of the sharded store a recording or shard file belongs to."""
    folder = os.path.dirname(os.fspath(file))
    if not folder.endswith(".shards"):
        raise BadInputError(f"{file} is not inside a sharded store's '<store>.shards' folder")
    return folder[: -len(".shards")]


def recording_path(path: PathLike, rank: int, ranks: int) -> str:
    return os.path.join(shard_dir(path), f"recording-{rank:05d}-of-{ranks:05d}.h5")


def shard_path(path: PathLike, index: int, count: int) -> str:
    return os.path.join(shard_dir(path), f"shard-{index:05d}-of-{count:05d}.h5")


def shard_ranges(num_keys: int, rows_per_chunk: int, count: int) -> list:
    """``count`` contiguous key ranges [lo, hi) covering [0, num_keys), cut at chunk boundaries,
    as equal in chunks as they can be (a range may be empty when there are fewer chunks than shards)."""
    if count < 1:
        raise BadInputError(f"a sharded store needs at least one shard, got {count}")
    chunks = -(-num_keys // rows_per_chunk)
    cuts = [min(num_keys, (chunks * i // count) * rows_per_chunk) for i in range(count + 1)]
    cuts[-1] = num_keys
    return [(cuts[i], cuts[i + 1]) for i in range(count)]


def shared_config(config: dict) -> dict:
    """The fields every writer's recording, every shard and the manifest of one store agree on."""
    return {key: value for key, value in config.items() if key not in PER_FILE_FIELDS}


def _open_recordings(path: PathLike, ranks: int) -> list[Recording]:
    """Every writer's recording, read-only, checked to belong to one run of ``ranks`` writers."""
    recordings = []
    try:
        for rank in range(ranks):
            file = recording_path(path, rank, ranks)
            if not os.path.exists(file):
                raise FormatError(f"{file}: rank {rank}'s recording is missing; every rank's recording is needed")
            h5file, config, finished = load(file, "r", lambda h5, config, finished: (h5, config, finished))
            if finished or "writer" not in config:
                h5file.close()
                raise FormatError(f"{file} is not a writer's recording of a sharded store")
            # read-only: its runs are read, nothing is buffered (a one-row budget, not 256 MB per writer)
            recordings.append(Recording(file, h5file, config, writable=False, memory_budget=4 * config["k"]))
        first = recordings[0].config
        for rank, recording in enumerate(recordings):
            writer = recording.config["writer"]
            if writer["run_id"] != first["writer"]["run_id"] or writer["rank"] != rank or writer["ranks"] != ranks:
                raise FormatError(f"{recording.path} belongs to another run (writer {writer}, expected rank {rank} of "
                                  f"{ranks} of run {first['writer']['run_id']})")
            if shared_config(recording.config) != shared_config(first):
                raise FormatError(f"{recording.path} was created with other store options than {recordings[0].path}")
        return recordings
    except BaseException:
        for recording in recordings:
            recording.close()
        raise


def finalize_shard(path: PathLike, index: int, ranks: int) -> str:
    """Write shard ``index`` of ``ranks``: the rows of its key range summed over every writer's
    last commit, quantized once. Returns the shard's path. Touches no recording.
    """
    recordings = _open_recordings(path, ranks)
    try:
        config = shared_config(recordings[0].config)
        run_id = recordings[0].config["writer"]["run_id"]
        lo, hi = shard_ranges(config["num_keys"], config["rows_per_chunk"], ranks)[index]
        labels = np.full(config["num_keys"], -1, np.int64)
        state = np.zeros(config["num_keys"], np.uint8)
        labels[lo:hi] = recordings[0].labels[lo:hi]  # as given at create (a key no writer saw keeps it)
        for recording in recordings:
            live = np.nonzero(recording.state[lo:hi] == RowState.LIVE)[0] + lo
            state[live] = RowState.LIVE
            labels[live] = recording.labels[live]
        members = {key: samples for recording in recordings for key, samples in recording.members.items() if lo <= key < hi}
        cursors = [cursor for recording in recordings for cursor in recording.run_cursors()]
        shard_config = {**config, "package_version": recordings[0].config.get("package_version"),
                        "created_at": recordings[0].config.get("created_at"),
                        "shard": {"run_id": run_id, "index": index, "count": ranks, "key_range": [lo, hi]}}
        out_path = shard_path(path, index, ranks)
        codec, seed = recordings[0].codec, config["seed"]
        with finished_file(out_path, "finalize", shard_config, labels, state, members) as out:

            def emit(block_lo, sums, present):
                keys = np.arange(block_lo, block_lo + sums.shape[0], dtype=np.int64)
                out.write_rows(block_lo, codec.encode(sums, keys, seed))

            staging.merge(cursors, hi, config["k"], out.block_rows, emit, start=lo)
        return out_path
    finally:
        for recording in recordings:
            recording.close()


def write_manifest(path: PathLike, count: int) -> str:
    """Write the entry point ``path`` over ``count`` finished shards (atomically: a new file renamed over it)."""
    path = os.fspath(path)
    entries, shard_configs = [], []
    for index in range(count):
        file = shard_path(path, index, count)
        if not os.path.exists(file):
            raise FormatError(f"{file}: shard {index} of {count} is missing; finalize every shard first")
        with h5py.File(file, "r") as h5file:
            config = get_json_attr(h5file, ATTR_CONFIG)
            if not bool(h5file.attrs.get(ATTR_FINISHED, False)) or config.get("shard", {}).get("index") != index:
                raise FormatError(f"{file} is not shard {index} of a finished sharded store")
            entries.append({"file": os.path.relpath(file, os.path.dirname(os.path.abspath(path))),
                            "key_range": config["shard"]["key_range"], "header_crc32": header_crc(h5file)})
            shard_configs.append(config)
            parts = {name: (h5file[ROWS][name].shape, h5file[ROWS][name].dtype) for name in h5file[ROWS]}
    run_ids = {config["shard"]["run_id"] for config in shard_configs}
    if len(run_ids) != 1 or any(shared_config(c) != shared_config(shard_configs[0]) for c in shard_configs):
        raise FormatError(f"the shards under {shard_dir(path)} belong to different runs ({sorted(run_ids)})")
    config = {**shared_config(shard_configs[0]), "package_version": shard_configs[0].get("package_version"),
              "created_at": shard_configs[0].get("created_at")}
    with new_file_beside(path, "manifest") as out:
        tmp_path = out.filename
        out.attrs[ATTR_VERSION] = MANIFEST_VERSION
        set_json_attr(out, ATTR_CONFIG, config)
        out.attrs[ATTR_FINISHED] = True
        set_json_attr(out, ATTR_SHARDS, {"run_id": run_ids.pop(), "shards": entries})
        out.attrs[ATTR_MANIFEST_CRC] = manifest_crc(out)
        rows = out.create_group(ROWS)
        for name, (shape, dtype) in parts.items():  # rows/<part>, rows/labels, rows/state
            layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
            for entry in entries:
                lo, hi = entry["key_range"]
                if hi > lo:
                    source = h5py.VirtualSource(entry["file"], f"{ROWS}/{name}", shape=shape)
                    layout[lo:hi] = source[lo:hi]
            rows.create_virtual_dataset(name, layout, fillvalue=-1 if name == "labels" else 0)
    os.replace(tmp_path, path)
    return path


def manifest_crc(h5file: h5py.File) -> int:
    """CRC-32 of what a manifest says: its version, config and shard list, as stored."""
    text = f"{int(h5file.attrs[ATTR_VERSION])}|{bytes(h5file.attrs[ATTR_CONFIG]).decode()}|" \
           f"{bytes(h5file.attrs[ATTR_SHARDS]).decode()}"
    return zlib.crc32(text.encode())


def remove_recordings(path: PathLike, ranks: int) -> None:
    """Delete every writer's recording (after the manifest is written: the shards hold their rows now)."""
    for rank in range(ranks):
        file = recording_path(path, rank, ranks)
        if os.path.exists(file):
            os.remove(file)


def is_manifest(h5file: h5py.File) -> bool:
    return ATTR_SHARDS in h5file.attrs
