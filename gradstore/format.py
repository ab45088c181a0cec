"""The file layout: names, the format version, and store metadata as JSON attributes.

docs/FORMAT.md describes the same layout for readers who only have h5py.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import resource
import stat
import tempfile
import zlib
from typing import Any, Iterable, Iterator, Optional, Union

import h5py
import numpy as np

from . import chunkio
from .errors import FormatError, ReadOnlyError, StoreError, StoreLockedError, write_failed

FILE_VERSION = 2  # a store file; 2: CRC-32 checksums of every chunk and of the metadata (version 1 files still read)
MANIFEST_VERSION = 3  # the entry point of a sharded store (gradstore.shards); its shards are version 2 files
FORMAT_VERSION = MANIFEST_VERSION  # the highest version this gradstore reads

# root attributes
ATTR_VERSION = "gradstore_format_version"
ATTR_CONFIG = "gradstore_config"  # JSON: every store-level field that never changes
ATTR_FINISHED = "gradstore_finished"  # recording finished (finalize ran)
ATTR_CHECKSUMS = "gradstore_checksums"  # JSON {"config" (with version, finished), "labels", "state", "membership"}: CRC-32s
ATTR_COMMITTED = "gradstore_committed"  # JSON {"generation", "note"}: the last commit() (absent: none yet)

# datasets
ROWS = "rows"  # group: rows/<codec part> [num_keys, width], rows/labels, rows/state
LABELS = "rows/labels"  # int64 [num_keys], -1 where unknown
STATE = "rows/state"  # uint8 [num_keys], see RowState
STAGING = "staging"  # group of runs while recording: staging/run_<n>/{keys, values}
MEMBERSHIP = "membership"  # reserved: which samples a step-keyed row covers (CSR)
CHECKSUMS = "checksums"  # group: checksums/<codec part> uint32 [num_chunks], see chunkio.frame_checksum

RUN_COMMITTED = "committed"
RUN_REPLACES = "replaces"  # JSON list of the runs a merged run stands for
RUN_GENERATION = "generation"  # the commit() that covers the run: it counts once that commit is done


class RowState:
    """Values of rows/state."""

    EMPTY = 0  # never recorded: the row holds zeros
    LIVE = 1
    FORGOTTEN = 2  # applied by a forget; still on disk until purged
    PURGED = 3  # forgotten and erased from the file: the row holds zeros

    NAMES = {EMPTY: "empty", LIVE: "live", FORGOTTEN: "forgotten", PURGED: "purged"}


def model_fingerprint(named_shapes: Iterable[tuple[str, Iterable[int]]]) -> dict:
    """Fingerprint of a model from (name, shape) pairs in named_parameters() order."""
    names = [str(name) for name, _ in named_shapes]
    shapes = [[int(d) for d in shape] for _, shape in named_shapes]
    num_params = int(sum(int(np.prod(s)) for s in shapes))
    digest = hashlib.sha256(json.dumps([names, shapes]).encode()).hexdigest()
    return {"names": names, "shapes": shapes, "num_params": num_params, "sha256": digest}


def set_json_attr(obj: Any, name: str, value: Any) -> None:
    """A JSON attribute as a fixed-length byte string: stored inside the object header.

    (A variable-length string lives in HDF5's global heap behind a pointer, and a damaged
    pointer crashes libhdf5 when read: bench/corrupt.py found it.) json.loads reads it back
    from plain h5py too.
    """
    obj.attrs[name] = np.bytes_(json.dumps(value, sort_keys=True).encode())


def get_json_attr(obj: Any, name: str) -> Any:
    """A JSON attribute written by ``set_json_attr`` (or, in version 1 files, as a string)."""
    raw = obj.attrs[name]
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


def _attr_text(obj: Any, name: str) -> str:
    raw = obj.attrs[name]
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def header_crc(h5file: Any) -> int:
    """CRC-32 of a store file's version and config as stored: what a sharded store's manifest records of a shard."""
    return zlib.crc32(f"{int(h5file.attrs[ATTR_VERSION])}|{bytes(h5file.attrs[ATTR_CONFIG]).decode()}".encode())


def write_header(h5file: Any, config: dict, finished: bool = False) -> None:
    h5file.attrs[ATTR_VERSION] = FILE_VERSION
    set_json_attr(h5file, ATTR_CONFIG, config)
    h5file.attrs[ATTR_FINISHED] = bool(finished)


def open_h5(path: Union[str, os.PathLike], mode: str) -> Any:
    """h5py.File, with errors that say what the path is not.

    A file without write permission bits is never opened for writing, even by root.
    """
    if mode == "r+" and os.path.exists(path) and not os.stat(path).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        raise ReadOnlyError(f"{path} is a read-only file (no write permission): open it with mode='r'")
    try:
        return h5py.File(path, mode)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such store") from None
    except OSError as error:
        text = str(error)
        if "signature" in text or "not an HDF5" in text.lower() or "file signature not found" in text:
            raise FormatError(f"{path} is not an HDF5 file") from None
        if "unable to lock file" in text.lower():  # HDF5's own words for a refused flock (not "sblock" of a truncated file)
            raise StoreLockedError(
                f"{path} is open in another process ({'writing' if mode == 'r' else 'reading or writing'} it: HDF5 "
                "file lock); close it there first. Nothing was changed"
            ) from None
        if "permission denied" in text.lower() or "read-only" in text.lower():
            raise ReadOnlyError(f"{path} cannot be opened for writing ({text}): open it with mode='r'") from None
        raise FormatError(f"{path} cannot be opened as HDF5: {text}") from None


def _metadata_checksums(h5file: Any) -> dict:
    header = f"{int(h5file.attrs[ATTR_VERSION])}|{bool(h5file.attrs[ATTR_FINISHED])}|{_attr_text(h5file, ATTR_CONFIG)}"
    sums = {"config": zlib.crc32(header.encode())}  # the version and the finished flag too
    for name, path in (("labels", LABELS), ("state", STATE)):
        sums[name] = zlib.crc32(np.ascontiguousarray(h5file[path][()]).tobytes())
    membership = 0
    if MEMBERSHIP in h5file:
        for part in ("keys", "indptr", "samples"):
            membership = zlib.crc32(np.ascontiguousarray(h5file[MEMBERSHIP][part][()]).tobytes(), membership)
    sums["membership"] = membership
    sums["committed"] = zlib.crc32(_attr_text(h5file, ATTR_COMMITTED).encode()) if ATTR_COMMITTED in h5file.attrs else 0
    return sums


def seal_metadata(h5file: Any) -> None:
    """Record the checksums of the config, labels, state and membership as they are in the file now."""
    set_json_attr(h5file, ATTR_CHECKSUMS, _metadata_checksums(h5file))


def check_metadata(h5file: Any, path: str, version: int, finished: bool) -> None:
    """FormatError when the metadata differs from its checksums (a recording's commit record too)."""
    if ATTR_CHECKSUMS not in h5file.attrs:
        if version >= 2:
            raise FormatError(f"{path}: the '{ATTR_CHECKSUMS}' attribute is missing (damaged file)")
        return
    try:
        expected = get_json_attr(h5file, ATTR_CHECKSUMS)
        actual = _metadata_checksums(h5file)
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise FormatError(f"{path}: metadata cannot be checked ({error}); the file is damaged") from None
    # a recording's labels, state and membership are the cache of its last commit, sealed with it:
    # checked too, since the labels of keys no committed run holds are read from there
    names = ("config", "labels", "state", "membership") if finished else ("config", "committed", "labels", "state",
                                                                          "membership")
    bad = [name for name in names if not isinstance(expected, dict) or expected.get(name) != actual[name]]
    if bad:
        raise FormatError(f"{path}: the store's {', '.join(bad)} fail their checksums; the file is damaged")


def write_membership(h5file: Any, members: dict[int, np.ndarray], name: str = MEMBERSHIP) -> None:
    """members {key: int64 samples} as CSR: membership/keys, membership/indptr, membership/samples
    (in the group ``name``: a fresh one to be moved over membership/ once written)."""
    if name in h5file:
        del h5file[name]
    group = h5file.create_group(name)
    keys = np.array(sorted(members), np.int64)
    lengths = np.array([members[key].size for key in keys.tolist()], np.int64)
    samples = np.concatenate([members[key] for key in keys.tolist()]) if keys.size else np.empty(0, np.int64)
    filters = chunkio.dataset_filters(False, 1)
    group.create_dataset("keys", data=keys, chunks=True if keys.size else None, **(filters if keys.size else {}))
    group.create_dataset("indptr", data=np.concatenate([[0], np.cumsum(lengths)]), chunks=True, **filters)
    group.create_dataset("samples", data=samples, chunks=True if samples.size else None, **(filters if samples.size else {}))


METADATA_MARGIN = 1 << 20  # room kept for HDF5's own metadata (object headers, B-trees) beyond a write's data


def require_room(path: Union[str, os.PathLike], handle: int, data_bytes: int, outcome: str) -> None:
    """WriteFailedError, before a byte is written, when the file system or the file size limit has no room
    for ``data_bytes`` more (plus METADATA_MARGIN).

    HDF5 has no journal: a write refused halfway through a flush leaves some metadata
    updated in place and some not, a file it cannot open. Where the room can be known up
    front, a write that cannot fit is refused before it starts.
    """
    needed = int(data_bytes) + METADATA_MARGIN
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    vfs = os.statvfs(folder)
    if vfs.f_bavail * vfs.f_frsize < needed:
        raise write_failed(path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), outcome)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and os.fstat(handle).st_size + needed > limit:
        raise write_failed(path, OSError(errno.EFBIG, os.strerror(errno.EFBIG)), outcome)


def rewrite_row_metadata(h5file: Any, labels: Optional[np.ndarray] = None, state: Optional[np.ndarray] = None,
                         members: Optional[dict[int, np.ndarray]] = None) -> None:
    """rows/labels, rows/state and membership (those given) as fresh datasets, then the seal over them.

    Until the next flush the file on disk still holds the old ones, untouched: every new
    one is written before any old one is freed, so none lands in an old one's space, and
    a crash (or a refused write, abandoned unflushed) leaves the metadata and its checksums
    agreeing. Rewriting in place would put new bytes under the old seal.
    """
    rows = h5file[ROWS]
    fresh = {name: values for name, values in ((LABELS, labels), (STATE, state)) if values is not None}
    for name, values in fresh.items():
        leaf = name.split("/")[1] + ".new"
        if leaf in rows:
            del rows[leaf]
        rows.create_dataset(leaf, data=values, chunks=True, **chunkio.dataset_filters(False, 1))
    if members is not None:
        write_membership(h5file, members, name=f"{MEMBERSHIP}.new")
    for name in fresh:
        leaf = name.split("/")[1]
        del rows[leaf]
        rows.move(leaf + ".new", leaf)
    if members is not None:
        if MEMBERSHIP in h5file:
            del h5file[MEMBERSHIP]
        h5file.move(f"{MEMBERSHIP}.new", MEMBERSHIP)
    seal_metadata(h5file)


def read_membership(h5file: Any) -> dict[int, np.ndarray]:
    """{key: int64 samples} of a step-keyed store ({} when it has none)."""
    if MEMBERSHIP not in h5file:
        return {}
    group = h5file[MEMBERSHIP]
    keys, indptr, samples = group["keys"][()], group["indptr"][()], group["samples"][()]
    return {int(key): samples[indptr[i] : indptr[i + 1]] for i, key in enumerate(keys.tolist())}


def temp_path(path: Union[str, os.PathLike], purpose: str) -> str:
    """A new, unique file beside ``path`` for a new version of it (``PATH.PURPOSE.XXXXXXXX.tmp``).

    Unique, so that two writers never share one: opening a shared name with h5py's mode "w"
    truncates it before HDF5 takes its lock, wiping the other writer's file.
    """
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    descriptor, tmp = tempfile.mkstemp(prefix=f"{name}.{purpose}.", suffix=".tmp", dir=folder)
    os.close(descriptor)
    return tmp


@contextlib.contextmanager
def new_file_beside(path: Union[str, os.PathLike], purpose: str) -> Iterator[Any]:
    """An HDF5 file at a fresh ``temp_path(path, purpose)`` to fill; on success it is flushed, fsynced and
    closed (the caller renames ``out.filename``, read inside the block, over ``path``). On any
    failure it is removed, ``path`` untouched; an OSError (disk full, file size limit) becomes
    WriteFailedError naming the reason and the file.
    """
    try:
        tmp_path = temp_path(path, purpose)
    except OSError as error:
        raise write_failed(path, error, f"{path} is unchanged") from error
    out = open_h5(tmp_path, "w")
    try:
        yield out
        out.flush()
        os.fsync(out.id.get_vfd_handle())
        out.close()
    except BaseException as error:
        with contextlib.suppress(Exception):
            out.close()
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        if isinstance(error, OSError) and not isinstance(error, StoreError):
            raise write_failed(path, error, f"nothing was changed ({path} is unchanged)") from error
        raise


class Claim:
    """``path`` held for one writer that will put a new file there: the one way a store file is created or
    replaced from outside its own lock (``gradstore.create``, ``transcode``'s destination).

    An existing file is locked as HDF5 locks it (flock, exclusive): a file another process has
    open, reading or writing, is refused with StoreLockedError before a byte changes, and two
    claims of one file cannot both succeed. A new path is taken with a hard link, which fails
    when another writer took it first. ``publish(tmp)`` puts the finished temporary file in place.
    """

    def __init__(self, path: Union[str, os.PathLike], overwrite: bool):
        self.path = os.fspath(path)
        self._held = None
        if not os.path.lexists(self.path):
            return
        if not overwrite:
            raise FileExistsError(f"{self.path} exists; pass overwrite=True to replace it")
        if os.path.isdir(self.path):
            raise IsADirectoryError(f"{self.path} is a directory, not a store file")
        descriptor = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StoreLockedError(f"{self.path} is open in another process (HDF5 file lock): it cannot be "
                                       "replaced while it is read or written; close it there first. Nothing was changed") from None
            raise
        self._held = descriptor

    def publish(self, tmp_path: str) -> None:
        """Rename ``tmp_path`` to the claimed path (it must still be the file claimed, or still absent)."""
        if self._held is None:
            try:
                os.link(tmp_path, self.path)
            except FileExistsError:
                raise StoreLockedError(f"{self.path} was created by another process meanwhile; "
                                       "nothing of it was changed") from None
            except OSError:  # a file system without hard links: a rename, guarded only by the check before it
                if os.path.lexists(self.path):
                    raise StoreLockedError(f"{self.path} was created by another process meanwhile; "
                                           "nothing of it was changed") from None
                os.replace(tmp_path, self.path)
                return
            os.remove(tmp_path)
            return
        held, now = os.fstat(self._held), _stat_or_none(self.path)
        if now is None or (now.st_dev, now.st_ino) != (held.st_dev, held.st_ino):
            raise StoreLockedError(f"{self.path} was replaced or removed by another process meanwhile; "
                                   "nothing of it was changed")
        os.replace(tmp_path, self.path)

    def release(self) -> None:
        if self._held is not None:
            os.close(self._held)
            self._held = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _stat_or_none(path: str) -> Optional[os.stat_result]:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def read_header(h5file: Any, path: str) -> tuple[dict, bool]:
    """(config dict, finished) of a store; FormatError when it is not one we can read."""
    if ATTR_VERSION not in h5file.attrs:
        raise FormatError(f"{path} is an HDF5 file but not a gradstore store (no '{ATTR_VERSION}' attribute)")
    version = int(h5file.attrs[ATTR_VERSION])
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{path} has format version {version}; this gradstore reads up to {FORMAT_VERSION}: upgrade gradstore"
        )
    try:
        config = get_json_attr(h5file, ATTR_CONFIG)
    except (KeyError, ValueError, TypeError) as error:
        raise FormatError(f"{path}: store attribute '{ATTR_CONFIG}' is missing or not JSON ({error})") from None
    required = ("num_params", "num_keys", "keep", "k", "seed", "codec", "zstd_level", "rows_per_chunk")
    missing = [name for name in required if name not in config]
    if missing:
        raise FormatError(f"{path}: store config lacks {missing}")
    if LABELS not in h5file or STATE not in h5file:
        raise FormatError(f"{path}: store lacks its '{LABELS}' or '{STATE}' dataset")
    # the metadata checksums cover decoded values, not the datatypes they are decoded with
    for name, dtype in ((LABELS, "<i8"), (STATE, "|u1")):
        if h5file[name].dtype.str != dtype:
            raise FormatError(f"{path}: '{name}' has datatype {h5file[name].dtype.str}, not {dtype}: the file is damaged")
    finished = bool(h5file.attrs.get(ATTR_FINISHED, False))
    check_metadata(h5file, path, version, finished)
    return config, finished
