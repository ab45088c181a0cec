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
