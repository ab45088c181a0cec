"""`python -m bench footprint`: analytic storage of each method next to measured stores.

The original method stores every step's dense delta: steps * M values, about N*M*E/B.
Ours stores one row of round(p*M) values per sample: N*M*p. In fp32 ours is smaller
exactly when p < E/B (the seed's break-even condition); codecs move the line. One
training run records into every store at once; their files are measured on disk.
"""

import csv
import json
import math
from pathlib import Path

import numpy as np
import torch

import gradstore
from gradstore.codecs import CODECS, get_codec
from unlearn.runs import data as datasets
from unlearn.runs.models import build_model
from unlearn.recording.recorders import create_recorder
from unlearn.runs.loop import train
from unlearn.runs.config import LAYER, ORIGINAL, PER_SAMPLE, STEP_METHODS



def raw_bytes_per_value(codec: str, k: int = 1 << 16) -> float:
    """A registered codec's raw bytes a stored value (scales included, at a row of k values)."""
    return analytic_bytes(codec, 1, k) / k


def analytic_bytes(codec, rows, k):
    """Raw (uncompressed) bytes of ``rows`` rows of k values, scales included."""
    parts = get_codec(codec).parts(k)
    return rows * sum(part.width * part.dtype.itemsize for part in parts)


def record_all(data, config, out_dir):
    """One training run writing every store; returns {name: (method, keep, codec, path, rows)}."""
    model = build_model("simple", data.in_channels, data.num_classes, seed=config["seed"])
    num_params = sum(p.numel() for p in model.parameters())
    steps = config["epochs"] * math.ceil(len(data) / config["batch_size"])
    recorders, stores = [], {}

    def add(name, method, keep, codec, path, rows):
        recorders.append(create_recorder(path, method, model, len(data), steps, keep=keep, codec=codec,
                                         seed=config["seed"], overwrite=True))
        stores[name] = (method, keep, codec, path, rows)

    for keep in config["keeps"]:
        for codec in config["codecs"]:
            add(f"ours p={keep} {codec}", PER_SAMPLE, keep, codec, out_dir / f"per-sample-{keep}-{codec}.h5", len(data))
    add("original", ORIGINAL, 1.0, "fp32", out_dir / "original.h5", steps)
    add(f"layer p={config['layer_keep']}", LAYER, config["layer_keep"], "fp32", out_dir / "layer.h5", steps)
    train(model, data.train_x, data.train_y, config["epochs"], config["batch_size"], config["seed"],
          recorders=recorders, device=torch.device("cpu"), description="recording every method")
    for recorder in recorders:
        recorder.store.close()
    return stores, num_params, steps


def footprint(data, config, out_dir):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stores, num_params, steps = record_all(data, config, out_dir)
    entries = [(name, method, keep, codec, rows, path.stat().st_size) for name, (method, keep, codec, path, rows) in stores.items()]
    return tabulate(entries, len(data), num_params, config["epochs"], config["batch_size"], steps)


def from_study(study_dir):
    """The footprint of a finished `bench study` run: its stores come from one training run per seed (the first seed's)."""
    result = json.loads((Path(study_dir) / "results.json").read_text())
    config, cells = result["config"], result["cells"]
    seed = min(c["seed"] for c in cells)
    recorded = json.loads((Path(study_dir) / f"seed{seed}" / "recorded.json").read_text())
    entries = []
    for cell in cells:
        if cell["seed"] != seed or cell["task"] != "class" or cell.get("scale_mode") != "1":
            continue
        method = cell["method"]
        name = "original" if method == ORIGINAL else (f"layer p={cell['keep']}" if method == LAYER
                                                       else f"ours {cell['flavour']} p={cell['keep']} {cell['codec']}")
        rows = recorded["steps"] if method in STEP_METHODS else recorded["num_samples"]
        entries.append((name, method, cell["keep"], cell["codec"], rows, cell["bytes_on_disk"]))
    return tabulate(entries, recorded["num_samples"], recorded["num_params"], config["epochs"], config["batch_size"],
                    recorded["steps"])


def tabulate(entries, n, num_params, epochs, batch, steps):
    """Analytic bytes next to measured ones; entries: (name, method, keep, codec, rows, measured bytes)."""
    break_even = epochs / batch
    original_measured = next(measured for _, method, *_, measured in entries if method == ORIGINAL)
    table = []
    for name, method, keep, codec, rows, measured in entries:
        k = gradstore.keep_to_k(keep, num_params)
        row = {
            "store": name, "method": method, "keep": keep, "codec": codec, "rows": rows, "k": k,
            "analytic_bytes": analytic_bytes(codec, rows, k),
            "measured_bytes": measured,
            "measured_vs_original": original_measured / measured,
        }
        if method == PER_SAMPLE:
            row["predicted_smaller_fp32"] = keep < break_even
            row["analytic_smaller"] = row["analytic_bytes"] < analytic_bytes("fp32", steps, num_params)
            row["measured_smaller"] = measured < original_measured
        table.append(row)
    summary = {
        "N": n, "M": num_params, "E": epochs, "B": batch, "steps": steps, "break_even_p_fp32": break_even,
        "original_analytic_NME_over_B_bytes": n * num_params * epochs / batch * 4,
    }
    fp32_rows = sorted((r for r in table if r["method"] == PER_SAMPLE and r["codec"] == "fp32"), key=lambda r: r["keep"])
    checked = bool(fp32_rows)  # without fp32 stores there is nothing to check: None, printed "n/a"
    summary["break_even_holds_analytic"] = all(r["predicted_smaller_fp32"] == r["analytic_smaller"] for r in fp32_rows) if checked else None
    summary["break_even_holds_measured"] = all(r["predicted_smaller_fp32"] == r["measured_smaller"] for r in fp32_rows) if checked else None
    summary["measured_break_even_p_fp32"] = measured_crossing(fp32_rows, original_measured)
    return table, summary


def measured_crossing(rows, original_bytes):
    """The p at which ours (fp32, measured) reaches the original's measured bytes: log-log interpolation."""
    points = [(r["keep"], r["measured_bytes"]) for r in rows]
    for (p0, b0), (p1, b1) in zip(points, points[1:]):
        if (b0 - original_bytes) * (b1 - original_bytes) <= 0 and b0 != b1:
            t = (math.log(original_bytes) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return math.exp(math.log(p0) + t * (math.log(p1) - math.log(p0)))
    return None


def write_outputs(table, summary, out_dir):
    out_dir = Path(out_dir)
    with open(out_dir / "footprint.csv", "w", newline="") as handle:
        fields = list(table[0]) + [f for f in ("predicted_smaller_fp32", "analytic_smaller", "measured_smaller") if f not in table[0]]
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(table)
    (out_dir / "footprint.json").write_text(json.dumps({"summary": summary, "stores": table}, indent=2))
    plot(table, summary, out_dir / "footprint.png")


def plot(table, summary, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    keeps = sorted({r["keep"] for r in table if r["method"] == PER_SAMPLE})
    grid = np.geomspace(min(keeps) / 2, 1.0, 50)
    n, m = summary["N"], summary["M"]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    codecs = [codec for codec in CODECS if any(r["method"] == PER_SAMPLE and r["codec"] == codec for r in table)]
    for codec, colour in zip(codecs, colours):
        axes.plot(grid, n * m * grid * raw_bytes_per_value(codec), color=colour, lw=1, ls=":", label=f"ours analytic {codec} (N·M·p·b)")
        measured = sorted((r["keep"], r["measured_bytes"]) for r in table if r["method"] == PER_SAMPLE and r["codec"] == codec)
        if measured:
            axes.plot(*zip(*measured), "o-", color=colour, label=f"ours measured {codec}")
    original = next(r for r in table if r["method"] == ORIGINAL)
    axes.axhline(summary["original_analytic_NME_over_B_bytes"], color="k", ls=":", lw=1, label="original analytic (N·M·E/B·4)")
    axes.axhline(original["measured_bytes"], color="k", label="original measured (fp32 + zstd)")
    axes.axvline(summary["break_even_p_fp32"], color="grey", ls="--", lw=1, label="break-even p = E/B (fp32)")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("keep fraction p")
    axes.set_ylabel("bytes")
    axes.set_title(f"Footprint: N={n}, M={m}, E={summary['E']}, B={summary['B']}")
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _verdict(holds):
    return "n/a (no fp32 store)" if holds is None else ("holds" if holds else "does not hold")


def format_table(table, summary):
    crossing = summary["measured_break_even_p_fp32"]
    lines = [f"N={summary['N']} M={summary['M']} E={summary['E']} B={summary['B']} ({summary['steps']} steps): "
             f"break-even p = E/B = {summary['break_even_p_fp32']:.4f} for fp32; "
             f"raw sizes: {_verdict(summary['break_even_holds_analytic'])}; "
             f"measured files: {_verdict(summary['break_even_holds_measured'])}"
             + (f" (measured crossing at p = {crossing:.4f}: zstd shrinks the two stores differently)" if crossing else ""),
             f"{'store':<22}{'rows':>7}{'k':>8}{'analytic MB':>13}{'measured MB':>13}{'x smaller than original':>25}"]
    for r in table:
        lines.append(f"{r['store']:<22}{r['rows']:>7}{r['k']:>8}{r['analytic_bytes'] / 1e6:>13.2f}"
                     f"{r['measured_bytes'] / 1e6:>13.2f}{r['measured_vs_original']:>25.1f}")
    return "\n".join(lines)


def main(args):
    if args.from_study:
        table, summary = from_study(args.from_study)
        Path(args.out).mkdir(parents=True, exist_ok=True)
        write_outputs(table, summary, args.out)
        print(format_table(table, summary))
        print(f"wrote {Path(args.out) / 'footprint.csv'}, footprint.json, footprint.png")
        return 0
    split = datasets.load_dataset(args.dataset, args.data_dir)
    if args.samples:
        split = split.subset(np.arange(len(split)) < args.samples)
    config = {"epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "keeps": args.keeps,
              "codecs": args.codecs, "layer_keep": args.layer_keep}
    table, summary = footprint(split, config, args.out)
    write_outputs(table, summary, args.out)
    print(format_table(table, summary))
    print(f"wrote {Path(args.out) / 'footprint.csv'}, footprint.json, footprint.png")
    return 0


def add_arguments(parser):
    parser.add_argument("--dataset", choices=["digits", "mnist", "cifar100"], default="digits")
    parser.add_argument("--data-dir")
    parser.add_argument("--samples", type=int, help="use only the first N training samples")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--codecs", nargs="+", default=["fp32", "fp16", "int8"], choices=list(CODECS))
    parser.add_argument("--layer-keep", type=float, default=0.1)
    parser.add_argument("--from-study", metavar="DIR",
                        help="tabulate the stores a finished `bench study --out DIR` measured instead of recording anew")
    parser.add_argument("--out", default="out/bench-footprint")
