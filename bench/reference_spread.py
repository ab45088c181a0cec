"""`python -m bench.reference_spread --seed 0 --retrain-seeds 100 101 102`: how far apart models retrained without the
same poisoned samples land (issue 24's targets compare a removal with one retrained model).

Reads the poisoned run that `python -m bench diagnose --keep-stores` left in --diagnose-dir/seed<seed> (its split,
its poison and its reference retrained with the run's own seed), then trains from scratch without the poisoned
samples once per --retrain-seeds value (that seed draws the initial weights and the batch order; the data and the
options are the run's). Prints and writes, for the run's reference and each retraining: ASR (and its worst source
class), target-class accuracy and test accuracy, and their spread. Each retraining is cached beside the run as
reference-spread<seed>.npy with a JSON marker holding the options.
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from unlearn.runs import data as datasets
from unlearn.runs.models import build_model

from .diagnose import figures
from .memorised import cached_training, load_seed


def retrained(seed_dir: Path, config: dict, data, training_seed: int) -> tuple[np.ndarray, float]:
    """Weights trained from scratch without the poisoned samples, with ``training_seed`` (cached)."""
    return cached_training(seed_dir, f"reference-spread{training_seed}",
                           {"config": config, "training_seed": training_seed},
                           datasets.exclude(data, samples=data.poison.keys), config, training_seed, data)


def row(name: str, result: dict) -> dict:
    worst = max(result["asr_by_source"].items(), key=lambda item: item[1])
    return {"model": name, "asr": result["asr"], "worst_source": worst[0], "worst_asr": worst[1],
            "target_class_acc": result["target_class_acc"], "ta": result["ta"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.reference_spread", description=__doc__.split("\n\n")[0])
    parser.add_argument("--diagnose-dir", default="out/diagnose")
    parser.add_argument("--seed", type=int, default=0, help="the diagnosed run (its folder seed<seed>)")
    parser.add_argument("--retrain-seeds", type=int, nargs="+", default=[100, 101, 102])
    parser.add_argument("--out", help="folder for reference_spread.{json,md} (default: print only)")
    args = parser.parse_args(argv)
    seed_dir, config, data, trained, reference = load_seed(args.seed, Path(args.diagnose_dir))
    model = build_model("simple", data.in_channels, data.num_classes, seed=args.seed).eval()
    rows = [row("after train (poisoned)", figures(model, trained, data)),
            row(f"retrained, seed {args.seed} (the run's reference)", figures(model, reference, data))]
    seconds = {}
    for training_seed in args.retrain_seeds:
        weights, seconds[training_seed] = retrained(seed_dir, config, data, training_seed)
        rows.append(row(f"retrained, seed {training_seed}", figures(model, weights, data)))
        print(f"seed {training_seed}: target class {rows[-1]['target_class_acc']:.3f}, TA {rows[-1]['ta']:.3f}, "
              f"ASR {rows[-1]['asr']:.3f}")
    spread = {field: {"min": min(r[field] for r in rows[1:]), "max": max(r[field] for r in rows[1:]),
                      "mean": statistics.fmean(r[field] for r in rows[1:]),
                      "std": statistics.pstdev(r[field] for r in rows[1:])}
              for field in ("asr", "target_class_acc", "ta")}
    lines = ["| model | ASR (worst source) | target class | TA |", "|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['asr']:.3f} ({r['worst_source']}: {r['worst_asr']:.3f}) | "
              f"{r['target_class_acc']:.3f} | {r['ta']:.3f} |" for r in rows]
    lines += [f"| retrained models: min-max (std) | {spread['asr']['min']:.3f}-{spread['asr']['max']:.3f} | "
              f"{spread['target_class_acc']['min']:.3f}-{spread['target_class_acc']['max']:.3f} "
              f"({spread['target_class_acc']['std']:.3f}) | {spread['ta']['min']:.3f}-{spread['ta']['max']:.3f} "
              f"({spread['ta']['std']:.3f}) |"]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "reference_spread.md").write_text(table)
        (out / "reference_spread.json").write_text(json.dumps(
            {"command": "python -m bench.reference_spread " + " ".join(sys.argv[1:] if argv is None else argv),
             "seed": args.seed,
             "rows": rows, "spread": spread, "seconds": seconds}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
