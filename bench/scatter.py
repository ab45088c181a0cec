"""`python -m bench scatter STORE...`: scatter_add of every row of each store, timed side by side in rounds.

`bench store` times each store's scatter three times, one store after another: on a shared machine a burst of
load lands on one codec and not on the next, and its per-run ratios spread from 0.7 to 1.2. Here every round
times each store once, in an order drawn afresh each round (seeded), and the figure kept is the median over rounds
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


def run(paths: list[Path], rounds: int, baseline: str, seed: int = 0) -> list[dict]:
    """Each store's values a second over ``rounds`` rounds (each round in its own seeded order), and its per-round
    ratio to the baseline codec's store of the same p (its median and spread)."""
    from contextlib import ExitStack

    from gradstore.format import RowState

    with ExitStack() as opened:
        stores = []
        for path in paths:
            store = gradstore.open(path)
            opened.callback(store.close)
            if not store.info()["finished"]:
                raise SystemExit(f"{path}: not a finished store (a recording): nothing to time")
            stores.append(store)
        keys = [np.flatnonzero(np.asarray(store.state) == RowState.LIVE) for store in stores]  # what scatters
        described = [{"path": str(path), "codec": store.codec.codec_id, "keep": float(store.keep),
                      "rows": int(live.size), "k": int(store.k)} for path, store, live in zip(paths, stores, keys)]
        for entry in described:
            bases = [other for other in described if other["codec"] == baseline and other["keep"] == entry["keep"]]
            if len(bases) != 1:
                raise SystemExit(f"{entry['path']}: {len(bases)} {baseline} stores of p = {entry['keep']} among the "
                                 "stores given; one is needed to measure it against")
        flats = [np.zeros(store.num_params, np.float32) for store in stores]
        for store, flat, key in zip(stores, flats, keys):  # compile and warm the page cache once
            scatter_seconds(store, flat, key)
        rng = np.random.default_rng(seed)
        seconds = np.zeros((rounds, len(stores)))
        for r in range(rounds):
            for i in rng.permutation(len(stores)):  # a new order each round: no store always follows the same one
                seconds[r, i] = scatter_seconds(stores[i], flats[i], keys[i])
                flats[i].fill(0.0)
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
                        "rounds_at_least_baseline": int((ratios >= 1).sum()), "baseline": baseline, "seed": seed})
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
    results = run([Path(p) for p in args.stores], args.rounds, args.baseline, getattr(args, "seed", 0))
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
    parser.add_argument("--seed", type=int, default=0, help="draws each round's order")
    parser.add_argument("--baseline", default="int8", help="the codec each store is measured against (same p)")
    parser.add_argument("--threads", type=int, help="numba and zstd threads (default: every CPU); 1: per core")
    parser.add_argument("--out", help="folder for scatter.{json,md}")
