"""A resumed recording is bit-identical to an uninterrupted one, under torchrun too (issue 21).

The cause found: numba's OpenMP threading layer, the first time it ran a parallel kernel
on the training thread (the update flavour's Adam preconditioner, in step 1), called
``omp_set_num_threads(NUMBA_NUM_THREADS)``, and torch's CPU kernels read that same setting.
Under torchrun (``OMP_NUM_THREADS=1``) the uninterrupted run's steps after its first ran on
every core, a resumed run's first step on one: a matmul reduced in another order, weights
3.7e-8 apart. ``unlearn.recording.threads.hold_torch_threads`` starts numba's threads at import and
keeps torch's count; the checkpoint also carries the count.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import torch

import gradstore
from gradstore import RowState
from unlearn.runs.checkpoint import Checkpointer

# The bench crash run's recording (update flavour, Adam, fp32 rows), one epoch of 23 steps.
TRAIN = ["-m", "unlearn", "train", "--dataset", "digits", "--model", "simple", "--method", "per-sample",
         "--keep", "0.05", "--codec", "fp32", "--epochs", "1", "--batch-size", "64", "--seed", "7",
         "--device", "cpu", "--quiet", "--checkpoint-every", "8"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]


def test_a_numba_kernel_leaves_torchs_thread_count_alone():
    """OMP_NUM_THREADS=1 (what torchrun sets), then a parallel numba kernel on the training thread: torch
    still runs its kernels on one thread (it ran them on NUMBA_NUM_THREADS before the fix)."""
    script = textwrap.dedent("""
        import numpy as np, torch
        import unlearn  # noqa: F401
        from numba import njit, prange
        before = torch.get_num_threads()

        @njit(parallel=True)
        def total(values):
            out = 0.0
            for i in prange(values.size):
                out += values[i]
            return out

        total(np.ones(1000))
        print(before, torch.get_num_threads())
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="2")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["1", "1"]


def test_the_checkpoint_restores_the_thread_count(tmp_path):
    """A run resumed where the environment says otherwise still steps with the interrupted run's count."""
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.Adam(model.parameters())
    checkpoint = Checkpointer(tmp_path / "checkpoint.pt", 1)
    threads = torch.get_num_threads()
    try:
        checkpoint.save(model, optimizer, [], 0, 1, 1, torch.Generator().get_state())
        assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["torch_threads"] == threads
        torch.set_num_threads(threads + 1)
        assert checkpoint.restore(model, optimizer, [])["step"] == 1
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(threads)


def _bits(run_dir):
    """(the model's weights, the store's state, labels and live rows), as bytes."""
    weights = torch.load(Path(run_dir) / "model.pt", weights_only=True)
    with gradstore.open(Path(run_dir) / "store.h5") as store:
        keys = np.nonzero(store.state == RowState.LIVE)[0]
        rows = store.read(keys)
        stored = (store.state.tobytes(), store.labels.tobytes(), rows.dtype.str, rows.tobytes())
    return {name: value.numpy().tobytes() for name, value in weights.items()}, stored


def test_a_two_rank_resume_is_bit_identical_to_the_uninterrupted_run(tmp_path):
    """kill -9 of one rank right after the first checkpoint, `--resume`: the weights and every row equal an
    uninterrupted run's bit for bit (before the fix the first resumed step's gradient differed)."""
    killed = tmp_path / "killed"
    launcher = subprocess.Popen([*TORCHRUN, *TRAIN, "--out", str(killed)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not (killed / "checkpoint.pt").exists() and launcher.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert launcher.poll() is None, "the run ended before its first checkpoint"
    ranks = Path(f"/proc/{launcher.pid}/task/{launcher.pid}/children").read_text().split()
    os.kill(int(ranks[-1]), signal.SIGKILL)
    assert launcher.wait(timeout=120) != 0 and not (killed / "train.json").exists()
    for out, extra in ((killed, ["--resume"]), (tmp_path / "whole", [])):
        done = subprocess.run([*TORCHRUN, *TRAIN, "--out", str(out), *extra], capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((killed / "train.json").read_text())["resumed_from_step"] >= 8
    (resumed_weights, resumed_rows), (whole_weights, whole_rows) = _bits(killed), _bits(tmp_path / "whole")
    assert resumed_weights.keys() == whole_weights.keys()
    assert [name for name in whole_weights if resumed_weights[name] != whole_weights[name]] == []
    assert resumed_rows == whole_rows
