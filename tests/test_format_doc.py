"""docs/FORMAT.md, checked against files gradstore writes.

Everything here re-computes from plain h5py / hdf5plugin / zstandard / zlib / numpy what
the document says: the chunk and metadata CRC-32s (its "Checking a store with h5py alone"
recipe is executed as written), the staging runs' checksums, the attribute encoding,
the fp16 and int8 quantization formulas bit for bit, and what each row state holds.
gradstore itself only writes the stores and serves ``Store.read`` as the reference.
"""

import json
import os
import pathlib
import re
import shutil
import zlib

import h5py
import hdf5plugin  # noqa: F401  (zstd filter for the metadata datasets)
import numpy as np
import pytest

import gradstore
from gradstore import shards

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
    "int4": {"id": "int4", "block_size": BLOCK},
    "int4s": {"id": "int4-stochastic", "block_size": BLOCK},
    "int2": {"id": "int2", "block_size": BLOCK},
    "sign": {"id": "sign", "block_size": 100},  # k = 500: 63 bytes, the last holding 4 codes and 4 zero bits
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
        record = json.loads(f.attrs["gradstore_committed"])
        assert {key: record[key] for key in ("generation", "note")} == {"generation": 1, "note": "second"}
        named = [f"run_{n:06d}" for first, last in record["runs"] for n in range(first, last + 1)]
        assert named == sorted(f["staging"])  # at rest after a commit, every run counts
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
            plist = values.id.get_create_plist()
            filters = [[int(code), [int(v) for v in client]] for code, _, client, _ in
                       (plist.get_filter(i) for i in range(plist.get_nfilters()))]
            decided = [int(run.attrs["generation"]), bool(run.attrs["committed"]), json.loads(run.attrs["replaces"]),
                       int(run.attrs["index_crc32"]), zlib.crc32(sums.astype("<u4").tobytes()), list(values.shape),
                       list(values.chunks), values.dtype.str, filters]
            assert run.attrs["run_crc32"] == zlib.crc32(json.dumps(decided).encode())  # as FORMAT.md gives it


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


PACKED = {"int4": (4, 7, "nearest"), "int4s": (4, 7, "stochastic"), "int2": (2, 1, "nearest"), "sign": (1, 1, "sign")}


@pytest.mark.parametrize("name", list(PACKED))
def test_packed_formula(stores, name):
    """int4 / int4-stochastic / int2 / sign: the stored bytes and scales as FORMAT.md's bullets give them."""
    x = input_rows()
    n, k = x.shape
    bits, levels, rounding = PACKED[name]
    block = CODECS[name]["block_size"]
    q = np.zeros((n, k), np.int64)
    s = np.zeros((n, -(-k // block)), np.float32)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for key in range(n):
            u = rounding_noise(SEED, key, k)
            for b in range(s.shape[1]):
                lo, hi = b * block, min(k, (b + 1) * block)
                xb = x[key, lo:hi]
                if rounding == "sign":
                    s[key, b] = np.float32(np.cumsum(np.abs(xb).astype(np.float64))[-1] / (hi - lo))
                    q[key, lo:hi] = np.where(xb < 0, 1, 0)
                    continue
                m = np.abs(xb).max()
                s[key, b] = m / np.float32(levels)
                if m == 0:
                    continue
                t = xb * (np.float32(levels) / m)
                r = np.rint(t) if rounding == "nearest" else np.floor(t + u[lo:hi])
                q[key, lo:hi] = np.where(xb == 0, 0, np.clip(r, -levels, levels))
    codes = q & (2**bits - 1)  # two's complement in b bits (sign: the code itself)
    per = 8 // bits
    padded = np.zeros((n, -(-k // per) * per), np.int64)
    padded[:, :k] = codes
    packed = (padded.reshape(n, -1, per) << (np.arange(per) * bits)).sum(axis=2).astype(np.uint8)
    parts = stored_parts(stores[name])
    on_disk = np.isin(expected_state(), [1, 2])
    assert parts["values"].dtype == np.uint8 and parts["values"].shape == (n, -(-k * bits // 8))
    assert np.array_equal(parts["scales"][on_disk].view(np.uint32), s[on_disk].view(np.uint32))
    assert np.array_equal(parts["values"][on_disk], packed[on_disk])
    assert not parts["values"][~on_disk].any() and not parts["scales"][~on_disk].any()
    if name == "int2":  # 127 .5 1.5 2.5 | -.5 -1.5 -2.5 126.5 of block max 127: only |x| > 63.5 keeps its sign
        assert parts["values"][2, :2].tolist() == [0b00_00_00_01, 0b01_00_00_00]
    if name == "int4":  # the same: q = 7 0 0 0 | 0 0 0 7 (126.5 * 7 / 127 = 6.97), then -126.5: -7, nibble 9
        assert parts["values"][2, :4].tolist() == [0x07, 0x00, 0x00, 0x70] and parts["values"][2, 4] & 0xF == 0x9


# ---------------------------------------------------------------- the datasets' headers: no checksum covers them
#
# A dataset's datatype (byte order included), shape, chunk shape and filters live in its HDF5
# object header, which neither the chunk CRCs nor the metadata CRC cover. The checking recipe must
# refuse a file whose headers differ from what the checked config implies, and never decode by them.
# The bits to flip are found, not assumed: the dataset's object header is located (h5py.h5o.get_info)
# and its messages walked; every bit of its dataspace, datatype, layout and filter-pipeline messages
# (but the filters' names) is flipped in turn, the file reopened with h5py, and the flips that change
# what h5py reports (dtype, shape, chunks, filters, or HDF5's datatype by H5Tequal) are kept.
# A flip that h5py cannot open at all is not kept: nothing can read that file wrongly.

FLIP_CODECS = {"fp32": "fp32", "fp16": "fp16", "int8": {"id": "int8", "block_size": 64, "rounding": "nearest"},
               "int4": {"id": "int4", "block_size": 64}, "int4-stochastic": {"id": "int4-stochastic", "block_size": 64},
               "int2": {"id": "int2", "block_size": 64}, "sign": {"id": "sign", "block_size": 64}}


def test_every_registered_codec_has_its_format_section_and_flip_config():
    """A codec registered in the package is documented in FORMAT.md and byte-flipped here: add it to both."""
    from gradstore.codecs import CODECS

    assert set(FLIP_CODECS) == set(CODECS)
    text = open(DOC).read()
    for codec_id in CODECS:
        assert f"- `{codec_id}`:" in text, f"docs/FORMAT.md has no bullet for codec {codec_id!r}"
FLIP_PARAMS, FLIP_KEEP, FLIP_KEYS = 600, 0.5, 120  # k = 300: 3 fp32 chunks of 54 rows, 2 fp16 chunks, 1 int8 chunk
HEADER_MESSAGES = {1: "dataspace", 3: "datatype", 8: "layout", 11: "filter pipeline"}  # HDF5 object header message types


@pytest.fixture(scope="module")
def small_stores(tmp_path_factory):
    folder = tmp_path_factory.mktemp("format_doc_headers")
    rng = np.random.default_rng(11)
    paths = {}
    for name, codec in FLIP_CODECS.items():
        path = folder / f"{name}.h5"
        store = gradstore.create(path, FLIP_PARAMS, FLIP_KEYS, FLIP_KEEP, codec=codec, seed=SEED, labels=np.arange(FLIP_KEYS) % 5)
        store.accumulate(np.arange(FLIP_KEYS), (rng.standard_normal((FLIP_KEYS, store.k)) * 1e-3).astype(np.float32))
        store.finalize().close()
        paths[name] = path
    return paths


def compiled_recipe():
    code = doc_section_code("## Checking a store with h5py alone")
    assert '"store.h5"' in code
    return compile(code.replace('"store.h5"', "STORE_PATH"), DOC, "exec")


def run_recipe(code, path):
    namespace = {"STORE_PATH": os.fspath(path)}
    exec(code, namespace)  # noqa: S102
    return namespace["rows"]


def declared_layout(path, name, hdf5_type=None):
    """What h5py reports of dataset ``name``: (dtype.str, shape, chunks, [(filter id, client values)], whether
    HDF5 holds its datatype equal to ``hdf5_type``: precision, offsets, padding, which dtype omits), or None
    when the file or the dataset does not open. Low-level calls: ~4x faster than h5py.File, same answers."""
    try:
        fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY)
    except Exception:
        return None
    dset = None
    try:
        dset = h5py.h5d.open(fid, name.encode())
        plist = dset.get_create_plist()
        chunks = plist.get_chunk() if plist.get_layout() == h5py.h5d.CHUNKED else None
        filters = [plist.get_filter(i) for i in range(plist.get_nfilters())]
        same_type = hdf5_type is None or dset.get_type() == hdf5_type  # H5Tequal
        return dset.dtype.str, dset.shape, chunks, [(fid_, tuple(values)) for fid_, _, values, _ in filters], same_type
    except Exception:
        return None
    finally:
        if dset is not None:
            dset.close()
        fid.close()


def header_message_bytes(path, name):
    """[(message type, offset, size)] of the messages of HEADER_MESSAGES in ``name``'s object header
    (version 1, what h5py writes by default: a 16-byte prefix, then messages of 8-byte header + data)."""
    with h5py.File(path, "r") as f:
        address = h5py.h5o.get_info(f[name].id).addr
    data = path.read_bytes()
    version, _, count = data[address], data[address + 1], int.from_bytes(data[address + 2 : address + 4], "little")
    assert version == 1, f"{name}: object header version {version}; this test parses version 1"
    offset, found = address + 16, []
    for _ in range(count):
        kind, size = int.from_bytes(data[offset : offset + 2], "little"), int.from_bytes(data[offset + 2 : offset + 4], "little")
        if kind in HEADER_MESSAGES:
            found.append((kind, offset + 8, size))
        offset += 8 + size
    assert sorted(kind for kind, _, _ in found) == sorted(HEADER_MESSAGES), f"{name}: messages {found}"
    return found


def flip_bit(path, offset, bit):
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ (1 << bit)]))


def header_flips(path, name, messages=tuple(HEADER_MESSAGES.values())):
    """[(offset, bit, what changed, h5py's new report)] of the single-bit flips in ``name``'s header messages
    that change what h5py reports of it. ``path`` is flipped and restored in place. The filters' names
    (text stored in the pipeline message, reported by h5py but meaning nothing to HDF5) are skipped."""
    with h5py.File(path, "r") as f:
        hdf5_type = f[name].id.get_type().copy()
        plist = f[name].id.get_create_plist()
        names = [plist.get_filter(i)[3] for i in range(plist.get_nfilters())]
    good = declared_layout(path, name, hdf5_type)
    data = path.read_bytes()
    flips = []
    for kind, start, size in header_message_bytes(path, name):
        if HEADER_MESSAGES[kind] not in messages:
            continue
        skip = set()
        if HEADER_MESSAGES[kind] == "filter pipeline":
            for text in names:
                at = data.find(text, start, start + size)
                skip.update(range(at, at + len(text)) if text and at >= 0 else ())
        for offset in range(start, start + size):
            if offset in skip:
                continue
            for bit in range(8):
                flip_bit(path, offset, bit)
                report = declared_layout(path, name, hdf5_type)
                flip_bit(path, offset, bit)
                if report is not None and report != good:
                    changed = tuple(what for what, a, b in zip(("dtype", "shape", "chunks", "filters", "hdf5 type"), good, report) if a != b)
                    flips.append((offset, bit, changed, report))
    assert path.read_bytes() == data
    return flips


# one dataset of each kind: float32 / float16 / int8 values (shuffle, shuffle, none), float32 scales (width 5)
FLIPPED = [("fp32", "values"), ("fp16", "values"), ("int8", "values"), ("int8", "scales"), ("int2", "values")]


@pytest.mark.parametrize("name, part", FLIPPED)
def test_recipe_refuses_flipped_bits_in_the_row_datasets_headers(small_stores, name, part, tmp_path):
    """Undamaged: the recipe returns gradstore's rows bit for bit. With one bit flipped in rows/<part>'s
    datatype, shape, chunk shape or filters: read_checked raises, naming the dataset, for every such flip;
    the whole recipe (check_metadata, then read_checked of every part) raises on the first flip of each kind."""
    code = compiled_recipe()
    with gradstore.open(small_stores[name]) as store:
        reference = store.read(np.arange(FLIP_KEYS))
    good = run_recipe(code, small_stores[name])
    assert good.dtype == np.float32 and np.array_equal(good.view(np.uint32), reference.view(np.uint32))
    functions = recipe_functions()
    with h5py.File(small_stores[name], "r") as f:
        good_part = functions["read_checked"](f, part)
    path = tmp_path / "damaged.h5"
    shutil.copy(small_stores[name], path)
    dset_name = f"rows/{part}"
    good_layout = declared_layout(path, dset_name)
    good_dtype, shuffled = np.dtype(good_layout[0]), good_layout[3][0] == (2, (np.dtype(good_layout[0]).itemsize,))
    counts, wrong, whole_recipe_run = {}, [], set()
    for offset, bit, changed, report in header_flips(path, dset_name):
        kinds = set(changed)
        if report[0] == good_dtype.newbyteorder().str != good_dtype.str:
            kinds.add("byte order")
        first_filter = report[3][0] if report[3] else (None, ())
        if shuffled and first_filter[0] != 2:  # h5py's dset.shuffle turns False
            kinds.add("shuffle id")
        elif shuffled and first_filter != good_layout[3][0]:  # HDF5 unshuffles by this element size
            kinds.add("shuffle element size")
        flip_bit(path, offset, bit)
        try:
            if kinds - whole_recipe_run:  # the first flip of its kind: the recipe as written
                whole_recipe_run |= kinds
                values, good_values = run_recipe(code, path), good
            else:
                with h5py.File(path, "r") as f:
                    values, good_values = functions["read_checked"](f, part), good_part
        except ValueError as error:
            if dset_name not in str(error):  # refused, but without saying what is damaged
                wrong.append(f"{sorted(kinds)} (byte {offset} bit {bit}): unclear error {error}")
        else:
            same = values.dtype == good_values.dtype and values.tobytes() == good_values.tobytes()
            wrong.append(f"{sorted(kinds)} -> {report[:4]} (byte {offset} bit {bit}): {'same' if same else 'WRONG'} values")
        finally:
            flip_bit(path, offset, bit)
        for kind in kinds:
            counts[kind] = counts.get(kind, 0) + 1
    print(f"{name} {dset_name}: refused flips {counts}")
    wrong.sort(key=lambda text: ("WRONG" not in text, "byte order" not in text))  # the worst first
    assert not wrong, f"{dset_name}: {len(wrong)} flips not refused, " + "; ".join(wrong[:6])
    # each kind of damage was exercised: byte order (float datasets), the shuffle filter, shape, chunks
    assert counts.get("byte order", 0) >= (1 if good_dtype.itemsize > 1 else 0)
    assert counts.get("shuffle id", 0) >= (1 if shuffled else 0) and counts.get("filters", 0) >= 10
    assert counts.get("shape", 0) >= 1 and counts.get("chunks", 0) >= 1 and counts.get("dtype", 0) >= 1


def byte_order_flip(path, name):
    """(offset, bit) of the one bit of ``name``'s datatype message whose flip makes h5py report the other byte order."""
    dtype = np.dtype(declared_layout(path, name)[0])
    found = [(offset, bit) for offset, bit, _, report in header_flips(path, name, ("datatype",))
             if report[0] == dtype.newbyteorder().str]
    assert len(found) == 1, found
    return found[0]


def test_recipe_reads_staging_runs_checked_and_refuses_flipped_headers(tmp_path):
    """read_run: a recording's runs bit for bit; every header flip of a run's values refused. (gradstore's own
    finalize reads a run whose values' byte-order bit is flipped as byte-swapped values: reported, not tested here.)"""
    path = tmp_path / "recording.h5"
    x = (np.random.default_rng(3).standard_normal((FLIP_KEYS, 300)) * 1e-3).astype(np.float32)
    store = gradstore.create(path, FLIP_PARAMS, FLIP_KEYS, FLIP_KEEP, codec="int8", seed=SEED, memory_budget=4 * 300 * 50)
    store.accumulate(np.arange(FLIP_KEYS), x)  # each key once: the runs hold x's rows exactly
    store.commit()
    store.close()
    functions = recipe_functions()
    with h5py.File(path, "r") as f:
        functions["check_metadata"](f)
        cfg = json.loads(f.attrs["gradstore_config"])
        names = sorted(f["staging"])
        assert len(names) >= 2
        seen = []
        for name in names:
            keys, labels, values = functions["read_run"](f["staging"][name], cfg)
            assert values.dtype == np.float32 and np.array_equal(values.view(np.uint32), x[keys].view(np.uint32))
            seen.extend(keys.tolist())
        assert sorted(seen) == list(range(FLIP_KEYS))
    victim = f"staging/{names[0]}/values"
    flips = header_flips(path, victim)
    kinds = {what for _, _, changed, _ in flips for what in changed}
    assert {"dtype", "shape", "chunks", "filters", "hdf5 type"} <= kinds, kinds
    not_refused = []
    for offset, bit, changed, _ in flips:
        flip_bit(path, offset, bit)
        try:
            with h5py.File(path, "r") as f:
                functions["read_run"](f["staging"][names[0]], cfg)
            not_refused.append((offset, bit, changed))
        except ValueError as error:
            assert victim in str(error)
        finally:
            flip_bit(path, offset, bit)
    assert not not_refused, not_refused[:5]
    offset, bit = byte_order_flip(path, victim)
    flip_bit(path, offset, bit)
    with h5py.File(path, "r") as f:  # plain h5py reads it as byte-swapped values, without an error
        assert f[victim].dtype == np.dtype(">f4") and not np.array_equal(f[victim][()], f[victim][()].byteswap())
        with pytest.raises(ValueError, match=victim):
            functions["read_run"](f["staging"][names[0]], cfg)
    print(f"staging run values: {len(flips)} header flips refused")


def sharded_recipe_blocks():
    with open(DOC, encoding="utf-8") as handle:
        text = handle.read()
    section = text[text.index("## A sharded store") : text.index("## While recording")]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2  # the check of the shards (tests/test_shards.py runs it too), then the checked read
    return [compile(block, DOC, "exec") for block in blocks]


def test_sharded_recipe_reads_every_row_checked_from_the_shards(tmp_path, monkeypatch):
    """The sharded store's recipe: rows from each shard, checked; a flipped byte-order bit in a shard's
    rows/values is refused (the entry point's virtual dataset reads it as wrong values)."""
    path = tmp_path / "RUN" / "store.h5"
    os.makedirs(shards.shard_dir(path))
    x = (np.random.default_rng(4).standard_normal((FLIP_KEYS, 300)) * 1e-3).astype(np.float32)
    for rank in range(2):
        writer = gradstore.create(shards.recording_path(path, rank, 2), FLIP_PARAMS, FLIP_KEYS, FLIP_KEEP, codec="fp16",
                                  seed=SEED, writer={"run_id": "run-a", "rank": rank, "ranks": 2})
        writer.accumulate(np.arange(rank, FLIP_KEYS, 2), x[rank::2])
        writer.commit()
        writer.close()
    for index in range(2):
        shards.finalize_shard(path, index, 2)
    shards.write_manifest(path, 2)
    shards.remove_recordings(path, 2)
    with gradstore.open(path) as store:
        reference, state = store.read(np.arange(FLIP_KEYS)), store.state.copy()
    monkeypatch.chdir(tmp_path)
    check, read = sharded_recipe_blocks()
    namespace = recipe_functions()
    exec(check, namespace)  # noqa: S102
    exec(read, namespace)  # noqa: S102
    assert np.array_equal(namespace["rows"].view(np.uint32), reference.view(np.uint32))
    assert np.array_equal(namespace["state"], state) and (state == 1).all()
    shard = pathlib.Path(shards.shard_path(path, 1, 2))
    with h5py.File(shard, "r") as f:
        lo, hi = json.loads(f.attrs["gradstore_config"])["shard"]["key_range"]
        stored = f["rows/values"][lo:hi]
        assert 0 < lo < hi
    offset, bit = byte_order_flip(shard, "rows/values")
    flip_bit(shard, offset, bit)
    with h5py.File(path, "r") as f:  # the virtual dataset: byte-swapped values, no error
        swapped = f["rows/values"][lo:hi]
    assert not np.array_equal(swapped.view(np.uint16), stored.view(np.uint16))
    exec(check, namespace)  # noqa: S102  (the manifest and the shards' headers are intact)
    with pytest.raises(ValueError, match="rows/values"):
        exec(read, namespace)  # noqa: S102


@pytest.mark.parametrize("dataset", ["rows/labels", "rows/state"])
def test_check_metadata_refuses_a_flipped_sign_bit_that_the_crcs_miss(small_stores, dataset, tmp_path):
    """The metadata CRCs are of decoded values: int64 labels read as uint64 (-1 as 2**64 - 1) pass them.
    check_metadata refuses every flip of the datatype message that changes the dtype h5py reads."""
    path = tmp_path / "damaged.h5"
    shutil.copy(small_stores["fp32"], path)
    functions = recipe_functions()
    flips = [(offset, bit, report[0]) for offset, bit, changed, report in header_flips(path, dataset, ("datatype",)) if "dtype" in changed]
    assert any(dtype[1] in "ui" and dtype[1] != np.dtype(declared_layout(path, dataset)[0]).kind for _, _, dtype in flips)
    for offset, bit, dtype in flips:
        flip_bit(path, offset, bit)
        try:
            with h5py.File(path, "r") as f, pytest.raises(ValueError, match="(checksum|wrong dtype)"):
                functions["check_metadata"](f)
        finally:
            flip_bit(path, offset, bit)
