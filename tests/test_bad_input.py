"""Every refusal is a clear error (its message names the problem) and leaves the files as they were."""

import shutil

import h5py
import numpy as np
import pytest

import gradstore
from gradstore import BadInputError, FormatError, ReadOnlyError, RowState

from conftest import gradient_rows, sha256

NUM_KEYS, NUM_PARAMS, KEEP = 50, 2000, 0.1
K = 200


@pytest.fixture
def recording(tmp_path):
    """A store being recorded: keys 0..9 accumulated and committed. Yields (store, path, rows)."""
    path = tmp_path / "rec.h5"
    store = gradstore.create(path, num_params=NUM_PARAMS, num_keys=NUM_KEYS, keep=KEEP, codec="fp32", seed=1)
    assert store.k == K
    rows = gradient_rows(np.random.default_rng(0), 10, K)
    store.accumulate(np.arange(10), rows)
    store.commit()
    yield store, path, rows
    store.close()


def refused_without_change(store, path, error, match, call):
    """``call()`` raises ``error`` matching ``match``; after a commit, the file's bytes are unchanged."""
    before = sha256(path)
    with pytest.raises(error, match=match) as info:
        call()
    store.commit()  # writes out anything the refused call would have left in memory
    assert sha256(path) == before, "a refused call changed the store"
    return info.value


def finish_and_check_only_good_rows(store, rows):
    store = store.finalize()
    assert np.array_equal(store.read(np.arange(10)), rows)
    assert np.all(store.state[10:] == RowState.EMPTY)


# ---------------------------------------------------------------------------- not a (readable) store


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_not_hdf5(tmp_path, mode):
    path = tmp_path / "notes.h5"
    path.write_text("these are not gradients\n" * 100)
    before = sha256(path)
    with pytest.raises(FormatError, match="not an HDF5 file"):
        gradstore.open(path, mode)
    assert sha256(path) == before


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_hdf5_but_not_a_store(tmp_path, mode):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["rows/values"] = np.zeros((3, 4), np.float32)
        f.attrs["something"] = 1
    before = sha256(path)
    with pytest.raises(FormatError, match="not a gradstore store"):
        gradstore.open(path, mode)
    assert sha256(path) == before


@pytest.mark.parametrize("mode", ["r", "r+"])
def test_newer_format_version(small_store, tmp_path, mode):
    path, _ = small_store
    newer = tmp_path / "newer.h5"
    shutil.copy(path, newer)
    with h5py.File(newer, "r+") as f:
        f.attrs["gradstore_format_version"] = 99
    before = sha256(newer)
    with pytest.raises(FormatError, match=r"version 99") as info:
        gradstore.open(newer, mode)
    assert str(gradstore.FORMAT_VERSION) in str(info.value)
    assert sha256(newer) == before


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        gradstore.open(tmp_path / "absent.h5")
    assert not (tmp_path / "absent.h5").exists()


# ---------------------------------------------------------------------------- accumulate


@pytest.mark.parametrize(
    "values,match",
    [
        (np.zeros((3, K + 1), np.float32), "shape"),  # wrong length
        (np.zeros((3, K - 1), np.float32), "shape"),
        (np.zeros(3 * K, np.float32), "shape"),  # wrong ndim
        (np.zeros((3, K, 1), np.float32), "shape"),
        (np.zeros((4, K), np.float32), "shape"),  # one row too many for the keys
        (np.zeros((3, K), np.int32), "floating point"),  # integer dtype
        (np.zeros((3, K), np.bool_), "floating point"),
    ],
    ids=["long", "short", "1d", "3d", "rows", "int32", "bool"],
)
def test_bad_rows(recording, values, match):
    store, path, rows = recording
    refused_without_change(store, path, BadInputError, match, lambda: store.accumulate([20, 21, 22], values))
    finish_and_check_only_good_rows(store, rows)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_name_the_keys(recording, bad):
    store, path, rows = recording
    values = gradient_rows(np.random.default_rng(1), 4, K)
    values[1, 17] = bad
    values[3, 0] = bad
    keys = [13, 31, 22, 47]
    error = refused_without_change(store, path, BadInputError, "NaN or Inf", lambda: store.accumulate(keys, values))
    assert "[31, 47]" in str(error)
    assert "13" not in str(error) and "22" not in str(error)
    # a row already buffered is not touched by a refused batch on the same key
    values2 = gradient_rows(np.random.default_rng(2), 2, K)
    values2[0, 5] = np.nan
    refused_without_change(store, path, BadInputError, r"\[4\]", lambda: store.accumulate([4, 5], values2))
    finish_and_check_only_good_rows(store, rows)


@pytest.mark.parametrize(
    "keys,match",
    [
        ([20, 21, NUM_KEYS], rf"out of range \[0, {NUM_KEYS}\).*{NUM_KEYS}"),
        ([20, 21, 10**12], "out of range"),
        ([20, -1, 21], r"out of range.*-1"),
        ([20, 21, 21], r"repeated: \[21\]"),
        ([[20, 21, 22]], "1-D"),
        ([20.5, 21, 22], "integers"),
    ],
    ids=["num_keys", "huge", "negative", "repeated", "2d", "fraction"],
)
def test_bad_keys(recording, keys, match):
    store, path, rows = recording
    values = gradient_rows(np.random.default_rng(3), 3, K)
    refused_without_change(store, path, BadInputError, match, lambda: store.accumulate(keys, values))
    finish_and_check_only_good_rows(store, rows)


def test_bad_labels(recording):
    store, path, rows = recording
    values = gradient_rows(np.random.default_rng(3), 3, K)
    refused_without_change(store, path, BadInputError, "labels", lambda: store.accumulate([20, 21, 22], values, labels=[1.5, 2, 3]))
    refused_without_change(store, path, BadInputError, "labels", lambda: store.accumulate([20, 21, 22], values, labels=[1, 2]))
    finish_and_check_only_good_rows(store, rows)
    assert np.all(store.labels == -1)


def test_accumulate_after_finalize(recording):
    store, path, rows = recording
    finished = store.finalize()
    more = gradient_rows(np.random.default_rng(4), 1, K)
    with pytest.raises(ReadOnlyError, match="finalize"):
        store.accumulate([20], more)
    with pytest.raises(ReadOnlyError, match="finalize"):
        store.finalize()
    with pytest.raises(ReadOnlyError, match="finalize"):
        store.commit()
    assert not hasattr(finished, "accumulate")  # the finished store has no recording methods at all
    finished.close()
    # (HDF5 marks a file open for writing in its superblock: compare bytes of the closed file)
    before = sha256(path)
    with gradstore.open(path, "r+") as again:
        assert again.finished and not hasattr(again, "accumulate")  # a finished file opens as a Store
        assert np.array_equal(again.read(np.arange(10)), rows)
        assert again.state[20] == RowState.EMPTY
    assert sha256(path) == before


def test_accumulate_on_read_only_recording(recording):
    store, path, _ = recording
    store.close()
    before = sha256(path)
    with gradstore.open(path, "r") as reader:
        assert not reader.finished
        with pytest.raises(ReadOnlyError, match="read-only"):
            reader.accumulate([20], gradient_rows(np.random.default_rng(4), 1, K))
    assert sha256(path) == before


def test_read_before_finalize(recording):
    """A recording has no reading or forgetting methods: those belong to the Store that finalize() returns."""
    store, path, _ = recording
    for method in ("read", "scatter_add", "mark_forgotten", "purge", "blocks"):
        assert not hasattr(store, method), method
    store.close()
    with gradstore.open(path, "r+") as reopened:
        assert isinstance(reopened, gradstore.Recording) and not hasattr(reopened, "read")


# ---------------------------------------------------------------------------- finished store


def test_mark_forgotten_and_purge_on_read_only(small_store):
    path, _ = small_store
    before = sha256(path)
    with gradstore.open(path, "r") as store:
        with pytest.raises(ReadOnlyError, match="r\\+"):
            store.mark_forgotten([1, 2])
        with pytest.raises(ReadOnlyError):
            store.purge()
        assert store.state[1] == RowState.LIVE
    assert sha256(path) == before


def test_bad_open_mode(small_store):
    path, _ = small_store
    before = sha256(path)
    with pytest.raises(BadInputError, match="mode"):
        gradstore.open(path, "w")
    assert sha256(path) == before


@pytest.mark.parametrize(
    "make_flat,match",
    [
        (lambda m: np.zeros(m, np.float64), "float32"),
        (lambda m: np.zeros(m - 1, np.float32), "shape"),
        (lambda m: np.zeros(m + 1, np.float32), "shape"),
        (lambda m: np.zeros((m, 1), np.float32), "shape"),
        (lambda m: np.zeros(2 * m, np.float32)[::2], "C-contiguous"),
        (lambda m: [0.0] * m, "float32"),
    ],
    ids=["float64", "short", "long", "2d", "strided", "list"],
)
def test_scatter_add_bad_vector(small_store, make_flat, match):
    path, _ = small_store
    before = sha256(path)
    with gradstore.open(path, "r") as store:
        flat = make_flat(store.num_params)
        snapshot = np.array(flat, copy=True)
        with pytest.raises(BadInputError, match=match):
            store.scatter_add(flat, [0, 1, 2])
        assert np.array_equal(np.asarray(flat), snapshot)
    assert sha256(path) == before


def test_scatter_add_bad_alpha_and_keys(small_store):
    path, _ = small_store
    with gradstore.open(path, "r") as store:
        flat = np.zeros(store.num_params, np.float32)
        for alpha in (float("nan"), float("inf"), 1e40, "x", None, [1.0]):  # strings used to raise a raw TypeError
            with pytest.raises(BadInputError, match="alpha"):
                store.scatter_add(flat, [0], alpha=alpha)
        with pytest.raises(BadInputError, match="out of range"):
            store.scatter_add(flat, [0, 300])
        with pytest.raises(BadInputError, match="repeated"):
            store.scatter_add(flat, [4, 4])
        assert not flat.any()


# ---------------------------------------------------------------------------- create


def test_create_on_existing_path(small_store, tmp_path):
    path, _ = small_store
    before = sha256(path)
    with pytest.raises(FileExistsError, match="overwrite"):
        gradstore.create(path, num_params=NUM_PARAMS, num_keys=NUM_KEYS, keep=KEEP)
    assert sha256(path) == before
    other = tmp_path / "notes.txt"
    other.write_text("keep me\n")
    with pytest.raises(FileExistsError):
        gradstore.create(other, num_params=NUM_PARAMS, num_keys=NUM_KEYS, keep=KEEP)
    assert other.read_text() == "keep me\n"
    with gradstore.open(path) as store:
        assert store.finished and store.info()["rows_live"] == 300


@pytest.mark.parametrize("keep", [0, 0.0, -0.1, 1.0001, 2, float("nan")])
def test_bad_keep(tmp_path, keep):
    path = tmp_path / "s.h5"
    with pytest.raises(BadInputError, match="keep"):
        gradstore.create(path, num_params=NUM_PARAMS, num_keys=NUM_KEYS, keep=keep)
    assert not path.exists()


def test_keep_that_keeps_nothing(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(BadInputError, match="keeps no value"):
        gradstore.create(path, num_params=100, num_keys=5, keep=0.001)
    assert not path.exists()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(num_params=0), "num_params"),
        (dict(num_keys=0), "num_keys"),
        (dict(num_keys=2.5), "num_keys"),
        (dict(seed=-1), "seed"),
        (dict(labels=np.zeros(3, np.int64)), "labels"),
        (dict(labels=np.full(NUM_KEYS, -5)), "labels must be class labels"),  # -1 is unknown; -5 is nothing
        (dict(labels=np.full(NUM_KEYS, 2**40)), "labels must be class labels"),
        (dict(key_kind="epoch"), "key_kind"),
        (dict(keep="0.5"), "keep must be a number"),  # used to raise a raw TypeError
        (dict(keep=None), "keep must be a number"),
        (dict(num_params=float("nan")), "num_params must be an integer"),  # used not to name the parameter
        (dict(num_keys="30"), "num_keys must be an integer"),
        (dict(seed=float("inf")), "seed must be an integer"),
        (dict(zstd_level=99), "zstd_level must be in"),  # used to be accepted
        (dict(zstd_level=0), "zstd_level must be in"),
        (dict(memory_budget=-1), "memory_budget"),
    ],
)
def test_bad_create_arguments(tmp_path, kwargs, match):
    path = tmp_path / "s.h5"
    arguments = dict(num_params=NUM_PARAMS, num_keys=NUM_KEYS, keep=KEEP)
    arguments.update(kwargs)
    with pytest.raises(BadInputError, match=match):
        gradstore.create(path, **arguments)
    assert not path.exists()


def test_num_params_beyond_the_mask_limit(tmp_path):
    """docs/FORMAT.md: M must be below 2**32 (the mask kernel's 32-bit halves). A store that
    could never regenerate its positions must be refused at create, not after recording."""
    path = tmp_path / "s.h5"
    with pytest.raises(BadInputError, match="num_params"):
        gradstore.create(path, num_params=2**32, num_keys=2, keep=1e-9)
    assert not path.exists()


def test_bad_codec_on_create(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(FormatError, match="unknown codec"):
        gradstore.create(path, num_params=NUM_PARAMS, num_keys=NUM_KEYS, keep=KEEP, codec="bf16")
    assert not path.exists()


# ---------------------------------------------------------------------------- the operating system says no

CHILD_PRELUDE = """
import os, resource, signal, sys
import numpy as np
import gradstore
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of killing
def limit_file_size(extra):
    size = os.path.getsize(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + extra, resource.RLIM_INFINITY))
"""


def run_child(script, *args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", CHILD_PRELUDE + script, *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def committed_store(tmp_path):
    """A recording store with every key accumulated once and committed (note step 1): (path, rows)."""
    path = tmp_path / "s.h5"
    store = gradstore.create(path, NUM_PARAMS, NUM_KEYS, 0.5, codec="fp32", seed=1)
    rows = gradient_rows(np.random.default_rng(0), NUM_KEYS, store.k)
    store.accumulate(np.arange(NUM_KEYS), rows)
    store.commit(note={"step": 1})
    store.close()
    return path, rows


def test_disk_full_during_finalize_leaves_the_store_as_it_was(tmp_path):
    path, rows = committed_store(tmp_path)
    before = sha256(path)
    result = run_child("""
store = gradstore.open(sys.argv[1], "r+")
resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))  # the new file cannot grow past 20 kB
try:
    store = store.finalize()
except gradstore.WriteFailedError as error:
    print("refused:", error)
store.close()
""", path)
    assert "refused:" in result.stdout and "unchanged" in result.stdout, result.stdout + result.stderr
    assert sha256(path) == before
    assert sorted(tmp_path.glob("*.tmp")) == []  # no temporary file left behind
    with gradstore.open(path, "r+") as store:  # and it finalizes once there is room
        store = store.finalize()
        assert np.array_equal(store.read(np.arange(NUM_KEYS)), rows)


def test_disk_full_during_a_commit_reopens_at_the_last_commit(tmp_path):
    path, rows = committed_store(tmp_path)
    result = run_child("""
store = gradstore.open(sys.argv[1], "r+")
limit_file_size(2_000)
store.accumulate(np.arange(50), np.ones((50, store.k), np.float32))
try:
    store.commit(note={"step": 2})
except gradstore.WriteFailedError as error:
    print("refused:", error, "| errno", error.errno)
os._exit(0)
""", path)
    assert "refused:" in result.stdout and "last commit" in result.stdout, result.stdout + result.stderr
    assert len(result.stdout.splitlines()) == 1, result.stdout  # one line, the OS's reason first, errno kept
    assert result.stdout.startswith("refused: File too large: writing ") and result.stdout.strip().endswith("errno 27")
    assert "nothing committed was changed" in result.stdout and "time =" not in result.stdout
    with gradstore.open(path, "r+") as store:
        assert store.commit_note == {"step": 1}
        assert store.verify() == []
        store = store.finalize()
        assert np.array_equal(store.read(np.arange(NUM_KEYS)), rows)


def test_a_second_writer_is_refused_while_the_first_holds_the_store(tmp_path, small_store):
    import os
    import subprocess
    import sys

    path = str(small_store[0])
    before = sha256(path)
    env = {key: value for key, value in os.environ.items() if key != "HDF5_USE_FILE_LOCKING"}
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, gradstore; s = gradstore.open(sys.argv[1], 'r+'); print('open', flush=True); "
         "sys.stdin.read()", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "open"
        for mode in ("r+", "r"):
            with pytest.raises(gradstore.StoreLockedError, match="another process"):
                gradstore.open(path, mode)
    finally:
        holder.communicate("", timeout=60)
    assert sha256(path) == before
    gradstore.open(path, "r+").close()  # free again once the holder has gone


def test_a_read_only_file_opens_for_reading_only(small_store):
    import os

    path = small_store[0]
    os.chmod(path, 0o444)
    before = sha256(path)
    try:
        with pytest.raises(ReadOnlyError, match="read-only file"):
            gradstore.open(path, "r+")
        with gradstore.open(path) as store:
            assert store.read([0]).shape == (1, store.k)
    finally:
        os.chmod(path, 0o644)
    assert sha256(path) == before


def test_accumulate_refuses_labels_that_are_no_class(recording):
    store, path, _ = recording
    for labels in (np.full(2, -5), np.full(2, 2**40)):
        refused_without_change(store, path, BadInputError, "labels must be class labels",
                               lambda: store.accumulate([20, 21], np.ones((2, K), np.float32), labels=labels))


def test_transcode_refuses_a_zstd_level_out_of_range(small_store, tmp_path):
    with pytest.raises(BadInputError, match="zstd_level"):
        gradstore.transcode(small_store[0], tmp_path / "t.h5", "fp16", zstd_level=99)
    assert not (tmp_path / "t.h5").exists()


# ---------------------------------------------------------------------------- damaged files: the right error (issue 21)


def open_file_ids():
    return h5py.h5f.get_obj_count(h5py.h5f.OBJ_ALL, h5py.h5f.OBJ_FILE)


@pytest.mark.parametrize("keep_bytes", [0.5, 0.9, 0.99])
def test_a_truncated_store_is_damaged_not_locked(small_store, keep_bytes):
    """HDF5 says "truncated file: ... sblock->base_addr": "sblock" holds "lock", once read as a file lock."""
    path, _ = small_store
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_bytes)])
    for mode in ("r", "r+"):
        with pytest.raises(FormatError) as info:
            gradstore.open(path, mode)
        assert not isinstance(info.value, gradstore.StoreLockedError) and "another process" not in str(info.value)


def test_the_file_a_truncating_writer_left_is_a_format_error_and_no_handle_leaks(tmp_path):
    """What the old create(overwrite=True) left: h5py mode "w" truncated a live recording, whose writer went on."""
    import subprocess
    import sys

    path = tmp_path / "x.h5"
    store = gradstore.create(path, NUM_PARAMS, NUM_KEYS, KEEP, codec="fp32")
    store.accumulate(np.arange(5), np.ones((5, K), np.float32))
    store.commit()
    truncate = "import sys, h5py\ntry:\n    h5py.File(sys.argv[1], 'w')\nexcept OSError:\n    pass"
    subprocess.run([sys.executable, "-c", truncate, str(path)], check=True, timeout=60)
    with __import__("contextlib").suppress(Exception):
        store.accumulate(np.arange(5, 10), np.ones((5, K), np.float32))
        store.commit()
    with __import__("contextlib").suppress(Exception):
        store.close()
    before = open_file_ids()
    for mode in ("r", "r+"):
        with pytest.raises(FormatError):  # was a bare KeyError
            gradstore.open(path, mode)
    assert open_file_ids() == before  # and the HDF5 file is closed again


# ---------------------------------------------------------------------------- the operating system's reason, in one line


UNSHARE = __import__("shutil").which("unshare")


@pytest.mark.skipif(UNSHARE is None, reason="needs util-linux unshare to mount a small tmpfs")
def test_a_full_disk_says_no_space_left_and_that_nothing_changed(tmp_path):
    """A real ENOSPC: the store's folder is a 1 MiB tmpfs in a private mount namespace."""
    import subprocess
    import sys
    import textwrap

    script = textwrap.dedent("""
        import os, sys
        import numpy as np
        import gradstore
        from gradstore.cli import main
        folder = sys.argv[1]
        store = gradstore.create(os.path.join(folder, "s.h5"), 20000, 400, 0.5, codec="fp32")
        store.accumulate(np.arange(10), np.ones((10, store.k), np.float32))
        store.commit(note="kept")
        try:
            for step in range(100):
                store.accumulate(np.arange(400), np.random.default_rng(step).random((400, store.k), np.float32))
                store.commit(note=step)
        except gradstore.WriteFailedError as error:
            print("ERROR", str(error))
        with open(os.path.join(folder, "s.h5"), "rb") as f:
            pass
        recording = gradstore.open(os.path.join(folder, "s.h5"))
        print("REOPENED", recording.commit_note)
    """)
    mount = tmp_path / "small"
    mount.mkdir()
    try:
        result = subprocess.run([UNSHARE, "-m", "sh", "-c", 'mount -t tmpfs -o size=1m tmpfs "$1" && '
                                 '"$2" -c "$3" "$1"', "sh", str(mount), sys.executable, script],
                                capture_output=True, text=True, timeout=120)
    except OSError as error:
        pytest.skip(f"cannot run unshare here: {error}")
    if "mount:" in result.stderr or "unshare:" in result.stderr:
        pytest.skip(f"no private tmpfs here: {result.stderr.strip()}")
    error_line = next(line for line in result.stdout.splitlines() if line.startswith("ERROR"))
    assert error_line.startswith("ERROR No space left on device: writing ") and "nothing committed was changed" in error_line
    assert "REOPENED" in result.stdout


def test_a_full_disk_while_marking_rows_forgotten_leaves_the_store_as_it_was(small_store):
    """mark_forgotten used to rewrite rows/state in place and flush: on a full disk that left a file HDF5 could
    not open ("truncated file") and a segfault at exit."""
    path, _ = small_store
    before = sha256(path)
    result = run_child("""
store = gradstore.open(sys.argv[1], "r+")
limit_file_size(0)
try:
    store.mark_forgotten([0, 1, 2])
except gradstore.WriteFailedError as error:
    print("refused:", error)
""", path)
    assert result.returncode == 0, result.stderr
    assert "refused: File too large: writing" in result.stdout and "nothing was changed" in result.stdout, result.stdout
    assert sha256(path) == before
    with gradstore.open(path, "r+") as store:  # and it marks once there is room
        store.mark_forgotten([0, 1, 2])
    with gradstore.open(path) as store:
        assert store.state[:4].tolist() == [RowState.FORGOTTEN] * 3 + [RowState.LIVE]


def test_a_multi_line_hdf5_error_keeps_its_reason_on_the_cli_line(capsys):
    from gradstore.cli import report_failure

    error = RuntimeError("Can't decrement id ref count (file write failed: time = Mon Dec  7 2026\n, filename = "
                         "'x.h5', errno = 28, error message = 'No space left on device', buf = 0x1)")
    assert report_failure("gradstore", "verify", error) == 2
    line = capsys.readouterr().err
    assert line.count("\n") == 1 and line.startswith("gradstore verify: error: No space left on device: Can't")

