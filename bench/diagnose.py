"""`python -m bench diagnose`: why a backdoor outlives the removal of its rows: the random mask, or first-order
subtraction itself? (issue 24, "diagnose before designing").

One poisoned training run per seed (the study's poisoned split: 100 samples with a 4x4 patch relabelled to the
target; the seed's CNN, Adam, 4 epochs), recorded as the project records it (update rows, p = 0.01, int8, through
``attach``), and beside it, for the poisoned samples only, their **dense** rows: each step's per-sample gradient
(torch.func, with the 1/B of the mean loss) at every parameter, and times the optimizer's preconditioner after the
step (the update flavour), summed over epochs: the rows a store at p = 1 would hold for them (38 MB for 100 rows of
the CNN, where a p = 1 store of every sample would be 23 GB).

Removal variants, each swept over steps (``--grid``: the step times p, where rows of every p agree):
- dense (p = 1): w + s * (sum of the dense rows): s = 1 undoes the poison's updates to first order exactly;
- masked p = 0.1 and 0.01, from the dense rows through the store's own masks (seed, key), fp32: the mask alone;
- the int8 store (p = 0.01): the mask and the codec, as recorded.
Each point: ASR overall and by source class (triggered test images of each other class read as the target:
"trigger shifting" hides in one figure), target-class accuracy, TA; against the model retrained without the poison.
The int8 store's rows are checked against the dense ones at its positions (the two records of one run must agree).
Writes diagnose.json and diagnose.md under --out.
"""

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import gradstore
from unlearn import attach, create_recorder
from unlearn.evaluation import MIA_METHOD, accuracy, predict
from unlearn.params import flat_params, load_flat_params
from unlearn.recording import distributed
from unlearn.recording.per_sample import per_sample_grads
from unlearn.recording.preconditioner import Preconditioner
from unlearn.runs.config import PER_SAMPLE
from unlearn.runs.models import build_model

from .study import record as study_record

STORE = "update-p0.01-int8.h5"


def source_asr(model, data) -> dict:
    """{source class: share of its triggered test images predicted as the target}, and the overall ASR."""
    poison = data.poison
    others = data.test_y != poison.target
    triggered = poison.trigger.apply(data.test_x[others])
    predicted = predict(model, triggered).argmax(1).numpy()
    sources = data.test_y[others]
    by_source = {int(c): float((predicted[sources == c] == poison.target).mean()) for c in np.unique(sources)}
    return {"asr": float((predicted == poison.target).mean()), "asr_by_source": by_source}


def figures(model, weights, data) -> dict:
    load_flat_params(model, weights)
    target = data.test_y == data.poison.target
    return {**source_asr(model, data), "target_class_acc": accuracy(model, data.test_x[target], data.test_y[target]),
            "ta": accuracy(model, data.test_x, data.test_y)}


def train_watching(seed, config, data, seed_dir, log):
    """The poisoned run, recorded at p = 0.01 int8 (update rows) and, for the poisoned keys, dense rows of both
    flavours. Returns (trained flat weights, {"grad": [n, M], "update": [n, M]} float64, seconds)."""
    torch.manual_seed(seed)
    model = build_model("simple", data.in_channels, data.num_classes, seed=seed)
    params = list(model.parameters())
    watched = np.asarray(data.poison.keys, np.int64)
    row_of = {int(key): i for i, key in enumerate(watched)}
    size = sum(p.numel() for p in params)
    dense = {"grad": np.zeros((watched.size, size)), "update": np.zeros((watched.size, size))}
    recorder = create_recorder(seed_dir / STORE, PER_SAMPLE, model, len(data), keep=0.01, codec="int8",
                               flavour="update", seed=seed, overwrite=True)
    optimizer, _ = attach(model, torch.optim.Adam(params, lr=1e-3), None, [recorder])
    batches = distributed.global_batches(len(data), config["batch_size"], torch.Generator().manual_seed(seed))
    inputs, targets = torch.as_tensor(data.train_x), torch.as_tensor(data.train_y)
    started = time.perf_counter()
    model.train()
    for epoch in range(config["epochs"]):
        for batch in batches:
            keys = np.asarray(batch, np.int64)
            x, y = inputs[keys], targets[keys]
            optimizer.zero_grad()
            optimizer.set_batch(keys, y.numpy())
            here = [i for i, key in enumerate(keys) if int(key) in row_of]
            if here:  # the poisoned samples' whole gradients, at the weights this step starts from
                grads = per_sample_grads(model, x[here], y[here], loss_scale=1.0 / len(keys)).double().numpy()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
            if here:  # the update flavour's preconditioner, as the recorder reads it: after the step
                m = Preconditioner(optimizer.original_optimizer, params).flat().double().numpy()
                for row, i in enumerate(here):
                    dense["grad"][row_of[int(keys[i])]] += grads[row]
                    dense["update"][row_of[int(keys[i])]] += grads[row] * m
        log(f"seed {seed}: epoch {epoch + 1}/{config['epochs']} done ({time.perf_counter() - started:.0f} s)")
    optimizer.finish()
    model.eval()
    return flat_params(model), dense, time.perf_counter() - started


def masked_sum(dense: np.ndarray, keys: np.ndarray, seed: int, keep: float) -> np.ndarray:
    """The sum of the rows a store at ``keep`` would hold for ``keys`` (its masks: (seed, key)), fp32, in [M]."""
    size = dense.shape[1]
    if keep >= 1.0:
        return dense.sum(0).astype(np.float32)
    k = gradstore.keep_to_k(keep, size)
    positions = gradstore.masks.positions_many(seed, keys, size, k)
    total = np.zeros(size)
    for row, where in enumerate(positions):
        np.add.at(total, where, dense[row, where])
    return total.astype(np.float32)


def store_check(path, dense_update, keys, seed):
    """The int8 store's rows of the poisoned keys against the dense update rows at its positions: relative error."""
    with gradstore.open(path) as store:
        rows = store.read(keys)
        positions = gradstore.masks.positions_many(seed, keys, store.num_params, store.k)
        vector = np.zeros(store.num_params, np.float32)
        for row, where in zip(rows, positions):
            np.add.at(vector, where, row)
    expected = np.stack([dense_update[i, where] for i, where in enumerate(positions)])
    error = float(np.abs(rows - expected).max() / np.abs(expected).max())
    return vector, error


def search_signal(path, keys, named_share=0.25, seed=0):
    """Is there, in the int8 store alone, a signal that finds the poisoned rows nobody named? With a quarter of
    them named: the AUC, against the clean rows of the same label, of each unnamed poisoned row's cosine (over its
    own positions) with the named rows' mean less a same-label control's mean, and of its norm alone."""
    rng = np.random.default_rng([seed, 24])
    named = np.sort(rng.choice(keys, max(1, int(round(named_share * keys.size))), replace=False))
    unnamed = np.setdiff1d(keys, named)
    with gradstore.open(path) as store:
        labels = np.asarray(store.labels)
        clean = np.setdiff1d(np.flatnonzero(np.isin(labels, np.unique(labels[named]))), keys)
        control = np.sort(rng.choice(clean, min(2000, clean.size), replace=False))

        def summed(chosen):
            total = np.zeros(store.num_params, np.float32)
            store.scatter_add(total, chosen, 1.0)
            return total.astype(np.float64) / chosen.size

        towards = summed(named) - summed(control)
        scored = np.concatenate([unnamed, clean])
        rows = store.read(scored).astype(np.float64)
        positions = gradstore.masks.positions_many(store.seed, scored, store.num_params, store.k)
        there = towards[positions]
        norms = np.linalg.norm(rows, axis=1)
        cosine = np.einsum("ij,ij->i", rows, there) / np.maximum(norms * np.linalg.norm(there, axis=1), 1e-30)
    poisoned = np.isin(scored, unnamed)

    def auc(score):
        return float((score[poisoned][:, None] > score[~poisoned][None, :]).mean())

    return {"named": int(named.size), "unnamed": int(unnamed.size), "clean_same_label": int(clean.size),
            "auc_cosine": auc(cosine), "auc_norm": auc(norms)}


def sweep(model, trained, removal, keep, grid, data):
    """Points of w + (c / p) * removal for each c of ``grid``."""
    return [{"step": float(c / keep), "c": float(c), **figures(model, trained + np.float32(c / keep) * removal, data)}
            for c in grid]


def run_seed(seed, config, args, out, log):
    seed_dir = out / f"seed{seed}"
    seed_dir.mkdir(parents=True, exist_ok=True)
    data = study_record.poisoned_data(config, seed)
    keys = np.asarray(data.poison.keys, np.int64)
    marker = seed_dir / "trained.json"
    if marker.exists() and (seed_dir / STORE).exists() and json.loads(marker.read_text()).get("config") == config:
        with np.load(seed_dir / "trained.npz", allow_pickle=False) as saved:  # the run of these options, again
            trained, dense = saved["trained"], {"grad": saved["grad"], "update": saved["update"]}
        seconds = json.loads(marker.read_text())["seconds"]
    else:
        trained, dense, seconds = train_watching(seed, config, data, seed_dir, log)
        np.savez(seed_dir / "trained.npz", trained=trained, **dense)
        marker.write_text(json.dumps({"config": config, "seconds": seconds}))
    retrained, retrain_seconds = study_record.reference_model("poisoned", seed, config, seed_dir, data, log)
    model = build_model("simple", data.in_channels, data.num_classes, seed=seed).eval()
    entry = {"train_seconds": seconds, "retrain_seconds": retrain_seconds, "poisoned_keys": keys.tolist(),
             "after train": figures(model, trained, data), "retrain": figures(model, retrained, data), "variants": {}}
    int8, error = store_check(seed_dir / STORE, dense["update"], keys, seed)
    entry["int8_rows_vs_dense_relative_error"] = error
    entry["dense_norms"] = {flavour: float(np.linalg.norm(rows.sum(0))) for flavour, rows in dense.items()}
    for flavour in args.flavours:
        for keep in args.keeps:
            removal = masked_sum(dense[flavour], keys, seed, keep)
            name = f"{flavour} dense" if keep >= 1 else f"{flavour} masked p={keep:g} fp32"
            entry["variants"][name] = sweep(model, trained, removal, keep, args.grid, data)
            best = min(entry["variants"][name], key=lambda p: p["asr"] + max(0.0, entry["after train"]["ta"] - p["ta"]))
            log(f"seed {seed} {name}: best c {best['c']:g}: ASR {best['asr']:.3f}, target {best['target_class_acc']:.3f}, "
                f"TA {best['ta']:.3f}")
    entry["variants"]["update int8 store p=0.01"] = sweep(model, trained, int8, 0.01, args.grid, data)
    entry["search_signal"] = search_signal(seed_dir / STORE, keys, seed=seed)
    log(f"seed {seed}: search signal {entry['search_signal']}")
    if not args.keep_stores:
        for name in (STORE, "trained.npz", "trained.json"):
            (seed_dir / name).unlink()
    return entry


def markdown(results) -> str:
    lines = ["| seed | variant | c (step x p) | ASR | worst source (ASR) | target class | TA |", "|---" * 7 + "|"]
    for seed, entry in results["seeds"].items():
        for name in ("after train", "retrain"):
            r = entry[name]
            worst = max(r["asr_by_source"].items(), key=lambda item: item[1])
            lines.append(f"| {seed} | {name} | | {r['asr']:.3f} | {worst[0]} ({worst[1]:.3f}) | "
                         f"{r['target_class_acc']:.3f} | {r['ta']:.3f} |")
        for variant, points in entry["variants"].items():
            for p in points:
                worst = max(p["asr_by_source"].items(), key=lambda item: item[1])
                lines.append(f"| {seed} | {variant} | {p['c']:g} | {p['asr']:.3f} | {worst[0]} ({worst[1]:.3f}) | "
                             f"{p['target_class_acc']:.3f} | {p['ta']:.3f} |")
    return "\n".join(lines) + "\n"


def add_arguments(parser):
    parser.add_argument("--out", default="out/diagnose")
    parser.add_argument("--dataset", choices=["digits", "mnist"], default="mnist")
    parser.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DIR, else ../shared/data/mnist)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--poison", type=float, default=100, help="poisoned samples (a count, or a fraction below 1)")
    parser.add_argument("--keeps", type=float, nargs="+", default=[1.0, 0.1, 0.01], help="p of the variants (1: dense)")
    parser.add_argument("--flavours", nargs="+", default=["update", "grad"], choices=["update", "grad"])
    parser.add_argument("--grid", type=float, nargs="+", default=[0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
                        help="steps times p: 1 is the rows as recorded, scaled to the whole gradient")
    parser.add_argument("--keep-stores", action="store_true",
                        help="keep each seed's int8 store, weights and dense rows: a later run with the same options "
                             "sweeps them again without training")


def main(args):
    config = {
        "dataset": args.dataset, "data_dir": args.data_dir, "forget_class": 3,
        "keep_first": 100 if args.dataset == "mnist" else None, "epochs": args.epochs, "batch_size": 64,
        "optimizer": "adam", "keeps": [], "codecs": ["int8"], "flavours": ["grad", "update"], "layer_keep": 0.1,
        "sample_fraction": 0.01, "finetune_epochs": 0, "finetune_samples": 0, "seeds": args.seeds, "mia": MIA_METHOD,
        "progress": False, "engine": None, "requests": ["poisoned"], "poison": args.poison, "poison_seed": None,
        "poison_target": 0, "poison_keeps": [0.01],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"config": {**config, "keeps": args.keeps, "grid": args.grid}, "seeds": {}}
    for seed in args.seeds:
        results["seeds"][str(seed)] = run_seed(seed, config, args, out, print)
        (out / "diagnose.json").write_text(json.dumps(results, indent=1))
    (out / "diagnose.md").write_text(markdown(results))
    print(markdown(results))
    return 0
