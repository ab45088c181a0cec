"""gradstore: per-sample masked gradients, quantized and zstd-compressed in HDF5.

High level: ``create`` a store and get its ``Recording``: ``accumulate`` batches,
``commit``, ``finalize``, which gives the finished ``Store``; ``open`` a finished file
to ``read`` rows, ``scatter_add`` them into a flat parameter vector, ``mark_forgotten``
and ``purge`` (``open`` of an unfinished file gives its ``Recording`` back, to resume).
``transcode`` rewrites a store in another codec; ``register_codec`` adds one (``codecs``).
``Store`` and a sharded store's ``ShardedStore`` both satisfy ``StoreReader``. The low-level pieces are importable on
their own: ``masks`` (positions from (seed, key)), ``codecs``, ``kernels``, ``chunkio``,
``format``, ``staging``, ``writer``.
"""

__version__ = "0.1.0"

from .api import create, keep_to_k, open  # noqa: E402,A004
from .codecs import Codec, get_codec, register_codec  # noqa: E402
from .errors import (  # noqa: E402
    BadInputError,
    CorruptChunkError,
    FormatError,
    ReadOnlyError,
    StoreError,
    StoreLockedError,
    WriteFailedError,
)
from .format import FORMAT_VERSION, RowState, model_fingerprint  # noqa: E402
from .reader import StoreReader  # noqa: E402
from .recording import Recording  # noqa: E402
from .store import Store  # noqa: E402
from .transcode import transcode  # noqa: E402

__all__ = [
    "BadInputError",
    "Codec",
    "CorruptChunkError",
    "FORMAT_VERSION",
    "FormatError",
    "ReadOnlyError",
    "Recording",
    "RowState",
    "Store",
    "StoreError",
    "StoreLockedError",
    "StoreReader",
    "WriteFailedError",
    "create",
    "get_codec",
    "keep_to_k",
    "model_fingerprint",
    "open",
    "register_codec",
    "transcode",
]
