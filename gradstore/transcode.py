"""Rewrite a finished store in another codec (as h5repack rewrites filters).

Record once in fp32 and derive fp16 and int8 stores from it: finalize quantizes the
float32 sums once, and fp32 keeps those sums exactly, so a transcoded int8 store holds
the same bytes as one recorded in int8 directly (tests/test_store.py checks this).
"""

from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np

from .api import open as open_store
from .checks import ZSTD_LEVELS, check_integer
from .clock import created_at
from .codecs import Codec, codec_to_write
from .errors import BadInputError
from .format import Claim
from .recording import Recording
from .writer import finished_file, rows_per_chunk


def transcode(source: Union[str, os.PathLike], destination: Union[str, os.PathLike], codec: Union[str, dict, Codec],
              zstd_level: Optional[int] = None, overwrite: bool = False) -> dict:
    """Write ``source``'s rows, labels, states and membership to ``destination`` in ``codec``.

    The new file is written beside its destination and renamed into place, so a failure
    leaves no partial store. Returns the destination's ``info()``.
    """
    source, destination = os.fspath(source), os.fspath(destination)
    if os.path.abspath(source) == os.path.abspath(destination):
        raise BadInputError(f"transcode writes a new store: destination {destination} is the source")
    if os.path.exists(destination) and not overwrite:
        raise FileExistsError(f"{destination} exists; pass overwrite=True to replace it")
    new_codec = codec_to_write(codec)
    with open_store(source) as src, Claim(destination, overwrite) as claim:  # a destination in use is refused
        if isinstance(src, Recording):
            raise BadInputError(f"{source}: cannot transcode before finalize(): recording has not finished")
        config = dict(src.config)
        config.update(
            codec=new_codec.get_config(),
            zstd_level=src.zstd_level if zstd_level is None else check_integer("zstd_level", zstd_level, *ZSTD_LEVELS),
            rows_per_chunk=rows_per_chunk(src.num_keys, src.k, new_codec),
            transcoded_from=src.config["codec"],
            created_at=created_at(),
        )
        with finished_file(destination, "transcode", config, src.labels, src.state, src.members, claim=claim) as out:
            for lo, sums in src.blocks(out.block_rows):
                keys = np.arange(lo, lo + sums.shape[0], dtype=np.int64)
                out.write_rows(lo, new_codec.encode(np.ascontiguousarray(sums, np.float32), keys, src.seed))
    with open_store(destination) as dst:
        return dst.info()
