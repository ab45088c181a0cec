"""`python -m unlearn train ...` and `python -m unlearn forget ...` (see --help of each)."""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

import gradstore
from gradstore.cli import run_reporting_errors

from . import data as datasets
from . import distributed, poison, runs
from .evaluate import accuracy, evaluate
from .forget import forget, mark_applied, root_run
from .models import build_model
from .recorders import create_recorder, recorder_for
from .checkpoint import Checkpointer
from .train import default_device, train

GAP_KEYS = ("forgotten_acc", "rest_acc", "ua", "ra", "ta", "mia_efficacy", "asr", "poisoned_label_acc", "target_class_acc")
DEFAULT_CODEC = {"per-sample": "int8", "original": "fp32", "layer": "fp32"}


def parse_keep_first(text):
    try:
        cls, count = text.split(":")
        return [int(cls), int(count)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep-first wants CLASS:N (e.g. 3:100), got {text!r}") from None


def cmd_train(args):
    """Train and record; under torchrun every rank runs this, rank 0 writes the run's files."""
    device = distributed.init_from_environment(args.device)
    try:
        return _train_run(args, device)
    finally:
        if distributed.active():
            torch.distributed.destroy_process_group()


def _train_run(args, device):
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
    distributed.barrier()  # every rank has seen the directory as it was before rank 0 writes to it
    if lead:
        out.mkdir(parents=True, exist_ok=True)
    exclude_samples = datasets.read_sample_file(args.exclude_samples).tolist() if args.exclude_samples else None
    config = {
        "dataset": args.dataset, "data_dir": args.data_dir, "model": args.model, "groups": args.groups,
        "method": args.method, "flavour": args.flavour if args.method == "per-sample" else None,
        "keep": args.keep if args.method in ("per-sample", "layer") else (1.0 if args.method == "original" else None),
        "codec": (args.codec or DEFAULT_CODEC.get(args.method)) if args.method != "none" else None,
        "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed, "optimizer": args.optimizer,
        "lr": args.lr, "keep_first": args.keep_first, "exclude_class": args.exclude_class,
        "exclude_samples": exclude_samples, "engine": args.engine if args.method == "per-sample" else None,
    }
    config["checkpoint_every"] = args.checkpoint_every
    if args.poison is not None:
        config["poison"] = {"count": args.poison, "seed": args.seed if args.poison_seed is None else args.poison_seed,
                            "target": args.poison_target}
    split = runs.build_data(config)  # before the options are saved: the poison's trigger comes from the images
    if split.poison is not None:
        config["poison"] = split.poison.to_json()
    if args.resume:
        started = runs.load_json(out / runs.STARTED)
        if started != json.loads(json.dumps(config, default=runs._jsonable)):
            changed = sorted(key for key in set(started) | set(config) if started.get(key) != config.get(key))
            raise SystemExit(f"--resume: the options differ from the interrupted run's ({', '.join(changed)})")
    elif lead:
        if args.overwrite:
            for stale in (runs.CHECKPOINT, "store.h5", "train.json"):
                (out / stale).unlink(missing_ok=True)
            shutil.rmtree(gradstore.shards.shard_dir(out / "store.h5"), ignore_errors=True)
        runs.save_json(out / runs.STARTED, config)
    if split.poison is not None and lead:
        poison.write_keys(out / runs.POISONED, split.poison)
    distributed.barrier()
    config.update(in_channels=split.in_channels, num_classes=split.num_classes)
    model = build_model(args.model, split.in_channels, split.num_classes, seed=args.seed, groups=args.groups)
    recorders = []
    steps = args.epochs * -(-len(split) // args.batch_size)
    if args.method != "none":
        existing = _recording_to_resume(out / "store.h5", rank, world) if args.resume else None
        if existing is not None:  # a finished sharded store is opened by every rank: read-only
            mode = "r" if world > 1 and existing == out / "store.h5" else "r+"
            recorders.append(recorder_for(gradstore.open(existing, mode), args.method, args.flavour))
        else:
            recorders.append(create_recorder(out / "store.h5", args.method, model, len(split), steps, keep=args.keep,
                                             codec=config["codec"], flavour=args.flavour, seed=args.seed,
                                             memory_budget=args.memory_budget << 20))
    checkpoint = Checkpointer(out / runs.CHECKPOINT, args.checkpoint_every) if args.checkpoint_every else None
    if args.resume and checkpoint is None:
        raise SystemExit("--resume needs the interrupted run's --checkpoint-every")
    result = train(model, split.train_x, split.train_y, args.epochs, args.batch_size, args.seed, args.optimizer,
                   args.lr, recorders, device, progress=not args.quiet, checkpoint=checkpoint,
                   engine=args.engine)
    if not lead:
        return 0
    runs.save_model(out, model)
    np.save(out / "source_indices.npy", split.source_indices)
    report = {
        **config,
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
        report["store"] = {key: info[key] for key in ("bytes_on_disk", "bytes_per_value", "k", "num_keys", "codec")}
    runs.save_json(out / "train.json", report)
    (out / runs.CHECKPOINT).unlink(missing_ok=True)
    print(json.dumps(report, indent=2) if args.json else
          f"{out}: {report['num_samples']} samples, {report['epochs']} epochs, {report['seconds']:.1f} s, "
          f"test accuracy {report['test_acc']:.4f}" + (f", store {report['store']['bytes_on_disk']:,} bytes" if recorders else ""))
    return 0


def _recording_to_resume(path, rank, world):
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


def cmd_forget(args):
    started = time.perf_counter()
    samples = datasets.read_sample_file(args.samples) if args.samples else None
    scale = "auto" if args.scale == "auto" else float(args.scale)
    device = args.device or default_device()
    outcome = forget(args.run_dir, samples=samples, cls=args.cls, scale=scale, retrain_epochs=args.retrain_epochs,
                     device=device, progress=not args.quiet)
    config = runs.load_json(root_run(args.run_dir) / "train.json")
    data, request, report = outcome.data, outcome.request, outcome.report

    def measure(model):
        return evaluate(model, data, request.forget_set, args.cls, excluded=request.excluded, seed=config["seed"])

    result = {**measure(outcome.model), **report, "after_train": measure(runs.load_model(args.run_dir, config, device))}
    if args.retrain_epochs:
        no_retrain = runs.load_model(args.run_dir, config, device)
        no_retrain.load_state_dict(outcome.no_retrain_state)
        result["no_retrain"] = measure(no_retrain)
    if args.gold:
        gold_config = runs.load_json(Path(args.gold) / "train.json")
        gold = {**measure(runs.load_model(args.gold, gold_config, device)), "seconds": gold_config["seconds"]}
        result["gold"] = gold
        result["gap_to_gold"] = {key: result[key] - gold[key] for key in GAP_KEYS if result.get(key) is not None
                                 and gold.get(key) is not None}
        result["speedup_vs_gold"] = gold_config["seconds"] / max(report["seconds"], 1e-9)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs.save_model(out, outcome.model)
    result["marked_rows"] = result["purged_rows"] = None
    runs.save_json(out / "forget.json", {**outcome.record, **result})
    if args.mark or args.purge:  # only once the forgotten model is on disk
        count = mark_applied(outcome.record, erase=args.purge)
        result["purged_rows" if args.purge else "marked_rows"] = count
        runs.save_json(out / "forget.json", {**outcome.record, **result})
    result["total_seconds"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(result, indent=2, default=runs._jsonable))
    else:
        print(f"forgot {report['request']['num_samples']} samples ({report['request']['num_keys']} rows) with scale "
              f"{report['scale']:.4g} in {report['seconds']:.2f} s: forgotten {result['forgotten_acc']:.3f} / rest "
              f"{result['rest_acc']:.3f} (after train {result['after_train']['forgotten_acc']:.3f} / "
              f"{result['after_train']['rest_acc']:.3f}); written to {out}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m unlearn",
        description="Train while recording per-sample contributions, then forget samples or a class.",
        epilog="Example: python -m unlearn train --dataset digits --model simple --method per-sample --out runs/a && "
               "python -m unlearn forget runs/a --class 3 --scale auto --out runs/a-forget3 --json",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("train", help="train a model, recording into RUN_DIR/store.h5",
                            description="Train (seeded, deterministic) and record every sample or step.")
    t.add_argument("--dataset", required=True, choices=datasets.DATASETS,
                   help="digits: scikit-learn's bundled 8x8 digits (no files needed); mnist: IDX files; cifar100: pickles")
    t.add_argument("--data-dir", help="folder of the dataset's files (mnist default: $MNIST_DIR, else ../shared/data/mnist relative to the working directory)")
    t.add_argument("--model", required=True, choices=["simple", "resnet18"], help="the seed's small CNN or ResNet-18 (GroupNorm)")
    t.add_argument("--groups", type=int, default=1, help="GroupNorm groups for resnet18 (default 1, the seed's)")
    t.add_argument("--method", required=True, choices=["per-sample", "original", "layer", "none"],
                   help="per-sample: ours; original: every step's dense delta; layer: a fraction of it; none: no recording")
    t.add_argument("--flavour", choices=["grad", "update"], default="update",
                   help="per-sample rows: raw gradient (the seed's) or the sample's share of the optimizer step (default)")
    t.add_argument("--engine", choices=["masked", "vmap"], default="masked",
                   help="per-sample gradients: 'masked' (hooks in the backward, only the kept values; default) "
                        "or 'vmap' (torch.func, full per-sample gradients; any module)")
    t.add_argument("--keep", type=float, default=0.1, help="fraction p of values kept per row (per-sample, layer)")
    t.add_argument("--codec", choices=["fp32", "fp16", "int8"],
                   help="row codec (default int8 for per-sample, fp32 for original/layer)")
    t.add_argument("--epochs", type=int, default=4)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--optimizer", choices=["adam", "sgd", "sgd-momentum"], default="adam",
                   help="adam (lr 1e-3), sgd (lr 0.01), sgd-momentum (lr 0.01, momentum 0.9)")
    t.add_argument("--lr", type=float, help="learning rate (default: the optimizer's above)")
    t.add_argument("--keep-first", type=parse_keep_first, metavar="CLASS:N",
                   help="keep only the first N training samples of CLASS (the seed keeps 3:100 on MNIST)")
    exclusion = t.add_mutually_exclusive_group()
    exclusion.add_argument("--exclude-class", type=int, metavar="C", help="train without class C (gold standard)")
    exclusion.add_argument("--exclude-samples", metavar="FILE",
                           help="train without these training-set indices (one per line, or .npy), as --keep-first leaves them")
    t.add_argument("--poison", type=int, metavar="N",
                   help="poison N seeded training samples of other classes than --poison-target: a 4x4 patch of the "
                        "maximum pixel value one pixel in from the bottom-right corner (2x2 on 8x8 images) and the "
                        "target label; their keys go to RUN_DIR/poisoned.txt (drawn before --exclude-samples)")
    t.add_argument("--poison-seed", type=int, metavar="S", help="seed of the poison's draw (default: --seed)")
    t.add_argument("--poison-target", type=int, default=0, metavar="T", help="the poison's target label (default 0)")
    t.add_argument("--memory-budget", type=int, default=256, metavar="MIB", help="store write buffer (MiB)")
    t.add_argument("--device", help="cpu or cuda (default: cuda when present; under torchrun, cuda:LOCAL_RANK)")
    t.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write")
    t.add_argument("--overwrite", action="store_true", help="replace an existing run in RUN_DIR")
    t.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="commit the store and checkpoint model + optimizer every STEPS steps (0: never); "
                        "a killed run then resumes with --resume, losing at most STEPS steps")
    t.add_argument("--resume", action="store_true", help="continue the interrupted run in RUN_DIR from its last checkpoint")
    t.add_argument("--json", action="store_true", help="print train.json")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(run=cmd_train)

    f = commands.add_parser("forget", help="forget samples or a class from a run",
                            description="Add the request's recorded rows back to the weights; evaluate; write OUT_DIR.")
    f.add_argument("run_dir", metavar="RUN_DIR", help="a run written by `train`, or a previous forget's OUT_DIR")
    what = f.add_mutually_exclusive_group(required=True)
    what.add_argument("--class", dest="cls", type=int, metavar="C", help="forget every training sample of class C")
    what.add_argument("--samples", metavar="FILE", help="training-set indices to forget, one per line (or .npy)")
    f.add_argument("--scale", default="1", help="step size: a number (default 1) or 'auto' (chosen by forward passes)")
    f.add_argument("--retrain-epochs", type=int, default=0, help="fine-tune on the retained data afterwards (seed: 4)")
    f.add_argument("--gold", metavar="RUN_DIR", help="a model retrained without the forgotten data, to compare with")
    f.add_argument("--mark", action="store_true",
                   help="mark the applied rows forgotten in the store (later requests from other bases refuse them)")
    f.add_argument("--purge", action="store_true", help="mark the applied rows forgotten and erase them from disk")
    f.add_argument("--device", help="cpu or cuda")
    f.add_argument("--out", required=True, metavar="OUT_DIR")
    f.add_argument("--json", action="store_true", help="print the results as JSON (also written to OUT_DIR/forget.json)")
    f.add_argument("--quiet", action="store_true", help="no progress bars")
    f.set_defaults(run=cmd_forget)
    return parser


def check_forget_inputs(args):
    """Before any work: the run, its store and the gold run are there, readable and belong together.

    Each problem is a FileNotFoundError / ValueError / StoreError naming the file, so that a
    store or model copied from another run is refused up front rather than failing midway.
    """
    if args.scale != "auto":
        try:
            float(args.scale)
        except ValueError:
            raise ValueError(f"--scale must be a number or 'auto', got {args.scale!r}") from None
    if not Path(args.run_dir).is_dir():
        raise FileNotFoundError(f"{args.run_dir} is not a directory: give a run written by `unlearn train` "
                                "or a previous forget's OUT_DIR")
    root = root_run(args.run_dir)
    config = runs.load_json(root / "train.json")
    if config["method"] != "none":
        store_path = root / "store.h5"
        if not store_path.exists():
            raise FileNotFoundError(f"{store_path} not found: the run in {root} (--method {config['method']}) "
                                    "has lost its recording")
        with gradstore.open(store_path) as store:
            runs.check_store(root, config, store)
    if args.gold:
        gold_config = runs.load_json(Path(args.gold) / "train.json")
        for key in ("dataset", "in_channels", "num_classes"):
            if gold_config[key] != config[key]:
                raise ValueError(f"--gold {args.gold} was trained with {key} {gold_config[key]!r}, the run in "
                                 f"{root} with {config[key]!r}: they cannot be compared")
        runs.load_model(args.gold, gold_config)


def check_common_inputs(args):
    """Option values argparse's types let through but the commands cannot use."""
    if args.device:
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: torch sees no CUDA device here")
    if args.command == "train":
        if args.poison is None and (args.poison_seed is not None or args.poison_target != 0):
            raise ValueError("--poison-seed and --poison-target need --poison N")
        for option, value, low in (("--batch-size", args.batch_size, 1), ("--epochs", args.epochs, 0),
                                   ("--poison", 0 if args.poison is None else args.poison, 0),
                                   ("--groups", args.groups, 1), ("--memory-budget", args.memory_budget, 0),
                                   ("--checkpoint-every", args.checkpoint_every, 0)):
            if value < low:
                raise ValueError(f"{option} must be at least {low}, got {value}")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a file, not a run directory")
    elif Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out} is a file, not a directory")


def main(argv=None):
    """Every failure is one line on stderr and a non-zero status (argparse's usage errors: 2), never a traceback."""
    args = build_parser().parse_args(argv)

    def run():
        check_common_inputs(args)
        if args.command == "forget":
            check_forget_inputs(args)
        return args.run(args)

    return run_reporting_errors("unlearn", args.command, run)


if __name__ == "__main__":
    sys.exit(main())
