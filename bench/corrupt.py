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

`python -m bench corrupt --unfinished --trials 300 [--targeted]` does the same to an
unfinished recording as a crash leaves it (committed staging runs, runs spilled after the
last commit, no finalize): a third of the flips inside chunk frames (the runs' values,
keys and labels, rows/labels, rows/state), a third in the staging runs' attribute messages
(`committed`, `generation`, `replaces`, `index_crc32`, ...: message header, name,
datatype, dataspace, value), a third anywhere else.
--targeted adds, before them, every byte of each run's `committed` and `generation`
attribute messages XOR 0x01. Each damaged copy is opened read-only and verified, then
opened r+, finalized and read whole (labels, states, every live row), in a forked child,
and compared with what the undamaged copy gives. Outcomes as above, plus "DROPPED": a
committed run or row silently missing (from the read-only view, from the file after an r+
open, or from the finished store). "detected" here is a StoreError at any step or a
verify() problem list.
"""

import contextlib
import json
import multiprocessing
import os
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
    store.scatter_add(flat, keys)  # warm up the kernels and the thread pools
    times = {label: {"read_s": float("inf"), "scatter_add_s": float("inf")} for label in ("with checksums", "without")}
    for _ in range(repeats):  # alternating, best of each
        for label, checking in (("with checksums", contextlib.nullcontext), ("without", store.checksums_unchecked)):
            with checking():
                started = time.perf_counter()
                store.read(keys)
                times[label]["read_s"] = min(times[label]["read_s"], time.perf_counter() - started)
                started = time.perf_counter()
                store.scatter_add(flat, keys)
                times[label]["scatter_add_s"] = min(times[label]["scatter_add_s"], time.perf_counter() - started)
    frames = [store.stored_chunk("values", i) for i in range(-(-num_keys // store.rows_per_chunk))]
    started = time.perf_counter()
    for index, frame in enumerate(frames):
        chunkio.frame_checksum(index, frame)
    crc_seconds = time.perf_counter() - started
    compressed = sum(len(f) for f in frames)
    store.close()
    return {**times, "read_overhead": times["with checksums"]["read_s"] / times["without"]["read_s"] - 1,
            "scatter_overhead": times["with checksums"]["scatter_add_s"] / times["without"]["scatter_add_s"] - 1,
            "crc32_MB_per_s": compressed / crc_seconds / 1e6, "values": num_keys * 9511}


# ---------------------------------------------------------------------- unfinished recordings (--unfinished)

UNFINISHED = {"num_keys": 128, "recorded_keys": 112, "num_params": 1000, "keep": 0.05, "budget_rows": 56, "batch": 16,
              "epochs": 3, "pending_batches": 7}
PLACES = ("targeted", "chunk frame", "run attribute", "elsewhere")


def _record_unfinished(path, seed):
    """Record, commit after each epoch, spill more, then die without commit, close or finalize (run in a child)."""
    shape = UNFINISHED
    rng = np.random.default_rng(seed)
    k = int(round(shape["keep"] * shape["num_params"]))
    store = gradstore.create(path, shape["num_params"], shape["num_keys"], shape["keep"], codec="fp32", seed=seed,
                             overwrite=True, labels=rng.integers(0, 10, shape["num_keys"]),
                             memory_budget=4 * k * shape["budget_rows"])
    for epoch in range(shape["epochs"]):  # keys from recorded_keys on stay empty in every commit
        for keys in np.array_split(rng.permutation(shape["recorded_keys"]), shape["recorded_keys"] // shape["batch"]):
            store.accumulate(keys, rng.standard_normal((keys.size, k)).astype(np.float32))
        store.commit(note={"epoch": epoch})
    batches = np.array_split(rng.permutation(shape["num_keys"]), shape["num_keys"] // shape["batch"])
    for keys in batches[: shape["pending_batches"]]:  # runs spilled after the last commit, then the buffer
        store.accumulate(keys, rng.standard_normal((keys.size, k)).astype(np.float32))
    os._exit(0)  # the crash


def build_unfinished(path, seed=3):
    """An unfinished recording as SIGKILL leaves it: 3 epochs of 112 keys, each spilled as 3 runs and committed,
    then 2 runs spilled after the last commit (and 16 rows in the lost buffer). 128 keys, 112-127 never
    committed (some of them in the uncommitted runs); k = 50; fp32; about 190 kB."""
    child = _forkserver().Process(target=_record_unfinished, args=(str(path), seed))
    child.start()
    child.join()
    if child.exitcode != 0:
        raise RuntimeError(f"recording the unfinished store failed (exit status {child.exitcode})")


def _header_messages(data, address):
    """[(type, offset, size)] of a version 1 HDF5 object header's messages (8-byte message header included),
    following its continuation blocks."""
    if data[address] != 1:
        raise RuntimeError(f"object header at {address} is not version 1")
    count = int.from_bytes(data[address + 2 : address + 4], "little")
    blocks, messages = [(address + 16, int.from_bytes(data[address + 8 : address + 12], "little"))], []
    while blocks and len(messages) < count:
        start, length = blocks.pop(0)
        at = start
        while at + 8 <= start + length and len(messages) < count:
            kind, size = int.from_bytes(data[at : at + 2], "little"), int.from_bytes(data[at + 2 : at + 4], "little")
            messages.append((kind, at, 8 + size))
            if kind == 0x0010:  # continuation: offset, length of the next block
                blocks.append((int.from_bytes(data[at + 8 : at + 16], "little"),
                               int.from_bytes(data[at + 16 : at + 24], "little")))
            at += 8 + size
    return messages


def unfinished_regions(path):
    """{"chunks": [(offset, size)] of every chunk frame, "attributes": [{run, name, offset, size}], "runs": names}.

    An attribute's range is its object-header message: the 8-byte message header, then the
    attribute message (version 1: header, name, datatype, dataspace, each padded to 8, then the value).
    """
    import h5py
    import hdf5plugin  # noqa: F401

    chunks, headers, names = [], {}, set()

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and obj.chunks is not None:
            obj.id.chunk_iter(lambda info: chunks.append((info.byte_offset, info.size)))

    with h5py.File(path) as f:
        f.visititems(visit)
        for run in f["staging"]:
            headers[run] = h5py.h5o.get_info(f["staging"][run].id).addr
            names |= {(run, name) for name in f["staging"][run].attrs}
    data = Path(path).read_bytes()
    attributes = []
    for run, address in headers.items():
        for kind, offset, size in _header_messages(data, address):
            if kind == 0x000C:  # an attribute message, version 1: sizes of name, datatype, dataspace at +10, +12, +14
                name_size, type_size, space_size = (int.from_bytes(data[offset + i : offset + i + 2], "little")
                                                    for i in (10, 12, 14))
                name = data[offset + 16 : offset + 16 + name_size].rstrip(b"\0").decode(errors="replace")
                value_at = 16 + sum(-(-n // 8) * 8 for n in (name_size, type_size, space_size))
                attributes.append({"run": run, "name": name, "offset": offset, "size": size, "name_at": 16,
                                   "value_at": value_at})
    found = {(a["run"], a["name"]) for a in attributes}
    if found != names or len(found) != len(attributes):
        raise RuntimeError(f"staging run attributes not located: missing {sorted(names - found)[:5]}, "
                           f"unexpected {sorted(found - names)[:5]}")
    return {"chunks": chunks, "attributes": attributes, "runs": sorted(headers)}


def _compare(stage, got, want):
    """[(outcome, text)]: what one step gave against what the undamaged copy gave."""
    findings = []
    lost_runs, extra_runs = sorted(set(want["runs"]) - set(got["runs"])), sorted(set(got["runs"]) - set(want["runs"]))
    live, want_live = got["state"] == gradstore.RowState.LIVE, want["state"] == gradstore.RowState.LIVE
    lost_rows = np.nonzero(want_live & ~live)[0]
    if lost_runs:
        findings.append(("DROPPED", f"{stage}: committed runs {lost_runs} gone"))
    if lost_rows.size:
        findings.append(("DROPPED", f"{stage}: {lost_rows.size} committed rows gone ({lost_rows[:5].tolist()}...)"))
    if extra_runs:
        findings.append(("SILENT", f"{stage}: runs {extra_runs} count, not committed"))
    changed = np.nonzero((got["state"] != want["state"]) & ~np.isin(np.arange(want_live.size), lost_rows))[0]
    if changed.size:
        findings.append(("SILENT", f"{stage}: {changed.size} row states differ ({changed[:5].tolist()}...)"))
    if not np.array_equal(got["labels"], want["labels"]):
        findings.append(("SILENT", f"{stage}: {int((got['labels'] != want['labels']).sum())} labels differ"))
    for field in ("finished", "committed_generation", "commit_note", "config"):
        if field in want and got.get(field) != want[field]:
            findings.append(("SILENT", f"{stage}: {field} {str(got.get(field))[:60]} instead of {str(want[field])[:60]}"))
    if "values" in want:
        both = np.nonzero(live & want_live)[0]
        wrong = both[(got["values"][both] != want["values"][both]).any(axis=1)]
        if wrong.size:
            error = float(np.abs(got["values"][wrong] - want["values"][wrong]).max())
            findings.append(("SILENT", f"{stage}: {wrong.size} of {both.size} rows wrong, by up to {error:.3g}"))
    return findings


def observe_unfinished(path, expected=None):
    """Read an unfinished recording as its users do: open 'r' + verify(); open 'r+'; finalize() + read every row.

    expected None: the steps' views (the reference, of an undamaged copy; problems raise).
    Otherwise (outcome, detail) against it: the worst finding of every step up to the first
    that raises (a StoreError or verify() problems: "detected"; another exception: "UNCAUGHT").
    """

    views, findings, held = {}, [], []

    def read_only():
        with gradstore.open(path) as store:
            problems = store.verify()
            if problems:
                raise gradstore.FormatError(f"verify(): {len(problems)} problems, first {json.dumps(problems[0])[:160]}")
            info = store.info()
            return {"runs": list(getattr(store, "runs", ())), "state": store.state.copy(), "labels": store.labels.copy(),
                    "finished": info["finished"], "committed_generation": info.get("committed_generation"),
                    "commit_note": info.get("commit_note")}

    def writable():  # what an r+ open left in the file: the runs it kept
        store = gradstore.open(path, "r+")
        held.append(store)
        runs = store.runs_in_file()
        return {"runs": runs, "state": store.state.copy(), "labels": store.labels.copy()}

    def finalize():
        finished = held[0].finalize()
        held.clear()  # the recording is closed now, whatever happens next
        with finished as store:
            live = np.nonzero(store.state == gradstore.RowState.LIVE)[0]
            values = np.zeros((store.num_keys, store.k), np.float32)
            if live.size:
                values[live] = store.read(live)
            return {"runs": [], "state": store.state.copy(), "labels": store.labels.copy(), "config": store.config,
                    "finished": True, "values": values}

    for stage, step in (("open r + verify", read_only), ("open r+", writable), ("finalize + read", finalize)):
        try:
            views[stage] = step()
        except StoreError as error:
            findings.append(("detected", f"{stage}: {type(error).__name__}: {str(error)[:200]}"))
            break
        except Exception as error:  # noqa: BLE001 - counting what escapes is the point
            findings.append(("UNCAUGHT", f"{stage}: {type(error).__name__}: {str(error)[:200]}"))
            break
        if expected is not None:
            findings += _compare(stage, views[stage], expected[stage])
    for store in held:  # a failed finalize: close (nothing was accumulated: close commits nothing)
        with contextlib.suppress(Exception):
            store.close()
    if expected is None:
        if findings:
            raise RuntimeError(f"the undamaged recording does not read back: {findings}")
        return [views]  # a list: isolated() sends a sequence
    order = ("DROPPED", "SILENT", "UNCAUGHT", "detected")
    findings.sort(key=lambda finding: order.index(finding[0]))
    return (findings[0][0], "; ".join(text for _, text in findings)[:800]) if findings else ("unaffected", "")


def _flip(flip, xor, where, attribute=None, byte=None):
    target = "" if attribute is None else f"{attribute['run']}/{attribute['name']} byte {byte} of {attribute['size']}"
    return {"offset": flip, "xor": xor, "where": where, "target": target}


def targeted_flips(regions, which="every byte"):
    """Flips of each staging run's `committed` and `generation` attribute messages.

    "every byte": each byte of both messages XOR 0x01 (--targeted). "key bytes", 6 a run:
    `committed`'s message type (byte 0), name's first byte and value XOR 0x01; `generation`'s
    name's first byte XOR 0x01, its value's low byte XOR 0x04 (+4: past the last commit) and
    its sign bit (the value's last byte XOR 0x80).
    """
    flips = []
    for attribute in regions["attributes"]:
        if attribute["name"] not in ("committed", "generation"):
            continue
        if which == "every byte":
            picks = [(byte, 1) for byte in range(attribute["size"])]
        else:
            name, value = attribute["name_at"], attribute["value_at"]
            picks = ([(0, 1), (name, 1), (value, 1)] if attribute["name"] == "committed"
                     else [(name, 1), (value, 4), (value + 7, 0x80)])
        flips += [_flip(attribute["offset"] + byte, xor, "targeted", attribute, byte) for byte, xor in picks]
    return flips


def plan_flips(size, regions, trials, rng, targeted=False):
    """The flips, {offset, xor, where, target}: --targeted's first, then ``trials`` random ones, a third in each of
    the chunk frames, the staging runs' attribute messages and the rest of the file (XOR a random non-zero byte)."""
    flips = targeted_flips(regions) if targeted else []
    inside = np.zeros(size, np.bool_)
    for offset, length in regions["chunks"]:
        inside[offset : offset + length] = True
    attribute_bytes = np.concatenate([np.arange(a["offset"], a["offset"] + a["size"]) for a in regions["attributes"]])
    inside[attribute_bytes] = True
    elsewhere = np.nonzero(~inside)[0]
    for index in range(trials):
        where = PLACES[1 + index % 3]
        if where == "chunk frame":
            offset = pick_offset(size, regions["chunks"], True, rng)
        else:
            pool = attribute_bytes if where == "run attribute" else elsewhere
            offset = int(pool[rng.integers(pool.size)])
        owner = [a for a in regions["attributes"] if a["offset"] <= offset < a["offset"] + a["size"]]
        flips.append(_flip(offset, int(rng.integers(1, 256)), where, *((owner[0], offset - owner[0]["offset"]) if owner else ())))
    return flips


def _serve_flips(pipe, source, work, expected, flips):
    """In a child: each flip on a fresh copy, its (index, outcome, detail) sent as soon as it is known."""
    for index, flip in flips:
        path = Path(work) / f"damaged-{index}.h5"
        shutil.copyfile(source, path)
        with open(path, "r+b") as handle:
            handle.seek(flip["offset"])
            byte = handle.read(1)[0]
            handle.seek(flip["offset"])
            handle.write(bytes([byte ^ flip["xor"]]))
        try:
            outcome, detail = observe_unfinished(path, expected)
        except BaseException as error:  # noqa: BLE001
            outcome, detail = "UNCAUGHT", f"{type(error).__name__}: {error}"
        pipe.send((index, outcome, detail))
        for leftover in Path(work).glob(f"damaged-{index}.h5*"):
            leftover.unlink()
    pipe.close()


def run_flips(source, work, expected, flips, progress=print, timeout=120):
    """Every flip's result, read in forked children: one child serves flips until one kills it (a crash inside
    libhdf5, counted as CRASH, or a hang past ``timeout`` seconds, killed), then a new child goes on with the next.
    (One child per flip would spend a second each loading numba's compiled kernels.)"""
    context, results, todo = _forkserver(), {}, list(enumerate(flips))
    while todo:
        receive, send = context.Pipe(duplex=False)
        child = context.Process(target=_serve_flips, args=(send, str(source), str(work), expected, todo))
        child.start()
        send.close()
        while True:
            try:
                if not receive.poll(timeout):
                    child.kill()
                    raise EOFError
                index, outcome, detail = receive.recv()
            except EOFError:
                break
            results[index] = {**flips[index], "outcome": outcome, "detail": detail}
            if outcome not in ("unaffected", "detected"):
                progress(f"flip {index}: {json.dumps(results[index])}")
            if len(results) % 100 == 0:
                progress(f"{len(results)}/{len(flips)} flips: {dict(Counter(r['outcome'] for r in results.values()))}")
        child.join()
        todo = [(index, flip) for index, flip in todo if index not in results]
        if todo:  # the child died during todo[0]
            index, flip = todo.pop(0)
            code = child.exitcode
            why = (f"killed by signal {-code} ({signal.Signals(-code).name})" if code is not None and code < 0
                   else f"exited with status {code} without a result")
            results[index] = {**flip, "outcome": "CRASH", "detail": why}
            progress(f"flip {index}: {json.dumps(results[index])}")
            for leftover in Path(work).glob(f"damaged-{index}.h5*"):
                leftover.unlink()
    return [results[index] for index in range(len(flips))]


def prepare_unfinished(work, record_seed=3):
    """(the recording's path, the undamaged copy's views, its byte regions)."""
    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    source = work / "unfinished.h5"
    build_unfinished(source, record_seed)
    pristine = work / "pristine.h5"
    shutil.copyfile(source, pristine)
    payload = isolated(observe_unfinished, pristine)  # in a child, like every trial
    if not isinstance(payload[0], dict):
        raise RuntimeError(f"the undamaged recording cannot be read: {payload}")
    pristine.unlink()
    return source, payload[0], unfinished_regions(source)


def run_unfinished(work, trials, seed=0, targeted=False, flips=None, progress=print):
    """Build the recording and its reference, flip (``flips(size, regions)``, or planned from trials, seed and
    targeted) and read: (summary, results)."""
    started = time.perf_counter()
    source, expected, regions = prepare_unfinished(work)
    size = source.stat().st_size
    if flips is None:
        planned = plan_flips(size, regions, trials, np.random.default_rng(seed), targeted)
    else:
        planned = flips(size, regions)
    results = run_flips(source, work, expected, planned, progress)
    outcomes = {where: dict(Counter(r["outcome"] for r in results if r["where"] == where)) for where in PLACES}
    live = expected["finalize + read"]["state"] == gradstore.RowState.LIVE
    summary = {"flips": len(results), "seed": seed, "file_bytes": size, "staging_runs": len(regions["runs"]),
               "committed_runs": len(expected["open r+"]["runs"]), "live_rows": int(live.sum()),
               "outcomes": {where: counts for where, counts in outcomes.items() if counts},
               **{name: sum(r["outcome"] == outcome for r in results)
                  for name, outcome in (("silent", "SILENT"), ("dropped", "DROPPED"), ("uncaught", "UNCAUGHT"), ("crashes", "CRASH"))},
               "seconds": time.perf_counter() - started}
    return summary, results


def print_table(summary):
    names = ("unaffected", "detected", "SILENT", "DROPPED", "UNCAUGHT", "CRASH")
    print(f"{'flips in':<15}" + "".join(f"{name:>11}" for name in names))
    for where, counts in summary["outcomes"].items():
        print(f"{where:<15}" + "".join(f"{counts.get(name, 0):>11}" for name in names))


def main_unfinished(args):
    work = Path(args.out)
    summary, results = run_unfinished(work, args.trials, args.seed, args.targeted, progress=lambda line: print(line, flush=True))
    (work / "corrupt-unfinished-results.json").write_text(json.dumps({"summary": summary, "flips": results}, indent=1))
    print_table(summary)
    print(json.dumps(summary, indent=1))
    return 0 if summary["silent"] == summary["dropped"] == summary["uncaught"] == summary["crashes"] == 0 else 1


def main(args):
    if args.unfinished:
        return main_unfinished(args)
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
    parser.add_argument("--trials", type=int, default=1000, help="flipped copies to read (with --unfinished: random flips)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cost", action="store_true", help="skip measuring the checksums' cost")
    parser.add_argument("--unfinished", action="store_true",
                        help="flip bytes in an unfinished recording (as a crash leaves it): verify, r+ open, finalize, read")
    parser.add_argument("--targeted", action="store_true",
                        help="with --unfinished: also every byte of each staging run's committed and generation attributes")
    parser.add_argument("--out", default="out/corrupt")
