"""`python -m bench positions [--against REV]`: mask positions regenerated per second, and the same against
another revision's algorithm, interleaved in one run, with its output checked bit for bit.

Positions are the format (docs/FORMAT.md): a faster generator must give the same sorted
positions for every (seed, key, M, k). ``--against REV`` loads gradstore/masks.py as it
was at a git revision and times both on the same keys (A, B, A, B, ...; medians).
"""

import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gradstore import masks

MODELS = {"SimpleModel": 95_110, "ResNet-18": 11_175_370}  # the parameter counts of unlearn.runs.models (GroupNorm)
TARGET_VALUES = 2_000_000  # positions per timed call: about 10-30 ms


def masks_at(revision):
    """gradstore/masks.py as it was at a git revision, imported under its own name."""
    root = Path(__file__).resolve().parent.parent
    try:
        source = subprocess.run(["git", "show", f"{revision}:gradstore/masks.py"], cwd=root, check=True,
                                capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        raise SystemExit(f"--against {revision}: cannot read gradstore/masks.py at that revision ({error})") from None
    folder = Path(tempfile.mkdtemp(prefix="masks-rev-"))
    path = folder / "masks_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("masks_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(generators, num_params, keep, repeats):
    """Median seconds of each generator on the same keys; raises if their outputs differ."""
    k = max(1, round(keep * num_params))
    keys = np.arange(max(1, TARGET_VALUES // k), dtype=np.int64) * 7919 + 3
    outputs = {name: generate(0, keys, num_params, k) for name, generate in generators.items()}  # compile, warm
    first = next(iter(outputs.values()))
    for name, out in outputs.items():
        if not np.array_equal(out, first):
            raise AssertionError(f"{name} gives other positions at M = {num_params}, k = {k}")
    times = {name: [] for name in generators}
    for _ in range(repeats):
        for name, generate in generators.items():
            started = time.perf_counter()
            generate(0, keys, num_params, k)
            times[name].append(time.perf_counter() - started)
    return k, keys.size, {name: statistics.median(t) for name, t in times.items()}


def main(args):
    import numba

    numba.set_num_threads(args.threads)
    generators = {"this tree": masks.positions_many}
    if args.against:
        generators[args.against] = masks_at(args.against).positions_many
    rows = []
    for model, num_params in MODELS.items():
        for keep in args.keeps:
            k, count, seconds = measure(generators, num_params, keep, args.repeats)
            row = {"model": model, "num_params": num_params, "keep": keep, "k": k, "rows": count,
                   "threads": args.threads, "identical": True,
                   "mpositions_s": {name: count * k / s / 1e6 for name, s in seconds.items()}}
            if args.against:
                row["speedup"] = seconds[args.against] / seconds["this tree"]
            rows.append(row)
            rates = " ".join(f"{name}: {rate:.0f}" for name, rate in row["mpositions_s"].items())
            speedup = f"  ({row['speedup']:.2f}x)" if args.against else ""
            print(f"{model:<12} M = {num_params:>10,} p = {keep:<6} k = {k:>7,}  M positions/s  {rates}{speedup}",
                  file=sys.stderr if args.json else sys.stdout)
    if args.json:
        print(json.dumps(rows, indent=1))
    return 0


def add_arguments(parser):
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    parser.add_argument("--threads", type=int, default=1, help="numba threads (default 1: per-core figures)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per generator, interleaved")
    parser.add_argument("--against", metavar="REV", help="also time gradstore/masks.py of this git revision")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON (the table goes to stderr)")
