"""`python -m bench corrupt --trials 1000`: flip random bytes in a store; no read may be silently wrong.

Each trial copies a finished int8 store, XORs one byte with a random non-zero value
(half the trials inside the row chunks' compressed frames, half anywhere else: HDF5's
superblock, object headers, chunk indexes, attributes, labels, state, checksums), then
opens it and reads every row chunk by chunk, the labels, the states and the config.
Outcomes: "unaffected" (every value right), "detected" (a library error: FormatError
at open, or CorruptChunkError naming the rows of the damaged chunk), "SILENT" (a wrong
value returned: must never happen), "UNCAUGHT" (any other exception: must never happen),
"CRASH" (the reading process died inside libhdf5: each trial reads in a forked child).
The checksums' cost is measured beside it: reading and scatter-adding every row of a
larger store with and without checking them.
"""

import json
import multiprocessing
import shutil
import signal
import time
from collections import Counter
from pathlib import Path

import numpy as np

import gradstore
from gradstore import CorruptChunkError, StoreError, chunkio


def build_store(path, num_keys=300, num_params=20_000, keep=0.05, seed=3):
    """A small finished int8 store: 300 rows of 1,000 values, labels, a few rows forgotten."""
    rng = np.random.default_rng(seed)
    store = gradstore.create(path, num_params, num_keys, keep, codec="int8", seed=seed, overwrite=True,
                             labels=rng.integers(0, 10, num_keys))
    for _ in range(2):
        for keys in np.array_split(rng.permutation(num_keys), 10):
            store.accumulate(keys, rng.standard_normal((keys.size, store.k)).astype(np.float32) * 1e-3)
    store = store.finalize()
    store.mark_forgotten([5, 6, 7])
    store.close()


def snapshot(path):
    """What a correct reader sees: rows per chunk, labels, state, config."""
    with gradstore.open(path) as store:
        rows = store.rows_per_chunk
        chunks = [np.arange(lo, min(store.num_keys, lo + rows)) for lo in range(0, store.num_keys, rows)]
        readable = [keys[np.isin(store.state[keys], [gradstore.RowState.LIVE, gradstore.RowState.FORGOTTEN])] for keys in chunks]
        return {"chunks": readable, "rows": [store.read(keys) for keys in readable], "labels": store.labels.copy(),
                "state": store.state.copy(), "config": store.config}


def chunk_byte_ranges(path):
    """[(offset, size)] of every row chunk's frame in the file."""
    import h5py
    import hdf5plugin  # noqa: F401

    ranges = []
    with h5py.File(path) as f:
        for name in f["rows"]:
            if name in ("labels", "state"):
                continue
            f["rows"][name].id.chunk_iter(lambda info: ranges.append((info.byte_offset, info.size)))
    return ranges


def pick_offset(size, ranges, in_chunks, rng):
    if in_chunks:
        offset, length = ranges[rng.integers(len(ranges))]
        return int(offset + rng.integers(length))
    inside = np.zeros(size, np.bool_)
    for offset, length in ranges:
        inside[offset : offset + length] = True
    outside = np.nonzero(~inside)[0]
    return int(outside[rng.integers(outside.size)])


def check(path, expected):
    """The outcome of reading a damaged copy (see the module doc)."""
    try:
        store = gradstore.open(path)
    except StoreError:
        return "detected", "at open"
    except Exception as error:  # noqa: BLE001 - counting what escapes is the point
        return "UNCAUGHT", f"open: {type(error).__name__}: {error}"
    detected = []
    try:
        if store.config != expected["config"]:
            return "SILENT", "config"
        if not np.array_equal(store.labels, expected["labels"]):
            return "SILENT", "labels"
        if not np.array_equal(store.state, expected["state"]):
            return "SILENT", "state"
        for keys, rows in zip(expected["chunks"], expected["rows"]):
            try:
                got = store.read(keys)
            except CorruptChunkError as error:
                if not set(error.keys) >= set(keys.tolist()):
                    return "UNCAUGHT", f"error names rows {error.keys[:5]}..., not the chunk's {keys[:5].tolist()}..."
                detected.append(f"rows {keys[0]}-{keys[-1]}")
                continue
            except StoreError as error:
                detected.append(str(error)[:80])
                continue
            if not np.array_equal(got, rows):
                return "SILENT", f"rows {keys[0]}-{keys[-1]}"
    except Exception as error:  # noqa: BLE001
        return "UNCAUGHT", f"read: {type(error).__name__}: {error}"
    finally:
        store.close()
    return ("detected", "at read: " + "; ".join(detected[:3])) if detected else ("unaffected", "")


_FORKSERVER = None


def _forkserver():
    """A multiprocessing context whose children fork from a fresh server process.

    A plain fork() of this process is unsafe once numba's GNU OpenMP pool has run (numba
    then kills the child with SIGTERM): the server never runs a kernel, so its children can.
    """
    global _FORKSERVER
    if _FORKSERVER is None:
        _FORKSERVER = multiprocessing.get_context("forkserver")
        _FORKSERVER.set_forkserver_preload(["bench.corrupt"])
    return _FORKSERVER


def _report(pipe, function, args):
    try:
        outcome = function(*args)
    except BaseException as error:  # noqa: BLE001
        outcome = ["UNCAUGHT", f"{type(error).__name__}: {error}"]
    pipe.send(list(outcome))
    pipe.close()


def isolated(function, *args):
    """function(*args) in a child process, so that a crash inside libhdf5 is an outcome, not the end of the run."""
    context = _forkserver()
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_report, args=(send, function, args))
    child.start()
    send.close()
    try:
        payload = receive.recv()
    except EOFError:
        payload = None
    child.join()
    if child.exitcode is not None and child.exitcode < 0:
        number = -child.exitcode
        return "CRASH", f"killed by signal {number} ({signal.Signals(number).name})"
    if payload is None:
        return "CRASH", f"exited with status {child.exitcode} without a result"
    return tuple(payload)


def trial(source, work, expected, ranges, rng):
    path = Path(work) / "damaged.h5"
    shutil.copyfile(source, path)
    size = path.stat().st_size
    in_chunks = bool(rng.integers(2))
    offset = pick_offset(size, ranges, in_chunks, rng)
    flip = int(rng.integers(1, 256))
    with open(path, "r+b") as handle:
        handle.seek(offset)
        byte = handle.read(1)[0]
        handle.seek(offset)
        handle.write(bytes([byte ^ flip]))
    outcome, detail = isolated(check, path, expected)
    return {"offset": offset, "xor": flip, "where": "chunk frame" if in_chunks else "elsewhere", "outcome": outcome,
            "detail": detail}


def checksum_cost(work, repeats=5):
    """Seconds to read and to scatter-add every row of a 4,000 x 9,511 int8 store, with and without checksums."""
    path = Path(work) / "cost.h5"
    rng = np.random.default_rng(0)
    num_keys, num_params = 4000, 95_110
    store = gradstore.create(path, num_params, num_keys, 0.1, codec="int8", overwrite=True)
    for keys in np.array_split(np.arange(num_keys), 20):
        store.accumulate(keys, rng.standard_normal((keys.size, store.k)).astype(np.float32))
    store = store.finalize()
    keys = np.arange(num_keys)
    flat = np.zeros(num_params, np.float32)
    checksums = store._checksums
    store.scatter_add(flat, keys)  # warm up the kernels and the thread pools
    times = {label: {"read_s": float("inf"), "scatter_add_s": float("inf")} for label in ("with checksums", "without")}
    for _ in range(repeats):  # alternating, best of each
        for label, sums in (("with checksums", checksums), ("without", {})):
            store._checksums = sums
            started = time.perf_counter()
            store.read(keys)
            times[label]["read_s"] = min(times[label]["read_s"], time.perf_counter() - started)
            started = time.perf_counter()
            store.scatter_add(flat, keys)
            times[label]["scatter_add_s"] = min(times[label]["scatter_add_s"], time.perf_counter() - started)
    frames = [store._row_datasets["values"].id.read_direct_chunk((i * store.rows_per_chunk, 0))[1]
              for i in range(-(-num_keys // store.rows_per_chunk))]
    started = time.perf_counter()
    for index, frame in enumerate(frames):
        chunkio.frame_checksum(index, frame)
    crc_seconds = time.perf_counter() - started
    compressed = sum(len(f) for f in frames)
    store.close()
    return {**times, "read_overhead": times["with checksums"]["read_s"] / times["without"]["read_s"] - 1,
            "scatter_overhead": times["with checksums"]["scatter_add_s"] / times["without"]["scatter_add_s"] - 1,
            "crc32_MB_per_s": compressed / crc_seconds / 1e6, "values": num_keys * 9511}


def main(args):
    work = Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    source = work / "store.h5"
    build_store(source)
    expected = snapshot(source)
    ranges = chunk_byte_ranges(source)
    rng = np.random.default_rng(args.seed)
    results = []
    started = time.perf_counter()
    for index in range(args.trials):
        results.append(trial(source, work, expected, ranges, rng))
        if results[-1]["outcome"] in ("SILENT", "UNCAUGHT", "CRASH"):
            print(f"trial {index}: {json.dumps(results[-1])}", flush=True)
        if (index + 1) % 100 == 0:
            print(f"{index + 1}/{args.trials} trials: {dict(Counter(r['outcome'] for r in results))}", flush=True)
    counts = {where: dict(Counter(r["outcome"] for r in results if r["where"] == where)) for where in ("chunk frame", "elsewhere")}
    summary = {"trials": len(results), "file_bytes": source.stat().st_size, "outcomes": counts,
               "silent": sum(r["outcome"] == "SILENT" for r in results),
               "uncaught": sum(r["outcome"] == "UNCAUGHT" for r in results),
               "crashes": sum(r["outcome"] == "CRASH" for r in results), "seconds": time.perf_counter() - started}
    if not args.no_cost:
        summary["checksum_cost"] = checksum_cost(work)
    (work / "corrupt-results.json").write_text(json.dumps({"summary": summary, "trials": results}, indent=1))
    print(json.dumps(summary, indent=1))
    return 0 if summary["silent"] == summary["uncaught"] == summary["crashes"] == 0 else 1


def add_arguments(parser):
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cost", action="store_true", help="skip measuring the checksums' cost")
    parser.add_argument("--out", default="out/corrupt")
