"""Who may open what, when: a store being written or read is never replaced or truncated by another writer.

Issue 21, defect 1: ``create(..., overwrite=True)`` used to open with h5py's mode "w", which
truncates the file before HDF5 takes its lock, so a refused second writer wiped a live
recording. Every test here runs the other writer in a real second process.
"""

import hashlib
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import gradstore

NUM_PARAMS, NUM_KEYS, KEEP = 2000, 30, 0.1

HOLDER = textwrap.dedent("""
    import sys
    import numpy as np
    import gradstore
    path = sys.argv[1]
    recording = gradstore.create(path, 2000, 30, 0.1, codec="fp32", seed=3)
    recording.accumulate(np.arange(10), np.full((10, recording.k), 1.0, np.float32))
    recording.commit(note="first")
    print("committed", flush=True)
    sys.stdin.readline()  # the other writer tries its luck here
    recording.accumulate(np.arange(10, 20), np.full((10, recording.k), 2.0, np.float32))
    recording.commit(note="second")
    recording.finalize().close()
    print("finished", flush=True)
""")


def sha256(path):
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def child_env():
    return {key: value for key, value in os.environ.items() if key != "HDF5_USE_FILE_LOCKING"}


def start_holder(path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=child_env())
    assert holder.stdout.readline().strip() == "committed", holder.stderr.read()
    return holder


def finish_holder(holder):
    out, err = holder.communicate("go\n", timeout=120)
    assert holder.returncode == 0 and "finished" in out, err
    return out


@pytest.mark.parametrize("attempt", ["create", "transcode"])
def test_a_refused_second_writer_leaves_the_live_recording_whole(tmp_path, attempt):
    path = tmp_path / "x.h5"
    holder = start_holder(path)
    try:
        before = sha256(path)
        with pytest.raises(gradstore.StoreLockedError, match="another process.*Nothing was changed"):
            if attempt == "create":
                gradstore.create(path, NUM_PARAMS, NUM_KEYS, KEEP, overwrite=True)
            else:
                source = tmp_path / "other.h5"
                other = gradstore.create(source, NUM_PARAMS, NUM_KEYS, KEEP, codec="fp32")
                other.finalize().close()
                gradstore.transcode(source, path, "int8", overwrite=True)
        assert sha256(path) == before  # not a byte changed (it used to be 0 bytes now)
        assert sorted(p.name for p in tmp_path.glob("*.tmp")) == []
    finally:
        finish_holder(holder)  # the first writer's next commit and finalize still work
    with gradstore.open(path) as store:
        rows = store.read(np.arange(20))
        assert (rows[:10] == 1.0).all() and (rows[10:] == 2.0).all() and store.seed == 3


def test_a_store_being_read_is_not_replaced(tmp_path, small_store):
    path = small_store[0]
    before = sha256(path)
    reader = subprocess.Popen([sys.executable, "-c", "import sys, gradstore; s = gradstore.open(sys.argv[1]); "
                               "print('open', flush=True); sys.stdin.read()", str(path)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
    try:
        assert reader.stdout.readline().strip() == "open"
        with pytest.raises(gradstore.StoreLockedError, match="another process"):
            gradstore.create(path, NUM_PARAMS, NUM_KEYS, KEEP, overwrite=True)
    finally:
        reader.communicate("", timeout=60)
    assert sha256(path) == before
    gradstore.create(path, NUM_PARAMS, NUM_KEYS, KEEP, overwrite=True).close()  # free once the reader has gone


RACER = textwrap.dedent("""
    import sys, time
    import gradstore
    path, seed, start, overwrite = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4] == "1"
    while time.time() < start:
        pass
    try:
        recording = gradstore.create(path, 2000, 30, 0.1, seed=seed, overwrite=overwrite)
    except (gradstore.StoreLockedError, FileExistsError) as error:
        print("refused", type(error).__name__, flush=True)
        sys.exit(0)
    print("created", flush=True)
    sys.stdin.readline()
    recording.close()
""")


@pytest.mark.parametrize("overwrite", [False, True])
def test_two_concurrent_creates_of_one_path_cannot_both_proceed(tmp_path, overwrite):
    winners = []
    for trial in range(6):
        path = tmp_path / f"race-{trial}.h5"
        if overwrite:
            gradstore.create(path, NUM_PARAMS, NUM_KEYS, KEEP, seed=99).close()
        start = time.time() + 1.5  # both processes are up and spinning by then
        racers = [subprocess.Popen([sys.executable, "-c", RACER, str(path), str(seed), str(start), str(int(overwrite))],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                   env=child_env()) for seed in (1, 2)]
        said = [racer.stdout.readline().split() for racer in racers]  # each says before the other may let go
        outputs = [racer.communicate("\n", timeout=120) for racer in racers]
        assert all(racer.returncode == 0 for racer in racers), outputs
        created = [seed for seed, words in zip((1, 2), said) if words[:1] == ["created"]]
        assert len(created) == 1, said  # one proceeds, the other is refused
        with gradstore.open(path) as store:
            assert store.seed == created[0]  # and the file is the one that proceeded, whole
        winners.append(created[0])
        assert sorted(p.name for p in tmp_path.glob("*.tmp")) == []
    assert len(winners) == 6
