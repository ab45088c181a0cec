"""The entry points: ``create`` a recording, ``open`` a store file of either kind.

h5py's layering: these and the two classes they return (``Recording``, ``Store``) are
the friendly level; ``masks``, ``codecs``, ``kernels``, ``chunkio``, ``format``,
``staging`` and ``writer`` are the explicit one underneath.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING, Any, Optional, Union

import numpy as np

from . import __version__, chunkio
from .clock import created_at
from .base import load
from .codecs import Codec, codec_to_write
from .checks import ZSTD_LEVELS, check_integer, check_labels, check_number
from .errors import BadInputError, FormatError, StoreError, write_failed
from .format import ROWS, Claim, open_h5, seal_metadata, temp_path, write_header
from .joined import ShardedStore, open_manifest
from .reader import StoreReader
from .recording import DEFAULT_MEMORY_BUDGET, Recording
from .shards import is_manifest
from .store import Store
from .writer import rows_per_chunk

PathLike = Union[str, os.PathLike]

if TYPE_CHECKING:  # mypy checks that both finished kinds satisfy the protocol
    _readers: tuple[type[StoreReader], ...] = (Store, ShardedStore)


def keep_to_k(keep: float, num_params: int) -> int:
    """Number of values a row keeps: round(keep * num_params), refused when it would be 0."""
    keep = check_number("keep", keep)
    if not (0 < keep <= 1):
        raise BadInputError(f"keep must be in (0, 1], got {keep!r}")
    k = int(round(keep * num_params))
    if k < 1:
        raise BadInputError(f"keep={keep} of {num_params} parameters keeps no value; raise keep")
    return k


def create(
    path: PathLike,
    num_params: int,
    num_keys: int,
    keep: float,
    *,
    codec: Union[str, dict, Codec] = "int8",
    seed: int = 0,
    zstd_level: int = 1,
    key_kind: str = "sample",
    fingerprint: Optional[dict] = None,
    identity: Optional[dict] = None,
    labels: Any = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    buffer_dir: Optional[PathLike] = None,
    overwrite: bool = False,
    writer: Optional[dict] = None,
) -> Recording:
    """Create a store file and return its ``Recording``, ready for ``accumulate``.

    num_params: M, the model's flat parameter count. num_keys: rows (keys 0..num_keys-1).
    keep: p, the fraction of the M values each row keeps. codec: 'fp32', 'fp16', 'int8'
    or a codec config dict. memory_budget: bytes of float32 sums held before spilling.
    buffer_dir: keep those sums in a memory-mapped scratch file in this folder (a budget
    larger than RAM then pages to disk instead of exhausting memory).
    fingerprint: from ``format.model_fingerprint`` (checked at forget time by callers).
    identity: a JSON object naming the run that records this store (unlearn's run id, data
    fingerprint, mask seed, model fingerprint); kept in the checksummed config, so that a
    store copied into another run's place can be told apart (checked by callers).
    writer: {"run_id", "rank", "ranks"} when this is one rank's recording of a sharded
    store (``gradstore.shards``); finalize then goes through ``shards.finalize_shard``.
    """
    path = os.fspath(path)
    num_params = check_integer("num_params", num_params, 1, 2**32 - 1)  # below 2**32: the mask kernel's limit
    num_keys = check_integer("num_keys", num_keys, 1, 2**63 - 1)
    seed = check_integer("seed", seed, 0, 2**63 - 1)
    zstd_level = check_integer("zstd_level", zstd_level, *ZSTD_LEVELS)
    memory_budget = check_integer("memory_budget", memory_budget, 0, 2**63 - 1)
    if key_kind not in ("sample", "step"):
        raise BadInputError(f"key_kind must be 'sample' or 'step', got {key_kind!r}")
    if fingerprint is not None and fingerprint.get("num_params") != num_params:
        raise BadInputError(
            f"fingerprint counts {fingerprint.get('num_params')} parameters but num_params is {num_params}"
        )
    if writer is not None:
        writer = _check_writer(writer)
    if identity is not None:
        if not isinstance(identity, dict):
            raise BadInputError(f"identity must be a JSON object (dict), got {type(identity).__name__}")
        try:
            identity = json.loads(json.dumps(identity, allow_nan=False))
        except (TypeError, ValueError) as error:
            raise BadInputError(f"identity must be JSON (strings, numbers, lists, dicts): {error}") from None
    k = keep_to_k(keep, num_params)
    row_codec = codec_to_write(codec)
    config = {
        "num_params": num_params,
        "num_keys": num_keys,
        "keep": float(keep),
        "k": k,
        "seed": seed,
        "codec": row_codec.get_config(),
        "zstd_level": int(zstd_level),
        "rows_per_chunk": rows_per_chunk(num_keys, k, row_codec),
        "key_kind": key_kind,
        "fingerprint": fingerprint,
        **({"identity": identity} if identity is not None else {}),
        **({"writer": writer} if writer is not None else {}),
        "package_version": __version__,
        "created_at": created_at(),
    }
    label_array = check_labels(labels, num_keys) if labels is not None else np.full(num_keys, -1, np.int64)
    if buffer_dir is not None and not os.path.isdir(buffer_dir):
        raise BadInputError(f"buffer_dir {os.fspath(buffer_dir)!r} is not a directory")
    with Claim(path, overwrite) as claim:  # nothing at ``path`` changes until the new file is whole
        tmp_path, h5file = None, None
        try:
            tmp_path = temp_path(path, "create")
            h5file = open_h5(tmp_path, "w")  # our own fresh file: truncating it harms no one
            write_header(h5file, config, finished=False)
            rows = h5file.create_group(ROWS)
            rows.create_dataset("labels", data=label_array, chunks=True, **chunkio.dataset_filters(False, 1))
            rows.create_dataset("state", data=np.zeros(num_keys, np.uint8), chunks=True,
                                **chunkio.dataset_filters(False, 1))
            seal_metadata(h5file)
            h5file.flush()
            os.fsync(h5file.id.get_vfd_handle())
            claim.publish(tmp_path)  # the open file (and HDF5's lock on it) is now the one at ``path``
        except BaseException as error:
            if h5file is not None:
                with contextlib.suppress(Exception):
                    h5file.close()
            if tmp_path is not None:
                with contextlib.suppress(OSError):
                    os.remove(tmp_path)
            if isinstance(error, OSError) and not isinstance(error, StoreError):
                raise write_failed(path, error, "nothing was changed") from error
            raise
    return Recording(path, h5file, config, writable=True, memory_budget=memory_budget, buffer_dir=buffer_dir)


def open(path: PathLike, mode: str = "r") -> Union[Store, Recording, ShardedStore]:  # noqa: A001 - mirrors h5py.File
    """Open an existing store file: a finished file gives its ``Store``, an unfinished one its
    ``Recording`` (to resume), a sharded store's entry point its ``ShardedStore``. mode 'r' reads; 'r+' also writes (accumulate, commit,
    finalize; mark_forgotten, purge)."""
    if mode not in ("r", "r+"):
        raise BadInputError(f"mode must be 'r' or 'r+', got {mode!r}")
    path = os.fspath(path)

    h5file = open_h5(path, mode)
    try:
        manifest = is_manifest(h5file)
    except Exception as error:  # h5py on a damaged root group: KeyError, OSError, RuntimeError, ...
        h5file.close()
        raise FormatError(f"{path}: damaged store: its root attributes cannot be read ({type(error).__name__}: "
                          f"{' '.join(str(error).split())})") from None
    if manifest:  # the entry point of a sharded store
        return open_manifest(path, h5file, mode)
    h5file.close()

    def make(h5file, config, finished):
        kind = Store if finished else Recording
        return kind(path, h5file, config, writable=(mode == "r+"))

    return load(path, mode, make)


def _check_writer(writer):
    try:
        run_id, rank, ranks = str(writer["run_id"]), int(writer["rank"]), int(writer["ranks"])
    except (KeyError, TypeError, ValueError):
        raise BadInputError(f"writer must be {{'run_id': str, 'rank': int, 'ranks': int}}, got {writer!r}") from None
    if not run_id or not 0 <= rank < ranks:
        raise BadInputError(f"writer needs a run_id and 0 <= rank < ranks, got {writer!r}")
    return {"run_id": run_id, "rank": rank, "ranks": ranks}
