"""`python -m bench study [--quick] --out DIR`: the seed report's tables, every codec and flavour.

Per seed: one training run records every store (bench/study_record.py), models are
retrained from scratch without each request, then every store forgets (a) the seed's
class and (b) a random 1% of the training samples, with scale 1 and scale "auto"
(bench/study_cells.py). Each finished cell is appended to DIR/cells.json at once, so an
interrupted study resumes where it stopped. DIR/results.{md,csv,json} and the plots are
rewritten from every cell at the end (bench/study_report.py).

--quick: scikit-learn's bundled digits (no data files), one seed: a few minutes on 2 cores.
Default: the seed's MNIST protocol (class 3 kept at its first 100 samples, 4 epochs,
B = 64, Adam 1e-3), seeds 0 and 1.
"""

import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from unlearn.evaluation import MIA_METHOD

from . import study_cells, study_record, study_report

KEEPS = [0.2, 0.1, 0.075, 0.05, 0.02, 0.01]
CODECS = ["fp32", "fp16", "int8"]
FLAVOURS = ["grad", "update"]
REQUESTS = ["class", "samples", "poisoned"]


def build_config(args):
    quick = args.quick
    args.keeps = list(dict.fromkeys(args.keeps))  # a repeated p would name one store twice
    dataset = args.dataset or ("digits" if quick else "mnist")
    if args.keep_first is not None:
        keep_first = args.keep_first or None  # 0: keep every sample of the class
    else:
        keep_first = 100 if dataset == "mnist" else None  # the seed's MNIST protocol
    return {
        "dataset": dataset,
        "data_dir": args.data_dir,
        "forget_class": args.forget_class,
        "keep_first": keep_first,
        "epochs": args.epochs,
        "batch_size": 64,
        "optimizer": "adam",
        "keeps": args.keeps,
        "codecs": args.codecs,
        "flavours": args.flavours,
        "layer_keep": 0.1,
        "sample_fraction": args.sample_fraction,
        "finetune_epochs": args.finetune_epochs,
        "finetune_samples": args.finetune_samples if args.finetune_samples is not None else (0 if quick else 10_000),
        "seeds": args.seeds if args.seeds is not None else ([0] if quick else [0, 1]),
        "mia": MIA_METHOD,  # cells measured with another MIA are not mixed with these
        "progress": not args.no_progress,
        "engine": args.engine,
        "requests": list(dict.fromkeys(args.request)),
        "poison": args.poison,
        "poison_seed": args.poison_seed,
        "poison_target": args.poison_target,
        "poison_keeps": args.poison_keeps,
    }


def cell_id(seed, task, row):
    return f"{seed}|{task}|{row}"


class CellLog:
    """DIR/cells.json: every finished cell, rewritten atomically after each one."""

    def __init__(self, path, config):
        self.path = path
        saved = json.loads(path.read_text()) if path.exists() else None
        if saved and saved["config"] != json.loads(json.dumps(study_record.comparable(config))):
            raise SystemExit(f"{path} holds a study with another configuration; use a new --out or delete it")
        self.cells = saved["cells"] if saved else {}
        poisoned = json.loads(json.dumps(study_record.comparable(config, "poisoned")))
        if any(cell["task"] == "poisoned" and cell.get("config") != poisoned for cell in self.cells.values()):
            raise SystemExit(f"{path} holds poisoned-request cells of another poison (--poison, --poison-seed, "
                             "--poison-target, --poison-keeps); use a new --out or delete it")
        self.config = config
        if not saved:  # the options are on disk before anything else is
            self._save()

    def __contains__(self, key):
        return key in self.cells

    def add(self, key, cell):
        self.cells[key] = cell
        self._save()

    def _save(self):
        study_record.write_json(self.path, {"config": study_record.comparable(self.config), "cells": self.cells})


def needed_cells(seed, config):
    """Every cell a seed contributes, by id (reference rows, then each store's scale modes)."""
    baselines = [(study_record.store_name("original"), ("1",)),
                 (study_record.store_name("layer", keep=config["layer_keep"]), ("1",))]
    ids = []
    for task in config["requests"]:
        codecs, keeps = (["int8"], config["poison_keeps"]) if task == "poisoned" else (config["codecs"], config["keeps"])
        stores = baselines + [(study_record.store_name("per-sample", flavour, keep, codec), ("1", "auto"))
                              for flavour in config["flavours"] for keep in keeps for codec in codecs]
        fine_tuned = config["finetune_epochs"] and task in ("class", "poisoned")
        ids += [cell_id(seed, task, kind) for kind in ["after train", "retrain"] + (["finetune only"] if fine_tuned else [])]
        ids += [cell_id(seed, task, f"{name}|{mode}") for name, modes in stores for mode in modes]
    return ids


def run_seed(seed, config, out, log, progress):
    if all(key in progress for key in needed_cells(seed, config)):
        log(f"seed {seed}: every cell is in {progress.path}, skipped")
        return
    seed_dir = out / f"seed{seed}"
    if "poisoned" in config["requests"]:
        run_poisoned(seed, config, seed_dir / "poisoned", log, progress)
    tasks = [task for task in ("class", "samples") if task in config["requests"]]
    if all(key in progress for key in needed_cells(seed, {**config, "requests": tasks})):
        return
    recorded = study_record.record(seed, config, seed_dir, log)
    if any(not (seed_dir / entry["path"]).exists() for entry in recorded["stores"].values()):
        log(f"seed {seed}: cells are missing and the stores were deleted: recording again")
        (seed_dir / study_record.RECORDED).unlink()
        recorded = study_record.record(seed, config, seed_dir, log)
    data = study_record.load_data(config)
    trained = np.load(seed_dir / "trained.npy", allow_pickle=False)
    samples = study_record.forget_samples(config, seed, len(data))
    cls = config["forget_class"]
    class_subset = study_cells.finetune_subset(config, seed, data, (data.train_y == cls).nonzero()[0])
    for task in tasks:
        reference = study_record.reference_model(task, seed, config, seed_dir, data, log)
        subset = class_subset if task == "class" else None
        measure_request(seed, task, config, seed_dir, recorded, trained, reference, data, samples, subset, log, progress)


def run_poisoned(seed, config, seed_dir, log, progress):
    """The poisoned request: its own training run on the poisoned split, its own retrained reference."""
    if all(key in progress for key in needed_cells(seed, {**config, "requests": ["poisoned"]})):
        return
    recorded = study_record.record_poisoned(seed, config, seed_dir, log)
    data = study_record.poisoned_data(config, seed)
    trained = np.load(seed_dir / "trained.npy", allow_pickle=False)
    reference = study_record.reference_model("poisoned", seed, config, seed_dir, data, log)
    subset = study_cells.finetune_subset(config, seed, data, data.poison.keys)
    extra = {"config": study_record.comparable(config, "poisoned"), "poison": recorded["poison"]}
    measure_request(seed, "poisoned", config, seed_dir, recorded, trained, reference, data, data.poison.keys, subset, log,
                    progress, extra)


def measure_request(seed, task, config, seed_dir, recorded, trained, reference, data, samples, subset, log, progress,
                    extra=None):
    """Every cell of one request for one seed: the reference rows, then each store at each scale mode."""
    extra = extra or {}
    rows = [("after train", trained, recorded["train_seconds"]), ("retrain", *reference)]
    if task in ("class", "poisoned") and config["finetune_epochs"]:
        rows.append(("finetune only", trained, 0.0))
    for kind, weights, seconds in rows:
        key = cell_id(seed, task, kind)
        if key not in progress:
            cell = study_cells.reference_cells(task, kind, weights, data, config, seed, samples, subset, seconds)
            progress.add(key, {"seed": seed, "task": task, "row": kind, "method": kind, **extra, **cell})
    for name, entry in recorded["stores"].items():
        keys = {mode: cell_id(seed, task, f"{name}|{mode}") for mode in ("1", "auto")}
        wanted = ["1", "auto"] if entry["method"] == "per-sample" else ["1"]
        if all(keys[mode] in progress for mode in wanted):
            continue
        started = time.perf_counter()
        cells = study_cells.store_cells(task, seed_dir / entry["path"], entry, trained, data, config, seed,
                                        samples, subset)
        for mode, cell in cells.items():
            row = {key: value for key, value in entry.items() if key != "path"}
            progress.add(keys[mode], {"seed": seed, "task": task, "row": name, "scale_mode": mode, **row, **extra, **cell})
        log(f"seed {seed} {task:<8} {name:<26} " + study_report.cell_line(task, cells)
            + f"  ({time.perf_counter() - started:.1f} s)")


def main(args):
    return run(build_config(args), Path(args.out), keep_stores=args.keep_stores,
               command="python -m bench " + shlex.join(sys.argv[1:]))


def run(config, out, keep_stores=False, command=None):
    """Every seed's cells (resuming from out/cells.json), then the report. Also the protocol's poisoned request."""
    out.mkdir(parents=True, exist_ok=True)
    progress = CellLog(out / "cells.json", config)
    started = time.perf_counter()
    for seed in config["seeds"]:
        run_seed(seed, config, out, print, progress)
        if not keep_stores:
            for path in (out / f"seed{seed}").rglob("*.h5"):
                path.unlink()
    cells = {key: cell for key, cell in progress.cells.items()
             if cell["seed"] in config["seeds"] and cell["task"] in config["requests"]}  # this run's seeds and requests
    outputs = study_report.write(cells, config, out, command=command)
    print(study_report.console_table(cells, config))
    print(f"study finished in {time.perf_counter() - started:.0f} s; wrote " + ", ".join(str(p) for p in outputs))
    return 0


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true", help="bundled digits, one seed: a few minutes on 2 cores")
    parser.add_argument("--out", default="out/study", help="results folder (cells.json there makes the study resumable)")
    parser.add_argument("--dataset", choices=["digits", "mnist", "cifar100"], help="default: digits with --quick, else mnist")
    parser.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DIR, else ../shared/data/mnist relative to the working directory); "
                                           "for cifar100 the folder holding cifar-100-python/")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 with --quick, else 0 1")
    parser.add_argument("--forget-class", type=int, default=3)
    parser.add_argument("--keep-first", type=int,
                        help="samples of the forgotten class kept (default 100 on MNIST, all elsewhere; 0: all)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--keeps", type=float, nargs="+", default=KEEPS, help="p of the per-sample stores")
    parser.add_argument("--codecs", nargs="+", default=CODECS, choices=CODECS)
    parser.add_argument("--flavours", nargs="+", default=FLAVOURS, choices=FLAVOURS)
    parser.add_argument("--request", nargs="+", default=["class", "samples"], choices=REQUESTS,
                        help="request kinds to measure (default: class samples); poisoned: a backdoor's samples, "
                             "on its own poisoned training run")
    parser.add_argument("--poison", type=float, default=100,
                        help="poisoned samples of the poisoned request: a count, or a fraction of the training set "
                             "when below 1 (default 100)")
    parser.add_argument("--poison-seed", type=int, help="seed of the poison's draw (default: each seed's own)")
    parser.add_argument("--poison-target", type=int, default=0, help="the poison's target label (default 0)")
    parser.add_argument("--poison-keeps", type=float, nargs="+", default=[0.01, 0.02],
                        help="p of the poisoned request's int8 per-sample stores (default 0.01 0.02)")
    parser.add_argument("--sample-fraction", type=float, default=0.01, help="share of the training set in the sample request, or a count when 1 or more "
                             "(e.g. 100)")
    parser.add_argument("--finetune-epochs", type=int, default=1, help="epochs of the 'after retrain' fine-tune (0: none)")
    parser.add_argument("--finetune-samples", type=int,
                        help="retained samples the fine-tune passes over (default 10,000 on MNIST; all with --quick)")
    parser.add_argument("--keep-stores", action="store_true", help="keep the .h5 stores of finished seeds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--engine", choices=["masked", "vmap"],
                        help=f"per-sample gradient engine (default: {study_record.STUDY_ENGINE} for the class and sample "
                             "requests' run, the faster for its many masks (docs/RESULTS.md); masked for the poisoned run's few)")
