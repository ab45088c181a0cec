"""Crashes: what a commit keeps, rollback, and a SIGKILLed training run that resumes to the same store."""

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gradstore
from bench import crash
from gradstore import BadInputError

NUM_KEYS, NUM_PARAMS, KEEP = 40, 3000, 0.1


def synthetic_step(step, k):
    """Rows of one step: keys and values that depend on the step alone (so sums are known)."""
    rng = np.random.default_rng(step)
    keys = np.sort(rng.choice(NUM_KEYS, 8, replace=False))
    return keys, rng.standard_normal((8, k)).astype(np.float32)


def sums_through(step, k):
    sums = np.zeros((NUM_KEYS, k), np.float64)
    for s in range(step):
        keys, rows = synthetic_step(s, k)
        sums[keys] += rows
    return sums


RECORDER = textwrap.dedent("""
    import os, sys
    import numpy as np
    import gradstore
    from test_reliability import synthetic_step, NUM_KEYS, NUM_PARAMS, KEEP
    path, steps, commit_every = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    store = gradstore.create(path, NUM_PARAMS, NUM_KEYS, KEEP, codec="fp32", memory_budget=4 * 300 * 10)
    for step in range(steps):
        keys, rows = synthetic_step(step, store.k)
        store.accumulate(keys, rows)  # the small budget spills runs between commits
        if (step + 1) % commit_every == 0:
            store.commit(note={"step": step + 1})
    os._exit(0)  # dies without closing: nothing after the last commit may count
""")


def test_a_crash_keeps_exactly_what_the_last_commit_covered(tmp_path):
    path = tmp_path / "s.h5"
    subprocess.run([sys.executable, "-c", RECORDER, str(path), "23", "5"], check=True, timeout=120,
                   cwd=str(tmp_path), env={"PYTHONPATH": str(__import__("pathlib").Path(__file__).parent)})
    with gradstore.open(path) as store:
        info = store.info()
        assert not info["finished"] and info["commit_note"] == {"step": 20} and info["committed_generation"] == 3
        assert info["uncommitted_runs_ignored"] > 0  # steps 21-23 spilled, and do not count
        assert store.verify() == []
    with gradstore.open(path, "r+") as store:  # a writer drops the uncommitted runs, then finishes
        store = store.finalize()
        expected = sums_through(20, store.k)
        live = np.nonzero(store.state)[0]
        assert live.tolist() == np.nonzero(expected.any(axis=1))[0].tolist()
        np.testing.assert_allclose(store.read(live), expected[live], rtol=1e-5, atol=1e-5)


def test_rollback_returns_to_an_earlier_commit(tmp_path):
    store = gradstore.create(tmp_path / "s.h5", NUM_PARAMS, NUM_KEYS, KEEP, codec="fp32", memory_budget=4 * 300 * 10)
    generations = {}
    for step in range(12):
        keys, rows = synthetic_step(step, store.k)
        store.accumulate(keys, rows)
        if (step + 1) % 4 == 0:
            generations[step + 1] = store.commit(note={"step": step + 1})
    with pytest.raises(BadInputError, match="cannot roll back"):
        store.rollback(generations[12] + 1)
    store.rollback(generations[4], note={"step": 4})
    assert store.commit_note == {"step": 4}
    for step in range(4, 6):  # record steps 5 and 6 again, once
        keys, rows = synthetic_step(step, store.k)
        store.accumulate(keys, rows)
    store = store.finalize()
    expected = sums_through(6, store.k)
    live = np.nonzero(store.state)[0]
    assert live.tolist() == np.nonzero(expected.any(axis=1))[0].tolist()
    np.testing.assert_allclose(store.read(live), expected[live], rtol=1e-5, atol=1e-5)


def test_a_commit_with_nothing_new_leaves_the_file_as_it_is(tmp_path):
    path = tmp_path / "s.h5"
    store = gradstore.create(path, NUM_PARAMS, NUM_KEYS, KEEP, codec="fp32")
    store.accumulate(*synthetic_step(0, store.k))
    first = store.commit(note={"step": 1})
    before = path.read_bytes()
    assert store.commit(note={"step": 1}) == first
    assert path.read_bytes() == before
    store.close()


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("crash") / "reference"
    crash.run_reference(out, checkpoint_every=7)
    return out


@pytest.mark.parametrize("delay", [0.0, 0.8])
def test_sigkilled_training_resumes_to_the_uninterrupted_store(tmp_path, reference_run, delay):
    class FixedDelay:
        def uniform(self, low, high):
            return delay

    result = crash.trial(tmp_path / "killed", reference_run, 7, FixedDelay(), max_wait=delay)
    if result["outcome"] == "finished before the kill":  # a slow machine: nothing to check
        pytest.skip("the run finished before the kill")
    assert result["verify_problems"] == 0 and result["store_finished"] is False
    assert result["checkpoint_step"] >= 7  # the first checkpoint, at least
    assert result["committed_steps"][0] >= result["checkpoint_step"]  # the store committed it before it was written
    assert result["resumed_from_step"] == result["checkpoint_step"]
    assert result["same_weights"] and result["max_row_error"] <= 1e-5, result


def test_resume_refuses_changed_options_and_a_run_that_is_not_interrupted(tmp_path, reference_run):
    command = crash.train_command(reference_run, 7, resume=True)
    finished = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert finished.returncode != 0 and "already holds a run" in finished.stderr
    out = tmp_path / "run"
    out.mkdir()
    started = json.loads((reference_run / "started.json").read_text())
    (out / "started.json").write_text(json.dumps({**started, "epochs": 3}))
    changed = subprocess.run(crash.train_command(out, 7, resume=True), capture_output=True, text=True, timeout=120)
    assert changed.returncode != 0 and "epochs" in changed.stderr


COMPACTING = textwrap.dedent("""
    import os, sys
    import numpy as np
    import gradstore
    from gradstore import staging
    store = gradstore.create(sys.argv[1], 8, 300, 1.0, codec="fp32", memory_budget=4 * 8)  # a one-row buffer
    for key in range(100):
        store.accumulate([key], np.full((1, 8), key, np.float32))
    store.commit(note={"step": 100})              # 100 runs that count
    for key in range(100, 199):
        store.accumulate([key], np.ones((1, 8), np.float32))  # runs after the commit
    store._compact_runs(staging.MAX_FANIN)        # what finalize() does first
    os._exit(0)                                   # dies before finalize writes anything else
""")


def test_a_crash_while_finalize_merges_runs_keeps_every_committed_row(tmp_path):
    path = tmp_path / "s.h5"
    subprocess.run([sys.executable, "-c", COMPACTING, str(path)], check=True, timeout=120)
    with gradstore.open(path, "r+") as store:
        assert store.commit_note == {"step": 100}
        assert np.nonzero(store.state)[0].tolist() == list(range(100))
        store = store.finalize()
        assert np.array_equal(store.read(np.arange(100))[:, 0], np.arange(100, dtype=np.float32))


def test_labels_survive_a_reopen_when_a_batch_is_bigger_than_the_buffer(tmp_path):
    path = tmp_path / "s.h5"
    store = gradstore.create(path, 100, 16, 1.0, codec="fp32", memory_budget=4 * 100 * 3)  # three rows
    store.accumulate(np.arange(8), np.ones((8, 100)), labels=np.arange(8) % 3)
    store.commit()
    store.close()
    with gradstore.open(path) as reopened:
        assert reopened.labels[:8].tolist() == (np.arange(8) % 3).tolist()


def test_damaged_run_keys_are_caught_not_moved(tmp_path):
    import h5py

    path = tmp_path / "s.h5"
    store = gradstore.create(path, 100, 16, 1.0, codec="fp32")
    store.accumulate(np.arange(5), np.ones((5, 100)))
    store.commit()
    store.close()
    with h5py.File(path, "r+") as f:
        f["staging/run_000000/keys"][4] = 9
    with pytest.raises(gradstore.FormatError, match="damaged keys or labels"):
        gradstore.open(path)


def test_rollback_to_before_any_commit_reports_no_commit(tmp_path):
    store = gradstore.create(tmp_path / "s.h5", NUM_PARAMS, NUM_KEYS, KEEP, codec="fp32")
    store.accumulate(*synthetic_step(0, store.k))
    store.commit()
    store.rollback(None)
    assert store.committed_generation is None and store.info()["rows_live"] == 0
    with pytest.raises(BadInputError, match="cannot roll back"):
        store.rollback(0)
    store.close()


@pytest.mark.parametrize("reopened", [False, True])
def test_an_exception_inside_the_with_block_rolls_back_to_the_last_commit(tmp_path, reopened):
    """sqlite3's rule: leaving the block by an exception undoes what the last commit did not cover,
    in a new recording and in one reopened to resume."""
    path = tmp_path / "s.h5"
    rows = np.arange(10 * 8, dtype=np.float32).reshape(10, 8) + 1
    with pytest.raises(RuntimeError, match="mid-step"):
        with gradstore.create(path, num_params=80, num_keys=10, keep=0.1, codec="fp32") as store:
            store.accumulate(np.arange(5), rows[:5], labels=np.ones(5, np.int64))
            store.commit(note="five")
            if reopened:
                store.close()
                store = gradstore.open(path, "r+")
            with store:
                store.accumulate(np.arange(5, 10), rows[5:], labels=np.full(5, 7))
                store.add_members(7, [1, 2])
                raise RuntimeError("mid-step")
    with gradstore.open(path, "r+") as store:
        assert store.commit_note == "five" and store.info()["rows_live"] == 5
        finished = store.finalize()
    assert np.array_equal(finished.read(np.arange(5)), rows[:5])
    assert finished.state[5:].tolist() == [0] * 5 and finished.members == {}
    assert finished.labels.tolist() == [1] * 5 + [-1] * 5  # the rolled-back batch's labels are gone too
    finished.close()


def test_an_exception_before_any_commit_leaves_nothing_recorded(tmp_path):
    path = tmp_path / "s.h5"
    with pytest.raises(KeyError):
        with gradstore.create(path, num_params=80, num_keys=10, keep=0.1, codec="fp32") as store:
            store.accumulate(np.arange(3), np.ones((3, 8), np.float32))
            raise KeyError("boom")
    with gradstore.open(path) as store:
        info = store.info()
    assert info["committed_generation"] is None and info["rows_live"] == 0 and info["staging_runs"] == 0


def test_leaving_the_block_normally_still_commits(tmp_path):
    path = tmp_path / "s.h5"
    with gradstore.create(path, num_params=80, num_keys=10, keep=0.1, codec="fp32") as store:
        store.accumulate(np.arange(3), np.ones((3, 8), np.float32))
    with gradstore.open(path) as store:
        assert store.info()["rows_live"] == 3 and store.committed_generation == 0


# ---------------------------------------------------------------------------- damaged staging runs (issue 21, defect 3)

CRASHING = textwrap.dedent("""
    import os, sys
    import numpy as np
    import gradstore
    store = gradstore.create(sys.argv[1], 200, 12, 0.5, codec="fp32", memory_budget=4 * 100 * 4)  # four rows a run
    for epoch in range(3):
        store.accumulate(np.arange(4 * epoch, 4 * epoch + 4), np.full((4, store.k), epoch + 1.0, np.float32))
        store.commit(note={"epoch": epoch})
    store.accumulate(np.arange(4), np.ones((4, store.k), np.float32))
    store.accumulate(np.arange(4, 8), np.ones((4, store.k), np.float32))  # spills the first four: uncommitted
    os._exit(0)
""")


def crashed_recording(path):
    """A recording as a crash leaves it: three committed runs and one spilled after the last commit."""
    subprocess.run([sys.executable, "-c", CRASHING, str(path)], check=True, timeout=120)
    return path


def damage_run(path, name, how):
    import h5py

    with h5py.File(path, "r+") as f:
        group = f["staging"][name]
        if how == "uncommitted":
            group.attrs["committed"] = False
        elif how == "generation":
            group.attrs["generation"] = 7
        elif how == "no attributes":  # what a damaged attribute header reads as
            for attribute in list(group.attrs):
                del group.attrs[attribute]
        elif how == "byte order":
            values = group["values"][()]
            del group["values"]
            group.create_dataset("values", data=values.astype(">f4"), chunks=True)
        elif how == "missing":
            del f["staging"][name]


@pytest.mark.parametrize("how", ["uncommitted", "generation", "no attributes", "byte order", "missing"])
def test_a_damaged_committed_run_is_an_error_naming_it_never_dropped(tmp_path, how):
    import hashlib

    path = crashed_recording(tmp_path / "s.h5")
    with gradstore.open(path) as store:
        assert store.info()["staging_runs"] == 3 and store.verify() == []
    damage_run(path, "run_000001", how)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    for mode in ("r", "r+"):  # reading, verify, and a writer that would drop stale runs: all refuse
        with pytest.raises(gradstore.FormatError, match="run_000001 of the last commit"):
            gradstore.open(path, mode)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before  # nothing deleted as stale
    result = subprocess.run([sys.executable, "-m", "gradstore", "verify", str(path)], capture_output=True, text=True)
    assert result.returncode != 0 and "run_000001" in result.stderr


def test_an_uncommitted_run_is_still_dropped_and_the_committed_ones_finalize(tmp_path):
    path = crashed_recording(tmp_path / "s.h5")
    with gradstore.open(path) as store:
        assert store.info()["uncommitted_runs_ignored"] == 1
    with gradstore.open(path, "r+") as store:
        store = store.finalize()
        rows = store.read(np.arange(12))
    assert (rows == np.repeat([1.0, 2.0, 3.0], 4)[:, None]).all()


def test_compacted_runs_are_named_by_the_commit_that_counts_them(tmp_path):
    """finalize merges runs when there are many; the commit record follows, so a reopen checks the merged run."""
    path = tmp_path / "s.h5"
    store = gradstore.create(path, 100, 70, 1.0, codec="fp32", memory_budget=4 * 100)  # one row a run
    for key in range(70):
        store.accumulate([key], np.full((1, 100), float(key), np.float32))
    store.commit()
    store._compact_runs(8)  # what finalize does first, stopped here as a crash would stop it
    store._h5.flush()
    store._h5.close()
    store._h5 = None
    with gradstore.open(path, "r+") as reopened:
        assert reopened.info()["staging_runs"] <= 8
        finished = reopened.finalize()
        assert np.array_equal(finished.read(np.arange(70))[:, 0], np.arange(70, dtype=np.float32))
        finished.close()


def test_a_recording_begun_before_commits_named_their_runs_resumes_and_commits(tmp_path):
    """A recording written by an older gradstore (no "runs" in its commit record, no run_crc32) opens, resumes,
    commits and reopens: its old runs are given their run_crc32 at that commit."""
    import h5py

    from gradstore.format import get_json_attr, seal_metadata, set_json_attr

    path = tmp_path / "old.h5"
    store = gradstore.create(path, 100, 10, 0.5, codec="fp32")
    store.accumulate(np.arange(3), np.ones((3, 50), np.float32))
    store.commit(note=1)
    store.close()
    with h5py.File(path, "r+") as f:  # as gradstore wrote it before 2026-12-07
        record = get_json_attr(f, "gradstore_committed")
        set_json_attr(f, "gradstore_committed", {"generation": record["generation"], "note": record["note"]})
        for run in f["staging"].values():
            del run.attrs["run_crc32"]
        seal_metadata(f)
    with gradstore.open(path, "r+") as store:
        assert store.state[:4].tolist() == [1, 1, 1, 0]
        store.accumulate(np.arange(2, 5), np.full((3, 50), 2.0, np.float32))
        store.commit(note=2)
    with gradstore.open(path, "r+") as store:  # used to be refused as damaged here
        assert store.commit_note == 2
        finished = store.finalize()
        assert finished.read(np.arange(5))[:, 0].tolist() == [1.0, 1.0, 3.0, 2.0, 2.0]
        finished.close()

