"""The one writer of finished store files.

finalize (runs -> rows), purge (rows minus the forgotten ones) and transcode (rows in
another codec) each produce a finished file; all three write it through ``finished_file``:
a new file beside the target, header, row datasets, labels, states, membership, then the
rows, then the chunk checksums, renamed over the target only once it is complete.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Optional, Union

import numpy as np

from . import chunkio
from .codecs import Codec, Part, get_codec
from .format import CHECKSUMS, Claim, ROWS, new_file_beside, seal_metadata, write_header, write_membership

FINAL_CHUNK_BYTES = 64 * 1024  # one row read decodes one chunk: ~40 us at this size
BLOCK_BYTES = 16 << 20  # float32 sums handed to the writer at once


def rows_per_chunk(num_keys: int, k: int, codec: Union[str, dict, Codec]) -> int:
    """Rows per chunk of a finished file: about FINAL_CHUNK_BYTES of the codec's values part."""
    values_part = get_codec(codec).parts(k)[0]
    return max(1, min(num_keys, FINAL_CHUNK_BYTES // (k * values_part.dtype.itemsize)))


class FinishedFileWriter:
    """Row datasets of a finished file being written; ``write_rows`` fills them in key order."""

    def __init__(self, h5file: Any, config: dict, labels: np.ndarray, state: np.ndarray, members: Optional[dict]):
        self.codec = get_codec(config["codec"])
        self.k, self.num_keys = config["k"], config["num_keys"]
        self.rows_per_chunk, self.zstd_level = config["rows_per_chunk"], config["zstd_level"]
        self.parts = self.codec.parts(self.k)
        self.block_rows = self.rows_per_chunk * max(1, BLOCK_BYTES // (4 * self.k * self.rows_per_chunk))
        self._h5 = h5file
        write_header(h5file, config, finished=True)
        rows = h5file.require_group(ROWS)
        self.datasets = {
            part.name: rows.create_dataset(
                part.name, shape=(self.num_keys, part.width), dtype=part.dtype, chunks=(self.rows_per_chunk, part.width),
                **chunkio.dataset_filters(part.shuffle, self.zstd_level),
            )
            for part in self.parts
        }
        rows.create_dataset("labels", data=labels, chunks=True, **chunkio.dataset_filters(False, 1))
        rows.create_dataset("state", data=state, chunks=True, **chunkio.dataset_filters(False, 1))
        if members:
            write_membership(h5file, members)
        seal_metadata(h5file)
        num_chunks = -(-self.num_keys // self.rows_per_chunk)
        self.checksums = {part.name: np.zeros(num_chunks, np.uint32) for part in self.parts}

    def write_rows(self, lo: int, encoded: dict) -> None:
        """Encoded rows {part: [rows, width]} from key ``lo`` (a multiple of rows_per_chunk)."""
        for part in self.parts:
            self.write_part(part, lo, encoded[part.name])

    def write_part(self, part: Part, lo: int, block: np.ndarray) -> None:
        chunkio.write_rows(self.datasets[part.name], lo, block, part.shuffle, self.zstd_level, self.checksums[part.name])

    def copy_chunk(self, part: Part, chunk: int, frame: bytes, checksum: int) -> None:
        """A chunk taken over as stored (its checksum already checked by the caller)."""
        self.datasets[part.name].id.write_direct_chunk((chunk * self.rows_per_chunk, 0), frame)
        self.checksums[part.name][chunk] = checksum

    def seal(self) -> None:
        """checksums/<part>: every chunk's checksum, written once all rows are in."""
        group = self._h5.require_group(CHECKSUMS)
        for name, values in self.checksums.items():
            group.create_dataset(name, data=values)


@contextlib.contextmanager
def finished_file(path: Union[str, os.PathLike], purpose: str, config: dict, labels: Any, state: Any,
                  members: Optional[dict] = None, before_replace: Optional[Callable[[], None]] = None,
                  claim: Optional[Claim] = None) -> Iterator[FinishedFileWriter]:
    """Write a finished store for ``path``: yields a FinishedFileWriter; on success the new file
    replaces ``path`` (``before_replace`` runs just before: close the old file there; ``claim``: the
    ``format.Claim`` of ``path`` when the caller does not hold the file open itself). A failure
    leaves ``path`` as it was and no temporary file behind.
    """
    with new_file_beside(path, purpose) as out:
        tmp_path = out.filename
        writer = FinishedFileWriter(out, config, labels, state, members)
        yield writer
        writer.seal()
    if before_replace is not None:
        before_replace()
    if claim is not None:
        claim.publish(tmp_path)
    else:
        os.replace(tmp_path, path)
