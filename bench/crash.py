"""`python -m bench crash --trials 20 [--ranks 2]`: SIGKILL a recording at random moments, check, resume, compare.

Each trial starts `python -m unlearn train ... --checkpoint-every K` in a child process,
waits for its first checkpoint, kills it with SIGKILL at a random moment after, and then
checks that the store opens, `verify()` finds nothing wrong, it says that recording did
not finish (or that it did, if the kill came after finalize) and which step its last
commit covers. It then resumes the run with --resume and compares it with a run that
was never interrupted: the same model weights and the same rows, bit for bit (a resume
replays every step after the checkpoint exactly as the uninterrupted run took it, so no
tolerance applies, whatever the codec).  The largest relative row difference is still
reported, to say how far a mismatch is.

--ranks N runs each recording under torchrun with N gloo processes and kills one rank
at random; torchrun then stops the others. Every rank's recording must reopen at a
commit at or after the last checkpoint, and the resumed run (with N ranks again) must
end with the stores of an uninterrupted N-rank run.
"""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

import gradstore
import gradstore.shards

TRAIN_ARGS = ["--dataset", "digits", "--model", "simple", "--method", "per-sample", "--keep", "0.05", "--codec", "fp32",
              "--epochs", "2", "--batch-size", "32", "--seed", "7", "--quiet"]


def train_command(out, checkpoint_every, resume=False, ranks=1):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 else []
    return [sys.executable, *launcher, "-m", "unlearn", "train", *TRAIN_ARGS, "--device", "cpu",
            "--checkpoint-every", str(checkpoint_every), "--out", str(out), *(["--resume"] if resume else [])]


def run_reference(out, checkpoint_every, ranks=1):
    subprocess.run(train_command(out, checkpoint_every, ranks=ranks), check=True, capture_output=True, timeout=600)


def _children(pid):
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def kill_at_random(out, checkpoint_every, rng, max_wait, ranks=1):
    """Start a recording, SIGKILL it (one random rank of it) at a random moment after its first checkpoint.
    Returns (seconds after the checkpoint, the rank killed)."""
    child = subprocess.Popen(train_command(out, checkpoint_every, ranks=ranks), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not (out / "checkpoint.pt").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    delay = float(rng.uniform(0, max_wait))
    time.sleep(delay)
    victim = None
    if ranks == 1:
        child.send_signal(signal.SIGKILL)
    else:
        processes = _children(child.pid) if child.poll() is None else []
        if processes:
            victim = int(rng.integers(len(processes)))
            subprocess.run(["kill", "-9", str(processes[victim])], check=False)
    child.communicate()
    return delay, victim


def inspect_killed(out, ranks=1):
    """What a reader finds right after the kill: (finished, the last commit's step of every rank, problems)."""
    files = [out / "store.h5"]
    if ranks > 1 and not files[0].exists():
        files = [Path(gradstore.shards.recording_path(out / "store.h5", rank, ranks)) for rank in range(ranks)]
    steps, problems, finished = [], [], True
    for file in files:
        with gradstore.open(file) as store:
            info = store.info()
            problems += store.verify()
        finished = finished and info["finished"]
        steps.append((info.get("commit_note") or {}).get("step"))
    return finished, steps, problems


def checkpoint_step(out):
    path = out / "checkpoint.pt"
    return int(torch.load(path, weights_only=True)["step"]) if path.exists() else 0


def compare_runs(reference, resumed):
    """(weights bit-identical, rows and labels bit-identical, max |row difference| relative to the row's max |value|)."""
    a = torch.load(reference / "model.pt", weights_only=True)
    b = torch.load(resumed / "model.pt", weights_only=True)
    same_weights = a.keys() == b.keys() and all(
        a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        and a[name].numpy().tobytes() == b[name].numpy().tobytes() for name in a)  # bits: -0.0 and NaN count
    with gradstore.open(reference / "store.h5") as ref, gradstore.open(resumed / "store.h5") as res:
        keys = np.nonzero(ref.state == gradstore.RowState.LIVE)[0]
        if not (np.array_equal(ref.state, res.state) and np.array_equal(ref.labels, res.labels)):
            return same_weights, False, float("inf")
        x, y = ref.read(keys), res.read(keys)
    same_rows = x.dtype == y.dtype and x.tobytes() == y.tobytes()
    scale = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-30)
    error = float((np.abs(x - y) / scale).max()) if x.size else 0.0
    return same_weights, same_rows, error


def trial(workdir, reference, checkpoint_every, rng, max_wait, ranks=1):
    out = Path(workdir)
    shutil.rmtree(out, ignore_errors=True)
    delay, victim = kill_at_random(out, checkpoint_every, rng, max_wait, ranks)
    result = {"kill_after_first_checkpoint_s": round(delay, 3)}
    if ranks > 1:
        result["rank_killed"] = victim
    if (out / "train.json").exists():
        result["outcome"] = "finished before the kill"
        return result
    finished, steps, problems = inspect_killed(out, ranks)
    step = checkpoint_step(out)  # the last common commit: every rank committed it before rank 0 wrote it
    behind = [s for s in steps if s is not None and s < step]  # a rank whose last commit is older than the checkpoint
    result.update(store_finished=finished, committed_steps=steps, checkpoint_step=step, verify_problems=len(problems))
    resumed = subprocess.run(train_command(out, checkpoint_every, resume=True, ranks=ranks), capture_output=True,
                             text=True, timeout=600)
    if resumed.returncode:
        result.update(outcome="resume failed", stderr=resumed.stderr[-2000:])
        return result
    result["resumed_from_step"] = json.loads((out / "train.json").read_text())["resumed_from_step"]
    same_weights, same_rows, row_error = compare_runs(reference, out)
    result.update(same_weights=same_weights, same_rows=same_rows, max_row_error=row_error)
    ok = not problems and not behind and same_weights and same_rows and result["resumed_from_step"] == step
    result["outcome"] = "ok" if ok else "MISMATCH"
    return result


def main(args):
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    started = time.perf_counter()
    run_reference(reference, args.checkpoint_every, args.ranks)
    reference_seconds = time.perf_counter() - started
    rng = np.random.default_rng(args.seed)
    results = []
    for index in range(args.trials):
        result = trial(work / "killed", reference, args.checkpoint_every, rng, args.max_wait, args.ranks)
        results.append(result)
        print(f"trial {index + 1}/{args.trials}: {json.dumps(result)}", flush=True)
    outcomes = [r["outcome"] for r in results]
    summary = {
        "trials": len(results), "ok": outcomes.count("ok"), "finished_before_kill": outcomes.count("finished before the kill"),
        "bit_identical": sum(bool(r.get("same_weights") and r.get("same_rows")) for r in results),
        "failed": [r for r in results if r["outcome"] not in ("ok", "finished before the kill")],
        "reference_seconds": reference_seconds, "checkpoint_every": args.checkpoint_every, "ranks": args.ranks,
    }
    (work / "crash-results.json").write_text(json.dumps({"summary": summary, "trials": results}, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "failed"}), f"failed: {len(summary['failed'])}")
    return 0 if not summary["failed"] else 1


def add_arguments(parser):
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=7, help="steps between checkpoints (90 steps in all)")
    parser.add_argument("--max-wait", type=float, default=2.5, help="kill within this many seconds of the first checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", type=int, default=1, help="processes under torchrun (gloo); one rank is killed")
    parser.add_argument("--out", default="out/crash")

