"""A store recorded by several writers, finished as key-range shards behind one entry point (gradstore.shards)."""

import os
import shutil

import h5py
import hdf5plugin  # noqa: F401 - registers zstd for the plain-h5py read
import numpy as np
import pytest

import gradstore
from gradstore import RowState, shards
from gradstore.joined import PENDING_FORGET

M, N, KEEP, SEED = 8000, 260, 0.1, 3  # k = 800: 20 fp32 rows a chunk, 13 chunks to share
UNSEEN = 20  # the last keys are never recorded


def record(directory, ranks, codec="fp32", run_id="run-a", epochs=3):
    """One single-file store and one sharded store of ``ranks`` writers, fed the same batches.

    Each global batch is split between the writers (in a different order every epoch, so
    a key reaches several writers), as torch.distributed ranks would see it.
    """
    rng = np.random.default_rng(0)
    labels = np.arange(N) % 7
    single = gradstore.create(directory / "single.h5", M, N, KEEP, codec=codec, seed=SEED, labels=labels)
    path = directory / "store.h5"
    os.makedirs(shards.shard_dir(path), exist_ok=True)
    writers = [gradstore.create(shards.recording_path(path, rank, ranks), M, N, KEEP, codec=codec, seed=SEED,
                                labels=labels, writer={"run_id": run_id, "rank": rank, "ranks": ranks})
               for rank in range(ranks)]
    for _ in range(epochs):
        order = rng.permutation(N - UNSEEN)
        for start in range(0, order.size, 24):
            keys = np.sort(order[start : start + 24])
            values = rng.standard_normal((keys.size, single.k)).astype(np.float32)
            single.accumulate(keys, values)
            for rank, share in enumerate(np.array_split(np.arange(keys.size), ranks)):
                writers[rank].accumulate(keys[share], values[share])
    for writer in writers:
        writer.commit(note={"step": 1})
        writer.close()
    single.finalize().close()
    return path


def finish(path, ranks):
    for index in range(ranks):
        shards.finalize_shard(path, index, ranks)
    shards.write_manifest(path, ranks)
    shards.remove_recordings(path, ranks)


@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_joined_store_equals_one_writers_store(tmp_path, ranks):
    path = record(tmp_path, ranks)
    finish(path, ranks)
    keys = np.arange(N - UNSEEN)
    with gradstore.open(path) as joined, gradstore.open(tmp_path / "single.h5") as single:
        assert joined.info()["shards"] == ranks
        sizes = [hi - lo for lo, hi in (shard.key_range for shard in joined.shards)]
        assert sum(sizes) == N and max(sizes) - min(sizes) <= joined.rows_per_chunk  # each merges its share
        assert joined.info()["rows_live"] == single.info()["rows_live"] == N - UNSEEN
        assert np.array_equal(joined.state, single.state) and np.array_equal(joined.labels, single.labels)
        expected = single.read(keys)
        # the same float32 sums, added in another order: equal to float rounding
        np.testing.assert_allclose(joined.read(keys), expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
        flat_joined, flat_single = np.zeros(M, np.float32), np.zeros(M, np.float32)
        joined.scatter_add(flat_joined, keys, -1.0)
        single.scatter_add(flat_single, keys, -1.0)
        np.testing.assert_allclose(flat_joined, flat_single, rtol=1e-5, atol=1e-5)
        assert np.array_equal(joined.positions(5), single.positions(5))
        assert np.array_equal(joined.keys_with_label(3), single.keys_with_label(3))
        assert joined.verify() == []
    assert not any(name.startswith("recording-") for name in os.listdir(shards.shard_dir(path)))


def test_plain_h5py_reads_the_joined_rows(tmp_path, monkeypatch):
    """FORMAT.md's recipe: the entry point's rows/<part> are virtual datasets over the shards."""
    path = record(tmp_path, 2, codec="int8")
    finish(path, 2)
    with gradstore.open(path) as joined:
        expected = joined.read([3, N - UNSEEN - 1])
    monkeypatch.chdir(tmp_path.parent)  # the shards are found beside the entry point, not from the working directory
    with h5py.File(path, "r") as f:
        scales, values = f["rows/scales"][[3, N - UNSEEN - 1]], f["rows/values"][[3, N - UNSEEN - 1]]
        assert f["rows/state"][N - 1] == RowState.EMPTY and f["rows/state"][0] == RowState.LIVE
        assert f["rows/labels"][5] == 5
    block = gradstore.get_codec(gradstore.open(path).config["codec"]).get_config()["block_size"]
    decoded = values.astype(np.float32) * np.repeat(scales, block, axis=1)[:, : values.shape[1]]
    np.testing.assert_allclose(decoded, expected, rtol=1e-6)


def test_missing_or_foreign_shard_is_refused_before_reading(tmp_path):
    path = record(tmp_path, 2)
    finish(path, 2)
    second = shards.shard_path(path, 1, 2)
    other = tmp_path / "other"
    other.mkdir()
    finish(record(other, 2, run_id="run-b"), 2)
    before = open(path, "rb").read()
    shutil.move(second, second + ".away")
    with pytest.raises(gradstore.FormatError, match="shard 1 .* is missing"):
        gradstore.open(path)
    shutil.copy(shards.shard_path(other / "store.h5", 1, 2), second)  # another run's shard in its place
    with pytest.raises(gradstore.FormatError, match="not its shard 1"):
        gradstore.open(path, "r+")
    assert open(path, "rb").read() == before


def test_a_forget_interrupted_between_shards_finishes_on_reopen(tmp_path):
    path = record(tmp_path, 2)
    finish(path, 2)
    with gradstore.open(path) as joined:
        low, high = joined.shards[0].key_range, joined.shards[1].key_range
    doomed = np.array([low[0] + 1, low[0] + 2, high[0] + 1])
    with gradstore.open(path, "r+") as joined:  # as mark_forgotten would be left by a crash after the first shard
        joined._h5.create_dataset(PENDING_FORGET, data=doomed)
        joined.shards[0].mark_forgotten(doomed[:2])
    with gradstore.open(path) as joined:  # read-only: the noted keys already count as forgotten
        assert (joined.state[doomed] == RowState.FORGOTTEN).all()
        with pytest.raises(gradstore.BadInputError, match="forgotten"):
            joined.scatter_add(np.zeros(M, np.float32), doomed[2:])
    with gradstore.open(path, "r+") as joined:  # a writer finishes it
        assert PENDING_FORGET not in joined._h5
    with gradstore.open(path) as joined:
        assert joined.shards[1].state[doomed[2]] == RowState.FORGOTTEN
        assert joined.info()["rows_forgotten"] == 3


def test_forget_purge_and_transcode_through_the_entry_point(tmp_path):
    path = record(tmp_path, 2)
    finish(path, 2)
    with gradstore.open(path, "r+") as joined:
        joined.mark_forgotten([0, 1, N - UNSEEN - 1])
        with pytest.raises(gradstore.BadInputError, match="forgotten"):
            joined.mark_forgotten([1])
        assert joined.purge() == 3
        assert joined.verify() == []
    with gradstore.open(path) as joined:
        assert joined.info()["rows_purged"] == 3
        expected = joined.read(np.arange(2, N - UNSEEN - 1))
    gradstore.transcode(path, tmp_path / "fp16.h5", "fp16")
    with gradstore.open(tmp_path / "fp16.h5") as single:
        assert single.info()["rows_purged"] == 3
        np.testing.assert_allclose(single.read(np.arange(2, N - UNSEEN - 1)), expected, rtol=2e-3, atol=1e-3)


def test_a_writers_recording_is_not_finalized_alone_and_runs_do_not_mix(tmp_path):
    path = record(tmp_path, 2)
    with gradstore.open(shards.recording_path(path, 0, 2), "r+") as recording:
        with pytest.raises(gradstore.BadInputError, match="finalize_shard"):
            recording.finalize()
    other = tmp_path / "other"
    other.mkdir()
    record(other, 2, run_id="run-b")
    shutil.copy(shards.recording_path(other / "store.h5", 1, 2), shards.recording_path(path, 1, 2))
    with pytest.raises(gradstore.FormatError, match="another run"):
        shards.finalize_shard(path, 0, 2)
    os.remove(shards.recording_path(path, 1, 2))
    with pytest.raises(gradstore.FormatError, match="rank 1's recording is missing"):
        shards.finalize_shard(path, 0, 2)
    assert not os.path.exists(path)


def test_a_shard_refuses_keys_of_other_shards(tmp_path):
    path = record(tmp_path, 2)
    finish(path, 2)
    with gradstore.open(shards.shard_path(path, 1, 2)) as shard:
        lo, hi = shard.key_range
        assert shard.read([lo]).shape == (1, shard.k)
        with pytest.raises(gradstore.BadInputError, match="other shards"):
            shard.read([lo - 1])


def test_shard_ranges_cover_every_key_at_chunk_boundaries():
    for num_keys, rows, count in [(260, 16, 2), (1000, 7, 3), (5, 8, 3), (64, 64, 1), (100, 10, 10)]:
        ranges = shards.shard_ranges(num_keys, rows, count)
        assert len(ranges) == count and ranges[0][0] == 0 and ranges[-1][1] == num_keys
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(lo % rows == 0 for lo, _ in ranges)


def test_format_docs_shard_check_recipe_runs_as_written(tmp_path, monkeypatch):
    """docs/FORMAT.md's h5py-only check of a sharded store, executed on one (and failing on a foreign shard)."""
    text = open(os.path.join(os.path.dirname(__file__), os.pardir, "docs", "FORMAT.md")).read()
    section = text[text.index("## A sharded store"):]
    recipe = section[section.index("```python") + len("```python"): section.index("```", section.index("```python") + 3)]
    run_dir = tmp_path / "RUN"
    run_dir.mkdir()
    finish(record(run_dir, 2, codec="int8"), 2)
    monkeypatch.chdir(tmp_path)  # restored afterwards: later tests find ../shared/data from the checkout
    exec(compile(recipe, "FORMAT.md", "exec"), {})
    other = tmp_path / "other"
    other.mkdir()
    finish(record(other, 2, run_id="run-b", codec="int8"), 2)
    shutil.copy(shards.shard_path(other / "store.h5", 0, 2), shards.shard_path(run_dir / "store.h5", 0, 2))
    with pytest.raises(AssertionError):
        exec(compile(recipe, "FORMAT.md", "exec"), {})


def test_store_and_sharded_store_are_store_readers(tmp_path):
    """gradstore.StoreReader: what both finished kinds offer; a recording is not one."""
    path = record(tmp_path, 2)
    finish(path, 2)
    with gradstore.open(path) as joined, gradstore.open(tmp_path / "single.h5") as single:
        assert isinstance(joined, gradstore.StoreReader) and isinstance(single, gradstore.StoreReader)
    with gradstore.create(tmp_path / "rec.h5", M, N, KEEP) as recording:
        assert not isinstance(recording, gradstore.StoreReader)
