"""The command line's options: the parser, and the checks of values argparse's types let through."""

import argparse
import math
from pathlib import Path
from typing import List

import torch

from gradstore.codecs import CODECS

from ..errors import RunConfigError
from ..forgetting.rules.registry import rule_names
from ..runs import data as datasets
from ..runs.config import ENGINES, FLAVOURS, MASKED, METHODS, MODELS, OPTIMIZERS, UPDATE


def parse_keep_first(text: str) -> List[int]:
    """--keep-first CLASS:N as [CLASS, N] (train.json's form); argparse's usage error otherwise."""
    try:
        cls_text, count_text = text.split(":")
        cls, count = int(cls_text), int(count_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--keep-first wants CLASS:N (e.g. 3:100), got {text!r}") from None
    if count < 0:
        raise argparse.ArgumentTypeError(f"--keep-first CLASS:N wants N >= 0, got {text!r}")
    return [cls, count]


def build_parser(max_scale: float) -> argparse.ArgumentParser:
    """`python -m unlearn`'s parser: the train and forget commands (``max_scale``: --scale's ceiling, for its help)."""
    parser = argparse.ArgumentParser(
        prog="python -m unlearn",
        description="Train while recording per-sample contributions, then forget samples or a class.",
        epilog="Example: python -m unlearn train --dataset digits --model simple --method per-sample --out runs/a && "
               "python -m unlearn forget runs/a --class 3 --scale auto --out runs/a-forget3 --json",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_train_arguments(commands.add_parser("train", help="train a model, recording into RUN_DIR/store.h5",
                                            description="Train (seeded, deterministic) and record every sample or "
                                                        "step."))
    add_forget_arguments(commands.add_parser(
        "forget", help="forget samples or a class from a run",
        description="Add the request's recorded rows back to the weights; evaluate; write OUT_DIR."), max_scale)
    return parser


def add_train_arguments(t: argparse.ArgumentParser) -> None:
    """`train`'s options (their names and defaults are what train.json records)."""
    t.add_argument("--dataset", required=True, choices=datasets.DATASETS,
                   help="digits: scikit-learn's bundled 8x8 digits (no files needed); mnist: IDX files; cifar100: pickles")
    t.add_argument("--data-dir", help="folder of the dataset's files (mnist default: $MNIST_DIR, else ../shared/data/mnist relative to the working directory)")
    t.add_argument("--model", required=True, choices=list(MODELS), help="the seed's small CNN or ResNet-18 (GroupNorm)")
    t.add_argument("--groups", type=int, default=1, help="GroupNorm groups for resnet18 (default 1, the seed's)")
    t.add_argument("--method", required=True, choices=list(METHODS),
                   help="per-sample: ours; original: every step's dense delta; layer: a fraction of it; none: no recording")
    t.add_argument("--flavour", choices=list(FLAVOURS), default=UPDATE,
                   help="per-sample rows: raw gradient (the seed's) or the sample's share of the optimizer step (default)")
    t.add_argument("--engine", choices=list(ENGINES), default=MASKED,
                   help="per-sample gradients: 'masked' (hooks in the backward, only the kept values; default) "
                        "or 'vmap' (torch.func, full per-sample gradients; any module)")
    t.add_argument("--keep", type=float, default=0.1, help="fraction p of values kept per row (per-sample, layer)")
    t.add_argument("--codec", choices=list(CODECS),
                   help="row codec, any registered in gradstore.codecs.CODECS (default int8 for per-sample, fp32 for "
                        "original/layer)")
    t.add_argument("--epochs", type=int, default=4)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--seed", type=int, default=42)
    t.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adam",
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


def add_forget_arguments(f: argparse.ArgumentParser, max_scale: float) -> None:
    """`forget`'s options."""
    f.add_argument("run_dir", metavar="RUN_DIR", help="a run written by `train`, or a previous forget's OUT_DIR")
    what = f.add_mutually_exclusive_group(required=True)
    what.add_argument("--class", dest="cls", type=int, metavar="C", help="forget every training sample of class C")
    what.add_argument("--samples", metavar="FILE", help="training-set indices to forget, one per line (or .npy)")
    f.add_argument("--scale", default="1",
                   help=f"step size: a number from 0 (no step) to {max_scale:.0f} (default 1: the recorded rows "
                        "exactly), 'auto' (the rule for the request's kind) or a step rule by name "
                        f"({', '.join(rule_names())}: docs/DESIGN.md)")
    f.add_argument("--find-similar", action="store_true",
                   help="with --samples: also forget the retained samples the model reads as it reads the named ones "
                        "(found only when the named ones share a direction a label-matched control does not; "
                        "forget.json lists them under 'found', with precision and recall where RUN/poisoned.txt "
                        "exists)")
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


def check_common_inputs(args: argparse.Namespace) -> None:
    """Option values argparse's types let through but the commands cannot use (RunConfigError naming the option)."""
    if args.device:
        try:
            device = torch.device(args.device)
        except (RuntimeError, ValueError):
            raise RunConfigError(f"--device {args.device!r} is not a torch device (cpu, cuda, cuda:N)") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise RunConfigError(f"--device {args.device}: torch sees no CUDA device here")
    if args.command == "train":
        check_train_inputs(args)
    else:
        if args.retrain_epochs < 0:
            raise RunConfigError(f"--retrain-epochs must be at least 0, got {args.retrain_epochs}")
        if Path(args.out).exists() and not Path(args.out).is_dir():
            raise RunConfigError(f"--out {args.out} is a file, not a directory")


def check_train_inputs(args: argparse.Namespace) -> None:
    """`train`'s option values that cannot be used, whatever the data."""
    if args.poison is None and (args.poison_seed is not None or args.poison_target != 0):
        raise RunConfigError("--poison-seed and --poison-target need --poison N")
    for option, value, low in (("--batch-size", args.batch_size, 1), ("--epochs", args.epochs, 0),
                               ("--poison", 0 if args.poison is None else args.poison, 0),
                               ("--poison-seed", 0 if args.poison_seed is None else args.poison_seed, 0),
                               ("--seed", args.seed, 0),
                               ("--groups", args.groups, 1), ("--memory-budget", args.memory_budget, 0),
                               ("--checkpoint-every", args.checkpoint_every, 0)):
        if value < low:
            raise RunConfigError(f"{option} must be at least {low}, got {value}")
    if args.seed >= 2**63:
        raise RunConfigError(f"--seed must be below 2**63, got {args.seed}")
    if not (math.isfinite(args.keep) and 0 < args.keep <= 1):  # refused even where --method ignores it
        raise RunConfigError(f"--keep is the fraction of values kept per row: a number in (0, 1], got {args.keep}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise RunConfigError(f"--lr must be a finite number above 0, got {args.lr}")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise RunConfigError(f"--out {args.out} is a file, not a run directory")
