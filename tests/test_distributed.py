"""Recording under torch.distributed: `torchrun -m unlearn train` with 2 gloo processes on the CPU equals one process."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import gradstore
from gradstore import RowState, shards

TRAIN = ["-m", "unlearn", "train", "--dataset", "digits", "--model", "simple", "--method", "per-sample",
         "--flavour", "grad", "--keep", "0.1", "--codec", "fp32", "--epochs", "1", "--batch-size", "64",
         "--device", "cpu", "--quiet"]


def run(ranks, out, *extra, check=True):
    """The same command with one process or with torchrun's ``ranks`` processes (gloo, a free local port)."""
    launcher = [] if ranks == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    command = [sys.executable, *launcher, *TRAIN, "--out", str(out), *extra]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def flat_weights(run_dir):
    state = torch.load(Path(run_dir) / "model.pt", weights_only=True)
    return torch.cat([value.reshape(-1) for value in state.values()]).numpy()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    run(1, root / "one")
    run(2, root / "two")
    return root / "one", root / "two"


def test_two_ranks_record_the_one_process_rows(runs):
    one, two = runs
    assert json.loads((two / "train.json").read_text())["ranks"] == 2
    assert not list(Path(shards.shard_dir(two / "store.h5")).glob("recording-*"))  # merged, then removed
    with gradstore.open(one / "store.h5") as single, gradstore.open(two / "store.h5") as joined:
        assert joined.info()["shards"] == 2 and joined.verify() == []
        assert np.array_equal(joined.state, single.state) and np.array_equal(joined.labels, single.labels)
        keys = np.nonzero(single.state == RowState.LIVE)[0]
        expected, got = single.read(keys), joined.read(keys)
    relative = np.linalg.norm(got - expected, axis=1) / np.linalg.norm(expected, axis=1)
    assert relative.max() < 1e-5  # float rounding of another summation order (measured: 2.4e-7)
    weights_one, weights_two = flat_weights(one), flat_weights(two)
    assert np.linalg.norm(weights_two - weights_one) / np.linalg.norm(weights_one) < 1e-5


def test_forget_reads_the_sharded_run_unchanged(runs, tmp_path):
    one, two = runs
    results = {}
    for name, run_dir in (("one", one), ("two", two)):
        out = tmp_path / name
        done = subprocess.run([sys.executable, "-m", "unlearn", "forget", str(run_dir), "--class", "3", "--out", str(out),
                               "--json", "--quiet"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        results[name] = json.loads((out / "forget.json").read_text())
    for key in ("forgotten_acc", "rest_acc"):
        assert abs(results["one"][key] - results["two"][key]) <= 0.01


def test_what_cannot_run_distributed_is_refused(tmp_path):
    refused = run(2, tmp_path / "vmap", "--engine", "vmap", "--overwrite", check=False)
    assert refused.returncode != 0 and "engine='masked'" in refused.stderr


def _ranks_of(launcher):
    """The rank processes torchrun started (its children)."""
    children = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    return [int(pid) for pid in children]


def test_a_rank_killed_mid_run_resumes_at_the_last_common_commit(tmp_path):
    """kill -9 of one rank after a checkpoint: torchrun stops the run; `--resume` with the same ranks finishes
    it with the stores of an uninterrupted run; with another number of ranks it is refused."""
    import os
    import signal
    import time

    options = ["--epochs", "3", "--checkpoint-every", "10"]
    killed = tmp_path / "killed"
    launcher = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                                 *TRAIN, "--out", str(killed), *options],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoint.pt").exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert launcher.poll() is None, "the run ended before its first checkpoint"
    os.kill(_ranks_of(launcher)[-1], signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0
    assert not (killed / "store.h5").exists()
    for rank in range(2):  # rows were routed to the rank owning their key range as they were recorded
        with gradstore.open(shards.recording_path(killed / "store.h5", rank, 2)) as recording:
            lo, hi = shards.shard_ranges(recording.num_keys, recording.rows_per_chunk, 2)[rank]
            live = np.nonzero(recording.state == RowState.LIVE)[0]
            assert live.size and lo <= live.min() and live.max() < hi
    refused = run(1, killed, *options, "--resume", check=False)
    assert refused.returncode != 0 and "another number of ranks" in refused.stderr
    run(2, killed, *options, "--resume")
    run(2, tmp_path / "whole", *options)
    assert json.loads((killed / "train.json").read_text())["resumed_from_step"] > 0
    with gradstore.open(killed / "store.h5") as resumed, gradstore.open(tmp_path / "whole" / "store.h5") as whole:
        keys = np.nonzero(whole.state == RowState.LIVE)[0]
        assert np.array_equal(resumed.state, whole.state)
        assert np.array_equal(resumed.read(keys), whole.read(keys))  # no row lost, none counted twice


def test_attach_inside_a_users_own_ddp_loop(tmp_path):
    """DistributedSampler + DDP + the user's mean loss: the rows are those of one process stepping on the union
    of the ranks' batches (each sample's share of the global batch)."""
    script = Path(__file__).parent / "scripts" / "ddp_user_loop.py"
    for out, command in ((tmp_path / "one", [sys.executable, str(script)]),
                         (tmp_path / "two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                              "--nproc-per-node=2", str(script)])):
        out.mkdir()
        done = subprocess.run([*command, str(out), *(["--reference"] if out.name == "one" else [])],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    with gradstore.open(tmp_path / "one" / "store.h5") as single, gradstore.open(tmp_path / "two" / "store.h5") as joined:
        keys = np.nonzero(single.state == RowState.LIVE)[0]
        assert keys.size == 512 and np.array_equal(joined.state, single.state)
        expected, got = single.read(keys), joined.read(keys)
    assert (np.linalg.norm(got - expected, axis=1) / np.linalg.norm(expected, axis=1)).max() < 1e-5
