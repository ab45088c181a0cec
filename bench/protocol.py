"""`python -m bench protocol`: the seed's MNIST protocol, every method side by side.

Per seed and class: one training run (SimpleModel, every other class + the first 100
samples of the class, Adam 1e-3, B=64) records into every store at once (per-sample
update/grad at several p, original, layer); a gold model is retrained without the
class; then each store forgets the class with NO fine-tune (scale 1 and scale auto),
next to a fine-tune-only control. Prints a table, writes protocol-results.json.
"""

import json
import sys
from pathlib import Path

import torch

import gradstore
import gradstore.codecs
from unlearn.runs import data as datasets
from unlearn.evaluation import accuracy
from unlearn.forgetting import apply_removal, plan_removal
from unlearn.runs.models import build_model
from unlearn.params import flat_params, load_flat_params
from unlearn.recording.recorders import create_recorder
from unlearn.runs.config import FLAVOURS, FP32, INT8, LAYER, ORIGINAL, PER_SAMPLE
from unlearn.runs.loop import train


def class_cells(model, data, cls):
    in_class = data.test_y == cls
    return accuracy(model, data.test_x[in_class], data.test_y[in_class]), accuracy(model, data.test_x[~in_class], data.test_y[~in_class])


def make_recorders(out_dir, model, data, config):
    steps = config["epochs"] * -(-len(data) // config["batch_size"])
    recorders = {}

    def add(name, filename, method, **options):
        recorders[name] = create_recorder(out_dir / filename, method, model, len(data), steps, seed=config["seed"],
                                          overwrite=True, **options)

    for flavour, keeps in (("update", config["keeps"]), ("grad", config["grad_keeps"])):
        for keep in keeps:
            for codec in config["codecs"]:
                add(f"per-sample {flavour} p={keep} {codec}", f"ps-{flavour}-{keep}-{codec}.h5", PER_SAMPLE,
                    keep=keep, codec=codec, flavour=flavour)
    if config["original"]:
        add(ORIGINAL, "original.h5", ORIGINAL, codec=FP32)
    for keep in config["layer_keeps"]:
        add(f"layer p={keep}", f"layer-{keep}.h5", LAYER, keep=keep, codec=FP32)
    return recorders


def run_one(seed, cls, config, out_dir, log=print):
    out_dir = Path(out_dir) / f"seed{seed}-class{cls}"
    out_dir.mkdir(parents=True, exist_ok=True)
    data = datasets.keep_first(datasets.load_dataset("mnist", config.get("data_dir")), cls, config["keep_first"])
    device = torch.device("cpu")
    model = build_model("simple", 1, 10, seed=seed)
    recorders = make_recorders(out_dir, model, data, {**config, "seed": seed})
    trained = train(model, data.train_x, data.train_y, config["epochs"], config["batch_size"], seed,
                    recorders=list(recorders.values()), device=device, description=f"seed {seed} class {cls} recording",
                    engine=config.get("engine", "masked"))
    gold_data = datasets.exclude(data, cls=cls)
    gold = build_model("simple", 1, 10, seed=seed)
    gold_run = train(gold, gold_data.train_x, gold_data.train_y, config["epochs"], config["batch_size"], seed,
                     device=device, description="gold (retrain without the class)")
    for recorder in recorders.values():
        recorder.store.close()
    rows = []
    after = class_cells(model, data, cls)
    gold_cells = class_cells(gold, data, cls)
    rows.append({"method": "after train", "forgotten": after[0], "rest": after[1], "seconds": trained["seconds"]})
    rows.append({"method": "gold (retrained from scratch)", "forgotten": gold_cells[0], "rest": gold_cells[1],
                 "seconds": gold_run["seconds"]})
    base = flat_params(model)
    control = build_model("simple", 1, 10, seed=seed)
    load_flat_params(control, base)
    keep = data.train_y != cls
    tuned = train(control, data.train_x[keep], data.train_y[keep], 1, config["batch_size"], seed + 1, device=device,
                  description="fine-tune-only control")
    cells = class_cells(control, data, cls)
    rows.append({"method": "fine-tune 1 epoch, no removal", "forgotten": cells[0], "rest": cells[1], "seconds": tuned["seconds"]})
    original_bytes = None
    for name, recorder in recorders.items():
        with gradstore.open(recorder.store.path) as store:
            removal = plan_removal(store, recorder.method, data, cls=cls)
            info = store.info()
        if name == ORIGINAL:
            original_bytes = info["bytes_on_disk"]
        scales = [1.0]
        if recorder.method == PER_SAMPLE or config["auto_for_baselines"]:
            scales.append("auto")
        for scale in scales:
            choice = apply_removal(model, base, removal, data, scale, seed=seed)
            cells = class_cells(model, data, cls)
            rows.append({
                "method": name, "scale": choice.scale, "auto": scale == "auto", "forgotten": cells[0], "rest": cells[1],
                "bytes_on_disk": info["bytes_on_disk"], "bytes_per_value": info["bytes_per_value"],
                "seconds": removal.seconds + choice.seconds,
                "scale_reached_target": choice.reached if scale == "auto" else None,
            })
            load_flat_params(model, base)
    for row in rows:
        if original_bytes and "bytes_on_disk" in row:
            row["ratio_vs_original"] = original_bytes / row["bytes_on_disk"]
        row.update(seed=seed, cls=cls, gold_forgotten=gold_cells[0], gold_rest=gold_cells[1])
    log(format_table(rows))
    return rows


def format_table(rows):
    lines = [f"{'method':<32}{'scale':>8}{'forgotten':>10}{'rest':>7}{'gap rest':>9}{'MB':>9}{'x smaller':>10}{'seconds':>9}"]
    for r in rows:
        scale = "" if "scale" not in r else (f"{r['scale']:.3g}" + ("*" if r["auto"] else ""))
        size = f"{r['bytes_on_disk'] / 1e6:.1f}" if "bytes_on_disk" in r else ""
        ratio = f"{r['ratio_vs_original']:.0f}" if "ratio_vs_original" in r else ""
        lines.append(f"{r['method']:<32}{scale:>8}{r['forgotten']:>10.3f}{r['rest']:>7.3f}"
                     f"{r['rest'] - r['gold_rest']:>+9.3f}{size:>9}{ratio:>10}{r['seconds']:>9.2f}")
    return "\n".join(lines) + "\n(* = scale chosen by scale='auto'; gap rest = rest - gold's rest)"


def summary_markdown(results, target_method="per-sample update p=0.01 int8"):
    """One line per (seed, class): the cells of every method, and whether the target holds."""
    by_run = {}
    for row in results:
        by_run.setdefault((row["seed"], row["cls"]), []).append(row)
    methods = []
    for rows in by_run.values():
        for row in rows:
            name = row["method"] + (" auto" if row.get("auto") else (" scale 1" if "scale" in row else ""))
            if name not in methods:
                methods.append(name)
    lines = ["| seed | class | " + " | ".join(methods) + f" | target ({target_method} auto) |",
             "|---" * (len(methods) + 3) + "|"]
    for (seed, cls), rows in sorted(by_run.items()):
        cells = {}
        for row in rows:
            name = row["method"] + (" auto" if row.get("auto") else (" scale 1" if "scale" in row else ""))
            cells[name] = f"{row['forgotten']:.3f}/{row['rest']:.3f}"
        ours = next(r for r in rows if r["method"] == target_method and r.get("auto"))
        met = ours["forgotten"] <= 0.01 and ours["rest"] >= ours["gold_rest"] - 0.01 and ours.get("ratio_vs_original", 0) >= 20
        verdict = f"{'met' if met else 'MISSED'} (rest gap {ours['rest'] - ours['gold_rest']:+.3f}, {ours.get('ratio_vs_original', 0):.1f}x smaller)"
        lines.append(f"| {seed} | {cls} | " + " | ".join(cells.get(m, "") for m in methods) + f" | {verdict} |")
    return "\n".join(lines)


def poisoned_request(args, out):
    """The poisoned request under the protocol's settings: the study's poisoned run (bench/study/), on MNIST with
    class 3 kept at its first 100 samples, int8 stores at the protocol's p, every method side by side."""
    from unlearn.evaluation import MIA_METHOD

    from . import study

    config = {
        "dataset": "mnist", "data_dir": args.data_dir, "forget_class": 3, "keep_first": 100, "epochs": args.epochs,
        "batch_size": 64, "optimizer": "adam", "keeps": [], "codecs": [INT8], "flavours": list(FLAVOURS),
        "layer_keep": (args.layer_keeps or [0.1])[0], "sample_fraction": 0.01, "finetune_epochs": 1,
        "finetune_samples": 10_000, "seeds": args.seeds, "mia": MIA_METHOD, "progress": False, "engine": args.engine,
        "requests": ["poisoned"], "poison": args.poison, "poison_seed": args.poison_seed,
        "poison_target": args.poison_target, "poison_keeps": sorted(set(args.keeps) | set(args.grad_keeps)),
    }
    return study.run(config, out, keep_stores=args.keep_stores, command="python -m bench " + " ".join(sys.argv[1:]))


def main(args):
    if args.summary:
        print(summary_markdown(json.loads((Path(args.out) / "protocol-results.json").read_text())))
        return 0
    config = {
        "epochs": args.epochs, "batch_size": 64, "keep_first": 100, "keeps": args.keeps, "grad_keeps": args.grad_keeps,
        "codecs": args.codecs, "original": not args.no_original, "layer_keeps": args.layer_keeps,
        "auto_for_baselines": False, "data_dir": args.data_dir, "engine": args.engine,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if "poisoned" in args.request:
        poisoned_request(args, out / "poisoned")
    if "class" not in args.request:
        return 0
    results_path = out / "protocol-results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["seed"], r["cls"]) for r in results}
    for seed in args.seeds:
        for cls in args.classes:
            if (seed, cls) in done:
                print(f"seed {seed} class {cls}: already in {results_path}, skipped")
                continue
            print(f"== seed {seed}, class {cls} ==")
            results += run_one(seed, cls, config, out)
            results_path.write_text(json.dumps(results, indent=2))
            if not args.keep_stores:
                for path in (out / f"seed{seed}-class{cls}").glob("*.h5"):
                    path.unlink()
    return 0


def add_arguments(parser):
    parser.add_argument("--request", nargs="+", default=["class"], choices=["class", "poisoned"],
                        help="class (default): forget --classes; poisoned: forget --poison backdoor samples "
                             "(the study's poisoned request, written under OUT/poisoned)")
    parser.add_argument("--poison", type=float, default=100, help="poisoned samples (a count, or a fraction below 1)")
    parser.add_argument("--poison-seed", type=int, help="seed of the poison's draw (default: each seed)")
    parser.add_argument("--poison-target", type=int, default=0, help="the poison's target label")
    parser.add_argument("--classes", type=int, nargs="+", default=[3], help="classes kept at 100 samples and forgotten")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.02], help="p of the per-sample update stores")
    parser.add_argument("--grad-keeps", type=float, nargs="*", default=[0.02], help="p of the per-sample grad stores")
    parser.add_argument("--codecs", nargs="+", default=[INT8], choices=list(gradstore.codecs.CODECS))
    parser.add_argument("--layer-keeps", type=float, nargs="*", default=[0.1])
    parser.add_argument("--engine", choices=["masked", "vmap"], default="masked", help="per-sample gradient engine")
    parser.add_argument("--no-original", action="store_true", help="skip the original method's (large) store")
    parser.add_argument("--keep-stores", action="store_true", help="keep the .h5 stores after measuring")
    parser.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DIR, else ../shared/data/mnist relative to the working directory)")
    parser.add_argument("--out", default="out/bench-protocol")
    parser.add_argument("--summary", action="store_true", help="print the markdown summary of --out's results and exit")
