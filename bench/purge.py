"""`python -m bench purge`: how long erasing forgotten rows takes against the store's size.

For stores of growing size (int8, p = 0.1 of the seed's CNN, M = 95,110), 1% of the
rows (spread over the file) are marked forgotten and purged: the file is rewritten with
those rows zeroed, untouched chunks copied as they are. Reports seconds, MB/s of the
file, and the size before and after. (A purge's cost is a rewrite of the file: it grows
with the file, not with the number of rows erased.)
"""

import json
import time
from pathlib import Path

import numpy as np

import gradstore

NUM_PARAMS = 95_110


def measure(path, num_keys, forget_fraction, rng):
    store = gradstore.create(path, NUM_PARAMS, num_keys, 0.1, codec="int8", overwrite=True, memory_budget=512 << 20)
    for keys in np.array_split(np.arange(num_keys), max(1, num_keys // 2000)):
        store.accumulate(keys, (rng.standard_normal((keys.size, store.k)) * 1e-3).astype(np.float32))
    store = store.finalize()
    doomed = np.sort(rng.choice(num_keys, max(1, round(forget_fraction * num_keys)), replace=False))
    store.mark_forgotten(doomed)
    before = Path(path).stat().st_size
    started = time.perf_counter()
    purged = store.purge()
    seconds = time.perf_counter() - started
    store.close()
    after = Path(path).stat().st_size
    return {"rows": num_keys, "rows_purged": purged, "bytes_before": before, "bytes_after": after, "seconds": seconds,
            "MB_per_s": before / seconds / 1e6}


def main(args):
    if not 0 < args.forget_fraction <= 1:
        raise ValueError(f"--forget-fraction must be in (0, 1], got {args.forget_fraction}")
    if min(args.rows) < 1:
        raise ValueError(f"--rows must all be at least 1, got {min(args.rows)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    results = []
    print(f"{'rows':>8}{'purged':>8}{'MB before':>11}{'MB after':>10}{'seconds':>9}{'MB/s':>8}")
    for num_keys in args.rows:
        result = measure(out / "purge.h5", num_keys, args.forget_fraction, rng)
        results.append(result)
        print(f"{num_keys:>8}{result['rows_purged']:>8}{result['bytes_before'] / 1e6:>11.1f}{result['bytes_after'] / 1e6:>10.1f}"
              f"{result['seconds']:>9.2f}{result['MB_per_s']:>8.0f}")
    (out / "purge.h5").unlink()
    (out / "purge-results.json").write_text(json.dumps(results, indent=1))
    return 0


def add_arguments(parser):
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000, 8_000, 32_000], help="store sizes (rows of 9,511 values)")
    parser.add_argument("--forget-fraction", type=float, default=0.01)
    parser.add_argument("--out", default="out/purge")
