"""The study's run: per seed, the recording, the retrained references and every cell, then the report."""

import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import numpy as np

from unlearn.runs.config import PER_SAMPLE

from . import cells as study_cells
from . import record as study_record
from . import report as study_report
from .grid import cell_id, needed_cells
from .progress import CellLog

Log = Callable[[str], Any]


def run_seed(seed: int, config: Dict[str, Any], out: Path, log: Log, progress: CellLog) -> None:
    """Every cell of one seed not yet in ``progress``: the poisoned run, then the class and sample requests."""
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
    unknown = sorted(set(config.get("only_stores") or ()) - set(recorded["stores"]))
    if unknown:
        raise SystemExit(f"--only-stores: {unknown} are not stores of this study (it records "
                         f"{sorted(recorded['stores'])})")
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


def run_poisoned(seed: int, config: Dict[str, Any], seed_dir: Path, log: Log, progress: CellLog) -> None:
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
    computed = {}
    if "original" not in recorded["stores"]:  # --baselines computed: the original's size, computed
        if recorded.get("original_bytes") is None:
            raise SystemExit(f"{seed_dir}/recorded.json has neither the original's store nor its computed size: "
                             "delete it to record again")
        computed = {"original_bytes": recorded["original_bytes"]}
    for name, entry in recorded["stores"].items():
        if config.get("only_stores") and name not in config["only_stores"]:
            continue  # left for a later run of the study without --only-stores
        keys = {mode: cell_id(seed, task, f"{name}|{mode}") for mode in ("1", "auto")}
        wanted = ["1", "auto"] if entry["method"] == PER_SAMPLE else ["1"]
        if all(keys[mode] in progress for mode in wanted):
            continue
        started = time.perf_counter()
        cells = study_cells.store_cells(task, seed_dir / entry["path"], entry, trained, data, config, seed,
                                        samples, subset)
        for mode, cell in cells.items():
            row = {key: value for key, value in entry.items() if key != "path"}
            row.update(computed)  # the original's size, computed where its store was not recorded
            progress.add(keys[mode], {"seed": seed, "task": task, "row": name, "scale_mode": mode, **row, **extra, **cell})
        log(f"seed {seed} {task:<8} {name:<26} " + study_report.cell_line(task, cells)
            + f"  ({time.perf_counter() - started:.1f} s)")


def run(config: Dict[str, Any], out: Path, keep_stores: bool = False, command: Optional[str] = None) -> int:
    """Every seed's cells (resuming from out/cells.json), then the report. Also the protocol's poisoned request."""
    out.mkdir(parents=True, exist_ok=True)
    progress = CellLog(out / "cells.json", config)
    started = time.perf_counter()
    for seed in config["seeds"]:
        run_seed(seed, config, out, print, progress)
        if not keep_stores and not config.get("only_stores"):  # the other stores' cells are still to come
            for path in (out / f"seed{seed}").rglob("*.h5"):
                path.unlink()
    cells = {key: cell for key, cell in progress.cells.items()
             if cell["seed"] in config["seeds"] and cell["task"] in config["requests"]}  # this run's seeds and requests
    outputs = study_report.write(cells, config, out, command=command)
    print(study_report.console_table(cells, config))
    print(f"study finished in {time.perf_counter() - started:.0f} s; wrote " + ", ".join(str(p) for p in outputs))
    return 0
