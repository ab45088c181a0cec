"""Bounded memory: recording a store much bigger than the process may hold.

A child process (so that its peak RSS and address-space limit are its own) warms up the
kernels, caps its address space a few hundred MiB above what it has mapped, then records
two epochs of ~400 MiB of raw float32 rows each with a 16 MiB write budget, finalizes,
checks a few rows, and reports how much its peak RSS grew.
"""

import os
import subprocess
import sys
import textwrap

import pytest

NUM_KEYS, NUM_PARAMS, KEEP = 13_440, 200_000, 0.04  # k = 8000: 13440 * 8000 * 4 B = 410 MiB per epoch
EPOCHS = 2
RSS_GROWTH_LIMIT_MIB = 200  # less than half of one epoch's raw data
ADDRESS_HEADROOM_MIB = 300

CHILD = textwrap.dedent(
    """
    import os, resource, sys, time
    import numpy as np
    import gradstore

    NUM_KEYS, NUM_PARAMS, KEEP, EPOCHS, HEADROOM_MIB = {num_keys}, {num_params}, {keep}, {epochs}, {headroom}
    workdir = sys.argv[1]

    def rows_for(keys, k, epoch):
        # cheap, deterministic, key-dependent rows; the epoch term makes every epoch different
        j = np.arange(k, dtype=np.int64)
        base = ((keys[:, None] * 31 + j) % 255 - 127).astype(np.float32) * np.float32(1e-3)
        return base + np.float32(epoch + 1) * np.float32(1e-4) * ((keys[:, None] + j) % 7).astype(np.float32)

    def vm_size_kib():
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1])

    # warm-up: compile / load every kernel and start every worker thread on a tiny store
    warm = gradstore.create(os.path.join(workdir, "warm.h5"), num_params=20_000, num_keys=400, keep=0.4, codec="int8", memory_budget=1 << 20)
    for epoch in range(2):
        for start in range(0, 400, 16):  # 16 rows a batch: the 1 MiB budget (32 rows) spills often
            keys = np.arange(start, start + 16)
            warm.accumulate(keys, rows_for(keys, warm.k, epoch))
    warm.commit()
    warm = warm.finalize()
    warm.read(np.arange(0, 400, 7))
    warm.close()
    del warm

    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    limit = (vm_size_kib() + HEADROOM_MIB * 1024) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    started = time.perf_counter()
    store = gradstore.create(os.path.join(workdir, "big.h5"), num_params=NUM_PARAMS, num_keys=NUM_KEYS, keep=KEEP, codec="int8", memory_budget=16 << 20)
    k = store.k
    raw_bytes = NUM_KEYS * k * 4
    assert raw_bytes > 2 * {rss_limit} * 2**20, "one epoch alone must exceed twice the RSS bound"
    assert raw_bytes * EPOCHS > 2 * HEADROOM_MIB * 2**20, "the data must exceed the address-space headroom"
    for epoch in range(EPOCHS):
        order = np.random.default_rng(epoch).permutation(NUM_KEYS)
        for start in range(0, NUM_KEYS, 256):
            keys = np.sort(order[start : start + 256])
            store.accumulate(keys, rows_for(keys, k, epoch))
    runs = store.info()["staging_runs"]
    store = store.finalize()

    check = np.array([0, 1, 777, 6400, NUM_KEYS - 1])
    got = store.read(check).astype(np.float64)
    expected = sum(rows_for(check, k, epoch).astype(np.float64) for epoch in range(EPOCHS))
    step = np.abs(expected).max() / 127  # int8 step bound whatever the block size
    assert np.abs(got - expected).max() <= 0.51 * step, np.abs(got - expected).max()
    info = store.info()
    assert info["rows_live"] == NUM_KEYS and info["staging_runs"] == 0
    store.close()
    size = os.path.getsize(os.path.join(workdir, "big.h5"))

    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("RAW_MIB_PER_EPOCH", raw_bytes / 2**20)
    print("RUNS", runs)
    print("FILE_MIB", size / 2**20)
    print("SECONDS", round(time.perf_counter() - started, 1))
    print("BASELINE_MIB", baseline_kib / 1024)
    print("PEAK_GROWTH_MIB", (peak_kib - baseline_kib) / 1024)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status; ru_maxrss in KiB")
def test_recording_memory_is_bounded(tmp_path):
    script = CHILD.format(
        num_keys=NUM_KEYS, num_params=NUM_PARAMS, keep=KEEP, epochs=EPOCHS, headroom=ADDRESS_HEADROOM_MIB, rss_limit=RSS_GROWTH_LIMIT_MIB
    )
    env = dict(os.environ, MALLOC_ARENA_MAX="2", NUMBA_NUM_THREADS="2")
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"child failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-4000:]}"
    report = dict(line.split(maxsplit=1) for line in result.stdout.splitlines() if line.split()[:1] and line.split()[0].isupper())
    growth = float(report["PEAK_GROWTH_MIB"])
    raw_per_epoch = float(report["RAW_MIB_PER_EPOCH"])
    print(result.stdout)
    assert raw_per_epoch > 2 * RSS_GROWTH_LIMIT_MIB
    assert int(report["RUNS"]) >= EPOCHS * 10, "the budget must have forced spilled runs"
    assert growth < RSS_GROWTH_LIMIT_MIB, f"peak RSS grew by {growth:.0f} MiB recording {EPOCHS} x {raw_per_epoch:.0f} MiB"
