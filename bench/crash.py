"""`python -m bench crash --trials 20`: SIGKILL a recording at random moments, check, resume, compare.

Each trial starts `python -m unlearn train ... --checkpoint-every K` in a child process,
waits for its first checkpoint, kills it with SIGKILL at a random moment after, and then
checks that the store opens, `verify()` finds nothing wrong, it says that recording did
not finish (or that it did, if the kill came after finalize) and which step its last
commit covers. It then resumes the run with --resume and compares it with a run that
was never interrupted: the same model weights and every row equal within float32
summation order (the fp32 codec; a quantizing codec adds its own bound on top).
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

TRAIN_ARGS = ["--dataset", "digits", "--model", "simple", "--method", "per-sample", "--keep", "0.05", "--codec", "fp32",
              "--epochs", "2", "--batch-size", "32", "--seed", "7", "--quiet"]


def train_command(out, checkpoint_every, resume=False):
    return [sys.executable, "-m", "unlearn", "train", *TRAIN_ARGS, "--checkpoint-every", str(checkpoint_every),
            "--out", str(out), *(["--resume"] if resume else [])]


def run_reference(out, checkpoint_every):
    subprocess.run(train_command(out, checkpoint_every), check=True, capture_output=True, timeout=600)


def kill_at_random(out, checkpoint_every, rng, max_wait):
    """Start a recording, SIGKILL it at a random moment after its first checkpoint. Returns seconds after it."""
    child = subprocess.Popen(train_command(out, checkpoint_every), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 600
    while not (out / "checkpoint.pt").exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    delay = float(rng.uniform(0, max_wait))
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait()
    return delay


def inspect_killed(out):
    """What a reader finds right after the kill: (finished, last committed step, problems)."""
    with gradstore.open(out / "store.h5") as store:
        info = store.info()
        problems = store.verify()
    note = info.get("commit_note") or {}
    return info["finished"], note.get("step"), problems


def compare_runs(reference, resumed):
    """(weights identical, max |row difference| relative to the row's max |value|)."""
    a = torch.load(reference / "model.pt", weights_only=True)
    b = torch.load(resumed / "model.pt", weights_only=True)
    same_weights = all(torch.equal(a[name], b[name]) for name in a)
    with gradstore.open(reference / "store.h5") as ref, gradstore.open(resumed / "store.h5") as res:
        keys = np.nonzero(ref.state == gradstore.RowState.LIVE)[0]
        if not np.array_equal(keys, np.nonzero(res.state == gradstore.RowState.LIVE)[0]):
            return same_weights, float("inf")
        x, y = ref.read(keys), res.read(keys)
    scale = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-30)
    return same_weights, float((np.abs(x - y) / scale).max())


def trial(workdir, reference, checkpoint_every, rng, max_wait):
    out = Path(workdir)
    shutil.rmtree(out, ignore_errors=True)
    delay = kill_at_random(out, checkpoint_every, rng, max_wait)
    result = {"kill_after_first_checkpoint_s": round(delay, 3)}
    if (out / "train.json").exists():
        result["outcome"] = "finished before the kill"
        return result
    finished, step, problems = inspect_killed(out)
    result.update(store_finished=finished, committed_step=step, verify_problems=len(problems))
    resumed = subprocess.run(train_command(out, checkpoint_every, resume=True), capture_output=True, text=True, timeout=600)
    if resumed.returncode:
        result.update(outcome="resume failed", stderr=resumed.stderr[-2000:])
        return result
    result["resumed_from_step"] = json.loads((out / "train.json").read_text())["resumed_from_step"]
    same_weights, row_error = compare_runs(reference, out)
    result.update(same_weights=same_weights, max_row_error=row_error)
    ok = not problems and same_weights and row_error <= 1e-5 and result["resumed_from_step"] == (step or 0)
    result["outcome"] = "ok" if ok else "MISMATCH"
    return result


def main(args):
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    reference = work / "reference"
    shutil.rmtree(reference, ignore_errors=True)
    started = time.perf_counter()
    run_reference(reference, args.checkpoint_every)
    reference_seconds = time.perf_counter() - started
    rng = np.random.default_rng(args.seed)
    results = []
    for index in range(args.trials):
        result = trial(work / "killed", reference, args.checkpoint_every, rng, args.max_wait)
        results.append(result)
        print(f"trial {index + 1}/{args.trials}: {json.dumps(result)}", flush=True)
    outcomes = [r["outcome"] for r in results]
    summary = {
        "trials": len(results), "ok": outcomes.count("ok"), "finished_before_kill": outcomes.count("finished before the kill"),
        "failed": [r for r in results if r["outcome"] not in ("ok", "finished before the kill")],
        "reference_seconds": reference_seconds, "checkpoint_every": args.checkpoint_every,
    }
    (work / "crash-results.json").write_text(json.dumps({"summary": summary, "trials": results}, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "failed"}), f"failed: {len(summary['failed'])}")
    return 0 if not summary["failed"] else 1


def add_arguments(parser):
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--checkpoint-every", type=int, default=7, help="steps between checkpoints (90 steps in all)")
    parser.add_argument("--max-wait", type=float, default=2.5, help="kill within this many seconds of the first checkpoint")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out/crash")

