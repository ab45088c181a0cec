"""Row codecs: how a row of k float32 values becomes stored arrays, and back.

Modelled on numcodecs' ``Codec``: each codec has ``encode``/``decode`` and a JSON
``get_config()`` that is stored in the file, so a store says how to decode itself.
A codec stores a row as one or more *parts* (``values``, ``scales``), each a 2-D
dataset with one row per key; ``parts(k)`` says which, with what dtype and width.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from . import kernels
from .errors import FormatError

# Chosen by measurement (docs/RESULTS.md, "int8 block size", `python -m bench codecs`):
# on real MNIST CNN gradients, 1024 is the smallest block whose all-in bytes per value
# meet the 0.75 B target (0.72 B at 1.5% row error; 256 gives 0.82 B at 1.0%).
DEFAULT_INT8_BLOCK = 1024


@dataclass(frozen=True)
class Part:
    """One stored array of a row: its dataset name, dtype, width, and byte-shuffle."""

    name: str
    dtype: np.dtype
    width: int
    shuffle: bool


class Codec(ABC):
    """Interface: encode float32 rows to parts, decode them back, describe itself in JSON."""

    id = None

    def get_config(self):
        return {"id": self.id}

    @abstractmethod
    def parts(self, k):
        ...

    @abstractmethod
    def encode(self, values, keys, seed):
        """float32 [n, k] -> {part name: array [n, width]}; keys/seed feed stochastic rounding."""
        ...

    @abstractmethod
    def decode(self, parts):
        """{part name: array [n, width]} -> float32 [n, k]."""
        ...

    @abstractmethod
    def scatter_operands(self, parts):
        """(values, scales, block_size) for ``kernels.scatter_add``: value * scales[j // block]."""
        ...

    def __repr__(self):
        return f"{type(self).__name__}({self.get_config()})"


class Float32(Codec):
    """Lossless: the float32 values, byte-shuffled before zstd."""

    id = "fp32"

    def parts(self, k):
        return [Part("values", np.dtype(np.float32), k, True)]

    def encode(self, values, keys, seed):
        return {"values": np.ascontiguousarray(values, dtype=np.float32)}

    def decode(self, parts):
        return parts["values"]

    def scatter_operands(self, parts):
        values = parts["values"]
        return values, np.ones((values.shape[0], 1), np.float32), values.shape[1]


class Float16(Codec):
    """fp16 values of x / s, s a power of two per row (float32): fp16's precision, float32's range."""

    id = "fp16"

    def parts(self, k):
        return [Part("values", np.dtype(np.float16), k, True), Part("scales", np.dtype(np.float32), 1, True)]

    def encode(self, values, keys, seed):
        values = np.ascontiguousarray(values, dtype=np.float32)
        scales = np.empty((values.shape[0], 1), np.float32)
        kernels.row_pow2_scales(values, scales)
        return {"values": (values / scales).astype(np.float16), "scales": scales}

    def decode(self, parts):
        return parts["values"].astype(np.float32) * parts["scales"]

    def scatter_operands(self, parts):
        values = parts["values"].astype(np.float32)
        return values, parts["scales"], values.shape[1]


class Int8Block(Codec):
    """int8 with one float32 absmax scale per block of ``block_size`` consecutive values."""

    id = "int8"
    ROUNDINGS = ("nearest", "stochastic")

    def __init__(self, block_size=DEFAULT_INT8_BLOCK, rounding="nearest"):
        if int(block_size) != block_size or block_size < 1:
            raise ValueError(f"int8 block_size must be a positive integer, got {block_size!r}")
        if rounding not in self.ROUNDINGS:
            raise ValueError(f"int8 rounding must be one of {self.ROUNDINGS}, got {rounding!r}")
        self.block_size = int(block_size)
        self.rounding = rounding

    def get_config(self):
        return {"id": self.id, "block_size": self.block_size, "rounding": self.rounding}

    def num_blocks(self, k):
        return -(-k // self.block_size)

    def parts(self, k):
        return [
            Part("values", np.dtype(np.int8), k, False),
            Part("scales", np.dtype(np.float32), self.num_blocks(k), True),
        ]

    def encode(self, values, keys, seed):
        values = np.ascontiguousarray(values, dtype=np.float32)
        n, k = values.shape
        q = np.empty((n, k), np.int8)
        scales = np.empty((n, self.num_blocks(k)), np.float32)
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        kernels.quantize_int8(values, keys, self.block_size, self.rounding == "stochastic", seed, q, scales)
        return {"values": q, "scales": scales}

    def decode(self, parts):
        q = parts["values"]
        out = np.empty(q.shape, np.float32)
        kernels.dequantize_int8(q, parts["scales"], self.block_size, out)
        return out

    def scatter_operands(self, parts):
        return parts["values"], parts["scales"], self.block_size


CODECS = {"fp32": Float32, "fp16": Float16, "int8": Int8Block}


def get_codec(spec):
    """A codec from its name ('int8'), its JSON config ({'id': 'int8', ...}) or a Codec."""
    if isinstance(spec, Codec):
        return spec
    if isinstance(spec, str):
        spec = {"id": spec}
    if not isinstance(spec, dict) or spec.get("id") not in CODECS:
        raise FormatError(f"unknown codec {spec!r}; known: {sorted(CODECS)}")
    options = {key: value for key, value in spec.items() if key != "id"}
    try:
        return CODECS[spec["id"]](**options)
    except TypeError as error:
        raise FormatError(f"bad options for codec {spec['id']!r}: {options} ({error})") from None
