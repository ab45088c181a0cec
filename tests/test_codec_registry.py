"""The codec registry (numcodecs' pattern) and the contract every registered codec meets.

``test_contract_*`` are parametrized over ``gradstore.codecs.CODECS`` at collection: a
codec is tested by being registered. The external codec below (bf16 by truncation, no
scatter kernel of its own) is registered by a fixture, runs the same contract, and goes
end to end through create, finalize, read, verify and scatter_add (decode-then-add).
"""

import json
import os

import numpy as np
import pytest

import gradstore
from gradstore import BadInputError, FormatError, RowState, masks, shards
from gradstore.codecs import CODECS, Codec, Float32, Int8Block, Part, decoded_rows, get_codec

from conftest import EPS32, gradient_rows

NUM_PARAMS, NUM_KEYS, KEEP, SEED = 1500, 70, 0.2, 11  # k = 300; keys 60.. never recorded
EMPTY = np.arange(60, NUM_KEYS)


class TruncatedBfloat16(Codec):
    """bf16 by truncation: the top 16 bits of each float32. No scatter kernel, no value checks."""

    codec_id = "test-bf16-trunc"

    def parts(self, k):
        return [Part("values", np.dtype(np.uint16), k, True)]

    def encode(self, values, keys, seed):
        bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
        return {"values": (bits >> np.uint32(16)).astype(np.uint16)}

    def decode(self, parts):
        return (parts["values"].astype(np.uint32) << np.uint32(16)).view(np.float32)

    def error_bound(self, values):
        """Dropping 16 of 23 mantissa bits: below one bf16 step, 2**-7 |x| (2**-133 for subnormals)."""
        return 2.0**-7 * np.abs(np.asarray(values, np.float64)) + 2.0**-133


class Int8Again(Int8Block):
    """Overrides only ``codec_id``: a codec of its own, writing int8's bytes under another id."""

    codec_id = "test-int8-again"


@pytest.fixture
def registered():
    """Register codec classes for one test; the registry is as before afterwards."""
    before = dict(CODECS)
    added = []

    def register(cls):
        added.append(gradstore.register_codec(cls))
        return cls

    yield register
    for cls in added:
        CODECS.pop(cls.codec_id, None)
    assert CODECS == before


# ---------------------------------------------------------------------------- the contract


def check_round_trip(codec, rng):
    k = 333
    values = gradient_rows(rng, 40, k)
    values[3] = 0.0
    values[4] *= 1e6  # large and small rows: float32's range
    values[5] *= 1e-20
    keys = np.arange(values.shape[0]) * 7 + 1
    parts = codec.encode(values, keys, SEED)
    for part in codec.parts(k):
        assert parts[part.name].dtype == part.dtype and parts[part.name].shape == (values.shape[0], part.width)
    decoded = decoded_rows(codec, parts, values.shape[0], k)  # decode_with_k: what the store calls
    assert decoded.dtype == np.float32 and decoded.shape == values.shape
    error = np.abs(decoded.astype(np.float64) - values)
    bound = codec.error_bound(values)
    worst = np.unravel_index(np.argmax(error - bound), error.shape)
    assert np.all(error <= bound), (codec, worst, error[worst], bound[worst])
    assert np.array_equal(decoded[3], np.zeros(k, np.float32)), "a row of zeros decodes to zeros"
    # the stated bound is not vacuous: smaller than each non-zero row itself (relative error below 1)
    nonzero = np.abs(values).max(axis=1) > 0
    assert np.all(np.linalg.norm(bound, axis=1)[nonzero] < np.linalg.norm(values.astype(np.float64), axis=1)[nonzero])


def check_config_round_trip(codec):
    config = codec.get_config()
    assert config["id"] == codec.codec_id and CODECS[codec.codec_id] is type(codec)
    assert type(codec).from_config(config) == codec
    again = get_codec(json.loads(json.dumps(config)))
    assert type(again) is type(codec) and again == codec and hash(again) == hash(codec)
    assert again.get_config() == config


def check_zero_rows(codec):
    for k in (1, 64, 300):
        empty = codec.encode(np.zeros((0, k), np.float32), np.zeros(0, np.int64), SEED)
        decoded = decoded_rows(codec, empty, 0, k)
        assert decoded.shape == (0, k) and decoded.dtype == np.float32
        zeros = decoded_rows(codec, codec.encode(np.zeros((3, k), np.float32), np.arange(3), SEED), 3, k)
        assert zeros.shape == (3, k) and np.array_equal(zeros, np.zeros((3, k), np.float32))


def record(path, codec, rng_seed=5):
    """A store of NUM_KEYS keys, two epochs over keys 0..59 (60.. stay empty), finalized."""
    rng = np.random.default_rng(rng_seed)
    recording = gradstore.create(path, NUM_PARAMS, NUM_KEYS, KEEP, codec=codec, seed=SEED,
                                 labels=np.arange(NUM_KEYS) % 3)
    for _ in range(2):
        order = rng.permutation(60)
        for start in range(0, 60, 16):
            keys = order[start : start + 16]
            recording.accumulate(keys, gradient_rows(rng, keys.size, recording.k))
    return recording.finalize()


def check_store(codec, tmp_path):
    """Transcoded from fp32 = recorded in the codec; read, verify and scatter_add agree."""
    record(tmp_path / "fp32.h5", "fp32").close()
    gradstore.transcode(tmp_path / "fp32.h5", tmp_path / "derived.h5", codec.get_config())
    with record(tmp_path / "direct.h5", codec.get_config()) as direct, gradstore.open(tmp_path / "derived.h5") as derived, \
            gradstore.open(tmp_path / "fp32.h5") as exact:
        assert direct.codec == codec and derived.codec == codec
        live = np.arange(60)
        assert np.array_equal(derived.read(live), direct.read(live))
        assert np.array_equal(derived.decode_rows(np.arange(NUM_KEYS)), direct.decode_rows(np.arange(NUM_KEYS)))
        assert not direct.decode_rows(EMPTY).any(), "empty rows read as zeros"
        sums = exact.read(live)
        assert np.all(np.abs(direct.read(live).astype(np.float64) - sums) <= codec.error_bound(sums))
        assert direct.verify() == [] and derived.verify() == []
        # scatter_add against a float64 reference of the decoded rows at their positions
        rows = direct.read(live).astype(np.float64)
        positions = masks.positions_many(SEED, live, NUM_PARAMS, direct.k)
        start = np.random.default_rng(0).standard_normal(NUM_PARAMS).astype(np.float32)
        expected = start.astype(np.float64)
        np.add.at(expected, positions.ravel(), -0.5 * rows.ravel())
        sumabs = np.abs(start).astype(np.float64)
        np.add.at(sumabs, positions.ravel(), np.abs(0.5 * rows.ravel()))
        count = np.bincount(positions.ravel(), minlength=NUM_PARAMS)
        flat = start.copy()
        direct.scatter_add(flat, live, alpha=-0.5)
        assert np.all(np.abs(flat - expected) <= (count + 2) * EPS32 * sumabs + 1e-30)
        assert not np.array_equal(flat, start)
        with pytest.raises(BadInputError, match="empty"):
            direct.scatter_add(flat, EMPTY[:2])


@pytest.mark.parametrize("codec_id", sorted(CODECS))
def test_contract_round_trip_within_the_stated_error(codec_id, rng):
    check_round_trip(get_codec(codec_id), rng)


@pytest.mark.parametrize("codec_id", sorted(CODECS))
def test_contract_config_round_trip(codec_id):
    check_config_round_trip(get_codec(codec_id))


@pytest.mark.parametrize("codec_id", sorted(CODECS))
def test_contract_zero_rows(codec_id):
    check_zero_rows(get_codec(codec_id))


@pytest.mark.parametrize("codec_id", sorted(CODECS))
def test_contract_transcoded_store_reads_as_one_recorded_in_the_codec(codec_id, tmp_path):
    check_store(get_codec(codec_id), tmp_path)


def test_contract_covers_the_builtin_codecs():
    assert {"fp32", "fp16", "int8", "int4", "int4-stochastic", "int2", "sign"} <= set(CODECS)


def test_stated_errors_of_the_builtin_codecs():
    values = np.array([[1.0, -0.5, 0.25, 0.0]], np.float32)
    assert not Float32().error_bound(values).any()
    assert np.all(get_codec("fp16").error_bound(values) <= 2.0**-11 * np.abs(values) + 2.0**-24)
    nearest, stochastic = Int8Block(block_size=2), Int8Block(block_size=2, rounding="stochastic")
    assert np.allclose(nearest.error_bound(values), [[0.5 / 127, 0.5 / 127, 0.125 / 127, 0.125 / 127]], rtol=1e-3)
    assert np.allclose(stochastic.error_bound(values), 2 * nearest.error_bound(values), rtol=1e-3)


# ---------------------------------------------------------------------------- an external codec


def test_external_codec_end_to_end(registered, rng, tmp_path):
    registered(TruncatedBfloat16)
    codec = get_codec("test-bf16-trunc")
    assert isinstance(codec, TruncatedBfloat16)
    check_round_trip(codec, rng)
    check_config_round_trip(codec)
    check_zero_rows(codec)
    check_store(codec, tmp_path)  # create, finalize, transcode, read, verify, scatter_add (decode-then-add)
    with gradstore.open(tmp_path / "direct.h5", "r+") as store:
        assert store.config["codec"] == {"id": "test-bf16-trunc"}
        assert store.info()["rows_live"] == 60
        store.mark_forgotten([0, 1])
        assert store.purge() == 2
        assert store.verify() == []
        assert not store.decode_rows([0, 1]).any()


class WidePadded(TruncatedBfloat16):
    """Decodes to one value too many a row: its rows would land on positions drawn for another k."""

    codec_id = "test-wide-padded"

    def decode(self, parts):
        rows = super().decode(parts)
        return np.concatenate([rows, np.zeros((rows.shape[0], 1), np.float32)], 1)


def test_a_codec_that_decodes_to_the_wrong_width_is_refused_never_scattered(registered, tmp_path):
    registered(WidePadded)
    with record(tmp_path / "wide.h5", "test-wide-padded") as store:
        flat = np.zeros(NUM_PARAMS, np.float32)
        for attempt in (lambda: store.read([0, 1]), lambda: store.scatter_add(flat, [0, 1]),
                        lambda: next(store.blocks(16))):
            with pytest.raises(FormatError, match="test-wide-padded"):
                attempt()
        assert not flat.any()


def test_external_codec_through_a_sharded_store(registered, tmp_path):
    """Shards merge and add through the registry too: ShardedStore.scatter_add goes shard by shard."""
    registered(TruncatedBfloat16)
    path = tmp_path / "store.h5"
    os.makedirs(shards.shard_dir(path))
    rng = np.random.default_rng(2)
    writers = [gradstore.create(shards.recording_path(path, rank, 2), NUM_PARAMS, NUM_KEYS, KEEP,
                                codec="test-bf16-trunc", seed=SEED, writer={"run_id": "r", "rank": rank, "ranks": 2})
               for rank in range(2)]
    single = gradstore.create(tmp_path / "single.h5", NUM_PARAMS, NUM_KEYS, KEEP, codec="test-bf16-trunc", seed=SEED)
    for keys in np.array_split(np.arange(60), 4):
        values = gradient_rows(rng, keys.size, single.k)
        single.accumulate(keys, values)
        for rank, share in enumerate(np.array_split(np.arange(keys.size), 2)):
            writers[rank].accumulate(keys[share], values[share])
    for writer in writers:
        writer.close()
    for index in range(2):
        shards.finalize_shard(path, index, 2)
    shards.write_manifest(path, 2)
    with gradstore.open(path) as joined, single.finalize() as one:
        assert isinstance(joined.codec, TruncatedBfloat16)
        keys = np.arange(60)
        assert np.array_equal(joined.read(keys), one.read(keys))
        a, b = np.zeros(NUM_PARAMS, np.float32), np.zeros(NUM_PARAMS, np.float32)
        joined.scatter_add(a, keys)
        one.scatter_add(b, keys)
        assert np.array_equal(a, b) and a.any()
        assert joined.verify() == []


def test_an_unregistered_codec_is_refused_before_any_file_is_written(tmp_path):
    path = tmp_path / "store.h5"
    with pytest.raises(BadInputError, match="register"):
        gradstore.create(path, NUM_PARAMS, NUM_KEYS, KEEP, codec=TruncatedBfloat16())
    assert os.listdir(tmp_path) == []
    with pytest.raises(FormatError, match="test-bf16-trunc"):
        get_codec({"id": "test-bf16-trunc"})


def test_a_store_of_an_unregistered_codec_names_it_at_open(registered, tmp_path):
    registered(TruncatedBfloat16)
    record(tmp_path / "s.h5", "test-bf16-trunc").close()
    CODECS.pop("test-bf16-trunc")
    try:
        with pytest.raises(FormatError, match=r"test-bf16-trunc.*registered ids.*fp16"):
            gradstore.open(tmp_path / "s.h5")
    finally:
        gradstore.register_codec(TruncatedBfloat16)


# ---------------------------------------------------------------------------- the registry


def test_a_subclass_overriding_only_codec_id_is_a_new_codec(registered, tmp_path):
    registered(Int8Again)
    again, int8 = Int8Again(block_size=64), Int8Block(block_size=64)
    assert again.get_config() == {"id": "test-int8-again", "block_size": 64, "rounding": "nearest"}
    assert again != int8 and int8 != again
    assert type(get_codec(again.get_config())) is Int8Again
    assert type(get_codec(int8.get_config())) is Int8Block
    assert CODECS["int8"] is Int8Block and CODECS["test-int8-again"] is Int8Again
    with record(tmp_path / "again.h5", again.get_config()) as store:
        assert type(store.codec) is Int8Again and store.config["codec"]["id"] == "test-int8-again"
        same_bytes = store.read(np.arange(60))
    with record(tmp_path / "int8.h5", int8.get_config()) as store:
        assert np.array_equal(store.read(np.arange(60)), same_bytes)


class Unnamed(TruncatedBfloat16):
    codec_id = ""


class Numbered(TruncatedBfloat16):
    codec_id = 7  # type: ignore[assignment]


class Impostor(TruncatedBfloat16):
    codec_id = "int8"


@pytest.mark.parametrize("cls, words", [
    (Unnamed, "non-empty string"),
    (Numbered, "non-empty string, got 7"),
    (Impostor, "'int8' is already registered to gradstore.codecs.Int8Block"),
    (dict, "subclass of gradstore.codecs.Codec"),
])
def test_register_codec_refuses_bad_ids(cls, words):
    before = dict(CODECS)
    with pytest.raises(BadInputError, match=words):
        gradstore.register_codec(cls)
    assert CODECS == before


def test_registering_a_class_again_changes_nothing(registered):
    registered(TruncatedBfloat16)
    before = dict(CODECS)
    assert gradstore.register_codec(TruncatedBfloat16) is TruncatedBfloat16
    assert CODECS == before


def test_get_codec_names_the_unknown_id_and_the_registered_ones():
    with pytest.raises(FormatError) as error:
        get_codec({"id": "zfp", "rate": 8})
    assert "'zfp'" in str(error.value) and "registered ids: ['fp16', 'fp32', 'int2', 'int4', 'int4-stochastic', 'int8', 'sign'" in str(error.value)


def test_from_config_refuses_another_codecs_config():
    with pytest.raises(FormatError, match="not of codec 'fp16'"):
        get_codec("fp16").from_config({"id": "fp32"})


def test_equality_and_hash_follow_class_and_config():
    assert Int8Block() == Int8Block() and hash(Int8Block()) == hash(Int8Block())
    assert Int8Block(rounding="stochastic") != Int8Block()
    assert Float32() != Int8Block() and Float32() != "fp32"
    assert len({Int8Block(), Int8Block(), Float32(), get_codec("fp32")}) == 2


# ---------------------------------------------------------------------------- value checks in the codec


def test_verify_calls_the_codecs_own_check(registered, tmp_path, monkeypatch):
    """A codec brings its own check: verify reports what check_parts finds, naming the rows."""
    registered(TruncatedBfloat16)
    with record(tmp_path / "s.h5", "test-bf16-trunc") as store:
        assert store.verify() == []

        def odd_rows(self, parts):
            return [(np.nonzero(parts["values"][:, 0] % 2 == 1)[0], "values: odd first word")]

        monkeypatch.setattr(TruncatedBfloat16, "check_parts", odd_rows)
        problems = store.verify()
        first_words = store.decode_rows(np.arange(NUM_KEYS))[:, 0].view(np.uint32) >> 16
        odd = np.nonzero(first_words % 2 == 1)[0].tolist()
        assert odd and [row for problem in problems for row in problem["rows"]] == odd
        assert {problem["problem"] for problem in problems} == {"values: odd first word"}


def test_int8_check_finds_the_value_it_never_writes():
    codec = Int8Block(block_size=4)
    parts = codec.encode(np.ones((3, 8), np.float32), np.arange(3), 0)
    assert codec.check_parts(parts) == []
    parts["values"][1, 2] = -128
    parts["scales"][2, 0] = -1.0
    found = {problem: rows.tolist() for rows, problem in codec.check_parts(parts)}
    assert found == {"values: int8 -128 never written": [1], "scales: negative": [2]}


def test_codecs_without_checks_check_nothing(registered):
    registered(TruncatedBfloat16)
    parts = {"values": np.full((2, 4), 0x7FC0, np.uint16)}  # NaN's bits: this codec has no check of its own
    assert TruncatedBfloat16().check_parts(parts) == []


def test_empty_rows_that_are_not_zero_are_found(registered, tmp_path):
    """The store-level check: empty and purged rows hold the codec's zero row (or all zeros)."""
    registered(TruncatedBfloat16)
    with record(tmp_path / "s.h5", "test-bf16-trunc") as store:
        assert np.all(store.state[EMPTY] == RowState.EMPTY)
    import h5py

    with h5py.File(tmp_path / "s.h5", "r") as f:
        rows_per_chunk = f["rows/values"].chunks[0]
    # rewrite the chunk of key 65 with a non-zero empty row (and a matching checksum)
    from gradstore import chunkio

    with h5py.File(tmp_path / "s.h5", "r+") as f:
        dset = f["rows/values"]
        chunk = 65 // rows_per_chunk
        lo = chunk * rows_per_chunk
        block = dset[lo : min(NUM_KEYS, lo + rows_per_chunk)]
        block[65 - lo, 3] = 0x3F80  # 1.0 in bf16
        chunkio.write_rows(dset, lo, block, True, 1, None)
        _, frame = dset.id.read_direct_chunk((lo, 0))
        f["checksums/values"][chunk] = chunkio.frame_checksum(chunk, frame)
    with gradstore.open(tmp_path / "s.h5") as store:
        assert store.verify() == [{"rows": [65], "problem": "empty or purged row is not zero"}]
