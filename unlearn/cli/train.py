"""`python -m unlearn train`: train and record into a run directory (runs.folders), refusing before any write."""

import argparse
import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch

import gradstore

from ..errors import RunConfigError
from ..evaluation import accuracy
from ..identity import run_identity
from ..params import named_shapes
from ..recording import distributed
from ..recording.recorders import create_recorder, recorder_for
from ..runs import data as datasets
from ..runs import folders as runs
from ..runs import poison
from ..runs.checkpoint import Checkpointer
from ..runs.config import DEFAULT_CODEC, KEEP_METHODS, NO_RECORDING, ORIGINAL, PER_SAMPLE, STEP_METHODS, RunConfig
from ..runs.data import DataSplit
from ..runs.loop import train
from ..runs.models import build_model


def cmd_train(args: argparse.Namespace) -> int:
    """Train and record; under torchrun every rank runs this, rank 0 writes the run's files."""
    device = distributed.init_from_environment(args.device)
    try:
        return _train_run(args, device)
    finally:
        if distributed.active():
            torch.distributed.destroy_process_group()


def run_config(args: argparse.Namespace) -> RunConfig:
    """The run's settings from its options (what started.json holds); a method's unused options are null."""
    per_sample = args.method == PER_SAMPLE
    exclude_samples = datasets.read_sample_file(args.exclude_samples).tolist() if args.exclude_samples else None
    poison_spec = None
    if args.poison is not None:
        poison_spec = {"count": args.poison, "seed": args.seed if args.poison_seed is None else args.poison_seed,
                       "target": args.poison_target}
    return RunConfig(
        dataset=args.dataset, data_dir=args.data_dir, model=args.model, groups=args.groups, method=args.method,
        flavour=args.flavour if per_sample else None,
        keep=args.keep if args.method in KEEP_METHODS else (1.0 if args.method == ORIGINAL else None),
        codec=(args.codec or DEFAULT_CODEC.get(args.method)) if args.method != NO_RECORDING else None,
        epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, optimizer=args.optimizer, lr=args.lr,
        keep_first=args.keep_first, exclude_class=args.exclude_class, exclude_samples=exclude_samples,
        engine=args.engine if per_sample else None, checkpoint_every=args.checkpoint_every, poison=poison_spec)


def _train_run(args: argparse.Namespace, device: torch.device) -> int:
    rank, world = distributed.rank_and_world()
    lead = rank == 0  # writes the run directory's files
    out = Path(args.out)
    if (out / "train.json").exists() and not args.overwrite:
        raise SystemExit(f"{out} already holds a run (train.json); pass --overwrite or choose another --out")
    interrupted = (out / runs.STARTED).exists() and not (out / "train.json").exists()
    if args.resume and not interrupted:
        raise SystemExit(f"--resume: {out} holds no interrupted run ({runs.STARTED} without train.json)")
    if interrupted and not (args.resume or args.overwrite):
        raise SystemExit(f"{out} holds an interrupted run; pass --resume to continue it or --overwrite to start again")
    if args.resume and not args.checkpoint_every:
        raise SystemExit("--resume needs the interrupted run's --checkpoint-every")
    if distributed.active() and args.method in STEP_METHODS:
        raise RunConfigError(f"--method {args.method} records whole steps; under torchrun only --method per-sample "
                             "records (each rank its own samples)")
    # Everything that can refuse the command comes before its first write (started.json; with
    # --overwrite, the old run's removal): a refused command leaves RUN_DIR as it was.
    config = run_config(args)
    split = runs.build_data(config)  # before the options are saved: the poison's trigger comes from the images
    if split.poison is not None:
        config = dataclasses.replace(config, poison=split.poison.to_json())
    model = _model_to_train(args, split)
    steps = args.epochs * -(-len(split) // args.batch_size)
    if config.records:
        _check_recording(args, model, steps)
    if world > 1:
        distributed.check_batches(len(split), args.batch_size, world)
    if args.resume:
        started = runs.load_json(out / runs.STARTED)
        current = json.loads(json.dumps(config.to_json(), default=runs.jsonable))
        if started != current:
            changed = sorted(key for key in set(started) | set(current) if started.get(key) != current.get(key))
            raise SystemExit(f"--resume: the options differ from the interrupted run's ({', '.join(changed)})")
    distributed.barrier()  # every rank has seen the directory as it was before rank 0 writes to it
    if lead and not args.resume:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            for stale in (runs.CHECKPOINT, "store.h5", "train.json"):
                (out / stale).unlink(missing_ok=True)
            shutil.rmtree(gradstore.shards.shard_dir(out / "store.h5"), ignore_errors=True)
        runs.write_json(out / runs.STARTED, config.to_json())
    if split.poison is not None and lead:
        poison.write_keys(out / runs.POISONED, split.poison)
    distributed.barrier()
    config = dataclasses.replace(config, in_channels=split.in_channels, num_classes=split.num_classes)
    recorders = []
    if config.records:
        existing = _recording_to_resume(out / "store.h5", rank, world) if args.resume else None
        if existing is not None:  # a finished sharded store is opened by every rank: read-only
            mode = "r" if world > 1 and existing == out / "store.h5" else "r+"
            recorders.append(recorder_for(gradstore.open(existing, mode), args.method, args.flavour))
        else:
            identity = run_identity(config, split, gradstore.model_fingerprint(named_shapes(model)))
            recorders.append(create_recorder(out / "store.h5", args.method, model, len(split), steps, keep=args.keep,
                                             codec=config.codec or DEFAULT_CODEC[args.method], flavour=args.flavour, seed=args.seed,
                                             memory_budget=args.memory_budget << 20, run_id=identity["run_id"],
                                             data_sha256=identity["data_sha256"]))
    checkpoint = Checkpointer(out / runs.CHECKPOINT, args.checkpoint_every) if args.checkpoint_every else None
    result = train(model, split.train_x, split.train_y, args.epochs, args.batch_size, args.seed, args.optimizer,
                   args.lr, recorders, device, progress=not args.quiet, checkpoint=checkpoint,
                   engine=args.engine)
    if not lead:
        return 0
    buffer = io.BytesIO()
    np.save(buffer, split.source_indices)
    with _finishing(out):
        runs.save_model(out, model)
        runs.write_file(out / "source_indices.npy", buffer.getvalue())
    results = {
        "seconds": result["seconds"],
        "record_seconds": result["record_seconds"],
        "steps": result["steps"],
        "num_samples": len(split),
        "num_params": sum(p.numel() for p in model.parameters()),
        "resumed_from_step": result["resumed_from_step"],
        "test_acc": accuracy(model, split.test_x, split.test_y),
        "device": str(device),
        "ranks": world,
    }
    if recorders:
        with gradstore.open(out / "store.h5") as store:
            info = store.info()
        results["store"] = {key: info[key] for key in ("bytes_on_disk", "bytes_per_value", "k", "num_keys", "codec")}
    report = dataclasses.replace(config, results=results).to_json()
    with _finishing(out):
        runs.write_json(out / "train.json", report)
    (out / runs.CHECKPOINT).unlink(missing_ok=True)
    print(json.dumps(report, indent=2) if args.json else
          f"{out}: {report['num_samples']} samples, {report['epochs']} epochs, {report['seconds']:.1f} s, "
          f"test accuracy {report['test_acc']:.4f}" + (f", store {report['store']['bytes_on_disk']:,} bytes" if recorders else ""))
    return 0


@contextlib.contextmanager
def _finishing(out: Path) -> Iterator[None]:
    """A failed write of a finished run's files (a full disk) says that the run is unfinished."""
    try:
        yield
    except OSError as error:
        failed = OSError(f"{error}; the run in {out} is unfinished (no train.json): make room and train again with "
                         "--overwrite")
        failed.errno = error.errno
        raise failed from None


def _model_to_train(args: argparse.Namespace, split: DataSplit) -> torch.nn.Module:
    """The model to train (built before anything is written: --groups may not fit it)."""
    if len(split) == 0:
        raise RunConfigError("no training sample is left (--keep-first, --exclude-class and --exclude-samples "
                             "removed them all)")
    if args.exclude_class is not None and not 0 <= args.exclude_class < split.num_classes:
        raise RunConfigError(f"--exclude-class {args.exclude_class}: {args.dataset} has classes 0 to "
                             f"{split.num_classes - 1}")
    try:
        return build_model(args.model, split.in_channels, split.num_classes, seed=args.seed, groups=args.groups)
    except ValueError as error:  # GroupNorm: the channels must divide into the groups
        raise RunConfigError(f"--model {args.model} --groups {args.groups}: {error}") from None


def _check_recording(args: argparse.Namespace, model: torch.nn.Module, steps: int) -> None:
    """The refusals create_recorder would make once started.json is written, made before it."""
    if args.method in KEEP_METHODS:
        num_params = sum(p.numel() for p in model.parameters())
        try:
            gradstore.keep_to_k(args.keep, num_params)
        except gradstore.BadInputError:
            raise RunConfigError(f"--keep {args.keep} keeps no value of the model's {num_params:,} parameters; "
                                 f"raise it to at least {1 / num_params:.2g}") from None
    if args.method in STEP_METHODS and steps < 1:
        raise RunConfigError(f"--method {args.method} records a row per step, and --epochs {args.epochs} trains "
                             "none: give --epochs 1 or more")


def _recording_to_resume(path: Path, rank: int, world: int) -> Optional[Path]:
    """The store file this rank resumes: the finished store, its own recording, or None (none yet).
    A run recorded by another number of ranks is refused."""
    if path.exists():
        return path
    folder = Path(gradstore.shards.shard_dir(path))
    mine = Path(gradstore.shards.recording_path(path, rank, world))
    if world > 1 and mine.exists():
        return mine
    others = sorted(folder.glob("recording-*-of-*.h5")) if folder.exists() else []
    if others and not mine.exists():
        raise SystemExit(f"--resume: {folder} holds recordings of another number of ranks ({others[0].name}); "
                         f"resume with as many ranks as the run started with (this is {world})")
    return None
