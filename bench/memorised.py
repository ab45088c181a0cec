"""`python -m bench memorised`: the feature rule and ``find_similar`` on the diagnosed poisoned runs, against
retraining (issue 24, the backdoor part).

Per seed it reads the folder `python -m bench diagnose --keep-stores` left (the poisoned run's weights, its int8
update store at p = 0.01, the model retrained without the 100 poisoned samples) and, from the trained weights:
1. rows: after train; retrained without the poisoned samples (the reference every gap is taken to);
2. all poisoned samples named: step rule "samples" (what scale "auto" runs: the rows' projected path) and step
   rule "feature" (the head projected off the request's feature direction, unlearn/forgetting/rules/feature_rule.py);
3. a share of them named (``--named-share``, drawn with rng [seed, 25]): ``find_similar`` over every other
   training sample (found, precision and recall against the unnamed poisoned ones), then "feature" on the named
   and the found together, and "feature" on the named alone;
4. controls: the trained model fine-tuned on the retained data (``--finetune-epochs``, Adam lr 1e-3, batch 64);
   a model retrained from scratch without only the named share (cached as reference-named<n>.npy);
5. a random request (1% of the clean samples, rng [seed, 1]): "samples", ``find_similar`` and "feature" should
   all change nothing.
Each cell: ASR overall and its worst source class, target-class accuracy, TA, and their gaps to the retrained
model; the issue's targets are marked per seed. Writes memorised.json and memorised.md under --out.
"""

import json
import time
from pathlib import Path

import numpy as np
import torch

import gradstore
from unlearn.forgetting import apply_removal, find_similar, plan_removal
from unlearn.params import flat_params, load_flat_params
from unlearn.runs import data as datasets
from unlearn.runs.config import PER_SAMPLE
from unlearn.runs.loop import train
from unlearn.runs.models import build_model

from .diagnose import STORE, figures
from .study import record as study_record

DIAGNOSE_COMMAND = "python -m bench diagnose --seeds {seed} --keep-stores --out {out}"
ASR_POINTS = 0.05  # the targets: ASR within 5 points of retraining,
ACC_POINTS = 0.02  # TA and the target class within 2 points,
SEARCH_SHARE = 0.90  # the search: at least 90% recall at at least 90% precision


def check_seed(seed: int, diagnose_dir: Path):
    """(the seed's folder, the run's config), or SystemExit naming the diagnose command that makes them."""
    seed_dir = diagnose_dir / f"seed{seed}"
    needed = ["trained.json", "trained.npz", STORE, "reference-poisoned.npy", "reference-poisoned.json"]
    missing = [name for name in needed if not (seed_dir / name).exists()]
    command = DIAGNOSE_COMMAND.format(seed=seed, out=diagnose_dir)
    if missing:
        raise SystemExit(f"{seed_dir} lacks {', '.join(missing)}: bench memorised reads the poisoned run that "
                         f"`{command}` keeps; run that first (about 15 min a seed on a 2-vCPU VM)")
    config = json.loads((seed_dir / "trained.json").read_text())["config"]
    if study_record.read_marker(seed_dir / "reference-poisoned.json", config, "poisoned") is None:
        raise SystemExit(f"{seed_dir}/reference-poisoned.npy was retrained under other options than the run beside "
                         f"it: run `{command}` again")
    return seed_dir, config


def load_seed(seed: int, diagnose_dir: Path):
    """(folder, config, data, trained flat weights, retrained flat weights) of ``diagnose_dir``/seed<seed>."""
    seed_dir, config = check_seed(seed, diagnose_dir)
    data = study_record.poisoned_data(config, seed)
    with np.load(seed_dir / "trained.npz", allow_pickle=False) as saved:
        trained = np.asarray(saved["trained"], np.float32)
    retrained = np.asarray(np.load(seed_dir / "reference-poisoned.npy", allow_pickle=False), np.float32)
    return seed_dir, config, data, trained, retrained


def cell(model, weights, data, retrained_figures, **extra) -> dict:
    """The figures at ``weights`` and their gaps to the retrained model's."""
    result = figures(model, np.asarray(weights, np.float32), data)
    worst_class, worst = max(result["asr_by_source"].items(), key=lambda item: item[1])
    result["worst_source"] = {"class": int(worst_class), "asr": float(worst)}
    if retrained_figures is not None:
        reference_worst = max(retrained_figures["asr_by_source"].values())
        result["gaps"] = {"asr": result["asr"] - retrained_figures["asr"],
                          "worst_source_asr": worst - reference_worst,
                          "target_class_acc": result["target_class_acc"] - retrained_figures["target_class_acc"],
                          "ta": result["ta"] - retrained_figures["ta"]}
        result["targets"] = {"asr": abs(result["gaps"]["asr"]) <= ASR_POINTS,
                             "target_class_acc": abs(result["gaps"]["target_class_acc"]) <= ACC_POINTS,
                             "ta": abs(result["gaps"]["ta"]) <= ACC_POINTS}
    return {**result, **extra}


def rule_cell(store, model, trained, data, samples, rule, seed, retrained_figures, trained_weights_figures=None):
    """One step rule on a sample request, from the trained weights: its figures, report and seconds."""
    started = time.perf_counter()
    removal = plan_removal(store, PER_SAMPLE, data, samples=np.asarray(samples, np.int64), seed=seed)
    choice = apply_removal(model, trained, removal, data, rule, seed=seed, store=store)
    seconds = time.perf_counter() - started
    changed = bool(np.any(choice.change))
    return cell(model, choice.weights, data, retrained_figures, rule=rule, samples=int(len(samples)),
                changed=changed, change_norm=float(np.linalg.norm(choice.change)), scale=choice.scale,
                reached=choice.reached, seconds=seconds, rule_seconds=choice.seconds, report=choice.search())


def search_cell(model, trained, data, named, truth, seed) -> dict:
    """``find_similar`` for ``named`` among every other training sample, at the trained weights."""
    load_flat_params(model, trained)
    started = time.perf_counter()
    similar = find_similar(model, data.train_x, data.train_y, named, np.arange(len(data), dtype=np.int64), seed=seed)
    seconds = time.perf_counter() - started
    report = similar.report(truth)
    report.pop("found")
    report["found_keys"] = similar.found.tolist()
    report["seconds"] = seconds
    if truth is not None:
        report["targets"] = {"search": bool(report["recall"] is not None and report["precision"] is not None
                                            and report["recall"] >= SEARCH_SHARE
                                            and report["precision"] >= SEARCH_SHARE)}
    return report


def fine_tuned(model, trained, data, keep, epochs, seed):
    """The trained model after ``epochs`` of Adam (lr 1e-3, batch 64) on the samples ``keep``."""
    load_flat_params(model, trained)
    run = train(model, data.train_x[keep], data.train_y[keep], epochs, 64, seed, optimizer="adam", lr=1e-3,
                device=torch.device("cpu"), progress=False, description=f"seed {seed} fine-tune")
    model.eval()
    return flat_params(model), run["seconds"]


def retrained_without(named, seed, config, seed_dir, data, log):
    """A model trained from scratch (the run's options) without ``named``; cached as reference-named<n>.npy."""
    return cached_training(seed_dir, f"reference-named{named.size}", {"config": config, "named": named.tolist()},
                           datasets.exclude(data, samples=named), config, seed, data,
                           lambda: log(f"seed {seed}: retraining from scratch without the {named.size} named samples"))


def cached_training(seed_dir, name, expected, kept, config, training_seed, data, announce=lambda: None):
    """Weights trained from scratch on ``kept`` (the run's options, ``training_seed`` for the initial weights and
    the batch order), cached as seed_dir/<name>.npy beside a marker holding ``expected``. Returns (weights,
    seconds)."""
    weights, marker = seed_dir / f"{name}.npy", seed_dir / f"{name}.json"
    expected = json.loads(json.dumps(expected))
    if marker.exists() and weights.exists():
        saved = json.loads(marker.read_text())
        if {key: saved.get(key) for key in expected} == expected:
            return np.asarray(np.load(weights, allow_pickle=False), np.float32), saved["seconds"]
    announce()
    model = build_model("simple", data.in_channels, data.num_classes, seed=training_seed)
    run = train(model, kept.train_x, kept.train_y, config["epochs"], config["batch_size"], training_seed,
                device=torch.device("cpu"), progress=False, description=f"{name} (seed {training_seed})")
    np.save(weights, flat_params(model))
    study_record.write_json(marker, {**expected, "seconds": run["seconds"]})
    return flat_params(model), run["seconds"]


def run_seed(seed, args, log) -> dict:
    seed_dir, config, data, trained, retrained = load_seed(seed, Path(args.diagnose_dir))
    keys = np.asarray(data.poison.keys, np.int64)
    model = build_model("simple", data.in_channels, data.num_classes, seed=seed).eval()
    reference = cell(model, retrained, data, None)
    entry: dict = {"poisoned": int(keys.size), "target": int(data.poison.target), "cells": {}}
    cells = entry["cells"]

    def add(name, result):
        cells[name] = result
        g = result.get("gaps", {})
        log(f"seed {seed} {name}: ASR {result['asr']:.3f} (worst {result['worst_source']['class']}: "
            f"{result['worst_source']['asr']:.3f}), target {result['target_class_acc']:.3f}, TA {result['ta']:.3f}"
            + (f"; gaps ASR {g['asr']:+.3f}, target {g['target_class_acc']:+.3f}, TA {g['ta']:+.3f}" if g else ""))

    add("after train", cell(model, trained, data, reference))
    add("retrain", cell(model, retrained, data, reference, seconds=None))
    clean = np.setdiff1d(np.arange(len(data)), keys)
    named = np.sort(np.random.default_rng([seed, 25]).choice(keys, max(3, int(round(args.named_share * keys.size))),
                                                             replace=False))
    unnamed = np.setdiff1d(keys, named)
    randoms = np.sort(np.random.default_rng([seed, 1]).choice(clean, max(3, int(round(0.01 * clean.size))),
                                                              replace=False))
    entry.update({"named": named.tolist(), "random": randoms.tolist()})
    n = named.size
    with gradstore.open(seed_dir / STORE) as store:
        add(f"all {keys.size}: samples", rule_cell(store, model, trained, data, keys, "samples", seed, reference))
        add(f"all {keys.size}: feature", rule_cell(store, model, trained, data, keys, "feature", seed, reference))
        search = search_cell(model, trained, data, named, unnamed, seed)
        entry["search"] = search
        log(f"seed {seed} find_similar ({n} named): {search['num_found']} found, precision {search['precision']}, "
            f"recall {search['recall']} ({search['seconds']:.1f} s)")
        grown = np.union1d(named, np.asarray(search["found_keys"], np.int64))
        add(f"{n} named + found: feature",
            rule_cell(store, model, trained, data, grown, "feature", seed, reference))
        add(f"{n} named alone: feature", rule_cell(store, model, trained, data, named, "feature", seed, reference))
        random_search = search_cell(model, trained, data, randoms, None, seed)
        entry["random_search"] = random_search
        log(f"seed {seed} find_similar (random {randoms.size}): {random_search['num_found']} found")
        add(f"random {randoms.size}: samples",
            rule_cell(store, model, trained, data, randoms, "samples", seed, reference))
        add(f"random {randoms.size}: feature",
            rule_cell(store, model, trained, data, randoms, "feature", seed, reference))
    tuned, seconds = fine_tuned(model, trained, data, clean, args.finetune_epochs, seed)
    add(f"fine-tune {args.finetune_epochs} epoch(s) on the retained",
        cell(model, tuned, data, reference, seconds=seconds))
    without_named, seconds = retrained_without(named, seed, config, seed_dir, data, log)
    add(f"retrain without the {n} named", cell(model, without_named, data, reference, seconds=seconds))
    entry["targets"] = targets(entry, keys.size, n, randoms.size)
    return entry


def targets(entry, total, n, random_size) -> dict:
    """The issue's targets for this seed: {cell or check: met}."""
    cells = entry["cells"]
    met: dict = {}
    for name in (f"all {total}: samples", f"all {total}: feature", f"{n} named + found: feature"):
        for target, ok in cells[name]["targets"].items():
            met[f"{name}: {target}"] = ok
    met[f"find_similar ({n} named): recall and precision >= {SEARCH_SHARE:.0%}"] = entry["search"]["targets"]["search"]
    met[f"random {random_size}: unchanged (samples step 0, nothing found, feature step 0)"] = (
        not cells[f"random {random_size}: samples"]["changed"] and entry["random_search"]["num_found"] == 0
        and not cells[f"random {random_size}: feature"]["changed"])
    return met


def markdown(results) -> str:
    lines = []
    for seed, entry in results["seeds"].items():
        lines += [f"## seed {seed}", "",
                  "| cell | ASR | worst source (ASR) | target class | TA | ASR gap | target gap | TA gap | seconds "
                  "| note |",
                  "|---" * 10 + "|"]
        for name, c in entry["cells"].items():
            g = c.get("gaps", {})
            note = ""
            if "report" in c:
                coherence = c["report"].get("coherence")
                note = "changed" if c["changed"] else "step 0"
                if coherence:
                    note += f", coherence p {coherence['p_value']:.3g}"
                if c["report"].get("stopped_by"):
                    note += f", stopped by {c['report']['stopped_by']}"
                if c["rule"] == "samples":
                    note += f", scale {c['scale']:.3g}"
            seconds = c.get("seconds")
            lines.append(f"| {name} | {c['asr']:.3f} | {c['worst_source']['class']} ({c['worst_source']['asr']:.3f}) | "
                         f"{c['target_class_acc']:.3f} | {c['ta']:.3f} | {g['asr']:+.3f} | "
                         f"{g['target_class_acc']:+.3f} | "
                         f"{g['ta']:+.3f} | {'' if seconds is None else f'{seconds:.1f}'} | {note} |")
        s, r = entry["search"], entry["random_search"]
        precision = "n/a" if s["precision"] is None else f"{s['precision']:.3f}"
        recall = "n/a" if s["recall"] is None else f"{s['recall']:.3f}"
        coherence = s["coherence"]["p_value"] if s["coherence"] else None
        lines += ["", f"find_similar, {len(entry['named'])} of {entry['poisoned']} named: {s['num_found']} found, "
                      f"precision {precision}, recall {recall} of the {s['truth_unnamed']} unnamed (coherence p "
                      f"{coherence}, {s['rounds']} rounds, {s['seconds']:.1f} s); random request of "
                      f"{len(entry['random'])}: {r['num_found']} found"
                      + (f" ({r['why_nothing']})" if r.get("why_nothing") else ""), "",
                  "| target | met |", "|---|---|"]
        lines += [f"| {name} | {'yes' if ok else '**no**'} |" for name, ok in entry["targets"].items()]
        lines.append("")
    return "\n".join(lines)


def add_arguments(parser):
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 42])
    parser.add_argument("--diagnose-dir", default="out/diagnose",
                        help="where `bench diagnose --keep-stores` kept each seed's run (seed<N>/)")
    parser.add_argument("--out", default="out/memorised")
    parser.add_argument("--named-share", type=float, default=0.25,
                        help="the share of the poisoned samples named to find_similar")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="epochs of the fine-tune-only control")


def main(args):
    out = Path(args.out)
    for seed in args.seeds:  # every seed's run before any work
        check_seed(seed, Path(args.diagnose_dir))
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": {"diagnose_dir": str(args.diagnose_dir), "named_share": args.named_share,
                                "finetune_epochs": args.finetune_epochs, "asr_points": ASR_POINTS,
                                "acc_points": ACC_POINTS, "search_share": SEARCH_SHARE}, "seeds": {}}
    for seed in args.seeds:
        results["seeds"][str(seed)] = run_seed(seed, args, print)
        (out / "memorised.json").write_text(json.dumps(results, indent=1))
    (out / "memorised.md").write_text(markdown(results))
    print(markdown(results))
    return 0
