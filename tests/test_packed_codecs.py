"""The packed sub-byte codecs (issue 25): int4, int4-stochastic, int2 (ternary), sign.

The shared contract (tests/test_codec_registry.py) runs them by registration; here: exact
packing of known values, k not a multiple of the codes a byte, all-zero blocks, refused
NaN / Inf, stochastic rounding unbiased on a fixed seed, and the packed scatter kernel
against decode-then-add.
"""

import numpy as np
import pytest

import gradstore
from gradstore import BadInputError, FormatError, kernels
from gradstore.codecs import Codec, Int2Block, Int4Block, Int4Stochastic, SignBlock, decoded_rows, get_codec
from gradstore.masks import unroll_for

from conftest import gradient_rows

PACKED = ["int4", "int4-stochastic", "int2", "sign"]


def encode(codec, values, keys=None, seed=3):
    values = np.asarray(values, np.float32)
    keys = np.arange(values.shape[0]) if keys is None else keys
    parts = codec.encode(values, keys, seed)
    return parts, decoded_rows(codec, parts, values.shape[0], values.shape[1])


def test_int4_packs_two_nibbles_a_byte_low_first():
    # block max 7: x * (7 / 7) rounds to q; ties to even (2.5 -> 2, -0.5 -> 0)
    parts, decoded = encode(Int4Block(block_size=8), [[7, -7, 1, -1, 2.5, -0.5, 3, 0, -6]])
    assert parts["values"].tolist() == [[0x97, 0xF1, 0x02, 0x03, 0x09]]  # -7 = 0x9, -1 = 0xF; -6 alone in its block: -7
    assert parts["scales"].tolist() == [[1.0, np.float32(6) / np.float32(7)]]
    assert decoded[0, :8].tolist() == [7, -7, 1, -1, 2, 0, 3, 0]
    assert decoded[0, 8] == np.float32(-7) * np.float32(np.float32(6) / np.float32(7))


def test_int2_is_ternary_four_a_byte():
    # block max 1: |x| > 1/2 keeps its sign, |x| <= 1/2 is 0 (0.5 is a tie, to 0)
    parts, decoded = encode(Int2Block(block_size=8), [[1, -1, 0.5, 0.51, -0.6, 0.2, -1, 0, 0.9]])
    assert parts["values"].tolist() == [[0b01_00_11_01, 0b00_11_00_11, 0b01]]
    assert decoded[0].tolist() == [1, -1, 0, 1, -1, 0, -1, 0, np.float32(0.9)]


def test_sign_is_one_bit_with_the_mean_magnitude():
    x = np.array([[1, -2, 3, -4, 0, -0.0, 5, -6, 2, -2]], np.float32)  # blocks of 8 and 2
    parts, decoded = encode(SignBlock(block_size=8), x)
    assert parts["values"].tolist() == [[0b1000_1010, 0b10]]  # bit j of byte 0: x_j < 0 (-0.0 is not)
    assert np.array_equal(parts["scales"], [[21 / 8, 2.0]])
    assert decoded[0].tolist() == [2.625, -2.625, 2.625, -2.625, 2.625, 2.625, 2.625, -2.625, 2, -2]


@pytest.mark.parametrize("codec_id", PACKED)
@pytest.mark.parametrize("k", [1, 3, 5, 7, 9, 13, 333])
def test_odd_k_round_trips_and_leaves_the_padding_zero(codec_id, k, rng):
    codec = get_codec({"id": codec_id, "block_size": 4})
    values = -np.abs(gradient_rows(rng, 6, k)) - 1e-6  # negative: sign codes 1, int codes non-zero
    parts, decoded = encode(codec, values)
    per = 8 // codec.bits
    assert parts["values"].shape == (6, -(-k // per)) and parts["scales"].shape == (6, -(-k // 4))
    assert np.all(np.abs(decoded.astype(np.float64) - values) <= codec.error_bound(values))
    used = k - (parts["values"].shape[1] - 1) * per  # codes in the last byte
    assert not (parts["values"][:, -1] >> np.uint8(used * codec.bits)).any(), "bits past k are 0"
    assert np.array_equal(codec.decode(parts)[:, :k], decoded)  # without k: every code of the bytes
    with pytest.raises(FormatError, match=codec_id):
        codec.decode_with_k(parts, parts["values"].shape[1] * per + 1)


@pytest.mark.parametrize("codec_id", PACKED)
def test_all_zero_blocks_have_scale_zero_and_decode_to_zero(codec_id, rng):
    codec = get_codec({"id": codec_id, "block_size": 16})
    values = gradient_rows(rng, 4, 64)
    values[:, 16:32] = 0.0
    values[2] = 0.0
    parts, decoded = encode(codec, values)
    assert not parts["scales"][:, 1].any() and not parts["scales"][2].any() and not parts["values"][2].any()
    assert not decoded[:, 16:32].any() and not decoded[2].any()
    assert codec.check_parts(parts) == []


@pytest.mark.parametrize("codec_id", PACKED)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_as_for_int8(codec_id, bad, tmp_path):
    store = gradstore.create(tmp_path / "s.h5", 100, 4, 0.5, codec=codec_id)
    values = np.ones((2, store.k), np.float32)
    values[1, 3] = bad
    with pytest.raises(BadInputError, match="NaN or Inf"):
        store.accumulate([0, 1], values)
    store.close()


def test_check_parts_finds_what_is_never_written():
    for codec, code in ((Int4Block(block_size=4), 0x08), (Int2Block(block_size=4), 0b10)):
        parts = codec.encode(np.ones((3, 8), np.float32), np.arange(3), 0)
        assert codec.check_parts(parts) == []
        parts["values"][1, 0] = code
        parts["scales"][2, 0] = -1.0
        found = {problem: rows.tolist() for rows, problem in codec.check_parts(parts)}
        assert found == {f"values: code {code} ({-code}) never written": [1], "scales: negative": [2]}, found


def test_int4_stochastic_is_unbiased_and_deterministic(rng):
    k, copies = 256, 4000
    row = gradient_rows(rng, 1, k)
    values = np.repeat(row, copies, axis=0)
    keys = np.arange(copies) + 1000
    codec = Int4Stochastic()
    parts, decoded = encode(codec, values, keys=keys, seed=7)
    step = np.repeat(parts["scales"][0], codec.block_size)[:k].astype(np.float64)
    assert np.all(np.abs(decoded - row) <= step * (1 + 1e-4))
    mean = decoded.astype(np.float64).mean(axis=0)
    assert np.all(np.abs(mean - row[0]) <= 5 * step / 2 / np.sqrt(copies) + 1e-12)  # 5 standard errors
    _, nearest = encode(Int4Block(block_size=codec.block_size), values[:1])
    assert np.abs(nearest[0].astype(np.float64) - row[0]).max() > 5 * step.max() / 2 / np.sqrt(copies)
    again = codec.encode(values[:50], keys[:50], 7)
    assert np.array_equal(again["values"], parts["values"][:50])
    assert not np.array_equal(codec.encode(values[:50], keys[:50], 8)["values"], parts["values"][:50])


class Unpacked(Codec):
    """A packed codec's rows through the default path: decoded to float32, then added."""

    codec_id = "test-unpacked"

    def __init__(self, inner):
        self.inner = inner

    def parts(self, k):
        return self.inner.parts(k)

    def encode(self, values, keys, seed):
        return self.inner.encode(values, keys, seed)

    def decode(self, parts):
        return self.inner.decode(parts)

    def decode_with_k(self, parts, k):
        return self.inner.decode_with_k(parts, k)

    def error_bound(self, values):
        return self.inner.error_bound(values)


@pytest.mark.parametrize("codec_id", PACKED)
@pytest.mark.parametrize("num_params, k, rows", [(5000, 333, 40), (2000, 1999, 150)])  # serial; parallel (n * k >= 2**18)
@pytest.mark.parametrize("block_size", [64, 8, 48, 30])  # 64, 8: a power-of-two count of bytes (byte by byte);
# 48: 24, 12 or 6 bytes (block by block); 30: 15 bytes for int4, not whole bytes for int2 and sign
def test_packed_scatter_equals_decode_then_add(codec_id, num_params, k, rows, block_size, rng):
    codec = get_codec({"id": codec_id, "block_size": block_size})
    values = gradient_rows(rng, rows, k)
    keys = np.arange(rows, dtype=np.int64) * 3 + 1
    parts = codec.encode(values, keys, 5)
    decoded = decoded_rows(codec, parts, rows, k)
    for alpha in (1.0, -1.0, 0.5):
        start = np.random.default_rng(1).standard_normal(num_params).astype(np.float32)
        packed, reference = start.copy(), start.copy()
        codes, scales, block, bits, table = codec.packed_operands(parts)
        kernels.scatter_add_packed(packed, codes, scales, block, bits, table, keys, 11, num_params, k, alpha)
        ones = np.ones((rows, 1), np.float32)
        kernels.scatter_add(reference, decoded, ones, k, keys, 11, num_params, alpha)
        assert np.array_equal(packed, reference), (alpha, np.abs(packed - reference).max())
        assert not np.array_equal(packed, start)


def test_a_store_scatters_packed_rows_as_decode_then_add(tmp_path, rng):
    """Store.scatter_add through the packed kernel = the same rows through the default float32 path."""
    rows = gradient_rows(rng, 30, 150)
    flats = []
    for codec in (Int2Block(block_size=32), Unpacked(Int2Block(block_size=32))):
        store = gradstore.create(tmp_path / f"{codec.codec_id}.h5", 600, 30, 0.25, codec=Int2Block(block_size=32), seed=4)
        store.accumulate(np.arange(30), rows)
        store = store.finalize()
        store.codec = codec  # the same stored bytes, applied through the codec's own kernel or decoded
        flat = np.zeros(600, np.float32)
        store.scatter_add(flat, np.arange(30), -1.0)
        flats.append(flat)
        store.close()
    assert np.array_equal(flats[0], flats[1]) and flats[0].any()


@pytest.mark.parametrize("codec_id", PACKED)
@pytest.mark.parametrize("block_size", [64, 8, 30])
def test_packed_scatter_with_many_parts_starting_mid_byte_equals_decode_then_add(codec_id, block_size, rng):
    """The parallel body with 7 and 37 parameter ranges, and k far below num_params: parts start and stop mid-byte,
    and some hold no position of a row; every case equals decode-then-add bit for bit."""
    codec = get_codec({"id": codec_id, "block_size": block_size})
    num_params, k, rows = 3000, 61, 9
    values = gradient_rows(rng, rows, k)
    keys = np.arange(rows, dtype=np.int64) * 5 + 2
    parts = codec.encode(values, keys, 3)
    decoded = decoded_rows(codec, parts, rows, k)
    codes, scales, block, bits, table = codec.packed_operands(parts)
    reference = np.zeros(num_params, np.float32)
    kernels.scatter_add(reference, decoded, np.ones((rows, 1), np.float32), k, keys, 11, num_params, -1.0)
    for nparts in (7, 37):
        flat = np.zeros(num_params, np.float32)
        kernels._scatter_add_packed_parallel(flat, codes, scales, block, bits, kernels.byte_table(table, bits), keys,
                                             11, num_params, np.float32(-1.0), nparts, np.empty((rows, k), np.int64),
                                             unroll_for(num_params, k))
        assert np.array_equal(flat, reference), (nparts, np.abs(flat - reference).max())
