"""`python -m bench.frontier out/frontier/*/ --out docs/study-frontier`: issue 25's target across several study
folders (one per forgotten class, set of seeds or model): every per-sample store's class cell at scale auto, its
size against the original method's store of the same training run (or, where the study did not record it,
``--baselines computed``, against its size computed as steps x M x 4 bytes), and the verdict (>= 100x smaller at p >= 0.0025,
forgotten <= 0.01, rest at most 1 point below the retrained model's). Writes frontier.md and frontier.json.
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.study.report import SMALL_STORE_MIN_KEEP, SMALL_STORE_RATIO


def class_cells(folder: Path) -> list[dict[str, Any]]:
    """One row per (seed, per-sample store) of a study folder's class request, scale auto."""
    saved = json.loads((folder / "cells.json").read_text())
    cells, config = saved["cells"], saved["config"]
    rows = []
    for seed in sorted({cell["seed"] for cell in cells.values()}):
        def cell(row: str) -> dict[str, Any] | None:
            return cells.get(f"{seed}|class|{row}")

        original, retrain, after = cell("original|1"), cell("retrain"), cell("after train")
        if retrain is None:
            continue
        for key, value in sorted(cells.items()):
            if not key.startswith(f"{seed}|class|ours-") or value.get("scale_mode") != "auto":
                continue
            original_bytes = original["bytes_on_disk"] if original else value.get("original_bytes")
            ratio = original_bytes / value["bytes_on_disk"] if original_bytes else 0.0  # 0: no original to judge by
            gap = value["rest"] - retrain["rest"]
            misses = [what for what, ok in (("size", ratio >= SMALL_STORE_RATIO and value["keep"] >= SMALL_STORE_MIN_KEEP),
                                            ("forgotten", value["forgotten"] <= 0.01), ("rest", gap >= -0.01)) if not ok]
            rows.append({"folder": folder.name, "model": config.get("model", "simple"), "seed": seed,
                         "class": config["forget_class"], "store": value["row"],
                         "flavour": value["flavour"], "keep": value["keep"], "codec": value["codec"],
                         "mb": value["bytes_on_disk"] / 1e6, "original_mb": (original_bytes or 0) / 1e6,
                         "original_computed": original is None,
                         "ratio": ratio, "forgotten": value["forgotten"], "rest": value["rest"],
                         "retrain_rest": retrain["rest"], "rest_gap": gap, "scale": value["scale"],
                         "after_train": [after["forgotten"], after["rest"]] if after else None,
                         "met": not misses, "misses": misses})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | seed | class | store (scale auto) | MB | original MB | x smaller | forgotten | rest (retrained) | auto scale | target |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.get("model", "simple") != "simple", r["seed"], r["class"], -r["ratio"])):
        verdict = "met" if r["met"] else "missed: " + ", ".join(r["misses"])
        original = (f"{r['original_mb']:.1f}" + (" (computed, raw)" if r.get("original_computed") else "")
                    if r["original_mb"] else "no original measured")
        lines.append(f"| {r.get('model', 'simple')} | {r['seed']} | {r['class']} | {r['store']} | {r['mb']:.2f} | {original} | {r['ratio']:.0f} | "
                     f"{r['forgotten']:.3f} | {r['rest']:.3f} ({r['retrain_rest']:.3f}) | {r['scale']:.3g} | {verdict} |")
    if any(r.get("original_computed") for r in rows):
        lines += ["", "(computed, raw): the original method's store computed as steps x M x 4 bytes, as issue 25 "
                      "defines it for ResNet-18; the recorded original stores are zstd-compressed to about 0.66 of "
                      "that on SimpleModel, so a ratio against a computed size reads about 1.5x higher than one "
                      "against a recorded store would."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frontier", description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", help="study folders (each with cells.json)")
    parser.add_argument("--out", help="where frontier.md and frontier.json go (default: print only)")
    args = parser.parse_args(argv)
    missing = [folder for folder in args.folders if not (Path(folder) / "cells.json").exists()]
    if missing:
        raise SystemExit(f"no cells.json in {missing}: not study folders (or their study has not started)")
    rows = [row for folder in args.folders for row in class_cells(Path(folder))]
    table = markdown(rows)
    print(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "frontier.md").write_text(table)
        (out / "frontier.json").write_text(json.dumps({"command": "python -m bench.frontier " + " ".join(sys.argv[1:]),
                                                       "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
