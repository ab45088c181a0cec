"""Row codecs: how a row of k float32 values becomes stored arrays, and back.

Modelled on numcodecs' ``Codec`` and registry: each codec class has a ``codec_id`` and
a JSON ``get_config()`` that is stored in the file (``{"id": codec_id, ...}``), so a store
says how to decode itself; ``register_codec`` puts a class in ``CODECS`` and
``get_codec`` turns a stored config back into a codec through that registry.
A codec stores a row as one or more *parts* (``values``, ``scales``), each a 2-D
dataset with one row per key; ``parts(k)`` says which, with what dtype and width.
A new codec needs ``parts``, ``encode``, ``decode`` and ``error_bound``; a fast
scatter-add (``scatter_operands``) and value checks (``check_parts``) are optional.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Union

import numpy as np

from . import kernels
from .errors import BadInputError, FormatError

# Chosen by measurement (docs/RESULTS.md, "int8 block size", `python -m bench codecs`):
# on real MNIST CNN gradients, 1024 is the smallest block whose all-in bytes per value
# meet the 0.75 B target (0.72 B at 1.5% row error; 256 gives 0.82 B at 1.0%).
DEFAULT_INT8_BLOCK = 1024
# Sub-byte codecs (issue 25): chosen by measurement too (docs/RESULTS.md, "Sub-byte codecs",
# `python -m bench codecs --packed`): the smallest block whose all-in bytes per value on trained
# MNIST gradients fit the 100x budget at the p each width is for (int4: 2.7 bits at p = 0.005;
# int2 and sign: 1.33 bits at p = 0.01).
DEFAULT_INT4_BLOCK = 256
DEFAULT_INT2_BLOCK = 128
DEFAULT_SIGN_BLOCK = 128
DEFAULT_INT4_STOCHASTIC_BLOCK = 64  # above 64 its stated error (one step) exceeds heavy-tailed rows themselves

Parts = Mapping[str, np.ndarray]
Problems = list  # [(row indices into the parts, problem text)]: what ``check_parts`` finds


@dataclass(frozen=True)
class Part:
    """One stored array of a row: its dataset name, dtype, width, and byte-shuffle."""

    name: str
    dtype: np.dtype
    width: int
    shuffle: bool


class Codec(ABC):
    """Interface: encode float32 rows to parts, decode them back, describe itself in JSON.

    Two codecs are equal when they are of one class and have one config: they write the
    same bytes. ``codec_id`` is the codec's one identity; a subclass that sets its own
    ``codec_id`` is a new codec (registered under that id, and its config says so).
    """

    codec_id: ClassVar[str]

    def get_config(self) -> dict:
        """The JSON object stored as the store's ``codec``: ``{"id": codec_id}`` plus any options."""
        return {"id": self.codec_id}

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Codec:
        """The codec a config describes (its ``"id"`` must be this class's ``codec_id``)."""
        if config.get("id") != cls.codec_id:
            raise FormatError(f"config {dict(config)!r} is not of codec {cls.codec_id!r}")
        options = {key: value for key, value in config.items() if key != "id"}
        try:
            return cls(**options)
        except (TypeError, ValueError) as error:  # BadInputError is a ValueError: a stored config gives FormatError
            raise FormatError(f"bad options for codec {cls.codec_id!r}: {options} ({error})") from None

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, Codec) and other.get_config() == self.get_config()

    def __hash__(self) -> int:
        return hash((type(self), json.dumps(self.get_config(), sort_keys=True)))

    @abstractmethod
    def parts(self, k: int) -> list[Part]:
        """The stored arrays of a row of ``k`` values (the first is ``values``: it sizes the chunks)."""

    @abstractmethod
    def encode(self, values: np.ndarray, keys: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        """float32 [n, k] -> {part name: array [n, width]}; keys/seed feed stochastic rounding."""

    @abstractmethod
    def decode(self, parts: Parts) -> np.ndarray:
        """{part name: array [n, width]} -> float32 [n, k] (zero rows in give a [0, k] array)."""

    @abstractmethod
    def error_bound(self, values: np.ndarray) -> np.ndarray:
        """Per element, the most ``decode(encode(values))`` may differ from float32 ``values`` [n, k]
        (the codec's stated error, checked by tests/test_codec_registry.py)."""

    def decode_with_k(self, parts: Parts, k: int) -> np.ndarray:
        """``decode``, told the row length k: what the store calls. By default ``decode(parts)``; a codec
        whose parts do not fix k (packed sub-byte codes: k and k + 1 values may fill the same bytes)
        overrides it."""
        return self.decode(parts)

    def packed_operands(self, parts: Parts) -> Optional[tuple[np.ndarray, np.ndarray, int, int, np.ndarray]]:
        """(packed uint8 codes, scales, block_size, bits, table) for ``kernels.scatter_add_packed``, which
        decodes code c of value j as table[c] * scales[j // block] inside the scatter; None (the default):
        the codec is applied through ``scatter_operands``."""
        return None

    def scatter_operands(self, parts: Parts) -> tuple[np.ndarray, np.ndarray, int]:
        """(values, scales, block_size) for ``kernels.scatter_add``: value * scales[j // block].

        By default the decoded rows with unit scales (decode-then-add); a codec whose parts
        the kernel can apply as stored overrides this and skips the float32 copy.
        """
        values = np.ascontiguousarray(self.decode(parts), np.float32)
        return values, np.ones((values.shape[0], 1), np.float32), max(1, values.shape[1])

    def check_parts(self, parts: Parts) -> Problems:
        """Rows of these stored parts holding what this codec never writes: [(row indices, problem)].

        ``verify`` calls it on every chunk; by default there is nothing to check.
        """
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.get_config()})"


def finite_problems(parts: Parts, nonnegative: tuple[str, ...] = ()) -> Problems:
    """Rows whose float parts hold NaN or Inf, or a negative value in a ``nonnegative`` part."""
    problems = []
    for name, block in parts.items():
        if block.dtype.kind != "f":
            continue
        bad = kernels.rows_not_finite(np.ascontiguousarray(block, np.float32))
        if bad.size:
            problems.append((bad, f"{name}: NaN or Inf"))
        if name in nonnegative:
            negative = np.nonzero((block < 0).any(axis=1))[0]
            if negative.size:
                problems.append((negative, f"{name}: negative"))
    return problems


class Float32(Codec):
    """Lossless: the float32 values, byte-shuffled before zstd."""

    codec_id = "fp32"

    def parts(self, k: int) -> list[Part]:
        return [Part("values", np.dtype(np.float32), k, True)]

    def encode(self, values: np.ndarray, keys: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        return {"values": np.ascontiguousarray(values, dtype=np.float32)}

    def decode(self, parts: Parts) -> np.ndarray:
        return parts["values"]

    def error_bound(self, values: np.ndarray) -> np.ndarray:
        return np.zeros(np.shape(values))

    def scatter_operands(self, parts: Parts) -> tuple[np.ndarray, np.ndarray, int]:
        values = parts["values"]
        return values, np.ones((values.shape[0], 1), np.float32), values.shape[1]

    def check_parts(self, parts: Parts) -> Problems:
        return finite_problems(parts)


class Float16(Codec):
    """fp16 values of x / s, s a power of two per row (float32): fp16's precision, float32's range."""

    codec_id = "fp16"

    def parts(self, k: int) -> list[Part]:
        return [Part("values", np.dtype(np.float16), k, True), Part("scales", np.dtype(np.float32), 1, True)]

    def encode(self, values: np.ndarray, keys: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        values = np.ascontiguousarray(values, dtype=np.float32)
        scales = np.empty((values.shape[0], 1), np.float32)
        kernels.row_pow2_scales(values, scales)
        return {"values": (values / scales).astype(np.float16), "scales": scales}

    def decode(self, parts: Parts) -> np.ndarray:
        return parts["values"].astype(np.float32) * parts["scales"]

    def error_bound(self, values: np.ndarray) -> np.ndarray:
        """fp16 rounding (2**-11 relative) of x / s, s <= 2 max|x|; fp16 subnormals step 2**-24 s."""
        values = np.abs(np.asarray(values, np.float64))
        rowmax = values.max(axis=1, keepdims=True) if values.size else np.zeros((values.shape[0], 1))
        return 2.0**-11 * values + 2.0**-24 * rowmax

    def scatter_operands(self, parts: Parts) -> tuple[np.ndarray, np.ndarray, int]:
        values = parts["values"].astype(np.float32)
        return values, parts["scales"], values.shape[1]

    def check_parts(self, parts: Parts) -> Problems:
        return finite_problems(parts, nonnegative=("scales",))


class Int8Block(Codec):
    """int8 with one float32 absmax scale per block of ``block_size`` consecutive values."""

    codec_id = "int8"
    ROUNDINGS = ("nearest", "stochastic")

    def __init__(self, block_size: int = DEFAULT_INT8_BLOCK, rounding: str = "nearest"):
        if int(block_size) != block_size or block_size < 1:
            raise BadInputError(f"int8 block_size must be a positive integer, got {block_size!r}")
        if rounding not in self.ROUNDINGS:
            raise BadInputError(f"int8 rounding must be one of {self.ROUNDINGS}, got {rounding!r}")
        self.block_size = int(block_size)
        self.rounding = rounding

    def get_config(self) -> dict:
        return {"id": self.codec_id, "block_size": self.block_size, "rounding": self.rounding}

    def num_blocks(self, k: int) -> int:
        return -(-k // self.block_size)

    def parts(self, k: int) -> list[Part]:
        return [
            Part("values", np.dtype(np.int8), k, False),
            Part("scales", np.dtype(np.float32), self.num_blocks(k), True),
        ]

    def encode(self, values: np.ndarray, keys: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        values = np.ascontiguousarray(values, dtype=np.float32)
        n, k = values.shape
        q = np.empty((n, k), np.int8)
        scales = np.empty((n, self.num_blocks(k)), np.float32)
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        kernels.quantize_int8(values, keys, self.block_size, self.rounding == "stochastic", seed, q, scales)
        return {"values": q, "scales": scales}

    def decode(self, parts: Parts) -> np.ndarray:
        q = parts["values"]
        out = np.empty(q.shape, np.float32)
        kernels.dequantize_int8(q, parts["scales"], self.block_size, out)
        return out

    def error_bound(self, values: np.ndarray) -> np.ndarray:
        """Half a step (a whole step when stochastic) of the block's absmax / 127, plus float32 rounding."""
        values = np.abs(np.asarray(values, np.float64))
        n, k = values.shape
        padded = np.zeros((n, self.num_blocks(k) * self.block_size))
        padded[:, :k] = values
        step = padded.reshape(n, -1, self.block_size).max(axis=2) / 127
        half = 1.0 if self.rounding == "stochastic" else 0.5
        return np.repeat(step, self.block_size, axis=1)[:, :k] * (half + 1e-4)

    def scatter_operands(self, parts: Parts) -> tuple[np.ndarray, np.ndarray, int]:
        return parts["values"], parts["scales"], self.block_size

    def check_parts(self, parts: Parts) -> Problems:
        problems = finite_problems(parts, nonnegative=("scales",))
        out_of_range = np.nonzero((parts["values"] == -128).any(axis=1))[0]
        if out_of_range.size:
            problems.append((out_of_range, "values: int8 -128 never written"))
        return problems


class PackedBlock(Codec):
    """Sub-byte codes, ``8 // bits`` a byte, with one float32 scale per block of ``block_size`` values.

    ``bits`` 4 (int4) or 2 (int2, ternary): signed q in [-levels, levels] (levels 7 and 1), stored as
    its two's complement in ``bits`` bits (the most negative code never written), scale =
    absmax / levels; ``bits`` 1 (sign): code 1 for x < 0, 0 otherwise, scale = mean |x| of the block.
    Code j of a row sits in byte j // (8 // bits) at bit offset (j % (8 // bits)) * bits.
    Subclasses set the class constants; each is a codec of its own id (docs/FORMAT.md).
    """

    bits: ClassVar[int]
    levels: ClassVar[int]
    mode: ClassVar[int] = kernels.MODE_NEAREST
    default_block: ClassVar[int]

    def __init__(self, block_size: Optional[int] = None):
        block_size = self.default_block if block_size is None else block_size
        if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
            raise BadInputError(f"{self.codec_id} block_size must be a positive integer, got {block_size!r}")
        self.block_size = int(block_size)

    def get_config(self) -> dict:
        return {"id": self.codec_id, "block_size": self.block_size}

    @classmethod
    def table(cls) -> np.ndarray:
        """float32 [2**bits]: the value of each code (times its block's scale)."""
        if cls.mode == kernels.MODE_SIGN:
            return np.array([1.0, -1.0], np.float32)
        codes = np.arange(1 << cls.bits)
        return np.where(codes >= 1 << (cls.bits - 1), codes - (1 << cls.bits), codes).astype(np.float32)

    def num_blocks(self, k: int) -> int:
        return -(-k // self.block_size)

    def packed_width(self, k: int) -> int:
        return -(-k // (8 // self.bits))

    def parts(self, k: int) -> list[Part]:
        return [
            Part("values", np.dtype(np.uint8), self.packed_width(k), False),
            Part("scales", np.dtype(np.float32), self.num_blocks(k), True),
        ]

    def encode(self, values: np.ndarray, keys: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        values = np.ascontiguousarray(values, dtype=np.float32)
        n, k = values.shape
        packed = np.zeros((n, self.packed_width(k)), np.uint8)
        scales = np.empty((n, self.num_blocks(k)), np.float32)
        keys = np.ascontiguousarray(keys, dtype=np.int64)
        kernels.quantize_packed(values, keys, self.block_size, self.bits, self.levels, self.mode, seed, packed, scales)
        return {"values": packed, "scales": scales}

    def decode(self, parts: Parts) -> np.ndarray:
        """Every code the bytes and blocks hold: [n, min(width * (8 // bits), blocks * block_size)], k rounded up
        (k and k + 1 values can fill the same bytes); ``decode_with_k`` (what the store calls) cuts it to k."""
        return self.decode_with_k(parts, min(parts["values"].shape[1] * (8 // self.bits),
                                             parts["scales"].shape[1] * self.block_size))

    def decode_with_k(self, parts: Parts, k: int) -> np.ndarray:
        packed, scales = parts["values"], parts["scales"]
        out = np.empty((packed.shape[0], k), np.float32)
        if packed.shape[1] * (8 // self.bits) < k or scales.shape[1] * self.block_size < k:
            raise FormatError(f"codec {self.codec_id!r}: parts of widths {packed.shape[1]}, {scales.shape[1]} "
                              f"cannot hold {k} values")
        kernels.dequantize_packed(np.ascontiguousarray(packed), np.ascontiguousarray(scales, np.float32), self.block_size,
                                  self.bits, self.table(), out)
        return out

    def error_bound(self, values: np.ndarray) -> np.ndarray:
        """Nearest: at most half a step (absmax / levels) and at most |x| (0 is a level); stochastic: one
        step; sign: exactly | |x| - mean|x| | of the block. Plus float32 rounding."""
        values = np.abs(np.asarray(values, np.float64))
        n, k = values.shape
        padded = np.zeros((n, self.num_blocks(k) * self.block_size))
        padded[:, :k] = values
        blocks = padded.reshape(n, -1, self.block_size)
        if self.mode == kernels.MODE_SIGN:
            counts = np.minimum(self.block_size, k - np.arange(self.num_blocks(k)) * self.block_size)
            scale = np.repeat(blocks.sum(axis=2) / counts, self.block_size, axis=1)[:, :k]
            return np.abs(values - scale) + 1e-5 * scale
        step = np.repeat(blocks.max(axis=2) / self.levels, self.block_size, axis=1)[:, :k]
        if self.mode == kernels.MODE_STOCHASTIC:
            return step * (1 + 1e-4)
        return np.minimum(values * (1 + 1e-4), step * (0.5 + 1e-4))

    def packed_operands(self, parts: Parts) -> Optional[tuple[np.ndarray, np.ndarray, int, int, np.ndarray]]:
        return (np.ascontiguousarray(parts["values"]), np.ascontiguousarray(parts["scales"], np.float32),
                self.block_size, self.bits, self.table())

    def check_parts(self, parts: Parts) -> Problems:
        problems = finite_problems(parts, nonnegative=("scales",))
        packed = parts["values"]
        if packed.shape[0] == 0:
            return problems
        per_byte = 8 // self.bits
        codes = (packed[:, :, None] >> (np.arange(per_byte, dtype=np.uint8) * self.bits)) & ((1 << self.bits) - 1)
        codes = codes.reshape(packed.shape[0], -1)
        if self.mode != kernels.MODE_SIGN:
            never = 1 << (self.bits - 1)
            bad = np.nonzero((codes == never).any(axis=1))[0]
            if bad.size:
                problems.append((bad, f"values: code {never} ({-never}) never written"))
        return problems


CODECS: dict[str, type[Codec]] = {}  # codec_id -> class: every codec a store may name


def decoded_rows(codec: Codec, parts: Parts, rows: int, k: int) -> np.ndarray:
    """``codec.decode_with_k(parts, k)``, held to its contract: float32 [rows, k]. A codec that returns another
    shape would have its values scattered to positions drawn for another k, so it is refused, named."""
    values = codec.decode_with_k(parts, k)
    if not isinstance(values, np.ndarray) or values.shape != (rows, k) or values.dtype != np.float32:
        raise FormatError(f"codec {codec.codec_id!r} decoded {rows} rows of {k} values to "
                          f"{getattr(values, 'dtype', type(values).__name__)} {getattr(values, 'shape', '')}: "
                          f"its decode must return float32 [{rows}, {k}]")
    return values


def scatter_operands_checked(codec: Codec, parts: Parts, rows: int, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``codec.scatter_operands(parts)``, held to what the scatter kernel reads: values [rows, k], a positive
    block and scales [rows, ceil(k / block)]; anything else is refused, the codec named."""
    if type(codec).scatter_operands is Codec.scatter_operands:  # decode-then-add, decoded as the store reads (k known)
        values = decoded_rows(codec, parts, rows, k)
        return values, np.ones((rows, 1), np.float32), max(1, k)
    values, scales, block = codec.scatter_operands(parts)
    ok = (isinstance(values, np.ndarray) and values.shape == (rows, k) and isinstance(block, (int, np.integer))
          and block >= 1 and isinstance(scales, np.ndarray) and scales.shape == (rows, -(-k // int(block))))
    if not ok:
        raise FormatError(f"codec {codec.codec_id!r}: scatter_operands gave values {getattr(values, 'shape', None)}, "
                          f"scales {getattr(scales, 'shape', None)}, block {block!r} for {rows} rows of {k} values")
    return values, scales, int(block)


def packed_operands_checked(codec: Codec, parts: Parts, rows: int,
                            k: int) -> Optional[tuple[np.ndarray, np.ndarray, int, int, np.ndarray]]:
    """``codec.packed_operands(parts)`` (None: the codec has no packed kernel), held to what
    ``kernels.scatter_add_packed`` reads: uint8 codes [rows, ceil(k * bits / 8)] for bits 1, 2 or 4, a float32
    table of 2**bits values, a positive block and float32 scales [rows, ceil(k / block)]."""
    operands = codec.packed_operands(parts)
    if operands is None:
        return None
    packed, scales, block, bits, table = operands
    ok = (isinstance(bits, (int, np.integer)) and bits in (1, 2, 4) and isinstance(block, (int, np.integer))
          and block >= 1 and isinstance(packed, np.ndarray) and packed.dtype == np.uint8
          and packed.shape == (rows, -(-k * int(bits) // 8)) and isinstance(scales, np.ndarray)
          and scales.dtype == np.float32 and scales.shape == (rows, -(-k // int(block)))
          and isinstance(table, np.ndarray) and table.dtype == np.float32 and table.shape == (1 << int(bits),))
    if not ok:
        raise FormatError(f"codec {codec.codec_id!r}: packed_operands gave codes {getattr(packed, 'shape', None)}, "
                          f"scales {getattr(scales, 'shape', None)}, block {block!r}, bits {bits!r} for {rows} rows "
                          f"of {k} values")
    return packed, scales, int(block), int(bits), table


def register_codec(cls: type[Codec]) -> type[Codec]:
    """Add a codec class to ``CODECS`` under its ``codec_id`` (usable as a class decorator).

    Refused: a class that is not a Codec, an id that is not a non-empty string, and an id
    another class already holds. Registering the same class again changes nothing.
    """
    if not (isinstance(cls, type) and issubclass(cls, Codec)):
        raise BadInputError(f"register_codec takes a subclass of gradstore.codecs.Codec, got {cls!r}")
    codec_id = getattr(cls, "codec_id", None)
    if not isinstance(codec_id, str) or not codec_id:
        raise BadInputError(f"codec class {cls.__qualname__} needs a codec_id that is a non-empty string, "
                            f"got {codec_id!r}")
    holder = CODECS.get(codec_id)
    if holder is not None and holder is not cls:
        raise BadInputError(f"codec id {codec_id!r} is already registered to {holder.__module__}.{holder.__qualname__}; "
                            f"give {cls.__qualname__} its own codec_id")
    CODECS[codec_id] = cls
    return cls


class Int4Block(PackedBlock):
    """Signed 4-bit, q in [-7, 7] (nibble 8, -8, never written), two a byte; scale absmax / 7 per block."""

    codec_id = "int4"
    bits, levels, default_block = 4, 7, DEFAULT_INT4_BLOCK


class Int4Stochastic(Int4Block):
    """int4 with stochastic rounding (floor(t + u), u from (seed, key)): unbiased, one step of error."""

    codec_id = "int4-stochastic"
    mode = kernels.MODE_STOCHASTIC
    default_block = DEFAULT_INT4_STOCHASTIC_BLOCK


class Int2Block(PackedBlock):
    """Ternary, q in {-1, 0, 1} (2-bit code 2, -2, never written), four a byte; scale absmax per block."""

    codec_id = "int2"
    bits, levels, default_block = 2, 1, DEFAULT_INT2_BLOCK


class SignBlock(PackedBlock):
    """One bit a value, its sign (x < 0: 1), eight a byte; scale mean |x| per block (x = 0 decodes to +scale)."""

    codec_id = "sign"
    bits, levels, default_block = 1, 1, DEFAULT_SIGN_BLOCK
    mode = kernels.MODE_SIGN


for _builtin in (Float32, Float16, Int8Block, Int4Block, Int4Stochastic, Int2Block, SignBlock):
    register_codec(_builtin)


def get_codec(spec: Union[str, Mapping[str, Any], Codec, None]) -> Codec:
    """A codec from its id ('int8'), its JSON config ({'id': 'int8', ...}) or a Codec."""
    if isinstance(spec, Codec):
        return spec
    if isinstance(spec, str):
        spec = {"id": spec}
    codec_id: Optional[Any] = spec.get("id") if isinstance(spec, Mapping) else None
    if not isinstance(spec, Mapping) or not isinstance(codec_id, str) or codec_id not in CODECS:
        raise FormatError(f"unknown codec {spec!r} (id {codec_id!r}); registered ids: {sorted(CODECS)}")
    return CODECS[codec_id].from_config(spec)


def codec_to_write(spec: Union[str, Mapping[str, Any], Codec]) -> Codec:
    """The codec a new store is written in: as ``get_codec``, and refused (BadInputError) unless its
    config reads back through the registry as itself, since a store it wrote could not be opened."""
    codec = get_codec(spec)
    config = codec.get_config()
    try:
        again = get_codec(json.loads(json.dumps(config)))
    except (FormatError, TypeError, ValueError) as error:
        raise BadInputError(f"codec {codec!r} cannot be stored: its config {config!r} does not read back ({error}); "
                            "register its class with gradstore.register_codec") from None
    if again != codec:
        raise BadInputError(f"codec {codec!r} cannot be stored: its config reads back as {again!r}; "
                            "register its class with gradstore.register_codec")
    return codec
