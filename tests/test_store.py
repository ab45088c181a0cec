"""The store: recording over epochs (with and without spilled runs), reading, scatter-add,
plain-h5py readability, info, forgetting and purging."""

import os

import h5py
import hdf5plugin  # noqa: F401  (registers the zstd filter for plain h5py reads)
import numpy as np
import pytest

import gradstore
from gradstore import BadInputError, RowState, kernels, masks, staging
from gradstore.codecs import CODECS as REGISTERED

from conftest import EPS32, build_store, gradient_rows

# every registered codec at its defaults, and int8's other rounding
CODECS = {**{codec_id: codec_id for codec_id in REGISTERED}, "int8-stochastic": {"id": "int8", "rounding": "stochastic"}}


# ---------------------------------------------------------------------------- helpers


def record(path, codec, num_keys=200, num_params=4000, keep=0.15, epochs=4, memory_budget=256 << 20, seed=5, batch=32):
    """Record ``epochs`` epochs (a fresh permutation each, batches of ``batch``) and finalize.

    Returns (store still open, float64 sums, float64 sums of |x|, committed runs before finalize).
    """
    rng = np.random.default_rng(99)
    store = gradstore.create(path, num_params=num_params, num_keys=num_keys, keep=keep, codec=codec, seed=seed, memory_budget=memory_budget)
    sums = np.zeros((num_keys, store.k))
    sumabs = np.zeros((num_keys, store.k))
    for _ in range(epochs):
        order = rng.permutation(num_keys)
        for start in range(0, num_keys, batch):
            keys = order[start : start + batch]
            rows = gradient_rows(rng, keys.size, store.k)
            store.accumulate(keys, rows)
            sums[keys] += rows
            sumabs[keys] += np.abs(rows)
    runs = store.info()["staging_runs"]
    store = store.finalize()
    return store, sums, sumabs, runs


def check_within_codec_bound(codec_spec, decoded, sums, sumabs, epochs):
    """|decoded - float64 sum| within the float32 summation error plus one quantization of the codec."""
    codec = gradstore.get_codec(codec_spec)
    decoded = decoded.astype(np.float64)
    sum_err = epochs * EPS32 * sumabs + 1e-30
    err = np.abs(decoded - sums)
    if codec.codec_id == "fp32":
        bound = sum_err
    elif codec.codec_id == "fp16":
        rowmax = np.abs(sums).max(axis=1, keepdims=True)
        bound = sum_err + 2.0**-11 * (np.abs(sums) + sum_err) + 2.0**-23 * rowmax
        rel = np.linalg.norm(decoded - sums, axis=1) / np.maximum(np.linalg.norm(sums, axis=1), 1e-30)
        assert rel.max() <= 1e-3
    elif not isinstance(codec, gradstore.codecs.Int8Block):  # the sub-byte codecs: their stated bound, moved by the
        # float32 sums' error (1-Lipschitz in each value, and in the block's scale)
        bound = codec.error_bound(sums) + 2 * sum_err + sum_err.max(axis=1, keepdims=True)
    else:
        block = codec.block_size
        k = sums.shape[1]
        nblocks = -(-k // block)
        padded = np.zeros((sums.shape[0], nblocks * block))
        padded[:, :k] = np.abs(sums) + sum_err
        step = np.repeat(padded.reshape(sums.shape[0], nblocks, block).max(axis=2) / 127, block, axis=1)[:, :k]
        half = 1.0 if codec.rounding == "stochastic" else 0.5
        bound = sum_err + half * step * (1 + 1e-5)
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert np.all(err <= bound), (codec_spec, worst, err[worst], bound[worst])


def float64_scatter_reference(flat0, store, keys, alpha):
    """float64 np.add.at of alpha * decoded rows at their mask positions, and an error bound."""
    keys = np.asarray(keys)
    rows = store.read(keys).astype(np.float64)
    pos = masks.positions_many(store.seed, keys, store.num_params, store.k)
    ref = flat0.astype(np.float64)
    np.add.at(ref, pos.ravel(), alpha * rows.ravel())
    sumabs = np.abs(flat0).astype(np.float64)
    np.add.at(sumabs, pos.ravel(), np.abs(alpha * rows.ravel()))
    count = np.bincount(pos.ravel(), minlength=store.num_params)
    return ref, (count + 2) * EPS32 * sumabs + 1e-30


def manual_decode(h5file, codec_config, lo, hi):
    """Rows [lo, hi) decoded from plain h5py slices, the way docs/FORMAT.md tells a reader to."""
    values = h5file["rows/values"][lo:hi]
    if codec_config["id"] == "fp32":
        return values
    scales = h5file["rows/scales"][lo:hi]
    if codec_config["id"] == "fp16":
        return values.astype(np.float32) * scales
    if codec_config["id"] != "int8":  # sub-byte codes, as docs/FORMAT.md's int4 / int2 / sign bullets say
        import json

        k = json.loads(h5file.attrs["gradstore_config"])["k"]
        bits = {"int4": 4, "int4-stochastic": 4, "int2": 2, "sign": 1}[codec_config["id"]]
        shifts = (np.arange(8 // bits) * bits).astype(np.uint8)
        codes = ((values[:, :, None] >> shifts) & (2**bits - 1)).reshape(values.shape[0], -1)[:, :k].astype(np.int64)
        q = 1 - 2 * codes if bits == 1 else np.where(codes >= 2 ** (bits - 1), codes - 2**bits, codes)
        return q.astype(np.float32) * scales[:, np.arange(k) // codec_config["block_size"]]
    j = np.arange(values.shape[1])
    return values.astype(np.float32) * scales[:, j // codec_config["block_size"]]


# ---------------------------------------------------------------------------- recording


@pytest.mark.parametrize("codec", list(CODECS))
@pytest.mark.parametrize("budget", ["big", "tiny"])
def test_accumulate_epochs_equals_float64_sum(tmp_path, monkeypatch, codec, budget):
    path = tmp_path / "store.h5"
    k = 600
    if budget == "tiny":
        monkeypatch.setattr(staging, "MAX_FANIN", 3)  # exercise run compaction with few runs
        memory_budget = 4 * k * 40  # 40 rows of float32 sums: spills every other batch
    else:
        memory_budget = 256 << 20
    store, sums, sumabs, runs = record(path, CODECS[codec], memory_budget=memory_budget)
    if budget == "tiny":
        assert runs > 3 * staging.MAX_FANIN, runs  # many runs, more than the fan-in: compaction ran
    else:
        assert runs == 0  # everything stayed in the write buffer
    assert store.k == k
    decoded = store.read(np.arange(200))
    assert decoded.shape == (200, k) and decoded.dtype == np.float32
    check_within_codec_bound(CODECS[codec], decoded, sums, sumabs, epochs=4)
    assert np.all(store.state == RowState.LIVE)
    store.close()

    # one row per key, nothing of the recording left behind
    assert sorted(os.listdir(tmp_path)) == ["store.h5"]
    with h5py.File(path, "r") as f:
        assert "staging" not in f
        codec_obj = gradstore.get_codec(CODECS[codec])
        assert f["rows/values"].shape == (200, k if codec_obj.codec_id in ("fp32", "fp16", "int8") else -(-k * codec_obj.bits // 8))
        for part in codec_obj.parts(k):
            assert f["rows"][part.name].shape == (200, part.width)
            assert f["rows"][part.name].dtype == part.dtype
        assert bool(f.attrs["gradstore_finished"])
    with gradstore.open(path) as reopened:
        assert np.array_equal(reopened.read(np.arange(200)), decoded)


def test_recording_is_deterministic_whatever_the_budget(tmp_path):
    """Recording is deterministic: two runs with the same data give identical stored rows."""
    a, _, _, _ = record(tmp_path / "a.h5", CODECS["int8-stochastic"], epochs=2)
    b, _, _, _ = record(tmp_path / "b.h5", CODECS["int8-stochastic"], epochs=2, memory_budget=4 * 600 * 40)
    assert np.array_equal(a.read(np.arange(200)), b.read(np.arange(200)))
    a.close()
    b.close()


def test_batch_larger_than_memory_budget(tmp_path):
    """A memory budget smaller than one batch must still record correctly (spill, or refuse cleanly)."""
    k = 100
    store = gradstore.create(tmp_path / "s.h5", num_params=1000, num_keys=64, keep=0.1, codec="fp32", memory_budget=4 * k * 10)
    rng = np.random.default_rng(3)
    rows = gradient_rows(rng, 32, k)
    try:
        store.accumulate(np.arange(32), rows)
    except BadInputError:
        # a clean refusal is acceptable, but then the store must be untouched and still usable
        store.accumulate(np.arange(8), rows[:8])
        store = store.finalize()
        assert np.array_equal(store.read(np.arange(8)), rows[:8])
        assert np.all(store.state[8:] == RowState.EMPTY)
        store.close()
        return
    store.accumulate(np.arange(32), rows)
    store.accumulate(np.arange(32, 64), rows)
    store = store.finalize()
    assert np.array_equal(store.read(np.arange(32)), 2 * rows)
    assert np.array_equal(store.read(np.arange(32, 64)), rows)
    store.close()


def test_resume_recording_after_reopen(tmp_path):
    """close() commits the buffer; reopening with 'r+' continues the recording."""
    path = tmp_path / "s.h5"
    rng = np.random.default_rng(8)
    store = gradstore.create(path, num_params=3000, num_keys=50, keep=0.1, codec="fp32")
    first = gradient_rows(rng, 50, store.k)
    store.accumulate(np.arange(50), first)
    store.close()
    store = gradstore.open(path, "r+")
    assert not store.finished
    assert store.info()["staging_runs"] == 1
    second = gradient_rows(rng, 50, store.k)
    store.accumulate(np.arange(50)[::-1], second[::-1])
    store = store.finalize()
    assert np.array_equal(store.read(np.arange(50)), first + second)
    store.close()


def test_empty_rows_stay_empty(tmp_path):
    store = gradstore.create(tmp_path / "s.h5", num_params=2000, num_keys=40, keep=0.1, codec="int8")
    rng = np.random.default_rng(2)
    store.accumulate(np.arange(0, 40, 2), gradient_rows(rng, 20, store.k))
    store = store.finalize()
    assert np.all(store.state[1::2] == RowState.EMPTY)
    with pytest.raises(BadInputError, match="empty"):
        store.read([1])
    assert store.info()["rows_empty"] == 20
    assert store.verify() == []
    store.close()


# ---------------------------------------------------------------------------- reading


@pytest.mark.parametrize("codec", list(REGISTERED))
def test_plain_h5py_reads_what_store_reads(tmp_path, codec):
    path, sums = build_store(tmp_path / "s.h5", codec=codec)
    with gradstore.open(path) as store:
        expected = store.read(np.arange(300))
        rows_per_chunk = store.rows_per_chunk
        config = store.config["codec"]
    assert 300 > rows_per_chunk  # several chunks
    with h5py.File(path, "r") as f:
        for lo, hi in [(0, 300), (0, 1), (rows_per_chunk - 3, rows_per_chunk + 5), (299, 300)]:
            assert np.array_equal(manual_decode(f, config, lo, hi), expected[lo:hi]), (lo, hi)
        assert np.all(f["rows/state"][()] == RowState.LIVE)
        assert f["rows/labels"].shape == (300,)
    # and what is stored is the recorded data within the codec bound
    check_within_codec_bound(codec, expected, sums, np.abs(sums), epochs=1)


def test_read_order_and_single_rows(small_store):
    path, _ = small_store
    with gradstore.open(path) as store:
        everything = store.read(np.arange(300))
        keys = np.array([250, 3, 131, 0, 299])
        assert np.array_equal(store.read(keys), everything[keys])
        assert np.array_equal(store.read(7), everything[7:8])
        assert store.read([]).shape == (0, store.k)
        assert np.array_equal(store.positions(12), masks.positions(store.seed, 12, store.num_params, store.k))


def test_info_fields(small_store):
    path, _ = small_store
    with gradstore.open(path) as store:
        info = store.info()
    required = {
        "format_version", "num_params", "keep", "k", "codec", "seed", "rows_live", "rows_forgotten",
        "bytes_on_disk", "bytes_per_value", "finished",
    }
    assert required <= set(info)
    assert info["format_version"] == gradstore.format.FILE_VERSION  # a single file; FORMAT_VERSION is the highest read
    assert (info["num_params"], info["keep"], info["k"], info["seed"]) == (5000, 0.1, 500, 11)
    assert info["codec"] == gradstore.get_codec("int8").get_config()
    assert (info["rows_live"], info["rows_forgotten"], info["finished"]) == (300, 0, True)
    assert info["bytes_on_disk"] == os.path.getsize(path)
    assert info["bytes_per_value"] == pytest.approx(os.path.getsize(path) / (300 * 500))
    assert 0.5 < info["bytes_per_value"] < 1.5  # int8 + scales + metadata, zstd: far below fp32's 4


# ---------------------------------------------------------------------------- scatter-add


@pytest.mark.parametrize("codec", list(REGISTERED))
def test_scatter_add_matches_float64_reference(tmp_path, codec):
    path, _ = build_store(tmp_path / "s.h5", codec=codec)
    rng = np.random.default_rng(17)
    with gradstore.open(path) as store:
        for keys, alpha in [([42], 1.0), (rng.choice(300, 37, replace=False), -0.5), (np.arange(300), 2.0)]:
            flat0 = (rng.standard_normal(store.num_params) * 1e-3).astype(np.float32)
            flat = flat0.copy()
            store.scatter_add(flat, keys, alpha=alpha)
            ref, bound = float64_scatter_reference(flat0, store, keys, alpha)
            assert np.all(np.abs(flat - ref) <= bound), (codec, len(keys))
            assert not np.array_equal(flat, flat0)
            # positions outside every row's mask are untouched
            touched = np.zeros(store.num_params, bool)
            touched[masks.positions_many(store.seed, np.asarray(keys), store.num_params, store.k).ravel()] = True
            assert np.array_equal(flat[~touched], flat0[~touched])


@pytest.mark.parametrize("codec", ["int8", "fp32"])
def test_scatter_add_parallel_kernel_path(tmp_path, codec):
    """Calls of n * k >= kernels.PARALLEL_MIN_VALUES (n > 1) run the parallel kernel (the
    parameter range split across threads); the result must not depend on it."""
    path, _ = build_store(tmp_path / "big.h5", codec=codec, num_params=200_000, num_keys=40, keep=0.05)
    with gradstore.open(path) as store:
        assert store.k == 10_000
        flat0 = np.linspace(-1e-3, 1e-3, store.num_params, dtype=np.float32)
        subset = np.random.default_rng(5).permutation(40)[:30]
        for keys in (np.arange(40), subset):
            assert keys.size * store.k >= max(kernels.PARALLEL_MIN_VALUES, 2**16)
            flat = flat0.copy()
            store.scatter_add(flat, keys, alpha=-1.25)
            ref, bound = float64_scatter_reference(flat0, store, keys, -1.25)
            assert np.all(np.abs(flat - ref) <= bound)
        # the same rows applied in serial calls (one key at a time) give the same vector
        serial = flat0.copy()
        for key in subset:
            store.scatter_add(serial, [key], alpha=-1.25)
        ref, bound = float64_scatter_reference(flat0, store, subset, -1.25)
        assert np.all(np.abs(serial - ref) <= bound)
        assert np.allclose(serial, flat, rtol=0, atol=float(bound.max()))
        # the order of the keys does not matter
        a, b = flat0.copy(), flat0.copy()
        store.scatter_add(a, subset)
        store.scatter_add(b, np.sort(subset))
        assert np.array_equal(a, b)


# ---------------------------------------------------------------------------- forgetting


def test_mark_forgotten_refuses_scatter_and_second_forget(small_store):
    path, _ = small_store
    with gradstore.open(path, "r+") as store:
        before = store.read([5, 6])
        store.mark_forgotten([5, 6])
        flat = np.zeros(store.num_params, np.float32)
        with pytest.raises(BadInputError, match="forgotten"):
            store.scatter_add(flat, [4, 5])
        assert not flat.any()  # refused before touching the vector
        with pytest.raises(BadInputError, match="forgotten"):
            store.mark_forgotten([6])
        with pytest.raises(BadInputError):
            store.mark_forgotten([7, 5])
        assert store.state[7] == RowState.LIVE  # the refused call changed nothing
        assert np.array_equal(store.read([5, 6]), before)  # still on disk until purged
        assert store.info()["rows_forgotten"] == 2
    with gradstore.open(path) as store:  # persisted
        assert store.state[5] == RowState.FORGOTTEN and store.state[6] == RowState.FORGOTTEN
        assert store.state[7] == RowState.LIVE
        assert store.info()["rows_live"] == 298


def chunk_frames(path, part, rows_per_chunk, num_chunks):
    with h5py.File(path, "r") as f:
        dset = f["rows"][part]
        return [dset.id.read_direct_chunk((i * rows_per_chunk, 0))[1] for i in range(num_chunks)]


def test_purge_erases_forgotten_rows(small_store):
    path, _ = small_store
    with gradstore.open(path) as store:
        rows = store.rows_per_chunk
        everything = store.read(np.arange(300))
    assert rows == 131  # chunks: [0, 131), [131, 262), [262, 300)
    values_frames = chunk_frames(path, "values", rows, 3)
    scales_frames = chunk_frames(path, "scales", rows, 3)
    raw = open(path, "rb").read()
    assert all(frame in raw for frame in values_frames + scales_frames)  # the byte search finds frames
    size_before = os.path.getsize(path)

    with h5py.File(path, "r") as f:
        before_values = f["rows/values"][()]
    doomed = np.concatenate([np.arange(131, 262), [3, 77]])  # all of chunk 1, two rows of chunk 0
    live = np.setdiff1d(np.arange(300), doomed)
    with gradstore.open(path, "r+") as store:
        store.mark_forgotten(doomed)
        assert store.purge() == doomed.size
        assert np.all(store.state[doomed] == RowState.PURGED)
        assert store.purge() == 0
        with pytest.raises(BadInputError, match="purged"):
            store.read([131])
        with pytest.raises(BadInputError, match="purged"):
            store.read([3])
        assert np.array_equal(store.read(live), everything[live])
        assert store.verify() == []

    assert os.path.getsize(path) < size_before
    raw = open(path, "rb").read()
    for chunk in (0, 1):  # chunks that held forgotten rows: none of their old frames survive
        assert values_frames[chunk] not in raw, chunk
        assert scales_frames[chunk] not in raw, chunk
    assert values_frames[2] in raw  # an untouched chunk is copied as it was

    with gradstore.open(path) as store:
        assert np.all(store.state[doomed] == RowState.PURGED)
        assert np.all(store.labels[doomed] == -1)
        info = store.info()
        assert (info["rows_live"], info["rows_forgotten"], info["rows_purged"]) == (300 - doomed.size, 0, doomed.size)
        assert store.verify() == []
        flat = np.zeros(store.num_params, np.float32)
        with pytest.raises(BadInputError, match="purged"):
            store.scatter_add(flat, [140])
        store.scatter_add(flat, live[:5])
        assert flat.any()
    with h5py.File(path, "r") as f:  # purged rows hold zeros
        assert not f["rows/values"][131:262].any()
        assert not f["rows/values"][3].any() and f["rows/values"][4].any()
    # no decoded byte of a purged row survives either: not raw, not inside any zstd frame left in the file
    blobs = [raw] + decoded_zstd_frames(raw)
    assert len(blobs) > 3  # the scan finds the frames that remain
    for key in doomed:
        row_bytes = before_values[key].tobytes()
        assert not any(row_bytes in blob for blob in blobs), key
    assert any(before_values[live[0]].tobytes() in blob for blob in blobs)  # and it would find a live row's


def decoded_zstd_frames(raw):
    """The decompressed content of every zstd frame found anywhere in ``raw``."""
    import zstandard

    blobs, start = [], 0
    magic = b"\x28\xb5\x2f\xfd"
    while (position := raw.find(magic, start)) >= 0:
        try:
            blobs.append(zstandard.ZstdDecompressor().decompressobj().decompress(raw[position:]))
        except zstandard.ZstdError:
            pass
        start = position + 1
    return blobs


def test_keys_with_label(tmp_path):
    labels = (np.arange(300) * 7) % 10
    path, _ = build_store(tmp_path / "s.h5", labels=labels)
    with gradstore.open(path, "r+") as store:
        assert np.array_equal(store.keys_with_label(3), np.nonzero(labels == 3)[0])
        assert store.keys_with_label(42).size == 0
        forget = store.keys_with_label(3)[:4]
        store.mark_forgotten(forget)
        assert np.array_equal(store.keys_with_label(3), np.nonzero(labels == 3)[0][4:])
        assert np.array_equal(store.keys_with_label(3, states=(RowState.FORGOTTEN,)), forget)


def test_labels_given_with_batches(tmp_path):
    store = gradstore.create(tmp_path / "s.h5", num_params=2000, num_keys=20, keep=0.1)
    rng = np.random.default_rng(4)
    store.accumulate(np.arange(10), gradient_rows(rng, 10, store.k), labels=np.full(10, 4))
    store.accumulate(np.arange(10, 15), gradient_rows(rng, 5, store.k), labels=np.full(5, 1))
    store.accumulate(np.arange(15, 20), gradient_rows(rng, 5, store.k))
    store = store.finalize()
    store.close()
    with gradstore.open(tmp_path / "s.h5") as store:
        assert np.array_equal(store.keys_with_label(4), np.arange(10))
        assert np.array_equal(store.keys_with_label(1), np.arange(10, 15))
        assert np.array_equal(store.keys_with_label(-1), np.arange(15, 20))


def test_purge_keeps_the_membership_of_step_keyed_stores(tmp_path):
    store = gradstore.create(tmp_path / "steps.h5", 50, 4, 1.0, codec="fp32", key_kind="step")
    for step in range(4):
        store.accumulate([step], np.full((1, 50), step + 1, np.float32))
        store.add_members(step, [2 * step, 2 * step + 1])
    store = store.finalize()
    store.close()
    store = gradstore.open(tmp_path / "steps.h5", "r+")
    assert store.keys_covering([2, 7]).tolist() == [1, 3]
    store.mark_forgotten([1])
    store.purge()
    store.close()
    store = gradstore.open(tmp_path / "steps.h5")
    assert store.keys_covering([2, 7]).tolist() == [3]  # step 1 is purged, step 3 still found
    assert store.keys_covering([2], states=tuple(gradstore.RowState.NAMES)).tolist() == [1]


def test_reopened_unfinished_store_takes_state_and_labels_from_its_runs(tmp_path):
    store = gradstore.create(tmp_path / "r.h5", 100, 10, 0.5, codec="fp32")
    store.accumulate([1, 4], np.ones((2, 50), np.float32), labels=[7, 8])
    store.commit()
    store.close()
    reopened = gradstore.open(tmp_path / "r.h5", "r+")  # an unfinished store reopened for recording
    assert reopened.state[[1, 4]].tolist() == [1, 1] and reopened.labels[[1, 4]].tolist() == [7, 8]
    reopened = reopened.finalize()
    np.testing.assert_array_equal(reopened.read([1, 4]), np.ones((2, 50), np.float32))


def test_a_recording_whose_labels_or_state_were_overwritten_is_refused(tmp_path):
    """A commit writes them as fresh datasets, sealed in the same flush: changed bytes are damage, not a crash
    (the labels of keys that no committed run holds are read from rows/labels, so they are checked too)."""
    import h5py

    for name, value in (("rows/labels", 3), ("rows/state", 0)):
        path = tmp_path / f"{name.split('/')[1]}.h5"
        store = gradstore.create(path, 100, 10, 0.5, codec="fp32", labels=np.arange(10))
        store.accumulate([1, 4], np.ones((2, 50), np.float32), labels=[7, 8])
        store.commit()
        store.close()
        with h5py.File(path, "r+") as f:
            f[name][...] = value
        with pytest.raises(gradstore.FormatError, match=name.split("/")[1]):
            gradstore.open(path)


# ---------------------------------------------------------------------------- scratch buffer, transcode


def test_buffer_in_a_scratch_file_records_the_same_store(tmp_path):
    """A write buffer memory-mapped in buffer_dir sums exactly as one in RAM, and leaves no scratch file."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    rng = np.random.default_rng(3)
    stores = {}
    for name, buffer_dir in (("ram", None), ("file", scratch)):
        store = gradstore.create(tmp_path / f"{name}.h5", 3000, 120, 0.2, codec="fp32", seed=4,
                                 memory_budget=120 * 600 * 4, buffer_dir=buffer_dir)
        stores[name] = store
    for _ in range(3):
        for keys in np.array_split(rng.permutation(120), 7):
            rows = gradient_rows(rng, keys.size, 600)
            for store in stores.values():
                store.accumulate(keys, rows)
    assert stores["file"].info()["staging_runs"] == 0  # the whole recording fitted the buffer
    stores = {name: store.finalize() for name, store in stores.items()}
    keys = np.arange(120)
    np.testing.assert_array_equal(stores["ram"].read(keys), stores["file"].read(keys))
    assert list(scratch.iterdir()) == []  # unlinked at creation, closed at finalize


def test_buffer_dir_that_is_not_a_folder_creates_nothing(tmp_path):
    with pytest.raises(BadInputError, match="buffer_dir"):
        gradstore.create(tmp_path / "s.h5", 100, 10, 0.5, buffer_dir=tmp_path / "missing")
    assert not (tmp_path / "s.h5").exists()


@pytest.mark.parametrize("codec", ["fp16", "int8", {"id": "int8", "rounding": "stochastic", "block_size": 64}])
def test_transcode_from_fp32_equals_recording_in_the_codec(tmp_path, codec):
    """Quantization happens once, from the float32 sums: recording in fp32 then transcoding gives the same bytes."""
    direct, _, _, _ = record(tmp_path / "direct.h5", codec, epochs=3)
    source, _, _, _ = record(tmp_path / "fp32.h5", "fp32", epochs=3)
    source.mark_forgotten([5, 6])
    source.close()
    direct.close()
    info = gradstore.transcode(tmp_path / "fp32.h5", tmp_path / "derived.h5", codec)
    assert info["codec"] == gradstore.get_codec(codec).get_config()
    assert info["transcoded_from"]["id"] == "fp32"
    with h5py.File(tmp_path / "direct.h5") as a, h5py.File(tmp_path / "derived.h5") as b:
        for part in a["rows"]:
            if part != "state":
                np.testing.assert_array_equal(a["rows"][part][()], b["rows"][part][()], err_msg=part)
    with gradstore.open(tmp_path / "derived.h5") as derived:
        assert derived.state[[5, 6]].tolist() == [RowState.FORGOTTEN] * 2
        assert derived.verify() == []


def test_transcode_refuses_an_unfinished_source_and_an_existing_destination(tmp_path):
    store = gradstore.create(tmp_path / "open.h5", 100, 10, 0.5, codec="fp32")
    store.accumulate([1], np.ones((1, 50)))
    store.commit()
    store.close()
    with pytest.raises(BadInputError, match="before finalize"):
        gradstore.transcode(tmp_path / "open.h5", tmp_path / "out.h5", "int8")
    assert not (tmp_path / "out.h5").exists() and sorted(tmp_path.glob("*.tmp")) == []
    (tmp_path / "taken.h5").write_bytes(b"keep me")
    with pytest.raises(FileExistsError):
        gradstore.transcode(tmp_path / "open.h5", tmp_path / "taken.h5", "int8")
    assert (tmp_path / "taken.h5").read_bytes() == b"keep me"
