"""`python -m bench backdoor`: where a poisoned request's rows carry the trigger, and what each way of removing them costs.

Per seed it reuses the study's poisoned run (bench/study/record.record_poisoned: the poisoned
split, int8 per-sample stores of both flavours at --poison-keeps, the model retrained without
the poison) and sweeps removal variants of each per-sample store over a grid of steps:
- rows: w + c * (sum of the poisoned rows), the study's "scale c";
- layer L: the same restricted to one parameter tensor, at 8 times the steps (one tensor alone
  moves the model less);
- projected once: the rows projected off the retained data's mean-output gradients at w;
- projected path: the path the sample rule walks (unlearn.forgetting.projection), segment by segment;
- auto: the sample rule's own choice (unlearn.forgetting.SampleRule, "samples"), then the fine-tune.
Each point: ASR, target-class test accuracy, TA (and the poisoned samples' accuracy on their
label). Writes backdoor.json, backdoor.md and backdoor-frontier.png (ASR against the target
class and against TA, one line per variant) under --out.
"""

import json
import time
from pathlib import Path

import numpy as np

import gradstore
from unlearn.evaluation import backdoor_metrics
from unlearn.evaluation import MIA_METHOD, accuracy
from unlearn.forgetting import SampleRule, apply_removal, plan_removal
from unlearn.params import flat_params, load_flat_params
from unlearn.forgetting.projection import ProjectedWalk, project_off, retained_output_basis

from .study import cells as study_cells
from .study import record as study_record
from unlearn.runs.config import PER_SAMPLE


def figures(model, weights, data):
    load_flat_params(model, weights)
    result = backdoor_metrics(model, data)
    result["ta"] = accuracy(model, data.test_x, data.test_y)
    return result


def sweep_store(store_path, trained, data, config, seed, log):
    """Every variant's points for one store: {variant: [{scale, asr, ...}]}."""
    model = study_cells.fresh_model(data, trained)
    keys = data.poison.keys
    with gradstore.open(store_path) as store:
        removal = plan_removal(store, PER_SAMPLE, data, samples=keys, seed=seed)
        keep = store.keep
    rows = removal.vector
    grid = [g / keep for g in config["grid"]]  # steps by c * p, where the rows of every p agree (issue 11)
    variants = {"rows": [(c, trained + np.float32(c) * rows) for c in grid]}
    offset = 0
    for name, parameter in model.named_parameters():
        size = parameter.numel()
        only = np.zeros_like(rows)
        only[offset : offset + size] = rows[offset : offset + size]
        variants[f"layer {name}"] = [(c * 8, trained + np.float32(c * 8) * only) for c in grid]
        offset += size
    retained = np.setdiff1d(np.arange(len(data)), keys)
    labels = np.unique(data.train_y[keys])
    basis = retained_output_basis(model, trained, data, retained, labels, np.random.default_rng([seed, 5]))
    projected = project_off(rows, basis).astype(np.float32)
    variants["projected once"] = [(c, trained + np.float32(c) * projected) for c in grid]
    segment = SampleRule().segment_share * float(np.linalg.norm(trained)) / float(np.linalg.norm(rows))
    walk = ProjectedWalk(model, trained, rows, removal.control, data, retained, labels, segment, seed=seed)
    path = []
    while walk.walked < config["path_segments"]:
        walk.project()
        walk.advance()
        path.append((walk.scale(), walk.start.copy()))
    variants["projected path"] = path
    points = {}
    for variant, candidates in variants.items():
        points[variant] = [{"scale": float(c), **figures(model, w, data)} for c, w in candidates]
    started = time.perf_counter()
    choice = apply_removal(model, trained, removal, data, "auto", seed=seed)
    auto = {"scale": choice.scale, "reached": choice.reached, "evidence": choice.evidence,
            **figures(model, flat_params(model), data), "seconds": time.perf_counter() - started}
    subset = study_cells.finetune_subset(config, seed, data, keys)
    study_cells.fine_tune(model, data, subset, config, seed)
    auto["after_finetune"] = figures(model, flat_params(model), data)
    points["auto"] = [auto]
    log(f"seed {seed} {store_path.name}: auto scale {choice.scale:.3g}, ASR {auto['asr']:.3f}, target "
        f"{auto['target_class_acc']:.3f}, TA {auto['ta']:.3f} (fine-tuned: ASR {auto['after_finetune']['asr']:.3f})")
    return points


def main(args):
    config = {
        "dataset": args.dataset, "data_dir": args.data_dir, "forget_class": 3,
        "keep_first": 100 if args.dataset == "mnist" else None, "epochs": args.epochs, "batch_size": 64,
        "optimizer": "adam", "keeps": [], "codecs": ["int8"], "flavours": ["grad", "update"], "layer_keep": 0.1,
        "sample_fraction": 0.01, "finetune_epochs": 1, "finetune_samples": 10_000 if args.dataset == "mnist" else 0,
        "seeds": args.seeds, "mia": MIA_METHOD, "progress": False, "engine": None, "requests": ["poisoned"],
        "poison": args.poison, "poison_seed": None, "poison_target": 0, "poison_keeps": args.poison_keeps,
    }
    sweep = {"grid": args.grid, "path_segments": args.path_segments}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"config": {**config, **sweep}, "seeds": {}}
    for seed in args.seeds:
        seed_dir = out / f"seed{seed}" / "poisoned"
        recorded = study_record.record_poisoned(seed, config, seed_dir, print)
        data = study_record.poisoned_data(config, seed)
        trained = np.load(seed_dir / "trained.npy", allow_pickle=False)
        retrained, _ = study_record.reference_model("poisoned", seed, config, seed_dir, data, print)
        model = study_cells.fresh_model(data, trained)
        entry = {"after train": figures(model, trained, data), "retrain": figures(model, retrained, data), "stores": {}}
        for name, store in recorded["stores"].items():
            if store["method"] == PER_SAMPLE:
                entry["stores"][name] = sweep_store(seed_dir / store["path"], trained, data, {**config, **sweep}, seed, print)
        results["seeds"][str(seed)] = entry
        (out / "backdoor.json").write_text(json.dumps(results, indent=1))
    (out / "backdoor.md").write_text(markdown(results))
    plot(results, out / "backdoor-frontier.png")
    print(markdown(results))
    return 0


def markdown(results):
    lines = ["| seed | store | variant | scale | ASR | poisoned-label acc | target-class acc | TA |", "|---" * 8 + "|"]
    for seed, entry in results["seeds"].items():
        for name in ("after train", "retrain"):
            r = entry[name]
            lines.append(f"| {seed} | | {name} | | {r['asr']:.3f} | {r['poisoned_label_acc']:.3f} | "
                         f"{r['target_class_acc']:.3f} | {r['ta']:.3f} |")
        for store, variants in entry["stores"].items():
            for variant, points in variants.items():
                for p in points:
                    lines.append(f"| {seed} | {store} | {variant} | {p['scale']:.3g} | {p['asr']:.3f} | "
                                 f"{p['poisoned_label_acc']:.3f} | {p['target_class_acc']:.3f} | {p['ta']:.3f} |")
                    if "after_finetune" in p:
                        f = p["after_finetune"]
                        lines.append(f"| {seed} | {store} | auto, then fine-tune | | {f['asr']:.3f} | "
                                     f"{f['poisoned_label_acc']:.3f} | {f['target_class_acc']:.3f} | {f['ta']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    for seed, entry in results["seeds"].items():
        for store, variants in entry["stores"].items():
            for variant, points in variants.items():
                style = "*" if variant == "auto" else ".-"
                for ax, field in zip(axes, ("target_class_acc", "ta")):
                    ax.plot([p["asr"] for p in points], [p[field] for p in points], style, ms=5, lw=0.8,
                            label=f"seed {seed} {store} {variant}")
        for ax, field in zip(axes, ("target_class_acc", "ta")):
            ax.plot(entry["retrain"]["asr"], entry["retrain"][field], "kD", ms=7)
    for ax, label in zip(axes, ("target-class test accuracy", "test accuracy (TA)")):
        ax.set_xlabel("attack success rate")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_title("every variant's steps (black diamond: retrained)", fontsize=9)
    axes[1].legend(fontsize=5, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def add_arguments(parser):
    parser.add_argument("--dataset", choices=["digits", "mnist"], default="mnist")
    parser.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DIR, else ../shared/data/mnist)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--poison", type=float, default=100, help="poisoned samples (a count, or a fraction below 1)")
    parser.add_argument("--poison-keeps", type=float, nargs="+", default=[0.01], help="p of the int8 stores swept")
    parser.add_argument("--grid", type=float, nargs="+", default=[0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16],
                        help="steps as c * p (the rows' scale times the store's p)")
    parser.add_argument("--path-segments", type=int, default=8, help="segments of the projected path swept")
    parser.add_argument("--out", default="out/backdoor")
