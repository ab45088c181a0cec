"""`python -m bench throughput`: what recording and forgetting cost, as ratios measured in one run.

Plain training and training with recording alternate on the same model, data, seed and
threads (the best of ``--repeats`` each); the recorded store then serves forget
requests, timed against the plain training time (the retrain-from-scratch reference).
Inputs need no real files: MNIST when present, scikit-learn's digits otherwise, or
random CIFAR-shaped tensors with ``--synthetic-cifar`` (ResNet-18 on a GPU).
"""

import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import gradstore
from unlearn import data as datasets
from unlearn.models import build_model, named_shapes
from unlearn.recorders import PerSampleRecorder
from unlearn.train import default_device, train


class TimedStore:
    """Wraps a store to count the raw bytes it ingests and the seconds it spends doing so."""

    def __init__(self, store):
        self._store = store
        self.seconds = 0.0
        self.raw_bytes = 0

    def __getattr__(self, name):
        return getattr(self._store, name)

    def accumulate(self, keys, values, labels=None):
        started = time.perf_counter()
        self._store.accumulate(keys, values, labels)
        self.seconds += time.perf_counter() - started
        self.raw_bytes += np.asarray(values).size * 4

    def finalize(self):
        started = time.perf_counter()
        self._store = self._store.finalize()
        return self
        self.seconds += time.perf_counter() - started


def load_inputs(args):
    if args.synthetic_cifar:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((args.samples, 3, 32, 32)).astype(np.float32)
        y = rng.integers(0, 100, args.samples).astype(np.int64)
        return x, y, 3, 100, "random CIFAR-shaped"
    try:
        split, name = datasets.load_dataset("mnist"), "mnist"
    except FileNotFoundError:
        split, name = datasets.load_dataset("digits"), "digits"
    count = min(args.samples, len(split))
    return split.train_x[:count], split.train_y[:count], split.in_channels, split.num_classes, name


def measure(args):
    x, y, channels, classes, source = load_inputs(args)
    device = torch.device(args.device) if args.device else default_device()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plain_times, recorded_times, store = [], [], None
    for repeat in range(args.repeats):
        model = build_model(args.model, channels, classes, seed=0)
        plain_times.append(train(model, x, y, 1, args.batch_size, 0, device=device, progress=False)["seconds"])
        model = build_model(args.model, channels, classes, seed=0)
        num_params = sum(p.numel() for p in model.parameters())
        store = TimedStore(gradstore.create(out / "throughput.h5", num_params, len(y), args.keep, codec=args.codec,
                                            fingerprint=gradstore.model_fingerprint(named_shapes(model)), overwrite=True))
        recorded = train(model, x, y, 1, args.batch_size, 0, recorders=[PerSampleRecorder(store, "update")],
                         device=device, progress=False)
        recorded_times.append(recorded["seconds"])
        store._store.close()
    plain, with_recording = min(plain_times), min(recorded_times)
    opened = gradstore.open(out / "throughput.h5")
    flat = np.zeros(opened.num_params, np.float32)
    rng = np.random.default_rng(0)
    opened.scatter_add(flat, [0])  # warm the kernels
    one = []
    for key in rng.choice(len(y), size=min(51, len(y)), replace=False).tolist():
        started = time.perf_counter()
        opened.scatter_add(flat, [key], -1.0)
        one.append(time.perf_counter() - started)
    label = int(np.bincount(y).argmax())
    class_keys = opened.keys_with_label(label)
    class_times = []
    for _ in range(3):
        started = time.perf_counter()
        opened.scatter_add(flat, class_keys, -1.0)
        class_times.append(time.perf_counter() - started)
    opened.close()
    return {
        "inputs": source, "model": args.model, "device": str(device), "samples": len(y), "batch_size": args.batch_size,
        "keep": args.keep, "codec": args.codec, "threads": torch.get_num_threads(), "repeats": args.repeats,
        "plain_epoch_seconds": plain, "recorded_epoch_seconds": with_recording,
        "recording_overhead": with_recording / plain,
        "store_ingest_mb_s": store.raw_bytes / store.seconds / 1e6,
        "forget_one_sample_ms": statistics.median(one) * 1e3,
        "forget_class_seconds": statistics.median(class_times), "class_rows": int(class_keys.size),
        "retrain_seconds_reference": plain,
        "forget_one_vs_retrain": plain / statistics.median(one),
        "forget_class_vs_retrain": plain / statistics.median(class_times),
    }


def main(args):
    result = measure(args)
    (Path(args.out) / "throughput.json").write_text(json.dumps(result, indent=2))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"{result['model']} on {result['samples']} {result['inputs']} samples, {result['device']}, "
              f"{result['threads']} threads, p={result['keep']} {result['codec']}, best of {result['repeats']}:")
        print(f"  one epoch: plain {result['plain_epoch_seconds']:.2f} s, recording {result['recorded_epoch_seconds']:.2f} s"
              f" -> overhead {result['recording_overhead']:.2f}x (target <= 2.0x)")
        print(f"  store ingest {result['store_ingest_mb_s']:.0f} MB/s of raw fp32 (time inside accumulate + finalize)")
        print(f"  forget one sample {result['forget_one_sample_ms']:.3f} ms, a class ({result['class_rows']} rows) "
              f"{result['forget_class_seconds'] * 1e3:.1f} ms")
        print(f"  against retraining the same data for the same one epoch: {result['forget_one_vs_retrain']:.0f}x "
              f"(one sample), {result['forget_class_vs_retrain']:.0f}x (a class); a real retrain runs E epochs")
    return 0


def add_arguments(parser):
    parser.add_argument("--model", choices=["simple", "resnet18"], default="simple")
    parser.add_argument("--samples", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--keep", type=float, default=0.1)
    parser.add_argument("--codec", choices=["fp32", "fp16", "int8"], default="int8")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--synthetic-cifar", action="store_true", help="random 3x32x32 inputs, 100 classes")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", default="out/bench-throughput")
