"""`python -m bench scatter STORE...`: scatter_add of every row of each store, timed side by side in rounds.

`bench store` times each store's scatter three times, one store after another: on a shared machine a burst of
load lands on one codec and not on the next, and its per-run ratios spread from 0.7 to 1.2. Here every round
times each store once, in an order rotated from round to round, and the figure kept is the median over rounds
of each store's ratio to a baseline store of the same p measured in the same round (issue 25's target: packed
codecs at least int8's values a second, end to end: read, zstd, decode and scatter).
"""

import statistics
import time
from pathlib import Path

import numpy as np

import gradstore

from .store import set_threads


def scatter_seconds(store, flat: np.ndarray, keys: np.ndarray) -> float:
    started = time.perf_counter()
    store.scatter_add(flat, keys, 1.0)
    return time.perf_counter() - started


def run(paths: list[Path], rounds: int, baseline: str, log=print) -> list[dict]:
    """Each store's values a second over ``rounds`` rounds, and its per-round ratio to the baseline codec's store
    of the same p (its median and spread)."""
    stores = [gradstore.open(path) for path in paths]
    try:
        described = [{"path": str(path), "codec": store.codec.codec_id, "keep": float(store.keep),
                      "rows": int(store.num_keys), "k": int(store.k)} for path, store in zip(paths, stores)]
        for entry in described:
            if not any(other["codec"] == baseline and other["keep"] == entry["keep"] for other in described):
                raise SystemExit(f"{entry['path']}: no {baseline} store of p = {entry['keep']} among the stores "
                                 "given, to measure it against")
        flats = [np.zeros(store.num_params, np.float32) for store in stores]
        keys = [np.arange(store.num_keys) for store in stores]
        for store, flat, key in zip(stores, flats, keys):  # compile and warm the page cache once
            scatter_seconds(store, flat, key)
        seconds = np.zeros((rounds, len(stores)))
        for r in range(rounds):
            for i in np.roll(np.arange(len(stores)), r):
                seconds[r, i] = scatter_seconds(stores[i], flats[i], keys[i])
    finally:
        for store in stores:
            store.close()
    values = np.array([entry["rows"] * entry["k"] for entry in described], np.float64)
    rate = values[None, :] / seconds / 1e6  # Mvalues/s, [rounds, stores]
    results = []
    for i, entry in enumerate(described):
        base = next(j for j, other in enumerate(described) if other["codec"] == baseline and other["keep"] == entry["keep"])
        ratios = rate[:, i] / rate[:, base]
        results.append({**entry, "rounds": rounds, "mvalues_s_median": float(np.median(rate[:, i])),
                        "mvalues_s_min": float(rate[:, i].min()), "mvalues_s_max": float(rate[:, i].max()),
                        "ratio_to_baseline_median": float(np.median(ratios)),
                        "ratio_to_baseline_quartiles": [float(q) for q in np.quantile(ratios, [0.25, 0.75])],
                        "rounds_at_least_baseline": int((ratios >= 1).sum()), "baseline": baseline})
    return results


def markdown(results: list[dict]) -> str:
    lines = ["| p | codec | rows x k | Mvalues/s, median (min-max) | ratio to the baseline, median (quartiles) | "
             "rounds at least the baseline |", "|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["keep"], r["codec"] != r["baseline"], r["codec"])):
        q = r["ratio_to_baseline_quartiles"]
        lines.append(f"| {r['keep']:g} | {r['codec']} | {r['rows']} x {r['k']} | {r['mvalues_s_median']:.0f} "
                     f"({r['mvalues_s_min']:.0f}-{r['mvalues_s_max']:.0f}) | {r['ratio_to_baseline_median']:.2f} "
                     f"({q[0]:.2f}-{q[1]:.2f}) | {r['rounds_at_least_baseline']} of {r['rounds']} |")
    return "\n".join(lines) + "\n"


def main(args) -> int:
    import json

    if args.rounds < 1:
        raise SystemExit(f"--rounds must be at least 1, got {args.rounds}")
    if args.threads:
        set_threads(args.threads)
    results = run([Path(p) for p in args.stores], args.rounds, args.baseline)
    table = markdown(results)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "scatter.json").write_text(json.dumps(results, indent=1))
        (out / "scatter.md").write_text(table)
    return 0


def add_arguments(parser) -> None:
    parser.add_argument("stores", nargs="+", help="finished stores (e.g. the ones `bench store --out` keeps)")
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--baseline", default="int8", help="the codec each store is measured against (same p)")
    parser.add_argument("--threads", type=int, help="numba and zstd threads (default: every CPU); 1: per core")
    parser.add_argument("--out", help="folder for scatter.{json,md}")
