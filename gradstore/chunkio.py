"""Chunk I/O: zstd frames written straight into HDF5 chunks, and read back.

Each chunk of a row dataset is one whole zstd frame (with its content size and a
content checksum) of the chunk's bytes, byte-shuffled first where the dataset
declares HDF5's shuffle filter. That is exactly what HDF5's own pipeline
(shuffle, then filter 32015) would have produced, so plain h5py + hdf5plugin reads
it with ordinary slicing, while we compress in our own threads, one compressor each.
"""

from __future__ import annotations

import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Optional

import hdf5plugin
import numpy as np
from numpy.typing import DTypeLike
import zstandard

from .errors import CorruptChunkError

ZSTD_FILTER_ID = 32015
_local = threading.local()
_pool = None


_pool_threads = None


def set_worker_threads(count: int) -> None:
    """Threads that compress and decompress chunks (default: the CPUs this process may use)."""
    global _pool, _pool_threads
    if _pool is not None:
        _pool.shutdown()
    _pool, _pool_threads = None, int(count)


def worker_pool() -> ThreadPoolExecutor:
    """The shared compression pool, one compressor per thread."""
    global _pool
    if _pool is None:
        threads = _pool_threads
        if threads is None:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        _pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="gradstore-zstd")
    return _pool


def _compressor(level):
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    if level not in cache:
        cache[level] = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    return cache[level]


def _decompressor():
    if getattr(_local, "decompressor", None) is None:
        _local.decompressor = zstandard.ZstdDecompressor()
    return _local.decompressor


def shuffle_bytes(array: np.ndarray) -> np.ndarray:
    """HDF5's shuffle: byte 0 of every element, then byte 1, ... (a view when itemsize is 1)."""
    itemsize = array.dtype.itemsize
    if itemsize == 1:
        return np.ascontiguousarray(array).view(np.uint8).reshape(-1)
    return np.ascontiguousarray(np.ascontiguousarray(array).view(np.uint8).reshape(-1, itemsize).T).reshape(-1)


def unshuffle_bytes(raw: bytes, dtype: DTypeLike, shape: tuple[int, ...]) -> np.ndarray:
    """Inverse of ``shuffle_bytes``."""
    itemsize = np.dtype(dtype).itemsize
    buf = np.frombuffer(raw, np.uint8)
    if itemsize > 1:
        buf = np.ascontiguousarray(buf.reshape(itemsize, -1).T)
    return buf.view(dtype).reshape(shape)


def dataset_filters(shuffle: bool, level: int) -> dict[str, Any]:
    """h5py create_dataset keywords declaring (shuffle,) zstd: what readers will apply."""
    return dict(shuffle=shuffle, **hdf5plugin.Zstd(clevel=level))


def filter_pipeline(dset: Any) -> list:
    """[[filter id, [client values]], ...] of a dataset, as its creation property list stores them."""
    plist = dset.id.get_create_plist()
    return [[int(code), [int(v) for v in values]] for code, _, values, _ in
            (plist.get_filter(i) for i in range(plist.get_nfilters()))]


def encode_chunk(block: np.ndarray, rows_per_chunk: int, shuffle: bool, level: int) -> bytes:
    """One full chunk (zero-padded to rows_per_chunk rows) as a zstd frame."""
    if block.shape[0] < rows_per_chunk:
        padded = np.zeros((rows_per_chunk,) + block.shape[1:], block.dtype)
        padded[: block.shape[0]] = block
        block = padded
    raw = shuffle_bytes(block) if shuffle else np.ascontiguousarray(block).view(np.uint8).reshape(-1)
    return _compressor(level).compress(raw)


def decode_chunk(frame: bytes, dtype: DTypeLike, rows_per_chunk: int, width: int, shuffle: bool) -> np.ndarray:
    """A zstd frame back to a [rows_per_chunk, width] array; raises ValueError when damaged."""
    expected = rows_per_chunk * width * np.dtype(dtype).itemsize
    try:
        if zstandard.frame_content_size(frame) != expected:
            raise ValueError(f"frame holds {zstandard.frame_content_size(frame)} bytes, chunk needs {expected}")
        raw = _decompressor().decompress(frame)
    except zstandard.ZstdError as error:
        raise ValueError(str(error)) from None
    if len(raw) != expected:
        raise ValueError(f"decoded {len(raw)} bytes, chunk needs {expected}")
    if shuffle:
        return unshuffle_bytes(raw, dtype, (rows_per_chunk, width))
    return np.frombuffer(raw, dtype).reshape(rows_per_chunk, width)


def frame_checksum(index: int, frame: bytes) -> int:
    """CRC-32 of a chunk's stored frame, seeded with the chunk's index: a frame that is
    damaged, or read from another chunk's place (a damaged chunk index), fails it."""
    return zlib.crc32(frame, zlib.crc32(int(index).to_bytes(8, "little")))


def write_rows(dset: Any, first_row: int, rows: np.ndarray, shuffle: bool, level: int,
               checksums: Optional[np.ndarray] = None) -> None:
    """Write rows [n, width] at chunk-aligned ``first_row``, compressing chunks in parallel.

    ``checksums``: a uint32 array indexed by chunk, filled with the written frames' checksums.
    """
    rows_per_chunk = dset.chunks[0]
    if first_row % rows_per_chunk:
        raise ValueError(f"first_row {first_row} is not a multiple of the chunk height {rows_per_chunk}")
    starts = range(0, rows.shape[0], rows_per_chunk)
    frames = worker_pool().map(
        lambda s: encode_chunk(rows[s : s + rows_per_chunk], rows_per_chunk, shuffle, level), starts
    )
    for start, frame in zip(starts, frames):
        dset.id.write_direct_chunk((first_row + start, 0), frame)
        if checksums is not None:
            index = (first_row + start) // rows_per_chunk
            checksums[index] = frame_checksum(index, frame)


def read_chunks(dset: Any, chunk_indices: Iterable[int], shuffle: bool, name_rows: Callable[[int], list],
                checksums: Optional[np.ndarray] = None) -> dict[int, np.ndarray]:
    """Decode the given chunks of a row dataset: {chunk index: array [rows_per_chunk, width]}.

    A chunk that fails its checksum (``checksums``: uint32 per chunk, when the file has
    them) or fails to decode raises CorruptChunkError naming the keys it covers
    (``name_rows(chunk_index)`` gives them).
    """
    rows_per_chunk, width = dset.chunks
    dtype = dset.dtype
    frames = {}
    for index in chunk_indices:
        try:
            filter_mask, frame = dset.id.read_direct_chunk((index * rows_per_chunk, 0))
        except Exception as error:  # h5py raises several types for a missing/damaged chunk
            raise CorruptChunkError(
                f"{dset.name}: chunk {index} cannot be read ({error}); rows {name_rows(index)}", name_rows(index)
            ) from None
        if checksums is not None and (index >= checksums.size or frame_checksum(index, frame) != checksums[index]):
            raise CorruptChunkError(
                f"{dset.name}: chunk {index} fails its checksum (damaged bytes); rows {name_rows(index)}", name_rows(index)
            )
        frames[index] = frame

    def decode(index):
        try:
            return index, decode_chunk(frames[index], dtype, rows_per_chunk, width, shuffle)
        except ValueError as error:
            return index, error

    decoded = {}
    items = worker_pool().map(decode, list(frames)) if len(frames) > 2 else map(decode, list(frames))
    for index, result in items:
        if isinstance(result, Exception):
            raise CorruptChunkError(
                f"{dset.name}: chunk {index} is damaged ({result}); rows {name_rows(index)}", name_rows(index)
            )
        decoded[index] = result
    return decoded
