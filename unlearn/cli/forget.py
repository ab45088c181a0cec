"""`python -m unlearn forget`: serve a request from a run, evaluate, write OUT_DIR (cli.outputs);
its inputs and outputs are checked before any work."""

import argparse
import json
import os
import stat
import time
from pathlib import Path
from typing import Any, Dict, Union

import numpy as np
import torch

import gradstore

from ..errors import RequestError, RunConfigError, RunFolderError
from ..evaluation import evaluate, predict
from ..forgetting import forget, root_run
from ..runs import data as datasets
from ..runs import folders as runs
from ..runs.loop import default_device
from .outputs import write_forget_outputs

GAP_KEYS = ("forgotten_acc", "rest_acc", "ua", "ra", "ta", "mia_efficacy", "asr", "poisoned_label_acc", "target_class_acc")


def cmd_forget(args: argparse.Namespace, scale: Union[str, float]) -> int:
    """Forget the request with ``scale`` (--scale, parsed); print the results, write OUT_DIR."""
    started = time.perf_counter()
    samples = datasets.read_sample_file(args.samples) if args.samples else None
    if samples is not None and samples.size == 0:
        raise RequestError(f"--samples {args.samples} lists no sample index: there is nothing to forget")
    if args.find_similar and samples is None:
        raise RequestError("--find-similar serves --samples requests: a --class request already names every sample "
                           "of its class")
    device = args.device or default_device()
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing step is refused below, naming --scale
        outcome = forget(args.run_dir, samples=samples, cls=args.cls, scale=scale, retrain_epochs=args.retrain_epochs,
                         device=device, progress=not args.quiet,
                         allow_unverified_store=args.allow_unverified_store, find_similar=args.find_similar)
    config = runs.load_run_config(root_run(args.run_dir))
    data, request, report = outcome.data, outcome.request, outcome.report
    base = runs.load_model(args.run_dir, config, device)
    _check_finite(args, outcome, base)

    def measure(model: torch.nn.Module) -> Dict[str, Any]:
        return evaluate(model, data, request.forget_set, args.cls, excluded=request.excluded, seed=config.seed)

    result = {**measure(outcome.model), **report, "after_train": measure(base)}
    if args.retrain_epochs:
        no_retrain = runs.load_model(args.run_dir, config, device)
        no_retrain.load_state_dict(outcome.no_retrain_state)
        result["no_retrain"] = measure(no_retrain)
    if args.gold:
        gold_config = runs.load_run_config(args.gold)
        gold_seconds = gold_config.results["seconds"]
        gold = {**measure(runs.load_model(args.gold, gold_config, device)), "seconds": gold_seconds}
        result["gold"] = gold
        result["gap_to_gold"] = {key: result[key] - gold[key] for key in GAP_KEYS if result.get(key) is not None
                                 and gold.get(key) is not None}
        result["speedup_vs_gold"] = gold_seconds / max(report["seconds"], 1e-9)
    out = Path(args.out)
    result["marked_rows"] = result["purged_rows"] = None
    write_forget_outputs(args, out, outcome, result)
    result["total_seconds"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(result, indent=2, default=runs.jsonable))
    else:
        print(f"forgot {report['request']['num_samples']} samples ({report['request']['num_keys']} rows) with scale "
              f"{report['scale']:.4g} in {report['seconds']:.2f} s: forgotten {result['forgotten_acc']:.3f} / rest "
              f"{result['rest_acc']:.3f} (after train {result['after_train']['forgotten_acc']:.3f} / "
              f"{result['after_train']['rest_acc']:.3f}); written to {out}")
        if "find_similar" in report:
            found = report["find_similar"]
            known = (f", precision {found['precision']} recall {found['recall']} against {runs.POISONED}"
                     if "recall" in found else "")
            print(f"find-similar: {found['num_found']} found beside the {found['named']} named"
                  f"{known}{': ' + found['why_nothing'] if 'why_nothing' in found else ''}")
    return 0


def _finite(model: torch.nn.Module, x: np.ndarray) -> bool:
    """Whether the model's weights, and its outputs on ``x``, are all finite numbers."""
    if not all(torch.isfinite(value).all() for value in model.state_dict().values() if value.is_floating_point()):
        return False
    with torch.no_grad():
        return bool(torch.isfinite(predict(model, x)).all())


def _check_finite(args: argparse.Namespace, outcome: Any, base: torch.nn.Module) -> None:
    """Refuse weights that overflowed (a step too large for the recorded rows) before they are evaluated."""
    probe = outcome.data.train_x[:256]
    if _finite(outcome.model, probe):
        return
    if not _finite(base, probe):
        raise RunFolderError(f"{Path(args.run_dir) / 'model.pt'} holds weights that are not finite numbers, or that "
                             "give outputs that are not: it is damaged")
    what = "the removal" if args.scale == "auto" else f"the step --scale {args.scale}"
    raise RunConfigError(f"{what} makes the model's weights or outputs overflow (not finite numbers); nothing was "
                         "written: choose a smaller --scale")


def check_forget_inputs(args: argparse.Namespace) -> None:
    """Before any work: the run, its store and the gold run are there, readable and belong together.

    Each problem is a FileNotFoundError / RunFolderError / RunConfigError / StoreError naming the
    file, so that a store or model copied from another run is refused up front rather than failing midway.
    """
    if not Path(args.run_dir).is_dir():
        raise FileNotFoundError(f"{args.run_dir} is not a directory: give a run written by `unlearn train` "
                                "or a previous forget's OUT_DIR")
    root = root_run(args.run_dir)
    config = runs.load_run_config(root)
    if config.records:
        store_path = root / "store.h5"
        if not store_path.exists():
            raise FileNotFoundError(f"{store_path} not found: the run in {root} (--method {config.method}) "
                                    "has lost its recording")
        with gradstore.open(store_path) as store:
            runs.check_store(root, config, store)
    if args.gold:
        gold_config = runs.load_run_config(args.gold)
        for key in ("dataset", "in_channels", "num_classes"):
            if getattr(gold_config, key) != getattr(config, key):
                raise RunConfigError(f"--gold {args.gold} was trained with {key} {getattr(gold_config, key)!r}, the "
                                     f"run in {root} with {getattr(config, key)!r}: they cannot be compared")
        runs.load_model(args.gold, gold_config)


def check_forget_outputs(args: argparse.Namespace) -> None:
    """Before any work: what the command will write can be written (OUT_DIR; with --mark or --purge,
    the store). The store's own refusal would come after the forgotten model is computed."""
    out = Path(args.out)
    existing = next(folder for folder in (out, *out.parents, Path.cwd()) if folder.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunConfigError(f"--out {args.out}: {existing} is not writable; choose another --out")
    if not (args.mark or args.purge):
        return
    option = "--purge" if args.purge else "--mark"
    store_path = root_run(args.run_dir) / "store.h5"
    if not store_path.exists():  # --method none: forget refuses the run itself
        return
    with gradstore.open(store_path) as store:
        if not store.finished:
            raise RunFolderError(f"{store_path}: recording has not finished (finalize never ran), and {option} needs "
                                 "a finished store")
        files = [store_path] + [Path(shard.path) for shard in getattr(store, "shards", ())]
    for file in files:
        # as gradstore refuses to open it for writing: no write permission bit, even for root
        if not (os.stat(file).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) and os.access(file, os.W_OK)):
            raise RunFolderError(f"{file} is read-only; make it writable or drop --mark/--purge")
        if args.purge and not os.access(file.parent, os.W_OK | os.X_OK):
            raise RunFolderError(f"{file.parent} is read-only, and --purge rewrites {file.name} there (a new file "
                                 "renamed over it); make the folder writable or drop --purge")
