"""Codec round trips within stated bounds, stochastic rounding, and codec configs."""

import json

import numpy as np
import pytest

from gradstore import FormatError, get_codec
from gradstore.codecs import CODECS, DEFAULT_INT8_BLOCK, Float16, Float32, Int8Block, decoded_rows

from conftest import gradient_rows


def round_trip(codec, values, keys=None, seed=0):
    keys = np.arange(values.shape[0]) if keys is None else keys
    parts = codec.encode(values, keys, seed)
    for part in codec.parts(values.shape[1]):
        assert parts[part.name].dtype == part.dtype
        assert parts[part.name].shape == (values.shape[0], part.width)
    return parts, decoded_rows(codec, parts, values.shape[0], values.shape[1])


def rel_l2(decoded, values):
    norm = np.linalg.norm(values.astype(np.float64), axis=1)
    err = np.linalg.norm(decoded.astype(np.float64) - values, axis=1)
    return err / np.where(norm > 0, norm, 1)


def test_fp32_is_exact(rng):
    values = gradient_rows(rng, 40, 1000)
    _, decoded = round_trip(Float32(), values)
    assert decoded.dtype == np.float32
    assert np.array_equal(decoded, values)


def test_fp16_relative_error_per_row(rng):
    values = gradient_rows(rng, 40, 1000)
    parts, decoded = round_trip(Float16(), values)
    assert decoded.dtype == np.float32
    assert rel_l2(decoded, values).max() <= 1e-3
    # per element: fp16 rounding (2**-11 relative) of x / s with absmax / s in [0.5, 1)
    scales = parts["scales"][:, 0]
    assert np.all(np.log2(scales) == np.round(np.log2(scales))), "row scales are powers of two"
    bound = 2.0**-11 * np.abs(values) + 2.0**-25 * scales[:, None]
    assert np.all(np.abs(decoded.astype(np.float64) - values) <= bound)


@pytest.mark.parametrize("magnitude", [1e-9, 1e-20, 1e6, 1e30])
def test_fp16_row_scale_keeps_tiny_and_huge_rows(rng, magnitude):
    """fp16 alone flushes 1e-9 to zero and overflows 1e6 to inf: the row scale must prevent both."""
    values = (rng.standard_normal((4, 512)) * magnitude).astype(np.float32)
    with np.errstate(over="ignore"):
        plain = values.astype(np.float16)
    assert not (np.all(np.isfinite(plain)) and np.count_nonzero(plain) == np.count_nonzero(values))  # plain fp16 fails
    _, decoded = round_trip(Float16(), values)
    assert np.all(np.isfinite(decoded))
    assert np.count_nonzero(decoded) == np.count_nonzero(values)
    assert rel_l2(decoded, values).max() <= 1e-3


def test_fp16_row_scale_is_the_smallest_power_of_two_above_absmax(rng):
    """docs/FORMAT.md: s[0] is the smallest 2**e with max|x| <= 2**e (rows at a power of two included)."""
    values = gradient_rows(rng, 6, 300)
    values[3] *= 0.25 / np.abs(values[3]).max()  # absmax exactly 0.25
    values[4] = 0.0
    values[4, 7] = -2.0**-20  # absmax exactly 2**-20
    values[5] *= 1.0 / np.abs(values[5]).max()  # absmax exactly 1
    parts, decoded = round_trip(Float16(), values)
    absmax = np.abs(values).max(axis=1).astype(np.float64)
    expected = 2.0 ** np.ceil(np.log2(absmax))
    assert np.array_equal(parts["scales"][:, 0], expected.astype(np.float32)), (parts["scales"][:, 0], expected)
    assert rel_l2(decoded, values).max() <= 1e-3


def test_fp16_float32_range_extremes():
    """'fp16's precision, float32's range': rows whose absmax is near float32's max must survive."""
    values = np.array([[3.0e38, -1.0e38, 2.5e38, 1.0], [1.7e38, 1.8e38, -3.3e38, 0.0]], np.float32)
    _, decoded = round_trip(Float16(), values)
    assert np.all(np.isfinite(decoded)), decoded
    assert rel_l2(decoded, values).max() <= 1e-3


def block_scales_of(values, block):
    n, k = values.shape
    nblocks = -(-k // block)
    padded = np.zeros((n, nblocks * block), np.float32)
    padded[:, :k] = np.abs(values)
    return padded.reshape(n, nblocks, block).max(axis=2) / np.float32(127.0)


@pytest.mark.parametrize("block", sorted({256, 64, 1000, DEFAULT_INT8_BLOCK}))
def test_int8_nearest_error_bounds(rng, block):
    k = 1000  # not a multiple of 256 or 64: a short last block
    values = gradient_rows(rng, 60, k)
    codec = Int8Block(block_size=block)
    parts, decoded = round_trip(codec, values)
    assert parts["values"].dtype == np.int8 and parts["scales"].shape == (60, -(-k // block))
    assert parts["values"].min() >= -127
    scales = block_scales_of(values, block)
    assert np.allclose(parts["scales"], scales, rtol=1e-6, atol=0)
    per_element = np.repeat(parts["scales"], block, axis=1)[:, :k].astype(np.float64)
    err = np.abs(decoded.astype(np.float64) - values)
    assert np.all(err <= per_element * (0.5 + 1e-4) + 1e-30)  # half a step, plus float32 rounding
    # manual decode: q * scale of its block
    assert np.array_equal(decoded, parts["values"].astype(np.float32) * np.repeat(parts["scales"], block, axis=1)[:, :k])
    if block == 256:
        # Student-t(3) rows: typical rows within 2 %; a row whose block holds a far outlier
        # has a coarse scale, so the worst row is allowed more (the per-element bound above holds).
        errors = rel_l2(decoded, values)
        assert np.median(errors) < 0.02
        assert np.linalg.norm(decoded - values) / np.linalg.norm(values) < 0.02
        assert errors.max() < 0.05


def test_int8_nearest_is_round_to_nearest(rng):
    values = gradient_rows(rng, 5, 300)
    parts, _ = round_trip(Int8Block(block_size=100), values)
    scales = np.repeat(parts["scales"], 100, axis=1).astype(np.float64)
    ratio = values / np.where(scales > 0, scales, 1)
    assert np.all(np.abs(parts["values"] - ratio) <= 0.5 + 1e-4)


def test_int8_stochastic_is_unbiased_and_deterministic(rng):
    k, copies = 512, 4000
    row = gradient_rows(rng, 1, k)
    values = np.repeat(row, copies, axis=0)
    keys = np.arange(copies) + 1000
    codec = Int8Block(rounding="stochastic")
    parts, decoded = round_trip(codec, values, keys=keys, seed=7)
    scale = np.repeat(parts["scales"][0], DEFAULT_INT8_BLOCK)[:k].astype(np.float64)
    # one rounding step at most, and the rounding really varies with the key
    assert np.all(np.abs(decoded - row) <= scale * (1 + 1e-4))
    assert (decoded != decoded[0]).any(axis=1).mean() > 0.99
    # unbiased: the mean over keys is the input, to within 5 standard errors (std <= scale / 2)
    mean = decoded.astype(np.float64).mean(axis=0)
    assert np.all(np.abs(mean - row[0]) <= 5 * scale / 2 / np.sqrt(copies) + 1e-12)
    # nearest rounding would be biased: the test would notice it
    _, nearest = round_trip(Int8Block(), values[:1], keys=keys[:1])
    assert np.abs(nearest[0].astype(np.float64) - row[0]).max() > 5 * scale.max() / 2 / np.sqrt(copies)
    # deterministic for the same (seed, key); different for another seed
    again = codec.encode(values[:50], keys[:50], 7)
    assert np.array_equal(again["values"], parts["values"][:50])
    assert np.array_equal(again["scales"], parts["scales"][:50])
    other_seed = codec.encode(values[:50], keys[:50], 8)
    assert not np.array_equal(other_seed["values"], parts["values"][:50])


@pytest.mark.parametrize("spec", [*CODECS, {"id": "int8", "rounding": "stochastic"}])
def test_all_zero_rows_decode_to_zero(spec):
    codec = get_codec(spec)
    values = np.zeros((3, 700), np.float32)
    parts, decoded = round_trip(codec, values)
    assert np.array_equal(decoded, values)
    assert np.all(np.isfinite(decoded))
    for array in parts.values():
        assert np.all(np.isfinite(array.astype(np.float64)))


def test_get_codec_from_name_and_config():
    assert isinstance(get_codec("fp32"), Float32)
    assert isinstance(get_codec("fp16"), Float16)
    int8 = get_codec("int8")
    assert isinstance(int8, Int8Block)
    assert int8.get_config() == {"id": "int8", "block_size": DEFAULT_INT8_BLOCK, "rounding": "nearest"}
    assert int8.block_size == DEFAULT_INT8_BLOCK
    custom = get_codec({"id": "int8", "block_size": 64, "rounding": "stochastic"})
    assert (custom.block_size, custom.rounding) == (64, "stochastic")
    assert get_codec(custom) is custom
    assert get_codec({"id": "fp16"}).get_config() == {"id": "fp16"}


@pytest.mark.parametrize("spec", ["bf16", {"id": "zfp"}, {"block_size": 64}, {"id": "int8", "bogus_option": 1}, 8, None])
def test_get_codec_unknown_raises_format_error(spec):
    with pytest.raises(FormatError):
        get_codec(spec)


def test_get_codec_unknown_message_names_it():
    with pytest.raises(FormatError, match="bf16"):
        get_codec("bf16")


@pytest.mark.parametrize(
    "codec", [Float32(), Float16(), Int8Block(), Int8Block(block_size=100, rounding="stochastic")], ids=repr
)
def test_config_json_round_trip(rng, codec):
    config = json.loads(json.dumps(codec.get_config()))
    clone = get_codec(config)
    assert type(clone) is type(codec)
    assert clone.get_config() == codec.get_config()
    values = gradient_rows(rng, 10, 333)
    keys = np.arange(10) * 3
    a, b = codec.encode(values, keys, 5), clone.encode(values, keys, 5)
    assert a.keys() == b.keys()
    for name in a:
        assert np.array_equal(a[name], b[name])
    assert np.array_equal(codec.decode(a), clone.decode(b))


def test_scatter_operands_reproduce_decode(rng):
    values = gradient_rows(rng, 6, 600)
    for codec in (Float32(), Float16(), Int8Block(block_size=128)):
        parts = codec.encode(values, np.arange(6), 0)
        v, s, block = codec.scatter_operands(parts)
        j = np.arange(600)
        rebuilt = v.astype(np.float32) * s[:, j // block]
        assert np.array_equal(rebuilt, codec.decode(parts)), codec


def test_int8_rejects_bad_options():
    with pytest.raises(ValueError):
        Int8Block(block_size=0)
    with pytest.raises(ValueError):
        Int8Block(rounding="up")
