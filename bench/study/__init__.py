"""`python -m bench study [--quick] --out DIR`: the seed report's tables, every codec and flavour.

Per seed: one training run records every store (bench/study/record.py), models are
retrained from scratch without each request, then every store forgets (a) the seed's
class and (b) a random 1% of the training samples, with scale 1 and scale "auto"
(bench/study/cells.py). Each finished cell is appended to DIR/cells.json at once, so an
interrupted study resumes where it stopped. DIR/results.{md,csv,json} and the plots are
rewritten from every cell at the end (bench/study/report.py).

--quick: scikit-learn's bundled digits (no data files), one seed: a few minutes on 2 cores.
Default: the seed's MNIST protocol (class 3 kept at its first 100 samples, 4 epochs,
B = 64, Adam 1e-3), seeds 0 and 1.
"""

import argparse
import shlex
import sys
from pathlib import Path

from .grid import BASELINES, CODECS, DEFAULT_CODECS, FLAVOURS, KEEPS, MODELS, REQUESTS, build_config
from .record import STUDY_ENGINE
from .seeds import run

__all__ = ["CODECS", "DEFAULT_CODECS", "FLAVOURS", "KEEPS", "REQUESTS", "add_arguments", "build_config", "main", "run"]


def main(args: argparse.Namespace) -> int:
    """`python -m bench study`: the study the options describe, written under --out."""
    return run(build_config(args), Path(args.out), keep_stores=args.keep_stores,
               command="python -m bench " + shlex.join(sys.argv[1:]))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`python -m bench study`'s options."""
    parser.add_argument("--quick", action="store_true", help="bundled digits, one seed: a few minutes on 2 cores")
    parser.add_argument("--out", default="out/study", help="results folder (cells.json there makes the study resumable)")
    parser.add_argument("--dataset", choices=["digits", "mnist", "cifar100"], help="default: digits with --quick, else mnist")
    parser.add_argument("--data-dir", help="MNIST folder (default: $MNIST_DIR, else ../shared/data/mnist relative to the working directory); "
                                           "for cifar100 the folder holding cifar-100-python/")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 with --quick, else 0 1")
    parser.add_argument("--model", choices=MODELS, default="simple",
                        help="simple (the seed's SimpleModel, default) or resnet18 (GroupNorm; recorded by the masked engine)")
    parser.add_argument("--baselines", choices=BASELINES,
                        help="recorded: the original method's and the layer-wise stores are recorded beside ours (default "
                             "for simple); computed: not recorded, the original's size computed as steps x M x 4 bytes "
                             "(default for resnet18, whose original store is ~38 GB an epoch on MNIST)")
    parser.add_argument("--forget-class", type=int, default=3)
    parser.add_argument("--keep-first", type=int,
                        help="samples of the forgotten class kept (default 100 on MNIST, all elsewhere; 0: all)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--keeps", type=float, nargs="+", default=KEEPS, help="p of the per-sample stores")
    parser.add_argument("--codecs", nargs="+", default=DEFAULT_CODECS, choices=CODECS,
                        help="codecs the fp32 stores are transcoded to (default: fp32 fp16 int8)")
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
    parser.add_argument("--only-stores", nargs="+", metavar="STORE",
                        help="measure only these stores' cells now (e.g. ours-update-p0.0025-int2; the baselines and "
                             "reference rows always): the others are left for a later run without it, which resumes")
    parser.add_argument("--keep-stores", action="store_true", help="keep the .h5 stores of finished seeds")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--engine", choices=["masked", "vmap"],
                        help=f"per-sample gradient engine (default: {STUDY_ENGINE} for SimpleModel's class and sample "
                             "requests' run, the faster for its many masks (docs/RESULTS.md); masked for ResNet-18 and "
                             "for the poisoned run's few)")
