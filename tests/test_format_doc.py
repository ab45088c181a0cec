"""docs/FORMAT.md, checked against files gradstore writes.

Everything here re-computes from plain h5py / hdf5plugin / zstandard / zlib / numpy what
the document says: the chunk and metadata CRC-32s (its "Checking a store with h5py alone"
recipe is executed as written), the staging runs' checksums, the attribute encoding,
the fp16 and int8 quantization formulas bit for bit, and what each row state holds.
gradstore itself only writes the stores and serves ``Store.read`` as the reference.
"""

import json
import os
import re
import shutil
import zlib

import h5py
import hdf5plugin  # noqa: F401  (zstd filter for the metadata datasets)
import numpy as np
import pytest

import gradstore

DOC = os.path.join(os.path.dirname(__file__), os.pardir, "docs", "FORMAT.md")
NUM_PARAMS, KEEP, NUM_KEYS = 2000, 0.25, 300  # k = 500
BLOCK = 128  # int8 blocks: 3 full blocks and a short one of 116
EMPTY = list(range(250, 260))  # never recorded
PURGED = [10, 11, 40]  # forgotten, then purged
FORGOTTEN = [12, 13]  # forgotten after the purge
CODECS = {
    "fp32": "fp32",
    "fp16": "fp16",
    "int8": {"id": "int8", "block_size": BLOCK, "rounding": "nearest"},
    "int8s": {"id": "int8", "block_size": BLOCK, "rounding": "stochastic"},
}
SEED = 77
GOLDEN = 0x9E3779B97F4A7C15
# x * (127 / m) rounds to -101 (float32: -101.49999); x * 127 / m would give -102 (-101.5)
RECIP_M, RECIP_X = np.float32(0.001524480408988893), np.float32(-0.0012183838989585638)


def doc_section_code(heading):
    """The first ```python block of a section of docs/FORMAT.md."""
    with open(DOC, encoding="utf-8") as handle:
        text = handle.read()
    start = text.index(f"\n{heading}\n")
    return re.search(r"```python\n(.*?)```", text[start:], re.S).group(1)


def recipe(path):
    """Run the document's checking recipe on ``path``: its namespace (rows, state, functions)."""
    code = doc_section_code("## Checking a store with h5py alone")
    assert '"store.h5"' in code
    namespace = {}
    exec(compile(code.replace('"store.h5"', repr(os.fspath(path))), DOC, "exec"), namespace)  # noqa: S102
    return namespace


def recipe_functions():
    """The recipe's definitions alone (for a recording store, which has no rows/values)."""
    code = doc_section_code("## Checking a store with h5py alone").split("\nwith h5py.File(")[0]
    namespace = {}
    exec(compile(code, DOC, "exec"), namespace)  # noqa: S102
    return namespace


def input_rows():
    """float32 [NUM_KEYS, k] rows, with edge cases at keys 0-5; each key is accumulated once, so they are the sums."""
    k = int(round(KEEP * NUM_PARAMS))
    rng = np.random.default_rng(5)
    x = (rng.standard_t(3, size=(NUM_KEYS, k)) * 1e-4).astype(np.float32)
    x[rng.random(x.shape) < 0.05] = 0
    x[0] = 0  # a live row of zeros
    x[1] = 0  # largest value float32's smallest subnormal: fp16 scale 2**-149; int8's 127 / m overflows
    x[1, :6] = [2.0**-149, -(2.0**-149), 0, 2.0**-149, 0, 0]  # (finalize's sums would turn -0.0 into 0.0)
    x[2, :BLOCK] = rng.uniform(-126, 126, BLOCK)  # int8 block of max 127: inv = 1, ties visible
    x[2, :9] = [127, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, -126.5]
    x[2, BLOCK : 2 * BLOCK] = rng.uniform(-1e-4, 1e-4, BLOCK)
    x[2, BLOCK : BLOCK + 2] = [RECIP_M, RECIP_X]
    x[3] = 0  # fp16 near the bottom of a row scaled by 1
    x[3, :7] = [1.0, 2.0**-25, -(2.0**-25), 1.5 * 2.0**-25, 1e-8, 2.0**-14, 2.0**-24]
    x[4, :3] = [3e38, -1.0, 1e30]  # fp16 scale capped at 2**127
    x[EMPTY] = 0
    return x


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """{codec name: path} of finished stores of the same rows, with empty, forgotten and purged rows.
    The fp32 store is step-keyed and carries membership."""
    folder = tmp_path_factory.mktemp("format_doc")
    x = input_rows()
    labels = np.arange(NUM_KEYS) % 10
    recorded = np.setdiff1d(np.arange(NUM_KEYS), EMPTY)
    paths = {}
    for name, codec in CODECS.items():
        path = folder / f"{name}.h5"
        kind = "step" if name == "fp32" else "sample"
        store = gradstore.create(path, NUM_PARAMS, NUM_KEYS, KEEP, codec=codec, seed=SEED, key_kind=kind)
        for start in range(0, recorded.size, 64):
            keys = recorded[start : start + 64][::-1]  # not in key order
            store.accumulate(keys, x[keys], labels=labels[keys])
        if kind == "step":
            for key in (3, 7, 290):
                store.add_members(key, np.arange(key, key + 5) * 11)
        store = store.finalize()
        store.close()
        with gradstore.open(path, "r+") as store:
            store.mark_forgotten(PURGED)
            store.purge()
            store.mark_forgotten(FORGOTTEN)
        paths[name] = path
    return paths


def expected_state():
    state = np.ones(NUM_KEYS, np.uint8)
    state[EMPTY], state[PURGED], state[FORGOTTEN] = 0, 3, 2
    return state


# ---------------------------------------------------------------- chunks, rows and states


@pytest.mark.parametrize("name", list(CODECS))
def test_recipe_checks_and_decodes_every_row(stores, name):
    ns = recipe(stores[name])
    rows, state = ns["rows"], ns["state"]
    assert np.array_equal(state, expected_state())
    kept = np.nonzero(np.isin(state, [1, 2]))[0]  # live and forgotten rows are on disk
    with gradstore.open(stores[name]) as store:
        reference = store.read(kept)
    assert rows.dtype == np.float32
    assert np.array_equal(rows[kept].view(np.uint32), reference.view(np.uint32))  # bit for bit
    assert not rows[EMPTY + PURGED].any()
    with h5py.File(stores[name], "r") as f:
        cfg = json.loads(f.attrs["gradstore_config"])
        parts = ns["codec_parts"](cfg)
        assert sorted(f["checksums"]) == sorted(parts) and sorted(f["rows"]) == sorted(parts + ["labels", "state"])
        for part in parts:  # the recipe's decoding agrees with HDF5's own pipeline
            assert f["checksums"][part].dtype == np.uint32 and f["checksums"][part].chunks is None
            assert np.array_equal(ns["read_checked"](f, part), f["rows"][part][()])
        assert (f["rows/labels"][()][PURGED] == -1).all()
        assert f["rows/labels"][()][FORGOTTEN].tolist() == [2, 3]
        if name != "fp32":
            scales = f["rows/scales"][()]
            if name == "fp16":
                assert (scales[EMPTY] == 1).all() and (scales[PURGED] == 0).all() and scales[0, 0] == 1
            else:
                assert not scales[EMPTY + PURGED + [0]].any()


def test_flipped_byte_reads_silently_wrong_through_plain_h5py(stores, tmp_path):
    damaged = tmp_path / "damaged.h5"
    shutil.copy(stores["int8"], damaged)
    with h5py.File(damaged, "r") as f:
        good = f["rows/values"][()]
        info = f["rows/values"].id.get_chunk_info(1)
    with open(damaged, "r+b") as handle:
        handle.seek(info.byte_offset + info.size // 2)
        byte = handle.read(1)[0]
        handle.seek(info.byte_offset + info.size // 2)
        handle.write(bytes([byte ^ 0x10]))
    with h5py.File(damaged, "r") as f:
        assert not np.array_equal(f["rows/values"][()], good), "hdf5plugin now detects it: update docs/FORMAT.md"
    with pytest.raises(ValueError, match="chunk 1"):
        recipe(damaged)


# ---------------------------------------------------------------- metadata


def assert_json_attr(obj, name):
    """Fixed-length NULLPAD ASCII string of exactly json.dumps(value, sort_keys=True)."""
    raw = obj.attrs[name]
    assert isinstance(raw, np.bytes_)
    kind = obj.attrs.get_id(name).get_type()
    assert isinstance(kind, h5py.h5t.TypeStringID) and not kind.is_variable_str()
    assert kind.get_size() == len(raw) and kind.get_strpad() == h5py.h5t.STR_NULLPAD and kind.get_cset() == h5py.h5t.CSET_ASCII
    assert raw.decode("ascii") == json.dumps(json.loads(raw), sort_keys=True)


@pytest.mark.parametrize("name", list(CODECS))
def test_metadata_checksums_of_a_finished_store(stores, name):
    ns = recipe(stores[name])
    with h5py.File(stores[name], "r") as f:
        stored = json.loads(f.attrs["gradstore_checksums"])
        assert stored == ns["metadata_checksums"](f)  # all five keys
        assert sorted(stored) == ["committed", "config", "labels", "membership", "state"]
        assert stored["committed"] == 0 and "gradstore_committed" not in f.attrs
        assert stored["config"] == zlib.crc32(b"2|True|" + bytes(f.attrs["gradstore_config"]))
        assert stored["labels"] == zlib.crc32(f["rows/labels"][()].astype("<i8").tobytes())  # decoded, not stored bytes
        _, stored_labels = f["rows/labels"].id.read_direct_chunk((0,))
        assert stored["labels"] != zlib.crc32(stored_labels)
        if name == "fp32":
            m = f["membership"]
            chained = zlib.crc32(m["samples"][()].tobytes(), zlib.crc32(m["indptr"][()].tobytes(), zlib.crc32(m["keys"][()].tobytes())))
            assert m["keys"][()].tolist() == [3, 7, 290] and stored["membership"] == chained != 0
        else:
            assert "membership" not in f and stored["membership"] == 0
        assert f.attrs["gradstore_format_version"].dtype == np.int64
        assert f.attrs.get_id("gradstore_finished").get_type().get_class() == h5py.h5t.ENUM
        assert f.attrs["gradstore_finished"] is np.True_
        for attr in ("gradstore_config", "gradstore_checksums"):
            assert_json_attr(f, attr)
        ns["check_metadata"](f)


def test_metadata_and_run_checksums_while_recording(tmp_path):
    path = tmp_path / "recording.h5"
    x = input_rows()
    gradstore.create(tmp_path / "fresh.h5", NUM_PARAMS, NUM_KEYS, KEEP).close()
    with h5py.File(tmp_path / "fresh.h5", "r") as f:  # no commit yet
        assert "gradstore_committed" not in f.attrs and json.loads(f.attrs["gradstore_checksums"])["committed"] == 0
        recipe_functions()["check_metadata"](f)
    store = gradstore.create(path, NUM_PARAMS, NUM_KEYS, KEEP, codec="int8", seed=SEED, labels=np.arange(NUM_KEYS) % 7,
                             memory_budget=4 * 500 * 40)  # 40 rows: spills into several runs
    store.accumulate(np.arange(0, 100), x[:100])
    store.commit(note={"step": 1, "name": "Übung"})
    store.accumulate(np.arange(50, 130), x[50:130])
    store.commit(note="second")
    store.close()
    functions = recipe_functions()
    with h5py.File(path, "r") as f:
        assert f.attrs["gradstore_finished"] is np.False_
        stored = json.loads(f.attrs["gradstore_checksums"])
        actual = functions["metadata_checksums"](f)
        assert stored == actual  # at rest after a commit, all five agree
        assert stored["config"] == zlib.crc32(b"2|False|" + bytes(f.attrs["gradstore_config"]))
        assert stored["committed"] == zlib.crc32(bytes(f.attrs["gradstore_committed"])) != 0
        assert_json_attr(f, "gradstore_committed")
        assert json.loads(f.attrs["gradstore_committed"]) == {"generation": 1, "note": "second"}
        functions["check_metadata"](f)
        runs = f["staging"]
        assert len(runs) >= 2
        r = max(1, 262144 // (4 * 500))
        for name in runs:
            run = runs[name]
            keys, labels, values = run["keys"][()], run["labels"][()], run["values"]
            assert run.attrs["index_crc32"] == zlib.crc32(labels.astype("<i8").tobytes(), zlib.crc32(keys.astype("<i8").tobytes()))
            sums = run["checksums"][()]
            assert values.chunks == (r, 500) and sums.dtype == np.uint32 and sums.shape == (-(-keys.size // r),)
            for i in range(sums.size):
                _, frame = values.id.read_direct_chunk((i * r, 0))
                assert functions["frame_checksum"](i, frame) == sums[i]


# ---------------------------------------------------------------- the codecs' formulas


def stored_parts(path):
    with h5py.File(path, "r") as f:
        return {part: f["rows"][part][()] for part in f["checksums"]}


def test_fp16_formula(stores):
    x = input_rows()
    m = np.abs(x).max(axis=1, keepdims=True)
    mantissa, e = np.frexp(m)
    e = np.minimum(e - (mantissa == 0.5), 127)  # the smallest 2**e >= m, at most 2**127
    s = np.where(m == 0, np.float32(1), np.ldexp(np.float32(1), e).astype(np.float32)).astype(np.float32)
    v = (x / s).astype(np.float16)
    parts = stored_parts(stores["fp16"])
    on_disk = np.isin(expected_state(), [1, 2])
    assert np.array_equal(parts["scales"][on_disk].view(np.uint32), s[on_disk].view(np.uint32))
    assert np.array_equal(parts["values"][on_disk].view(np.uint16), v[on_disk].view(np.uint16))
    assert parts["scales"][1, 0] == np.float32(2.0**-149) and parts["values"][1, 0] == 1  # no lower clamp
    assert parts["values"][3, :7].tolist() == [1.0, 0.0, -0.0, 2.0**-24, 0.0, 2.0**-14, 2.0**-24]
    assert np.signbit(parts["values"][3, :3]).tolist() == [False, False, True]  # 2**-25 * s is a tie: to (signed) 0
    assert parts["scales"][4, 0] == np.float32(2.0**127)


def mix(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def rounding_noise(seed, key, k):
    """u[j] of the stochastic rounding stream (seed, key, salt 0x5DEECE66D), float32."""
    base = mix(np.array([mix(np.array([seed ^ 0x5DEECE66D], np.uint64))[0] ^ np.uint64(key)], np.uint64))[0]
    draws = mix(base + np.arange(1, k + 1, dtype=np.uint64) * np.uint64(GOLDEN))
    return (draws >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)


@pytest.mark.parametrize("name", ["int8", "int8s"])
def test_int8_formula(stores, name):
    x = input_rows()
    n, k = x.shape
    q = np.zeros((n, k), np.float32)
    s = np.zeros((n, -(-k // BLOCK)), np.float32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for key in range(n):
            u = rounding_noise(SEED, key, k)
            for b in range(s.shape[1]):
                lo, hi = b * BLOCK, min(k, (b + 1) * BLOCK)
                m = np.abs(x[key, lo:hi]).max()
                s[key, b] = m / np.float32(127)
                if m == 0:
                    continue
                t = x[key, lo:hi] * (np.float32(127) / m)  # the reciprocal first, then one float32 product
                r = np.rint(t) if name == "int8" else np.floor(t + u[lo:hi])
                q[key, lo:hi] = np.where(x[key, lo:hi] == 0, 0, np.clip(r, -127, 127))  # zeros stay 0 when 127 / m is inf
    parts = stored_parts(stores[name])
    on_disk = np.isin(expected_state(), [1, 2])
    assert np.array_equal(parts["scales"][on_disk].view(np.uint32), s[on_disk].view(np.uint32))
    assert np.array_equal(parts["values"][on_disk], q[on_disk].astype(np.int8))
    assert (parts["values"] != -128).all()
    if name == "int8":
        assert parts["values"][2, :9].tolist() == [127, 0, 2, 2, 0, -2, -2, 126, -126]  # ties to even
        assert parts["values"][2, BLOCK + 1] == -101 != np.rint(RECIP_X * np.float32(127) / RECIP_M)
        assert parts["values"][1, :6].tolist() == [127, -127, 0, 127, 0, 0] and parts["scales"][1, 0] == 0
