"""`python -m bench store`: bytes, ingest, read, scatter and forget figures of the store.

Real per-sample gradients (bench.gradients) are written into one store per
(stage, keep, codec); every figure comes from that store on disk.
"""

import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

import gradstore
from gradstore import masks
from gradstore.codecs import CODECS

from .gradients import BATCH, mnist_gradients

FULL_GRID = {"stages": ["init", "trained"], "keeps": [0.01, 0.05, 0.1, 0.2], "codecs": list(CODECS)}
QUICK_GRID = {"stages": ["trained"], "keeps": [0.1], "codecs": list(CODECS)}
TARGETS = {"int8_bytes_per_value": 0.75, "int8_entropy_gap": 0.05, "ingest_mb_s_per_core": 1000.0,
           "forget_one_ms": 1.0, "scatter_mvalues_s": 500.0}


def masked_rows(gradients, seed, keep):
    """Each sample's k masked values, as the recorder would hand them to the store."""
    n, num_params = gradients.shape
    k = gradstore.keep_to_k(keep, num_params)
    positions = masks.positions_many(seed, np.arange(n), num_params, k)
    return np.take_along_axis(gradients, positions, axis=1)


def order0_entropy_bytes(symbols):
    """Order-0 (memoryless) entropy of the symbols, in bytes per symbol."""
    _, counts = np.unique(symbols.reshape(-1), return_counts=True)
    prob = counts / counts.sum()
    return float(-(prob * np.log2(prob)).sum() / 8)


def entropy_bytes_per_value(codec, rows, keys, seed):
    """The entropy bound of a codec on these rows: symbols' order-0 entropy + raw scale bytes, per value."""
    parts = codec.encode(rows, keys, seed)
    bound = order0_entropy_bytes(parts["values"].view(np.dtype(f"u{parts['values'].dtype.itemsize}")))
    if "scales" in parts:
        bound += parts["scales"].nbytes / rows.size
    return bound


def _median_ms(fn, repeats):
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def measure_config(rows, num_params, codec, keep, seed, path, epochs):
    """One store of a num_params model written from ``rows`` ([n, k] float32) over ``epochs`` epochs, then measured."""
    n, k = rows.shape
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(epochs):
        order = rng.permutation(n)
        batches += [(order[i : i + BATCH], rows[order[i : i + BATCH]]) for i in range(0, n, BATCH)]
    started = time.perf_counter()
    store = gradstore.create(path, num_params, n, keep, codec=codec, seed=seed, overwrite=True)
    for keys, values in batches:
        store.accumulate(keys, values)
    store = store.finalize()
    ingest_seconds = time.perf_counter() - started
    store.close()

    store = gradstore.open(path)
    info = store.info()
    all_keys = np.arange(n)
    decoded = store.read(all_keys)
    expected = rows * epochs
    rel_error = float(np.mean(np.linalg.norm(decoded - expected, axis=1) / np.maximum(np.linalg.norm(expected, axis=1), 1e-30)))
    read_ms = {}
    for count in (1, 100, 1000):
        picks = [rng.choice(n, size=min(count, n), replace=False) for _ in range(7)]
        it = iter(picks)
        read_ms[count] = _median_ms(lambda: store.read(next(it)), len(picks))
    flat = np.zeros(store.num_params, np.float32)
    scatter_ms = _median_ms(lambda: store.scatter_add(flat, all_keys, 1.0), 3)
    positions_ms = _median_ms(lambda: masks.positions_many(seed, all_keys, store.num_params, k), 3)
    one_keys = iter(rng.choice(n, size=51, replace=False).tolist())
    forget_ms = [_median_ms(lambda: store.scatter_add(flat, [next(one_keys)], -1.0), 1) for _ in range(51)]
    entropy = entropy_bytes_per_value(store.codec, expected.astype(np.float32), all_keys, seed)
    store.close()
    import numba

    cores = numba.get_num_threads()
    return {
        "codec": codec,
        "keep": keep,
        "k": k,
        "num_params": store.num_params,
        "rows": n,
        "epochs": epochs,
        "raw_bytes_per_value": sum(part.width * part.dtype.itemsize for part in store.parts) / k,
        "bytes_per_value": info["bytes_per_value"],
        "entropy_bytes_per_value": entropy,
        "entropy_gap": info["bytes_per_value"] / entropy - 1,
        "payload_bytes_per_value": info["payload_bytes"] / (n * k),
        "file_overhead_bytes": info["bytes_on_disk"] - info["payload_bytes"],
        "ratio_vs_dense_fp32": info["ratio_vs_dense_fp32"],
        "rel_l2_error": rel_error,
        "ingest_mb_s": n * k * 4 * epochs / ingest_seconds / 1e6,
        "ingest_mb_s_per_thread": n * k * 4 * epochs / ingest_seconds / 1e6 / cores,
        "threads": cores,
        "read_ms_1": read_ms[1],
        "read_ms_100": read_ms[100],
        "read_ms_1000": read_ms[1000],
        "scatter_mvalues_s": n * k / (scatter_ms / 1e3) / 1e6,
        "positions_mvalues_s": n * k / (positions_ms / 1e3) / 1e6,
        "forget_one_ms": statistics.median(forget_ms),
        "forget_one_ms_p95": sorted(forget_ms)[int(0.95 * len(forget_ms))],
        "bytes_on_disk": info["bytes_on_disk"],
        "path": str(path),
    }


def warm_up(out_dir):
    """Compile every kernel once (numba caches them on disk too) so timings exclude JIT."""
    rows = np.random.default_rng(0).standard_normal((70, 50)).astype(np.float32)
    for codec in FULL_GRID["codecs"]:
        measure_config(rows, 100, codec, 0.5, 0, Path(out_dir) / "warmup.h5", 1)
    os.remove(Path(out_dir) / "warmup.h5")


def run(quick=False, out_dir="out/bench-store", samples=1024, epochs=4, seed=0, log=print, dataset="mnist",
        keeps=None, codecs=None):
    grid = dict(QUICK_GRID if quick else FULL_GRID)
    grid.update({name: value for name, value in (("keeps", keeps), ("codecs", codecs)) if value})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    gradients = mnist_gradients(samples, log=log, dataset=dataset)
    gradients = {stage: gradients[stage] for stage in grid["stages"]}
    warm_up(out_dir)
    results = []
    for stage, stage_grads in gradients.items():
        for keep in grid["keeps"]:
            rows = masked_rows(stage_grads, seed, keep)
            for codec in grid["codecs"]:
                path = out_dir / f"{stage}-p{keep}-{codec}.h5"
                result = {"stage": stage, **measure_config(rows, stage_grads.shape[1], codec, keep, seed, path, epochs)}
                results.append(result)
                log(format_row(result))
    return results


HEADER = (f"{'stage':<8}{'keep':>6}{'codec':>16}{'raw B/v':>9}{'B/value':>9}{'entropy':>9}{'gap':>7}{'x dense':>9}"
          f"{'rel.err':>9}{'ingest MB/s':>12}{'read1 ms':>9}{'read100':>9}{'read1000':>9}"
          f"{'scatter Mv/s':>13}{'masks Mv/s':>11}{'forget1 ms':>11}")


def format_row(r):
    return (f"{r['stage']:<8}{r['keep']:>6}{r['codec']:>16}{r['raw_bytes_per_value']:>9.3f}{r['bytes_per_value']:>9.3f}{r['entropy_bytes_per_value']:>9.3f}"
            f"{r['entropy_gap']:>+7.1%}{r['ratio_vs_dense_fp32']:>9.0f}{r['rel_l2_error']:>9.1e}{r['ingest_mb_s']:>12.0f}"
            f"{r['read_ms_1']:>9.2f}{r['read_ms_100']:>9.2f}{r['read_ms_1000']:>9.2f}"
            f"{r['scatter_mvalues_s']:>13.0f}{r['positions_mvalues_s']:>11.0f}{r['forget_one_ms']:>11.3f}")


def check_targets(results):
    """Lines saying which targets each int8 configuration meets."""
    lines = []
    for r in results:
        checks = {
            "forget_one_ms<=1": r["forget_one_ms"] <= TARGETS["forget_one_ms"],
            "scatter>=500Mv/s": r["scatter_mvalues_s"] >= TARGETS["scatter_mvalues_s"],
        }
        if r["codec"] == "int8":
            checks["B/value<=0.75"] = r["bytes_per_value"] <= TARGETS["int8_bytes_per_value"]
            checks["entropy gap<=5%"] = r["entropy_gap"] <= TARGETS["int8_entropy_gap"]
            checks["ingest>=1000MB/s/core"] = r["ingest_mb_s_per_thread"] >= TARGETS["ingest_mb_s_per_core"]
        missed = [name for name, ok in checks.items() if not ok]
        lines.append(f"{r['stage']} p={r['keep']} {r['codec']}: " + ("all targets met" if not missed else "MISSED " + ", ".join(missed)))
    return lines


def set_threads(count):
    """numba's pool and the zstd pool both use ``count`` threads."""
    import numba

    from gradstore import chunkio

    numba.set_num_threads(count)
    chunkio.set_worker_threads(count)


def main(args):
    for option, value in (("--samples", args.samples), ("--epochs", args.epochs), ("--threads", args.threads or 1)):
        if value < 1:
            raise ValueError(f"{option} must be at least 1, got {value}")
    log = (lambda *a: None) if args.json else print
    if args.threads:
        set_threads(args.threads)
    if not args.json:
        print(HEADER)
    results = run(quick=args.quick, out_dir=args.out, samples=args.samples, epochs=args.epochs, log=log,
                  keeps=args.keeps, codecs=args.codecs, dataset=args.dataset)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print("\n".join(check_targets(results)))
    with open(Path(args.out) / "store-results.json", "w") as handle:
        json.dump(results, handle, indent=2)
    return 0


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="reduced grid (p=0.1, trained gradients), under a minute")
    parser.add_argument("--json", action="store_true", help="print a JSON list, one object per configuration")
    parser.add_argument("--out", default="out/bench-store", help="directory for the stores written (kept)")
    parser.add_argument("--samples", type=int, default=1024, help="training samples whose gradients are stored")
    parser.add_argument("--dataset", choices=["mnist", "digits"], default="mnist",
                        help="mnist (real IDX files from $MNIST_DIR, else ../shared/data/mnist relative to the working "
                             "directory) or digits (bundled with scikit-learn)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs of accumulation per store (ingest volume)")
    parser.add_argument("--keeps", type=float, nargs="+", help="p of the stores (default: the grid's)")
    parser.add_argument("--codecs", nargs="+", choices=FULL_GRID["codecs"], help="codecs (default: the grid's)")
    parser.add_argument("--threads", type=int, help="numba and zstd threads (default: every CPU); 1 gives per-core figures")
