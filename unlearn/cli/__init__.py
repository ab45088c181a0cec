"""`python -m unlearn train ...` and `python -m unlearn forget ...` (see --help of each)."""

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import stat
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import gradstore
from gradstore.cli import run_reporting_errors

from .evaluation import accuracy, evaluate, predict
from .forgetting import forget, mark_applied, root_run
from .identity import run_identity
from .params import named_shapes
from .recording import distributed
from .recording.recorders import create_recorder, recorder_for
from .runs import data as datasets
from .runs import folders as runs
from .runs import poison
from .runs.checkpoint import Checkpointer
from .runs.loop import default_device, train
from .runs.models import build_model

GAP_KEYS = ("forgotten_acc", "rest_acc", "ua", "ra", "ta", "mia_efficacy", "asr", "poisoned_label_acc", "target_class_acc")
DEFAULT_CODEC = {"per-sample": "int8", "original": "fp32", "layer": "fp32"}


def parse_keep_first(text):
    try:
        cls, count = text.split(":")
        cls, count = int(cls), int(count)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep-first wants CLASS:N (e.g. 3:100), got {text!r}") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"--keep-first CLASS:N wants N >= 0, got {text!r}")
    return [cls, count]


# --scale: 0 is no step (the model is left as it was; --mark/--purge still serve the request, as
# --scale auto does for samples that taught nothing of their own); 1 removes the recorded rows
# exactly. A negative step adds them again, and a step beyond the largest --scale auto tries
# (2**16, its class search's ceiling) is no removal but the weights' overflow.
MAX_SCALE = 2.0**16


def parse_scale(text):
    """--scale as 'auto' or a float in [0, MAX_SCALE]; ValueError naming --scale otherwise."""
    if text == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"--scale must be a number or 'auto', got {text!r}") from None
    if not math.isfinite(value) or not 0 <= value <= MAX_SCALE:
        raise ValueError(f"--scale must be 'auto' or a number from 0 (no step) to {MAX_SCALE:.0f} (1: the recorded "
                         f"rows exactly), got {text}")
    return value


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
    if args.resume and not args.checkpoint_every:
        raise SystemExit("--resume needs the interrupted run's --checkpoint-every")
    if distributed.active() and args.method in ("original", "layer"):
        raise ValueError(f"--method {args.method} records whole steps; under torchrun only --method per-sample "
                         "records (each rank its own samples)")
    # Everything that can refuse the command comes before its first write (started.json; with
    # --overwrite, the old run's removal): a refused command leaves RUN_DIR as it was.
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
    model = _model_to_train(args, split)
    steps = args.epochs * -(-len(split) // args.batch_size)
    if args.method != "none":
        _check_recording(args, model, steps)
    if world > 1:
        distributed.check_batches(len(split), args.batch_size, world)
    if args.resume:
        started = runs.load_json(out / runs.STARTED)
        if started != json.loads(json.dumps(config, default=runs._jsonable)):
            changed = sorted(key for key in set(started) | set(config) if started.get(key) != config.get(key))
            raise SystemExit(f"--resume: the options differ from the interrupted run's ({', '.join(changed)})")
    distributed.barrier()  # every rank has seen the directory as it was before rank 0 writes to it
    if lead and not args.resume:
        out.mkdir(parents=True, exist_ok=True)
        if args.overwrite:
            for stale in (runs.CHECKPOINT, "store.h5", "train.json"):
                (out / stale).unlink(missing_ok=True)
            shutil.rmtree(gradstore.shards.shard_dir(out / "store.h5"), ignore_errors=True)
        _save_json(out / runs.STARTED, config)
    if split.poison is not None and lead:
        poison.write_keys(out / runs.POISONED, split.poison)
    distributed.barrier()
    config.update(in_channels=split.in_channels, num_classes=split.num_classes)
    recorders = []
    if args.method != "none":
        existing = _recording_to_resume(out / "store.h5", rank, world) if args.resume else None
        if existing is not None:  # a finished sharded store is opened by every rank: read-only
            mode = "r" if world > 1 and existing == out / "store.h5" else "r+"
            recorders.append(recorder_for(gradstore.open(existing, mode), args.method, args.flavour))
        else:
            identity = run_identity(json.loads(json.dumps(config, default=runs._jsonable)), split,
                                    gradstore.model_fingerprint(named_shapes(model)))
            recorders.append(create_recorder(out / "store.h5", args.method, model, len(split), steps, keep=args.keep,
                                             codec=config["codec"], flavour=args.flavour, seed=args.seed,
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
    with _finishing(out):
        _save_json(out / "train.json", report)
    (out / runs.CHECKPOINT).unlink(missing_ok=True)
    print(json.dumps(report, indent=2) if args.json else
          f"{out}: {report['num_samples']} samples, {report['epochs']} epochs, {report['seconds']:.1f} s, "
          f"test accuracy {report['test_acc']:.4f}" + (f", store {report['store']['bytes_on_disk']:,} bytes" if recorders else ""))
    return 0


@contextlib.contextmanager
def _finishing(out):
    """A failed write of a finished run's files (a full disk) says that the run is unfinished."""
    try:
        yield
    except OSError as error:
        failed = OSError(f"{error}; the run in {out} is unfinished (no train.json): make room and train again with "
                         "--overwrite")
        failed.errno = error.errno
        raise failed from None


def _model_to_train(args, split):
    """The model to train (built before anything is written: --groups may not fit it)."""
    if len(split) == 0:
        raise ValueError("no training sample is left (--keep-first, --exclude-class and --exclude-samples removed "
                         "them all)")
    if args.exclude_class is not None and not 0 <= args.exclude_class < split.num_classes:
        raise ValueError(f"--exclude-class {args.exclude_class}: {args.dataset} has classes 0 to {split.num_classes - 1}")
    try:
        return build_model(args.model, split.in_channels, split.num_classes, seed=args.seed, groups=args.groups)
    except ValueError as error:  # GroupNorm: the channels must divide into the groups
        raise ValueError(f"--model {args.model} --groups {args.groups}: {error}") from None


def _check_recording(args, model, steps):
    """The refusals create_recorder would make once started.json is written, made before it."""
    if args.method in ("per-sample", "layer"):
        num_params = sum(p.numel() for p in model.parameters())
        try:
            gradstore.keep_to_k(args.keep, num_params)
        except gradstore.BadInputError:
            raise ValueError(f"--keep {args.keep} keeps no value of the model's {num_params:,} parameters; "
                             f"raise it to at least {1 / num_params:.2g}") from None
    if args.method in ("original", "layer") and steps < 1:
        raise ValueError(f"--method {args.method} records a row per step, and --epochs {args.epochs} trains none: "
                         "give --epochs 1 or more")


def _save_json(path, payload):
    """runs.save_json (written beside and renamed); a failure (a full disk) is one line saying why,
    naming the file and that it is unchanged, and leaves no temporary file behind."""
    try:
        runs.save_json(path, payload)
    except OSError as error:
        tmp = Path(path).with_name(Path(path).name + ".tmp")
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise runs.write_failed(error, path) from None


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
    if samples is not None and samples.size == 0:
        raise ValueError(f"--samples {args.samples} lists no sample index: there is nothing to forget")
    scale = parse_scale(args.scale)
    device = args.device or default_device()
    with np.errstate(over="ignore", invalid="ignore"):  # an overflowing step is refused below, naming --scale
        outcome = forget(args.run_dir, samples=samples, cls=args.cls, scale=scale, retrain_epochs=args.retrain_epochs,
                         device=device, progress=not args.quiet,
                         allow_unverified_store=args.allow_unverified_store)
    config = runs.load_json(root_run(args.run_dir) / "train.json")
    data, request, report = outcome.data, outcome.request, outcome.report
    base = runs.load_model(args.run_dir, config, device)
    _check_finite(args, outcome, base)

    def measure(model):
        return evaluate(model, data, request.forget_set, args.cls, excluded=request.excluded, seed=config["seed"])

    result = {**measure(outcome.model), **report, "after_train": measure(base)}
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
    result["marked_rows"] = result["purged_rows"] = None
    _write_forget_outputs(args, out, outcome, result)
    result["total_seconds"] = time.perf_counter() - started
    if args.json:
        print(json.dumps(result, indent=2, default=runs._jsonable))
    else:
        print(f"forgot {report['request']['num_samples']} samples ({report['request']['num_keys']} rows) with scale "
              f"{report['scale']:.4g} in {report['seconds']:.2f} s: forgotten {result['forgotten_acc']:.3f} / rest "
              f"{result['rest_acc']:.3f} (after train {result['after_train']['forgotten_acc']:.3f} / "
              f"{result['after_train']['rest_acc']:.3f}); written to {out}")
    return 0


def _write_forget_outputs(args, out, outcome, result):
    """OUT/model.pt and OUT/forget.json, and with --mark/--purge the store's rows marked.

    Both files are written into a folder inside OUT first; the rows are marked once they are
    on disk there, and the files renamed into OUT only then. A failure that leaves the store's
    rows as they were (a full disk, the store refusing) removes what was written: OUT is left
    as it was. Once rows are marked, the model without them is always installed.
    """
    created = [parent for parent in (out, *out.parents) if not parent.exists()]  # deepest first
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".forget-", suffix=".tmp", dir=out))
    marking = args.mark or args.purge
    try:
        runs.save_model(staging, outcome.model)
        _save_json(staging / "forget.json", {**outcome.record, **result})
        live = _live_keys(outcome.record) if marking else None
    except OSError as error:  # nothing is marked: OUT is left as it was
        _remove(staging, created)
        reason = os.strerror(error.errno) if error.errno else runs._first_line(error)
        state = "nothing was written" if created else "its files are unchanged"
        raise OSError(f"{reason}: writing {out}/model.pt and forget.json failed; {state}") from None
    except BaseException:
        _remove(staging, created)
        raise
    if marking:  # only once the forgotten model and its record are on disk
        try:
            count = mark_applied(outcome.record, erase=args.purge)
        except (gradstore.StoreError, OSError) as error:
            _mark_failed(args, out, outcome.record, result, live, staging, created, error)
        except BaseException:  # interrupted while marking: the rows may be marked, so the model lands
            _install(staging, out)
            raise
        result["purged_rows" if args.purge else "marked_rows"] = count
        try:
            _save_json(staging / "forget.json", {**outcome.record, **result})
        except OSError as error:  # the rows are marked: the model without them must land all the same
            _install(staging, out)
            raise OSError(f"{os.strerror(error.errno) if error.errno else error}: writing forget.json failed; the rows are "
                          f"{'purged' if args.purge else 'marked'} and {out} holds the forgotten model, but its "
                          "forget.json does not count them") from None
    _install(staging, out)


def _install(staging, out):
    """Rename the staged files into OUT (forget.json last: it makes OUT a forget output)."""
    for name in ("model.pt", "forget.json"):
        if (staging / name).exists():
            os.replace(staging / name, out / name)
    shutil.rmtree(staging, ignore_errors=True)


def _live_keys(record):
    """The record's keys still live in its store (those --mark/--purge will mark)."""
    keys = np.asarray(record["forgotten_keys"], np.int64)
    with gradstore.open(Path(record["root_run"]) / "store.h5") as store:
        return keys[store.state[keys] == gradstore.RowState.LIVE]


def _mark_failed(args, out, record, result, live, staging, created, error):
    """mark_applied failed: one line saying why and what it left. If the rows are as they were, the
    staged files are removed (nothing is written to OUT); if they are marked (a purge that failed
    after marking), or that cannot be told, the model without them is installed in OUT all the same,
    for marked rows are refused to every later request that does not start from it."""
    option = "--purge" if args.purge else "--mark"
    store_path = Path(record["root_run"]) / "store.h5"
    if isinstance(error, gradstore.ReadOnlyError):
        reason = f"{store_path} is read-only; make it writable or drop --mark/--purge"
    elif isinstance(error, OSError) and error.errno and not isinstance(error, gradstore.StoreError):
        reason = f"{os.strerror(error.errno)}: writing {store_path} failed"
    else:  # gradstore's own errors say why, and what became of the file, on their first line
        reason = runs._first_line(error)
    try:
        with gradstore.open(store_path) as store:
            unchanged = bool((store.state[live] == gradstore.RowState.LIVE).all())
            marked = bool((store.state[live] != gradstore.RowState.LIVE).all())
    except (gradstore.StoreError, OSError):
        unchanged = marked = False
    if unchanged:
        _remove(staging, created)
        raise SystemExit(f"{option}: {reason}; nothing was written to {out}")
    if marked:
        result["marked_rows"] = int(live.size)
        try:
            _save_json(staging / "forget.json", {**record, **result})
        except OSError:
            pass  # the first forget.json stays: it names the same keys
    _install(staging, out)
    if not marked:
        raise SystemExit(f"{option}: {reason}; {store_path} could not be read back to tell which rows are marked "
                         f"forgotten, so {out} holds the forgotten model")
    raise SystemExit(f"{option}: {reason}; the rows are marked forgotten" +
                     (" but not purged (the next --purge erases them)" if args.purge else "") +
                     f", and {out} holds the forgotten model")


def _remove(staging, created):
    """Undo _write_forget_outputs: its folder, and the folders it created for OUT (if still empty)."""
    shutil.rmtree(staging, ignore_errors=True)
    for folder in created:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            break


def _finite(model, x):
    """Whether the model's weights, and its outputs on ``x``, are all finite numbers."""

    if not all(torch.isfinite(value).all() for value in model.state_dict().values() if value.is_floating_point()):
        return False
    with torch.no_grad():
        return bool(torch.isfinite(predict(model, x)).all())


def _check_finite(args, outcome, base):
    """Refuse weights that overflowed (a step too large for the recorded rows) before they are evaluated."""
    probe = outcome.data.train_x[:256]
    if _finite(outcome.model, probe):
        return
    if not _finite(base, probe):
        raise ValueError(f"{Path(args.run_dir) / 'model.pt'} holds weights that are not finite numbers, or that give "
                         "outputs that are not: it is damaged")
    what = "the removal" if args.scale == "auto" else f"the step --scale {args.scale}"
    raise ValueError(f"{what} makes the model's weights or outputs overflow (not finite numbers); nothing was "
                     "written: choose a smaller --scale")


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
    f.add_argument("--scale", default="1",
                   help=f"step size: a number from 0 (no step) to {MAX_SCALE:.0f} (default 1: the recorded rows "
                        "exactly) or 'auto' (chosen by forward passes)")
    f.add_argument("--retrain-epochs", type=int, default=0,
                   help="fine-tune on the retained data afterwards (default 0: none; seed: 4)")
    f.add_argument("--gold", metavar="RUN_DIR", help="a model retrained without the forgotten data, to compare with")
    f.add_argument("--mark", action="store_true",
                   help="mark the applied rows forgotten in the store (later requests from other bases refuse them)")
    f.add_argument("--purge", action="store_true", help="mark the applied rows forgotten and erase them from disk")
    f.add_argument("--allow-unverified-store", action="store_true",
                   help="accept a store that carries no run identity (recorded before stores had one); a store "
                        "whose identity names another run is refused regardless")
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
    parse_scale(args.scale)
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


def check_forget_outputs(args):
    """Before any work: what the command will write can be written (OUT_DIR; with --mark or --purge,
    the store). The store's own refusal would come after the forgotten model is computed."""
    out = Path(args.out)
    existing = next(folder for folder in (out, *out.parents, Path.cwd()) if folder.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {args.out}: {existing} is not writable; choose another --out")
    if not (args.mark or args.purge):
        return
    option = "--purge" if args.purge else "--mark"
    store_path = root_run(args.run_dir) / "store.h5"
    if not store_path.exists():  # --method none: forget refuses the run itself
        return
    with gradstore.open(store_path) as store:
        if not store.finished:
            raise ValueError(f"{store_path}: recording has not finished (finalize never ran), and {option} needs a "
                             "finished store")
        files = [store_path] + [Path(shard.path) for shard in getattr(store, "shards", ())]
    for file in files:
        # as gradstore refuses to open it for writing: no write permission bit, even for root
        if not (os.stat(file).st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) and os.access(file, os.W_OK)):
            raise ValueError(f"{file} is read-only; make it writable or drop --mark/--purge")
        if args.purge and not os.access(file.parent, os.W_OK | os.X_OK):
            raise ValueError(f"{file.parent} is read-only, and --purge rewrites {file.name} there (a new file renamed "
                             "over it); make the folder writable or drop --purge")


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
                                   ("--poison-seed", 0 if args.poison_seed is None else args.poison_seed, 0),
                                   ("--seed", args.seed, 0),
                                   ("--groups", args.groups, 1), ("--memory-budget", args.memory_budget, 0),
                                   ("--checkpoint-every", args.checkpoint_every, 0)):
            if value < low:
                raise ValueError(f"{option} must be at least {low}, got {value}")
        if args.seed >= 2**63:
            raise ValueError(f"--seed must be below 2**63, got {args.seed}")
        if not (math.isfinite(args.keep) and 0 < args.keep <= 1):  # refused even where --method ignores it
            raise ValueError(f"--keep is the fraction of values kept per row: a number in (0, 1], got {args.keep}")
        if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
            raise ValueError(f"--lr must be a finite number above 0, got {args.lr}")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a file, not a run directory")
    else:
        if args.retrain_epochs < 0:
            raise ValueError(f"--retrain-epochs must be at least 0, got {args.retrain_epochs}")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise ValueError(f"--out {args.out} is a file, not a directory")


def main(argv=None):
    """Every failure is one line on stderr and a non-zero status (argparse's usage errors: 2), never a traceback."""
    args = build_parser().parse_args(argv)

    def run():
        check_common_inputs(args)
        if args.command == "forget":
            check_forget_inputs(args)
            check_forget_outputs(args)
        return args.run(args)

    return run_reporting_errors("unlearn", args.command, run)


if __name__ == "__main__":
    sys.exit(main())
