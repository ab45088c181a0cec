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


CODECS: dict[str, type[Codec]] = {}  # codec_id -> class: every codec a store may name


def decoded_rows(codec: Codec, parts: Parts, rows: int, k: int) -> np.ndarray:
    """``codec.decode(parts)``, held to its contract: float32 [rows, k]. A codec that returns another shape
    would have its values scattered to positions drawn for another k, so it is refused, named."""
    values = codec.decode(parts)
    if not isinstance(values, np.ndarray) or values.shape != (rows, k) or values.dtype != np.float32:
        raise FormatError(f"codec {codec.codec_id!r} decoded {rows} rows of {k} values to "
                          f"{getattr(values, 'dtype', type(values).__name__)} {getattr(values, 'shape', '')}: "
                          f"its decode must return float32 [{rows}, {k}]")
    return values


def scatter_operands_checked(codec: Codec, parts: Parts, rows: int, k: int) -> tuple[np.ndarray, np.ndarray, int]:
    """``codec.scatter_operands(parts)``, held to what the scatter kernel reads: values [rows, k], a positive
    block and scales [rows, ceil(k / block)]; anything else is refused, the codec named."""
    values, scales, block = codec.scatter_operands(parts)
    ok = (isinstance(values, np.ndarray) and values.shape == (rows, k) and isinstance(block, (int, np.integer))
          and block >= 1 and isinstance(scales, np.ndarray) and scales.shape == (rows, -(-k // int(block))))
    if not ok:
        raise FormatError(f"codec {codec.codec_id!r}: scatter_operands gave values {getattr(values, 'shape', None)}, "
                          f"scales {getattr(scales, 'shape', None)}, block {block!r} for {rows} rows of {k} values")
    return values, scales, int(block)


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


for _builtin in (Float32, Float16, Int8Block):
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
