"""Rewrite a finished store in another codec (as h5repack rewrites filters).

Record once in fp32 and derive fp16 and int8 stores from it: finalize quantizes the
float32 sums once, and fp32 keeps those sums exactly, so a transcoded int8 store holds
the same bytes as one recorded in int8 directly (tests/test_store.py checks this).
"""

import datetime
import os

import numpy as np

from . import chunkio
from .codecs import get_codec
from .errors import BadInputError
from .format import new_file_beside, seal_metadata, write_header
from .store import FINAL_CHUNK_BYTES, _write_membership, write_checksums
from .store import open as open_store


def transcode(source, destination, codec, zstd_level=None, overwrite=False):
    """Write ``source``'s rows, labels, states and membership to ``destination`` in ``codec``.

    The new file is written beside its destination and renamed into place, so a failure
    leaves no partial store. Returns the destination's ``info()``.
    """
    source, destination = os.fspath(source), os.fspath(destination)
    if os.path.abspath(source) == os.path.abspath(destination):
        raise BadInputError(f"transcode writes a new store: destination {destination} is the source")
    if os.path.exists(destination) and not overwrite:
        raise FileExistsError(f"{destination} exists; pass overwrite=True to replace it")
    codec = get_codec(codec)
    with open_store(source) as src:
        src._require_finished("transcode")
        level = src.zstd_level if zstd_level is None else int(zstd_level)
        parts = codec.parts(src.k)
        config = dict(src.config)
        config.update(
            codec=codec.get_config(),
            zstd_level=level,
            rows_per_chunk=max(1, min(src.num_keys, FINAL_CHUNK_BYTES // (src.k * parts[0].dtype.itemsize))),
            transcoded_from=src.config["codec"],
            created_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        )
        rows_per_chunk = config["rows_per_chunk"]
        with new_file_beside(destination, "transcode") as out:
            write_header(out, config, finished=True)
            rows = out.create_group("rows")
            datasets = {
                part.name: rows.create_dataset(
                    part.name, shape=(src.num_keys, part.width), dtype=part.dtype, chunks=(rows_per_chunk, part.width),
                    **chunkio.dataset_filters(part.shuffle, level),
                )
                for part in parts
            }
            rows.create_dataset("labels", data=src.labels, chunks=True, **chunkio.dataset_filters(False, 1))
            rows.create_dataset("state", data=src.state, chunks=True, **chunkio.dataset_filters(False, 1))
            if src.members:
                _write_membership(out, src.members)
            seal_metadata(out)
            num_chunks = -(-src.num_keys // rows_per_chunk)
            checksums = {part.name: np.zeros(num_chunks, np.uint32) for part in parts}
            block_rows = rows_per_chunk * max(1, (16 << 20) // (4 * src.k * rows_per_chunk))
            for lo in range(0, src.num_keys, block_rows):
                keys = np.arange(lo, min(src.num_keys, lo + block_rows), dtype=np.int64)
                sums = src.codec.decode(src._read_parts(keys))
                encoded = codec.encode(np.ascontiguousarray(sums, np.float32), keys, src.seed)
                for part in parts:
                    chunkio.write_rows(datasets[part.name], lo, encoded[part.name], part.shuffle, level,
                                       checksums[part.name])
            write_checksums(out, checksums)
    os.replace(destination + ".transcode.tmp", destination)
    with open_store(destination) as dst:
        return dst.info()
